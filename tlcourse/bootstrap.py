"""Set up the course in a local virtual environment, then open it or test it.

The README's two commands::

    python3 -m tlcourse.bootstrap lab     # set up, then open the course in JupyterLab
    python3 -m tlcourse.bootstrap test    # set up, then run the whole test suite

Both create ``.venv/`` beside ``pyproject.toml`` on first use and reuse it afterwards;
the package is re-installed only when ``pyproject.toml`` changed. Extra arguments go to
JupyterLab or pytest (``... test -k data -x``).

This file must run on a bare Python 3.10+ with nothing installed, so it uses the
standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("TLCOURSE_VENV", ROOT / ".venv"))
LANDING = "notebooks/00_setup_and_first_look.ipynb"
# dev: pytest, nbval, JupyterLab; tensorflow: the Keras companions (tensorflow-cpu adds ~20 s here).
EXTRAS = os.environ.get("TLCOURSE_EXTRAS", "dev,tensorflow")
STAMP = VENV / ".tlcourse-install-stamp"


def _say(msg: str) -> None:
    print(f"[tlcourse] {msg}", flush=True)


def _venv_python() -> Path:
    sub = "Scripts/python.exe" if os.name == "nt" else "bin/python"
    return VENV / sub


def _wanted_stamp() -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return f"{digest} extras={EXTRAS} python={sys.version_info[:2]}"


def ensure_environment() -> Path:
    """Create ``.venv`` if needed and install tlcourse into it (editable) with its extras."""
    if sys.version_info < (3, 10):
        sys.exit(f"tlcourse needs Python 3.10 or newer; this is {sys.version.split()[0]}.")
    py = _venv_python()
    if not py.exists():
        _say(f"creating the virtual environment {VENV}")
        try:
            venv.create(VENV, with_pip=True)
        except Exception as exc:  # noqa: BLE001 - any failure here has the same remedy
            sys.exit(
                f"Could not create a virtual environment in {VENV}: {exc}\n"
                "On Debian/Ubuntu install the venv module first: "
                f"sudo apt install python3.{sys.version_info[1]}-venv"
            )
    if STAMP.exists() and STAMP.read_text() == _wanted_stamp():
        _say(f"reusing {VENV} (delete it to reinstall from scratch)")
        return py
    _say(f"installing tlcourse[{EXTRAS}] and its dependencies into {VENV} (first time: a few minutes)")
    start = time.monotonic()
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-e", f".[{EXTRAS}]"]
    if subprocess.call(cmd, cwd=ROOT) != 0:
        sys.exit("pip install failed; the messages above say which package. Nothing was changed outside .venv.")
    STAMP.write_text(_wanted_stamp())
    _say(f"installed in {time.monotonic() - start:.0f} s")
    return py


def _default_data_dir() -> None:
    """During development and CI the dataset mirror lies beside the repository (../shared/data)."""
    mirror = ROOT.parent / "shared" / "data"
    if "TLCOURSE_DATA" not in os.environ and mirror.is_dir():
        os.environ["TLCOURSE_DATA"] = str(mirror)
        _say(f"using the dataset mirror {mirror} (TLCOURSE_DATA)")


def _parallel(py: Path, rest: list[str]) -> list[str]:
    """pytest-xdist's options for the test command: ``TLCOURSE_TEST_WORKERS`` processes (default 2
    where there are 2 or more cores; 0 runs everything in one process), unless ``rest`` or
    ``PYTEST_ADDOPTS`` already chooses (``-n``, ``--dist``, ``-p no:xdist``) or asks for what needs
    one process: a debugger (``--pdb``, ``--trace``) or uncaptured output (``-s``).

    Two single-threaded processes side by side do more than one with two threads: measured on 2
    cores, 1.12x on a ResNet-18 training step and about 2x on the small operations and
    subprocess start-ups that most of ``tests/`` spends its time on. ``--dist loadscope`` keeps a
    notebook's cells in one kernel, as nbval needs; ``--no-loadscope-reorder`` keeps the order
    the repository's ``conftest.py`` gives (the longest notebooks first, so that both processes finish
    together).
    """
    given = [*rest, *os.environ.get("PYTEST_ADDOPTS", "").split()]
    chosen = any(a in ("-n", "--numprocesses", "--dist", "no:xdist", "-pno:xdist", "--pdb", "--trace", "-s",
                       "--capture=no")
                 or a.startswith(("--numprocesses=", "--dist=")) or (a.startswith("-n") and a[2:].isalnum())
                 for a in given)
    workers = os.environ.get("TLCOURSE_TEST_WORKERS", "2" if (os.cpu_count() or 1) >= 2 else "0")
    if chosen or workers in ("0", "1"):
        return []
    if subprocess.call([str(py), "-c", "import xdist"], stderr=subprocess.DEVNULL) != 0:
        _say("pytest-xdist is not installed in the environment: the tests run in one process")
        return []
    _say(f"running the tests in {workers} processes (TLCOURSE_TEST_WORKERS=0 for one)")
    return ["-n", workers, "--dist", "loadscope", "--no-loadscope-reorder"]


# JupyterLab's plugin that asks "Would you like to get notified about official Jupyter news?" on a
# first start (and then fetches news from the internet): a pop-up over the landing notebook.
ANNOUNCEMENTS = "@jupyterlab/apputils-extension:announcements"


def lab_arguments(root: Path = ROOT) -> list[str]:
    """``jupyter lab``'s options for the course: the file browser shows the whole course
    (notebooks/, exercises/, ...), not only the landing notebook's folder; ``default_url`` opens the
    landing notebook. tests/browser starts its server with these too."""
    return [f"--ServerApp.root_dir={root}", f"--LabApp.default_url=/lab/tree/{LANDING}"]


def write_lab_config(folder: Path) -> dict[str, str]:
    """Write a Jupyter config folder ``folder`` whose ``labconfig/page_config.json`` disables
    :data:`ANNOUNCEMENTS`, and return the environment that adds it to Jupyter's config path
    (``JUPYTER_CONFIG_PATH``, ahead of the others; the learner's own settings stay in force)."""
    labconfig = Path(folder) / "labconfig"
    labconfig.mkdir(parents=True, exist_ok=True)
    (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": {ANNOUNCEMENTS: True}}))
    paths = [str(folder), *filter(None, os.environ.get("JUPYTER_CONFIG_PATH", "").split(os.pathsep))]
    return {**os.environ, "JUPYTER_CONFIG_PATH": os.pathsep.join(paths)}


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _lab(bindir: Path, rest: list[str]) -> int:
    """``jupyter lab`` on the course, until it stops (Ctrl-C twice, or once and ``y``)."""
    # Containers and cloud VMs often run as root, which JupyterLab refuses without --allow-root.
    as_root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    port = os.environ.get("JUPYTER_PORT", "8888")
    if not any(a.split("=")[0] in ("--port", "--ServerApp.port") for a in rest) and port.isdigit() \
            and _port_in_use(int(port)):
        # Jupyter then tries other ports by itself (port_retries), but says so in one line of its log.
        _say(f"port {port} is taken (another JupyterLab still running?): JupyterLab takes another free "
             "port and prints its URL below")
    env = write_lab_config(VENV / "tlcourse-lab-config")  # read by this server only (its environment)
    proc = subprocess.Popen([str(bindir / "jupyter"), "lab", *lab_arguments(), *as_root, *rest], cwd=ROOT, env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # Jupyter got the Ctrl-C too: it asks for confirmation, then shuts its kernels down.
            # (subprocess.call would kill it here, and print a traceback.)
            continue


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in {"lab", "test", "setup"}:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    py = ensure_environment()
    bindir = py.parent
    if command == "setup":
        return 0
    if command == "lab":
        return _lab(bindir, rest)
    _default_data_dir()
    start = time.monotonic()
    code = subprocess.call([str(py), "-m", "pytest", *_parallel(py, rest), *rest], cwd=ROOT)
    _say(f"tests finished in {time.monotonic() - start:.0f} s with exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
