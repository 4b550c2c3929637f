"""Distillation pieces against their definitions, and the loop on tiny data."""

import math

import pytest
import torch
from torch import nn

from tlcourse import distill


def test_soften_flattens_with_temperature():
    logits = torch.tensor([[4.0, 1.0, 0.0]])
    p1, p4 = distill.soften(logits, 1.0), distill.soften(logits, 4.0)
    assert torch.allclose(p1, torch.softmax(logits, -1))
    assert torch.allclose(p4.sum(-1), torch.ones(1))
    assert p4[0, 0] < p1[0, 0] and p4[0, 2] > p1[0, 2]     # mass moves to the wrong classes
    assert torch.equal(p4.argmax(-1), p1.argmax(-1))       # the ranking is kept
    with pytest.raises(ValueError, match="temperature"):
        distill.soften(logits, 0)


def test_kd_loss_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0])
    T, alpha = 3.0, 0.7
    pt, ps = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    ce = -torch.log_softmax(s, -1)[torch.arange(5), y].mean()
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert distill.kd_loss(s, t, y, T, alpha).item() == pytest.approx(expected.item(), rel=1e-5)
    # Without labels: the soft term alone.
    assert distill.kd_loss(s, t, None, T).item() == pytest.approx((T * T * kl).item(), rel=1e-5)
    # alpha = 0 is plain cross-entropy; identical logits give zero soft loss.
    assert distill.kd_loss(s, t, y, T, 0.0).item() == pytest.approx(ce.item(), rel=1e-5)
    assert distill.kd_loss(t, t, None, T).item() == pytest.approx(0.0, abs=1e-6)


def test_t_squared_keeps_soft_gradients_comparable_across_temperatures():
    # For high T the soft gradient scales as 1/T²; the T² factor undoes that (Hinton et al. 2015).
    g = torch.Generator().manual_seed(1)
    t = torch.randn(64, 10, generator=g)
    s0 = torch.randn(64, 10, generator=g) * 0.5
    norms = []
    for T in (4.0, 8.0, 16.0):
        s = s0.clone().requires_grad_()
        distill.kd_loss(s, t, None, T).backward()
        norms.append(s.grad.norm().item())
    # Without T² the norms would fall by ~4x per doubling; with it they stay within ~2x of each other
    # (as T grows, the KL of softened logits approaches a T-independent limit).
    assert max(norms) / min(norms) < 2.0
    # The same soft term without T², written independently: its gradient collapses with T.
    plain = []
    for T in (1.0, 16.0):
        s = s0.clone().requires_grad_()
        nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.softmax(t / T, -1), reduction="batchmean").backward()
        plain.append(s.grad.norm().item())
    assert plain[1] < plain[0] / 50


def test_kd_loss_does_not_train_the_teacher_logits():
    s, t = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    distill.kd_loss(s, t, None).backward()
    assert t.grad is None and s.grad is not None


def test_kd_loss_bad_input():
    with pytest.raises(ValueError, match="shape"):
        distill.kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="alpha"):
        distill.kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), alpha=1.5)


def test_hint_loss_regresses_student_features_onto_the_teachers():
    reg = distill.HintRegressor(8, 16)
    sf, tf = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 8, 8)
    loss = distill.hint_loss(sf, tf, reg)
    assert loss.item() > 0 and reg(sf, size=(8, 8)).shape == (2, 16, 8, 8)
    # A reachable target: another 1x1 projection of the same student features.
    target = distill.HintRegressor(8, 16)(sf, size=(8, 8)).detach()
    start = distill.hint_loss(sf, target, reg).item()
    opt = torch.optim.Adam(reg.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        distill.hint_loss(sf, target, reg).backward()
        opt.step()
    assert distill.hint_loss(sf, target, reg).item() < start / 50


def test_hints_for_a_fully_connected_student_are_vectors():
    reg = distill.HintRegressor(8, 5)
    sf, tf = torch.randn(4, 8), torch.randn(4, 5)
    assert reg(sf).shape == (4, 5)
    expected = ((reg.proj.weight[:, :, 0, 0] @ sf.T).T + reg.proj.bias - tf).pow(2).mean()
    assert torch.allclose(distill.hint_loss(sf, tf, reg), expected)


def test_fit_hints_trains_the_guided_layers_in_place_and_nothing_above():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher_layer = nn.Sequential(nn.Linear(6, 4), nn.Tanh())
    x = torch.randn(256, 6)
    with torch.no_grad():
        hints = teacher_layer(x)
    head = [p.detach().clone() for p in student[2].parameters()]
    first = student[0].weight.detach().clone()
    reg = distill.HintRegressor(8, 4)
    losses = distill.fit_hints(student[:2], reg, x, hints, epochs=30, batch_size=32, lr=1e-2, seed=0)
    assert len(losses) == 30 * 8
    assert sum(losses[-8:]) / 8 < 0.3 * sum(losses[:8]) / 8          # the hint is learnt ...
    assert not torch.equal(student[0].weight, first)                  # ... by the student's own layer
    assert all(torch.equal(p, q) for p, q in zip(student[2].parameters(), head))   # the head is untouched
    with pytest.raises(ValueError, match="hints"):
        distill.fit_hints(student[:2], reg, x, hints[:10])


def test_class_bias_shift_recovers_a_class_whose_bias_is_too_low():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(100)
    logits = 3 * torch.nn.functional.one_hot(labels, 3).float() + 0.5 * torch.randn(300, 3, generator=g)
    logits[:, 2] -= 6.0                                # class 2 is never predicted ...
    assert (logits.argmax(1) == 2).sum() == 0
    shift = distill.class_bias_shift(logits, labels, 2)
    assert 4.0 <= shift <= 8.0                         # ... until about that much is given back
    fixed = logits.clone()
    fixed[:, 2] += shift
    assert (fixed.argmax(1) == labels).float().mean() > 0.95
    assert distill.class_bias_shift(3 * torch.nn.functional.one_hot(labels, 3).float(), labels, 2) == 0.0


def _toy(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()  # XOR-like quadrants: needs a hidden layer
    return x, y


def _teacher(x, y):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(2, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(teacher.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    return teacher.eval()


def test_distill_teaches_the_student_and_leaves_the_teacher_alone():
    x, y = _toy()
    teacher = _teacher(x, y)
    assert (teacher(x).argmax(1) == y).float().mean() > 0.95
    teacher.train()  # a teacher left in train mode: distill must still use (and restore) it safely
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    result = distill.distill(student, x, None, teacher=teacher, epochs=30, batch_size=32, lr=0.01)
    # Unlabelled transfer: the student learnt the task from the teacher's outputs alone.
    assert (result.student(x).argmax(1) == y).float().mean() > 0.9
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, state[k]), f"teacher's {k} changed"
    assert teacher.training  # its mode is restored


def test_distill_refuses_a_teacher_that_changes():
    x, y = _toy(64)
    teacher = _teacher(x, y)

    class Sneaky(nn.Module):  # a "teacher" that updates itself when called in train mode
        def __init__(self):
            super().__init__()
            self.inner = teacher

        def forward(self, inp):
            self.inner[0].weight.data.add_(0.01)
            return self.inner(inp)

    with pytest.raises(RuntimeError, match="teacher"):
        distill.distill(nn.Linear(2, 2), x, y, teacher=Sneaky(), epochs=1)


def test_distill_with_cached_logits_equals_with_teacher():
    x, y = _toy(128)
    teacher = _teacher(x, y)
    logits = distill.teacher_logits(teacher, x, batch_size=50)
    assert logits.shape == (128, 2)
    make = lambda: nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    torch.manual_seed(3)
    a = distill.distill(make(), x, y, teacher=teacher, epochs=2, seed=1)
    torch.manual_seed(3)
    b = distill.distill(make(), x, y, cached_logits=logits, epochs=2, seed=1)
    assert a.history["loss"] == pytest.approx(b.history["loss"])
    with pytest.raises(ValueError, match="exactly one"):
        distill.distill(make(), x, y, epochs=1)
    with pytest.raises(ValueError, match="teacher logits"):
        distill.distill(make(), x, y, cached_logits=logits[:10], epochs=1)


# --- the student, the transfer set, and what the chapter measures ---------------------------


def test_student_cnn_shapes_and_size():
    student = distill.StudentCNN(num_classes=2, width=16)
    x = torch.randn(3, 3, 64, 64)
    assert student(x).shape == (3, 2)
    assert student.features(x).shape == (3, 128, 8, 8)          # 8 x width channels, S/8 grid
    n = sum(p.numel() for p in student.parameters())
    assert 90_000 < n < 110_000
    assert sum(p.numel() for p in distill.StudentCNN(2, width=8).parameters()) < n / 3


def _photos(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 40 + i, 50), generator=g, dtype=torch.uint8) for i in range(n)]


def test_augmented_views_are_fixed_by_seed_and_leave_the_global_rng_alone():
    photos, labels = _photos(), [0, 1, 1, 0, 1]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    views, y = distill.augmented_views(photos, labels, views=3, size=32, seed=7)
    assert torch.equal(torch.rand(1), expected_next)            # global random state untouched
    assert views.shape == (15, 3, 32, 32) and views.dtype == torch.uint8
    assert y.tolist() == labels * 3                              # view v of photo i sits at v * N + i
    again, _ = distill.augmented_views(photos, labels, views=3, size=32, seed=7)
    other, _ = distill.augmented_views(photos, labels, views=3, size=32, seed=8)
    assert torch.equal(views, again) and not torch.equal(views, other)
    assert not torch.equal(views[0], views[5])                  # two different crops of photo 0
    with pytest.raises(ValueError, match="labels"):
        distill.augmented_views(photos, labels[:2], views=1, size=32)


def test_to_input_normalises_and_resizes():
    x = torch.full((2, 3, 20, 20), 255, dtype=torch.uint8)
    x[1] = 0
    out = distill.to_input(x, size=10, mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=1)
    assert out.shape == (2, 3, 10, 10) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.ones(3, 10, 10)) and torch.allclose(out[1], -torch.ones(3, 10, 10))
    assert distill.to_input(x, None).shape == (2, 3, 20, 20)


def test_distill_trains_a_conv_student_and_returns_it_in_the_usual_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    logits = torch.stack([-x[:, 0].mean((1, 2)), x[:, 0].mean((1, 2))], 1) * 10
    torch.manual_seed(0)
    result = distill.distill(distill.StudentCNN(2, width=4), x, y, cached_logits=logits, epochs=15,
                             batch_size=16, lr=0.01)
    assert result.history["loss"][-1] < result.history["loss"][0]
    weight = result.student.body[0].weight
    assert weight.is_contiguous() and not result.student.training
    torch.manual_seed(0)
    again = distill.distill(distill.StudentCNN(2, width=4), x, y, cached_logits=logits, epochs=15,
                            batch_size=16, lr=0.01)
    assert again.history["loss"] == result.history["loss"]           # same seed, same run


def test_without_labels_alpha_is_ignored():
    x, y = _toy(64)
    logits = torch.randn(64, 2)
    runs = []
    for alpha in (0.3, 1.0):
        torch.manual_seed(0)
        runs.append(distill.distill(nn.Linear(2, 2), x, None, cached_logits=logits, alpha=alpha, epochs=2).history["loss"])
    assert runs[0] == runs[1]
