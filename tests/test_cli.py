"""The tlcourse command line. ``run`` starts it as a learner does, a subprocess of the installed
script: the tests of starting, of the environment a command sees and of the notebook runner use it.
``call`` runs the same ``cli.main`` in this process, where torch is already imported (each subprocess
spends about 5 s importing torch and timm): the tests of what a command prints and returns use it
(``call`` is in conftest.py)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tlcourse import cli, datasets

ROOT = Path(__file__).resolve().parent.parent


def run(*args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tlcourse.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("command", ["env", "data", "predict", "run", "results", "grade", "exercises", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: tlcourse {command}" in capsys.readouterr().out


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "tlcourse"
    assert script.exists(), "pip install -e . should have created the tlcourse console script"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "predict" in out.stdout


def test_env_explains_machine(tmp_path):
    # No GPU visible and no profile set: the default profile must be quick, and say why.
    out = run("env", env={"TLCOURSE_DATA": str(tmp_path), "TLCOURSE_PROFILE": "", "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert "profile" in out.stdout and "quick" in out.stdout and "default (by device)" in out.stdout
    assert str(tmp_path) in out.stdout and "missing" in out.stdout
    data = json.loads(run("env", "--json", env={"TLCOURSE_DATA": str(tmp_path)}).stdout)
    assert data["data_dir"] == str(tmp_path) and data["datasets"]["hymenoptera"] == "missing"


def test_data_list_and_verify_missing(call, tmp_path):
    out = call("data", "list")
    assert out.returncode == 0 and "hymenoptera" in out.stdout and "digits" in out.stdout
    out = call("data", "verify", env={"TLCOURSE_DATA": str(tmp_path)})
    assert out.returncode == 0, out.stderr  # missing is not an error, corrupt is
    assert "hymenoptera" in out.stdout and "missing" in out.stdout


def test_data_fetch_offline_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("TLCOURSE_DATA", str(tmp_path))
    offline = dataclasses.replace(datasets.DATASETS["hymenoptera"], urls=("http://127.0.0.1:9/hymenoptera_data.zip",))
    monkeypatch.setitem(datasets.DATASETS, "hymenoptera", offline)
    assert cli.main(["data", "fetch", "hymenoptera"]) == 1
    assert not any(tmp_path.iterdir()), "a failed fetch left files behind"


def test_predict_reports_bad_files_and_still_predicts(call, tmp_path, bundled_photos):
    cat = tmp_path / "cat.jpg"
    bundled_photos["chelsea"].save(cat)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not really a jpeg")
    out = call("predict", str(cat), str(tmp_path / "nope.png"), str(broken), "--top", "3", "--json")
    assert out.returncode == 1  # some files failed
    result = json.loads(out.stdout)
    assert len(result[str(cat)]) == 3
    assert any("cat" in p["class"] for p in result[str(cat)])
    assert "no such file" in result[str(tmp_path / "nope.png")]["error"]
    assert "not a readable image" in result[str(broken)]["error"]
    assert "nope.png" in out.stderr and "broken.jpg" in out.stderr


def test_predict_text_output(call, tmp_path, bundled_photos):
    coffee = tmp_path / "coffee.png"
    bundled_photos["coffee"].save(coffee)
    out = call("predict", str(coffee), "--top", "2")
    assert out.returncode == 0, out.stderr
    assert "1." in out.stdout and "espresso" in out.stdout.splitlines()[1]


def _notebook(path, source):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in source]
    nbformat.write(nb, path)


def test_run_executes_into_build(tmp_path):
    good = tmp_path / "good.ipynb"
    _notebook(good, ["from tlcourse import env\nprint('profile', env.profile(), 'seed', env.setup(verbose=False).seed)"])
    out = run("run", str(good), "--profile", "full", "--seed", "5", "--out", str(tmp_path / "build"))
    assert out.returncode == 0, out.stderr
    assert "seed 5" in out.stdout
    executed = (tmp_path / "build" / "good.ipynb").read_text()
    assert "profile full seed 5" in executed
    assert (tmp_path / "build" / "good.html").exists()


def test_run_notebook_sets_headless_for_the_kernel_only(tmp_path, monkeypatch):
    from tlcourse import notebooks

    monkeypatch.delenv("TLCOURSE_HEADLESS", raising=False)
    monkeypatch.setenv("TLCOURSE_PROFILE", "quick")
    nb = tmp_path / "env.ipynb"
    _notebook(nb, ["import os\nprint('headless', os.environ.get('TLCOURSE_HEADLESS'), os.environ['TLCOURSE_PROFILE'])"])
    result = notebooks.run_notebook(nb, out_dir=tmp_path / "build", profile="full", html=False)
    assert result.ok, result.error
    assert "headless 1 full" in result.executed.read_text()
    # A live session that called it keeps interactive widgets and its own profile.
    assert "TLCOURSE_HEADLESS" not in os.environ and os.environ["TLCOURSE_PROFILE"] == "quick"


def test_run_rejects_a_negative_seed(call, tmp_path):
    out = call("run", "--seed", "-1", str(tmp_path / "any.ipynb"))
    assert out.returncode == 2 and "must be 0 or more" in out.stderr


def test_run_fails_loudly_and_shows_the_cell(tmp_path):
    bad = tmp_path / "bad.ipynb"
    _notebook(bad, ["x = 1", "assert x == 2, 'the claim does not hold'", "print('never')"])
    out = run("run", str(bad), "--out", str(tmp_path / "build"))
    assert out.returncode == 1
    assert "assert x == 2" in out.stderr and "FAILED" in out.stderr
    assert (tmp_path / "build" / "bad.ipynb").exists()  # the partial run is kept for inspection
    out = run("run", str(tmp_path / "missing.ipynb"), "--out", str(tmp_path / "build"))
    assert out.returncode == 1 and "does not exist" in out.stderr


def test_predict_names_ants_and_bees_in_real_photos():
    """Photos the offline model was never tested on here: hymenoptera val from the mirror."""
    try:
        root = datasets.locate("hymenoptera", download=False)
    except datasets.DatasetUnavailable as exc:
        pytest.skip(f"needs the hymenoptera photos: {exc}")
    files = {cls: sorted((root / "val" / cls).glob("*.jpg"))[:8] for cls in ("ants", "bees")}
    out = run("predict", *[str(p) for ps in files.values() for p in ps], "--top", "1", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    right = sum(result[str(p)][0]["class"] == ("ant, emmet, pismire" if cls == "ants" else "bee")
                for cls, ps in files.items() for p in ps)
    assert right >= 12, f"only {right}/16 ants and bees named correctly"


def test_data_verify_flags_a_corrupt_copy(call, tmp_path):
    ants = tmp_path / "hymenoptera_data" / "train" / "ants"
    ants.mkdir(parents=True)
    (ants / "half.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    out = call("data", "verify", "hymenoptera", env={"TLCOURSE_DATA": str(tmp_path)})
    assert out.returncode == 1
    assert "corrupt" in out.stdout and "tlcourse data fetch hymenoptera" in out.stdout
    assert "half.jpg" in out.stdout  # the unreadable image is named


def test_bad_arguments_get_clear_errors(call, tmp_path):
    out = call("predict", "x.jpg", "--top", "0")
    assert out.returncode == 2 and "--top must be at least 1" in out.stderr
    out = call("data", "verify", "hymenopetra")
    assert out.returncode == 2 and "Did you mean 'hymenoptera'" in out.stderr and "Traceback" not in out.stderr
    out = call("predict", "--model", str(tmp_path / "none.pt"), "x.jpg")
    assert out.returncode == 2 and "No saved model" in out.stderr


def test_run_reports_a_cell_timeout(tmp_path):
    slow = tmp_path / "slow.ipynb"
    _notebook(slow, ["import time", "time.sleep(60)"])
    out = run("run", str(slow), "--timeout", "3", "--out", str(tmp_path / "build"), timeout=120)
    assert out.returncode == 1
    assert "longer than the 3 s limit" in out.stderr and "time.sleep(60)" in out.stderr


def test_bench_da_prints_table_and_writes_json(call, tmp_path):
    out = tmp_path / "da.json"
    res = call("bench", "da", "--profile", "quick", "--steps", "3", "--seeds", "2", "--methods", "source_only,adabn",
              "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "digits -> digits_m" in res.stdout and "| source_only |" in res.stdout and "| target_oracle |" in res.stdout
    report = json.loads(out.read_text())
    pair = report["pairs"][0]
    assert (pair["source"], pair["target"], pair["size"]) == ("digits", "digits_m", 16)
    assert [r["method"] for r in pair["runs"]] == ["source_only"] * 2 + ["adabn"] * 2 + ["target_oracle"] * 2
    assert {s["method"] for s in pair["summary"]} == {"source_only", "adabn", "target_oracle"}
    assert all(0 <= r["target_acc"] <= 1 for r in pair["runs"]) and pair["config"]["steps"] == 3


def test_bench_da_bad_input(call, tmp_path):
    res = call("bench", "da", "--methods", "cdan", "--steps", "1")
    assert res.returncode == 2 and "unknown method" in res.stderr and "dann" in res.stderr
    res = call("bench", "da", "--pair", "digits")
    assert res.returncode == 2 and "SOURCE:TARGET" in res.stderr
    res = call("bench", "da", "--pair", "digits:mnist_n", "--steps", "1")
    assert res.returncode == 2 and "No digit domain named 'mnist_n'" in res.stderr
    # An online pair whose data is missing: the registry's explanation, not a traceback.
    res = call("bench", "da", "--pair", "mnist:usps", "--steps", "1", "--seeds", "1", "--no-download",
              env={"TLCOURSE_DATA": str(tmp_path)})
    assert res.returncode == 2 and "TLCOURSE_DATA" in res.stderr and "Traceback" not in res.stderr
