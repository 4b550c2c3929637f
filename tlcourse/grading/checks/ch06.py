"""Checks for chapter 06 (parameter-efficient and robust fine-tuning): a LoRA layer, merging
it, BitFit's selection, interpolating two state dicts (WiSE-FT), and Tent's loss and parameters.

Every question runs on tiny layers and networks (``_tiny.TinyEfficientNet``, whose BatchNorm
layers are timm's ``BatchNormAct2d`` subclass), so a question grades in milliseconds. Tests
marked ``after_due_date`` are not run by the in-notebook ``check()``; ``tlcourse grade`` runs
them and Gradescope shows them after the deadline.

The references (``_reference_*``, ``_LoRALinear``) are written out here rather than imported
from :mod:`tlcourse.efficient` / :mod:`tlcourse.robust` (a checks module stands alone, and a
submission could rebind the library's functions); ``tests/test_grading_ch06.py`` proves that
they equal the library's and, for LoRA, Hugging Face ``peft``'s.

Decisions:

- q1 is a class ``LoRALinear(base, rank, alpha)`` with the attributes ``base`` (the frozen
  ``nn.Linear`` it was given), ``lora_A`` ``[rank, in]``, ``lora_B`` ``[out, rank]`` (both
  ``nn.Parameter``) and ``scaling = alpha / rank``; ``lora_B`` starts at zero and ``lora_A``
  random, as in Hu et al. (2022) and ``peft``.
- q2 returns a *new* ``nn.Linear`` and leaves the LoRA layer as it was (an adapter that can
  still be switched off or swapped); ``peft``'s ``merge_and_unload`` merges in place, which the
  question text says.
- q3 is the course's BitFit (``tlcourse.efficient.select_bitfit``): every parameter named
  ``bias``, every BatchNorm's scale (beside its shift, which is a bias), and the head
  (``model.get_classifier()``); LayerNorm's and GroupNorm's gains stay frozen, as in Ben Zaken
  et al. (2022). It returns how many values stay trainable.
- q4 takes integer tensors (``num_batches_tracked``) from either state dict unchanged and
  raises on state dicts of different models.
- q5: ``entropy_loss`` is the batch mean in nats; ``tent_parameters`` puts the BatchNorm layers
  on batch statistics, keeps every other layer in eval mode (dropout off), and returns the
  BatchNorm scales and shifts, the only tensors left trainable.

Format: :mod:`tlcourse.grading.spec`.
"""

import copy
import math

import torch
from torch import nn

from tlcourse.grading.checks._tiny import BatchNormAct2d, TinyEfficientNet
from tlcourse.grading.spec import (close, expect_close, expect_int, expect_loss, expect_shape, expect_tensor,
                                   first_match, points, seeded_randn)

QUESTIONS = {
    "q1": {"title": "a LoRA layer", "functions": ["LoRALinear"]},
    "q2": {"title": "merging LoRA into the weights", "functions": ["merge_lora"]},
    "q3": {"title": "BitFit's trainable parameters", "functions": ["bitfit"]},
    "q4": {"title": "WiSE-FT, interpolating two models", "functions": ["interpolate"]},
    "q5": {"title": "Tent's loss and parameters", "functions": ["entropy_loss", "tent_parameters"]},
}

HIDDEN = "after_due_date"
BATCHNORM = nn.modules.batchnorm._BatchNorm


def _linear(n_in, n_out, bias=True, seed=0, dtype=torch.float32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(n_in, n_out, bias=bias).to(dtype)


# --- references (equal to tlcourse.efficient's, robust's and peft's; tests/test_grading_ch06.py) --

class _LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) · x Aᵀ Bᵀ`` with ``base`` frozen, ``A`` ``[r, in]`` random and
    ``B`` ``[out, r]`` zero at the start (Hu et al. 2022); the reference for q1 and q2's input."""

    def __init__(self, base, rank, alpha, seed=0):
        super().__init__()
        self.base = base.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default for A
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)


def _reference_merged_weight(layer, scale=None):
    """``W + (alpha / rank) · B A``: the weight of the merged layer (``scale`` overrides alpha / rank)."""
    scale = layer.scaling if scale is None else scale
    return layer.base.weight.detach() + scale * (layer.lora_B.detach() @ layer.lora_A.detach())


def _reference_bitfit_names(model):
    """The names BitFit trains: biases, BatchNorm's scales, the head."""
    names = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    for prefix, m in model.named_modules():
        if isinstance(m, BATCHNORM):
            names |= {f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters(recurse=False)}
    head = model.get_classifier()
    by_id = {id(p): n for n, p in model.named_parameters()}
    return names | {by_id[id(p)] for p in head.parameters()}


def _reference_interpolate(theta_0, theta_1, alpha):
    """``(1 − alpha) · theta_0 + alpha · theta_1`` for floating tensors; integers from ``theta_1``."""
    return {k: torch.lerp(v, theta_1[k].to(v.dtype), alpha) if v.is_floating_point() else theta_1[k].clone()
            for k, v in theta_0.items()}


def _reference_entropy(logits):
    """Mean Shannon entropy (nats) of the softmax of ``logits`` ``[N, C]``, computed in float64."""
    logp = logits.detach().double().log_softmax(1)
    return float(-(logp.exp() * logp).sum(1).mean())


def _reference_tent_names(model):
    return {f"{prefix}.{n}" for prefix, m in model.named_modules()
            if isinstance(m, BATCHNORM) for n, _ in m.named_parameters(recurse=False)}


# --- q1: LoRALinear(base, rank, alpha) ------------------------------------------------------

def _lora(LoRALinear, n_in=6, n_out=4, rank=2, alpha=4.0, bias=True, seed=0):
    base = _linear(n_in, n_out, bias=bias, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        layer = LoRALinear(base, rank, alpha)
    assert isinstance(layer, nn.Module), f"LoRALinear(...) should be an nn.Module, not a {type(layer).__name__}"
    for name, shape in (("lora_A", (rank, n_in)), ("lora_B", (n_out, rank))):
        p = getattr(layer, name, None)
        assert isinstance(p, nn.Parameter), (
            f"the layer has no nn.Parameter called {name} (it has {getattr(p, '__class__', type(None)).__name__}): "
            "store A and B as nn.Parameter attributes lora_A and lora_B, so that they are trained and saved")
        assert tuple(p.shape) == shape, (
            f"{name} should have shape {list(shape)} for a Linear({n_in}, {n_out}) at rank {rank} (A is [rank, in], "
            f"B is [out, rank]), not {list(p.shape)}")
    return base, layer


def _set(p, value):
    with torch.no_grad():
        p.copy_(value)


def _fresh_gradients(*modules):
    """Forget the ``.grad`` of the modules' parameters: the learner's code may write one, and the gradient a
    test reads must be its own backward()'s."""
    for m in modules:
        m.zero_grad(set_to_none=True)


@points(2)
def test_q1_starts_as_the_frozen_layer(LoRALinear):
    """at the start the layer computes exactly what the frozen layer does (B = 0), and A is random, so training can move B"""
    _, layer = _lora(LoRALinear)
    x = seeded_randn(5, 6, seed=1)
    with torch.no_grad():  # the frozen layer's output from our own copy of it, which the learner's code never saw
        got, want = expect_tensor(layer(x), "LoRALinear(base, 2, 4.0)(x)"), _linear(6, 4, seed=0)(x)
    expect_shape(got, (5, 4), "LoRALinear(Linear(6, 4), 2, 4.0)(x) for x [5, 6]")
    a_zero, b_zero = not bool(layer.lora_A.detach().any()), not bool(layer.lora_B.detach().any())
    if a_zero and b_zero:
        raise AssertionError("lora_A and lora_B both start at zero: then the gradient of each is a product with the "
                             "other, zero, and LoRA never learns anything. Start B at zero and A random "
                             "(nn.init.kaiming_uniform_(A, a=math.sqrt(5)), as peft does, or a small normal)")
    assert torch.allclose(got, want, atol=1e-6), (
        "the new layer's first output differs from the frozen layer's: fine-tuning must start from exactly the "
        "pretrained network, so the update (alpha / rank) · B A must be zero at the start. Start lora_B at zero "
        "(and lora_A random)")
    assert b_zero, ("lora_A starts at zero and lora_B random: the update is zero too, but the convention of Hu et al. "
                    "(2022) and peft, which this question asks for, is B = 0 and A random")


@points(1.5)
def test_q1_only_the_adapter_trains(LoRALinear):
    """keeps the layer it is given, frozen and registered; only lora_A and lora_B train: rank · (in + out) values"""
    base, layer = _lora(LoRALinear, n_in=7, n_out=3, rank=2)
    mine = {id(p) for p in layer.parameters()}
    assert all(id(p) in mine for p in base.parameters()), (
        "the layer you were given is not among the new layer's parameters: keep it as a submodule, self.base = base "
        "(not a copy, and not in a plain list), so that moving the model to a device or saving it includes it")
    trainable = [p for p in layer.parameters() if p.requires_grad]
    if any(p.requires_grad for p in base.parameters()):
        raise AssertionError("the frozen layer's weight or bias still has requires_grad=True: LoRA trains only A and B; "
                             "freeze the base layer (base.requires_grad_(False))")
    n = sum(p.numel() for p in trainable)
    assert {id(p) for p in trainable} == {id(layer.lora_A), id(layer.lora_B)}, (
        f"the trainable tensors should be lora_A and lora_B only; the layer has {len(trainable)} trainable tensors")
    assert n == 2 * (7 + 3), f"rank 2 on a Linear(7, 3) trains 2 · (7 + 3) = 20 values, not {n}"


def _scaling_mistakes(update, rank, alpha):
    return [
        (alpha, "the update was scaled by alpha; scale it by alpha / rank (Hu et al. 2022; peft's default)"),
        (rank / alpha, "the update was scaled by rank / alpha; the scaling is alpha / rank"),
        (1.0, "the update B A was not scaled; multiply it by alpha / rank"),
        (1.0 / rank, "the update was scaled by 1 / rank; the scaling is alpha / rank"),
        (-alpha / rank, "the update was subtracted; the layer computes W x + (alpha / rank) · B A x"),
    ]


@points(1.5)
def test_q1_update_scaled_by_alpha_over_rank(LoRALinear):
    """computes W x + b + (alpha / rank) · B A x: the update is scaled by alpha / rank, for more than one rank"""
    for rank, alpha in ((2, 6.0), (3, 8.0)):
        _, layer = _lora(LoRALinear, n_in=5, n_out=4, rank=rank, alpha=alpha, seed=rank)
        A, B = seeded_randn(rank, 5, seed=10 + rank), seeded_randn(4, rank, seed=20 + rank)
        _set(layer.lora_A, A)
        _set(layer.lora_B, B)
        x = seeded_randn(3, 5, seed=30)
        # The reference from A and B as set here and from our own copy of the base layer: the learner's forward
        # may change the layer's tensors in place, which must not move the target.
        base = _linear(5, 4, seed=rank)
        with torch.no_grad():
            got = expect_tensor(layer(x), f"LoRALinear(Linear(5, 4), {rank}, {alpha})(x)")
            expect_shape(got, (3, 4), f"LoRALinear(Linear(5, 4), {rank}, {alpha})(x)")
            update = x @ A.T @ B.T
            mistakes = _scaling_mistakes(update, rank, alpha)
            want = base(x) + alpha / rank * update
            if not torch.allclose(got, want, atol=1e-5):
                for scale, message in mistakes:
                    if torch.allclose(got, base(x) + scale * update, atol=1e-5):
                        raise AssertionError(f"with rank {rank} and alpha {alpha}: {message}")
                if torch.allclose(got, x @ base.weight.T + alpha / rank * update, atol=1e-5):
                    raise AssertionError("the frozen layer's bias is missing: call the base layer, self.base(x), "
                                         "rather than multiplying by its weight only")
        expect_close(got, want, f"LoRALinear(Linear(5, 4), {rank}, {alpha})(x) after A and B were set", atol=1e-5)


@points(1, visibility=HIDDEN)
def test_q1_batches_of_sequences_no_bias_and_gradients(LoRALinear):
    """works on inputs [B, T, in] and a base without bias; gradients reach B (and A once B moved), never the base"""
    base, layer = _lora(LoRALinear, n_in=4, n_out=6, rank=1, alpha=1.0, bias=False, seed=7)
    A = layer.lora_A.detach().clone()  # the layer's own random A, as it was made
    x = seeded_randn(2, 3, 4, seed=8)
    out = expect_tensor(layer(x), "LoRALinear(Linear(4, 6, bias=False), 1, 1.0)(x) for x [2, 3, 4]")
    expect_shape(out, (2, 3, 6), "the output for x [2, 3, 4]")
    out = layer(x)
    _fresh_gradients(layer, base)  # the gradients read below are this backward()'s alone
    out.pow(2).sum().backward()
    assert layer.lora_B.grad is not None and bool(layer.lora_B.grad.any()), "no gradient reached lora_B"
    assert base.weight.grad is None, "a gradient reached the frozen base weight: freeze it"
    B = seeded_randn(6, 1, seed=9)
    _set(layer.lora_B, B)
    layer.lora_A.grad = None
    with torch.no_grad():
        want = _linear(4, 6, bias=False, seed=7)(x) + (x @ A.T @ B.T)
    expect_close(layer(x).detach(), want, "the output on [2, 3, 4] inputs after B was set", atol=1e-5)
    out = layer(x)
    _fresh_gradients(layer, base)
    out.pow(2).sum().backward()
    assert layer.lora_A.grad is not None and bool(layer.lora_A.grad.any()), "no gradient reached lora_A once B ≠ 0"


# --- q2: merge_lora(layer) -> nn.Linear -----------------------------------------------------

def _trained_lora(n_in=5, n_out=3, rank=2, alpha=6.0, bias=True, seed=0, dtype=torch.float32):
    layer = _LoRALinear(_linear(n_in, n_out, bias=bias, seed=seed, dtype=dtype), rank, alpha, seed=seed + 1)
    _set(layer.lora_B, seeded_randn(n_out, rank, seed=seed + 2).to(dtype))
    return layer


def _merge_mistakes(layer):
    """``(scale, message)``: merged weights W + scale · B A that the tests name (scale 0: W itself)."""
    return ((1.0, "B A was added without the scaling alpha / rank"),
            (layer.alpha, "B A was scaled by alpha; the scaling is alpha / rank"),
            (1 / layer.scaling, "B A was scaled by rank / alpha; the scaling is alpha / rank"),
            (0.0, "the weight is the frozen W: the update was not added"),
            (-layer.scaling, "the update was subtracted; the merged weight is W + (alpha / rank) · B A"))


def _merged(merge_lora, layer, what):
    try:
        merged = merge_lora(layer)
    except RuntimeError as exc:
        if "cannot be multiplied" in str(exc) or "size mismatch" in str(exc):
            raise AssertionError(f"{what} raised RuntimeError ({exc}): the update is B A, [out, r] @ [r, in] = "
                                 "[out, in], the shape of W; A B is [r, in] @ [out, r]") from None
        raise
    if isinstance(merged, _LoRALinear) or type(merged).__name__ == "_LoRALinear":
        raise AssertionError(f"{what} returned the LoRA layer itself; return a plain nn.Linear whose weight is "
                             "W + (alpha / rank) · B A, so that inference runs the original layer and nothing else")
    assert type(merged) is nn.Linear, (f"{what} should return an nn.Linear, not a {type(merged).__name__}: merging "
                                       "folds the update into one ordinary layer, with no extra matrices to run")
    return merged


@points(2)
def test_q2_weight_and_outputs(merge_lora):
    """returns an nn.Linear with weight W + (alpha / rank) · B A, whose outputs equal the LoRA layer's"""
    layer = _trained_lora()
    twin = copy.deepcopy(layer)  # before the call: what the learner's code does to the layer moves no target
    what = "merge_lora(LoRA rank 2, alpha 6 on Linear(5, 3))"
    merged = _merged(merge_lora, layer, what)
    weight = expect_tensor(merged.weight, f"the weight of {what}")
    expect_shape(weight, (3, 5), f"the weight of {what}")
    want = _reference_merged_weight(twin)
    if not torch.allclose(weight, want, atol=1e-5):
        for scale, message in _merge_mistakes(twin):
            if torch.allclose(weight, _reference_merged_weight(twin, scale), atol=1e-5):
                raise AssertionError(f"{what}: {message}")
    expect_close(weight, want, f"the weight of {what}", atol=1e-5)
    x = seeded_randn(4, 5, seed=3)
    with torch.no_grad():
        expect_close(merged(x), twin(x), f"the outputs of {what} against the LoRA layer's", atol=1e-5)


@points(1)
def test_q2_leaves_the_lora_layer_alone(merge_lora):
    """does not change the LoRA layer: its base weight, A, B and outputs stay as they were"""
    layer = _trained_lora(seed=4)
    twin = copy.deepcopy(layer)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = seeded_randn(4, 5, seed=5)
    with torch.no_grad():
        out = layer(x)
    merged = _merged(merge_lora, layer, "merge_lora(layer)")
    # An answer that merges nothing (returns layer.base, or a fresh nn.Linear) leaves the layer alone too: the
    # merged weight must be W + scale · B A, with the right scale or a mistake test_q2_weight_and_outputs names.
    weight = expect_tensor(merged.weight, "the merged weight")
    assert tuple(weight.shape) == (3, 5) and any(
        torch.allclose(weight, _reference_merged_weight(twin, scale), atol=1e-5)
        for scale in [twin.scaling] + [scale for scale, _ in _merge_mistakes(twin) if scale != 0.0]), (
        "the merged layer's weight is not W + (alpha / rank) · B A (nor W plus B A at another scale): a layer "
        "without the update merged in leaves the LoRA layer alone trivially; get test_q2_weight_and_outputs right first")
    changed = [k for k, v in layer.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, (
        f"merge_lora changed the LoRA layer ({', '.join(changed)}): build the merged weight in a new tensor, so that "
        "the adapter can still be switched off or swapped (peft's merge_and_unload merges in place; here you return "
        "a new layer)")
    with torch.no_grad():
        expect_close(layer(x), out, "the LoRA layer's outputs after merging", atol=0)


@points(1)
def test_q2_bias_and_dtype(merge_lora):
    """keeps the base layer's bias (or none), and its dtype"""
    layer = _trained_lora(seed=6)
    bias = layer.base.bias.detach().clone()  # ours: the learner's code may change the layer's in place
    merged = _merged(merge_lora, layer, "merge_lora(layer)")
    assert merged.bias is not None, "the merged layer has no bias, but the base layer has one: copy it"
    expect_close(merged.bias, bias, "the merged layer's bias (the base layer's)", atol=0)
    layer = _trained_lora(bias=False, seed=7)
    merged = _merged(merge_lora, layer, "merge_lora(a layer without bias)")
    assert merged.bias is None or not bool(merged.bias.detach().any()), (
        "the base layer has no bias, but the merged layer has a non-zero one (a fresh nn.Linear's random bias?): "
        "use bias=base.bias is not None")
    layer = _trained_lora(seed=8, dtype=torch.float64)
    want = _reference_merged_weight(layer).clone()
    merged = _merged(merge_lora, layer, "merge_lora(a float64 layer)")
    assert merged.weight.dtype == torch.float64, f"a float64 layer was merged into {merged.weight.dtype}; keep its dtype"
    expect_close(merged.weight, want, "the merged weight of a float64 layer", atol=1e-10)


@points(1, visibility=HIDDEN)
def test_q2_other_shapes_and_ranks(merge_lora):
    """right for other shapes, ranks and alphas"""
    for n_in, n_out, rank, alpha in ((8, 2, 1, 1.0), (3, 9, 3, 12.0), (6, 6, 4, 2.0)):
        layer = _trained_lora(n_in, n_out, rank, alpha, seed=n_in)
        want = _reference_merged_weight(layer).clone()  # before the call
        merged = _merged(merge_lora, layer, f"merge_lora(rank {rank} on Linear({n_in}, {n_out}))")
        expect_close(merged.weight, want,
                     f"the merged weight for rank {rank}, alpha {alpha} on Linear({n_in}, {n_out})", atol=1e-5)


# --- q3: bitfit(model) -> number of trainable values ---------------------------------------

class _BiasNet(nn.Module):
    """A small timm-style network with biased convolutions and linear layers, GroupNorm and
    LayerNorm, and a head ``classifier`` found by ``get_classifier()``."""

    def __init__(self, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = nn.Conv2d(3, 8, 3, padding=1)  # bias=True
            self.gn = nn.GroupNorm(2, 8)
            self.proj = nn.Linear(8, 6)
            self.ln = nn.LayerNorm(6)
            self.classifier = nn.Linear(6, 3)

    def get_classifier(self):
        return self.classifier

    def forward(self, x):
        x = self.gn(self.stem(x)).mean(dim=(2, 3))
        return self.classifier(self.ln(self.proj(x)))


def _names_trainable(params):
    # Our own references, taken before the learner's code ran.
    return {n for n, p in params.items() if p.requires_grad}


def _bitfit_mistakes(model, trainable, want):
    head = {n for n in want if n.startswith("classifier.")}
    scales = {f"{prefix}.weight" for prefix, m in model.named_modules() if isinstance(m, BATCHNORM)} & want
    gains = {f"{prefix}.weight" for prefix, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))}
    missing, extra = want - trainable, trainable - want
    if missing and missing <= head and not extra:
        return "the head is frozen: the new classifier starts from random weights and must train, whatever else is frozen"
    if scales and missing == scales and not extra:
        return ("BatchNorm's scales (their weight) are frozen. In this course's BitFit they train with the shifts: "
                "where convolutions have no bias, BatchNorm's shift is the bias and its scale sits beside it. (If you "
                "looked for BatchNorm with type(m) is nn.BatchNorm2d: timm's layers are BatchNormAct2d, a subclass; "
                "test isinstance(m, nn.modules.batchnorm._BatchNorm).)")
    if extra and extra <= gains and not missing:
        return ("the LayerNorm or GroupNorm gains (their weight) train: BitFit (Ben Zaken et al. 2022) trains biases "
                "only, and their shifts are biases; only BatchNorm's scale is added here, beside a shift that stands "
                "in for the convolutions' missing biases")
    if extra:
        return (f"{len(extra)} tensors that BitFit freezes are still trainable (e.g. {sorted(extra)[0]}): freeze every "
                "parameter first (model.requires_grad_(False)), then unfreeze the biases, BatchNorm's scales and the "
                "head")
    return None


def _expect_bitfit(bitfit, model, named=()):
    """Run ``bitfit(model)`` and compare what it left trainable with BitFit's tensors; ``named``:
    ``(names, message)`` pairs, the message raised when one of those names stayed frozen."""
    want = _reference_bitfit_names(model)
    params = dict(model.named_parameters())
    bitfit(model)
    trainable = _names_trainable(params)
    missing, extra = sorted(want - trainable), sorted(trainable - want)
    for names, message in named:
        if set(names) & set(missing):
            raise AssertionError(message)
    message = None if trainable == want else _bitfit_mistakes(model, trainable, want)
    if message:
        raise AssertionError(message)
    assert not missing and not extra, (
        f"{len(missing)} tensors BitFit trains are frozen (e.g. {(missing or ['-'])[0]}) and {len(extra)} it freezes are "
        f"trainable (e.g. {(extra or ['-'])[0]})")


@points(2)
def test_q3_efficientnet(bitfit):
    """on a timm-style EfficientNet (BatchNormAct2d layers): every BatchNorm scale and shift and the head train, nothing else"""
    _expect_bitfit(bitfit, TinyEfficientNet(num_classes=3))


@points(1)
def test_q3_biases_of_any_layer(bitfit):
    """on a network with biased convolutions and linear layers, GroupNorm and LayerNorm: every bias (their shifts too) and the head; their gains stay frozen"""
    _expect_bitfit(bitfit, _BiasNet(), named=[
        (("stem.bias", "proj.bias"), "the biases of the convolution and the linear layer are frozen: BitFit trains "
                                     "every bias term, whatever layer it belongs to (not only the normalisation layers')"),
        (("gn.bias", "ln.bias"), "a GroupNorm or LayerNorm shift (its bias) is frozen: it is a bias term, and BitFit "
                                 "trains every bias (transformers' LayerNorm biases included)"),
    ])


@points(1)
def test_q3_count_and_nothing_else_changed(bitfit):
    """returns how many values stay trainable (an int), also when the model came in frozen; weights and modules unchanged"""
    model = TinyEfficientNet(num_classes=3)
    model.requires_grad_(False)
    want_names = _reference_bitfit_names(model)
    params = dict(model.named_parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = model.classifier
    n = expect_int(bitfit(model), "bitfit(model)")
    trainable = _names_trainable(params)
    assert trainable == want_names, (
        "the model came in with every parameter frozen and BitFit's tensors are not all trainable afterwards: set "
        "requires_grad=True on them explicitly")
    want = sum(params[k].numel() for k in want_names)
    if n == len(want_names):
        raise AssertionError(f"got {n}: that is the number of trainable tensors; count their values (numel), {want}")
    if n == sum(p.numel() for p in params.values()) - want:
        raise AssertionError(f"got {n}: that is how many values were frozen; return how many stay trainable")
    assert n == want, f"BitFit leaves {want} values of this model trainable; bitfit returned {n}"
    assert model.classifier is head, "the head was replaced by a new layer; BitFit only chooses what trains"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"bitfit changed the model's weights or buffers ({changed[0]}); only set requires_grad"


# --- q4: interpolate(theta_0, theta_1, alpha) -> state dict --------------------------------

def _states(seed=0, num_classes=3):
    """Two state dicts of one TinyEfficientNet: floats (weights, running statistics) and int64 counters."""
    a, b = TinyEfficientNet(num_classes=num_classes, seed=seed), TinyEfficientNet(num_classes=num_classes, seed=seed + 1)
    theta_0, theta_1 = a.state_dict(), b.state_dict()
    g = torch.Generator().manual_seed(seed)
    for k in theta_0:  # distinct running statistics and counts, so that every kind of tensor is tested
        if "running" in k:
            theta_0[k] = theta_0[k] + torch.rand(theta_0[k].shape, generator=g)
            theta_1[k] = theta_1[k] + torch.rand(theta_1[k].shape, generator=g)
        elif k.endswith("num_batches_tracked"):
            theta_0[k], theta_1[k] = torch.tensor(120), torch.tensor(37)
    return theta_0, theta_1


def _interpolated(interpolate, theta_0, theta_1, alpha, what):
    copies = [{k: v.clone() for k, v in s.items()} for s in (theta_0, theta_1)]
    try:
        out = interpolate(copies[0], copies[1], alpha)
    except RuntimeError as exc:
        if "lerp" in str(exc) or "Long" in str(exc) or "integer" in str(exc).lower():
            raise AssertionError(f"{what} raised {type(exc).__name__} ({exc}): BatchNorm's num_batches_tracked is an "
                                 "integer tensor and cannot be interpolated; keep integer tensors as they are "
                                 "(from theta_1, say); interpolate floating-point ones only") from None
        raise
    assert isinstance(out, dict), f"{what} should return a dict (a state dict), not a {type(out).__name__}"
    for s, c in zip((theta_0, theta_1), copies):
        changed = [k for k in s if not torch.equal(s[k], c[k])]
        assert not changed, (f"{what} changed the state dicts it was given ({changed[0]}): build new tensors "
                             "(torch.lerp, or (1 − α)·a + α·b) instead of updating one in place")
    missing = [k for k in theta_0 if k not in out]
    if missing:
        kinds = "running statistics" if all("running" in k or "num_batches" in k for k in missing) else "tensors"
        raise AssertionError(f"{len(missing)} {kinds} of the state dict are missing from the result (e.g. {missing[0]}): "
                             "a state dict holds the buffers too; load_state_dict needs every key")
    assert list(out) == list(theta_0), "the result should have the same keys as the inputs (and no others)"
    return out


@points(2)
def test_q4_weights_and_statistics(interpolate):
    """every floating-point tensor (weights and BatchNorm running statistics) is (1 − alpha)·theta_0 + alpha·theta_1"""
    theta_0, theta_1 = _states()
    for alpha in (0.25, 0.0, 1.0):
        what = f"interpolate(theta_0, theta_1, {alpha})"
        out = _interpolated(interpolate, theta_0, theta_1, alpha, what)
        want = _reference_interpolate(theta_0, theta_1, alpha)
        floats = [k for k in theta_0 if theta_0[k].is_floating_point()]
        got = torch.cat([expect_tensor(out[k], f"{what}[{k!r}]").double().reshape(-1) for k in floats])
        ref = torch.cat([want[k].double().reshape(-1) for k in floats])
        if got.shape == ref.shape and not torch.allclose(got, ref, atol=1e-6):
            mirrored = torch.cat([_reference_interpolate(theta_0, theta_1, 1 - alpha)[k].double().reshape(-1)
                                  for k in floats])
            average = torch.cat([_reference_interpolate(theta_0, theta_1, 0.5)[k].double().reshape(-1) for k in floats])
            if torch.allclose(got, mirrored, atol=1e-6):
                raise AssertionError(f"{what} is (1 − α)·theta_1 + α·theta_0: α is the weight of theta_1 (the "
                                     "fine-tuned model), so α = 0 gives theta_0 and α = 1 gives theta_1")
            if torch.allclose(got, average, atol=1e-6):
                raise AssertionError(f"{what} is the plain average; weight the two by (1 − α) and α")
            bad = next(k for k in floats if not torch.allclose(out[k].double(), want[k].double(), atol=1e-6))
            raise AssertionError(f"{what}[{bad!r}] is not (1 − α)·theta_0 + α·theta_1")
        for k in floats:
            expect_close(out[k], want[k], f"{what}[{k!r}]", atol=1e-6)
            assert out[k].dtype == theta_0[k].dtype, f"{what}[{k!r}] is {out[k].dtype}, not {theta_0[k].dtype}"


@points(1)
def test_q4_integer_buffers(interpolate):
    """integer tensors (BatchNorm's num_batches_tracked) stay integers, taken unchanged from one of the two models"""
    theta_0, theta_1 = _states(seed=3)
    out = _interpolated(interpolate, theta_0, theta_1, 0.5, "interpolate(theta_0, theta_1, 0.5)")
    # Returning theta_0 or theta_1 as they are keeps their counts too: the weights must be interpolated first.
    want = _reference_interpolate(theta_0, theta_1, 0.5)
    for k in (k for k in theta_0 if theta_0[k].is_floating_point()):
        expect_close(out[k], want[k], f"interpolate(theta_0, theta_1, 0.5)[{k!r}] (the weights first; see "
                                      "test_q4_weights_and_statistics)", atol=1e-6)
    for k in (k for k in theta_0 if not theta_0[k].is_floating_point()):
        v = expect_tensor(out[k], f"the result's {k}")
        assert not v.is_floating_point(), (
            f"the result's {k} became a {v.dtype} tensor: integer tensors count something (batches seen) and are not "
            "weights; keep them as they are")
        assert torch.equal(v, theta_0[k]) or torch.equal(v, theta_1[k]), (
            f"the result's {k} is {v.tolist()}, neither model's value ({theta_0[k].tolist()}, {theta_1[k].tolist()}): "
            "keep an integer tensor unchanged from one model")


@points(1, visibility=HIDDEN)
def test_q4_new_tensors_extrapolation_and_other_models(interpolate):
    """the result's tensors are new (changing them leaves the inputs alone), alpha outside [0, 1] extrapolates, and float64 stays float64"""
    theta_0, theta_1 = _states(seed=5, num_classes=2)
    for alpha in (0.0, 1.0, 1.5, -0.5):
        copies = [{k: v.clone() for k, v in s.items()} for s in (theta_0, theta_1)]
        out = interpolate(copies[0], copies[1], alpha)
        want = _reference_interpolate(theta_0, theta_1, alpha)
        for k, v in want.items():
            if v.is_floating_point():
                expect_close(out[k], v, f"interpolate(..., {alpha})[{k!r}]", atol=1e-5)
            else:
                assert torch.equal(out[k], theta_0[k]) or torch.equal(out[k], theta_1[k]), (
                    f"interpolate(..., {alpha})[{k!r}] is neither model's count")
        for v in out.values():
            with torch.no_grad():
                v.add_(1)
        changed = [k for s, c in zip((theta_0, theta_1), copies) for k in s if not torch.equal(s[k], c[k])]
        assert not changed, (f"with alpha = {alpha}, changing the result in place changed an input ({changed[0]}): "
                             "return new tensors (clone), never the inputs' own")
    a = {"w": seeded_randn(3, 2, seed=1).double()}
    b = {"w": seeded_randn(3, 2, seed=2).double()}
    out = interpolate(a, b, 0.3)
    assert out["w"].dtype == torch.float64, "a float64 tensor should stay float64"
    expect_close(out["w"], 0.7 * a["w"] + 0.3 * b["w"], "interpolate on float64 tensors", atol=1e-12)


@points(1, visibility=HIDDEN)
def test_q4_refuses_different_models(interpolate):
    """raises an error for state dicts of different models (other keys, or a tensor of another shape) instead of mixing them"""
    theta_0, theta_1 = _states(seed=6)
    _interpolated(interpolate, theta_0, theta_1, 0.5, "interpolate(theta_0, theta_1, 0.5)")  # it works at all
    shorter = dict(theta_1)
    shorter.pop("classifier.bias")
    cases = [("a key missing from theta_1", theta_0, shorter), ("a key missing from theta_0", shorter, theta_1)]
    one = TinyEfficientNet(num_classes=1, seed=7).state_dict()
    three = TinyEfficientNet(num_classes=1, seed=8).state_dict()
    three["classifier.bias"] = torch.zeros(3)  # broadcasts with [1]: no error unless the shapes are checked
    cases.append(("a [1] bias against a [3] bias", one, three))
    for what, a, b in cases:
        try:
            interpolate(a, b, 0.5)
        except Exception:  # any error will do (a ValueError says most)
            continue
        raise AssertionError(f"interpolate returned a result for two different models ({what}): check that the keys "
                             "and every tensor's shape agree and raise a ValueError otherwise (a [1] and a [3] tensor "
                             "broadcast silently)")


# --- q5: entropy_loss(logits) -> 0-d tensor; tent_parameters(model) -> list of parameters ----

def _entropy_value(entropy_loss, logits, what):
    leaf = logits.detach().clone().requires_grad_(True)
    value = expect_loss(entropy_loss(leaf), what)
    leaf.grad = None  # a .grad the learner's code wrote is not a gradient of its loss
    return value, leaf


def _entropy_mistakes(logits):
    p = logits.double().softmax(1)
    logp = logits.double().log_softmax(1)
    per_row = -(p * logp).sum(1)
    p0, logp0 = logits.double().softmax(0), logits.double().log_softmax(0)
    return [
        (per_row.sum(), "the entropies were summed over the batch; take their mean, so that the step does not grow "
                        "with the batch size"),
        (-per_row.mean(), "the sign is wrong: entropy is −Σ p log p, which is ≥ 0; Tent minimises it"),
        (per_row.mean() / math.log(2), "that is the entropy in bits (log2); use the natural log (nats)"),
        (-(p0 * logp0).sum(0).mean(), "the softmax was taken over the batch (dim 0); take it over the classes (dim 1)"),
        (-logp.max(1).values.mean(), "that is the cross-entropy with the predicted class (a hard pseudo-label); Tent "
                                     "minimises the entropy of the whole distribution, −Σ_c p_c log p_c"),
    ]


@points(1.5)
def test_q5_entropy_value(entropy_loss):
    """the mean over the batch of −Σ_c p_c log p_c (nats), p = softmax(logits): log C for equal logits, near 0 for a sure prediction"""
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-3.0, 4.0, 0.0], [1.0, 1.0, -2.0]])
    value, _ = _entropy_value(entropy_loss, logits, "entropy_loss(logits [4, 3])")
    got, want = float(value.detach()), _reference_entropy(logits)
    message = first_match(got, want, _entropy_mistakes(logits))
    if message:
        raise AssertionError(f"entropy_loss(logits [4, 3]) = {got:.5g}, not {want:.5g}: {message}")
    assert close(got, want, rtol=1e-5, atol=1e-6), f"entropy_loss(logits [4, 3]) should be {want:.5g}, not {got:.5g}"
    flat, _ = _entropy_value(entropy_loss, torch.zeros(2, 5), "entropy_loss(zeros [2, 5])")
    assert close(float(flat.detach()), math.log(5), atol=1e-6), (
        f"equal logits over 5 classes should give log 5 = {math.log(5):.5g} (the largest entropy), not {float(flat):.5g}")


@points(1)
def test_q5_entropy_stable_and_differentiable(entropy_loss):
    """finite for very confident logits (log_softmax, not log(softmax)), and its gradient reaches the logits"""
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 50.0, 0.0]])
    value, leaf = _entropy_value(entropy_loss, logits, "entropy_loss(logits with 1000)")
    got = float(value.detach())
    assert math.isfinite(got), ("entropy_loss gave nan or inf for logits of ±1000: softmax underflows to exactly 0 and "
                                "0 · log 0 = 0 · (−inf) = nan; compute log p with log_softmax and p = log p.exp()")
    assert close(got, _reference_entropy(logits), atol=1e-6), f"for logits of ±1000 the entropy is ~0, not {got:.5g}"
    logits = seeded_randn(6, 4, seed=2)
    value, leaf = _entropy_value(entropy_loss, logits, "entropy_loss(logits [6, 4])")
    # A loss that is 0 on confident logits and sends some gradient (logits - logits.detach()) is not the entropy:
    # the value and the gradient are those of the entropy.
    want = _reference_entropy(logits)
    assert close(float(value.detach()), want, rtol=1e-5, atol=1e-6), (
        f"entropy_loss(logits [6, 4]) should be {want:.5g}, not {float(value.detach()):.5g}")
    assert value.requires_grad, "the loss is cut from the autograd graph (no_grad, .detach(), .item()?)"
    value.backward()
    assert leaf.grad is not None and bool(leaf.grad.any()), "no gradient reached the logits"
    assert bool(torch.isfinite(leaf.grad).all()), "the gradient with respect to the logits is not finite"
    ref = logits.double().requires_grad_(True)
    log_p = ref.log_softmax(1)
    (-(log_p.exp() * log_p).sum(1).mean()).backward()
    expect_close(leaf.grad, ref.grad, "the gradient of entropy_loss with respect to the logits", atol=1e-6)


class _TentNet(TinyEfficientNet):
    """TinyEfficientNet with dropout before the head, put in eval mode (a deployed model)."""

    def __init__(self, seed=0):
        super().__init__(num_classes=4, dropout=0.5, seed=seed)


def _batch_stat_logits(state, x):
    """The logits of the model with weights ``state``, every BatchNorm normalising by the batch's
    own statistics, and no dropout."""
    ref = TinyEfficientNet(num_classes=4, dropout=0.5)
    ref.load_state_dict(state)
    ref.eval()
    for m in ref.modules():
        if isinstance(m, BATCHNORM):
            m.train()
    with torch.no_grad():
        return ref(x)


def _source_logits(state, x):
    ref = TinyEfficientNet(num_classes=4, dropout=0.5)
    ref.load_state_dict(state)
    with torch.no_grad():
        return ref.eval()(x)


def _tent(tent_parameters, seed=0):
    model = _TentNet(seed).eval()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    want = _reference_tent_names(model)  # before the call, which may change the model's layers
    returned = tent_parameters(model)
    assert isinstance(returned, (list, tuple)), (
        f"tent_parameters(model) should return a list of parameters (for the optimiser), not a {type(returned).__name__}")
    by_id = {id(p): n for n, p in params.items()}
    names = []
    for p in returned:
        assert id(p) in by_id, ("tent_parameters returned something that is not one of the model's parameters; return "
                                "the BatchNorm layers' weight and bias tensors themselves")
        names.append(by_id[id(p)])
    return model, snapshot, params, names, want


@points(1.5)
def test_q5_tent_parameters_returned_and_trainable(tent_parameters):
    """returns exactly the BatchNorm scales and shifts (timm's BatchNormAct2d included), the only parameters left trainable"""
    model, _, params, names, want = _tent(tent_parameters)
    assert names, ("tent_parameters returned no parameters. timm's BatchNorm layers are BatchNormAct2d, a subclass of "
                   "nn.BatchNorm2d: test isinstance(m, nn.modules.batchnorm._BatchNorm), not type(m) is nn.BatchNorm2d")
    assert len(names) == len(set(names)), "a parameter is returned twice"
    got = set(names)
    if "classifier.weight" in got or "classifier.bias" in got:
        raise AssertionError("the head is among Tent's parameters: Tent adapts only the BatchNorm scales and shifts; "
                             "a head updated without labels drifts to confident wrong answers")
    assert got == want, (f"tent_parameters should return the {len(want)} BatchNorm weight and bias tensors; it returned "
                         f"{len(got)} tensors, {len(got & want)} of them BatchNorm's")
    trainable = _names_trainable(params)
    extra = sorted(trainable - want)
    assert not extra, (f"{len(extra)} parameters that are not BatchNorm's still require grad (e.g. {extra[0]}): freeze "
                       "everything first (model.requires_grad_(False)); only the returned ones may train")
    assert trainable == want, "some of the returned BatchNorm parameters do not require grad: set requires_grad=True"


@points(1.5)
def test_q5_tent_normalises_by_the_batch_with_dropout_off(tent_parameters):
    """afterwards the model normalises every batch by its own statistics (BatchNorm in train mode) and the rest stays in eval mode: no dropout"""
    model, snapshot, _, _, _ = _tent(tent_parameters, seed=1)
    x = seeded_randn(8, 3, 16, 16, seed=4, scale=2.0, shift=0.5)
    with torch.no_grad():
        first = expect_tensor(model(x), "the model's logits after tent_parameters(model)")
        second = model(x)
    if not torch.allclose(first, second, atol=1e-6):
        raise AssertionError("the same batch gave two different outputs: dropout is on. Put only the BatchNorm layers "
                             "in train mode; the paper's model.train() also switches on dropout (and stochastic depth "
                             "in timm), noise Tent does not need")
    want, source = _batch_stat_logits(snapshot, x), _source_logits(snapshot, x)
    if torch.allclose(first, source, atol=1e-5) and not torch.allclose(source, want, atol=1e-5):
        raise AssertionError("the BatchNorm layers still normalise with the source's running statistics (eval mode): "
                             "Tent normalises each test batch by its own statistics; put the BatchNorm layers in "
                             "train mode (or drop their running statistics)")
    expect_close(first, want, "the logits after tent_parameters(model), against BatchNorm on batch statistics", atol=1e-4)
