"""What the tests of every chapter's exercise set share (``test_grading*.py``): notebooks
crafted from a solution, graded together, and the expectations each set meets.

Not a test module (pytest collects ``test_*.py`` only); the test modules import it by name,
as pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import time
from pathlib import Path

import pytest

from tlcourse.grading import extract, grader


def crafted(solution: dict, variants: dict, i: int) -> dict:
    """``solution`` with variant ``i`` in the answer cell of every question that has one.

    ``variants`` maps a question id to its list of variants, each the answer cell's source or
    a ``(source, text expected in a failure message)`` pair.
    """
    nb = copy.deepcopy(solution)
    for cell in nb["cells"]:
        options = variants.get(extract.question_of(cell), [])
        if i < len(options):
            cell["source"] = options[i][0] if isinstance(options[i], tuple) else options[i]
    return nb


def write_crafted(folder: Path, solution: Path, variants: dict, name: str) -> dict:
    """Write ``crafted(solution, variants, i)`` for every ``i`` that some question has a variant
    for, as ``folder/<name><i>.ipynb``; ``{i: path}``."""
    nb = json.loads(Path(solution).read_text(encoding="utf-8"))
    paths = {}
    for i in range(max(len(v) for v in variants.values())):
        paths[i] = Path(folder) / f"{name}{i}.ipynb"
        paths[i].write_text(json.dumps(crafted(nb, variants, i)), encoding="utf-8")
    return paths


# Every Submission graded in this test session, under (file name, sha-256 of its bytes, timeout).
# The chapters' grading tests and test_check_agreement grade the same crafted notebooks; pytest
# runs the agreement last (the root conftest.py), so it reuses these grades instead of grading again. Only
# results are shared: the tests that time grading time their own, real, run. Under pytest-xdist
# the grading tests may have run in the other worker, so each grade is also pickled into the
# folder the root conftest.py names in TLCOURSE_TEST_GRADES (one file per key, written whole, then renamed).
_GRADED: dict[tuple[str, str, float], grader.Submission] = {}


def _key(path, timeout: float) -> tuple[str, str, float]:
    return Path(path).name, hashlib.sha256(Path(path).read_bytes()).hexdigest(), float(timeout)


def _shared_file(key: tuple[str, str, float]) -> Path | None:
    folder = os.environ.get("TLCOURSE_TEST_GRADES")
    if not folder or not Path(folder).is_dir():
        return None
    return Path(folder) / (hashlib.sha256(repr(key).encode()).hexdigest() + ".pickle")


def _remembered(key: tuple[str, str, float]) -> grader.Submission | None:
    if key not in _GRADED:
        shared = _shared_file(key)
        if shared is not None and shared.exists():
            _GRADED[key] = pickle.loads(shared.read_bytes())
    return _GRADED.get(key)


def grade_and_remember(paths: list, timeout: float, jobs: int = 2) -> list:
    """``grader.grade(paths, timeout=timeout, jobs=jobs)``, its results remembered for
    :func:`grade_once`."""
    subs = grader.grade(list(paths), timeout=timeout, jobs=jobs)
    for path, sub in zip(paths, subs):
        key = _key(path, timeout)
        _GRADED[key] = sub
        shared = _shared_file(key)
        if shared is not None:
            part = shared.with_name(f"{shared.name}.{os.getpid()}")
            part.write_bytes(pickle.dumps(sub))
            part.replace(shared)
    return subs


def grade_once(paths: list, timeout: float, jobs: int = 2) -> list:
    """The grades of ``paths``: those a test of this session already graded (same name, bytes and
    timeout) are reused, the others graded now in one run. A grade does not depend on when it is
    made: the checks draw their inputs from seeded generators, and the crafted hangs run far past
    any timeout."""
    todo = [p for p in paths if _remembered(_key(p, timeout)) is None]
    if todo:
        grade_and_remember(todo, timeout, jobs)
    return [_GRADED[_key(p, timeout)] for p in paths]


def grade_together(paths: dict, timeout: float, what: str) -> tuple[dict, float]:
    """Grade every notebook of ``paths`` (key -> path) in one run (two sandboxes), print the
    table; ``({key: Submission}, seconds)``."""
    started = time.monotonic()
    subs = grade_and_remember(list(paths.values()), timeout, jobs=2)
    seconds = time.monotonic() - started
    print(f"\n{len(subs)} notebooks of {what} graded in {seconds:.1f} s")
    print(grader.table(subs))
    return dict(zip(paths, subs)), seconds


def scores(sub) -> dict:
    return {q.id: q.score for q in sub.questions}


def expect_full_marks(sub, full: dict) -> None:
    assert scores(sub) == full, grader.details(sub)
    assert sub.score == sub.max_score == sum(full.values()) and not sub.review and not sub.error, grader.details(sub)


def expect_zero_with_kind_messages(sub, full: dict) -> None:
    assert sub.score == 0 and sub.max_score == sum(full.values()) and not sub.error
    for q in sub.questions:
        for t in q.tests:
            assert t.message.startswith("not answered yet") and "Traceback" not in t.message, t.message


def expect_points_lost(sub, qid: str, full_points: float, variant: tuple) -> None:
    """Question ``qid`` of ``sub`` (answered with ``variant``: source, expected text or None)
    scored below full marks, and a failure message holds the expected text."""
    source, text = variant
    q = next(q for q in sub.questions if q.id == qid)
    assert q.score < full_points, f"a wrong answer got full marks:\n{source}\n{grader.details(sub)}"
    assert not sub.review, sub.review
    if text:
        messages = " | ".join(t.message for t in q.tests if not t.passed)
        assert text in messages, messages


def unanswered_after_run_all(exercise: Path) -> int:
    """'Run all' on a fresh exercise notebook (it must reach the end); how many outputs say
    "not answered yet"."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(exercise, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    return sum("not answered yet" in o for o in outputs)


def exercise_set_tests(chapter: str, solution: Path, full: dict, wrong: dict, right: dict | None = None,
                       timeout: float = 5.0, budget: float = 40.0, hostile: dict | None = None) -> dict:
    """The tests every chapter's exercise set meets, for a test module to adopt with
    ``globals().update(exercise_set_tests(...))`` (pytest collects them from there).

    ``graded`` (a module fixture) grades the solution, its exercise and the notebooks crafted
    from ``wrong`` and ``right`` (question -> variants, see :func:`crafted`) in one run. The
    tests: the solution gets ``full`` marks; the exercise zero with kind messages; every wrong
    variant loses points with its message; a wrong variant costs only its own question; every
    right variant keeps full marks; grading takes under ``budget`` seconds; 'Run all' on the
    exercise reaches the end.
    """
    exercise = Path(solution).parent.parent / "exercises" / Path(solution).name
    right = right or {}
    rounds = max(len(v) for v in wrong.values())

    @pytest.fixture(scope="module")
    def graded(tmp_path_factory):
        """The solution, the exercise and every crafted notebook, graded in one run (two sandboxes)."""
        folder = tmp_path_factory.mktemp("submissions")
        paths = {"solution": solution, "exercise": exercise}
        for kind, variants in (("wrong", wrong), ("right", right)):
            if variants:
                made = write_crafted(folder, solution, variants, f"{chapter}_{kind}")
                paths.update({(kind, i): path for i, path in made.items()})
        return grade_together(paths, timeout, f"chapter {chapter}")

    def test_solution_gets_full_marks(graded):
        expect_full_marks(graded[0]["solution"], full)

    def test_exercise_gets_zero_with_kind_messages(graded):
        expect_zero_with_kind_messages(graded[0]["exercise"], full)

    @pytest.mark.parametrize("case", [(q, i) for q, v in wrong.items() for i in range(len(v))],
                             ids=lambda c: f"{c[0]}-wrong{c[1]}")
    def test_wrong_answer_loses_points_with_a_specific_message(graded, case):
        qid, i = case
        expect_points_lost(graded[0][("wrong", i)], qid, full[qid], wrong[qid][i])

    @pytest.mark.parametrize("i", range(rounds))
    def test_a_wrong_answer_costs_only_its_own_question(graded, i):
        """Questions that kept the solution in a crafted notebook keep their full marks."""
        got = scores(graded[0][("wrong", i)])
        kept = {q: got[q] for q in full if i >= len(wrong[q])}
        assert kept == {q: full[q] for q in kept}, got

    @pytest.mark.parametrize("case", [(q, i) for q, v in right.items() for i in range(len(v))],
                             ids=lambda c: f"{c[0]}-right{c[1]}")
    def test_other_correct_answers_keep_full_marks(graded, case):
        qid, i = case
        q = next(q for q in graded[0][("right", i)].questions if q.id == qid)
        failed = " | ".join(f"{t.name}: {t.message}" for t in q.tests if not t.passed)
        assert q.score == full[qid], f"a correct answer lost points:\n{right[qid][i]}\n{failed}"

    def test_grading_takes_seconds(graded):
        subs, seconds = graded
        assert seconds < budget, f"{len(subs)} notebooks took {seconds:.1f} s"
        assert max(s.seconds for s in subs.values()) < 10

    if hostile:
        @pytest.mark.parametrize("name", list(hostile))
        def test_a_hostile_answer_earns_nothing_from_the_tests_it_targets(graded, name):
            """``hostile``: name -> (question, source, message, targets), each also one of ``wrong``'s
            variants: it passes none of ``targets`` (test names), or scores 0 where targets is "all"."""
            qid, source, _, targets = hostile[name]
            i = next(i for i, v in enumerate(wrong[qid]) if v[0] == source)
            q = next(q for q in graded[0][("wrong", i)].questions if q.id == qid)
            passed = sorted(t.name for t in q.tests if t.passed)
            if targets == "all":
                assert q.score == 0, (name, passed)
            else:
                assert not set(passed) & set(targets), (name, passed)

    def test_exercise_notebook_runs_through_without_errors():
        """'Run all' on a fresh exercise notebook reaches the end: unanswered checks only say so."""
        assert unanswered_after_run_all(exercise) == len(full)

    tests = {name: fn for name, fn in locals().items() if name.startswith("test_")}
    if not right:
        del tests["test_other_correct_answers_keep_full_marks"]
    return {"graded": graded, **tests}
