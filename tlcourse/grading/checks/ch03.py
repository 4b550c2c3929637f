"""Checks for chapter 03 (domain adaptation): gradient reversal, DANN's λ schedule, CORAL,
MMD, AdaBN and pseudo-labels.

Every question is a small function on tiny tensors, so a question grades in milliseconds.
Tests marked ``after_due_date`` are not run by the in-notebook ``check()``; ``tlcourse grade``
runs them and Gradescope shows them after the deadline. They compare the learner's function
with the references below on random inputs, values *and* gradients.

The references (``_reference_*``) are written out here rather than imported from
:mod:`tlcourse.adapt`: a checks module must stand alone (e.g. in a hidden-tests folder), and a
submission could rebind ``tlcourse.adapt``'s functions, which the sandbox does not watch.
``tests/test_grading_ch03.py`` proves that each reference equals ``tlcourse.adapt``'s.
Format: :mod:`tlcourse.grading.spec`.
"""

import copy
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tlcourse.grading.spec import (close, expect_close, expect_float, expect_loss, expect_shape, expect_tensor,
                                   expect_tuple, points, seeded_randn)

QUESTIONS = {
    "q1": {"title": "gradient reversal", "functions": ["grad_reverse"]},
    "q2": {"title": "DANN's λ schedule", "functions": ["dann_lambda"]},
    "q3": {"title": "Deep CORAL loss", "functions": ["coral_loss"]},
    "q4": {"title": "MMD loss", "functions": ["mmd_loss"]},
    "q5": {"title": "AdaBN", "functions": ["adabn"]},
    "q6": {"title": "pseudo-labels", "functions": ["pseudo_labels"]},
}

HIDDEN = "after_due_date"
MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


# --- references (equal to tlcourse.adapt's; tests/test_grading_ch03.py checks it) ---------

class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambd):
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return -ctx.lambd * grad_output, None


def _reference_grad_reverse(x, lambd=1.0):
    return _Reverse.apply(x, lambd)


def _reference_dann_lambda(progress, gamma=10.0):
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


def _covariance(x, unbiased=True, centred=True):
    if centred:
        x = x - x.mean(dim=0, keepdim=True)
    return x.T @ x / (len(x) - 1 if unbiased else len(x))


def _reference_coral(source, target, unbiased=True, centred=True, power=2, scale=True):
    d = source.shape[1]
    diff = _covariance(source, unbiased, centred) - _covariance(target, unbiased, centred)
    value = diff.pow(2).sum() if power == 2 else diff.pow(2).sum().sqrt()
    return value / (4 * d * d) if scale else value


def _reference_mmd(source, target, multipliers=MULTIPLIERS, cross=-2.0, squared=True, pairs="distinct",
                   detach=True, combine="sum", unbiased=False):
    joint = torch.cat([source, target])
    n, ns = len(joint), len(source)
    dist = ((joint[:, None, :] - joint[None, :, :]) ** 2).sum(-1)
    if not squared:
        dist = dist.clamp_min(1e-30).sqrt() * (1 - torch.eye(n))
    bandwidth = dist.detach() if detach else dist
    scale = bandwidth.sum() / (n * n - n if pairs == "distinct" else n * n)
    kernel = sum(torch.exp(-dist / (m * scale)) for m in multipliers)
    if combine == "mean":
        kernel = kernel / len(multipliers)
    k_ss, k_tt, k_st = kernel[:ns, :ns], kernel[ns:, ns:], kernel[:ns, ns:]
    if unbiased:
        nt = n - ns
        return ((k_ss.sum() - k_ss.diagonal().sum()) / (ns * ns - ns) + (k_tt.sum() - k_tt.diagonal().sum())
                / (nt * nt - nt) + cross * k_st.mean())
    return k_ss.mean() + k_tt.mean() + cross * k_st.mean()


def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def _reference_adabn(model, images, batch_size=256, cumulative=True, reset=True):
    bns = _bn_layers(model)
    saved = [m.momentum for m in bns]
    for m in bns:
        if reset:
            m.reset_running_stats()
        if cumulative:
            m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    for start in range(0, len(images), batch_size):
        model(images[start:start + batch_size])
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    return model.eval()


def _reference_pseudo_labels(logits, threshold=0.9):
    confidence, labels = logits.softmax(dim=1).max(dim=1)
    return labels, confidence >= threshold


# --- helpers ------------------------------------------------------------------------------

def _grads(fn, *inputs):
    """``(fn(*leaves), leaves)``, the leaves fresh copies of ``inputs`` that require grad."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    return value, leaves


def _compare_gradients(loss_fn, reference, inputs, what, hint):
    value, leaves = _grads(loss_fn, *inputs)
    value = expect_loss(value, what)
    assert value.requires_grad and value.grad_fn is not None, (
        f"{what} is not connected to its inputs in the autograd graph (computed under torch.no_grad(), "
        "or from .detach()/.item()/.numpy() values?): it could not train the feature extractor")
    value.backward()
    want, ref_leaves = _grads(reference, *inputs)
    want.backward()
    expect_close(value, want, what, atol=1e-6, rtol=1e-4)
    for name, mine, ref in zip(("source", "target"), leaves, ref_leaves):
        assert mine.grad is not None, f"no gradient reached the {name} features through {what}"
        scale = float(ref.grad.abs().max()) + 1e-12
        diff = float((mine.grad - ref.grad).abs().max())
        assert diff <= 1e-4 * scale + 1e-7, (
            f"{what} has the right value but the wrong gradient with respect to the {name} features "
            f"(largest difference {diff:.3g}, largest gradient {scale:.3g}){hint}")


# --- q1: grad_reverse(x, lambd) -----------------------------------------------------------

def _backward_through(grad_reverse, x, lambd, upstream):
    x = x.detach().clone().requires_grad_(True)
    y = grad_reverse(x, lambd)
    expect_tensor(y, f"grad_reverse(x, {lambd})")  # the type; y itself keeps its autograd graph
    expect_shape(y, x.shape, f"grad_reverse(x, {lambd})")
    if not y.requires_grad:
        raise AssertionError("the result of grad_reverse(x) does not require grad although x does: it is cut "
                             "from the autograd graph (computed under no_grad, or from x.detach()/x.data?)")
    try:
        y.backward(upstream)
    except RuntimeError as exc:
        if "incorrect number of gradients" in str(exc):
            raise AssertionError("backward must return one gradient per input of forward, here two: "
                                 "(the gradient for x, None for lambd, which needs none)") from None
        raise
    assert x.grad is not None, "no gradient reached x through grad_reverse"
    return y.detach(), x.grad


@points(1)
def test_q1_forward_is_identity(grad_reverse):
    """returns x unchanged in the forward pass (same shape, same values), for any lambd"""
    passed_through = []
    for shape, lambd in (((5, 3), 1.0), ((2, 3, 4, 4), 0.3)):
        x = seeded_randn(*shape, seed=1)
        y, grad = _backward_through(grad_reverse, x, lambd, torch.ones(shape))
        passed_through.append(torch.equal(grad, torch.ones(shape)))
        if torch.allclose(y, -x) or torch.allclose(y, -lambd * x):
            raise AssertionError("the forward pass negated x: the reversal happens only in the backward pass. "
                                 "Going forward the layer is the identity, so the domain classifier sees the "
                                 "real features")
        if lambd != 1 and torch.allclose(y, lambd * x):
            raise AssertionError("the forward pass scaled x by lambd: only the gradient is scaled; "
                                 "the forward pass returns x unchanged")
        assert torch.equal(y, x), "grad_reverse(x) should return x's values unchanged (the identity)"
    # `return x` has this forward pass too: the points are for a layer whose backward pass is its own.
    assert not all(passed_through), (
        "grad_reverse is the plain identity, in the backward pass too (the gradient comes back unchanged): the "
        "forward pass is only half of the layer. Write a torch.autograd.Function whose backward returns "
        "-lambd * grad_output")


@points(2)
def test_q1_gradient_reversed_and_scaled(grad_reverse):
    """multiplies the incoming gradient by -lambd in the backward pass (lambd = 1, 0.3 and 2.5)"""
    x = seeded_randn(4, 6, seed=2)
    upstream = seeded_randn(4, 6, seed=3)
    lambdas = (1.0, 0.3, 2.5)
    grads = [_backward_through(grad_reverse, x, lambd, upstream)[1] for lambd in lambdas]

    def every(factor):
        return all(torch.allclose(g, factor(lambd) * upstream, atol=1e-6) for g, lambd in zip(grads, lambdas))

    if every(lambda lambd: 1.0):
        raise AssertionError("the gradient came back unchanged: the backward pass must return "
                             "-lambd * grad_output (is your backward used at all?)")
    if every(lambda lambd: lambd):
        raise AssertionError("the gradient was scaled by lambd but not reversed: return -lambd * grad_output")
    if every(lambda lambd: -1.0):
        raise AssertionError("the gradient was only negated, whatever lambd: multiply it by lambd too "
                             "(store lambd on ctx in forward, e.g. ctx.lambd = lambd)")
    for g, lambd in zip(grads, lambdas):
        assert torch.allclose(g, -lambd * upstream, atol=1e-6), (
            f"with lambd = {lambd} the gradient reaching x should be -{lambd} times the incoming gradient")


@points(1, visibility=HIDDEN)
def test_q1_in_a_network(grad_reverse):
    """in a network: the domain classifier's gradients unchanged, the extractor's reversed (2 reversals, lambd=0)"""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        features, domain = nn.Linear(5, 4), nn.Linear(4, 1)
    x, labels = seeded_randn(6, 5, seed=6), (torch.arange(6) % 2).float()

    def grads(reverse, lambdas):
        f, d = copy.deepcopy(features), copy.deepcopy(domain)
        h = f(x)
        logits = sum(d(reverse(h, lam)) for lam in lambdas).squeeze(1)
        nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
        return [p.grad.clone() for p in (*f.parameters(), *d.parameters())]

    for lambdas in ((0.7,), (0.5, 2.0), (0.0,)):
        mine, want = grads(grad_reverse, lambdas), grads(_reference_grad_reverse, lambdas)
        for i, (a, b) in enumerate(zip(mine, want)):
            if len(lambdas) == 2 and not torch.allclose(a, b, atol=1e-6):
                raise AssertionError("with two reversals (lambd 0.5 and 2.0) in one graph the gradients are "
                                     "wrong: keep lambd on ctx (ctx.lambd = lambd), not on the class or in a "
                                     "global, which the second call overwrites")
            part = "feature extractor" if i < 2 else "domain classifier"
            assert torch.allclose(a, b, atol=1e-6), (
                f"with lambd = {lambdas[0]} the {part}'s gradients are wrong: only the gradient flowing back "
                "*through* the reversal changes sign (the classifier after it learns normally)")


# --- q2: dann_lambda(progress, gamma=10.0) -> float ---------------------------------------

@points(1)
def test_q2_schedule_values(dann_lambda):
    """returns 2 / (1 + exp(-gamma * p)) - 1 for p in [0, 1] (gamma = 10 by default)"""
    ps = (0.0, 0.05, 0.2, 0.5, 1.0)
    got = [expect_float(dann_lambda(p), f"dann_lambda({p})") for p in ps]
    want = [_reference_dann_lambda(p) for p in ps]
    if all(close(g, 1 / (1 + math.exp(-10 * p)), 1e-6, 1e-9) for g, p in zip(got, ps)):
        raise AssertionError(f"dann_lambda(0) = {got[0]:.4g}: that is the sigmoid 1 / (1 + exp(-gamma p)), which "
                             "starts at 0.5; DANN rescales it, 2 * sigmoid - 1, so λ starts at 0")
    if all(close(g, w + 1, 1e-6, 1e-9) for g, w in zip(got, want)):
        raise AssertionError(f"dann_lambda(0) = {got[0]:.4g}: the - 1 is missing, λ = 2 / (1 + exp(-gamma p)) - 1")
    if all(close(g, -w, 1e-6, 1e-9) for g, w in zip(got, want)):
        raise AssertionError("the schedule is negative: the exponent is exp(-gamma * p), with a minus sign")
    for p, g, w in zip(ps, got, want):
        assert close(g, w, 1e-6, 1e-9), f"dann_lambda({p}) should be {w:.6f}, not {g:.6g}"


@points(0.5)
def test_q2_starts_at_zero_rises_to_one(dann_lambda):
    """is 0 at p = 0, rises with p, and is just under 1 (0.99991) at p = 1"""
    ps = (0.0, 0.1, 0.3, 0.6, 1.0)
    values = [expect_float(dann_lambda(p), f"dann_lambda({p})") for p in ps]
    assert abs(values[0]) < 1e-12, f"λ should be exactly 0 at p = 0 (no reversal yet), not {values[0]:.3g}"
    assert values == sorted(values) and len(set(values)) == len(values), (
        f"λ should rise with p; at p = {', '.join(map(str, ps))} it gives {', '.join(f'{v:.4g}' for v in values)}")
    assert close(values[-1], math.tanh(5.0), 1e-6, 1e-9), (
        f"at p = 1, λ = 2 / (1 + exp(-10)) - 1 = {math.tanh(5.0):.6f}, not {values[-1]:.6g}")


@points(0.5, visibility=HIDDEN)
def test_q2_uses_gamma(dann_lambda):
    """uses its gamma argument (gamma = 5 and 1): tanh(gamma / 2) at p = 1"""
    for gamma in (5.0, 1.0):
        ps = (0.0, 0.3, 0.6, 1.0)
        values = [expect_float(dann_lambda(p, gamma), f"dann_lambda({p}, {gamma})") for p in ps]
        if close(values[1], _reference_dann_lambda(0.3), 1e-6, 1e-9):
            raise AssertionError(f"dann_lambda(p, gamma={gamma:g}) gives gamma = 10's values: use the gamma argument")
        for p, v in zip(ps, values):
            want = _reference_dann_lambda(p, gamma)
            assert close(v, want, 1e-6, 1e-9), f"dann_lambda({p}, {gamma:g}) should be {want:.6f}, not {v:.6g}"


# --- q3: coral_loss(source, target) -> 0-d tensor -----------------------------------------

def _coral_inputs(seed=0, ns=7, nt=11, d=4):
    source = seeded_randn(ns, d, seed=seed, scale=2.0)
    target = seeded_randn(nt, d, seed=seed + 100, scale=1.0, shift=0.5) @ seeded_randn(d, d, seed=seed + 200)
    return source, target


@points(2)
def test_q3_value(coral_loss):
    """returns ||C_s - C_t||_F² / (4 d²) with unbiased (n - 1) covariances, batches of different sizes"""
    source, target = _coral_inputs()
    try:
        value = coral_loss(source.clone(), target.clone())
    except RuntimeError as exc:
        if "must match the size" in str(exc):
            raise AssertionError(f"coral_loss failed on batches of 7 and 11 rows ({exc}): the covariances should "
                                 "be [d, d]; torch.cov wants one variable per row, so torch.cov(x.T)") from None
        raise
    got = float(expect_loss(value, "coral_loss(source, target)").detach())
    want = float(_reference_coral(source, target))
    d = source.shape[1]
    mistakes = [
        (dict(unbiased=False), "the covariances divide by n (biased); Deep CORAL uses the unbiased estimate, "
                               "dividing by n - 1 (torch.cov's default)"),
        (dict(scale=False), f"the loss is missing the 1 / (4 d²) factor (here 1 / {4 * d * d})"),
        (dict(power=1), "that is the Frobenius norm ||C_s - C_t||_F; CORAL uses its square"),
        (dict(centred=False), "the covariances are not centred: subtract each batch's mean first "
                              "(x.T @ x is a second moment, not a covariance)"),
    ]
    for kwargs, message in mistakes:
        wrong = float(_reference_coral(source, target, **kwargs))
        if close(got, wrong) and not close(wrong, want):
            raise AssertionError(f"got {got:.5g} instead of {want:.5g}: {message}")
    if close(got, float(_reference_coral(source, target, scale=False)) / (4 * d)):
        raise AssertionError(f"got {got:.5g} instead of {want:.5g}: divide by 4 d² = {4 * d * d}, not 4 d")
    assert close(got, want), (f"coral_loss should be {want:.5g} for these batches, not {got:.5g}. Covariances "
                               "of [n, d] batches are d x d matrices (torch.cov(x.T), not torch.cov(x))")


@points(1)
def test_q3_zero_and_invariant_to_the_mean(coral_loss):
    """is 0 for identical batches, and the same when the target batch is shifted by a constant"""
    source, target = _coral_inputs(seed=1, ns=9, nt=6, d=3)
    # Computed before any call, from our own batches (the learner's code gets copies): what the loss of
    # (source, target) may be, the right value or one of the slips test_q3_value names. A loss that is
    # always 0 (or only tells equal batches apart) is 0 for identical batches and shift-invariant too.
    d = source.shape[1]
    plain = float(_reference_coral(source, target, scale=False))
    coral_like = [float(_reference_coral(source, target, **kwargs)) for kwargs in (
        {}, dict(unbiased=False), dict(scale=False), dict(power=1), dict(centred=False))] + [plain / (4 * d)]
    same = float(expect_loss(coral_loss(source.clone(), source.clone()), "coral_loss(x, x)").detach())
    assert abs(same) < 1e-6, f"coral_loss(x, x) should be 0 (same covariance), not {same:.3g}"
    base = float(expect_loss(coral_loss(source.clone(), target.clone()), "coral_loss(source, target)").detach())
    assert any(close(base, v) for v in coral_like), (
        f"coral_loss(source, target) = {base:.4g} for two batches with different covariances, not a CORAL loss "
        f"of them ({coral_like[0]:.4g}); see the first test")
    shifted = float(expect_loss(coral_loss(source.clone(), target + torch.tensor([3.0, -2.0, 5.0])),
                                 "coral_loss(source, target + c)").detach())
    assert close(base, shifted, 1e-3, 1e-6), (
        f"shifting every target feature by a constant changed the loss from {base:.4g} to {shifted:.4g}: "
        "CORAL compares covariances, which do not depend on the mean; centre each batch (x - x.mean(0))")


@points(1, visibility=HIDDEN)
def test_q3_matches_reference_values_and_gradients(coral_loss):
    """matches the reference on random batches (d = 1 to 6), values and gradients for both batches"""
    for seed, (ns, nt, d) in enumerate(((8, 8, 5), (5, 12, 6), (10, 4, 1), (16, 9, 2))):
        source, target = _coral_inputs(seed=10 + seed, ns=ns, nt=nt, d=d)
        _compare_gradients(coral_loss, _reference_coral, (source, target),
                           f"coral_loss on [{ns}, {d}] and [{nt}, {d}] batches", "")


# --- q4: mmd_loss(source, target, multipliers) -> 0-d tensor ------------------------------

def _mmd_inputs(seed=0, ns=6, nt=9, d=3, shift=1.0):
    return seeded_randn(ns, d, seed=seed), seeded_randn(nt, d, seed=seed + 50, scale=1.5, shift=shift)


@points(2)
def test_q4_value(mmd_loss):
    """returns mean K_ss + mean K_tt - 2 mean K_st, K a sum of Gaussian kernels over the multipliers"""
    source, target = _mmd_inputs()
    got = float(expect_loss(mmd_loss(source.clone(), target.clone()), "mmd_loss(source, target)").detach())
    want = float(_reference_mmd(source, target))
    mistakes = [
        (dict(cross=2.0), "the cross term has the wrong sign: MMD² = mean K_ss + mean K_tt - 2 mean K_st"),
        (dict(cross=-1.0), "the cross term is counted once: MMD² = mean K_ss + mean K_tt - 2 mean K_st"),
        (dict(unbiased=True), "that is the unbiased estimate (diagonals left out); use the biased one, "
                              "the plain mean of each block, diagonal included"),
        (dict(squared=False), "the kernel uses distances ||x - y||; the Gaussian kernel uses squared distances"),
        (dict(pairs="all"), "σ² averages over all n² pairs, the n zeros of the diagonal included; average the "
                            "squared distances over the n (n - 1) pairs of distinct points"),
        (dict(combine="mean"), "the kernels are averaged; sum them over the multipliers"),
        (dict(multipliers=(1.0,)), "only one bandwidth: sum the kernels over every multiplier m"),
    ]
    for kwargs, message in mistakes:
        wrong = float(_reference_mmd(source, target, **kwargs))
        if close(got, wrong) and not close(wrong, want):
            raise AssertionError(f"got {got:.5g} instead of {want:.5g}: {message}")
    assert close(got, want), (
        f"mmd_loss should be {want:.5g} for these batches, not {got:.5g}. Recipe: joint = the two batches "
        "together, D = squared distances between all its rows, σ² = mean of D over distinct pairs, "
        "K = Σ_m exp(-D / (m σ²)), then the three block means")


@points(1)
def test_q4_zero_for_identical_batches(mmd_loss):
    """is 0 for identical batches and grows as the target batch moves away"""
    source, _ = _mmd_inputs(seed=1)
    same = float(expect_loss(mmd_loss(source, source.clone()), "mmd_loss(x, x)").detach())
    assert abs(same) < 1e-5, (f"mmd_loss(x, x) should be 0, not {same:.3g}; the biased estimate keeps the "
                              "diagonals (the unbiased one is not 0 here)")
    values = [float(expect_loss(mmd_loss(source, source + shift), "mmd_loss(x, x + c)").detach())
              for shift in (0.3, 1.0, 3.0)]
    assert 0 < values[0] < values[1] < values[2], (
        f"shifting the target by 0.3, 1 and 3 gives MMD² {', '.join(f'{v:.3g}' for v in values)}: it should be "
        "positive and grow as the batches move apart (is the cross term subtracted?)")


@points(1, visibility=HIDDEN)
def test_q4_matches_reference_values_and_gradients(mmd_loss):
    """matches the reference for other multipliers and sizes, values and gradients (σ² detached)"""
    hint = (": compute σ² from detached distances (D.detach()), so the bandwidth follows the data but does "
            "not chase the loss")
    for seed, (ns, nt, d, multipliers) in enumerate(((5, 7, 4, (1.0,)), (8, 8, 2, (0.5, 2.0)),
                                                     (6, 3, 5, MULTIPLIERS))):
        source, target = _mmd_inputs(seed=20 + seed, ns=ns, nt=nt, d=d, shift=0.7)
        _compare_gradients(lambda s, t: mmd_loss(s, t, multipliers),
                           lambda s, t: _reference_mmd(s, t, multipliers), (source, target),
                           f"mmd_loss(source, target, multipliers={multipliers})", hint)


# --- q5: adabn(model, images, batch_size=256) -> model ------------------------------------

class _Noting:
    """Notes its mode at every forward pass in ``modes`` (plain data, which the grader's sandbox
    sends back; a hook's closure could not cross it)."""

    def forward(self, x):
        self.modes = [*getattr(self, "modes", []), self.training]
        return super().forward(x)


class _NotingBatchNorm2d(_Noting, nn.BatchNorm2d):
    pass


class _NotingBatchNorm1d(_Noting, nn.BatchNorm1d):
    pass


class _NotingDropout(_Noting, nn.Dropout):
    pass


def _adabn_net(dropout=True, seed=4, noting=False):
    """A small CNN with BatchNorm2d, Dropout, BatchNorm1d, as if trained: BN weights and statistics set.
    ``noting``: its BN and Dropout layers note their mode at each forward pass (subclasses)."""
    bn2d, bn1d, drop = (_NotingBatchNorm2d, _NotingBatchNorm1d, _NotingDropout) if noting else (
        nn.BatchNorm2d, nn.BatchNorm1d, nn.Dropout)
    with torch.random.fork_rng(devices=[]):  # reproducible, global random state untouched
        torch.manual_seed(seed)
        layers = [nn.Conv2d(3, 4, 3), bn2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(1)]
        if dropout:
            layers.append(drop(0.5))
        layers += [nn.Linear(16, 6), bn1d(6, momentum=0.05), nn.ReLU(), nn.Linear(6, 3)]
        net = nn.Sequential(*layers)
        for m in _bn_layers(net):
            with torch.no_grad():  # trained γ and β are not 1 and 0: reset_parameters() must show
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(50)
    return net.eval()


def _target_images(n=24, seed=7):
    return seeded_randn(n, 3, 8, 8, seed=seed, scale=2.0, shift=1.0)


def _statistics(model):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in _bn_layers(model)]


def _same_statistics(a, b, atol=1e-5):
    return all(torch.allclose(x[0], y[0], atol=atol, rtol=1e-4) and torch.allclose(x[1], y[1], atol=atol, rtol=1e-4)
               for x, y in zip(a, b))


def _run_adabn(adabn, model, images, batch_size):
    returned = adabn(model, images.clone(), batch_size)
    assert returned is model, "adabn should return the model it was given (adapted in place)"
    return _statistics(model)


def _reference_statistics(model, images, batch_size, **kwargs):
    return _statistics(_reference_adabn(copy.deepcopy(model), images, batch_size, **kwargs))


@points(2)
def test_q5_statistics_from_the_target(adabn):
    """replaces every BN layer's running mean and variance by the target's (cumulative average over the batches)"""
    model, images = _adabn_net(), _target_images()
    before = _statistics(model)
    got = _run_adabn(adabn, model, images, 8)
    want = _reference_statistics(_adabn_net(), images, 8)
    layers = ["the BatchNorm2d layer", "the BatchNorm1d layer"]
    unchanged = [name for name, g, b in zip(layers, got, before) if _same_statistics([g], [b], 0)]
    if len(unchanged) == len(layers):
        raise AssertionError("the running statistics did not change: in eval mode BatchNorm uses its running "
                             "statistics and never updates them; put the BN layers in train mode for the pass")
    if unchanged:
        raise AssertionError(f"{unchanged[0]} kept its old statistics: find every BN layer with "
                             "isinstance(m, _BatchNorm) (torch.nn.modules.batchnorm), the base of BatchNorm1d/2d/3d")
    variants = [
        (dict(cumulative=False), "the statistics are an exponential moving average (the layers' momentum), which keeps "
                                 "part of the source's; set m.momentum = None for a cumulative average of the "
                                 "target batches, and restore it afterwards"),
        (dict(reset=False), "the old (source) statistics still count in the average: call "
                            "m.reset_running_stats() first"),
    ]
    for kwargs, message in variants:
        if _same_statistics(got, _reference_statistics(_adabn_net(), images, 8, **kwargs)):
            raise AssertionError(message)
    if _same_statistics(got[:1], want[:1]) and not _same_statistics(got, want):
        raise AssertionError("the BatchNorm1d layer after the Dropout got other statistics: was Dropout on? Only "
                             "the BN layers go into train mode (model.eval(), then m.train() for each BN)")
    if _same_statistics(got, _reference_statistics(_adabn_net(), images, len(images))):
        raise AssertionError("the images went through in one batch: pass them in batches of batch_size (a real "
                             "target set does not fit in memory at once)")
    assert _same_statistics(got, want), (
        "the running statistics differ from those of a pass over the target images in batches of batch_size, "
        "BN layers in train mode with momentum None, after reset_running_stats()")


@points(1)
def test_q5_only_batchnorm_in_train_mode(adabn):
    """runs the images with only the BN layers in train mode (Dropout off) and leaves the model in eval mode"""
    model, images = _adabn_net(noting=True), _target_images()
    _run_adabn(adabn, model, images, 8)
    calls = [(name, m, training) for name, m in model.named_modules() if isinstance(m, _Noting)
             for training in getattr(m, "modes", [])]
    assert calls, "the model never ran on the images: AdaBN's statistics come from a forward pass over them"
    if any(training for _, m, training in calls if isinstance(m, nn.Dropout)):
        raise AssertionError("Dropout was in train mode during the pass (model.train()?): it zeroes random "
                             "features and doubles the rest, so the BN layers after it measure the wrong "
                             "statistics. Call model.eval(), then m.train() for each BN layer only")
    assert all(training for _, m, training in calls if isinstance(m, _BatchNorm)), (
        "a BN layer ran in eval mode: it then normalises with its old statistics and does not update them")
    still = [f"layer {n} ({type(m).__name__})" if n else "the model" for n, m in model.named_modules() if m.training]
    assert not still, (f"after adabn, {still[0]} is still in train mode: finish with model.eval(), ready to "
                       "predict on the target")
    # The modes noted are attributes the learner's code can set without running anything: ask for the first
    # BN layer's statistics from a real pass too (right, or one of the slips test_q5_statistics_from_the_target
    # names; that layer comes before the Dropout and depends on no BN weight).
    got = _statistics(model)[:1]
    passes = [_reference_statistics(_adabn_net(), images, 8, **kwargs)[:1]
              for kwargs in ({}, dict(cumulative=False), dict(reset=False))]
    passes.append(_reference_statistics(_adabn_net(), images, len(images))[:1])
    assert any(_same_statistics(got, want) for want in passes), (
        "the BatchNorm2d layer's running statistics are not those of a pass over the target images: the model "
        "never ran on them with that layer in train mode")


@points(1, visibility=HIDDEN)
def test_q5_weights_untouched_momentum_restored(adabn):
    """changes no weight, restores each BN's momentum, and matches the reference for other batch sizes"""
    for batch_size, dropout, n in ((10, True, 24), (64, False, 20), (6, True, 20)):
        model, images = _adabn_net(dropout=dropout, seed=9), _target_images(n, seed=n)
        model.train()
        params = dict(model.named_parameters())
        weights = {k: p.detach().clone() for k, p in params.items()}
        got = _run_adabn(adabn, model, images, batch_size)
        changed = [k for k, p in model.named_parameters() if params.get(k) is not p or not torch.equal(p, weights[k])]
        assert not changed, (f"adabn changed the weights ({changed[0]}); AdaBN changes only the running statistics. "
                             "(reset_parameters() also resets BN's γ and β; reset_running_stats() does not)")
        assert all(p.requires_grad and p.grad is None for p in params.values()), (
            "adabn changed requires_grad or computed gradients; it needs neither (run it under torch.no_grad())")
        momenta = [m.momentum for m in _bn_layers(model)]
        assert momenta == [0.1, 0.05], (f"the BN layers' momentum is {momenta} after adabn, it was [0.1, 0.05]: "
                                        "restore it, or later training keeps a cumulative average")
        assert not any(m.training for m in model.modules()), "adabn should leave the model in eval mode"
        want = _reference_statistics(_adabn_net(dropout=dropout, seed=9), images, batch_size)
        assert _same_statistics(got, want), (
            f"with {n} images in batches of {batch_size} the running statistics differ from those of a pass "
            "in batches of batch_size (the last one smaller), BN layers only in train mode, momentum None")


# --- q6: pseudo_labels(logits, threshold=0.9) -> (labels, mask) ---------------------------

def _pseudo(pseudo_labels, logits, threshold):
    labels, mask = expect_tuple(pseudo_labels(logits, threshold), 2, f"pseudo_labels(logits, {threshold})")
    labels, mask = expect_tensor(labels, "the labels"), expect_tensor(mask, "the mask")
    expect_shape(labels, (len(logits),), "the labels")
    expect_shape(mask, (len(logits),), "the mask")
    assert mask.dtype == torch.bool, f"the mask should be a bool tensor (usable as batch[mask]), not {mask.dtype}"
    if labels.is_floating_point():
        raise AssertionError("the labels are floats (the probabilities?); return the predicted classes, "
                             "argmax over dim 1, as torch.long")
    return labels, mask


@points(1)
def test_q6_confident_argmax(pseudo_labels):
    """labels = argmax over classes; mask = the top softmax probability is at least the threshold"""
    logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.5, 0.0], [0.0, 0.0, 8.0], [2.5, 3.0, 2.9]])
    given = logits.clone()  # what the learner's code gets; `logits` stays ours
    labels, mask = _pseudo(pseudo_labels, given, 0.9)
    assert labels.tolist() == [0, 1, 2, 1], (
        f"the labels should be the argmax of each row, [0, 1, 2, 1], not {labels.tolist()}")
    if mask.tolist() == [True, True, True, True]:
        raise AssertionError("every row counts as confident: the threshold applies to softmax probabilities "
                             "(in [0, 1]), not to raw logits")
    if mask.tolist() == [False, False, True, False]:
        raise AssertionError("the softmax went over the batch (dim 0); take it over the classes (dim 1)")
    assert mask.tolist() == [True, False, True, False], (
        f"rows 0 and 2 have a top probability ≥ 0.9 (0.965 and 0.999), rows 1 and 3 do not; the mask is "
        f"{mask.tolist()}")
    assert torch.equal(given, logits), "pseudo_labels changed the logits it was given"


@points(0.5)
def test_q6_any_batch_and_classes(pseudo_labels):
    """works for any batch size and number of classes: [1, 2] and [7, 10] logits"""
    for b, c, seed in ((1, 2, 11), (7, 10, 12)):
        logits = seeded_randn(b, c, seed=seed, scale=4.0)
        want_labels, want_mask = _reference_pseudo_labels(logits, 0.6)  # before the call, from our copy
        labels, mask = _pseudo(pseudo_labels, logits.clone(), 0.6)
        assert torch.equal(labels.long(), want_labels) and torch.equal(mask, want_mask), (
            f"for [{b}, {c}] logits the labels or the mask differ from argmax / softmax >= threshold over dim 1")


@points(0.5, visibility=HIDDEN)
def test_q6_matches_reference(pseudo_labels):
    """matches the reference on random logits for thresholds 0, 0.5, 0.8 and 1.01"""
    logits = seeded_randn(40, 5, seed=8, scale=3.0)
    for threshold in (0.0, 0.5, 0.8, 1.01):
        want_labels, want_mask = _reference_pseudo_labels(logits, threshold)  # from our copy, never passed
        labels, mask = _pseudo(pseudo_labels, logits.clone(), threshold)
        expect_close(labels.long(), want_labels, f"the labels (threshold {threshold})")
        assert torch.equal(mask, want_mask), (
            f"with threshold {threshold} the mask marks {int(mask.sum())} rows, the reference "
            f"{int(want_mask.sum())} (top softmax probability >= threshold)")
