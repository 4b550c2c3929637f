"""Domain-adaptation pieces: each loss against a hand computation, the loop on tiny data."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tlcourse import adapt


def test_gradient_reversal_is_identity_forward_and_negates_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = adapt.grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.arange(3.0)).sum().backward()
    assert torch.allclose(x.grad, -0.5 * torch.arange(3.0).expand(4, 3))


def test_gradient_reversal_only_reverses_what_is_behind_it():
    w = torch.ones(3, requires_grad=True)
    feat = torch.randn(5, 3) * w
    head_loss = feat.sum()
    adv_loss = adapt.grad_reverse(feat, 2.0).sum()
    grad_head, = torch.autograd.grad(head_loss, w, retain_graph=True)
    grad_adv, = torch.autograd.grad(adv_loss, w)
    assert torch.allclose(grad_adv, -2.0 * grad_head)


def test_dann_lambda_schedule():
    assert adapt.dann_lambda(0.0) == 0.0
    assert adapt.dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    values = [adapt.dann_lambda(p / 10) for p in range(11)]
    assert all(a < b for a, b in zip(values, values[1:])) and values[-1] < 1
    assert adapt.dann_lambda(0.5, gamma=10) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    with pytest.raises(ValueError, match="progress"):
        adapt.dann_lambda(1.5)


def test_coral_loss_matches_formula_and_is_zero_for_equal_covariance():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(50, 4, generator=g), torch.randn(40, 4, generator=g) * 2 + 1
    cs, ct = np.cov(s.numpy().T), np.cov(t.numpy().T)
    expected = ((cs - ct) ** 2).sum() / (4 * 16)
    assert adapt.coral_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    # A shift of the mean leaves covariances, and so CORAL, unchanged.
    assert adapt.coral_loss(s, s + 3.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same d"):
        adapt.coral_loss(s, t[:, :3])


def test_mmd_loss_matches_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 2, generator=g), torch.randn(5, 2, generator=g) + 1.5
    mult = (0.5, 1.0, 2.0)
    joint = torch.cat([s, t]).double()
    sq = torch.tensor([[((a - b) ** 2).sum().item() for b in joint] for a in joint], dtype=torch.float64)
    scale = sq.sum() / (11 * 11 - 11)
    k = sum(torch.exp(-sq / (m * scale)) for m in mult)
    expected = k[:6, :6].mean() + k[6:, 6:].mean() - 2 * k[:6, 6:].mean()
    got = adapt.mmd_loss(s.double(), t.double(), multipliers=mult)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert adapt.mmd_loss(s, s).item() == pytest.approx(0.0, abs=1e-6)
    # Farther apart -> larger discrepancy.
    assert adapt.mmd_loss(s, t + 3).item() > got.item()


def test_mmd_loss_gradient_pulls_target_towards_source():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 2, generator=g) * 0.3
    t = (torch.randn(16, 2, generator=g) * 0.3 + 1.0).requires_grad_()
    before = adapt.mmd_loss(s, t)
    before.backward()
    # Gradient descent moves the target batch, on average, towards the source (the origin)...
    assert (t.grad.mean(dim=0) > 0).all()
    # ...and lowers the discrepancy.
    with torch.no_grad():
        assert adapt.mmd_loss(s, t - 0.5 * t.grad).item() < before.item()


def test_adabn_replaces_running_statistics_with_the_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model.train()
    model(torch.randn(32, 3, 5, 5))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    target = torch.randn(300, 3, 5, 5) * 3 + 2
    adapt.adabn(model, target, batch_size=60)  # equal batches: the cumulative mean is exact
    with torch.no_grad():
        conv_out = model[0](target)
    bn = model[1]
    assert torch.allclose(bn.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, conv_out.var(dim=(0, 2, 3)), rtol=0.02)
    assert bn.momentum == 0.1 and not model.training
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), f"AdaBN changed weight {k}"
    # A last batch of a single image is merged into the one before (BatchNorm1d needs two).
    net = adapt.DigitNet()
    adapt.adabn(net, torch.rand(9, 3, 16, 16), batch_size=4)
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt.adabn(nn.Linear(2, 2), torch.zeros(3, 2))


def test_pseudo_labels_threshold():
    logits = torch.tensor([[5.0, 0.0], [0.1, 0.0], [0.0, 9.0]])
    labels, mask = adapt.pseudo_labels(logits, threshold=0.9)
    assert labels.tolist() == [0, 0, 1] and mask.tolist() == [True, False, True]


def test_digitnet_shapes():
    net = adapt.DigitNet(num_classes=10)
    for size in (16, 28, 32):
        x = torch.rand(2, 3, size, size)
        assert net(x).shape == (2, 10) and net.embed(x).shape == (2, net.feature_dim)


def _toy_domains(n=200, seed=0):
    """Two classes (bright left half vs bright right half); the target is the same images
    with a strong colour cast and inverted contrast."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.3
    x[y == 0, :, :, :8] += 0.6
    x[y == 1, :, :, 8:] += 0.6
    target = (1 - x) * torch.tensor([1.0, 0.4, 0.2]).view(1, 3, 1, 1)
    return TensorDataset(x, y), TensorDataset(target, y)


@pytest.mark.parametrize("method", adapt.METHODS)
def test_train_adapt_runs_every_method_and_learns_the_source(method):
    source, target = _toy_domains()
    config = adapt.AdaptConfig(steps=40, batch_size=32, warmup=0.5, threshold=0.6)
    result = adapt.train_adapt(method, source, target, config=config, seed=0)
    assert result.method == method and len(result.history["loss"]) == 40
    assert adapt.accuracy(result.model, source) > 0.9
    assert not result.model.training
    if method in ("dann", "coral", "mmd", "self_training"):
        assert any(v > 0 for v in result.history["adapt_loss"])
    if method == "self_training":  # pseudo-labels only after the warm-up
        assert all(v == 0 for v in result.history["adapt_loss"][:20])
    if method == "adabn":  # BatchNorm now holds the target's statistics, not the source's
        plain = adapt.train_adapt("source_only", source, target, config=config, seed=0)
        assert not torch.allclose(result.model.features[1].running_mean, plain.model.features[1].running_mean)


def test_train_adapt_never_reads_target_labels():
    source, target = _toy_domains()
    config = adapt.AdaptConfig(steps=15, batch_size=32)
    scrambled = TensorDataset(target.tensors[0], torch.randint(0, 2, (len(target),)))
    for method in ("dann", "self_training"):
        a = adapt.train_adapt(method, source, target, config=config, seed=3)
        b = adapt.train_adapt(method, source, scrambled, config=config, seed=3)
        c = adapt.train_adapt(method, source, target.tensors[0], config=config, seed=3)
        for k, v in a.model.state_dict().items():
            assert torch.equal(v, b.model.state_dict()[k]) and torch.equal(v, c.model.state_dict()[k])


def test_train_adapt_accepts_loaders_and_datasets():
    from torch.utils.data import DataLoader, Subset

    source, target = _toy_domains(n=96)
    config = adapt.AdaptConfig(steps=5, batch_size=32)
    a = adapt.train_adapt("coral", source, target.tensors[0], config=config, seed=4)
    b = adapt.train_adapt("coral", DataLoader(source, batch_size=10), Subset(target, range(len(target))),
                          config=config, seed=4)
    assert a.history["loss"] == b.history["loss"]
    with pytest.raises(ValueError, match="empty"):
        adapt.train_adapt("coral", source, Subset(target, []), config=config)


def test_train_adapt_is_deterministic_by_seed():
    source, target = _toy_domains()
    config = adapt.AdaptConfig(steps=10, batch_size=32)
    a, b = (adapt.train_adapt("coral", source, target, config=config, seed=1) for _ in range(2))
    c = adapt.train_adapt("coral", source, target, config=config, seed=2)
    assert a.history["loss"] == b.history["loss"] != c.history["loss"]


def test_learning_rate_is_annealed_as_in_ganin_et_al():
    source, target = _toy_domains()
    config = adapt.AdaptConfig(steps=10, batch_size=32, lr=0.01)
    model = adapt.DigitNet(num_classes=2)
    lrs = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        adapt.train_adapt("source_only", source, target, model=model, config=config)
    finally:
        hook.remove()
    assert lrs == pytest.approx([0.01 * (1 + 10 * k / 10) ** -0.75 for k in range(10)])


def test_train_adapt_bad_input():
    source, target = _toy_domains()
    with pytest.raises(ValueError, match="batch_size"):
        adapt.train_adapt("dann", source, target.tensors[0][:10], config=adapt.AdaptConfig(batch_size=32))
    with pytest.raises(ValueError, match="unknown method"):
        adapt.train_adapt("dan", source, target)
    with pytest.raises(ValueError, match="labelled"):
        adapt.train_adapt("dann", source.tensors[0], target)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        adapt.train_adapt("dann", source, torch.zeros(5, 16))


def test_domain_accuracy_separates_and_confuses():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5))
    acc_same, pad_same = adapt.domain_accuracy(a[:100], a[100:])
    acc_far, pad_far = adapt.domain_accuracy(a[:100], a[100:] + 3)
    assert acc_same < 0.65 and acc_far > 0.97
    assert pad_far > 1.8 and pad_same < 0.6


def test_benchmark_and_summary():
    source, target = _toy_domains()
    config = adapt.AdaptConfig(steps=10, batch_size=32)
    rows = adapt.benchmark(source, target, target, methods=("source_only", "coral", "adabn"), seeds=(0, 1),
                           config=config, progress=False, oracle=target)
    assert [r["method"] for r in rows] == ["source_only"] * 2 + ["coral"] * 2 + ["adabn"] * 2 + ["target_oracle"] * 2
    # AdaBN reuses the source-only run of the same seed, and equals training it afresh.
    fresh = adapt.train_adapt("adabn", source, target, config=config, seed=1)
    assert rows[5]["target_acc"] == adapt.accuracy(fresh.model, target)
    summary = adapt.summarize(rows)
    assert [s["method"] for s in summary] == ["source_only", "coral", "adabn", "target_oracle"]
    with pytest.raises(ValueError, match="unknown method"):
        adapt.benchmark(source, target, target, methods=("cdan",), progress=False)
    s0 = summary[0]
    accs = [r["target_acc"] for r in rows[:2]]
    assert s0["target_mean"] == pytest.approx(np.mean(accs)) and s0["target_std"] == pytest.approx(np.std(accs, ddof=1))
    table = adapt.summary_markdown(summary)
    assert table.count("\n") == 5 and "± " in table
