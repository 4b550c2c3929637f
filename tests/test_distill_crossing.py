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
    keys = [(st, v, t) for st in distill_crossing.STUDENTS for v, t in distill_crossing.SETS]
    results = [_result(0, {(st, v): 0.70 for st in ("torch", "keras") for v in ("torch", "keras")},
                       {k: 0.75 if k[1] == "torch" else 0.70 for k in keys}),
               _result(1, {(st, v): 0.80 for st in ("torch", "keras") for v in ("torch", "keras")},
                       {k: 0.79 if k[1] == "torch" else 0.80 for k in keys})]
    rows = distill_crossing.summary(results)
    assert [(r["student"], r["views"], r["teacher"]) for r in rows] == keys
    on_torch_views = [r for r in rows if r["views"] == "torch"]
    assert all(math.isclose(r["gain"], 0.02) and r["wins"] == 1 and r["ties"] == 0 for r in on_torch_views)
    assert all(math.isclose(r["gain_se"], 0.03) for r in on_torch_views)   # sd of (+0.05, -0.01) / sqrt(2)
    assert all(r["gain"] == 0 and r["ties"] == 2 and r["seeds"] == 2 for r in rows if r["views"] == "keras")
    table = distill_crossing.summary_markdown(rows)
    assert table.count("\n") == 9 and "| torch | torch | keras | 2 | 0.750 | 0.770 | +0.020 ± 0.030 | 1 (0) |" in table


def test_one_seed_on_the_faces_builds_both_transfer_sets_and_twelve_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("TLCOURSE_DATA", str(tmp_path))          # no hymenoptera: the bundled faces
    settings = distill_crossing.Settings(views=1, epochs=1, teacher_epochs=1)
    lines = []
    report = distill_crossing.crossing([0], settings, device="cpu", log=lines.append)
    assert report["data"] == "lfw_faces" and report["seeds"] == [0] and len(report["summary"]) == 8
    (result,) = report["results"]
    assert all(acc > 0.8 for acc in result["teacher_acc"].values())
    # Each teacher labels its own views and the other framework's: a wrong layout or normalisation
    # on the crossed path would leave that teacher near chance there.
    assert set(result["agree"]) == {"torch/torch", "keras/keras", "torch/keras", "keras/torch"}
    assert all(share > 0.8 for share in result["agree"].values()), result["agree"]
    runs = result["runs"]
    assert len(runs) == 12 and sum(r["arm"] == "scratch" for r in runs) == 4
    assert all(0 <= r["acc"] <= 1 for r in runs)
    assert len(lines) == 2 + 12 and lines[0].startswith("data: lfw_faces")
