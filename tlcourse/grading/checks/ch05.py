"""Checks for chapter 05 (multi-task learning): uncertainty weighting, PCGrad's projection, a
two-head network with one shared backbone, and the cosine between two tasks' gradients.

Every question is a small function on tiny tensors or a tiny network, so a question grades in
milliseconds. Tests marked ``after_due_date`` are not run by the in-notebook ``check()``;
``tlcourse grade`` runs them and Gradescope shows them after the deadline. They compare the
learner's function with the references below on random inputs: values, and gradients where the
result is a loss (q1). PCGrad's direction (q2) and the cosine (q4) are not losses (nothing is
backpropagated through them in training), so only their values are compared.

The references (``_reference_*``) are written out here rather than imported from
:mod:`tlcourse.multitask`: a checks module must stand alone (e.g. in a hidden-tests folder),
and a submission could rebind the library's functions, which the sandbox does not watch.
``tests/test_grading_ch05.py`` proves that each reference equals its counterpart in
:mod:`tlcourse.multitask` (``UncertaintyWeighting``, ``pcgrad_combine`` with its random order
made ascending, ``MultiTaskNet``, ``gradient_cosine``).

Decisions:

- q1 takes the losses as a list of 0-d tensors, ``log_vars`` as a tensor ``[T]`` (s = log σ²)
  and ``kinds`` as a list of ``"classification"`` / ``"regression"``; it returns the sum over
  the tasks, as ``UncertaintyWeighting`` does.
- q2 returns the *sum* of the projected gradients, ``[P]`` (``pcgrad_combine``'s result), and
  goes through the other tasks in a fixed order, ``j = 0, 1, …, T − 1`` (skipping ``i``), where
  the paper and the library draw a random order. As in the paper's Algorithm 1 and the library,
  the conflict test and the projection use the running ``g_i^PC`` and the *original* ``g_j``.
- q3 is a class, ``TwoHeadNet(backbone, feature_dim, num_classes=10)``.
- q4 returns a number (a Python float or a 0-d tensor) and leaves ``.grad`` and the graph as
  they were, so that training can still backpropagate the same losses.

Format: :mod:`tlcourse.grading.spec`.
"""

import math

import torch
from torch import nn

from tlcourse.grading.spec import (close, expect_close, expect_float, expect_loss, expect_shape, expect_tensor,
                                   first_match, points, seeded_randn)

QUESTIONS = {
    "q1": {"title": "uncertainty weighting", "functions": ["uncertainty_weighted_loss"]},
    "q2": {"title": "PCGrad's projection", "functions": ["pcgrad_project"]},
    "q3": {"title": "hard parameter sharing", "functions": ["TwoHeadNet"]},
    "q4": {"title": "how much two tasks' gradients agree", "functions": ["gradient_cosine"]},
}

HIDDEN = "after_due_date"
CLS, REG = "classification", "regression"


# --- references (equal to tlcourse.multitask's; tests/test_grading_ch05.py checks it) ------

def _reference_uncertainty(losses, log_vars, kinds, *, sign=-1.0, k=1.0, c=(1.0, 0.5), reg=0.5, mean=False):
    """``Σ_t c_t exp(−s_t) L_t + ½ s_t`` (c = 1 classification, ½ regression); the keywords make
    the mistakes the tests name (``sign=+1``: exp(+s); ``k=2, reg=1``: s read as log σ; ...)."""
    weight = {CLS: c[0], REG: c[1]}
    terms = [weight[kind] * torch.exp(sign * k * s) * loss + reg * s for loss, s, kind in zip(losses, log_vars, kinds)]
    total = torch.stack(terms).sum()
    return total / len(terms) if mean else total


def _reference_pcgrad(grads, *, descending=False, against_projected=False, dot_with_original=False,
                      when="negative", power=2, sign=1.0, reduce="sum"):
    """PCGrad (Yu et al. 2020, Algorithm 1) with the other tasks in ascending order, summed;
    the keywords make the mistakes the tests name. Computed in float64."""
    g = grads.detach().double()
    out = g.clone()
    T = len(g)
    for i in range(T):
        others = [j for j in range(T) if j != i]
        for j in reversed(others) if descending else others:
            g_j = out[j] if against_projected else g[j]
            dot = (g[i] if dot_with_original else out[i]) @ g_j
            conflict = {"negative": dot < 0, "always": dot != 0, "positive": dot > 0}[when]
            norm = g_j.norm() ** power
            if conflict and norm > 0:
                out[i] = out[i] - sign * dot / norm * g_j
    result = out.sum(0) if reduce == "sum" else out.mean(0) if reduce == "mean" else out
    return result.to(grads.dtype)


class _ReferenceTwoHeadNet(nn.Module):
    """Hard parameter sharing (Caruana 1997): one backbone, a linear head per task."""

    def __init__(self, backbone, feature_dim, num_classes=10):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, num_classes) for name in ("left", "right")})

    def forward(self, x):
        features = self.backbone(x)
        return {name: head(features) for name, head in self.heads.items()}


def _flat_gradient(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _reference_cosine(loss_a, loss_b, shared_params):
    params = list(shared_params)
    a, b = _flat_gradient(loss_a, params), _flat_gradient(loss_b, params)
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-20))


# --- helpers ------------------------------------------------------------------------------

def _leaf(x):
    return x.detach().clone().requires_grad_(True)


# --- q1: uncertainty_weighted_loss(losses, log_vars, kinds) -> 0-d tensor -------------------

def _uw_inputs():
    losses = torch.tensor([0.8, 2.3, 1.4, 0.35])
    log_vars = torch.tensor([0.3, -0.5, 0.9, -1.2])
    return losses, log_vars, [CLS, REG, CLS, REG]


def _uw_value(fn, losses, log_vars, kinds):
    """The learner's loss for leaf copies of the inputs: ``(loss, loss leaves, log_vars leaf, what)``."""
    leaves, s = [_leaf(v) for v in losses], _leaf(log_vars)
    what = f"uncertainty_weighted_loss for {len(kinds)} task(s), kinds {list(kinds)}"
    loss = expect_loss(fn(list(leaves), s, list(kinds)), what)
    for leaf in [*leaves, s]:  # a .grad the learner's code wrote is no gradient: the tests read their backward()'s
        leaf.grad = None
    return loss, leaves, s, what


def _uw_mistakes(losses, log_vars, kinds):
    def wrong(**kw):
        return float(_reference_uncertainty(losses, log_vars, kinds, **kw))

    return [
        (wrong(sign=1.0), "each loss was multiplied by exp(+s); the weight is 1/σ² = exp(−s), so a task the model "
                          "finds noisy (large s) is weighted *down*"),
        (wrong(reg=0.0), "the regulariser ½·s is missing: without it the loss falls as every s grows, and training "
                         "drives every weight exp(−s) to 0 (the trivial solution); add + ½·s per task"),
        (wrong(c=(1.0, 1.0), reg=1.0), "that is exp(−s)·L + s for every task, the authors' Keras example (twice the "
                                       "regression term); here classification is exp(−s)·L + ½·s and regression "
                                       "½·exp(−s)·L + ½·s"),
        (wrong(k=2.0, reg=1.0), "log_vars was read as log σ (weights exp(−2s), regulariser s); it holds s = log σ², "
                                "so 1/σ² = exp(−s) and log σ = ½·s"),
        (wrong(reg=1.0), "the regulariser is s per task; the paper's log σ is ½·log σ² = ½·s"),
        (wrong(c=(0.5, 1.0)), "the kinds are swapped: regression gets ½·exp(−s)·L (a Gaussian likelihood, "
                              "1/(2σ²)), classification exp(−s)·L (1/σ²)"),
        (wrong(c=(1.0, 1.0)), "the regression terms lack the ½: a regression loss is weighted by 1/(2σ²) = "
                              "½·exp(−s), a classification loss by 1/σ² = exp(−s)"),
        (wrong(c=(0.5, 0.5)), "the classification terms have a ½ too: a classification loss is weighted by 1/σ² = "
                              "exp(−s), only a regression loss by 1/(2σ²)"),
        (wrong(mean=True), "the tasks' terms were averaged; sum them, as the paper's objective does"),
    ]


@points(2.5)
def test_q1_value(uncertainty_weighted_loss):
    """Σ_t exp(−s_t)·L_t + ½·s_t for classification tasks, ½·exp(−s_t)·L_t + ½·s_t for regression (s = log σ²)"""
    losses, log_vars, kinds = _uw_inputs()
    value, _, _, what = _uw_value(uncertainty_weighted_loss, losses, log_vars, kinds)
    got, want = float(value.detach()), float(_reference_uncertainty(losses, log_vars, kinds))
    message = first_match(got, want, _uw_mistakes(losses, log_vars, kinds))
    if message:
        raise AssertionError(f"{what} = {got:.5g}, not {want:.5g}: {message}")
    assert close(got, want), (f"{what} should be {want:.5g}, not {got:.5g}: c_t·exp(−s_t)·L_t + ½·s_t summed over "
                              "the tasks, c = 1 for classification and ½ for regression")
    zero, _, _, what = _uw_value(uncertainty_weighted_loss, losses, torch.zeros(4), kinds)
    want = float(_reference_uncertainty(losses, torch.zeros(4), kinds))
    assert close(float(zero.detach()), want), (
        f"{what} with every s = 0 (σ² = 1) should be Σ c_t·L_t = {want:.5g} (c = 1 classification, ½ regression), "
        f"not {float(zero.detach()):.5g}")


@points(2)
def test_q1_gradients_and_the_optimum(uncertainty_weighted_loss):
    """gradients reach the losses and log_vars (learned), and the loss is smallest at s = log(2·c·L): the weights cannot collapse to 0"""
    losses, log_vars, kinds = _uw_inputs()
    before = log_vars.clone()
    loss, leaves, s, what = _uw_value(uncertainty_weighted_loss, losses, log_vars, kinds)
    assert loss.requires_grad, f"{what} is cut from the autograd graph (no_grad, .detach(), .item()?)"
    loss.backward()
    assert s.grad is not None and bool(s.grad.any()), (
        "no gradient reached log_vars: the s_t are parameters, learned with the network (don't detach them or "
        "turn them into numbers)")
    assert all(v.grad is not None and bool(v.grad.any()) for v in leaves), (
        "no gradient reached a task's loss: the weighted loss must train the network (don't detach the losses)")
    assert torch.equal(log_vars, before), "log_vars were changed in place; the caller's tensor must stay as it was"
    c = torch.tensor([1.0 if kind == CLS else 0.5 for kind in kinds])
    expect_close(torch.stack([v.grad for v in leaves]), c * torch.exp(-log_vars),
                 f"the gradient of {what} with respect to each loss (its weight c·exp(−s))", atol=1e-6)
    optimum = torch.log(2 * c * losses)
    loss, _, s, _ = _uw_value(uncertainty_weighted_loss, losses, optimum, kinds)
    loss.backward()
    if torch.allclose(s.grad, -c * torch.exp(-optimum) * losses, atol=1e-5):
        raise AssertionError("the gradient with respect to s is −c·exp(−s)·L, negative for every s: gradient "
                             "descent raises every s without end and every weight exp(−s) falls to 0. The + ½·s "
                             "term stops that; add it")
    assert torch.allclose(s.grad, torch.zeros(4), atol=1e-5), (
        f"at s = log(2·c·L) the loss should be at its minimum over s (gradient 0), but the gradient with respect "
        f"to log_vars is {[round(x, 4) for x in s.grad.tolist()]}")


@points(1.5, visibility=HIDDEN)
def test_q1_matches_reference_values_and_gradients(uncertainty_weighted_loss):
    """matches the reference for 1 to 5 tasks of either kind, values and gradients for the losses and log_vars"""
    g = torch.Generator().manual_seed(5)
    for T in (1, 2, 3, 5):
        for trial in range(2):
            kinds = [(CLS, REG)[int(b)] for b in torch.randint(0, 2, (T,), generator=g)]
            losses = torch.rand(T, generator=g) * 3 + 0.05
            log_vars = torch.randn(T, generator=g) * 1.5
            loss, leaves, s, what = _uw_value(uncertainty_weighted_loss, losses, log_vars, kinds)
            ref_leaves, ref_s = [_leaf(v) for v in losses], _leaf(log_vars)
            want = _reference_uncertainty(ref_leaves, ref_s, kinds)
            expect_close(loss, want, what, atol=1e-5)
            loss.backward()
            want.backward()
            assert s.grad is not None, f"{what}: no gradient reached log_vars"
            expect_close(s.grad, ref_s.grad, f"the gradient of {what} with respect to log_vars", atol=1e-5)
            for mine, ref in zip(leaves, ref_leaves):
                assert mine.grad is not None, f"{what}: no gradient reached a task's loss"
                expect_close(mine.grad, ref.grad, f"the gradient of {what} with respect to the losses", atol=1e-5)


# --- q2: pcgrad_project(grads [T, P]) -> [P] ----------------------------------------------

def _pcgrad(fn, grads, what):
    given = grads.clone()
    result = expect_tensor(fn(given), what)
    assert torch.equal(given, grads), (
        "pcgrad_project changed the gradients it was given (an in-place update such as grads[i] -= ...?): "
        "work on a copy, grads.clone(); the projections must use the original g_j")
    if tuple(result.shape) == tuple(grads.shape) and grads.shape[0] > 1:
        raise AssertionError(f"{what} returned the projected gradients {list(grads.shape)}; return their sum "
                             f"[{grads.shape[1]}], the update direction PCGrad applies")
    expect_shape(result, grads.shape[1:], what)
    return result


def _pcgrad_mistakes(grads):
    def wrong(**kw):
        return _reference_pcgrad(grads, **kw)

    return [
        (grads.sum(0), "that is the plain sum of the gradients: no conflicting pair was projected. Project g_i^PC "
                       "when g_i^PC · g_j < 0 (a conflict; not > 0)"),
        (wrong(when="always"), "a pair that does not conflict (g_i · g_j ≥ 0) was projected too; PCGrad projects only "
                               "when g_i · g_j < 0 and leaves agreeing gradients as they are"),
        (wrong(when="positive"), "the condition is reversed: project when g_i · g_j < 0 (a conflict), not > 0"),
        (wrong(against_projected=True), "g_i was projected against a g_j that had been projected already; project "
                                        "against the *original* g_j (keep an untouched copy, or build the results "
                                        "in a new tensor)"),
        (wrong(power=1), "the projection divides by ‖g_j‖; the component of g_i along g_j is (g_i · g_j / ‖g_j‖²) g_j"),
        (wrong(sign=-1.0), "the component along g_j was added instead of removed: g_i ← g_i − (g_i · g_j / ‖g_j‖²) g_j"),
        (wrong(descending=True), "the other tasks were taken in descending order; go through j = 0, 1, …, T − 1 "
                                 "(skipping i), the fixed order the question asks for"),
        (wrong(dot_with_original=True), "each inner product used the original g_i; Algorithm 1 tests and projects "
                                        "the running g_i^PC, already projected against the tasks before j"),
        (wrong(reduce="mean"), "the projected gradients were averaged; PCGrad sums them"),
    ]


def _expect_pcgrad(fn, grads, what):
    got = _pcgrad(fn, grads, what)
    want = _reference_pcgrad(grads)
    if torch.allclose(got, want, atol=1e-5):
        return got
    for wrong, message in _pcgrad_mistakes(grads):
        if torch.allclose(got, wrong.to(got.dtype), atol=1e-5) and not torch.allclose(wrong, want, atol=1e-5):
            raise AssertionError(f"{what} = {[round(x, 4) for x in got.tolist()]}, not "
                                 f"{[round(x, 4) for x in want.tolist()]}: {message}")
    expect_close(got, want, what, atol=1e-5)
    return got


@points(2)
def test_q2_two_tasks(pcgrad_project):
    """two conflicting gradients are each projected onto the other's normal plane and summed; agreeing ones are just summed"""
    conflict = torch.tensor([[3.0, 1.0, -1.0], [-2.0, 1.0, 2.0]])
    got = _expect_pcgrad(pcgrad_project, conflict, "pcgrad_project on two gradients with g_1 · g_2 = −7 < 0")
    assert bool((conflict @ got >= -1e-5).all()), "for two tasks the result must not conflict with either gradient"
    agree = torch.tensor([[1.0, 2.0, 0.0], [2.0, 0.5, -1.0]])
    _expect_pcgrad(pcgrad_project, agree, "pcgrad_project on two gradients with g_1 · g_2 = 3 > 0")


@points(1.5)
def test_q2_three_tasks_in_a_fixed_order(pcgrad_project):
    """three tasks: g_i^PC is projected in turn against the original g_j, j = 0, 1, 2 (skipping i), when g_i^PC · g_j < 0"""
    grads = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.0, 0.0], [-1.0, -2.0, 1.0]])
    _expect_pcgrad(pcgrad_project, grads, "pcgrad_project on three pairwise conflicting gradients")
    mixed = torch.tensor([[1.0, 1.0, 0.0, 0.5], [-1.0, 0.5, 1.0, 0.0], [0.5, -1.0, 0.0, 1.0]])
    _expect_pcgrad(pcgrad_project, mixed, "pcgrad_project on three gradients, one pair agreeing")


@points(1)
def test_q2_shape_dtype_input_untouched(pcgrad_project):
    """returns a new [P] tensor of the input's dtype and leaves the input unchanged, for float32 and float64"""
    for dtype in (torch.float32, torch.float64):
        grads = torch.tensor([[1.0, -2.0, 0.5, 0.0, 1.0], [-1.0, 1.0, 1.0, 2.0, 0.0]], dtype=dtype)
        what = f"pcgrad_project on a {dtype} [2, 5] tensor"
        got = _expect_pcgrad(pcgrad_project, grads, what)
        assert got.dtype == dtype, f"{what} returned {got.dtype}; keep the input's dtype"
    single = torch.tensor([[0.5, -1.0, 2.0]])
    expect_close(_pcgrad(pcgrad_project, single, "pcgrad_project on one task"), single[0],
                 "pcgrad_project on one task (no other task: its gradient as it is)")


@points(1.5, visibility=HIDDEN)
def test_q2_matches_reference(pcgrad_project):
    """matches the reference for 2 to 5 tasks and 1 to 50 parameters, and a task with a zero gradient gives no NaN"""
    g = torch.Generator().manual_seed(7)
    for T, P in ((2, 1), (3, 7), (4, 50), (5, 12), (5, 3)):
        grads = torch.randn(T, P, generator=g) + torch.randn(1, P, generator=g) * 0.3
        _expect_pcgrad(pcgrad_project, grads, f"pcgrad_project on random [{T}, {P}] gradients")
    grads = torch.tensor([[1.0, -1.0, 0.5], [0.0, 0.0, 0.0], [-1.0, 0.5, 1.0]])
    got = _pcgrad(pcgrad_project, grads, "pcgrad_project with a task whose gradient is zero")
    assert bool(torch.isfinite(got).all()), (
        "a task whose gradient is zero gave NaN or inf (0 / ‖0‖²): a zero g_j conflicts with nothing, so skip it "
        "(project only where g_i · g_j < 0, or clamp the denominator)")
    expect_close(got, _reference_pcgrad(grads), "pcgrad_project with a task whose gradient is zero", atol=1e-5)


# --- q3: TwoHeadNet(backbone, feature_dim, num_classes=10) ----------------------------------

class _Backbone(nn.Module):
    """A tiny backbone ``[B, 1, 8, 8]`` -> ``[B, feature_dim]`` that counts its forward passes."""

    def __init__(self, feature_dim=6, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # reproducible weights, global RNG untouched
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4, feature_dim)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _two_heads(TwoHeadNet, feature_dim=6, num_classes=None, seed=0):
    backbone = _Backbone(feature_dim, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = TwoHeadNet(backbone, feature_dim) if num_classes is None else \
            TwoHeadNet(backbone, feature_dim, num_classes=num_classes)
    assert isinstance(model, nn.Module), f"TwoHeadNet(...) should be an nn.Module, not a {type(model).__name__}"
    return backbone, model


def _outputs(model, x, classes=10):
    out = model(x)
    assert isinstance(out, dict), f"the model should return a dict {{'left': ..., 'right': ...}}, not a {type(out).__name__}"
    assert set(out) == {"left", "right"}, f"the model's dict should have the keys 'left' and 'right', not {sorted(out)}"
    for name in ("left", "right"):
        expect_shape(expect_tensor(out[name], f"out[{name!r}]"), (len(x), classes), f"out[{name!r}]")
    return out


def _images(n=5, seed=3):
    return seeded_randn(n, 1, 8, 8, seed=seed)


def _head_parameters(model, backbone):
    shared = {id(p) for p in backbone.parameters()}
    return [p for p in model.parameters() if id(p) not in shared]


@points(1)
def test_q3_outputs(TwoHeadNet):
    """returns {'left': [B, 10], 'right': [B, 10]}, runs the backbone once per forward pass, and the two tasks' logits differ"""
    backbone, model = _two_heads(TwoHeadNet)
    bias = backbone.fc.bias  # ours, whatever the learner's code makes of backbone.fc
    x = _images()
    out = _outputs(model, x)
    assert backbone.calls, ("the backbone you were given never ran: the model uses a copy of it (copy.deepcopy?) or "
                            "another network. Keep the backbone you are given, self.backbone = backbone")
    assert backbone.calls == 1, (
        f"one forward pass of the model ran the backbone {backbone.calls} times: compute the features once and give "
        "them to both heads (that is the saving of a shared backbone)")
    assert not torch.allclose(out["left"], out["right"]), (
        "out['left'] equals out['right']: one head serves both tasks. Each task needs its own head (its own "
        "nn.Linear); only the backbone is shared")
    # The counter is the learner's to write (the backbone runs where the learner's code runs): the outputs
    # themselves must come from the backbone it was given, as it is now.
    model.eval()
    again = _outputs(model, x)
    assert all(torch.allclose(again[k], out[k], atol=1e-6) for k in out), (
        "two forward passes on the same images gave different logits: each task's logits are its head applied to "
        "the backbone's features, not random numbers")
    with torch.no_grad():
        bias.add_(1.0)
    moved = _outputs(model, x)
    assert not any(torch.allclose(moved[k], out[k], atol=1e-6) for k in out), (
        "the logits did not change when the backbone you were given changed: the model computes with a copy of it "
        "(copy.deepcopy?) or ignores its features. Keep the backbone you are given, self.backbone = backbone, and "
        "give its features to both heads")


@points(1)
def test_q3_one_shared_backbone_two_heads(TwoHeadNet):
    """holds the backbone it is given (the same object, registered) and two separate linear heads, nothing else"""
    backbone, model = _two_heads(TwoHeadNet)
    mine = {id(p) for p in model.parameters()}
    n_backbone = sum(p.numel() for p in backbone.parameters())
    n_head = 6 * 10 + 10
    total = sum(p.numel() for p in model.parameters())
    if not all(id(p) in mine for p in backbone.parameters()):
        if total >= n_backbone + 2 * n_head:
            raise AssertionError("the model's parameters do not include the backbone it was given: it trains a copy "
                                 "(copy.deepcopy?). Keep the backbone you are given, self.backbone = backbone")
        raise AssertionError("the backbone is not registered in the model (kept in a list or dict?): its parameters "
                             "are missing from model.parameters(), so no optimiser would train it and .eval() would "
                             "not reach it. Assign it as an attribute, self.backbone = backbone")
    if total == 2 * n_backbone + 2 * n_head:
        raise AssertionError("each head has its own copy of the backbone: that is two single-task networks. Hard "
                             "parameter sharing (Caruana 1997) gives both heads the features of the one backbone")
    if total == n_backbone + n_head:
        raise AssertionError("the model has one head's worth of parameters: both tasks share a head. Give each task "
                             "its own nn.Linear(feature_dim, num_classes)")
    assert total == n_backbone + 2 * n_head, (
        f"the model has {total} parameters; one backbone ({n_backbone}) and two linear heads of {n_head} make "
        f"{n_backbone + 2 * n_head}")
    model.eval()
    assert not backbone.training, "model.eval() left the backbone in train mode: is it registered as a submodule?"


@points(1.5)
def test_q3_a_task_loss_reaches_the_backbone_and_its_own_head_only(TwoHeadNet):
    """the left task's loss sends gradients to the backbone and the left head only, the right task's to the backbone and the right head"""
    backbone, model = _two_heads(TwoHeadNet)
    assert all(p.requires_grad for p in backbone.parameters()), (
        "the backbone's parameters were frozen (requires_grad = False): in multi-task learning the shared backbone is "
        "trained by every task's loss; leave it trainable")
    heads = _head_parameters(model, backbone)
    reached = {}
    for name in ("left", "right"):
        out = _outputs(model, _images())
        loss = out[name].pow(2).mean()
        assert loss.requires_grad, f"out[{name!r}] is cut from the autograd graph (no_grad, .detach()?)"
        grads = torch.autograd.grad(loss, list(backbone.parameters()) + heads, allow_unused=True)
        n = len(list(backbone.parameters()))
        assert all(gr is not None and bool(gr.any()) for gr in grads[:n]), (
            f"the {name} task's loss sends no gradient to the backbone: its head must read the backbone's features "
            "without detaching them (or the backbone was frozen): the shared backbone learns from every task")
        reached[name] = {i for i, gr in enumerate(grads[n:]) if gr is not None and bool(gr.any())}
        assert reached[name], f"the {name} task's loss sends no gradient to any head"
    assert not reached["left"] & reached["right"], (
        "a head parameter receives gradients from both tasks: the heads are not separate. Only the backbone is shared")


@points(0.5, visibility=HIDDEN)
def test_q3_other_sizes_and_modes(TwoHeadNet):
    """works with another feature_dim and num_classes, and the heads are linear layers of the features"""
    twin = _Backbone(7, seed=4)  # the checker's own: the learner's code may change the backbone it was given
    backbone, model = _two_heads(TwoHeadNet, feature_dim=7, num_classes=3, seed=4)
    x = _images(4, seed=9)
    out = _outputs(model, x, classes=3)
    with torch.no_grad():
        features = twin(x)
        heads = [m for m in model.modules() if isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (7, 3)]
        assert len(heads) == 2, (f"TwoHeadNet(backbone, 7, num_classes=3) should hold two nn.Linear(7, 3) heads, "
                                 f"not {len(heads)}: use feature_dim and num_classes")
        for name in ("left", "right"):
            assert any(torch.allclose(out[name], head(features), atol=1e-6) for head in heads), (
                f"out[{name!r}] is not one of the heads applied to the backbone's features")
    model.train()
    assert backbone.training, "model.train() did not reach the backbone: register it as a submodule"


# --- q4: gradient_cosine(loss_a, loss_b, shared_params) -> float --------------------------

def _shared_net(seed=0, n=6, d=4, h=5):
    """Inputs, shared weights and two heads (leaves); each call makes a fresh graph."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w, b = torch.randn(h, d, generator=g).requires_grad_(), torch.randn(h, generator=g).requires_grad_()
    head_a, head_b = torch.randn(h, generator=g).requires_grad_(), torch.randn(h, generator=g).requires_grad_()
    ya, yb = torch.randn(n, generator=g), torch.randn(n, generator=g)

    def losses():
        features = torch.tanh(x @ w.T + b)
        return (features @ head_a - ya).pow(2).mean(), (features @ head_b - yb).pow(2).mean()

    return losses, [w, b], [head_a, head_b]


def _cosine(fn, loss_a, loss_b, params, what):
    try:
        value = fn(loss_a, loss_b, list(params))
    except RuntimeError as exc:
        text = str(exc)
        if "second time" in text:
            raise AssertionError(f"{what} raised RuntimeError (backward through the graph a second time): the two "
                                 "losses share the backbone's graph; pass retain_graph=True to torch.autograd.grad "
                                 "so that the second gradient (and training's backward) can still use it") from None
        if "not have been used" in text:
            raise AssertionError(f"{what} raised RuntimeError (a parameter was not used by a loss): pass "
                                 "allow_unused=True and count a missing gradient as zeros") from None
        raise
    return expect_float(value, what)


def _cosine_mistakes(loss_fn, params):
    loss_a, loss_b = loss_fn()
    flat = [(_flat_gradient(loss_a, [p]), _flat_gradient(loss_b, [p])) for p in params]
    a, b = torch.cat([x for x, _ in flat]), torch.cat([y for _, y in flat])
    cos = float(a @ b / (a.norm() * b.norm()))
    per_param = sum(float(x @ y / (x.norm() * y.norm())) for x, y in flat) / len(flat)
    return [
        (float(a @ b), "that is the inner product of the two gradients; divide it by both norms, "
                       "g_a · g_b / (‖g_a‖ ‖g_b‖)"),
        (float(a @ b / a.norm()), "divided by ‖g_a‖ only; divide by both norms"),
        (float(a @ b / b.norm()), "divided by ‖g_b‖ only; divide by both norms"),
        (float(a @ b / a.norm() ** 2), "divided by ‖g_a‖²; the cosine divides by ‖g_a‖ ‖g_b‖"),
        (per_param, "the cosines of the parameters one by one were averaged; concatenate every shared parameter's "
                    "gradient into one vector per task and take one cosine"),
        (float(flat[0][0] @ flat[0][1] / (flat[0][0].norm() * flat[0][1].norm())),
         "only the first parameter's gradient was used; concatenate all the shared parameters' gradients"),
        (math.acos(max(-1.0, min(1.0, cos))), "that is the angle (acos); return its cosine"),
        (1 - cos, "that is the cosine distance 1 − cos; return the cosine"),
    ]


@points(1.5)
def test_q4_value(gradient_cosine):
    """the cosine between the two losses' gradients on all the shared parameters, flattened and concatenated: 1 for the same loss, −1 for its negative"""
    for seed in (0, 1):
        loss_fn, shared, _ = _shared_net(seed)
        want = _reference_cosine(*loss_fn(), shared)
        mistakes = _cosine_mistakes(loss_fn, shared)  # before the call too
        what = f"gradient_cosine on two regression losses over shared [5, 4] weights and [5] bias (case {seed + 1})"
        got = _cosine(gradient_cosine, *loss_fn(), shared, what)
        message = first_match(got, want, mistakes)
        if message:
            raise AssertionError(f"{what} = {got:.5g}, not {want:.5g}: {message}")
        assert close(got, want, atol=1e-6), f"{what} should be {want:.5g}, not {got:.5g}"
    loss_fn, shared, _ = _shared_net(2)
    loss_a, _ = loss_fn()
    same = _cosine(gradient_cosine, loss_a, 3 * loss_a, shared, "gradient_cosine(loss, 3 * loss, ...)")
    assert close(same, 1.0, atol=1e-5), f"gradient_cosine(loss, 3 * loss) should be 1 (the same direction), not {same:.5g}"
    loss_a, _ = loss_fn()
    opposite = _cosine(gradient_cosine, loss_a, -loss_a, shared, "gradient_cosine(loss, −loss, ...)")
    assert close(opposite, -1.0, atol=1e-5), f"gradient_cosine(loss, −loss) should be −1, not {opposite:.5g}"


@points(1.5)
def test_q4_leaves_grad_and_graph_alone(gradient_cosine):
    """writes nothing into .grad (torch.autograd.grad, not backward) and keeps the graph: training can still backpropagate both losses"""
    loss_fn, shared, heads = _shared_net(3)
    want = _reference_cosine(*loss_fn(), shared)  # torch.autograd.grad: no .grad written
    loss_a, loss_b = loss_fn()
    value = _cosine(gradient_cosine, loss_a, loss_b, shared, "gradient_cosine(loss_a, loss_b, shared_params)")
    assert -1 - 1e-6 <= value <= 1 + 1e-6, f"a cosine lies in [−1, 1], not {value:.5g}"
    touched = [p for p in shared + heads if p.grad is not None]
    assert not touched, (
        "gradient_cosine left gradients in .grad: .backward() adds into .grad, and the training step would then "
        "apply them. Use torch.autograd.grad(loss, params, retain_graph=True), which returns the gradients instead")
    try:
        (loss_a + loss_b).backward()
    except RuntimeError:
        raise AssertionError("after gradient_cosine the losses cannot be backpropagated any more (the graph was "
                             "freed): pass retain_graph=True to torch.autograd.grad") from None
    # Leaving .grad and the graph alone is to the credit only of an answer that computed the cosine: one that
    # does nothing (returns 0.0) leaves them alone too.
    assert close(value, want, atol=1e-6), (f"gradient_cosine(loss_a, loss_b, shared_params) left .grad and the graph "
                                           f"alone but returned {value:.5g}, not the cosine {want:.5g}: get "
                                           "test_q4_value right first")


@points(1, visibility=HIDDEN)
def test_q4_matches_reference_unused_and_zero_gradients(gradient_cosine):
    """matches the reference on other networks; a shared parameter one loss does not use counts as zeros; a zero gradient gives 0, not NaN"""
    for seed in (10, 11, 12):
        loss_fn, shared, _ = _shared_net(seed, n=8, d=3, h=7)
        what = f"gradient_cosine on random networks (seed {seed})"
        want = _reference_cosine(*loss_fn(), shared)  # before the call, which may change the weights in place
        assert close(_cosine(gradient_cosine, *loss_fn(), shared, what), want, atol=1e-6), (
            f"{what} differs from the cosine of the concatenated gradients")
    loss_fn, shared, _ = _shared_net(13)
    extra = seeded_randn(3, seed=14).requires_grad_()
    loss_a, loss_b = loss_fn()
    loss_a = loss_a + (extra ** 2).sum()  # only task a uses `extra`
    want = _reference_cosine(loss_a, loss_b, shared + [extra])
    got = _cosine(gradient_cosine, loss_a, loss_b, shared + [extra], "gradient_cosine with a parameter only one loss uses")
    assert close(got, want, atol=1e-6), (
        f"with a shared parameter that only one loss uses the cosine should be {want:.5g}, not {got:.5g}: its gradient "
        "for the other task is zeros")
    loss_a, _ = loss_fn()
    flat = (shared[0] * 0).sum()  # a loss whose gradient is zero
    zero = _cosine(gradient_cosine, loss_a, flat, shared, "gradient_cosine with a loss whose gradient is zero")
    assert math.isfinite(zero), ("a loss whose gradient is zero gave NaN (0 / 0): clamp the denominator, e.g. "
                                 "(‖g_a‖ ‖g_b‖).clamp_min(1e-20), or use F.cosine_similarity; the cosine is then 0")
    assert abs(zero) < 1e-6, f"with a zero gradient the cosine should be 0, not {zero:.5g}"
