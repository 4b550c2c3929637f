"""Gradescope end to end: several notebooks in one results object, results written as soon as
they are known, and the autograder zip of ``tlcourse autograder build`` run as Gradescope
runs it (in a temporary root laid out like ``/autograder``, with this venv's python instead
of the one ``setup.sh`` would install: no network here).

Each grading run is chapter 00 (a few seconds).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from test_grading import GRADESCOPE_SCHEMA  # one schema for the single- and several-notebook files

from tlcourse.grading import autograder, grader
from tlcourse.grading.commands import main

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "00_setup_and_first_look.ipynb"
EXERCISE = ROOT / "exercises" / "00_setup_and_first_look.ipynb"
FULL = 13  # chapter 00's points

HIDDEN_CH00 = (
    "from tlcourse.grading.checks.ch00 import *   # QUESTIONS and the public tests\n"
    "from tlcourse.grading.spec import points\n"
    "import torch\n\n"
    "@points(2, visibility='hidden')\n"
    "def test_q2_hidden_linear(count_parameters):\n"
    "    \"\"\"(hidden) counts the 9 values of nn.Linear(2, 3)\"\"\"\n"
    "    assert count_parameters(torch.nn.Linear(2, 3)) == 9\n")


def _run(argv) -> tuple[int, str, str]:
    """``tlcourse`` grading commands in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _two_notebooks(folder: Path) -> list[Path]:
    """The solution and the exercise, under the names a learner would give them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "00_solution.ipynb", folder / "00_exercise.ipynb"]
    shutil.copy(SOLUTION, paths[0])
    shutil.copy(EXERCISE, paths[1])
    return paths


# --- results written as soon as they are known ------------------------------------------

@pytest.fixture(scope="module")
def graded_pair(tmp_path_factory):
    """Grade solution + exercise with --json/--csv (one sandbox, so in order), looking at both
    files each time the grader reports a finished notebook; ``(snapshots, json, csv, tmp)``."""
    tmp = tmp_path_factory.mktemp("pair")
    paths = _two_notebooks(tmp / "subs")
    out_json, out_csv = tmp / "out" / "results.json", tmp / "out" / "grades.csv"
    snapshots = []
    real = grader.grade

    def observed_grade(paths_, **kwargs):
        progress = kwargs["progress"]

        def spy(sub):
            progress(sub)  # the command's own callback, which rewrites the files
            snapshots.append((sub.name, json.loads(out_json.read_text(encoding="utf-8")),
                              list(csv.DictReader(out_csv.open(encoding="utf-8")))))

        return real(paths_, **dict(kwargs, progress=spy))

    grader.grade = observed_grade
    try:
        code, stdout, stderr = _run(["grade", *map(str, paths), "--json", str(out_json), "--csv", str(out_csv),
                                     "--jobs", "1", "--timeout", "5"])
    finally:
        grader.grade = real
    assert code == 0, stderr
    return snapshots, out_json, out_csv, tmp


def test_results_are_rewritten_after_each_notebook(graded_pair):
    """(d) After the first notebook, both files already hold its grade (and say what is still
    to come); after the second, both; no temporary file is left beside them."""
    snapshots, out_json, out_csv, _ = graded_pair
    assert [name for name, _, _ in snapshots] == ["00_solution.ipynb", "00_exercise.ipynb"]
    first_json, first_rows = snapshots[0][1], snapshots[0][2]
    assert first_json["score"] == FULL
    assert "00_exercise.ipynb: not graded yet" in first_json["output"]
    assert all(t["name"].startswith("00_solution.ipynb · ") for t in first_json["tests"])
    assert [(Path(r["file"]).name, r["score"]) for r in first_rows] == [("00_solution.ipynb", "13")]
    second_rows = snapshots[1][2]
    assert [(Path(r["file"]).name, r["score"]) for r in second_rows] == [
        ("00_solution.ipynb", "13"), ("00_exercise.ipynb", "0")]
    assert "not graded yet" not in json.loads(out_json.read_text())["output"]
    assert sorted(p.name for p in out_json.parent.iterdir()) == ["grades.csv", "results.json"]


def test_several_notebooks_make_one_gradescope_object(graded_pair):
    """(a) Two notebooks: one results object in Gradescope's schema, score and time summed,
    every test named by notebook and question, each notebook's result in the output."""
    jsonschema = pytest.importorskip("jsonschema")
    data = json.loads(graded_pair[1].read_text(encoding="utf-8"))
    jsonschema.validate(data, GRADESCOPE_SCHEMA)
    assert "submissions" not in data
    assert data["score"] == FULL + 0
    assert data["score"] == pytest.approx(sum(t["score"] for t in data["tests"]))
    assert sum(t["max_score"] for t in data["tests"]) == 2 * FULL
    names = [t["name"] for t in data["tests"]]
    assert len(names) == len(set(names))
    for label in ("00_solution.ipynb", "00_exercise.ipynb"):
        mine = [n for n in names if n.startswith(f"{label} · ")]
        assert {n.split(" · ", 1)[1].split(" ", 1)[0] for n in mine} == {"q1", "q2", "q3", "q4"}
    assert "00_solution.ipynb: 13 of 13 points." in data["output"]
    assert "00_exercise.ipynb: 0 of 13 points." in data["output"]
    assert [(Path(n["file"]).name, n["score"]) for n in data["extra_data"]["notebooks"]] == [
        ("00_solution.ipynb", FULL), ("00_exercise.ipynb", 0)]


def test_merged_object_keeps_review_hidden_and_errors_said():
    """The instructor-only review entry stays hidden, per notebook; a notebook that could not
    be graded says why in the output; same-named notebooks in two folders stay apart."""
    ok = grader.Submission("a/00_x.ipynb", chapter="00", seconds=1.5, questions=[grader.QuestionResult(
        "q1", "top-k", [grader.TestResult("t1", "works", 2.0, "visible", True, "")])])
    flagged = grader.Submission("b/00_x.ipynb", chapter="00", seconds=2.0, review=["q1: uses gc"],
                                questions=[grader.QuestionResult(
                                    "q1", "top-k", [grader.TestResult("t1", "works", 2.0, "visible", False, "no")])])
    broken = grader.Submission("c/00_broken.ipynb", error="could not read 00_broken.ipynb: not valid JSON")
    data = grader.gradescope_all([ok, flagged, broken])
    assert data["score"] == 2.0 and data["execution_time"] == 3.5
    names = [t["name"] for t in data["tests"]]
    assert names[:2] == ["a/00_x.ipynb · q1 (top-k): works", "b/00_x.ipynb · q1 (top-k): works"]
    review = [t for t in data["tests"] if "review" in t["name"]]
    assert [(t["name"], t["visibility"]) for t in review] == [
        ("b/00_x.ipynb · for the instructor: review", "hidden")]
    assert "c/00_broken.ipynb: could not read 00_broken.ipynb: not valid JSON" in data["output"]
    # One notebook: today's object, names without a notebook prefix.
    assert grader.gradescope(ok)["tests"][0]["name"] == "q1 (top-k): works"


def test_output_that_cannot_be_written_is_refused_before_grading(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = _run(["grade", str(SOLUTION), "--json", str(blocker / "results.json")])
    assert code == 2 and "cannot write --json" in err and "is not a folder" in err


# --- tlcourse autograder build -----------------------------------------------------------

@pytest.fixture(scope="module")
def public_zip(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "dist" / "autograder.zip"  # dist/ does not exist yet
    code, stdout, stderr = _run(["autograder", "build", "00", "-o", str(out)])
    assert code == 0, stderr
    return out, stdout


@pytest.fixture(scope="module")
def hidden_zip(tmp_path_factory):
    tests = tmp_path_factory.mktemp("hidden")
    (tests / "ch00.py").write_text(HIDDEN_CH00, encoding="utf-8")
    (tests / "answer_key.py").write_text("EXPECTED = 9\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("build-hidden") / "autograder.zip"
    code, _, stderr = _run(["autograder", "build", "0", "--tests", str(tests), "-o", str(out)])
    assert code == 0, stderr
    return out


def test_build_writes_a_gradescope_zip(public_zip):
    """(b) setup.sh and run_autograder at the zip's root, run_autograder executable, the wheel
    of this working tree (with the grader in it), and a printed list of what was written."""
    out, printed = public_zip
    with zipfile.ZipFile(out) as z:
        infos = {i.filename: i for i in z.infolist()}
        wheel = next(n for n in infos if n.startswith("tlcourse-") and n.endswith(".whl"))
        assert {"setup.sh", "run_autograder"} <= set(infos)
        assert not any(n.startswith("tests/") for n in infos)  # no --tests: the public checks in the wheel
        assert (infos["run_autograder"].external_attr >> 16) & stat.S_IXUSR
        setup = z.read("setup.sh").decode()
        run = z.read("run_autograder").decode()
        with zipfile.ZipFile(io.BytesIO(z.read(wheel))) as w:
            inside = set(w.namelist())
    assert "apt-get install -y python3 python3-pip python3-venv bubblewrap" in setup
    assert f'pip install "$HERE/{wheel}"' in setup and "takes minutes" in setup
    assert "--chapter 00" in run and "--tests" not in run.split("tlcourse.cli grade", 1)[1]
    assert {"tlcourse/grading/grader.py", "tlcourse/grading/autograder.py",
            "tlcourse/grading/checks/ch00.py"} <= inside
    assert not any("__pycache__" in n for n in inside)
    assert f"wrote {out}" in printed and "run_autograder" in printed and wheel in printed


def test_build_refuses_bad_input_plainly(tmp_path, capsys):
    assert main(["autograder", "build", "42", "-o", str(tmp_path / "a.zip")]) == 2
    assert "chapter 42 has no public checks" in capsys.readouterr().err
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / "ch01.py").write_text("QUESTIONS = {}\n")
    assert main(["autograder", "build", "00", "--tests", str(tmp_path / "hidden"), "-o", str(tmp_path / "a.zip")]) == 2
    err = capsys.readouterr().err
    assert "has no ch00.py (it has ch01.py)" in err
    (tmp_path / "hidden" / "ch00.py").write_text("def broken(:\n")
    assert main(["autograder", "build", "00", "--tests", str(tmp_path / "hidden"), "-o", str(tmp_path / "a.zip")]) == 2
    assert "does not compile" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["autograder", "build", "00", "-o", str(tmp_path / "file" / "a.zip")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert not (tmp_path / "a.zip").exists()
    with pytest.raises(autograder.AutograderError, match="not in a tlcourse source tree"):
        autograder.source_root(tmp_path / "site-packages" / "tlcourse")


def _run_autograder(zip_path: Path, root: Path, notebooks: list[Path]) -> dict:
    """Unzip into ``root/source``, put ``notebooks`` in ``root/submission``, run
    ``run_autograder`` as Gradescope does (from the folder it was copied to) and read
    ``root/results/results.json``."""
    for sub in ("source", "submission", "results"):
        (root / sub).mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(root / "source")
    script = root / "run_autograder"  # Gradescope copies it to /autograder/run_autograder
    shutil.copy(root / "source" / "run_autograder", script)
    script.chmod(0o755)
    for nb in notebooks:
        shutil.copy(nb, root / "submission" / nb.name)
    env = dict(os.environ, AUTOGRADER_ROOT=str(root), TLCOURSE_AUTOGRADER_PYTHON=sys.executable)
    proc = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((root / "results" / "results.json").read_text(encoding="utf-8"))
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(data, GRADESCOPE_SCHEMA)
    return data


def test_run_autograder_gives_full_marks_to_a_solution(public_zip, tmp_path):
    """(c) A solution in submission/: full marks in results.json, tests named by question."""
    data = _run_autograder(public_zip[0], tmp_path / "autograder", [SOLUTION])
    assert data["score"] == sum(t["max_score"] for t in data["tests"]) == FULL
    assert data["tests"][0]["name"].startswith("q1 ")


def test_run_autograder_gives_zero_to_an_exercise(public_zip, tmp_path):
    """(c) The untouched exercise: 0 of 13, every test failed with a kind message."""
    data = _run_autograder(public_zip[0], tmp_path / "autograder", [EXERCISE])
    assert data["score"] == 0 and sum(t["max_score"] for t in data["tests"]) == FULL
    assert all(t["status"] == "failed" and "not answered yet" in t["output"] for t in data["tests"])


def test_run_autograder_uses_the_hidden_tests(hidden_zip, tmp_path):
    """(c) Built with --tests: the hidden folder is bundled (chNN.py and the .py beside it)
    and its extra hidden test is graded: 13 + 2 for the solution, visible only to staff."""
    with zipfile.ZipFile(hidden_zip) as z:
        assert {"tests/ch00.py", "tests/answer_key.py"} <= set(z.namelist())
        assert '--tests "$ROOT/source/tests"' in z.read("run_autograder").decode()
    data = _run_autograder(hidden_zip, tmp_path / "autograder", [SOLUTION])
    extra = [t for t in data["tests"] if "(hidden) counts the 9 values" in t["name"]]
    assert [(t["score"], t["max_score"], t["visibility"]) for t in extra] == [(2.0, 2.0, "hidden")]
    assert data["score"] == FULL + 2


def test_run_autograder_without_a_notebook_says_so(public_zip, tmp_path):
    data = _run_autograder(public_zip[0], tmp_path / "autograder", [])
    assert data["score"] == 0 and "No notebook (.ipynb file)" in data["output"]
