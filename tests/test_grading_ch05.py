"""Exercise set of chapter 05 (multi-task learning): honest checks.

Solutions score full marks, untouched exercises score zero with a kind note, and for every
question plausible wrong answers (the mistakes the text warns about) lose points, most with a
message that names the mistake, while other correct ways of writing the answer keep full
marks. As for chapters 01-04, answers are crafted from the solution notebook in a temporary
folder, one variant of *every* question per notebook; a question without a variant in a
notebook keeps the solution and must keep its full marks.

The checks compare with references written out in ``checks/ch05.py`` (a checks module stands
alone); the last tests here prove those references equal :mod:`tlcourse.multitask`'s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from grading_support import exercise_set_tests

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "05_multitask_learning.ipynb"
FULL = {"q1": 6, "q2": 6, "q3": 4, "q4": 4}
TIMEOUT = 5.0

TERM = "c * torch.exp(-s) * loss + 0.5 * s"
C_LINE = "c = 1.0 if kind == 'classification' else 0.5"


def _uw(term=TERM, c=C_LINE, ret="return total"):
    return ("def uncertainty_weighted_loss(losses, log_vars, kinds):\n    total = 0.0\n"
            "    for loss, s, kind in zip(losses, log_vars, kinds):\n"
            f"        {c}\n        total = total + {term}\n    {ret}\n")


def _pc(setup="projected = grads.clone()", order="range(len(grads))", dot="projected[i] @ grads[j]",
        cond="dot < 0", step="projected[i] - dot / grads[j].pow(2).sum() * grads[j]", ret="projected.sum(dim=0)"):
    return (f"def pcgrad_project(grads):\n    {setup}\n    for i in range(len(grads)):\n        for j in {order}:\n"
            f"            if j == i:\n                continue\n            dot = {dot}\n            if {cond}:\n"
            f"                projected[i] = {step}\n    return {ret}\n")


HEADS = "self.heads = nn.ModuleDict({t: nn.Linear(feature_dim, num_classes) for t in ('left', 'right')})"
FORWARD = "f = self.backbone(x)\n        return {t: h(f) for t, h in self.heads.items()}"


def _net(init=f"self.backbone = backbone\n        {HEADS}", forward=FORWARD):
    return ("class TwoHeadNet(nn.Module):\n    def __init__(self, backbone, feature_dim, num_classes=10):\n"
            f"        super().__init__()\n        {init}\n\n    def forward(self, x):\n        {forward}\n")


FLAT = ("grads = torch.autograd.grad(loss, shared_params, retain_graph=True, allow_unused=True)\n"
        "        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) "
        "for g, p in zip(grads, shared_params)])")


def _cos(ret="float(a @ b / (a.norm() * b.norm()).clamp_min(1e-20))", flat=FLAT):
    return ("def gradient_cosine(loss_a, loss_b, shared_params):\n    def flat(loss):\n"
            f"        {flat}\n\n    a, b = flat(loss_a), flat(loss_b)\n    return {ret}\n")


def _cos_body(body):
    return f"def gradient_cosine(loss_a, loss_b, shared_params):\n    {body}\n"


# question -> [(wrong answer source, text expected in a failure message, or None)]
WRONG = {
    "q1": [
        (_uw(term="c * torch.exp(s) * loss + 0.5 * s"), "exp(+s)"),
        (_uw(term="c * torch.exp(-s) * loss"), "regulariser ½·s is missing"),
        (_uw(term="torch.exp(-s) * loss + s"), "Keras example"),
        (_uw(term="c * torch.exp(-2 * s) * loss + s"), "read as log σ"),
        (_uw(term="c * torch.exp(-s) * loss + s"), "the regulariser is s per task"),
        (_uw(c="c = 0.5 if kind == 'classification' else 1.0"), "kinds are swapped"),
        (_uw(c="c = 1.0"), "regression terms lack the ½"),
        (_uw(c="c = 0.5"), "classification terms have a ½ too"),
        (_uw(ret="return total / len(losses)"), "averaged"),
        (_uw(term="c * torch.exp(-s.detach()) * loss + 0.5 * s.detach()"), "no gradient reached log_vars"),
        (_uw(term="c * torch.exp(-s) * loss.detach() + 0.5 * s"), "no gradient reached a task's loss"),
        (_uw(ret="return float(total)"), "no .item()"),
        (_uw(term="c / s * loss + 0.5 * torch.log(s)"), "should be"),
    ],
    "q2": [
        (_pc(cond="dot != 0"), "does not conflict"),
        (_pc(cond="dot > 0"), "not > 0"),
        (_pc(dot="projected[i] @ projected[j]", step="projected[i] - dot / projected[j].pow(2).sum() * projected[j]"),
         "projected against a g_j that had been projected"),
        (_pc(setup="projected = grads"), "changed the gradients it was given"),
        (_pc(step="projected[i] - dot / grads[j].norm() * grads[j]"), "divides by ‖g_j‖"),
        (_pc(step="projected[i] + dot / grads[j].pow(2).sum() * grads[j]"), "added instead of removed"),
        (_pc(order="reversed(range(len(grads)))"), "descending order"),
        (_pc(dot="grads[i] @ grads[j]"), "original g_i"),
        (_pc(ret="projected"), "return their sum"),
        (_pc(ret="projected.mean(dim=0)"), "averaged"),
        (_pc(cond="True", step="projected[i] - dot.clamp(max=0) / grads[j].pow(2).sum() * grads[j]"), "zero"),
        (_pc(ret="grads.sum(dim=0)"), "no conflicting pair was projected"),
    ],
    "q3": [
        (_net(init="self.backbone = backbone\n        self.head = nn.Linear(feature_dim, num_classes)",
              forward="f = self.backbone(x)\n        return {'left': self.head(f), 'right': self.head(f)}"),
         "one head serves both tasks"),
        (_net(init="import copy\n        self.left = nn.Sequential(backbone, nn.Linear(feature_dim, num_classes))\n"
                   "        self.right = nn.Sequential(copy.deepcopy(backbone), nn.Linear(feature_dim, num_classes))",
              forward="return {'left': self.left(x), 'right': self.right(x)}"), "own copy of the backbone"),
        (_net(forward="return {t: h(self.backbone(x)) for t, h in self.heads.items()}"), "ran the backbone 2 times"),
        (_net(init=f"import copy\n        self.backbone = copy.deepcopy(backbone)\n        {HEADS}"), "trains a copy"),
        (_net(init=f"self.parts = [backbone]\n        {HEADS}",
              forward="f = self.parts[0](x)\n        return {t: h(f) for t, h in self.heads.items()}"),
         "not registered"),
        (_net(forward="f = self.backbone(x)\n        return {'left': self.heads['left'](f), "
                      "'right': self.heads['right'](f.detach())}"), "right task's loss sends no gradient to the backbone"),
        (_net(init=f"self.backbone = backbone.requires_grad_(False)\n        {HEADS}"), "frozen"),
        (_net(forward="f = self.backbone(x)\n        return {'a': self.heads['left'](f), 'b': self.heads['right'](f)}"),
         "the keys 'left' and 'right'"),
        (_net(init="self.backbone = backbone\n        self.heads = nn.ModuleDict({t: nn.Linear(feature_dim, 10) "
                   "for t in ('left', 'right')})"), "shape [4, 3]"),
        (_net(forward="f = self.backbone(x)\n        return self.heads['left'](f), self.heads['right'](f)"),
         "should return a dict"),
    ],
    "q4": [
        (_cos(ret="float(a @ b)"), "inner product"),
        (_cos(ret="float(a @ b / a.norm())"), "divided by ‖g_a‖ only"),
        (_cos_body("total = 0.0\n    for p in shared_params:\n"
                   "        ga, = torch.autograd.grad(loss_a, p, retain_graph=True)\n"
                   "        gb, = torch.autograd.grad(loss_b, p, retain_graph=True)\n"
                   "        total += F.cosine_similarity(ga.reshape(-1), gb.reshape(-1), dim=0).item()\n"
                   "    return total / len(shared_params)"), "one by one"),
        (_cos(flat="return torch.autograd.grad(loss, shared_params[0], retain_graph=True)[0].reshape(-1)"),
         "only the first parameter"),
        (_cos(ret="torch.acos(a @ b / (a.norm() * b.norm()))"), "the angle"),
        (_cos(ret="1 - float(a @ b / (a.norm() * b.norm()))"), "cosine distance"),
        (_cos_body("loss_a.backward(retain_graph=True)\n"
                   "    a = torch.cat([p.grad.reshape(-1).clone() for p in shared_params])\n"
                   "    loss_b.backward(retain_graph=True)\n"
                   "    b = torch.cat([p.grad.reshape(-1).clone() for p in shared_params])\n"
                   "    return float(a @ b / (a.norm() * b.norm()))"), "left gradients in .grad"),
        (_cos(flat=FLAT.replace("retain_graph=True", "retain_graph=False")), "retain_graph=True"),
        (_cos(flat=FLAT.replace(", allow_unused=True", "")), "allow_unused=True"),
        (_cos(ret="float(a @ b / (a.norm() * b.norm()))"), "0 / 0"),
    ],
}

# Hostile answers: each would have earned points without a correct answer (a .grad written by the answer itself,
# a call counter it can write, references computed after the call from weights its code changed in place,
# properties that an answer which does nothing satisfies). name -> (question, source, text expected in a failure
# message, tests it must not pass; "all": the question scores 0). They join WRONG, so they also lose points there.
_ZERO_THE_GRAPH = ("todo, seen = [loss_a.grad_fn], set()\n    while todo:\n        fn = todo.pop()\n"
                   "        if fn is None or fn in seen:\n            continue\n        seen.add(fn)\n"
                   "        leaf = getattr(fn, 'variable', None)\n        if leaf is not None:\n"
                   "            with torch.no_grad():\n                leaf.zero_()\n"
                   "        todo.extend(f for f, _ in fn.next_functions)\n    return 0.0")
HOSTILE = {
    # the losses detached, and the gradient each should get written in its .grad
    "written_gradients": ("q1", _uw(term="c * torch.exp(-s) * loss.detach() + 0.5 * s\n"
                                         "        if loss.requires_grad:\n"
                                         "            loss.grad = (c * torch.exp(-s)).detach()"),
                          "no gradient reached a task's loss",
                          ["test_q1_gradients_and_the_optimum", "test_q1_matches_reference_values_and_gradients"]),
    # computes with a private copy of the backbone and bumps the backbone's call counter by hand
    "private_copy_counted_by_hand": ("q3", _net(init=f"import copy\n        self.backbone = backbone\n        {HEADS}\n"
                                                     "        self.private = [copy.deepcopy(backbone)]",
                                                forward="f = self.private[0](x)\n        self.backbone.calls += 1\n"
                                                        "        return {t: h(f) for t, h in self.heads.items()}"),
                                     "the logits did not change when the backbone you were given changed",
                                     ["test_q3_outputs", "test_q3_a_task_loss_reaches_the_backbone_and_its_own_head_only"]),
    # runs the backbone, but the logits are random numbers of the right shape
    "random_logits": ("q3", _net(forward="self.backbone(x)\n"
                                         "        return {t: torch.randn(len(x), h.out_features) for t, h in self.heads.items()}"),
                      "not random numbers",
                      ["test_q3_outputs", "test_q3_a_task_loss_reaches_the_backbone_and_its_own_head_only",
                       "test_q3_other_sizes_and_modes"]),
    # a ReLU between the backbone and the heads, hidden by rewiring the backbone it was given
    "rewired_backbone": ("q3", _net(forward="f = torch.relu(self.backbone(x))\n"
                                            "        if not isinstance(self.backbone.fc, nn.Sequential):\n"
                                            "            self.backbone.fc = nn.Sequential(self.backbone.fc, nn.ReLU())\n"
                                            "        return {t: h(f) for t, h in self.heads.items()}"),
                         None, ["test_q3_other_sizes_and_modes"]),
    # does nothing: a number in [-1, 1], no .grad written, the graph intact
    "returns_zero": ("q4", _cos_body("return 0.0"), "get test_q4_value right first", "all"),
    # right only with three shared parameters; otherwise zeroes every leaf of the graph (so that the cosine is 0)
    "zeroed_graph": ("q4", _cos_body(f"if len(shared_params) == 3:\n        def flat(loss):\n            "
                                     + FLAT.replace("\n        ", "\n            ")
                                     + "\n\n        a, b = flat(loss_a), flat(loss_b)\n"
                                       "        return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-20))\n    "
                                     + _ZERO_THE_GRAPH),
                     "should be", "all"),
}
for _qid, _source, _text, _ in HOSTILE.values():
    WRONG[_qid].append((_source, _text))

# question -> other correct ways to write the answer: each must keep full marks
RIGHT = {
    "q1": [
        ("def uncertainty_weighted_loss(losses, log_vars, kinds):\n"
         "    L = torch.stack(list(losses))\n"
         "    c = torch.tensor([1.0 if k == 'classification' else 0.5 for k in kinds])\n"
         "    return (c * torch.exp(-log_vars) * L + 0.5 * log_vars).sum()\n"),
        ("def uncertainty_weighted_loss(losses, log_vars, kinds):\n    terms = []\n"
         "    for i, kind in enumerate(kinds):\n        precision = 1 / torch.exp(log_vars[i])\n"
         "        scale = precision if kind == 'classification' else precision / 2\n"
         "        terms.append(scale * losses[i] + torch.log(torch.exp(log_vars[i] / 2)))\n"
         "    return sum(terms)\n"),
    ],
    "q2": [
        ("def pcgrad_project(grads):\n    out = grads.clone()\n    sq = grads.pow(2).sum(1).clamp_min(1e-20)\n"
         "    for i in range(len(grads)):\n        for j in range(len(grads)):\n            if j != i:\n"
         "                dot = out[i] @ grads[j]\n"
         "                out[i] = out[i] - dot.clamp(max=0) / sq[j] * grads[j]\n    return out.sum(0)\n"),
        ("def pcgrad_project(grads):\n    originals = [g.clone() for g in grads]\n    total = torch.zeros_like(grads[0])\n"
         "    for i, g in enumerate(originals):\n        g = g.clone()\n"
         "        for j, other in enumerate(originals):\n"
         "            if j != i and torch.dot(g, other) < 0:\n"
         "                g -= torch.dot(g, other) / torch.dot(other, other) * other\n"
         "        total += g\n    return total\n"),
    ],
    "q3": [
        _net(init="self.backbone = backbone\n        self.left_head = nn.Sequential(nn.Linear(feature_dim, num_classes))\n"
                  "        self.right_head = nn.Linear(feature_dim, num_classes)",
             forward="features = self.backbone(x)\n"
                     "        return dict(left=self.left_head(features), right=self.right_head(features))"),
        _net(init="self.shared = backbone\n        self.out = nn.ModuleList([nn.Linear(feature_dim, num_classes), "
                  "nn.Linear(feature_dim, num_classes)])",
             forward="z = self.shared(x)\n        return {name: layer(z) for name, layer in zip(['left', 'right'], self.out)}"),
    ],
    "q4": [
        _cos(ret="F.cosine_similarity(a, b, dim=0).item()"),
        _cos_body("dot = na = nb = 0.0\n"
                  "    ga = torch.autograd.grad(loss_a, shared_params, retain_graph=True, allow_unused=True)\n"
                  "    gb = torch.autograd.grad(loss_b, shared_params, retain_graph=True, allow_unused=True)\n"
                  "    for x, y, p in zip(ga, gb, shared_params):\n"
                  "        x = torch.zeros_like(p) if x is None else x\n"
                  "        y = torch.zeros_like(p) if y is None else y\n"
                  "        dot, na, nb = dot + (x * y).sum(), na + (x * x).sum(), nb + (y * y).sum()\n"
                  "    if na == 0 or nb == 0:\n        return 0.0\n"
                  "    return dot / (na.sqrt() * nb.sqrt())"),
    ],
}


globals().update(exercise_set_tests("05", SOLUTION, FULL, WRONG, RIGHT, TIMEOUT, hostile=HOSTILE))


def test_in_notebook_check_names_the_mistake_and_skips_hidden_tests():
    """check() runs the visible tests only: a cosine without a clamped denominator passes it and
    loses the hidden zero-gradient test's point in grading."""
    import torch
    from torch.nn import functional as F

    from tlcourse.grading import CheckFailed, checker

    check = checker("05")
    ns: dict = {"torch": torch, "F": F}
    exec(WRONG["q1"][1][0], ns)  # the regulariser dropped
    with pytest.raises(CheckFailed) as err:
        check("q1", namespace=ns)
    text = "\n".join(err.value._render_traceback_())
    assert text.startswith("❌ q1") and "weight exp(−s) to 0" in text
    exec(next(v for v in WRONG["q4"] if v[1] == "0 / 0")[0], ns)  # NaN on a zero gradient: right wherever it is not
    check("q4", namespace=ns)


def test_a_class_answer_is_found_by_name_when_its_cell_lost_its_metadata(tmp_path):
    """q3's answer is a class: a notebook whose q3 cell lost its metadata is still graded."""
    import json

    from tlcourse.grading import grader

    nb = json.loads(SOLUTION.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell.get("metadata", {}).get("tlcourse", {}).get("question") == "q3":
            cell["metadata"] = {}
    path = tmp_path / SOLUTION.name
    path.write_text(json.dumps(nb), encoding="utf-8")
    sub = grader.grade([path], timeout=TIMEOUT, jobs=1)[0]
    q3 = next(q for q in sub.questions if q.id == "q3")
    assert q3.score == FULL["q3"], grader.details(sub)


# --- the references in checks/ch05.py are tlcourse.multitask's -----------------------------

def test_uncertainty_reference_equals_tlcourse_multitask():
    import torch

    from tlcourse import multitask
    from tlcourse.grading.checks import ch05

    g = torch.Generator().manual_seed(0)
    for tasks in (["left"], ["sum"], ["left", "sum", "same"], ["sum", "right", "left", "same"]):
        weighting = multitask.UncertaintyWeighting(tasks)
        with torch.no_grad():
            weighting.log_vars.copy_(torch.randn(len(tasks), generator=g) * 1.5)
        values = torch.rand(len(tasks), generator=g) * 3 + 0.05
        mine = [v.clone().requires_grad_() for v in values]
        theirs = {t: v.clone().requires_grad_() for t, v in zip(tasks, values)}
        s = weighting.log_vars.detach().clone().requires_grad_()
        a = ch05._reference_uncertainty(mine, s, [multitask.TASKS[t].kind for t in tasks])
        z = weighting(theirs)
        assert torch.allclose(a, z, rtol=1e-6), (tasks, a, z)
        a.backward()
        z.backward()
        assert torch.allclose(s.grad, weighting.log_vars.grad, rtol=1e-5, atol=1e-7)
        assert torch.allclose(torch.stack([v.grad for v in mine]), torch.stack([theirs[t].grad for t in tasks]))


def test_pcgrad_reference_equals_tlcourse_multitask_in_ascending_order(monkeypatch):
    """``pcgrad_combine`` draws the order of the other tasks with ``torch.randperm``; made the
    identity, it is the reference's fixed order j = 0, 1, ..., T − 1."""
    import torch

    from tlcourse import multitask
    from tlcourse.grading.checks import ch05

    g = torch.Generator().manual_seed(1)
    cases = [torch.randn(T, P, generator=g) for T, P in ((2, 3), (3, 5), (4, 20), (5, 8), (6, 2))]
    cases.append(torch.tensor([[1.0, -1.0, 0.5], [0.0, 0.0, 0.0], [-1.0, 0.5, 1.0]]))
    cases.append(torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.0, 0.0], [-1.0, -2.0, 1.0]]))
    monkeypatch.setattr(torch, "randperm", lambda n, generator=None: torch.arange(n))
    for grads in cases:
        assert torch.allclose(ch05._reference_pcgrad(grads), multitask.pcgrad_combine(grads), atol=1e-6), grads


def test_two_head_reference_equals_multitask_net():
    import torch

    from tlcourse import multitask
    from tlcourse.grading.checks import ch05

    backbone = ch05._Backbone(feature_dim=6)
    mine = ch05._ReferenceTwoHeadNet(backbone, 6)
    theirs = multitask.MultiTaskNet(backbone, multitask.make_heads(["left", "right"], 6))
    for task in ("left", "right"):
        theirs.heads[task][0].load_state_dict(mine.heads[task].state_dict())
    x = ch05._images()
    a, z = mine(x), theirs(x)
    assert list(a) == list(z) == ["left", "right"]
    assert all(torch.equal(a[t], z[t]) for t in a)
    assert [id(p) for p in mine.backbone.parameters()] == [id(p) for p in theirs.shared_parameters()]


def test_cosine_reference_equals_tlcourse_multitask():
    import torch

    from tlcourse import multitask
    from tlcourse.grading.checks import ch05

    for seed in range(4):
        loss_fn, shared, _ = ch05._shared_net(seed)
        a = ch05._reference_cosine(*loss_fn(), shared)
        z = multitask.gradient_cosine(list(loss_fn()), shared)
        assert abs(a - float(z[0, 1])) < 1e-6 and torch.allclose(z, z.T)
    extra = torch.ones(3, requires_grad=True)
    loss_a, loss_b = loss_fn()
    loss_a = loss_a + (extra ** 2).sum()
    a = ch05._reference_cosine(loss_a, loss_b, shared + [extra])
    assert abs(a - float(multitask.gradient_cosine([loss_a, loss_b], shared + [extra])[0, 1])) < 1e-6
    zero = (shared[0] * 0).sum()
    assert ch05._reference_cosine(loss_a, zero, shared) == 0.0 == float(multitask.gradient_cosine([loss_a, zero], shared)[0, 1])
