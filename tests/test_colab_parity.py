"""Installing tlcourse where torch, torchvision, TensorFlow and Keras are already installed (as on
Google Colab, whose notebooks' first cell runs `pip install "tlcourse @ git+..."`, without extras)
must leave every one of them as it is: no downgrade, no replacement."""

import json
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREINSTALLED = ("torch", "torchvision", "tensorflow", "tensorflow-cpu", "keras", "numpy", "scipy",
                "scikit-learn", "matplotlib", "pillow", "transformers", "ipykernel", "ipywidgets")


def _requirement_names() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = {}
    for requirement in project["dependencies"]:
        requirement = requirement.split(";")[0].strip()
        name = requirement.split("[")[0]
        for op in ("<", ">", "=", "!", "~", " "):
            name = name.split(op)[0]
        specs[name.lower()] = requirement
    return specs


def test_requirements_put_no_ceiling_on_what_colab_preinstalls():
    """A newer torch or numpy on Colab must satisfy tlcourse as it is: lower bounds only."""
    for name, requirement in _requirement_names().items():
        if name in PREINSTALLED:
            assert not any(op in requirement for op in ("<", "==", "~=", "!=")), requirement


def test_pip_install_into_an_environment_with_them_changes_none_of_them(tmp_path):
    """This environment's packages (recent torch, torchvision, TensorFlow, Keras and the rest) are
    exposed to a fresh interpreter through a .pth file, as if preinstalled; pip resolves
    `pip install <repository>` there, offline (--no-index), and reports what it would install:
    tlcourse alone. Anything it wanted to up- or downgrade would appear in the report (or, not being
    available offline, make the resolution fail)."""
    target = tmp_path / "colab"
    venv.create(target, with_pip=False)   # pip comes from this environment (pip --python)
    python = target / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = _versions(python)
    assert "torch" in before and "torchvision" in before
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--no-index",
                          "--no-build-isolation", "--quiet", "--report", str(report), str(REPO)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    assert set(planned) == {"tlcourse"}, planned
    print({name: before[name] for name in PREINSTALLED if name in before})


def _versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)
