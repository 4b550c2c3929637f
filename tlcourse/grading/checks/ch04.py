"""Checks for chapter 04 (knowledge distillation): softened outputs, Hinton et al.'s KD loss,
a frozen teacher and the FitNets hint loss.

Every question is a small function on tiny tensors or a tiny network, so a question grades in
milliseconds. Tests marked ``after_due_date`` are not run by the in-notebook ``check()``;
``tlcourse grade`` runs them and Gradescope shows them after the deadline. They compare the
learner's function with the references below on random inputs, values *and* gradients.

The references (``_reference_*``) are written out here rather than imported from
:mod:`tlcourse.distill`: a checks module must stand alone (e.g. in a hidden-tests folder), and a
submission could rebind ``tlcourse.distill``'s functions, which the sandbox does not watch.
``tests/test_grading_ch04.py`` proves that each reference equals ``tlcourse.distill``'s.

Decision for q3: ``freeze_teacher`` freezes the model it is given **in place** and returns that
same object (as ``nn.Module.eval()`` and ``requires_grad_()`` do), not a copy: a copy would hold
a second teacher in memory and leave the caller's variable trainable.
Format: :mod:`tlcourse.grading.spec`.
"""

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from tlcourse.grading.spec import (close, expect_close, expect_loss, expect_shape, expect_tensor, points,
                                   seeded_randn)
from tlcourse.grading.spec import first_match as _first_match

QUESTIONS = {
    "q1": {"title": "temperature-softened probabilities", "functions": ["soften"]},
    "q2": {"title": "the distillation loss", "functions": ["kd_loss"]},
    "q3": {"title": "a frozen teacher", "functions": ["freeze_teacher"]},
    "q4": {"title": "the FitNets hint loss", "functions": ["hint_loss"]},
}

HIDDEN = "after_due_date"


# --- references (equal to tlcourse.distill's; tests/test_grading_ch04.py checks it) ------

def _reference_soften(logits, temperature=1.0):
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    return torch.softmax(logits / temperature, dim=-1)


def _soft_term(student_logits, teacher_logits, temperature, power=2, reverse=False, student_t=True,
               teacher_t=True, reduction="batchmean", detach=True, entropy=True):
    """``T^power · KL(p_t ‖ p_s)`` over the classes, reduced over the batch; the keywords make
    the mistakes the tests name (``entropy=False``: the soft cross-entropy, KL + H(p_t))."""
    T = float(temperature)
    teacher = teacher_logits.detach() if detach else teacher_logits
    log_s = F.log_softmax(student_logits / (T if student_t else 1.0), dim=-1)
    log_t = F.log_softmax(teacher / (T if teacher_t else 1.0), dim=-1)
    if reverse:
        log_s, log_t = log_t, log_s
    per_entry = log_t.exp() * ((log_t if entropy else 0.0) - log_s)
    divisor = {"batchmean": len(student_logits), "mean": per_entry.numel(), "sum": 1}[reduction]
    return per_entry.sum() / divisor * T ** power


def _reference_kd(student_logits, teacher_logits, labels=None, temperature=4.0, alpha=0.9, **mistake):
    soft = _soft_term(student_logits, teacher_logits, temperature, **mistake)
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


@torch.no_grad()
def _reference_freeze(model):
    return model.eval().requires_grad_(False)


def _reference_hint(student_features, teacher_features, regressor):
    guided = regressor(student_features, size=tuple(teacher_features.shape[-2:]))
    return F.mse_loss(guided, teacher_features.detach())


class _Regressor(nn.Module):
    """A FitNets regressor as the notebook gives it: a 1x1 convolution from the student's channels
    to the teacher's, resizing to ``size`` (bilinear) when the grids differ. It notes each call's
    ``size`` so that a test can tell whether it was asked to resize."""

    def __init__(self, student_channels, teacher_channels, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # reproducible weights, global RNG untouched
            torch.manual_seed(seed)
            self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        self.sizes = []

    def forward(self, student_features, size=None):
        self.sizes.append(None if size is None else tuple(size))
        out = self.proj(student_features)
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
        return out


# --- helpers ------------------------------------------------------------------------------

def _no_gradient(tensor):
    return tensor.grad is None or not bool(tensor.grad.any())


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _copy(labels):
    """The learner's own copy of ``labels`` (or ``None``): nothing its code does to it moves a reference."""
    return None if labels is None else labels.clone()


def _fresh_gradients(*tensors):
    """Forget any ``.grad`` on ``tensors`` (or the parameters of modules among them): the learner's code may
    write one on the tensors it was given, and the gradient a test reads must be its own backward()'s."""
    for t in tensors:
        if isinstance(t, nn.Module):
            t.zero_grad(set_to_none=True)
        else:
            t.grad = None


# --- q1: soften(logits, temperature) -> probabilities -------------------------------------

def _soften(soften, logits, temperature):
    what = f"soften(logits, {temperature:g})"
    p = expect_tensor(soften(logits, temperature), what)
    expect_shape(p, logits.shape, what)
    return p


@points(1.5)
def test_q1_softmax_of_logits_over_t(soften):
    """returns softmax(logits / T) over the classes: T = 1 is the softmax, T = 4 flatter"""
    logits = torch.tensor([[2.0, 1.0, 0.1], [0.0, 3.0, -1.0]])
    for T in (1.0, 4.0):
        p = _soften(soften, logits.clone(), T)
        want = _reference_soften(logits, T)
        if bool((p <= 0).all()):
            raise AssertionError(f"at T = {T:g} every value is ≤ 0: those are log-probabilities (log_softmax); "
                                 "soften returns probabilities, softmax(logits / T)")
        if torch.allclose(p.sum(0), torch.ones(3), atol=1e-5) and not torch.allclose(p.sum(1), torch.ones(2)):
            raise AssertionError("the columns sum to 1: the softmax went over the batch (dim 0); take it over the "
                                 "classes, the last dimension (dim=-1)")
        if T != 1 and torch.allclose(p, torch.softmax(logits, -1) / T, atol=1e-6):
            raise AssertionError("the probabilities were divided by T after the softmax (the rows no longer sum "
                                 "to 1); divide the logits by T *before* the softmax: softmax(logits / T)")
        if T != 1 and torch.allclose(p, torch.softmax(logits * T, -1), atol=1e-6):
            raise AssertionError("the logits were multiplied by T, which sharpens the distribution; divide "
                                 "them by T: a higher temperature flattens it")
        if T != 1 and torch.allclose(p, torch.softmax(logits, -1), atol=1e-6):
            raise AssertionError(f"at T = {T:g} the result is the plain softmax: the temperature has no effect "
                                 "(divide the logits by it)")
        if not torch.allclose(p.sum(-1), torch.ones(2), atol=1e-5):
            raise AssertionError(f"at T = {T:g} the rows sum to {[round(x, 4) for x in p.sum(-1).tolist()]}, "
                                 "not 1: normalise, softmax(logits / T) over the last dimension")
        expect_close(p, want, f"soften(logits, {T:g})", atol=1e-6)
    hot, flat = _soften(soften, logits, 1.0), _soften(soften, logits, 4.0)
    assert bool((flat.max(-1).values < hot.max(-1).values).all()), "a higher T should flatten the distribution"


@points(0.5)
def test_q1_any_shape_large_logits_input_untouched(soften):
    """works on [C] and [B, L, C] logits too (last dim), stays finite for logits near 1000, leaves its input unchanged"""
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    _soften(soften, logits, 3.0)
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5]])), (
        "soften changed the logits it was given (an in-place division such as logits /= T?); the caller "
        "still needs them. Compute logits / T, a new tensor")
    for shape, seed in (((5,), 1), ((2, 3, 4), 2)):
        logits = seeded_randn(*shape, seed=seed, scale=2.0)
        p = _soften(soften, logits.clone(), 2.0)
        expect_close(p, _reference_soften(logits, 2.0), f"soften on {list(shape)} logits (softmax over dim=-1)",
                     atol=1e-6)
    big = torch.tensor([[1000.0, 999.0, 0.0]])
    p = _soften(soften, big.clone(), 1.0)
    assert bool(torch.isfinite(p).all()), (
        "soften([[1000, 999, 0]], 1) gave NaN or inf: exp(1000) overflows. torch.softmax subtracts each row's "
        "maximum first and never overflows; use it rather than exp(...) / sum")
    expect_close(p, _reference_soften(big, 1.0), "soften([[1000, 999, 0]], 1)", atol=1e-6)


@points(0.5, visibility=HIDDEN)
def test_q1_matches_reference_values_and_gradients(soften):
    """matches the reference on random logits for T = 0.5, 1, 2, 7.5, values and gradients"""
    logits = seeded_randn(6, 9, seed=3, scale=3.0)
    weights = seeded_randn(6, 9, seed=4)
    for T in (0.5, 1.0, 2.0, 7.5):
        mine, ref = _leaf(logits), _leaf(logits)
        p = soften(mine, T)
        expect_close(p, _reference_soften(logits, T), f"soften(logits, {T:g})", atol=1e-6)
        assert p.requires_grad, "soften's result is cut from the autograd graph (no_grad, .detach(), numpy?)"
        _fresh_gradients(mine)
        (p * weights).sum().backward()
        (_reference_soften(ref, T) * weights).sum().backward()
        expect_close(mine.grad, ref.grad, f"the gradient through soften(logits, {T:g})", atol=1e-6)


@points(0.5, visibility=HIDDEN)
def test_q1_rejects_a_non_positive_temperature(soften):
    """raises ValueError for T = 0 and T = -1 (softmax(logits / 0) is NaN, not a distribution)"""
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    # A soften that always raises ValueError must not earn this: first a positive T, answered right.
    expect_close(_soften(soften, logits.clone(), 2.0), _reference_soften(logits, 2.0), "soften(logits, 2)", atol=1e-6)
    for T in (0.0, -1.0):
        try:
            soften(logits.clone(), T)
        except ValueError:
            continue
        except ZeroDivisionError:
            raise AssertionError(f"soften(logits, {T:g}) raised ZeroDivisionError; check the temperature first "
                                 "and raise ValueError with a message that says it must be positive") from None
        raise AssertionError(f"soften(logits, {T:g}) returned a result; raise ValueError: a temperature must be "
                             "positive")


# --- q2: kd_loss(student_logits, teacher_logits, labels=None, temperature=4.0, alpha=0.9) ----

def _kd_inputs(seed=0, b=4, c=5):
    student = seeded_randn(b, c, seed=seed, scale=2.0)
    teacher = seeded_randn(b, c, seed=seed + 100, scale=3.0, shift=0.5)
    labels = torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed + 200))
    return student, teacher, labels


def _soft_mistakes(s, t, T, scale=1.0, extra=0.0):
    """``(value, message)`` for the soft-term mistakes, each value ``scale · soft + extra``."""
    def wrong(**kw):
        return scale * float(_soft_term(s, t, T, **kw)) + extra

    probs = F.softmax(s / T, dim=-1)
    p_t = F.softmax(t / T, dim=-1)
    as_probabilities = float((p_t * (p_t.log() - probs)).sum() / len(s) * T * T)
    return [
        (wrong(power=0), f"the soft term is missing the T² factor (here {T * T:g}): the soft gradients shrink "
                         "as 1/T², and T² restores their size so that α means the same at every temperature"),
        (wrong(power=1), "the soft term is multiplied by T; Hinton et al. multiply it by T²"),
        (wrong(reverse=True), "that is KL(student ‖ teacher), the wrong direction (or the two models swapped): "
                              "the teacher's distribution is the target, KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s). "
                              "F.kl_div takes the student's log-probabilities first, the teacher's second"),
        (wrong(student_t=False), "only the teacher's logits were divided by T; soften the student's too, "
                                 "log_softmax(student_logits / T)"),
        (wrong(teacher_t=False), "only the student's logits were divided by T; soften the teacher's too, "
                                 "softmax(teacher_logits / T)"),
        (wrong(reduction="mean"), "the KL was averaged over all B × C entries (F.kl_div's reduction='mean'); "
                                  "sum it over the classes and average over the batch: reduction='batchmean'"),
        (wrong(reduction="sum"), "the KL was summed over the batch; average it over the batch "
                                 "(reduction='batchmean'), so the loss does not grow with the batch size"),
        (wrong(entropy=False), "that is the soft cross-entropy −Σ p_t log p_s, which is the KL plus the teacher's "
                               "entropy: the same gradients, but the loss asked for is the KL, 0 when the student "
                               "matches the teacher (F.kl_div)"),
        (scale * as_probabilities + extra, "F.kl_div's first argument must be log-probabilities (F.log_softmax), "
                                           "not probabilities"),
    ]


def _no_label_mistakes(s, t, T, alpha):
    soft = float(_soft_term(s, t, T))
    return _soft_mistakes(s, t, T) + [
        (alpha * soft, f"with labels=None the soft term was weighted by α = {alpha:g}; without labels it is "
                       "all there is, weight 1"),
        ((1 - alpha) * soft, f"with labels=None the soft term was weighted by 1 − α = {1 - alpha:g}; without "
                             "labels it is all there is, weight 1")]


def _label_mistakes(s, t, labels, T, alpha):
    soft, ce = float(_soft_term(s, t, T)), float(F.cross_entropy(s, labels))
    hard = (1 - alpha) * ce
    return [
        ((1 - alpha) * soft + alpha * ce, "the weights are swapped: α weighs the soft (teacher) term and 1 − α "
                                          "the cross-entropy with the labels"),
        (alpha * soft + (1 - alpha) * float(F.cross_entropy(s / T, labels)),
         "the cross-entropy with the labels used the softened student logits; it uses them at T = 1"),
        (alpha * soft + (1 - alpha) * float(F.cross_entropy(t, labels)),
         "the cross-entropy was computed on the teacher's logits; it is the student's"),
        (alpha * soft + hard * T * T, "the cross-entropy was multiplied by T² too; only the soft term is"),
        (soft, "the labels were ignored: with labels, add (1 − α) × the cross-entropy with them"),
        (alpha * soft, "the labels were ignored: with labels, add (1 − α) × the cross-entropy with them"),
        (soft + hard, "the soft term was not weighted by α"),
    ] + _soft_mistakes(s, t, T, scale=alpha, extra=hard)


def _kd_value(kd_loss, s, t, labels, T, alpha):
    what = f"kd_loss(s, t, {'labels' if labels is not None else 'None'}, temperature={T:g}, alpha={alpha:g})"
    try:
        value = kd_loss(s.clone(), t.clone(), _copy(labels), temperature=T, alpha=alpha)
    except (TypeError, AttributeError) as exc:
        if labels is None:
            raise AssertionError(f"with labels=None (unlabelled transfer data) kd_loss raised "
                                 f"{type(exc).__name__}: {exc}. Without labels there is no hard term: return the "
                                 "soft term alone") from None
        raise
    value = float(expect_loss(value, what))
    if math.isnan(value):
        raise AssertionError(f"{what} is NaN. F.kl_div(log_p_student, target) reads the target as probabilities; "
                             "give it the teacher's log-probabilities only with log_target=True")
    assert math.isfinite(value), f"{what} is {value}: compute log-probabilities with F.log_softmax, not log(softmax)"
    return value, what


@points(3)
def test_q2_soft_term(kd_loss):
    """without labels: T² · KL(softmax(t/T) ‖ softmax(s/T)), summed over the classes, averaged over the batch"""
    s, t, _ = _kd_inputs()
    for T, alpha in ((4.0, 0.6), (2.0, 0.9)):
        got, what = _kd_value(kd_loss, s, t, None, T, alpha)
        want = float(_reference_kd(s, t, None, T, alpha))
        message = _first_match(got, want, _no_label_mistakes(s, t, T, alpha))
        if message:
            raise AssertionError(f"{what} = {got:.5g}, not {want:.5g}: {message}")
        assert close(got, want), (f"{what} should be {want:.5g}, not {got:.5g}: T² · Σ_c p_t log(p_t / p_s) "
                                  "averaged over the batch, p = softmax(logits / T)")
    same, what = _kd_value(kd_loss, t, t, None, 4.0, 0.5)
    assert abs(same) < 1e-5, f"the soft term should be 0 when the student's logits equal the teacher's, not {same:.3g}"


@points(2)
def test_q2_with_labels(kd_loss):
    """with labels: α · soft term + (1 − α) · cross-entropy(student logits at T = 1, labels)"""
    s, t, labels = _kd_inputs(seed=1, b=6, c=4)
    for T, alpha in ((3.0, 0.7), (2.0, 0.25)):
        got, what = _kd_value(kd_loss, s, t, labels, T, alpha)
        want = float(_reference_kd(s, t, labels, T, alpha))
        message = _first_match(got, want, _label_mistakes(s, t, labels, T, alpha))
        if message:
            raise AssertionError(f"{what} = {got:.5g}, not {want:.5g}: {message}")
        assert close(got, want), f"{what} should be {want:.5g}, not {got:.5g}"
    only_ce, what = _kd_value(kd_loss, s, t, labels, 4.0, 0.0)
    assert close(only_ce, float(F.cross_entropy(s, labels))), (
        f"{what} should be the plain cross-entropy with the labels, {float(F.cross_entropy(s, labels)):.5g}")


@points(1.5)
def test_q2_teacher_gets_no_gradient(kd_loss):
    """the loss stays in the autograd graph for the student, and sends no gradient to the teacher's logits"""
    s, t, labels = _kd_inputs(seed=2)
    for given in (None, labels):
        student, teacher = _leaf(s), _leaf(t)
        loss = expect_loss(kd_loss(student, teacher, _copy(given), temperature=4.0, alpha=0.5), "kd_loss(...)")
        # Where the gradients go means something only for a distillation loss: the right one, or one with a
        # mistake another test names (a loss that never reads the teacher sends it no gradient either).
        got, want = float(loss.detach()), float(_reference_kd(s, t, given, 4.0, 0.5))
        known = _no_label_mistakes(s, t, 4.0, 0.5) if given is None else _label_mistakes(s, t, given, 4.0, 0.5)
        assert close(got, want) or any(close(got, float(v)) for v, _ in known), (
            f"kd_loss(...) = {got:.5g} is not a distillation loss of these logits (the right value is {want:.5g}): "
            "get test_q2_soft_term and test_q2_with_labels right first")
        assert loss.requires_grad, ("kd_loss's result is cut from the autograd graph (computed under no_grad, or "
                                    "from .detach()/.item()?): it could not train the student")
        _fresh_gradients(student, teacher)  # what the learner's code wrote in .grad is not a gradient of the loss
        loss.backward()
        assert student.grad is not None and bool(student.grad.any()), "no gradient reached the student's logits"
        assert _no_gradient(teacher), (
            "a gradient reached the teacher's logits: the teacher is not being trained, its outputs are targets. "
            "Use teacher_logits.detach() (if the teacher's logits required grad, backward would update the teacher)")


@points(2, visibility=HIDDEN)
def test_q2_matches_reference_values_and_gradients(kd_loss):
    """matches the reference for T = 1 to 8, α = 0 to 1, with and without labels: values and gradients"""
    settings = [(1.0, 0.3, True), (2.0, 0.0, True), (4.0, 0.9, True), (8.0, 1.0, True), (4.0, 0.9, False),
                (8.0, 0.5, False), (1.0, 0.7, False)]
    for i, (T, alpha, with_labels) in enumerate(settings):
        b, c = (3, 10) if i % 2 else (7, 2)
        s, t, labels = _kd_inputs(seed=10 + i, b=b, c=c)
        labels = labels if with_labels else None
        student, ref = _leaf(s), _leaf(s)
        loss = expect_loss(kd_loss(student, t.clone(), _copy(labels), temperature=T, alpha=alpha), "kd_loss(...)")
        want = _reference_kd(ref, t, labels, T, alpha)
        what = f"kd_loss on [{b}, {c}] logits, T = {T:g}, α = {alpha:g}, labels {'given' if with_labels else 'None'}"
        expect_close(loss, want, what, atol=1e-6)
        _fresh_gradients(student)
        loss.backward()
        want.backward()
        assert student.grad is not None, f"{what}: no gradient reached the student's logits"
        expect_close(student.grad, ref.grad, f"the gradient of {what}", atol=1e-6)


@points(0.5, visibility=HIDDEN)
def test_q2_stable_for_large_logits(kd_loss):
    """stays finite and right for logits in the hundreds at T = 1 (log-probabilities from log_softmax)"""
    s, t, labels = _kd_inputs(seed=30, b=3, c=6)
    s, t = s * 100, t * 100
    for given in (None, labels):
        value = expect_loss(kd_loss(s.clone(), t.clone(), _copy(given), temperature=1.0, alpha=0.5), "kd_loss(...)")
        assert bool(torch.isfinite(value)), (
            "with logits in the hundreds the loss is NaN or inf: softmax underflows to 0 and log(0) = −inf. "
            "F.log_softmax computes log-probabilities without that underflow")
        expect_close(value, _reference_kd(s, t, given, 1.0, 0.5), "kd_loss with logits in the hundreds",
                     rtol=1e-4, atol=1e-3)


# --- q3: freeze_teacher(model) -> the same model, frozen ----------------------------------

class _Teacher(nn.Module):
    """A small teacher as if just trained: nested Sequentials, BatchNorm2d/1d, Dropout, and a
    parameter of its own at the top (a learned output scale), left in train mode."""

    def __init__(self, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Dropout(0.5))
            self.head = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 5))
            self.scale = nn.Parameter(torch.tensor(1.5))
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
        self.train()

    def forward(self, x):
        return self.head(self.features(x)) * self.scale


def _images(n=6, seed=5):
    return seeded_randn(n, 3, 6, 6, seed=seed, scale=2.0, shift=1.0)


def _expect_the_teacher(teacher, seed=0, what="the model freeze_teacher returned"):
    """``teacher`` still holds the teacher's parameters (the same names, the same values) and buffers:
    a module without parameters (nn.Identity(), or parameters turned into buffers) has none to train,
    which is not freezing them."""
    twin = _Teacher(seed)
    want = [name for name, _ in twin.named_parameters()]
    got = [name for name, _ in teacher.named_parameters()]
    assert got == want, (
        f"{what} has {len(got)} parameter tensors, not the teacher's {len(want)} ({', '.join(want[:3])}, ...): "
        "freezing keeps every parameter and sets requires_grad = False on it (no new model, no buffers in their place)")
    state = teacher.state_dict()
    changed = [k for k, v in twin.state_dict().items() if k not in state or not torch.equal(state[k], v)]
    assert not changed, (f"{what} does not hold the teacher's weights ({changed[0]} differs): freezing changes only "
                         "requires_grad and the modes")
    return twin


def _frozen(freeze_teacher, seed=0):
    """``(model, teacher)``: a fresh model and what the tests examine, the returned model (the
    model itself when nothing is returned: that costs only the test of the returned object)."""
    model = _Teacher(seed)
    returned = freeze_teacher(model)
    if returned is None:
        return model, model
    assert isinstance(returned, nn.Module), (
        f"freeze_teacher should return the model, not a {type(returned).__name__}")
    return model, returned


@points(1)
def test_q3_no_parameter_trains(freeze_teacher):
    """every parameter of the model, nested or at the top, has requires_grad = False"""
    _, teacher = _frozen(freeze_teacher)
    _expect_the_teacher(teacher)
    trainable = [name for name, p in teacher.named_parameters() if p.requires_grad]
    if trainable and teacher.__dict__.get("requires_grad") is False:
        raise AssertionError("model.requires_grad = False only sets a new attribute on the Module object; "
                             "the parameters keep requires_grad = True. Call model.requires_grad_(False), or set "
                             "p.requires_grad = False for p in model.parameters()")
    assert not trainable, (f"{len(trainable)} parameter(s) still require grad, e.g. {trainable[0]!r}: freeze "
                           "every one, model.parameters() (recursive) includes the nested ones and the model's own")


@points(1.5)
def test_q3_eval_mode(freeze_teacher):
    """every submodule in eval mode: Dropout off, BatchNorm statistics not updated by a forward pass"""
    _, teacher = _frozen(freeze_teacher)
    twin = _reference_freeze(_expect_the_teacher(teacher))
    still = [name or "the model" for name, m in teacher.named_modules() if m.training]
    if still and not teacher.training:
        raise AssertionError(f"the model's flag says eval but {still[0]} is in train mode: model.training = False "
                             "changes the top module only; model.eval() sets every submodule")
    if still:
        raise AssertionError("the model is still in train mode: call model.eval() (with the parentheses). In "
                             "train mode Dropout makes the teacher's targets random and every forward pass "
                             "moves BatchNorm's running statistics")
    stats = [b.clone() for b in teacher.buffers()]
    images = _images()
    with torch.no_grad():
        first, second = teacher(images), teacher(images)
    assert torch.equal(first, second), "two forward passes on the same images differ: is Dropout still on?"
    assert all(torch.equal(a, b) for a, b in zip(stats, teacher.buffers())), (
        "a forward pass changed BatchNorm's running statistics: the BN layers are still in train mode")
    with torch.no_grad():
        expect_close(first, twin(images), "the frozen teacher's outputs (against the teacher in eval mode)", atol=1e-6)


@points(0.5)
def test_q3_returns_the_same_model(freeze_teacher):
    """freezes the model in place and returns that same object (not a copy)"""
    model = _Teacher()
    returned = freeze_teacher(model)
    assert returned is not None, "freeze_teacher returned None: end it with `return model`"
    assert returned is model, (
        "freeze_teacher returned another object (a copy?): freeze the model you are given in place and return "
        "it, as model.eval() does. A copy doubles the teacher's memory and leaves the caller's model trainable")
    # ... frozen: returning the model untouched is not freezing it in place
    _expect_the_teacher(model, what="the model freeze_teacher was given")
    assert not any(p.requires_grad for p in model.parameters()) and not any(m.training for m in model.modules()), (
        "freeze_teacher returned the model it was given, but not frozen: in eval mode, with requires_grad = False "
        "on every parameter")


@points(1, visibility=HIDDEN)
def test_q3_a_training_step_leaves_the_teacher_unchanged(freeze_teacher):
    """changes no weight; a student's training steps, even with an optimiser over both models, leave the teacher as it was"""
    teacher = _Teacher(seed=3)
    teacher.features[0].weight.requires_grad_(False)  # partly frozen already: must stay so
    before = copy.deepcopy(teacher.state_dict())
    names = [name for name, _ in teacher.named_parameters()]
    twin = _reference_freeze(copy.deepcopy(teacher))
    freeze_teacher(teacher)
    assert [name for name, _ in teacher.named_parameters()] == names, (
        "after freeze_teacher the model's parameters are not the teacher's (turned into buffers, or removed?): "
        "freezing keeps every parameter and sets requires_grad = False on it")
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items()), (
        "freeze_teacher changed weights or running statistics; freezing changes only requires_grad and the modes")
    freeze_teacher(teacher)
    assert [name for name, _ in teacher.named_parameters()] == names, (
        "after a second freeze_teacher the model's parameters are not the teacher's (turned into buffers, or "
        "removed?): freezing keeps every parameter and sets requires_grad = False on it")
    assert not any(p.requires_grad for p in teacher.parameters()), (
        "freezing the model a second time made parameters trainable again (requires_grad toggled?): set it to False")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = nn.Sequential(nn.Flatten(1), nn.Linear(3 * 6 * 6, 5))
    optimiser = torch.optim.SGD(list(teacher.parameters()) + list(student.parameters()), lr=0.5, momentum=0.9,
                                weight_decay=0.1)
    images = _images(8, seed=6)
    for _ in range(2):
        loss = F.mse_loss(student(images), teacher(images))  # the teacher's output, not detached
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    changed = [k for k, v in before.items() if not torch.equal(v, teacher.state_dict()[k])]
    assert not changed, (f"two training steps of the student changed the teacher's {changed[0]}: a frozen teacher "
                         "needs both requires_grad = False (no gradient, no update) and eval mode (no statistics "
                         "update, no Dropout)")
    with torch.no_grad():
        expect_close(teacher(images), twin(images), "the frozen teacher's outputs after the student's steps", atol=1e-6)


# --- q4: hint_loss(student_features, teacher_features, regressor) -> 0-d tensor ------------

def _hint_inputs(seed=0, b=2, cs=3, ct=5, hs=4, ht=4):
    student = seeded_randn(b, cs, hs, hs, seed=seed)
    teacher = seeded_randn(b, ct, ht, ht, seed=seed + 100, scale=1.5, shift=0.3)
    return student, teacher, _Regressor(cs, ct, seed=seed + 200)


def _hint_value(hint_loss, s, t, regressor, what):
    try:
        value = hint_loss(s, t, regressor)
    except RuntimeError as exc:
        text = str(exc)
        if "channels" in text:
            raise AssertionError(f"{what} raised RuntimeError ({text.splitlines()[0][:160]}): the regressor takes the "
                                 "student's features, regressor(student_features, size=...); the teacher's are the "
                                 "target, used as they are") from None
        if "must match the size" in text:
            if regressor.sizes and regressor.sizes[-1] is None and s.shape[-1] != t.shape[-1]:
                raise AssertionError(f"{what} raised RuntimeError ({text[:120]}): the student's grid is "
                                     f"{list(s.shape[-2:])}, the teacher's {list(t.shape[-2:])}; pass "
                                     "size=teacher_features.shape[-2:] to the regressor") from None
            raise AssertionError(f"{what} raised RuntimeError ({text[:120]}): apply the regressor to the student's "
                                 "features first, it maps the student's channels to the teacher's") from None
        raise
    return expect_loss(value, what)


def _hint_mistakes(guided, t):
    diff = guided - t
    b = len(t)
    return [
        (diff.pow(2).sum(), "the squared differences were summed; the hint loss is their mean over every "
                            "element (F.mse_loss's default reduction)"),
        (diff.pow(2).sum() / b, "the squared differences were summed per example and averaged over the batch; "
                                "average over every element (F.mse_loss)"),
        (diff.pow(2).mean() / 2, "FitNets writes ½‖·‖²; here the hint loss is the plain mean squared error, "
                                 "F.mse_loss, without the ½"),
        (diff.abs().mean(), "those are absolute differences (L1); the hint loss squares them"),
        (diff.pow(2).mean().sqrt(), "that is the root of the mean squared error; use the mean squared error itself"),
        (diff.pow(2).sum().sqrt(), "that is the norm of the difference; use the mean squared error"),
    ]


@points(1.5)
def test_q4_value(hint_loss):
    """returns the mean squared error between regressor(student features) and the teacher's features"""
    s, t, regressor = _hint_inputs()
    twin = copy.deepcopy(regressor)  # before the call: what the learner's code does to its regressor moves no target
    what = "hint_loss on student [2, 3, 4, 4] and teacher [2, 5, 4, 4] features"
    got = float(_hint_value(hint_loss, s.clone(), t.clone(), regressor, what).detach())
    with torch.no_grad():
        guided = twin(s, size=(4, 4))
        want = float(F.mse_loss(guided, t))
        message = _first_match(got, want, _hint_mistakes(guided, t))
    if message:
        raise AssertionError(f"{what} = {got:.5g}, not {want:.5g}: {message}")
    assert close(got, want), (f"{what} should be {want:.5g}, not {got:.5g}: "
                              "F.mse_loss(regressor(student_features, size=...), teacher_features)")


@points(1)
def test_q4_resizes_to_the_teacher_grid(hint_loss):
    """when the grids differ (student 8x8, teacher 4x4) asks the regressor for the teacher's size"""
    s, t, regressor = _hint_inputs(seed=1, hs=8, ht=4)
    twin = copy.deepcopy(regressor)
    what = "hint_loss on student [2, 3, 8, 8] and teacher [2, 5, 4, 4] features"
    got = float(_hint_value(hint_loss, s.clone(), t.clone(), regressor, what).detach())
    with torch.no_grad():
        want = float(F.mse_loss(twin(s, size=(4, 4)), t))
        upsampled = F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False)
        teacher_resized = float(F.mse_loss(twin(s), upsampled))
    if close(got, teacher_resized) and not close(teacher_resized, want):
        raise AssertionError(f"{what} = {got:.5g}, not {want:.5g}: the teacher's features were resized to the "
                             "student's grid; they are the target, as they are. Resize the regressed student "
                             "features instead: regressor(student_features, size=teacher_features.shape[-2:])")
    assert close(got, want), f"{what} should be {want:.5g}, not {got:.5g}"


@points(1)
def test_q4_gradients_reach_the_student_and_the_regressor_only(hint_loss):
    """the gradient reaches the student's features and the regressor's weights, none reaches the teacher's features"""
    s, t, regressor = _hint_inputs(seed=2)
    student, teacher = _leaf(s), _leaf(t)
    loss = _hint_value(hint_loss, student, teacher, regressor, "hint_loss(...)")
    assert loss.requires_grad, ("hint_loss's result is cut from the autograd graph (no_grad, .detach(), .item()?): "
                                "it could train neither the student nor the regressor")
    _fresh_gradients(student, teacher, regressor)  # the gradients read below are this backward()'s alone
    loss.backward()
    assert student.grad is not None and bool(student.grad.any()), (
        "no gradient reached the student's features: the hint trains the student's first layers (do not detach them)")
    assert regressor.proj.weight.grad is not None and bool(regressor.proj.weight.grad.any()), (
        "no gradient reached the regressor's weights: it is trained with the student (do not run it under no_grad)")
    assert _no_gradient(teacher), ("a gradient reached the teacher's features: they are the target; use "
                                   "teacher_features.detach()")


@points(0.5, visibility=HIDDEN)
def test_q4_matches_reference_values_and_gradients(hint_loss):
    """matches the reference on other shapes and grids: values, and gradients for the student and the regressor"""
    for seed, (b, cs, ct, hs, ht) in enumerate(((3, 2, 6, 5, 5), (1, 4, 4, 6, 3), (4, 8, 3, 2, 4))):
        s, t, regressor = _hint_inputs(seed=40 + seed, b=b, cs=cs, ct=ct, hs=hs, ht=ht)
        twin = copy.deepcopy(regressor)
        student, ref = _leaf(s), _leaf(s)
        what = f"hint_loss on student [{b}, {cs}, {hs}, {hs}] and teacher [{b}, {ct}, {ht}, {ht}] features"
        loss = _hint_value(hint_loss, student, t.clone(), regressor, what)
        want = _reference_hint(ref, t, twin)
        expect_close(loss, want, what, atol=1e-6)
        _fresh_gradients(student, regressor)
        loss.backward()
        want.backward()
        assert student.grad is not None, f"{what}: no gradient reached the student's features"
        expect_close(student.grad, ref.grad, f"the gradient of {what} for the student's features", atol=1e-6)
        for name in ("weight", "bias"):
            mine, theirs = getattr(regressor.proj, name).grad, getattr(twin.proj, name).grad
            assert mine is not None, f"{what}: no gradient reached the regressor's {name}"
            expect_close(mine, theirs, f"the gradient of {what} for the regressor's {name}", atol=1e-6)
