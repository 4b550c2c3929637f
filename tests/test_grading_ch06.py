"""Exercise set of chapter 06 (parameter-efficient and robust fine-tuning): honest checks.

Solutions score full marks, untouched exercises score zero with a kind note, and for every
question plausible wrong answers (the mistakes the text warns about) lose points, most with a
message that names the mistake, while other correct ways of writing the answer keep full
marks. As for chapters 01-05, answers are crafted from the solution notebook in a temporary
folder, one variant of *every* question per notebook; a question without a variant in a
notebook keeps the solution and must keep its full marks.

The checks compare with references written out in ``checks/ch06.py`` (a checks module stands
alone); the last tests here prove those references equal :mod:`tlcourse.efficient`'s,
:mod:`tlcourse.robust`'s and Hugging Face ``peft``'s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from grading_support import exercise_set_tests

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "06_parameter_efficient_and_robust_fine_tuning.ipynb"
FULL = {"q1": 6, "q2": 5, "q3": 4, "q4": 5, "q5": 5.5}
TIMEOUT = 5.0

A_INIT = "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))"
B_INIT = "torch.zeros(base.out_features, rank)"
FWD = "self.base(x) + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)"


def _lora(freeze="self.base = base.requires_grad_(False)", a_init=A_INIT, b_init=B_INIT,
          scaling="alpha / rank", forward=FWD):
    return ("class LoRALinear(nn.Module):\n    def __init__(self, base, rank, alpha):\n        super().__init__()\n"
            f"        {freeze}\n        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))\n"
            f"        {a_init}\n        self.lora_B = nn.Parameter({b_init})\n        self.scaling = {scaling}\n\n"
            f"    def forward(self, x):\n        return {forward}\n")


def _merge(weight="base.weight + layer.scaling * (layer.lora_B @ layer.lora_A)",
           bias="if base.bias is not None:\n            merged.bias.copy_(base.bias)",
           make="nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=base.weight.dtype)"):
    return (f"def merge_lora(layer):\n    base = layer.base\n    merged = {make}\n    with torch.no_grad():\n"
            f"        merged.weight.copy_({weight})\n        {bias}\n    return merged\n")


NORMS = "nn.modules.batchnorm._BatchNorm"


def _bitfit(freeze="model.requires_grad_(False)", bias_rule="name.endswith('bias')", norms=NORMS,
            norm_action="m.requires_grad_(True)", head="model.get_classifier().requires_grad_(True)",
            ret="sum(p.numel() for p in model.parameters() if p.requires_grad)"):
    return (f"def bitfit(model):\n    {freeze}\n    for name, p in model.named_parameters():\n"
            f"        if {bias_rule}:\n            p.requires_grad_(True)\n    for m in model.modules():\n"
            f"        if isinstance(m, {norms}):\n            {norm_action}\n    {head}\n    return {ret}\n")


def _interp(check="if list(theta_0) != list(theta_1):\n        raise ValueError('different models')",
            shape="if start.shape != end.shape:\n            raise ValueError('shapes differ')",
            value="torch.lerp(start, end.to(start.dtype), alpha)", integer="end.clone()",
            cond="start.is_floating_point()"):
    return (f"def interpolate(theta_0, theta_1, alpha):\n    {check}\n    out = {{}}\n"
            "    for name, start in theta_0.items():\n        end = theta_1[name]\n"
            f"        {shape}\n        if {cond}:\n            out[name] = {value}\n"
            f"        else:\n            out[name] = {integer}\n    return out\n")


ENTROPY = ("def entropy_loss(logits):\n    log_p = logits.log_softmax(dim=1)\n"
           "    return -(log_p.exp() * log_p).sum(dim=1).mean()\n")


def _tent(entropy=ENTROPY, freeze="model.requires_grad_(False)", kind="nn.modules.batchnorm._BatchNorm",
          mode="m.train()", grads="m.requires_grad_(True)", collect="params += [m.weight, m.bias]",
          extra="", ret="params"):
    return (f"{entropy}\n\ndef tent_parameters(model):\n    {freeze}\n    params = []\n    for m in model.modules():\n"
            f"        if isinstance(m, {kind}):\n            {mode}\n            {grads}\n            {collect}\n"
            f"{extra}    return {ret}\n")


def _entropy(body):
    return f"def entropy_loss(logits):\n    {body}\n"


# question -> [(wrong answer source, text expected in a failure message, or None)]
WRONG = {
    "q1": [
        (_lora(b_init="torch.randn(base.out_features, rank) * 0.01"), "differs from the frozen layer's"),
        (_lora(a_init="nn.init.zeros_(self.lora_A)"), "both start at zero"),
        (_lora(a_init="nn.init.zeros_(self.lora_A)", b_init="torch.randn(base.out_features, rank)"),
         "convention of Hu et al."),
        (_lora(scaling="alpha"), "scaled by alpha; scale it by alpha / rank"),
        (_lora(scaling="rank / alpha"), "rank / alpha"),
        (_lora(scaling="1.0"), "was not scaled"),
        (_lora(scaling="alpha // rank"), None),
        (_lora(freeze="self.base = base"), "requires_grad=True"),
        (_lora(forward="x @ self.base.weight.T + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)"), "bias is missing"),
        (_lora(freeze="import copy\n        self.base = copy.deepcopy(base).requires_grad_(False)"), "not among"),
        (_lora(freeze="self.parts = [base.requires_grad_(False)]\n        self.base = base.weight",
               forward="self.parts[0](x) + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)"), "not among"),
        (_lora(forward="self.base(x) + self.scaling * (x.reshape(-1, x.shape[-1]) @ self.lora_A.T @ self.lora_B.T)"),
         None),
    ],
    "q2": [
        (_merge(weight="base.weight + layer.lora_B @ layer.lora_A"), "without the scaling"),
        (_merge(weight="base.weight + layer.alpha * (layer.lora_B @ layer.lora_A)"), "scaled by alpha"),
        (_merge(weight="base.weight"), "was not added"),
        (_merge(weight="base.weight + layer.scaling * (layer.lora_A @ layer.lora_B)"), "A B is"),
        (_merge(weight="base.weight - layer.scaling * (layer.lora_B @ layer.lora_A)"), "subtracted"),
        (_merge(bias="pass"), "bias"),
        (_merge(make="nn.Linear(base.in_features, base.out_features, dtype=base.weight.dtype)",
                bias="if base.bias is not None:\n            merged.bias.copy_(base.bias)"), "random bias"),
        (_merge(make="nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)"), "float64"),
        ("def merge_lora(layer):\n    with torch.no_grad():\n"
         "        layer.base.weight += layer.scaling * (layer.lora_B @ layer.lora_A)\n    return layer.base\n",
         "changed the LoRA layer"),
        ("def merge_lora(layer):\n    return layer\n", "returned the LoRA layer itself"),
        ("def merge_lora(layer):\n    return nn.Sequential(layer)\n", "should return an nn.Linear"),
    ],
    "q3": [
        (_bitfit(head="pass"), "the head is frozen"),
        (_bitfit(norms="()"), "scales (their weight) are frozen"),
        (_bitfit(norms="nn.BatchNorm2d", norm_action="if type(m) is nn.BatchNorm2d:\n                m.requires_grad_(True)"),
         "BatchNormAct2d"),
        (_bitfit(freeze="pass"), "freeze every parameter first"),
        (_bitfit(ret="sum(1 for p in model.parameters() if p.requires_grad)"), "number of trainable tensors"),
        (_bitfit(ret="sum(p.numel() for p in model.parameters() if not p.requires_grad)"), "how many values were frozen"),
        (_bitfit(bias_rule="False"), "biases of the convolution and the linear layer"),
        (_bitfit(norms="(nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)"), "gains (their weight) train"),
        (_bitfit(freeze="for p in model.parameters():\n        if p.requires_grad:\n            p.requires_grad_(False)",
                 head="model.classifier = nn.Linear(model.classifier.in_features, model.classifier.out_features)"),
         None),
    ],
    "q4": [
        (_interp(value="torch.lerp(end, start.to(end.dtype), alpha)"), "α is the weight of theta_1"),
        (_interp(value="(start + end) / 2"), "plain average"),
        (_interp(cond="True"), "cannot be interpolated"),
        (_interp(cond="True", value="(1 - alpha) * start + alpha * end"), "became a"),
        (_interp(value="start.mul_(1 - alpha).add_(alpha * end)"), "changed the state dicts"),
        ("def interpolate(theta_0, theta_1, alpha):\n    out = {}\n    for name, start in theta_0.items():\n"
         "        if 'running' in name:\n            continue\n"
         "        end = theta_1[name]\n        out[name] = torch.lerp(start, end, alpha) if start.is_floating_point() "
         "else end.clone()\n    return out\n", "running statistics"),
        (_interp(check="pass", shape="pass"), None),
        (_interp(shape="pass"), None),
        (_interp(value="start if alpha == 0 else end if alpha == 1 else torch.lerp(start, end, alpha)"), None),
        (_interp(value="torch.lerp(start, end, min(max(alpha, 0.0), 1.0))"), None),
    ],
    "q5": [
        (_tent(entropy=_entropy("p = logits.softmax(dim=1)\n    return -(p * p.log()).sum(dim=1).mean()")), "nan"),
        (_tent(entropy=_entropy("log_p = logits.log_softmax(dim=1)\n    return -(log_p.exp() * log_p).sum()")),
         "summed over the batch"),
        (_tent(entropy=_entropy("log_p = logits.log_softmax(dim=1)\n    return (log_p.exp() * log_p).sum(dim=1).mean()")),
         "sign is wrong"),
        (_tent(entropy=_entropy("log_p = logits.log_softmax(dim=0)\n    return -(log_p.exp() * log_p).sum(dim=0).mean()")),
         "over the batch (dim 0)"),
        (_tent(entropy=_entropy("return torch.nn.functional.cross_entropy(logits, logits.argmax(1))")), "pseudo-label"),
        (_tent(entropy=_entropy("log_p = logits.log_softmax(dim=1)\n    return float(-(log_p.exp() * log_p).sum(dim=1).mean())")),
         "no .item()"),
        (_tent(kind="nn.BatchNorm2d", mode="if type(m) is nn.BatchNorm2d:\n                m.train()"),
         None),
        (_tent(mode="m.eval()"), "running statistics"),
        (_tent(freeze="model.train()"), "dropout is on"),
        (_tent(freeze="model.train()\n    model.requires_grad_(False)"), "dropout is on"),
        (_tent(freeze="pass"), "freeze everything first"),
        (_tent(extra="    params += list(model.get_classifier().parameters())\n"), "head is among"),
        (_tent(kind="nn.modules.batchnorm._BatchNorm", collect="params += [m.weight]"), "should return the"),
    ],
}

# Hostile answers: each would have earned points without a correct answer (references computed after the call
# from tensors its code changed in place, a .grad written by the answer itself, a model whose layers it changed,
# properties that an answer which does nothing satisfies). name -> (question, source, text expected in a failure
# message, tests it must not pass; "all": the question scores 0). They join WRONG, so they also lose points there.
HOSTILE = {
    # scales the update by alpha, then multiplies lora_B by rank in place, so that the layer's tensors, read
    # again after the call, made alpha / rank look right
    "rescaled_B": ("q1", _lora(forward="self.base(x) + self.scaling * self.rank * (x @ self.lora_A.T @ self.lora_B.T)\n"
                                       "        with torch.no_grad():\n            self.lora_B.mul_(self.rank)\n"
                                       "        return out",
                               scaling="alpha / rank\n        self.rank = rank").replace("return self.base(x)",
                                                                                        "out = self.base(x)"),
                   "scaled by alpha; scale it by alpha / rank", ["test_q1_update_scaled_by_alpha_over_rank"]),
    # an adapter that never trains (A and B detached), with gradients for them written in .grad
    "written_gradients": ("q1", _lora(forward="self.base(x) + self.scaling * (x @ self.lora_A.T.detach() @ "
                                              "self.lora_B.T.detach()) + 0 * self.lora_B.sum()\n"
                                              "        self.lora_A.grad = torch.ones_like(self.lora_A)\n"
                                              "        self.lora_B.grad = torch.ones_like(self.lora_B)\n"
                                              "        return out").replace("return self.base(x)", "out = self.base(x)"),
                          "no gradient reached lora_B", ["test_q1_batches_of_sequences_no_bias_and_gradients"]),
    # zeroes B in the layer it was given (which the checks once read again after the call), returns the base layer
    "zeroed_B": ("q2", "def merge_lora(layer):\n    with torch.no_grad():\n        layer.lora_B.zero_()\n"
                       "    return layer.base\n", "the update was not added", "all"),
    # merges nothing: the layer is left alone trivially
    "returns_the_base": ("q2", "def merge_lora(layer):\n    return layer.base\n", "get test_q2_weight_and_outputs right first",
                         "all"),
    # interpolates nothing: theta_1 keeps its counts
    "returns_theta_1": ("q4", "def interpolate(theta_0, theta_1, alpha):\n    return theta_1\n", "the weights first",
                        ["test_q4_weights_and_statistics", "test_q4_integer_buffers",
                         "test_q4_new_tensors_extrapolation_and_other_models"]),
    # right everywhere, but at alpha 0 or 1 returns views of the inputs' own tensors ([...] aliases, unlike a
    # clone): in one process changing the result changes an input; the wire must bring the view back as one
    "views_of_the_inputs": ("q4", _interp(value="(start if alpha == 0 else end if alpha == 1 else "
                                                "torch.lerp(start, end.to(start.dtype), alpha))[...]"),
                            "changing the result in place changed an input",
                            ["test_q4_new_tensors_extrapolation_and_other_models"]),
    # 0 on confident logits, with a gradient of ones
    "zero_with_a_gradient": ("q5", _tent(entropy=_entropy("return (logits - logits.detach()).sum()")), "should be",
                             ["test_q5_entropy_value", "test_q5_entropy_stable_and_differentiable"]),
    # adapts bn1 only, and replaces the other BatchNorm layers (so that the model's BatchNorm layers, read again
    # after the call, were bn1 alone)
    "other_batchnorms_removed": ("q5", ENTROPY + "\n\ndef tent_parameters(model):\n    model.requires_grad_(False)\n"
                                 "    for name, m in list(model.named_modules()):\n"
                                 "        if isinstance(m, nn.modules.batchnorm._BatchNorm) and name != 'bn1':\n"
                                 "            parent, _, child = name.rpartition('.')\n"
                                 "            model.get_submodule(parent)._modules[child] = nn.Identity()\n"
                                 "    model.bn1.train()\n    model.bn1.requires_grad_(True)\n"
                                 "    return [model.bn1.weight, model.bn1.bias]\n",
                                 "it returned 2 tensors", ["test_q5_tent_parameters_returned_and_trainable",
                                                           "test_q5_tent_normalises_by_the_batch_with_dropout_off"]),
}
for _qid, _source, _text, _ in HOSTILE.values():
    WRONG[_qid].append((_source, _text))

# question -> other correct ways to write the answer: each must keep full marks
RIGHT = {
    "q1": [
        _lora(a_init="nn.init.normal_(self.lora_A, std=1 / rank)",
              forward="self.base(x) + self.scaling * torch.nn.functional.linear("
                      "torch.nn.functional.linear(x, self.lora_A), self.lora_B)"),
        ("class LoRALinear(nn.Module):\n    def __init__(self, base, rank, alpha):\n        super().__init__()\n"
         "        for p in base.parameters():\n            p.requires_grad = False\n        self.base = base\n"
         "        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) * 0.01)\n"
         "        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))\n"
         "        self.rank, self.alpha = rank, alpha\n        self.scaling = self.alpha / self.rank\n\n"
         "    def forward(self, x):\n        delta = (x @ self.lora_A.t()) @ self.lora_B.t()\n"
         "        return self.base(x) + delta * self.scaling\n"),
    ],
    "q2": [
        ("def merge_lora(layer):\n    import copy\n    merged = copy.deepcopy(layer.base)\n    with torch.no_grad():\n"
         "        merged.weight += layer.scaling * layer.lora_B @ layer.lora_A\n    return merged\n"),
        ("def merge_lora(layer):\n    W = layer.base.weight.detach() + layer.scaling * torch.einsum('or,ri->oi', "
         "layer.lora_B.detach(), layer.lora_A.detach())\n    out = nn.Linear(W.shape[1], W.shape[0], "
         "bias=layer.base.bias is not None).to(W.dtype)\n    out.weight = nn.Parameter(W.clone())\n"
         "    if layer.base.bias is not None:\n        out.bias = nn.Parameter(layer.base.bias.detach().clone())\n"
         "    return out\n"),
    ],
    "q3": [
        ("def bitfit(model):\n    head = {id(p) for p in model.get_classifier().parameters()}\n"
         "    norm_params = {id(p) for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, "
         "nn.BatchNorm3d)) for p in m.parameters(recurse=False)}\n    count = 0\n"
         "    for name, p in model.named_parameters():\n"
         "        keep = name.split('.')[-1] == 'bias' or id(p) in head or id(p) in norm_params\n"
         "        p.requires_grad = keep\n        count += p.numel() if keep else 0\n    return count\n"),
    ],
    "q4": [
        ("def interpolate(theta_0, theta_1, alpha):\n    if theta_0.keys() != theta_1.keys():\n"
         "        raise KeyError('not the same model')\n    result = {}\n    for k in theta_0:\n"
         "        a, b = theta_0[k], theta_1[k]\n        assert a.shape == b.shape, k\n"
         "        result[k] = (1 - alpha) * a + alpha * b if a.dtype.is_floating_point else a.clone()\n"
         "    return result\n"),
    ],
    "q5": [
        ("def entropy_loss(logits):\n    p = torch.softmax(logits, 1)\n    return (-(p * torch.log_softmax(logits, 1)).sum(1)).mean()\n\n\n"
         "def tent_parameters(model):\n    for p in model.parameters():\n        p.requires_grad_(False)\n"
         "    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]\n"
         "    for bn in bns:\n        bn.train()\n        bn.track_running_stats = False\n"
         "        bn.running_mean = None\n        bn.running_var = None\n"
         "        bn.weight.requires_grad_(True)\n        bn.bias.requires_grad_(True)\n"
         "    return [p for bn in bns for p in (bn.weight, bn.bias)]\n"),
        ("def entropy_loss(logits):\n    return torch.distributions.Categorical(logits=logits).entropy().mean()\n\n\n"
         "def tent_parameters(model):\n    model.requires_grad_(False)\n    out = []\n"
         "    for m in model.modules():\n        if isinstance(m, nn.modules.batchnorm._BatchNorm):\n"
         "            m.track_running_stats = False\n            m.running_mean = m.running_var = None\n"
         "            for p in m.parameters():\n                p.requires_grad_(True)\n                out.append(p)\n"
         "    return out\n"),
    ],
}


globals().update(exercise_set_tests("06", SOLUTION, FULL, WRONG, RIGHT, TIMEOUT, hostile=HOSTILE))


def test_in_notebook_check_names_the_mistake_and_skips_hidden_tests():
    """check() runs the visible tests only: an interpolation that never checks the shapes passes it
    and loses the hidden refusal test's point in grading."""
    import math

    import torch
    from torch import nn

    from tlcourse.grading import CheckFailed, checker

    check = checker("06")
    ns: dict = {"torch": torch, "nn": nn, "math": math}
    exec(WRONG["q1"][3][0], ns)  # scaled by alpha
    with pytest.raises(CheckFailed) as err:
        check("q1", namespace=ns)
    text = "\n".join(err.value._render_traceback_())
    assert text.startswith("❌ q1") and "alpha / rank" in text
    exec(WRONG["q4"][6][0], ns)  # no key or shape check: right wherever the models agree
    check("q4", namespace=ns)


# --- the references in checks/ch06.py are tlcourse's and peft's ----------------------------

def test_lora_reference_equals_peft_and_its_merge():
    import copy

    import peft
    import torch
    from torch import nn

    from tlcourse.grading.checks import ch06

    for n_in, n_out, rank, alpha in ((7, 4, 2, 4.0), (5, 9, 3, 12.0), (6, 6, 1, 1.0)):
        net = nn.Sequential()
        net.add_module("fc", ch06._linear(n_in, n_out, seed=n_in))
        wrapped = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["fc"]))
        theirs = wrapped.base_model.model.fc
        with torch.no_grad():
            theirs.lora_B["default"].weight.normal_()
        mine = ch06._LoRALinear(copy.deepcopy(net.fc), rank, alpha)
        assert not mine.lora_B.any() and mine.lora_A.any()
        with torch.no_grad():
            mine.lora_A.copy_(theirs.lora_A["default"].weight)
            mine.lora_B.copy_(theirs.lora_B["default"].weight)
        x = torch.randn(3, n_in)
        with torch.no_grad():
            assert torch.allclose(mine(x), wrapped(x), atol=1e-6)
            merged = ch06._reference_merged_weight(mine)
            assert torch.allclose(merged, wrapped.merge_and_unload().fc.weight, atol=1e-6)
        assert mine.scaling == theirs.scaling["default"]


def test_bitfit_and_tent_references_equal_tlcourse():
    from tlcourse import efficient, models, robust
    from tlcourse.grading.checks import ch06

    for model in (models.efficientnet_lite0(num_classes=3), ch06._BiasNet()):
        want = ch06._reference_bitfit_names(model)
        efficient.select_bitfit(model)
        assert want == {n for n, p in model.named_parameters() if p.requires_grad}, type(model)
    model = models.efficientnet_lite0(num_classes=3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert ch06._reference_tent_names(model) == {names[id(p)] for p in robust.tent_parameters(model)}


def test_interpolate_and_entropy_references_equal_tlcourse_robust():
    import torch

    from tlcourse import robust
    from tlcourse.grading.checks import ch06

    theta_0, theta_1 = ch06._states(seed=2)
    for alpha in (0.0, 0.3, 1.0, 1.5):
        a, b = ch06._reference_interpolate(theta_0, theta_1, alpha), robust.interpolate(theta_0, theta_1, alpha)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    for seed in range(3):
        logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed)) * 4
        assert abs(ch06._reference_entropy(logits) - float(robust.entropy(logits))) < 1e-6
