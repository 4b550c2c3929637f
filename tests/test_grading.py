"""Grading you can trust: solutions score full marks, stubs score zero, and crafted bad
submissions (hangs, crashes, forgeries, monkeypatches, corrupt files) cost only themselves.

Crafted submissions are built here from the solution notebook, in a temporary folder
(not as files under tests/, where nbval would try to run them as notebooks).
"""

from __future__ import annotations

import copy
import io
import json
import os
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from grading_support import grade_and_remember, unanswered_after_run_all

from tlcourse.grading import exercises, extract, grader

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "00_setup_and_first_look.ipynb"
EXERCISE = ROOT / "exercises" / "00_setup_and_first_look.ipynb"
TIMEOUT = 3.0  # per question: the hang cases cost ~3-5 s each, not the default 10


def _solution() -> dict:
    return json.loads(SOLUTION.read_text(encoding="utf-8"))


def _with_answer(qid: str, source: str, nb: dict | None = None) -> dict:
    """The solution notebook with question ``qid``'s answer cell replaced by ``source``."""
    nb = copy.deepcopy(nb or _solution())
    cell = next(c for c in nb["cells"] if extract.question_of(c) == qid)
    cell["source"] = source
    return nb


def _with_cell(after_qid: str, source: str, nb: dict | None = None, offset: int = 1) -> dict:
    """The notebook with a new untagged code cell ``offset`` cells after ``after_qid``'s
    answer cell (``after_qid=None``: right after the setup cell)."""
    nb = copy.deepcopy(nb or _solution())
    if after_qid is None:
        at = next(i for i, c in enumerate(nb["cells"]) if "checker(" in extract.cell_source(c)) + 1
    else:
        at = next(i for i, c in enumerate(nb["cells"]) if extract.question_of(c) == after_qid) + offset
    nb["cells"].insert(at, {"cell_type": "code", "metadata": {}, "source": source, "outputs": [],
                            "execution_count": None})
    return nb


def _stub(qid: str) -> str:
    return exercises.stub_source(_answer(qid), qid)


# Returns its input: no q3 test may pass (test_q3_not_in_place once did: the input stays unchanged).
WRONG_NORMALIZE = "def normalize(images, mean=(0.5,)*3, std=(0.5,)*3):\n    return images\n"
# Reaches up the stack for the sandbox's reporting function and forges passes, then leaves
# before the real tests run (the reviewer's attack): must never earn the points.
FRAME_FORGERY = (
    "import sys, os\nf = sys._getframe(1)\nwhile f is not None and 'report' not in f.f_locals:\n"
    "    f = f.f_back\nrep = f.f_locals['report']\n"
    "for n in ['test_q3_lite0_range', 'test_q3_per_channel', 'test_q3_not_in_place']:\n"
    "    rep(kind='test', name=n, passed=True, message='')\nrep(kind='end')\nos._exit(0)\n")

CASES = {
    # name: (notebook dict or raw text, {question: expected score}, text expected in a message)
    "loop_in_function": (lambda: _with_answer("q1", "def topk_predictions(logits, k=5):\n    print('in the loop', k)\n"
                                                    "    while True:\n        pass\n"),
                         {"q1": 0, "q2": 3, "q3": 3, "q4": 4}, "took too long"),
    "loop_swallowing_timeout": (lambda: _with_answer("q2", (
        "def count_parameters(model, trainable_only=False):\n    while True:\n        try:\n"
        "            while True: pass\n        except BaseException:\n            pass\n")),
        {"q1": 3, "q2": 0, "q3": 3, "q4": 4}, "took too long"),
    "loop_at_top_level": (lambda: _with_answer("q3", "print('before the loop')\nwhile True:\n    pass\n"),
                          {"q1": 3, "q2": 3, "q3": 0, "q4": 4}, "took too long"),
    "raises": (lambda: _with_answer("q1", "def topk_predictions(logits, k=5):\n    x = logits.softmax(dim=1)\n"
                                    "    return x.topk(k, dim=7)\n"),
               {"q1": 0, "q2": 3, "q3": 3, "q4": 4}, "line 3: `return x.topk(k, dim=7)`"),
    "syntax_error": (lambda: _with_answer("q3", "def normalize(images, mean, std)\n    return images\n"),
                     {"q1": 3, "q2": 3, "q3": 0, "q4": 4}, "syntax error"),
    "missing_function": (lambda: _with_answer("q4", "def freeze_all(module):\n    return 0\n"),
                         {"q1": 3, "q2": 3, "q3": 3, "q4": 0}, "`freeze` is not defined"),
    "deleted_cell": (lambda: {**_solution(), "cells": [c for c in _solution()["cells"]
                                                        if extract.question_of(c) != "q2"]},
                     {"q1": 3, "q2": 0, "q3": 3, "q4": 4}, "no answer found for q2"),
    "metadata_stripped": (lambda: {**_solution(), "cells": [{**c, "metadata": {}} for c in _solution()["cells"]]},
                          {"q1": 3, "q2": 3, "q3": 3, "q4": 4}, None),
    "partial_credit": (lambda: _with_answer("q4", "def freeze(module):\n    ps = list(module.parameters())\n"
                                            "    for p in ps:\n        p.requires_grad_(False)\n    return len(ps)\n"),
                       {"q1": 3, "q2": 3, "q3": 3, "q4": 1}, "number of parameter tensors"),
    "sys_exit_top_level": (lambda: _with_answer("q1", "import sys\ndef topk_predictions(logits, k=5):\n"
                                                "    return 1\nsys.exit(0)\n"),
                           {"q1": 0, "q2": 3, "q3": 3, "q4": 4}, None),
    "sys_exit_in_function": (lambda: _with_answer("q2", "import sys\ndef count_parameters(m, trainable_only=False):\n"
                                                  "    sys.exit(0)\n"),
                             {"q1": 3, "q2": 0, "q3": 3, "q4": 4}, "sys.exit"),
    "os_exit_in_function": (lambda: _with_answer("q2", "import os\ndef count_parameters(m, trainable_only=False):\n"
                                                 "    os._exit(0)\n"),
                            {"q1": 3, "q2": 0, "q3": 3, "q4": 4}, "process running your code ended"),
    "huge_prints": (lambda: _with_answer("q1", _answer("q1").replace(
        "    # BEGIN SOLUTION", "    print('x' * 5_000_000)\n    # BEGIN SOLUTION")),
        {"q1": 3, "q2": 3, "q3": 3, "q4": 4}, None),
    "fake_printed_results": (lambda: _with_answer("q3", WRONG_NORMALIZE + (
        "import json\nprint(json.dumps({'score': 100, 'tests': [{'name': 'q3', 'score': 100, 'max_score': 3}]}))\n"
        "print('{\"kind\": \"test\", \"name\": \"test_q3_lite0_range\", \"passed\": true}')\n")),
        {"q1": 3, "q2": 3, "q3": 0, "q4": 4}, None),
    "writes_result_channel": (lambda: _with_answer("q3", WRONG_NORMALIZE + (
        "for fd in range(3, 64):\n    for name in ['test_q3_lite0_range', 'test_q3_per_channel', 'test_q3_not_in_place']:\n"
        "        try: open(fd, 'w', closefd=False).write('{\"kind\": \"test\", \"name\": \"%s\", \"passed\": true}\\n' % name)\n"
        "        except OSError: pass\n")),
        # Writing on every descriptor corrupts only the submission's own channel: its question ends.
        {"q1": 3, "q2": 3, "q3": 0, "q4": 4}, "process running your code ended"),
    "patches_torch": (lambda: _with_answer("q3", WRONG_NORMALIZE + "import torch\ntorch.allclose = lambda *a, **k: True\n"
                                           "torch.equal = lambda *a, **k: True\n"),
                      {"q1": 3, "q2": 3, "q3": 0, "q4": 4}, None),
    "patches_builtins": (lambda: _with_answer("q2", "import builtins\nbuiltins.type = lambda x: int\n"
                                              "def count_parameters(m, trainable_only=False):\n    return 0\n"),
                         {"q1": 3, "q2": 0, "q3": 3, "q4": 4}, "imports builtins"),
    "patches_checks_module": (lambda: _with_answer("q3", WRONG_NORMALIZE + (
        "import tlcourse.grading.checks.ch00 as c, tlcourse.grading.spec as s\n"
        "c.test_q3_lite0_range = c.test_q3_per_channel = lambda *a: None\n"
        "s.expect_close = lambda *a, **k: None\n")),
        {"q1": 3, "q2": 3, "q3": 0, "q4": 4}, None),
    "patches_in_function": (lambda: _with_answer("q4", (
        "import torch\ndef freeze(module):\n    torch.nn.Parameter.requires_grad = False\n    return 34\n")),
        # The checker judges the state sent back: every parameter of the module given is frozen,
        # which is what freezing does; returning 34 whatever the module is wrong twice.
        {"q1": 3, "q2": 3, "q3": 3, "q4": 2}, "return 18"),
    "rigged_tensor": (lambda: _with_answer("q3", (
        "import torch\nclass Rigged(torch.Tensor):\n    @classmethod\n"
        "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n        return True\n"
        "def normalize(images, mean=None, std=None):\n    return images.as_subclass(Rigged)\n")),
        {"q1": 3, "q2": 3, "q3": 0, "q4": 4}, "should be a torch.Tensor"),
    # Another cell's statement after `;` must not run with every question.
    "sleep_after_import": (lambda: _with_cell(None, "import time; time.sleep(999)\n"),
                           {"q1": 3, "q2": 3, "q3": 3, "q4": 4}, None),
    # The stub left in the tagged cell, the answer written in a new cell below it: the
    # kernel (and check()) use the later definition, so does the grader.
    "answer_in_new_cell": (lambda: _with_cell("q2", _answer("q2"), _with_answer("q2", _stub("q2"))),
                           {"q1": 3, "q2": 3, "q3": 3, "q4": 4}, None),
    "answer_in_new_cell_then_stub_again": (  # the last definition wins, whichever it is
        lambda: _with_cell("q2", _stub("q2"), _with_cell("q2", _answer("q2")), offset=2),
        {"q1": 3, "q2": 0, "q3": 3, "q4": 4}, "not answered yet"),
    "forges_via_frames": (lambda: _with_answer("q3", WRONG_NORMALIZE + FRAME_FORGERY),
                          {"q1": 3, "q2": 3, "q3": 0, "q4": 4}, "uses sys._getframe"),
    "forges_in_helper_cell": (lambda: _with_cell(None, "import sys\ndef _helper():\n    return sys._getframe(2)\n",
                                                 _with_answer("q3", WRONG_NORMALIZE.replace(
                                                     "return images", "_helper()\n    return images"))),
                              {"q1": 3, "q2": 3, "q3": 0, "q4": 4}, "uses sys._getframe"),
    # Answers that do nothing of their job but keep what a do-nothing keeps: the input unchanged (q3),
    # the count of what is trainable (q4, nothing frozen). They earned 1 of 3 and 3 of 4 before the
    # tests asked for the real result first.
    "does_nothing": (lambda: _with_answer("q4", "def freeze(module):\n"
                                                "    return sum(p.numel() for p in module.parameters() if p.requires_grad)\n",
                                          _with_answer("q3", "def normalize(images, mean=(0.5,)*3, std=(0.5,)*3):\n"
                                                             "    return images.clone()\n")),
                     {"q1": 3, "q2": 3, "q3": 0, "q4": 0}, "returned 34 but left"),
    "harmless_sys": (lambda: _with_answer("q2", "import sys\nassert sys.float_info.epsilon < 1\n" + _answer("q2")),
                     {"q1": 3, "q2": 3, "q3": 3, "q4": 4}, None),
    "small_prints": (lambda: _with_answer("q1", _answer("q1").replace(
        "    # BEGIN SOLUTION", "    print('debug: k =', k)\n    # BEGIN SOLUTION")),
        {"q1": 3, "q2": 3, "q3": 3, "q4": 4}, None),
    "corrupt_file": ('{"cells": [{"cell_type": "code", "source": "def topk_pre', {"q1": 0, "q2": 0, "q3": 0, "q4": 0},
                     "not valid JSON"),
    "not_a_notebook": ('{"hello": "world"}', {"q1": 0, "q2": 0, "q3": 0, "q4": 0}, "not a Jupyter notebook"),
    "binary_file": (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", {"q1": 0, "q2": 0, "q3": 0, "q4": 0}, "not text"),
}


def _answer(qid: str) -> str:
    cell = next(c for c in _solution()["cells"] if extract.question_of(c) == qid)
    return extract.cell_source(cell)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade every crafted case in one run (two sandboxes), as a teacher grades a class."""
    folder = tmp_path_factory.mktemp("submissions")
    paths = {}
    for name, (make, _, _) in CASES.items():
        path = folder / f"00_{name}.ipynb"
        content = make() if callable(make) else make
        if isinstance(content, dict):
            path.write_text(json.dumps(content), encoding="utf-8")
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        paths[name] = path
    started = time.monotonic()
    subs = grade_and_remember(list(paths.values()), TIMEOUT)
    print(f"\n{len(subs)} crafted submissions graded in {time.monotonic() - started:.1f} s")
    print(grader.table(subs))
    return {name: sub for name, sub in zip(paths, subs)}


def _scores(sub) -> dict:
    return {q.id: q.score for q in sub.questions}


def test_solutions_get_full_marks():
    [sub] = grade_and_remember([SOLUTION], TIMEOUT)
    assert sub.max_score >= 10 and sub.score == sub.max_score, grader.details(sub)
    assert not sub.review and not sub.error


def test_exercises_get_zero_with_kind_messages():
    [sub] = grade_and_remember([EXERCISE], TIMEOUT)
    assert sub.score == 0 and sub.max_score > 0
    for q in sub.questions:
        for t in q.tests:
            assert t.message.startswith("not answered yet"), t.message
            assert "Traceback" not in t.message and "NotImplementedError" in t.message


@pytest.mark.parametrize("case", list(CASES))
def test_bad_submission_costs_only_itself(graded, case):
    sub = graded[case]
    _, expected, text = CASES[case]
    assert _scores(sub) == pytest.approx(expected), grader.details(sub)
    if text:
        messages = " ".join([sub.error or ""] + [t.message for q in sub.questions for t in q.tests] + sub.review)
        assert text in messages, grader.details(sub)


def test_audit_is_a_note_not_a_verdict(graded):
    """Tools that could reach frames or patch libraries are REVIEW notes for a teacher; the
    question is graded as usual, since its code runs in a worker that holds no test."""
    for case, tool in (("patches_builtins", "builtins"), ("os_exit_in_function", "os._exit"),
                       ("forges_via_frames", "sys._getframe"), ("forges_in_helper_cell", "sys._getframe")):
        assert any("graded as usual" in r and tool in r for r in graded[case].review), case
    assert [r for r in graded["forges_in_helper_cell"].review if "graded as usual" in r] == [
        "q3: uses sys._getframe (graded as usual; worth a look)"]
    assert any("imports `os`" in r for r in graded["os_exit_in_function"].review)
    for case in ("partial_credit", "huge_prints", "harmless_sys", "sleep_after_import", "answer_in_new_cell"):
        assert not any("graded as usual" in r for r in graded[case].review), case
    for sub in graded.values():
        assert sub.error or sub.isolation, sub.path


def test_ci_grades_in_the_bubblewrap_sandbox():
    """CI installs bubblewrap (.ci/run), so the strong isolation level is the one tested there."""
    from tlcourse.grading import isolation

    if os.environ.get("CI") != "true":
        pytest.skip("outside CI the isolation level is whatever this machine offers")
    assert isolation.available_level() == isolation.BUBBLEWRAP


def test_answer_below_the_stub_is_graded_with_a_note(graded):
    assert any("defined again in cell" in n for n in graded["answer_in_new_cell"].notes)


def test_short_prints_reach_the_feedback(graded):
    q1 = graded["small_prints"].questions[0]
    assert "debug: k = 3" in q1.output, q1.output
    assert "Your code printed:\ndebug: k = 3" in json.dumps(grader.gradescope(graded["small_prints"]),
                                                         ensure_ascii=False).replace("\\n", "\n")


def test_output_before_a_hang_is_shown(graded):
    """What the code printed before it was stopped for time is the learner's best clue."""
    [q1] = [q for q in graded["loop_in_function"].questions if q.id == "q1"]
    assert "in the loop 3" in q1.output, grader.details(graded["loop_in_function"])
    [q3] = [q for q in graded["loop_at_top_level"].questions if q.id == "q3"]
    assert "before the loop" in q3.output, grader.details(graded["loop_at_top_level"])


def test_statements_are_sliced_exactly():
    snippets = extract._definitions(4, "import time; time.sleep(60)\nx = 3; print(x)\n@staticmethod\ndef f():\n"
                                       "    return 1\n")
    assert [s.source.lstrip("\n") for s in snippets] == ["import time", "x = 3",
                                                           "@staticmethod\ndef f():\n    return 1"]
    assert [s.source.count("\n") for s in snippets] == [0, 1, 4]  # line numbers stay right


def test_escape_hatches_tell_harmless_sys_from_frames():
    assert extract.escape_hatches("import sys\nprint(sys.float_info.max, sys.maxsize)") == []
    assert extract.escape_hatches("import os\nos.path.join('a', 'b')") == []
    assert extract.escape_hatches("model.modules()") == []
    for source, reason in [("import sys\nf = sys._getframe(1)", "uses sys._getframe"),
                           ("import sys as s\ns.modules['torch'] = None", "uses sys.modules"),
                           ("import os as o\no._exit(0)", "uses os._exit"),
                           ("def g(): pass\ng.__globals__['x'] = 1", "uses .__globals__"),
                           ("import gc", "imports gc"), ("from inspect import stack", "imports from inspect"),
                           ("import ctypes", "imports ctypes"), ("import builtins", "imports builtins"),
                           ("eval('1')", "uses eval"),
                           ("getattr(e, 'f_' + 'back')", "uses getattr with a computed name"),
                           ("import sys\nx = [sys][0]", "passes the `sys` module around")]:
        assert reason in extract.escape_hatches(source), source


def test_huge_prints_are_truncated(graded):
    q1 = graded["huge_prints"].questions[0]
    assert len(q1.output) < 2000 and "more bytes not shown" in q1.output
    out = grader.gradescope(graded["huge_prints"])
    assert len(json.dumps(out)) < 20_000


def test_metadata_stripped_is_found_by_function_name(graded):
    assert any("found by its function name" in n for n in graded["metadata_stripped"].notes)


GRADESCOPE_SCHEMA = {
    "type": "object",
    "required": ["score", "tests"],
    "properties": {
        "score": {"type": "number", "minimum": 0},
        "execution_time": {"type": "number", "minimum": 0},
        "output": {"type": "string"},
        "visibility": {"enum": ["visible", "hidden", "after_due_date", "after_published"]},
        "stdout_visibility": {"enum": ["visible", "hidden", "after_due_date", "after_published"]},
        "tests": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "score", "max_score", "visibility", "output"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "score": {"type": "number", "minimum": 0},
                "max_score": {"type": "number", "minimum": 0},
                "status": {"enum": ["passed", "failed"]},
                "visibility": {"enum": ["visible", "hidden", "after_due_date", "after_published"]},
                "output": {"type": "string"},
            },
        }},
    },
}


def test_results_json_follows_gradescope_schema(graded, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    for name, sub in graded.items():
        path = tmp_path / f"{name}.json"
        grader.write_json([sub], path)
        data = json.loads(path.read_text(encoding="utf-8"))
        jsonschema.validate(data, GRADESCOPE_SCHEMA)
        visible = [t for t in data["tests"] if t["visibility"] == "visible"]
        assert data["score"] == pytest.approx(sum(t["score"] for t in visible)), name
        assert all(t["score"] <= t["max_score"] for t in data["tests"])
        if not graded[name].error:  # the JSON says which isolation level graded it
            assert data["extra_data"]["isolation"] in ("bubblewrap", "process"), name
    many = tmp_path / "class.json"
    grader.write_json(list(graded.values()), many)
    data = json.loads(many.read_text())  # several notebooks: still one Gradescope object
    jsonschema.validate(data, GRADESCOPE_SCHEMA)
    assert data["score"] == pytest.approx(sum(s.score for s in graded.values()))


def test_csv_has_one_row_per_submission(graded, tmp_path):
    import csv

    path = tmp_path / "grades.csv"
    grader.write_csv(list(graded.values()), path)
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert len(rows) == len(graded)
    assert {"file", "score", "max_score", "q1", "q4", "error", "review"} <= set(rows[0])


def test_class_of_twenty_grades_in_seconds(tmp_path):
    """20 submissions cycling through full marks, the empty exercise, partial credit and an
    answer that raises (hangs are timed elsewhere), graded with this machine's cores."""
    makers = [_solution, lambda: json.loads(EXERCISE.read_text()), CASES["partial_credit"][0],
              CASES["raises"][0]]
    paths = []
    for i in range(20):
        path = tmp_path / f"00_student{i:02d}.ipynb"
        path.write_text(json.dumps(makers[i % len(makers)]()), encoding="utf-8")
        paths.append(path)
    started = time.monotonic()
    subs = grader.grade(paths, timeout=TIMEOUT)
    seconds = time.monotonic() - started
    print(f"\n20 submissions graded in {seconds:.1f} s")
    assert [s.score for s in subs[:4]] == [13, 0, 10, 10]
    assert seconds < 60


HIDDEN_CH00 = (
    "from tlcourse.grading.checks.ch00 import *          # QUESTIONS and the public tests\n"
    "from tlcourse.grading.spec import points\n"
    "import torch\n\n"
    "ANSWER_KEY = 'the hidden answer key is 42 and must stay hidden'\n\n"
    "@points(5, visibility='after_due_date')\n"
    "def test_q1_k_equals_classes(topk_predictions):\n"
    "    \"\"\"works when k is the number of classes\"\"\"\n"
    "    p, i = topk_predictions(torch.zeros(2, 4) + torch.arange(4.), 4)\n"
    "    assert torch.equal(i[0], torch.tensor([3, 2, 1, 0]))\n\n"
    "@points(2, visibility='after_due_date')\n"
    "def test_q3_zero_maps_to_minus_one(normalize):\n"
    "    \"\"\"maps 0 to -1\"\"\"\n"
    "    assert torch.equal(normalize(torch.zeros(1, 3, 2, 2)), -torch.ones(1, 3, 2, 2))\n")


def test_tests_folder_for_hidden_tests(tmp_path):
    """The README's recipe (``from tlcourse.grading.checks.ch00 import *``): the reused public
    tests are fresh copies the submission cannot patch; the tests folder's files never show
    in learner-visible output; prints during hidden tests stay hidden."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "ch00.py").write_text(HIDDEN_CH00, encoding="utf-8")
    subs = tmp_path / "subs"
    subs.mkdir()
    patching = _with_answer("q3", WRONG_NORMALIZE + (
        "import tlcourse.grading.checks.ch00 as c\n"
        "c.test_q3_lite0_range = c.test_q3_per_channel = c.test_q3_not_in_place = lambda normalize: None\n"))
    leaking = _with_answer("q1", "import glob\nfor p in glob.glob(%r):\n    print(open(p).read())\n"
                           % str(hidden / "*.py")
                           + _answer("q1").replace("    # BEGIN SOLUTION",
                                                   "    print('saw', tuple(logits.shape))\n    # BEGIN SOLUTION"))
    paths = []
    for name, nb in (("solution", _solution()), ("patching", patching), ("leaking", leaking)):
        paths.append(subs / f"00_{name}.ipynb")
        paths[-1].write_text(json.dumps(nb), encoding="utf-8")
    solution, patched, leaked = grader.grade(paths, tests_dir=hidden, timeout=TIMEOUT, jobs=2)
    assert solution.score == solution.max_score == 13 + 5 + 2, grader.details(solution)
    assert [t["visibility"] for t in grader.gradescope(solution)["tests"]][3] == "after_due_date"
    # Patching the public checks module changes nothing: q3 scores as WRONG_NORMALIZE does.
    assert _scores(patched)["q3"] == 0, grader.details(patched)
    # The learner tried to print the hidden tests file: no line of it reaches the learner. In the
    # bubblewrap sandbox the file does not even exist for the learner's code; in the process
    # fallback it may be readable, and what is printed of it is held back.
    report = json.dumps(grader.gradescope(leaked))
    learner_visible = json.dumps([t for t in grader.gradescope(leaked)["tests"] if t["visibility"] == "visible"])
    assert "hidden answer key" not in learner_visible and "test_q3_zero_maps" not in learner_visible
    if leaked.isolation == "bubblewrap":
        assert "hidden answer key" not in report and "test_q3_zero_maps" not in report
    elif "not shown: a line of the grader's tests" in report:  # the process level's uid could read it
        assert any("printed" in r and "tests folder" in r for r in leaked.review)
    q1 = leaked.questions[0]
    assert "saw (4, 10)" in q1.output and "saw (2, 4)" not in q1.output  # (2, 4): the hidden test's input
    assert "saw (2, 4)" in q1.hidden_output
    with pytest.raises(grader.GradingError):
        grader.grade([SOLUTION], tests_dir=tmp_path / "nowhere")


def test_hidden_inputs_never_reach_visible_feedback(tmp_path):
    """A hidden test written *before* the public ones still runs after them, so an answer that
    remembers what it was called with cannot put a hidden input into a visible message."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "ch00.py").write_text(
        "import torch\nfrom tlcourse.grading.spec import points\n"
        "@points(1, visibility='after_due_date')\n"
        "def test_q2_secret_sizes(count_parameters):\n"
        "    \"\"\"a model of the hidden sizes\"\"\"\n"
        "    count_parameters(torch.nn.Linear(1234, 567))\n"
        "from tlcourse.grading.checks.ch00 import *\n", encoding="utf-8")
    spy = _with_answer("q2", "SEEN = []\ndef count_parameters(model, trainable_only=False):\n"
                              "    SEEN.append([tuple(p.shape) for p in model.parameters()])\n"
                              "    print('seen so far:', SEEN)\n"
                              "    if (567, 1234) in SEEN[-1]:  # a hang: what it printed must stay hidden too\n"
                              "        while True:\n            pass\n"
                              "    raise ValueError(f'seen so far: {SEEN}')\n")
    path = tmp_path / "00_spy.ipynb"
    path.write_text(json.dumps(spy), encoding="utf-8")
    [sub] = grader.grade([path], tests_dir=hidden, timeout=TIMEOUT)
    q2 = next(q for q in sub.questions if q.id == "q2")
    visible = [t.message for t in q2.tests if t.visibility == "visible"] + [q2.output]
    assert visible and not any("1234" in text for text in visible), visible
    assert "1234" in q2.hidden_output  # the instructor sees it


def test_total_timeout_caps_a_notebook(tmp_path):
    """Every answer hangs: after --total-timeout seconds the rest is not run, and says why."""
    nb = _solution()
    for qid in ("q1", "q2", "q3", "q4"):
        nb = _with_answer(qid, "while True:\n    pass\n", nb)
    path = tmp_path / "00_hangs.ipynb"
    path.write_text(json.dumps(nb), encoding="utf-8")
    [sub] = grader.grade([path], timeout=2, total_timeout=3)
    assert sub.score == 0
    messages = {q.id: q.tests[0].message for q in sub.questions}
    assert "took too long" in messages["q1"] and "took too long" in messages["q2"], messages
    for qid in ("q3", "q4"):
        assert "used up its total grading time" in messages[qid], messages
    assert sub.seconds < 3 + 2, sub.seconds  # the budget, plus the time to end the job


def test_exercises_are_up_to_date():
    problems = exercises.stale(ROOT / "solutions", ROOT / "exercises")
    assert not problems, "run `tlcourse exercises build`:\n" + "\n".join(problems)


def test_exercise_build_is_deterministic_and_strips_solutions():
    nb = _solution()
    once = exercises.render(exercises.exercise_notebook(nb))
    assert once == exercises.render(exercises.exercise_notebook(json.loads(once)))  # idempotent too
    ex = json.loads(once)
    text = json.dumps(ex)
    assert "BEGIN SOLUTION" not in text and "softmax(dim=1)" not in text
    assert all(not c.get("outputs") for c in ex["cells"] if c["cell_type"] == "code")
    assert not any("solution-only" in c["metadata"].get("tags", []) for c in ex["cells"])
    questions = [extract.question_of(c) for c in ex["cells"] if extract.question_of(c)]
    assert questions == ["q1", "q2", "q3", "q4"]
    assert 'def topk_predictions(logits, k=5):' in text  # the signature stays


def test_unbalanced_markers_are_reported():
    with pytest.raises(exercises.MarkerError, match="never closed"):
        exercises.stub_source("def f():\n    # BEGIN SOLUTION\n    return 1\n", "q1")
    assert exercises.stub_source("def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n", "q1") == (
        'def f():\n    raise NotImplementedError("q1: replace this line with your code")')


def test_check_in_notebook_passes_waits_and_fails_kindly():
    from tlcourse.grading import CheckFailed, checker

    check = checker("00")
    ns: dict = {}
    exec(compile(_answer("q2"), "<cell>", "exec"), ns)
    buf = io.StringIO()
    with redirect_stdout(buf):
        check("q2", namespace=ns)
    assert buf.getvalue().startswith("✅ q2")
    stub: dict = {}
    exec(exercises.stub_source(_answer("q2"), "q2"), stub)
    buf = io.StringIO()
    with redirect_stdout(buf):
        check("q2", namespace=stub)  # not started yet: a note, not an error
    assert "not answered yet" in buf.getvalue()
    wrong: dict = {}
    exec("def count_parameters(model, trainable_only=False):\n    return len(list(model.parameters()))\n", wrong)
    with pytest.raises(CheckFailed) as err:
        check("q2", namespace=wrong)
    lines = err.value._render_traceback_()
    assert lines[0].startswith("❌ q2") and "numel" in "\n".join(lines) and len(lines) <= 4


def test_exercise_notebook_runs_through_without_errors():
    """'Run all' on a fresh exercise notebook reaches the end: unanswered checks only say so."""
    assert unanswered_after_run_all(EXERCISE) == 4


def test_cli_exit_codes(tmp_path, capsys):
    from tlcourse.grading.commands import main

    assert main(["exercises", "check", "--solutions", str(ROOT / "solutions"),
                 "--exercises", str(ROOT / "exercises")]) == 0
    assert main(["exercises", "check", "--solutions", str(ROOT / "solutions"),
                 "--exercises", str(tmp_path)]) == 1
    assert main(["exercises", "build", "--solutions", str(ROOT / "solutions"),
                 "--exercises", str(tmp_path)]) == 0
    assert (tmp_path / EXERCISE.name).read_bytes() == EXERCISE.read_bytes()
    assert main(["exercises", "check", "--solutions", str(tmp_path / "nowhere"),
                 "--exercises", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["exercises", "build", "--solutions", str(tmp_path / "empty"), "--exercises", str(tmp_path / "x")]) == 1
    assert "no solution notebooks" in capsys.readouterr().err
    for bad in (["--timeout", "0"], ["--timeout", "-1"], ["--total-timeout", "0"], ["--jobs", "0"],
                ["--timeout", "nan"], ["--jobs", "two"]):
        with pytest.raises(SystemExit) as exit_:
            main(["grade", str(SOLUTION), *bad])
        assert exit_.value.code == 2
        assert bad[0] in capsys.readouterr().err
    out = tmp_path / "r.json"
    assert main(["grade", str(SOLUTION), "--json", str(out), "--timeout", "5"]) == 0
    assert json.loads(out.read_text())["score"] == 13
    assert "13/13" in capsys.readouterr().out


def test_a_grader_bug_on_one_notebook_keeps_the_others(monkeypatch, tmp_path):
    # A crash inside grading one notebook (not the learner's fault) must not drop it silently
    # from the class results, nor stop the other notebooks.
    broken = tmp_path / "00_broken.ipynb"
    broken.write_text(SOLUTION.read_text(encoding="utf-8"), encoding="utf-8")
    real = grader._grade_one

    def flaky(path, *args, **kwargs):
        if Path(path) == broken:
            raise SystemError("AST constructor recursion depth mismatch")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(grader, "_grade_one", flaky)
    subs = grader.grade([broken, SOLUTION], timeout=TIMEOUT, jobs=2)
    assert all(s is not None for s in subs)
    assert "grader itself failed" in subs[0].error and "grade it again" in subs[0].error
    assert subs[1].error is None and subs[1].score == subs[1].max_score > 0
    assert "broken" in grader.table(subs)


def test_notebooks_are_parsed_one_thread_at_a_time(monkeypatch):
    # CPython 3.11 raised "SystemError: AST constructor recursion depth mismatch" when two grading
    # threads parsed at once (seen in a full test run); extract._parse must never overlap itself.
    import ast
    import threading

    real_parse, inside, most = ast.parse, [0], [0]

    def slow_parse(source, *args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.01)                      # give another thread every chance to enter
        inside[0] -= 1
        return real_parse(source, *args, **kwargs)

    monkeypatch.setattr(ast, "parse", slow_parse)
    threads = [threading.Thread(target=lambda: [extract._parse("x = 1") for _ in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1


def test_grades_are_shared_between_test_processes(tmp_path, monkeypatch):
    """grading_support.grade_once reuses a grade made in another pytest-xdist worker (through the
    folder TLCOURSE_TEST_GRADES) and grades again what changed."""
    import grading_support

    (tmp_path / "grades").mkdir()
    monkeypatch.setenv("TLCOURSE_TEST_GRADES", str(tmp_path / "grades"))
    calls = []

    def grade(paths, timeout, jobs):
        calls.append([Path(p).name for p in paths])
        return [grader.Submission(path=str(p), chapter="00", seconds=float(len(calls))) for p in paths]

    monkeypatch.setattr(grading_support.grader, "grade", grade)
    a, b = tmp_path / "a.ipynb", tmp_path / "b.ipynb"
    a.write_text('{"cells": []}')
    b.write_text('{"cells": [], "other": 1}')
    monkeypatch.setattr(grading_support, "_GRADED", {})
    first = grading_support.grade_once([a], 5.0)
    monkeypatch.setattr(grading_support, "_GRADED", {})           # another worker: nothing in memory
    again = grading_support.grade_once([a, b], 5.0)
    assert calls == [["a.ipynb"], ["b.ipynb"]] and again[0] == first[0]
    grading_support.grade_once([a], 9.0)                            # another timeout is another grade
    a.write_text('{"cells": [], "changed": 1}')                     # and so are other bytes
    grading_support.grade_once([a], 5.0)
    assert calls[2:] == [["a.ipynb"], ["a.ipynb"]]
    assert not list((tmp_path / "grades").glob("*.pickle.*"))       # no half-written file left behind
