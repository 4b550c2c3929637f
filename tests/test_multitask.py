"""Multi-task pieces: the MultiMNIST construction, the combiners against their formulas,
PCGrad on 2-D and 3-D gradients with known answers, and the loop on small data."""

from __future__ import annotations

import math
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tlcourse import datasets as ds
from tlcourse import digits as dg
from tlcourse import multitask as mt

# ----------------------------------------------------------------------------- data


def _frames(size: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as MNIST-like 28 px frames, computed here independently."""
    X, y = dg.handwritten_digits(size)
    pad = (28 - size) // 2
    return F.pad(X[:, :1], (pad, pad, pad, pad)), y


def test_overlay_is_sener_koltun_geometry():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 1, 28, 28, generator=g), torch.rand(3, 1, 28, 28, generator=g)
    canvas = mt.overlay(a, b, size=36)
    assert canvas.shape == (3, 1, 36, 36)
    assert torch.equal(canvas[..., :6, :28], a[..., :6, :])           # only the top-left digit
    assert torch.equal(canvas[..., 28:34, 6:34], b[..., 22:, :])       # only the bottom-right one
    assert torch.equal(canvas[..., 6:28, 6:28], torch.maximum(a[..., 6:, 6:], b[..., :22, :22]))
    assert canvas[..., 34:, :].eq(0).all() and canvas[..., :6, 28:].eq(0).all()
    small = mt.overlay(a, b)                                           # resized to 28 px
    assert small.shape == (3, 1, 28, 28) and 0 <= small.min() and small.max() <= 1
    with pytest.raises(ValueError, match=r"\[n, 1, 28, 28\]"):
        mt.overlay(a[:, :, :20], b[:, :, :20])


def test_multi_digits_targets_come_from_the_named_sources():
    d = mt.multi_digits(300, size=36, seed=0)
    assert d.images.shape == (300, 1, 36, 36) and d.images.dtype == torch.float32
    t = d.targets
    assert t["left"].dtype == t["right"].dtype == t["same"].dtype == torch.int64 and t["sum"].dtype == torch.float32
    assert torch.equal(t["sum"], (t["left"] + t["right"]).float())
    assert torch.equal(t["same"], (t["left"] == t["right"]).long())
    frames, y = _frames()
    left, right = d.sources["left"], d.sources["right"]
    assert torch.equal(t["left"], y[left]) and torch.equal(t["right"], y[right])
    assert (left != right).all()                                       # "a different image"
    # The pixels are those two source digits, top left and bottom right, brighter one winning.
    expected = torch.zeros(300, 1, 36, 36)
    expected[..., :28, :28] = frames[left]
    expected[..., 6:34, 6:34] = torch.maximum(expected[..., 6:34, 6:34], frames[right])
    assert torch.allclose(d.images, expected)
    # Within a split's pool each image is a top-left digit once before any is used twice.
    assert len(set(left.tolist())) == 300
    assert str(d).startswith("MultiDigits(digits, train: 300 images")
    x, target = d[5]
    assert x.shape == (1, 36, 36) and target["left"] == t["left"][5]


def test_multi_digits_splits_never_share_a_source_image():
    # Enough images that every source of each pool is used at least once.
    pools = {s: mt.multi_digits(n, size=16, seed=3, split=s) for s, n in (("train", 2500), ("val", 400),
                                                                          ("test", 1200))}
    used = {s: set(d.sources["left"].tolist()) | set(d.sources["right"].tolist()) for s, d in pools.items()}
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]
    assert {s: len(u) for s, u in used.items()} == {"train": 998, "val": 200, "test": 599}
    assert used["train"] | used["val"] | used["test"] == set(range(1797))
    # The test pool is chapter 03's test third for the same seed.
    pair = dg.domain_pair("digits", "digits_m", size=16, seed=3)
    assert used["test"] == set(pair.ids["target_test"].tolist())
    # Labels are balanced enough for a 10-way task: every digit appears on both sides.
    assert set(pools["val"].targets["left"].tolist()) == set(pools["val"].targets["right"].tolist()) == set(range(10))
    assert pools["test"].base_split == "test" and pools["val"].base_split == "train"


def test_multi_digits_is_deterministic_by_seed():
    a, b = mt.multi_digits(100, size=20, seed=1), mt.multi_digits(100, size=20, seed=1)
    c = mt.multi_digits(100, size=20, seed=2)
    assert torch.equal(a.images, b.images) and all(torch.equal(a.targets[k], b.targets[k]) for k in a.targets)
    assert not torch.equal(a.images, c.images) and not torch.equal(a.sources["left"], c.sources["left"])
    assert mt.multi_digits(0).images.shape == (0, 1, 28, 28)
    sub = a.subset(torch.arange(10))
    assert len(sub) == 10 and torch.equal(sub.targets["sum"], a.targets["sum"][:10])
    with pytest.raises(ValueError, match="base"):
        mt.multi_digits(10, base="usps")
    with pytest.raises(ValueError, match="split"):
        mt.multi_digits(10, split="dev")


def test_mnist_base_goes_through_the_torchvision_registry(monkeypatch):
    calls = []
    rng = np.random.default_rng(0)
    arrays = {split: rng.integers(0, 256, (n, 28, 28), np.uint8) for split, n in (("train", 300), ("test", 100))}

    def fake(name, split="train", transform=None, download=True):
        calls.append((name, split, download))
        x = arrays[split]
        return types.SimpleNamespace(data=torch.from_numpy(x), targets=torch.from_numpy(np.arange(len(x)) % 10))

    monkeypatch.setattr(ds, "torchvision_dataset", fake)
    tr = mt.multi_digits(200, size=28, seed=0, base="mnist", split="train", download=False)
    te = mt.multi_digits(50, size=36, seed=0, base="mnist", split="test", limit=60, download=False)
    assert ("mnist", "train", False) in calls and ("mnist", "test", False) in calls
    assert tr.images.shape == (200, 1, 28, 28) and torch.equal(tr.targets["left"], tr.sources["left"] % 10)
    assert te.base_split == "test" and len(set(te.sources["left"].tolist())) == 50
    assert len(set(te.sources["left"].tolist()) | set(te.sources["right"].tolist())) <= 60   # the limit
    # MNIST frames are used as they are (28 px): the canvas shows the named source images.
    frames = torch.from_numpy(arrays["test"]).float().div(255)[:, None]
    left, right = te.sources["left"], te.sources["right"]
    assert torch.allclose(te.images[..., :6, :28], frames[left][..., :6, :])
    assert torch.allclose(te.images[..., 28:34, 6:34], frames[right][..., 22:, :])


def test_missing_mnist_raises_dataset_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("TLCOURSE_DATA", str(tmp_path))
    with pytest.raises(ds.DatasetUnavailable, match="'mnist'"):
        mt.multi_digits(10, base="mnist", download=False)


# ----------------------------------------------------------------------------- tasks and models


def test_task_registry_losses_and_metrics():
    left, total = mt.TASKS["left"], mt.TASKS["sum"]
    assert (left.kind, left.out_features, left.loss, left.metric) == ("classification", 10, "cross_entropy", "accuracy")
    assert (total.kind, total.out_features, total.loss, total.metric) == ("regression", 1, "mse", "mae")
    assert left.higher_is_better and not total.higher_is_better
    y = torch.tensor([0.0, 9.0, 18.0])
    out = torch.tensor([-1.0, 0.0, 2.0])                         # standardised predictions
    assert total.compute_loss(out, y).item() == pytest.approx(F.mse_loss(out, (y - 9) / math.sqrt(16.5)).item())
    assert torch.allclose(total.decode(out), out * math.sqrt(16.5) + 9)
    assert total.score(out, y) == pytest.approx((total.decode(out) - y).abs().mean().item())
    raw = replace(total, shift=0.0, scale=1.0, loss="smooth_l1")
    assert raw.compute_loss(out, y).item() == pytest.approx(F.smooth_l1_loss(out, y).item())
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    same = mt.TASKS["same"]
    assert same.score(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert [t.name for t in mt.get_tasks(["left", total])] == ["left", "sum"]
    with pytest.raises(ValueError, match="no task named 'middle'"):
        mt.get_tasks("middle")
    with pytest.raises(ValueError, match="distinct"):
        mt.get_tasks(["left", "left"])
    with pytest.raises(ValueError, match="num_classes"):
        mt.Task("x", "classification")
    with pytest.raises(ValueError, match="loss"):
        mt.Task("x", "regression", loss="cross_entropy")


def test_multitask_net_shares_the_backbone_and_single_task_does_not():
    torch.manual_seed(0)
    net = mt.multitask_net(["left", "right", "sum"])
    out = net(torch.rand(4, 1, 28, 28))
    assert set(out) == {"left", "right", "sum"}
    assert out["left"].shape == out["right"].shape == (4, 10) and out["sum"].shape == (4,)
    assert {id(p) for p in net.shared_parameters()} == {id(p) for p in net.backbone.parameters()}
    assert net.backbone(torch.rand(2, 1, 16, 16)).shape == (2, 128)
    singles = mt.single_task(["left", "right", "sum"])
    assert list(singles) == ["left", "right", "sum"] and list(singles["sum"].heads) == ["sum"]
    assert not {id(p) for p in singles["left"].parameters()} & {id(p) for p in singles["right"].parameters()}
    counts = mt.parameter_counts(net, singles)
    backbone = sum(p.numel() for p in net.backbone.parameters())
    heads = sum(p.numel() for p in net.heads.parameters())
    assert counts["multi_task"] == backbone + heads
    assert counts["single_task_total"] == 3 * backbone + heads       # one backbone per task
    assert counts["saving"] == pytest.approx(1 - (backbone + heads) / (3 * backbone + heads))
    mlp = mt.make_heads(["sum"], 128, hidden=32)
    assert mlp["sum"](torch.rand(5, 128)).shape == (5,)


# ----------------------------------------------------------------------------- combiners


def _losses(**values):
    return {k: torch.tensor(float(v)) for k, v in values.items()}


def test_fixed_weights_and_make_combiner():
    fw = mt.FixedWeights({"left": 1.0, "sum": 0.25})
    assert fw(_losses(left=2.0, sum=4.0)).item() == pytest.approx(3.0)
    assert fw.weights() == {"left": 1.0, "sum": 0.25}
    assert mt.make_combiner("equal", ["left", "right"]).weights() == {"left": 1.0, "right": 1.0}
    assert isinstance(mt.make_combiner("uncertainty", ["left"]), mt.UncertaintyWeighting)
    assert isinstance(mt.make_combiner("pcgrad", ["left", "right"]), mt.PCGrad)
    assert mt.make_combiner(fw, ["left"]) is fw
    with pytest.raises(ValueError, match="gradnorm"):
        mt.make_combiner("gradnorm", ["left"])
    with pytest.raises(KeyError, match="sum"):
        fw(_losses(left=1.0))
    # A mapping is a fixed weighting (e.g. the sum at 1/2, where uncertainty weighting starts).
    half = mt.make_combiner({"sum": 0.5, "left": 1.0}, ["left", "sum"])
    assert isinstance(half, mt.FixedWeights) and half.weights() == {"left": 1.0, "sum": 0.5}
    with pytest.raises(ValueError, match="do not match"):
        mt.make_combiner({"left": 1.0}, ["left", "sum"])


def test_random_weights_are_fresh_each_step_and_sum_to_the_task_count():
    rw = mt.make_combiner("random", ["left", "right", "sum"], seed=3)
    assert isinstance(rw, mt.RandomWeights)
    losses = _losses(left=1.0, right=2.0, sum=3.0)
    drawn = []
    for _ in range(200):
        value = rw(losses)
        w = rw.weight_vector()
        assert value.item() == pytest.approx(float(w @ torch.tensor([1.0, 2.0, 3.0])), rel=1e-5)
        drawn.append(w)
    drawn = torch.stack(drawn)
    assert torch.allclose(drawn.sum(1), torch.full((200,), 3.0))      # like equal weights: total 3
    assert (drawn > 0).all() and drawn.std(0).min() > 0.3              # positive, and really random
    assert (drawn.mean(0) - 1).abs().max() < 0.15                      # no task favoured on average
    again = mt.make_combiner("random", ["left", "right", "sum"], seed=3)
    assert torch.equal(torch.stack([again(losses) * 0 + again.weight_vector() for _ in range(200)]), drawn)


def test_uncertainty_weighting_is_kendall_eq_10():
    uw = mt.UncertaintyWeighting(["left", "sum"])
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.5, -1.0]))
    s1, s2 = 0.5, -1.0
    sigma1, sigma2 = math.exp(s1 / 2), math.exp(s2 / 2)
    L1, L2 = 2.0, 3.0
    # classification: L / σ² + log σ; regression: L / (2σ²) + log σ
    expected = L1 / sigma1**2 + math.log(sigma1) + L2 / (2 * sigma2**2) + math.log(sigma2)
    assert uw(_losses(left=L1, sum=L2)).item() == pytest.approx(expected, rel=1e-6)
    w = uw.weights()
    assert w["left"] == pytest.approx(math.exp(-s1)) and w["sum"] == pytest.approx(0.5 * math.exp(-s2))
    assert uw.sigmas()["sum"] == pytest.approx(sigma2)
    fresh = mt.UncertaintyWeighting(["left", "sum"])
    assert fresh.weights() == {"left": 1.0, "sum": 0.5} and fresh.log_vars.requires_grad


@pytest.mark.parametrize("task,loss", [("left", 0.3), ("left", 2.0), ("sum", 0.3), ("sum", 5.0)])
def test_uncertainty_log_variance_settles_where_the_analytic_optimum_is(task, loss):
    kind = mt.TASKS[task].kind
    s_star = mt.UncertaintyWeighting.optimal_log_var(loss, kind)
    assert s_star == pytest.approx(math.log(2 * loss) if kind == "classification" else math.log(loss))
    uw = mt.UncertaintyWeighting([task])

    def grad_at(s):
        with torch.no_grad():
            uw.log_vars.fill_(s)
        uw.log_vars.grad = None
        uw(_losses(**{task: loss})).backward()
        return uw.log_vars.grad.item()

    # Below s* the gradient is negative (s rises), above it positive (s falls), zero at s*.
    assert grad_at(s_star - 1) < 0 < grad_at(s_star + 1)
    assert grad_at(s_star) == pytest.approx(0.0, abs=1e-6)
    # Gradient descent on s alone finds it; there every task's weight is 1 / (2 L).
    with torch.no_grad():
        uw.log_vars.fill_(0.0)
    opt = torch.optim.SGD(uw.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        uw(_losses(**{task: loss})).backward()
        opt.step()
    assert uw.log_vars.item() == pytest.approx(s_star, abs=1e-4)
    assert uw.weights()[task] == pytest.approx(1 / (2 * loss), rel=1e-3)


# ----------------------------------------------------------------------------- PCGrad


def test_pcgrad_projects_two_conflicting_gradients_by_hand():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])     # g1 · g2 = -1: a conflict
    # g1 - (g1·g2 / |g2|²) g2 = (0.5, 0.5);  g2 - (g1·g2 / |g1|²) g1 = (0, 1)
    out = mt.pcgrad_combine(torch.stack([g1, g2]))
    assert torch.allclose(out, torch.tensor([0.5, 1.5]))
    assert out @ g1 >= 0 and out @ g2 >= 0 and (g1 + g2) @ g1 == 0
    # Gradients that agree (or are orthogonal) are summed unchanged.
    agree = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.equal(mt.pcgrad_combine(agree), agree.sum(0))
    ortho = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.equal(mt.pcgrad_combine(ortho), ortho.sum(0))
    # Random pairs: for two tasks the result never opposes either gradient.
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        pair = torch.randn(2, 5, generator=g)
        out = mt.pcgrad_combine(pair)
        assert out @ pair[0] >= -1e-5 and out @ pair[1] >= -1e-5
        if pair[0] @ pair[1] >= 0:
            assert torch.allclose(out, pair.sum(0))


def test_pcgrad_three_tasks_depend_on_the_random_order():
    g = torch.tensor([[1.0, -1.0, -1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # g1 conflicts with g2 and g3 (which are orthogonal): g1 -> (1, 0, 0) in either order.
    # g2 meets g1 first -> (1/3, 2/3, -1/3), then g3 -> (1/3, 2/3, 0); g3 first -> no change,
    # then g1 -> (1/3, 2/3, -1/3). g3 likewise. So four possible sums:
    possible = {(5 / 3, a, b) for a in (2 / 3, 1 / 3) for b in (2 / 3, 1 / 3)}
    seen = set()
    for seed in range(40):
        out = mt.pcgrad_combine(g, torch.Generator().manual_seed(seed))
        key = min(possible, key=lambda p: (torch.tensor(p) - out).abs().max().item())
        assert torch.allclose(out, torch.tensor(key), atol=1e-6)
        seen.add(key)
    assert seen == possible
    same = torch.Generator().manual_seed(7)
    assert torch.equal(mt.pcgrad_combine(g, same), mt.pcgrad_combine(g, torch.Generator().manual_seed(7)))


def _toy(g1, g2):
    """Shared w (2-D) and one scalar 'head' per task: L_i = h_i (g_i · w), so ∂L_i/∂w = h_i g_i."""
    w = torch.tensor([0.5, -2.0], requires_grad=True)
    h1, h2 = torch.tensor(1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    return w, h1, h2, {"a": h1 * (g1 @ w), "b": h2 * (g2 @ w)}


def test_pcgrad_backward_changes_only_the_shared_gradient():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    w, h1, h2, losses = _toy(g1, g2)
    direction = mt.pcgrad_backward(losses, [w], [h1, h2])
    assert torch.allclose(w.grad, torch.tensor([0.5, 1.5])) and torch.equal(direction, w.grad)
    # Each head gets its own task's gradient, as from plain backward.
    assert h1.grad.item() == pytest.approx((g1 @ w).item()) and h2.grad.item() == pytest.approx((g2 @ w).item())
    # The PCGrad combiner: weighted losses, the same surgery, the weighted sum as its value.
    w, h1, h2, losses = _toy(g1, g2)
    pc = mt.PCGrad({"a": 1.0, "b": 1.0})
    total = pc.backward(losses, [w], [h1, h2])
    assert torch.allclose(w.grad, torch.tensor([0.5, 1.5]))
    assert total.item() == pytest.approx(sum(losses.values()).item())
    # Without a conflict it is exactly the ordinary backward of the sum.
    w, h1, h2, losses = _toy(g1, torch.tensor([1.0, 1.0]))
    mt.pcgrad_backward(losses, [w], [h1, h2])
    w_ref, h1r, h2r, ref = _toy(g1, torch.tensor([1.0, 1.0]))
    sum(ref.values()).backward()
    assert torch.allclose(w.grad, w_ref.grad) and torch.allclose(h2.grad, h2r.grad)


def test_gradient_cosine_on_a_toy_problem():
    g1, g2, g3 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([0.0, 3.0])
    w = torch.zeros(2, requires_grad=True)
    other = torch.ones(1, requires_grad=True)
    losses = [g1 @ w, g2 @ w, g3 @ w, other.sum()]                      # the last never touches w
    cos = mt.gradient_cosine(losses, [w])
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[1, -r, 0, 0], [-r, 1, r, 0], [0, r, 1, 0], [0, 0, 0, 1]])
    assert torch.allclose(cos, expected, atol=1e-6) and torch.equal(cos, cos.T)
    # The graph survives, so the same losses can still be backpropagated.
    sum(losses).backward()
    assert torch.allclose(w.grad, g1 + g2 + g3)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def small_data():
    return (mt.multi_digits(768, size=20, seed=0, split="train"), mt.multi_digits(300, size=20, seed=0, split="val"))


def test_train_multitask_learns_both_digits(small_data):
    train, val = small_data
    torch.manual_seed(0)
    tasks = ["left", "right", "sum"]
    result = mt.train_multitask(mt.multitask_net(tasks), train, tasks, val=val, epochs=4, batch_size=64,
                                lr=2e-3, cosine_every=10)
    h = result.history
    steps = 4 * (768 // 64)
    assert h["tasks"] == tasks and set(h) >= {"step_loss", "train_loss", "val", "weights", "cosine", "epoch_seconds"}
    assert 0 < result.cpu_seconds and 0 < result.seconds   # both clocks of the run (CPU time: every thread)
    assert all(len(h["step_loss"][t]) == len(h["weights"][t]) == steps for t in tasks)
    assert all(len(h["train_loss"][t]) == len(h["val"][t]) == 4 for t in tasks)
    assert h["cosine"]["step"] == list(range(0, steps, 10))
    assert np.array(h["cosine"]["matrix"]).shape == (len(h["cosine"]["step"]), 3, 3)
    assert h["weights"]["sum"] == [1.0] * steps
    # Well above chance (0.1) on both digits, and the sum better than always guessing 9.
    assert result.metrics["left"] > 0.5 and result.metrics["right"] > 0.5, result.metrics
    guess_mean = (val.targets["sum"] - 9).abs().mean().item()
    assert result.metrics["sum"] < 0.8 * guess_mean, (result.metrics, guess_mean)
    for t in tasks:
        assert h["train_loss"][t][-1] < h["train_loss"][t][0]
    # Evaluated again: the same numbers up to float rounding (batched reductions on several
    # threads need not sum in the same order twice).
    again = mt.evaluate(result.model, val, tasks)
    assert again.keys() == result.metrics.keys() and not result.model.training
    assert all(again[t] == pytest.approx(result.metrics[t], rel=1e-5, abs=1e-6) for t in tasks), (again, result.metrics)


def test_uncertainty_weights_move_and_pcgrad_runs_repeat(small_data):
    train, _ = small_data
    runs = {}
    for combiner in ("uncertainty", "pcgrad", "pcgrad", "random"):
        torch.manual_seed(1)
        runs.setdefault(combiner, []).append(
            mt.train_multitask(mt.multitask_net(["left", "sum"]), train.subset(slice(0, 256)), ["left", "sum"],
                               combiner=combiner, epochs=1, batch_size=32, lr=5e-3, seed=1, cosine_every=0))
    # Random weights: the logged weights are the ones each step drew, different every step.
    logged = torch.tensor([runs["random"][0].history["weights"][t] for t in ("left", "sum")])
    assert torch.allclose(logged.sum(0), torch.full((logged.shape[1],), 2.0)) and logged[0].unique().numel() > 1
    u = runs["uncertainty"][0]
    # The log-variances trained from their start (weights 1 and 1/2). The cross-entropy stays
    # above 1/2 in these few steps, so its s* = log(2 L) > 0: s rises and the weight falls.
    weights = u.history["weights"]
    assert weights["left"][0] == pytest.approx(1.0) and weights["sum"][0] == pytest.approx(0.5)
    assert min(u.history["step_loss"]["left"]) > 0.5 and weights["left"][-1] < weights["left"][0]
    assert u.combiner.log_vars.abs().min() > 1e-3 and u.history["cosine"]["step"] == []
    torch.manual_seed(1)
    frozen = mt.train_multitask(mt.multitask_net(["left", "sum"]), train.subset(slice(0, 64)), ["left", "sum"],
                                combiner="uncertainty", epochs=1, batch_size=32, combiner_lr=0.0, cosine_every=0)
    assert frozen.history["weights"]["left"] == [1.0, 1.0] and frozen.combiner.log_vars.eq(0).all()
    a, b = runs["pcgrad"]
    assert a.history["step_loss"] == b.history["step_loss"]             # same seed, same run on a CPU
    with pytest.raises(ValueError, match="no head for right"):
        mt.train_multitask(a.model, train, ["left", "right"])


def test_delta_mtl_signs():
    single = {"left": 0.80, "sum": 2.0}
    assert mt.delta_mtl({"left": 0.88, "sum": 1.8}, single, ["left", "sum"]) == pytest.approx(10.0)
    assert mt.delta_mtl({"left": 0.72, "sum": 2.2}, single, ["left", "sum"]) == pytest.approx(-10.0)
