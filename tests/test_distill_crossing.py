"""``tlcourse.distill_crossing`` (``tlcourse bench kd``): chapter 04's and 04 K's transfer sets crossed
with both students. One seed on the bundled faces at one epoch: the plumbing, not the numbers."""

import importlib.util
import math

import pytest

if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
    pytest.skip("TensorFlow and Keras 3 are not installed (pip install 'tlcourse[tensorflow]')",
                allow_module_level=True)

from tlcourse import _tf  # noqa: E402,F401 - TensorFlow after torch (tlcourse/_tf.py), before the module's lazy imports
from tlcourse import distill_crossing  # noqa: E402


def _result(seed, scratch, distilled):
    """A made-up seed: ``scratch[(student, views)]``, ``distilled[(student, views, teacher)]``."""
    runs = [{"student": st, "views": v, "teacher": v, "arm": "scratch", "acc": a} for (st, v), a in scratch.items()]
    runs += [{"student": st, "views": v, "teacher": t, "arm": "distilled", "acc": a} for (st, v, t), a in distilled.items()]
    return {"seed": seed, "runs": runs}


def test_summary_pairs_each_distilled_run_with_the_scratch_run_on_its_views():
    """Every (student, views) has its own scratch accuracy, so a run paired with the teacher's views
    or with the other student's scratch run would give another gain."""
    scratch = {("torch", "torch"): 0.70, ("torch", "keras"): 0.72, ("keras", "torch"): 0.66, ("keras", "keras"): 0.74}
    distilled = {("torch", "torch", "torch"): 0.75, ("torch", "keras", "keras"): 0.73, ("torch", "torch", "keras"): 0.71,
                 ("torch", "keras", "torch"): 0.72, ("keras", "torch", "torch"): 0.76, ("keras", "keras", "keras"): 0.74,
                 ("keras", "torch", "keras"): 0.70, ("keras", "keras", "torch"): 0.80}
    later = {key: value + 0.1 for key, value in scratch.items()}     # seed 1: every gain 0.02 below seed 0's
    results = [_result(0, scratch, distilled), _result(1, later, {k: v + 0.08 for k, v in distilled.items()})]
    rows = distill_crossing.summary(results)
    keys = [(st, v, t) for st in distill_crossing.STUDENTS for v, t in distill_crossing.SETS]
    assert [(r["student"], r["views"], r["teacher"]) for r in rows] == keys
    for r in rows:
        first = distilled[r["student"], r["views"], r["teacher"]] - scratch[r["student"], r["views"]]
        gains = (first, first - 0.02)
        assert math.isclose(r["gain"], first - 0.01, abs_tol=1e-9) and r["seeds"] == 2
        assert math.isclose(r["gain_se"], 0.01)          # sd of two gains 0.02 apart, / sqrt(2)
        assert r["wins"] == sum(g > 1e-9 for g in gains) and r["ties"] == sum(abs(g) < 1e-9 for g in gains)
    table = distill_crossing.summary_markdown(rows)
    assert table.count("\n") == 9 and "| keras | keras | torch | 2 | 0.790 | 0.840 | +0.050 ± 0.010 | 2 (0) |" in table


def test_one_seed_on_the_faces_builds_both_transfer_sets_and_twelve_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("TLCOURSE_DATA", str(tmp_path))          # no hymenoptera: the bundled faces
    settings = distill_crossing.Settings(views=4, epochs=10, teacher_epochs=1)
    lines = []
    report = distill_crossing.crossing([0], settings, device="cpu", log=lines.append, download=False)
    assert report["data"] == "lfw_faces" and report["seeds"] == [0] and len(report["summary"]) == 8
    (result,) = report["results"]
    assert all(acc > 0.8 for acc in result["teacher_acc"].values())
    # Each teacher labels its own views and the other framework's: a wrong layout or normalisation
    # on the crossed path would leave that teacher near chance there.
    assert set(result["agree"]) == {"torch/torch", "keras/keras", "torch/keras", "keras/torch"}
    assert all(share > 0.8 for share in result["agree"].values()), result["agree"]
    runs = result["runs"]
    assert len(runs) == 12 and sum(r["arm"] == "scratch" for r in runs) == 4
    # The faces are easy: every student learns them, which it would not from misread pixels.
    assert all(r["acc"] > 0.9 for r in runs), runs
    assert len(lines) == 2 + 12 and lines[0].startswith("data: lfw_faces")


@pytest.mark.parametrize("args, message", [
    (["kd", "--pair", "digits:digits_m"], "--pair only apply to tlcourse bench da"),
    (["da", "--views", "2", "--threads", "1"], "--views, --threads only apply to tlcourse bench kd"),
])
def test_bench_refuses_the_other_benchmarks_options(call, args, message):
    res = call("bench", *args)
    assert res.returncode == 2 and message in res.stderr
