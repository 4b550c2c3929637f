"""``tlcourse autograder build NN``: a ready Gradescope autograder zip for chapter NN.

The zip holds what Gradescope's specification asks for at its root
(https://gradescope-autograders.readthedocs.io/en/latest/specs/):

- ``setup.sh``: run once, as root, when Gradescope builds the image (Ubuntu): installs Python
  and bubblewrap, creates a virtual environment and installs the bundled tlcourse wheel;
- ``run_autograder``: run for every submission; grades every ``.ipynb`` under
  ``/autograder/submission`` with ``tlcourse grade --chapter NN`` and writes
  ``/autograder/results/results.json`` (several notebooks give one results object);
- ``tests/``: the hidden tests (``chNN.py`` and the ``.py`` files beside it), when given;
- ``tlcourse-<version>-py3-none-any.whl``: tlcourse built from this working tree, so the
  grader Gradescope runs is the one the teacher tested here (not whatever PyPI or git holds).

``AUTOGRADER_ROOT`` (default ``/autograder``) and ``TLCOURSE_AUTOGRADER_PYTHON`` (default the
venv's python) let ``run_autograder`` run outside Gradescope, as the tests do.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HELP = """\
Write a Gradescope autograder zip for chapter NN: setup.sh (installs Python, bubblewrap and
the bundled tlcourse wheel on Gradescope's Ubuntu image; the first build there takes
minutes, as pip downloads torch), run_autograder (grades every notebook of a submission with
`tlcourse grade --chapter NN`), the hidden tests of --tests DIR (chNN.py and the .py files
beside it), and tlcourse itself as a wheel built from this working tree.

Upload the zip on Gradescope (assignment -> Configure Autograder -> Zip file upload).
Try it locally first: unzip it into ROOT/source, put notebooks in ROOT/submission, then
  AUTOGRADER_ROOT=ROOT TLCOURSE_AUTOGRADER_PYTHON=$(which python) ROOT/source/run_autograder
and read ROOT/results/results.json.

examples:
  tlcourse autograder build 00 -o autograder.zip
  tlcourse autograder build 01 --tests ~/hidden-tests -o ch01-autograder.zip
"""

# Files a wheel build needs besides the package itself (pyproject names README.md as readme).
_BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE", "LICENSE.txt")


class AutograderError(Exception):
    """A problem with what the teacher asked for (a plain one-paragraph message)."""


def add_command(subparsers) -> None:
    """Add ``autograder`` (``build``) to an argparse subparsers object."""
    a = subparsers.add_parser("autograder", help="write a Gradescope autograder zip (setup.sh, run_autograder, "
                              "hidden tests, tlcourse wheel)", description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("action", choices=["build"], help="build: write the zip")
    a.add_argument("chapter", metavar="NN", help="chapter whose exercises it grades (00, 01, ...)")
    a.add_argument("--tests", metavar="DIR", help="hidden tests folder with chNN.py (default: the public checks)")
    a.add_argument("-o", "--output", default="autograder.zip", metavar="ZIP", help="default: %(default)s")
    a.set_defaults(func=autograder_command)


def autograder_command(args) -> int:
    try:
        out, entries = build(args.chapter, args.tests, args.output)
    except AutograderError as exc:
        print(f"tlcourse autograder: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({_size(out.stat().st_size)}) for chapter {normalize_chapter(args.chapter)}:")
    width = max(len(name) for name, _ in entries)
    for name, size in entries:
        print(f"  {name:<{width}}  {_size(size):>9}")
    print("Upload it on Gradescope (Configure Autograder -> Zip file upload). Its first image build takes "
          "minutes: pip downloads torch and the other dependencies.")
    return 0


def build(chapter: str, tests_dir=None, output="autograder.zip", root: Path | None = None) -> tuple[Path, list]:
    """Write the autograder zip; ``(zip path, [(name in zip, bytes)])``.

    ``root``: the tlcourse source tree to bundle (default: the one this package runs from).
    Every check on the input comes before the (slower) wheel build.
    """
    chapter = normalize_chapter(chapter)
    hidden = _hidden_tests(tests_dir, chapter) if tests_dir else {}
    if not tests_dir:
        _public_checks(chapter)
    from tlcourse.grading.commands import unwritable

    out = Path(output)
    problem = unwritable(out)
    if problem:
        raise AutograderError(f"cannot write {out}: {problem}. Pass -o with a path in a folder you can write to.")
    root = Path(root) if root else source_root()
    with tempfile.TemporaryDirectory(prefix="tlcourse-autograder-") as tmp:
        wheel = build_wheel(root, Path(tmp))
        files = {  # name in the zip -> (bytes, executable)
            "setup.sh": (setup_script(wheel.name).encode(), True),
            "run_autograder": (run_script(chapter, bool(hidden), _example_name(root, chapter)).encode(), True),
            wheel.name: (wheel.read_bytes(), False),
        }
        files.update({f"tests/{name}": (data, False) for name, data in hidden.items()})
        files["BUILD-INFO.txt"] = (_build_info(chapter, tests_dir, files).encode(), False)
        _write_zip(out, files)
    return out, [(name, len(data)) for name, (data, _) in files.items()]


def normalize_chapter(chapter) -> str:
    """``"0"``, ``"00"``, ``"ch00"`` -> ``"00"``; anything else is a plain error."""
    text = str(chapter).strip().lower().removeprefix("ch")
    if not (text.isdigit() and len(text) <= 2):
        raise AutograderError(f"{chapter!r} is not a chapter number; give two digits, e.g. 00 or 03.")
    return text.zfill(2)


def _public_checks(chapter: str) -> None:
    from tlcourse.grading import grader

    available = grader.find_suites(None)
    if chapter not in available:
        raise AutograderError(
            f"chapter {chapter} has no public checks (tlcourse/grading/checks/ch{chapter}.py); chapters with "
            f"checks: {', '.join(sorted(available))}. Give another chapter, or --tests DIR with ch{chapter}.py.")


def _hidden_tests(tests_dir, chapter: str) -> dict[str, bytes]:
    """``{file name: content}`` of the hidden tests folder's ``.py`` files; ``chNN.py`` must be
    there and compile (a syntax error found here costs a rebuild, found on Gradescope a class)."""
    folder = Path(tests_dir).expanduser()
    if not folder.is_dir():
        raise AutograderError(f"the tests folder {folder} does not exist or is not a folder; --tests takes the "
                              f"folder that holds ch{chapter}.py.")
    suite = folder / f"ch{chapter}.py"
    if not suite.is_file():
        have = sorted(p.name for p in folder.glob("ch*.py")) or ["no chNN.py at all"]
        raise AutograderError(f"the tests folder {folder} has no ch{chapter}.py (it has {', '.join(have)}); "
                              f"hidden tests for chapter {chapter} go in {suite}.")
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("*.py")) if p.is_file()}
    try:
        compile(files[suite.name], str(suite), "exec")
    except SyntaxError as exc:
        raise AutograderError(f"{suite} does not compile (line {exc.lineno}: {exc.msg}); fix it and build "
                              "again.") from None
    return files


def source_root(package_dir: Path | None = None) -> Path:
    """The source tree this tlcourse runs from (the folder with its ``pyproject.toml``); a
    plain error when it was installed from a wheel (nothing here to build the grader from)."""
    if package_dir is None:
        import tlcourse

        package_dir = Path(tlcourse.__file__).resolve().parent
    root = Path(package_dir).parent
    pyproject = root / "pyproject.toml"
    try:
        is_tlcourse = 'name = "tlcourse"' in pyproject.read_text(encoding="utf-8")
    except OSError:
        is_tlcourse = False
    if not is_tlcourse:
        raise AutograderError(
            f"tlcourse runs from {package_dir}, which is not in a tlcourse source tree (no pyproject.toml "
            f"of tlcourse in {root}), so there is no working tree to build the grader from. Clone the course, "
            "install it from there (`pip install -e .` in the clone, or `python3 -m tlcourse.bootstrap "
            "test`), check your exercises with its tests, and run this command with that install.")
    return root


def build_wheel(root: Path, folder: Path) -> Path:
    """Build tlcourse's wheel from the source tree ``root`` into ``folder``; its path.

    The build runs on a fresh copy of the package and its build files: setuptools' ``build/``
    cache in the tree could otherwise put deleted modules back into the wheel, and the
    teacher's tree stays untouched. No build isolation, so no network is needed.
    """
    src = folder / "src"
    src.mkdir()
    shutil.copytree(root / "tlcourse", src / "tlcourse",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints"))
    for name in _BUILD_FILES:
        if (root / name).is_file():
            shutil.copy2(root / name, src / name)
    dist = folder / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check", "-q", "-w", str(dist), str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AutograderError(f"could not build the tlcourse wheel ({exc}).") from None
    wheels = sorted(dist.glob("tlcourse-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stdout + proc.stderr).strip()[-1500:]
        raise AutograderError(
            f"building the tlcourse wheel from {root} failed (`{shlex.join(cmd[:8])} ...`, exit "
            f"{proc.returncode}). This needs pip and setuptools in this environment "
            f"(`python -m pip install setuptools`). pip said:\n{tail}")
    return wheels[-1]


def setup_script(wheel_name: str) -> str:
    """``setup.sh``: Gradescope runs it once, as root, from the unzipped ``source`` folder."""
    return f"""#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder image (Ubuntu).
# The first build takes minutes: pip downloads torch and tlcourse's other dependencies
# from PyPI. Written by `tlcourse autograder build`; see BUILD-INFO.txt.
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"

# bubblewrap walls each submission's code off (namespaces) where the container allows it;
# elsewhere tlcourse grade falls back to a weaker isolation and says so in results.json.
apt-get update
apt-get install -y python3 python3-pip python3-venv bubblewrap

python3 -m venv "$ROOT/venv"
"$ROOT/venv/bin/python" -m pip install --upgrade pip
# Gradescope has no GPU: to download far less, add
#   --extra-index-url https://download.pytorch.org/whl/cpu
# to the next line (CPU-only torch); the course grades on a CPU either way.
"$ROOT/venv/bin/python" -m pip install "$HERE/{wheel_name}"
"$ROOT/venv/bin/python" -m tlcourse.cli grade --help > /dev/null  # fails the build now, not at the first submission
"""


def run_script(chapter: str, hidden: bool, example: str) -> str:
    """``run_autograder``: grades every notebook of a submission into ``results/results.json``."""
    tests = ' --tests "$ROOT/source/tests"' if hidden else ""
    no_notebook = _json_line(
        f"No notebook (.ipynb file) was found in your submission. Upload your chapter {chapter} notebook "
        f"({example}) itself, not a PDF or a zip of something else.")
    failed = _json_line(
        "The autograder itself failed (a problem of the grader, not of your notebook), so this is not your "
        "grade. Your instructor can see what happened in the autograder's output; please tell them.")
    return f"""#!/usr/bin/env bash
# Gradescope runs this for every submission (as /autograder/run_autograder) and shows
# results/results.json. Written by `tlcourse autograder build {chapter}`; see BUILD-INFO.txt.
# To try it elsewhere: AUTOGRADER_ROOT=DIR (holding source/, submission/, results/) and
# TLCOURSE_AUTOGRADER_PYTHON=a python with tlcourse installed.
set -uo pipefail
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
PYTHON="${{TLCOURSE_AUTOGRADER_PYTHON:-$ROOT/venv/bin/python}}"
RESULTS="$ROOT/results/results.json"
mkdir -p "$ROOT/results"
cd "$ROOT"

# Every notebook of the submission, in any folder, in a stable order; not Jupyter's
# checkpoints, nor the ._* shadow files of a zip made on macOS.
NOTEBOOKS=()
while IFS= read -r -d '' nb; do
    NOTEBOOKS+=("$nb")
done < <(find "$ROOT/submission" -type f -name '*.ipynb' -not -name '._*' \\
         -not -path '*/.ipynb_checkpoints/*' -not -path '*/__MACOSX/*' -print0 2>/dev/null | LC_ALL=C sort -z)

if [ "${{#NOTEBOOKS[@]}}" -eq 0 ]; then
    echo "no .ipynb file in $ROOT/submission"
    printf '%s\\n' {shlex.quote(no_notebook)} > "$RESULTS"
    exit 0
fi

"$PYTHON" -m tlcourse.cli grade "${{NOTEBOOKS[@]}}" --chapter {chapter}{tests} --json "$RESULTS"
status=$?
if [ ! -s "$RESULTS" ]; then
    # Nothing graded at all (the grader could not start): say so, rather than Gradescope's
    # generic failure; the details are in this script's output, which instructors see.
    printf '%s\\n' {shlex.quote(failed)} > "$RESULTS"
    exit "$status"
fi
exit 0
"""


def _json_line(message: str) -> str:
    import json

    return json.dumps({"score": 0, "output": message, "visibility": "visible", "tests": []})


def _example_name(root: Path, chapter: str) -> str:
    """The exercise notebook's file name for messages, e.g. ``00_setup_and_first_look.ipynb``."""
    found = [p for folder in ("exercises", "solutions") for p in sorted((root / folder).glob(f"{chapter}_*.ipynb"))]
    return found[0].name if found else f"{chapter}_....ipynb"


def _build_info(chapter: str, tests_dir, files: dict) -> str:
    """What was bundled, with checksums, so a teacher can tell which build Gradescope runs."""
    lines = [f"tlcourse autograder for chapter {chapter}",
             f"built {time.strftime('%Y-%m-%d %H:%M:%S %z')} with Python {sys.version.split()[0]}",
             f"tests: {Path(tests_dir).expanduser().resolve() if tests_dir else 'the public checks in the wheel'}",
             "", "sha256 of the files:"]
    lines += [f"  {hashlib.sha256(data).hexdigest()}  {name}" for name, (data, _) in files.items()]
    return "\n".join(lines) + "\n"


def _write_zip(out: Path, files: dict) -> None:
    """Write ``files`` ({name: (bytes, executable)}) at the zip's root (Gradescope looks for
    setup.sh and run_autograder there), atomically; the executable bit is stored in the zip."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    stamp = time.localtime()[:6]
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, (data, executable) in files.items():
                info = zipfile.ZipInfo(name, date_time=stamp)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3  # Unix, so unzip applies the mode below
                info.external_attr = ((0o100755 if executable else 0o100644) & 0xFFFF) << 16
                z.writestr(info, data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.1f} MB"
