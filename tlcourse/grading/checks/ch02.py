"""Checks for chapter 02 (fine-tuning): last-k blocks, layer-wise learning rates, frozen
BatchNorm statistics, a warm-up + cosine schedule.

Like chapter 01's, the checks use a miniature of timm's EfficientNet (same attribute layout:
``conv_stem, bn1, blocks[stage][block], conv_head, bn2, global_pool, classifier``; BN layers
are a ``BatchNorm2d`` subclass like timm's ``BatchNormAct2d``), so a question grades in
milliseconds. It is defined again here rather than imported, so each checks module stands
alone (e.g. in a hidden-tests folder). Format: :mod:`tlcourse.grading.spec`.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from tlcourse.grading.spec import expect_int, expect_float, points

QUESTIONS = {
    "q1": {"title": "unfreezing the last k stages", "functions": ["unfreeze_last_blocks"]},
    "q2": {"title": "layer-wise learning rates", "functions": ["layerwise_param_groups"]},
    "q3": {"title": "BatchNorm statistics kept frozen", "functions": ["set_batchnorm_eval"]},
    "q4": {"title": "warm-up + cosine schedule", "functions": ["warmup_cosine_lr"]},
}


from tlcourse.grading.checks import _tiny
from tlcourse.grading.checks._tiny import BatchNormAct2d  # noqa: F401


class TinyEfficientNet(_tiny.TinyEfficientNet):
    """The miniature EfficientNet with dropout before the classifier, as in timm: a
    BatchNorm helper must leave that dropout in training mode."""

    def __init__(self, **kwargs):
        super().__init__(dropout=0.2, **kwargs)


def _images(n=4, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def _depth(name, stages=4):
    """Depth of a parameter counted from the output: 0 head, 1 last stage (+ conv_head, bn2), ..."""
    if name.startswith("classifier."):
        return 0
    if name.startswith(("conv_head.", "bn2.")):
        return 1
    if name.startswith(("conv_stem.", "bn1.")):
        return stages
    return stages - int(name.split(".")[1])


def _trainable(params):
    return {name for name, p in params.items() if type(p) is nn.Parameter and p.requires_grad}


def _describe(names):
    """Group parameter names into the parts of the model they belong to, for messages."""
    parts = []
    for n in sorted(names):
        part = ".".join(n.split(".")[:2]) if n.startswith("blocks.") else n.split(".")[0]
        if part not in parts:
            parts.append(part)
    return ", ".join(parts)


# --- q1: unfreeze_last_blocks(model, k) -> trainable values -------------------------------

def _run_q1(unfreeze_last_blocks, k, start_frozen):
    model = TinyEfficientNet()
    params = dict(model.named_parameters())
    model.requires_grad_(not start_frozen)
    n = expect_int(unfreeze_last_blocks(model, k), f"unfreeze_last_blocks(model, {k})")
    return params, _trainable(params), n


def _expected_q1(params, k):
    names = {n for n in params if _depth(n) <= k}
    return names, sum(params[n].numel() for n in names)


@points(1)
def test_q1_head_only_for_k0(unfreeze_last_blocks):
    """k = 0 leaves only the classifier trainable, and returns its number of values"""
    params, got, n = _run_q1(unfreeze_last_blocks, 0, start_frozen=True)
    want, count = _expected_q1(params, 0)
    if any(name.startswith("blocks.0.") for name in got):
        raise AssertionError("with k = 0 every stage is trainable: model.blocks[-0:] is the *whole* list "
                             "(-0 == 0); handle k = 0 on its own, or slice blocks[len(model.blocks) - k:]")
    assert got == want, f"with k = 0 only the classifier should be trainable; trainable now: {_describe(got) or 'nothing'}"
    assert n == count, f"the classifier has {count} values, so return {count}, not {n}"


@points(2)
def test_q1_last_k_stages(unfreeze_last_blocks):
    """k = 2 unfreezes the classifier, conv_head + bn2 and the last 2 stages, nothing else"""
    params, got, n = _run_q1(unfreeze_last_blocks, 2, start_frozen=True)
    want, count = _expected_q1(params, 2)
    if any(name.startswith(("blocks.0.", "blocks.1.")) for name in got) and not any(
            name.startswith("blocks.3.") for name in got):
        raise AssertionError("you unfroze the first k stages (blocks[:k]); fine-tuning unfreezes the last ones, "
                             "nearest the head, whose features are the most task-specific: blocks[-k:]")
    missing, extra = want - got, got - want
    if {"conv_head.weight"} & missing or {"bn2.weight"} & missing:
        raise AssertionError("conv_head and bn2 (the 1x1 convolution + BN between the last stage and the pooling) "
                             "are still frozen; they belong to the last stage, so unfreeze them whenever k >= 1")
    assert not missing, f"these should be trainable with k = 2 but are frozen: {_describe(missing)}"
    assert not extra, f"these should stay frozen with k = 2 but are trainable: {_describe(extra)}"
    assert n == count, f"{count} values are trainable with k = 2; you returned {n}"


@points(1)
def test_q1_freezes_the_rest_first(unfreeze_last_blocks):
    """freezes everything else first: a fully trainable model ends with only the last k stages trainable"""
    params, got, n = _run_q1(unfreeze_last_blocks, 1, start_frozen=False)
    want, count = _expected_q1(params, 1)
    assert got == want, ("the model came in fully trainable and stages below the last k are still trainable: "
                         "start by freezing the whole model, then unfreeze the head and the last k stages "
                         f"(trainable now: {_describe(got - want)} too)")
    assert n == count, f"{count} values are trainable with k = 1; you returned {n}"


@points(1)
def test_q1_whole_model(unfreeze_last_blocks):
    """k >= len(model.blocks) unfreezes the whole model, conv_stem and bn1 included"""
    params, got, n = _run_q1(unfreeze_last_blocks, 4, start_frozen=True)
    missing = set(params) - got
    assert not missing, (f"with k = len(model.blocks) the whole model should be trainable, but these are frozen: "
                         f"{_describe(missing)} (the stem belongs to the first stage)")
    _, got, n9 = _run_q1(unfreeze_last_blocks, 9, start_frozen=True)
    assert got == set(params), "with k larger than the number of stages the whole model should be trainable"
    total = sum(p.numel() for p in params.values())
    assert n == n9 == total, f"the whole model has {total} values; you returned {n} (k=4) and {n9} (k=9)"


# --- q2: layerwise_param_groups(model, base_lr, decay) -> list of dicts -------------------

def _groups(layerwise_param_groups, model, base_lr=0.01, decay=0.5):
    groups = layerwise_param_groups(model, base_lr, decay)
    if not isinstance(groups, list):
        assert isinstance(groups, tuple) or hasattr(groups, "__next__"), (
            f"return a list of dicts, not a {type(groups).__name__}")
        groups = list(groups)
    for i, g in enumerate(groups):
        assert type(g) is dict, f"group {i} should be a dict with 'params' and 'lr', not a {type(g).__name__}"
        assert "params" in g and "lr" in g, f"group {i} needs the keys 'params' and 'lr'; it has {sorted(g)}"
        g["params"] = list(g["params"])  # a generator would be used up by the first reader
    return groups


def _expect_core(params, lrs):
    """The groups hold (at least) the classifier's and every stage's parameters: the tests of other
    properties ask for it first, since groups that hold nothing have them for free. (Every parameter,
    conv_stem, bn1, conv_head and bn2 included, is test_q2_learning_rates' business.)"""
    missing = {n for n in params if n.startswith(("classifier.", "blocks."))} - set(lrs)
    assert not missing, (f"the groups should hold the model's trainable parameters; these are in no group: "
                         f"{_describe(missing)}")


def _lr_of(groups, params):
    """name -> list of the learning rates of the groups that hold that parameter."""
    by_id = {id(p): n for n, p in params.items()}
    out = {}
    for g in groups:
        for p in g["params"]:
            name = by_id.get(id(p))
            assert name is not None and type(p) is nn.Parameter, (
                "a group holds a tensor that is not one of the model's parameters (a copy, or p.data?); "
                "the optimizer must hold the model's own nn.Parameter objects, or training changes nothing")
            out.setdefault(name, []).append(g["lr"])
    return out


@points(1)
def test_q2_optimizer_accepts(layerwise_param_groups):
    """gives groups torch.optim.AdamW accepts: dicts with 'params' and 'lr', each parameter in one group"""
    model = TinyEfficientNet()
    params = dict(model.named_parameters())
    groups = _groups(layerwise_param_groups, model)
    lrs = _lr_of(groups, params)
    twice = sorted(n for n, v in lrs.items() if len(v) > 1)
    assert not twice, (f"{len(twice)} parameters are in more than one group (e.g. {twice[0]}); AdamW refuses "
                       "that. Build each group from its own part of the model (the head group from "
                       "model.classifier only), never from model.parameters()")
    # AdamW also accepts groups that hold nothing, which train nothing: the head and the stages at least.
    _expect_core(params, lrs)
    for i, g in enumerate(groups):
        assert type(g["lr"]) in (float, int) and g["lr"] >= 0, f"group {i}'s 'lr' should be a number >= 0, not {g['lr']!r}"
    try:
        torch.optim.AdamW(groups, lr=1.0)
    except (ValueError, TypeError) as exc:
        raise AssertionError(f"torch.optim.AdamW(groups) refused the groups: {exc}") from None


@points(2)
def test_q2_learning_rates(layerwise_param_groups):
    """head: base_lr; last stage (+ conv_head, bn2): base_lr*decay; ...; first stage (+ stem): base_lr*decay**4"""
    model = TinyEfficientNet()
    params = dict(model.named_parameters())
    lrs = _lr_of(_groups(layerwise_param_groups, model, 0.01, 0.5), params)
    head = lrs.get("classifier.weight", [None])[0]
    stem = lrs.get("conv_stem.weight", [None])[0]
    if head is not None and stem is not None and head < stem:
        raise AssertionError(f"the head has the smallest learning rate ({head:g}) and the stem the largest "
                             f"({stem:g}): it is the other way round. The new head learns from scratch "
                             "(base_lr); early layers hold generic features and should move least")
    for name, p in params.items():
        want = 0.01 * 0.5 ** _depth(name)
        assert name in lrs, (f"{name} is trainable but in no group: conv_stem and bn1 go with blocks[0], "
                             "conv_head and bn2 with blocks[-1]")
        got = lrs[name][0]
        assert abs(got - want) < 1e-12, (f"{name} has lr {got:g}; expected base_lr * decay ** {_depth(name)} "
                                         f"= {want:g} (depth counts from the head: classifier 0, "
                                         "blocks[-1] 1, blocks[-2] 2, ...)")


@points(1)
def test_q2_only_trainable(layerwise_param_groups):
    """puts only trainable parameters into the groups (here the model's first two stages are frozen)"""
    model = TinyEfficientNet()
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(_depth(name) <= 2)
    # Which ones are trainable is decided here, before the call: the learner's code may change requires_grad.
    trainable = {n for n in params if _depth(n) <= 2}
    lrs = _lr_of(_groups(layerwise_param_groups, model), params)
    frozen = set(lrs) - trainable
    assert not frozen, (f"frozen parameters are in the groups ({_describe(frozen)}); leave out those with "
                        "requires_grad=False: the optimizer only needs what it trains, and the groups then "
                        "show what is really being fine-tuned")
    missing = trainable - set(lrs)
    assert not missing, f"trainable parameters missing from the groups: {_describe(missing)}"
    changed = sorted(n for n, p in params.items() if p.requires_grad != (n in trainable))
    assert not changed, f"building the groups changed requires_grad ({_describe(changed)}); leave the model as it is"


@points(1)
def test_q2_decay_one_is_uniform(layerwise_param_groups):
    """with decay = 1 every group gets base_lr, and the model is left unchanged"""
    model = TinyEfficientNet()
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    lrs = _lr_of(_groups(layerwise_param_groups, model, 3e-4, 1.0), params)
    _expect_core(params, lrs)  # no groups at all would pass the rest
    assert all(abs(v[0] - 3e-4) < 1e-15 for v in lrs.values()), "with decay = 1 every parameter should get base_lr"
    assert all(p.requires_grad for p in params.values()), "building the groups should not freeze or unfreeze anything"
    assert all(torch.equal(before[n], p) for n, p in params.items()), "building the groups changed the weights"


# --- q3: set_batchnorm_eval(model) -> the model -------------------------------------------

def _bn_net():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        return nn.Sequential(TinyEfficientNet(num_classes=6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 2))


def _bn_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _expect_bn_eval(layers, what):
    """The backbone's BN layers (timm's BatchNormAct2d; our references, taken before the call) in eval
    mode: the tests of what else the function leaves alone ask for it first, since a function that does
    nothing leaves everything alone. (The BatchNorm1d after the backbone is the first test's business.)"""
    layers = [(n, m) for n, m in layers if isinstance(m, nn.BatchNorm2d)]
    still = [n for n, m in layers if m.training]
    assert not still, (f"{len(still)} of the backbone's {len(layers)} BatchNorm layers are still in train mode "
                       f"(e.g. {still[0]}), so {what} says nothing yet; the first test says what is off")


def _forward_seeded(model, x, seed=0):
    """``model(x)`` with the random state (dropout) fixed and the global one left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model(x)


@points(2)
def test_q3_batchnorm_in_eval_mode(set_batchnorm_eval):
    """after model.train(), puts every BatchNorm layer (timm's BatchNormAct2d and BatchNorm1d too) in eval mode"""
    model = _bn_net().train()
    layers = _bn_layers(model)
    set_batchnorm_eval(model)
    still = [(n, m) for n, m in layers if m.training]
    if still and all(type(m) is not nn.BatchNorm2d for _, m in still) and any(
            isinstance(m, nn.BatchNorm2d) for _, m in still):
        raise AssertionError("timm's BN layers are BatchNormAct2d, a subclass of nn.BatchNorm2d, and they are "
                             "still in train mode: test isinstance(m, _BatchNorm) (from torch.nn.modules.batchnorm), "
                             "not type(m) is nn.BatchNorm2d")
    if still and all(isinstance(m, nn.BatchNorm1d) for _, m in still):
        raise AssertionError("the BatchNorm1d layer is still in train mode: test for _BatchNorm "
                             "(from torch.nn.modules.batchnorm), the base class of BatchNorm1d, 2d and 3d")
    assert not still, f"{len(still)} of {len(layers)} BatchNorm layers are still in train mode (e.g. {still[0][0]})"


@points(1)
def test_q3_other_layers_still_train(set_batchnorm_eval):
    """leaves every other layer in train mode (Dropout keeps working)"""
    model = _bn_net().train()
    others = [(n, m) for n, m in model.named_modules() if not isinstance(m, nn.modules.batchnorm._BatchNorm)]
    layers = _bn_layers(model)
    set_batchnorm_eval(model)
    _expect_bn_eval(layers, "which other layers stay in train mode")
    off = [n or "the model itself" for n, m in others if not m.training]
    assert not off, (f"{len(off)} layers that are not BatchNorm are in eval mode too (e.g. {off[0]}): model.eval() "
                     "also switches Dropout off; put only the BN layers in eval mode (m.eval() on each)")


@points(2)
def test_q3_running_statistics_fixed(set_batchnorm_eval):
    """a training forward pass afterwards leaves every running mean, variance and batch count unchanged"""
    model = _bn_net().train()
    layers = _bn_layers(model)
    before = {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for n, m in layers}
    # What the model should compute: a copy of ours with its BN layers (and only them) in eval mode, or
    # (model.eval(), whose mistake is the previous test's) with every layer in eval mode.
    reference = _bn_net().train()
    for _, m in _bn_layers(reference):
        m.eval()
    with torch.no_grad():
        wants = [_forward_seeded(reference, _images(8)), _forward_seeded(reference.eval(), _images(8))]
    returned = set_batchnorm_eval(model)
    assert returned is model, "set_batchnorm_eval should return the model it was given"
    with torch.no_grad():
        got = _forward_seeded(model, _images(8))
    moved = [n for n, m in layers if not (torch.equal(m.running_mean, before[n][0])
                                          and torch.equal(m.running_var, before[n][1])
                                          and int(m.num_batches_tracked) == before[n][2])]
    assert not moved, (f"the running statistics of {len(moved)} BN layers changed (e.g. {moved[0]}). "
                       "requires_grad=False does not stop them: running_mean and running_var are buffers, "
                       "updated by every forward pass in train mode; eval mode is what fixes them")
    # Statistics can also stay put because they are no longer used (track_running_stats=False: each batch
    # normalised with its own statistics) or no longer in the model: the outputs tell.
    assert type(got) is torch.Tensor and any(got.shape == w.shape and torch.allclose(got, w, atol=1e-5)
                                             for w in wants), (
        "the model's outputs after set_batchnorm_eval differ from those of the same model with its BN layers in "
        "eval mode: they should normalise with their running statistics (BN layers kept, only their mode changed)")


@points(1)
def test_q3_gamma_beta_still_learn(set_batchnorm_eval):
    """changes only the mode: BN's weight and bias keep requires_grad and get gradients"""
    model = _bn_net().train()
    bn = model[0].bn2
    layers = _bn_layers(model)
    set_batchnorm_eval(model)
    _expect_bn_eval(layers, "that only their mode changed")
    model(_images(4)).sum().backward()
    assert bn.weight.requires_grad and bn.weight.grad is not None, (
        "BN's weight (gamma) no longer learns; set_batchnorm_eval should change only the mode, not requires_grad")


# --- q4: warmup_cosine_lr(step, warmup_steps, total_steps, base_lr, min_lr) -> float ------

def _reference_lr(step, warmup, total, base_lr, min_lr):
    """The schedule in closed form; tests/test_grading_ch01_02.py checks that it equals torch's
    SequentialLR(LinearLR(start_factor ~ 0), CosineAnnealingLR(eta_min=min_lr)) at every step."""
    if step < warmup:
        return base_lr * step / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def _curve(warmup_cosine_lr, warmup, total, base_lr, min_lr=0.0, steps=None):
    steps = range(total + 1) if steps is None else steps
    return [expect_float(warmup_cosine_lr(s, warmup, total, base_lr, min_lr),
                          f"warmup_cosine_lr({s}, {warmup}, {total}, {base_lr})") for s in steps]


@points(2)
def test_q4_matches_torch_schedulers(warmup_cosine_lr):
    """matches torch's LinearLR (from 0) + CosineAnnealingLR (to min_lr) at every step 0..total_steps"""
    for warmup, total, base, low in ((5, 20, 0.1, 0.0), (3, 12, 2e-3, 1e-4)):
        got = _curve(warmup_cosine_lr, warmup, total, base, low)
        want = [_reference_lr(t, warmup, total, base, low) for t in range(total + 1)]
        mid = warmup + (total - warmup) // 2
        no_pi = low + (base - low) * 0.5 * (1 + math.cos((mid - warmup) / (total - warmup)))
        if abs(got[mid] - no_pi) < 1e-9 * base + 1e-15 and abs(no_pi - want[mid]) > 1e-6 * base:
            raise AssertionError("halfway through the cosine the rate is wrong: the cosine's argument should run "
                                 "from 0 to pi (math.cos(math.pi * progress)), not from 0 to 1")
        for s, (g, w) in enumerate(zip(got, want)):
            assert abs(g - w) <= 1e-6 * base, (
                f"step {s} (warmup_steps={warmup}, total_steps={total}, base_lr={base:g}, min_lr={low:g}): "
                f"lr {g:.6g}, expected {w:.6g}. Warm-up: base_lr * step / warmup_steps; then "
                "min_lr + (base_lr - min_lr) * (1 + cos(pi * progress)) / 2, progress going 0 -> 1 over "
                "the total_steps - warmup_steps steps after the warm-up")


@points(1)
def test_q4_warmup(warmup_cosine_lr):
    """warms up linearly: 0 at step 0, base_lr / 2 halfway, base_lr at step warmup_steps"""
    got = _curve(warmup_cosine_lr, 10, 100, 1.0, 0.0, steps=(0, 5, 10))
    if abs(got[0] - 0.1) < 1e-9 and abs(got[1] - 0.6) < 1e-9:
        raise AssertionError("the warm-up is one step ahead ((step + 1) / warmup_steps): at step 0 the rate "
                             "should be 0 and it reaches base_lr exactly at step warmup_steps")
    assert [round(g, 9) for g in got] == [0.0, 0.5, 1.0], (
        f"with warmup_steps=10 and base_lr=1 the rate at steps 0, 5, 10 should be 0, 0.5, 1; you give "
        f"{', '.join(f'{g:.4g}' for g in got)}")


@points(1)
def test_q4_no_warmup(warmup_cosine_lr):
    """warmup_steps = 0 means no warm-up: step 0 already has base_lr (no division by zero)"""
    try:
        got = _curve(warmup_cosine_lr, 0, 10, 0.5, 0.0, steps=(0, 5, 10))
    except ZeroDivisionError:
        raise AssertionError("warmup_steps=0 divides by zero: with no warm-up, go straight to the cosine part") from None
    assert abs(got[0] - 0.5) < 1e-9 and abs(got[1] - 0.25) < 1e-9 and abs(got[2]) < 1e-9, (
        f"with no warm-up the rate at steps 0, 5, 10 (of 10) should be 0.5, 0.25, 0; you give "
        f"{', '.join(f'{g:.4g}' for g in got)}")


@points(1)
def test_q4_stays_at_min_after_the_end(warmup_cosine_lr):
    """stays at min_lr after total_steps (the cosine does not come back up)"""
    # The schedule itself first (base_lr after the warm-up, halfway down at the middle): `return min_lr`
    # stays at min_lr too.
    start, middle = _curve(warmup_cosine_lr, 2, 10, 0.1, 0.001, steps=(2, 6))
    assert abs(start - 0.1) < 1e-9 and abs(middle - 0.0505) < 1e-9, (
        f"with warmup_steps=2, total_steps=10, base_lr=0.1, min_lr=0.001 the rate should be 0.1 at step 2 and "
        f"0.0505 at step 6; you give {start:.4g} and {middle:.4g}")
    got = _curve(warmup_cosine_lr, 2, 10, 0.1, 0.001, steps=(10, 14, 18, 30))
    assert all(abs(g - 0.001) < 1e-9 for g in got), (
        f"after total_steps=10 the rate should stay at min_lr=0.001; at steps 10, 14, 18, 30 you give "
        f"{', '.join(f'{g:.4g}' for g in got)}. A cosine keeps oscillating: clamp progress at 1")
