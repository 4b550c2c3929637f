"""Exercise set of chapter 04 (knowledge distillation): honest checks.

Solutions score full marks, untouched exercises score zero with a kind note, and for every
question plausible wrong answers (the mistakes the text warns about) lose points, most with a
message that names the mistake, while other correct ways of writing the answer keep full
marks. As for chapters 01-03, answers are crafted from the solution notebook in a temporary
folder, one variant of *every* question per notebook; a question without a variant in a
notebook keeps the solution and must keep its full marks.

The checks compare with references written out in ``checks/ch04.py`` (a checks module stands
alone); the last tests here prove those references equal :mod:`tlcourse.distill`'s functions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from grading_support import exercise_set_tests

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "04_distillation.ipynb"
FULL = {"q1": 3, "q2": 9, "q3": 4, "q4": 4}
TIMEOUT = 5.0

KL = "F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t.detach() / T, dim=-1), reduction='batchmean', log_target=True)"
GUIDED = "regressor(student_features, size=teacher_features.shape[-2:])"


def _soften(body):
    return f"def soften(logits, temperature=1.0):\n    {body}\n"


def _kd(soft=f"{KL} * T * T", none="return soft", both="return alpha * soft + (1 - alpha) * F.cross_entropy(s, labels)"):
    return ("def kd_loss(student_logits, teacher_logits, labels=None, temperature=4.0, alpha=0.9):\n"
            "    s, t, T = student_logits, teacher_logits, float(temperature)\n"
            f"    soft = {soft}\n    if labels is None:\n        {none}\n    {both}\n")


def _freeze(body):
    return f"def freeze_teacher(model):\n    {body}\n"


def _hint(body):
    return f"def hint_loss(student_features, teacher_features, regressor):\n    {body}\n"


# question -> [(wrong answer source, text expected in a failure message, or None)]
WRONG = {
    "q1": [
        (_soften("return torch.softmax(logits, dim=-1) / temperature"), "divided by T after the softmax"),
        (_soften("return torch.softmax(logits * temperature, dim=-1)"), "multiplied by T"),
        (_soften("return torch.softmax(logits, dim=-1)"), "the temperature has no effect"),
        (_soften("return F.log_softmax(logits / temperature, dim=-1)"), "log-probabilities"),
        (_soften("return torch.softmax(logits / temperature, dim=0)"), "over the batch"),
        (_soften("e = (logits / temperature).exp()\n    return e / e.sum(-1, keepdim=True)"), "overflows"),
        (_soften("logits /= temperature\n    return torch.softmax(logits, dim=-1)"), "changed the logits"),
        (_soften("return torch.softmax(logits / temperature, dim=1)"), "Dimension out of range"),
        (_soften("return torch.softmax(logits / temperature, dim=-1)"), "raise ValueError"),
        (_soften("return torch.softmax(logits.detach() / temperature, dim=-1)"), "cut from the autograd graph"),
    ],
    "q2": [
        (_kd(soft=KL), "missing the T² factor"),
        (_kd(soft=f"{KL} * T"), "multiplied by T; Hinton"),
        (_kd(soft="F.kl_div(F.log_softmax(t.detach() / T, dim=-1), F.softmax(s / T, dim=-1), reduction='batchmean')"
                  " * T * T"), "wrong direction"),
        (_kd(soft="F.kl_div(F.log_softmax(t / T, dim=-1), F.log_softmax(s.detach() / T, dim=-1), "
                  "reduction='batchmean', log_target=True) * T * T"), "wrong direction"),
        (_kd(soft=KL.replace("t.detach() / T", "t.detach()") + " * T * T"), "only the student's logits"),
        (_kd(soft=KL.replace("s / T", "s") + " * T * T"), "only the teacher's logits"),
        (_kd(soft=KL.replace("batchmean", "mean") + " * T * T"), "reduction='batchmean'"),
        (_kd(soft=KL.replace("batchmean", "sum") + " * T * T"), "summed over the batch"),
        (_kd(soft="F.kl_div(F.softmax(s / T, dim=-1), F.softmax(t.detach() / T, dim=-1), reduction='batchmean')"
                  " * T * T"), "must be log-probabilities"),
        (_kd(soft=KL.replace(", log_target=True", "") + " * T * T"), "log_target=True"),
        (_kd(none="pass"), "labels=None"),
        (_kd(none="return alpha * soft"), "weighted by α"),
        (_kd(both="return (1 - alpha) * soft + alpha * F.cross_entropy(s, labels)"), "weights are swapped"),
        (_kd(both="return alpha * soft + (1 - alpha) * F.cross_entropy(s / T, labels)"), "softened student logits"),
        (_kd(both="return alpha * soft + (1 - alpha) * F.cross_entropy(t, labels)"), "the teacher's logits"),
        (_kd(soft=KL.replace("t.detach()", "t") + " * T * T"), "a gradient reached the teacher's logits"),
        (_kd(soft="-(F.softmax(t.detach() / T, dim=-1) * F.log_softmax(s / T, dim=-1)).sum(-1).mean() * T * T"),
         "soft cross-entropy"),
        (_kd(soft="(F.softmax(t.detach() / T, dim=-1) * (torch.log(F.softmax(t.detach() / T, dim=-1)) - "
                  "torch.log(F.softmax(s / T, dim=-1)))).sum(-1).mean() * T * T"), "F.log_softmax"),
        (_kd(soft=f"({KL} * T * T).item()"), "no .item()"),
        (_kd(both="return alpha * soft + (1 - alpha) * F.cross_entropy(s, labels) * T * T"), "multiplied by T² too"),
        (_kd(both="return soft"), "the labels were ignored"),
    ],
    "q3": [
        (_freeze("for p in model.parameters():\n        p.requires_grad = False\n    return model"),
         "still in train mode"),
        (_freeze("return model.eval()"), "still require grad"),
        (_freeze("model.requires_grad = False\n    return model.eval()"), "only sets a new attribute"),
        (_freeze("model.eval\n    return model.requires_grad_(False)"), "with the parentheses"),
        (_freeze("model.training = False\n    return model.requires_grad_(False)"), "changes the top module only"),
        (_freeze("import copy\n    return copy.deepcopy(model).eval().requires_grad_(False)"), "a copy?"),
        (_freeze("for m in model.children():\n        m.requires_grad_(False)\n    return model.eval()"), "'scale'"),
        (_freeze("model.eval().requires_grad_(False)"), "returned None"),
        (_freeze("for p in model.parameters():\n        p.requires_grad = not p.requires_grad\n    return model.eval()"),
         "toggled"),
    ],
    "q4": [
        (_hint(f"return F.mse_loss({GUIDED}, teacher_features.detach(), reduction='sum')"), "were summed"),
        (_hint(f"return F.mse_loss({GUIDED}, teacher_features)"), "a gradient reached the teacher's features"),
        (_hint("return F.mse_loss(regressor(student_features), teacher_features.detach())"),
         "pass size=teacher_features.shape[-2:]"),
        (_hint("t = F.interpolate(teacher_features.detach(), size=student_features.shape[-2:], mode='bilinear', "
               "align_corners=False)\n    return F.mse_loss(regressor(student_features), t)"), "student's grid"),
        (_hint("return F.mse_loss(student_features, teacher_features.detach())"), "apply the regressor"),
        (_hint("return F.mse_loss(regressor(teacher_features, size=student_features.shape[-2:]), student_features)"),
         "the regressor takes the student's features"),
        (_hint(f"return 0.5 * F.mse_loss({GUIDED}, teacher_features.detach())"), "without the ½"),
        (_hint(f"return F.l1_loss({GUIDED}, teacher_features.detach())"), "(L1)"),
        (_hint(f"return ({GUIDED} - teacher_features.detach()).pow(2).sum() / len(student_features)"), "per example"),
        (_hint("return F.mse_loss(regressor(student_features.detach(), size=teacher_features.shape[-2:]), "
               "teacher_features.detach())"), "no gradient reached the student's features"),
        (_hint(f"with torch.no_grad():\n        guided = {GUIDED}\n    return F.mse_loss(guided, teacher_features.detach())"),
         "cut from the autograd graph"),
        (_hint("guided = F.interpolate(regressor(student_features), size=teacher_features.shape[-2:], mode='nearest')\n"
               "    return F.mse_loss(guided, teacher_features.detach())"), None),
    ],
}

# Hostile answers: each would have earned points without a correct answer (references computed after the call
# from inputs its code changed in place, .grad written by the answer itself, properties that an answer which does
# nothing satisfies). name -> (question, source, text expected in a failure message, tests it must not pass;
# "all": the question scores 0). They join WRONG, so they also lose points with that message.
HOSTILE = {
    # ignores the labels (self-training on the student's own argmax) and writes those into the labels it was given,
    # which the checks once read again after the call
    "pseudo_labels": ("q2", _kd(both="pseudo = s.detach().argmax(-1)\n    with torch.no_grad():\n"
                                     "        labels.copy_(pseudo)\n"
                                     "    return alpha * soft + (1 - alpha) * F.cross_entropy(s, pseudo)"),
                      "not a distillation loss",
                      ["test_q2_with_labels", "test_q2_teacher_gets_no_gradient",
                       "test_q2_matches_reference_values_and_gradients", "test_q2_stable_for_large_logits"]),
    # no distillation at all: a loss that never reads the teacher sends it no gradient
    "sum_of_logits": ("q2", "def kd_loss(student_logits, teacher_logits, labels=None, temperature=4.0, alpha=0.9):\n"
                            "    return student_logits.sum()\n", "not a distillation loss", "all"),
    # the teacher's logits not detached, and the gradient that reaches them cancelled through .grad
    "cancelled_teacher_gradient": ("q2", _kd(soft=KL.replace("t.detach()", "t") + " * T * T",
                                             none="loss = soft",
                                             both="loss = alpha * soft + (1 - alpha) * F.cross_entropy(s, labels)\n"
                                                  "    if t.requires_grad:\n"
                                                  "        g, = torch.autograd.grad(loss, t, retain_graph=True)\n"
                                                  "        t.grad = -g\n    return loss")
                                   .replace("    if labels is None:\n        loss = soft\n    loss = ",
                                            "    loss = soft if labels is None else "),
                                   "a gradient reached the teacher's logits", ["test_q2_teacher_gets_no_gradient"]),
    # not the teacher: a module without parameters has none that train
    "identity": ("q3", _freeze("return torch.nn.Identity().eval()"), "not the teacher's 11", "all"),
    # does nothing, and returns the model
    "does_nothing": ("q3", _freeze("return model"), "but not frozen", "all"),
    # the parameters turned into buffers: nothing trains, but nothing is frozen either
    "parameters_to_buffers": ("q3", _freeze("model.eval()\n    for m in list(model.modules()):\n"
                                            "        for name, p in list(m.named_parameters(recurse=False)):\n"
                                            "            del m._parameters[name]\n"
                                            "            m.register_buffer(name, p.detach().clone())\n    return model"),
                              "turned into buffers", "all"),
    # never looks at the student: zeroes the regressor it was given, which the checks once ran again after the call
    "zeroed_regressor": ("q4", _hint("with torch.no_grad():\n        for p in regressor.parameters():\n"
                                     "            p.zero_()\n    return teacher_features.detach().pow(2).mean()"),
                         "F.mse_loss(regressor(student_features", "all"),
    # the student's features detached, and a gradient for them written in .grad
    "written_gradient": ("q4", _hint(f"guided = {GUIDED.replace('student_features,', 'student_features.detach(),')}\n"
                                     "    if student_features.requires_grad:\n"
                                     "        student_features.grad = torch.ones_like(student_features)\n"
                                     "    return F.mse_loss(guided, teacher_features.detach())"),
                         "no gradient reached the student's features",
                         ["test_q4_gradients_reach_the_student_and_the_regressor_only",
                          "test_q4_matches_reference_values_and_gradients"]),
    # always refuses
    "always_value_error": ("q1", _soften("raise ValueError('no')"), "your code raised ValueError", "all"),
}
for _qid, _source, _text, _ in HOSTILE.values():
    WRONG[_qid].append((_source, _text))

# question -> other correct ways to write the answer: each must keep full marks
RIGHT = {
    "q1": [
        _soften("if not temperature > 0:\n        raise ValueError('the temperature must be positive')\n"
                "    return F.softmax(logits / temperature, dim=logits.dim() - 1)"),
        _soften("if temperature <= 0:\n        raise ValueError(temperature)\n"
                "    z = logits / temperature\n    z = z - z.max(dim=-1, keepdim=True).values\n"
                "    return z.exp() / z.exp().sum(dim=-1, keepdim=True)"),
    ],
    "q2": [
        _kd(soft="F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1).detach(), reduction='batchmean')"
                 " * T ** 2"),
        ("def kd_loss(student_logits, teacher_logits, labels=None, temperature=4.0, alpha=0.9):\n"
         "    T = temperature\n    with torch.no_grad():\n"
         "        log_p_t = F.log_softmax(teacher_logits / T, dim=1)\n"
         "    log_p_s = F.log_softmax(student_logits / T, dim=1)\n"
         "    soft = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean() * T * T\n"
         "    if labels is None:\n        return soft\n"
         "    return alpha * soft + (1 - alpha) * F.nll_loss(F.log_softmax(student_logits, dim=1), labels)\n"),
    ],
    "q3": [
        _freeze("model.train(False)\n    model.requires_grad_(False)\n    return model"),
        _freeze("for m in model.modules():\n        m.training = False\n"
                "    for _, p in model.named_parameters():\n        p.requires_grad = False\n    return model"),
    ],
    "q4": [
        _hint("guided = F.interpolate(regressor(student_features), size=teacher_features.shape[-2:], "
              "mode='bilinear', align_corners=False)\n"
              "    return ((guided - teacher_features.detach()) ** 2).mean()"),
        _hint(f"target = teacher_features.detach()\n    return F.mse_loss({GUIDED.replace('shape[-2:]', 'shape[2:]')}, "
              "target, reduction='mean')"),
    ],
}


globals().update(exercise_set_tests("04", SOLUTION, FULL, WRONG, RIGHT, TIMEOUT, hostile=HOSTILE))


def test_in_notebook_check_names_the_mistake_and_skips_hidden_tests():
    """check() runs the visible tests only: a KD loss built on log(softmax(...)) passes it (the
    inputs are moderate) and loses the hidden stability test's points in grading."""
    import torch
    from torch.nn import functional as F

    from tlcourse.grading import CheckFailed, checker

    check = checker("04")
    ns: dict = {"torch": torch, "F": F}
    exec(WRONG["q2"][0][0], ns)  # no T²
    with pytest.raises(CheckFailed) as err:
        check("q2", namespace=ns)
    text = "\n".join(err.value._render_traceback_())
    assert text.startswith("❌ q2") and "T² factor" in text
    exec(WRONG["q2"][17][0], ns)  # log(softmax(...)): right on moderate logits
    check("q2", namespace=ns)


# --- the references in checks/ch04.py are tlcourse.distill's functions --------------------

def test_soften_reference_equals_tlcourse_distill():
    import torch

    from tlcourse import distill
    from tlcourse.grading.checks import ch04

    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 3
    for T in (0.5, 1.0, 4.0):
        assert torch.equal(ch04._reference_soften(logits, T), distill.soften(logits, T))
    for T in (0.0, -2.0):
        for fn in (ch04._reference_soften, distill.soften):
            with pytest.raises(ValueError):
                fn(logits, T)


def test_kd_reference_equals_tlcourse_distill():
    import torch

    from tlcourse import distill
    from tlcourse.grading.checks import ch04

    g = torch.Generator().manual_seed(1)
    for b, c in ((4, 5), (16, 10), (1, 3)):
        s, t = torch.randn(b, c, generator=g) * 2, torch.randn(b, c, generator=g) * 3
        y = torch.randint(0, c, (b,), generator=g)
        for labels in (y, None):
            for T, alpha in ((1.0, 0.5), (4.0, 0.9), (8.0, 0.0), (2.0, 1.0)):
                mine, theirs = s.clone().requires_grad_(), s.clone().requires_grad_()
                a = ch04._reference_kd(mine, t, labels, T, alpha)
                z = distill.kd_loss(theirs, t, labels, T, alpha)
                assert torch.allclose(a, z, rtol=1e-5, atol=1e-7), (b, c, T, alpha, a, z)
                a.backward()
                z.backward()
                assert torch.allclose(mine.grad, theirs.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(ch04._reference_kd(s, t), distill.kd_loss(s, t))  # the same defaults


def test_hint_reference_and_regressor_equal_tlcourse_distill():
    import torch

    from tlcourse import distill
    from tlcourse.grading.checks import ch04

    g = torch.Generator().manual_seed(2)
    for (cs, ct, hs, ht) in ((3, 5, 4, 4), (8, 4, 8, 4), (2, 6, 3, 5)):
        s, t = torch.randn(2, cs, hs, hs, generator=g), torch.randn(2, ct, ht, ht, generator=g)
        mine = ch04._Regressor(cs, ct, seed=cs)
        theirs = distill.HintRegressor(cs, ct)
        theirs.load_state_dict({k: v for k, v in mine.state_dict().items()})
        assert torch.equal(mine(s, size=(ht, ht)), theirs(s, size=(ht, ht)))
        assert torch.equal(mine(s), theirs(s))
        a, z = ch04._reference_hint(s, t, theirs), distill.hint_loss(s, t, theirs)
        assert torch.allclose(a, z, rtol=1e-6), (a, z)
