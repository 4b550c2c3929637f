"""Exercise set of chapter 03 (domain adaptation): honest checks.

Solutions score full marks, untouched exercises score zero with a kind note, and for every
question plausible wrong answers (the mistakes the text warns about) lose points, most with a
message that names the mistake. As for chapters 01-02, wrong answers are crafted from the
solution notebook in a temporary folder, one wrong variant of *every* question per notebook.

The checks compare with references written out in ``checks/ch03.py`` (a checks module stands
alone); the last tests here prove those references equal :mod:`tlcourse.adapt`'s functions.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
from grading_support import (expect_full_marks, expect_points_lost, expect_zero_with_kind_messages, grade_together,
                             unanswered_after_run_all, write_crafted)

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "03_domain_adaptation.ipynb"
EXERCISE = ROOT / "exercises" / SOLUTION.name
FULL = {"q1": 4, "q2": 2, "q3": 4, "q4": 4, "q5": 4, "q6": 2}
TIMEOUT = 5.0


def _grl(forward="ctx.lambd = lambd\n        return x.view_as(x)", backward="return -ctx.lambd * grad_output, None"):
    return ("class GradReverse(torch.autograd.Function):\n    @staticmethod\n    def forward(ctx, x, lambd):\n"
            f"        {forward}\n\n    @staticmethod\n    def backward(ctx, grad_output):\n        {backward}\n\n\n"
            "def grad_reverse(x, lambd=1.0):\n    return GradReverse.apply(x, lambd)\n")


def _mmd(sq="torch.cdist(joint, joint) ** 2", scale="sq.detach().sum() / (n * n - n)",
         kernel="sum(torch.exp(-sq / (m * scale)) for m in multipliers)",
         result="k[:ns, :ns].mean() + k[ns:, ns:].mean() - 2 * k[:ns, ns:].mean()"):
    return ("def mmd_loss(source, target, multipliers=(0.25, 0.5, 1.0, 2.0, 4.0)):\n"
            f"    joint = torch.cat([source, target])\n    sq = {sq}\n    n, ns = len(joint), len(source)\n"
            f"    scale = {scale}\n    k = {kernel}\n    return {result}\n")


def _adabn(prepare="m.reset_running_stats()\n        m.momentum = None", mode="model.eval()\n    for m in bns:\n        m.train()",
           loop="for s in range(0, len(images), batch_size):\n            model(images[s:s + batch_size])",
           restore="for m, mo in zip(bns, momenta):\n        m.momentum = mo", end="return model.eval()",
           kind="_BatchNorm"):
    return ("from torch.nn.modules.batchnorm import _BatchNorm\n\n"
            "def adabn(model, images, batch_size=256):\n"
            f"    bns = [m for m in model.modules() if isinstance(m, {kind})]\n    momenta = [m.momentum for m in bns]\n"
            f"    for m in bns:\n        {prepare}\n    {mode}\n    with torch.no_grad():\n        {loop}\n"
            f"    {restore}\n    {end}\n")


def _coral(cov="torch.cov(x.T)", loss="(cs - ct).pow(2).sum() / (4 * d * d)"):
    return (f"def coral_loss(source, target):\n    d = source.shape[1]\n    cov = lambda x: {cov}\n"
            f"    cs, ct = cov(source), cov(target)\n    return {loss}\n")


def _pseudo(body):
    return f"def pseudo_labels(logits, threshold=0.9):\n    {body}\n"


def _lam(expr):
    return f"def dann_lambda(progress, gamma=10.0):\n    return {expr}\n"


# question -> [(wrong answer source, text expected in a failure message, or None)]
WRONG = {
    "q1": [
        (_grl(forward="ctx.lambd = lambd\n        return -x"), "negated x"),
        (_grl(backward="return -grad_output, None"), "only negated"),
        (_grl(backward="return -ctx.lambd * grad_output"), "one gradient per input"),
        (_grl(forward="GradReverse.lambd = lambd\n        return x.view_as(x)",
              backward="return -GradReverse.lambd * grad_output, None"), "keep lambd on ctx"),
        (_grl(backward="return ctx.lambd * grad_output, None"), "not reversed"),
        ("def grad_reverse(x, lambd=1.0):\n    return -lambd * x\n", "negated x"),
    ],
    "q2": [
        (_lam("1 / (1 + math.exp(-gamma * progress))"), "sigmoid"),
        (_lam("2 / (1 + math.exp(gamma * progress)) - 1"), "negative"),
        (_lam("2 / (1 + math.exp(-10 * progress)) - 1"), "use the gamma argument"),
        (_lam("2 / (1 + math.exp(-gamma * progress))"), "the - 1 is missing"),
        (_lam("float(progress)"), None),
    ],
    "q3": [
        (_coral(cov="torch.cov(x.T, correction=0)"), "biased"),
        (_coral(loss="(cs - ct).pow(2).sum()"), "1 / (4 d²)"),
        (_coral(loss="torch.linalg.norm(cs - ct) / (4 * d * d)"), "Frobenius norm"),
        (_coral(cov="x.T @ x / (len(x) - 1)"), "not centred"),
        (_coral(loss="((cs - ct).pow(2).sum() / (4 * d * d)).item()"), "no .item()"),
        (_coral(loss="(cs - ct).pow(2).sum() / (4 * d)"), "not 4 d"),
        (_coral(cov="torch.cov(x)"), "torch.cov(x.T)"),
    ],
    "q4": [
        (_mmd(result="k[:ns, :ns].mean() + k[ns:, ns:].mean() + 2 * k[:ns, ns:].mean()"), "wrong sign"),
        (_mmd(result="(k[:ns, :ns].sum() - k[:ns, :ns].trace()) / (ns * ns - ns) + (k[ns:, ns:].sum() - "
                     "k[ns:, ns:].trace()) / ((n - ns) * (n - ns - 1)) - 2 * k[:ns, ns:].mean()"), "unbiased"),
        (_mmd(sq="torch.cdist(joint, joint)"), "squared distances"),
        (_mmd(scale="sq.sum() / (n * n - n)"), "D.detach()"),
        (_mmd(kernel="sum(torch.exp(-sq / (m * scale)) for m in multipliers) / len(multipliers)"), "sum them"),
        (_mmd(kernel="torch.exp(-sq / scale)"), "only one bandwidth"),
        (_mmd(scale="sq.detach().mean()"), "n (n - 1) pairs"),
    ],
    "q5": [
        (_adabn(mode="model.train()"), "Dropout"),
        (_adabn(prepare="m.reset_running_stats()"), "exponential moving average"),
        (_adabn(prepare="m.momentum = None"), "reset_running_stats() first"),
        (_adabn(prepare="m.reset_parameters()\n        m.momentum = None"), "reset_parameters() also resets"),
        (_adabn(kind="nn.BatchNorm2d"), "BatchNorm1d layer kept its old statistics"),
        (_adabn(restore="pass"), "restore it"),
        (_adabn(loop="model(images)"), "in one batch"),
        (_adabn(end="return model"), "still in train mode"),
    ],
    "q6": [
        (_pseudo("confidence, labels = logits.max(dim=1)\n    return labels, confidence >= threshold"), "raw logits"),
        (_pseudo("confidence, labels = logits.softmax(dim=0).max(dim=1)\n    return labels, confidence >= threshold"),
         "over the batch"),
        (_pseudo("p = logits.softmax(dim=1)\n    return p.max(dim=1).values, p.max(dim=1).values >= threshold"),
         "labels are floats"),
        (_pseudo("confidence, labels = logits.softmax(dim=1).max(dim=1)\n"
                 "    return labels, (confidence >= threshold).float()"), "bool tensor"),
    ],
}

# Hostile answers (the audit of the checks): each earned points without doing the work, by satisfying a
# property that a function doing nothing has too, by forging what a check reads, or by changing an input
# the check computed its answer from after the call. question -> [(source, text expected in a failure
# message, the question's score it may earn)]. They join WRONG, so they are graded (and compared with
# check() by test_check_agreement) like the others.
HOSTILE = {
    "q1": [  # the identity function: earned q1_forward_is_identity (1 of 4)
        ("def grad_reverse(x, lambd=1.0):\n    return x\n", "plain identity", 0),
    ],
    "q3": [  # a constant, and a loss that only tells equal batches apart: each earned
        # q3_zero_and_invariant_to_the_mean (1 of 4)
        ("def coral_loss(source, target):\n    return torch.zeros(())\n", "not a CORAL loss", 0),
        ("def coral_loss(source, target):\n    return torch.tensor(float(not torch.equal(source, target)))\n",
         "not a CORAL loss", 0),
    ],
    "q5": [  # never runs the model, writes the modes the noting layers record: earned
        # q5_only_batchnorm_in_train_mode (1 of 4)
        ("from torch.nn.modules.batchnorm import _BatchNorm\n\ndef adabn(model, images, batch_size=256):\n"
         "    for m in model.modules():\n        if isinstance(m, _BatchNorm):\n            m.modes = [True]\n"
         "        elif isinstance(m, nn.Dropout):\n            m.modes = [False]\n    return model.eval()\n",
         "not those of a pass over the target images", 0),
    ],
    "q6": [
        # zeroes the logits it is given, then answers for zeros: the reference was computed from the same
        # tensor after the call, so q6_any_batch_and_classes and q6_matches_reference passed (1 of 2)
        ("def pseudo_labels(logits, threshold=0.9):\n    logits.zero_()\n    n, c = logits.shape\n"
         "    return torch.zeros(n, dtype=torch.long), torch.full((n,), 1.0 / c >= threshold)\n",
         "differ from argmax", 0),
        # right, but overwrites its input with the probabilities: q6_confident_argmax checked a tensor it
        # had not passed (1.5 of 2)
        ("def pseudo_labels(logits, threshold=0.9):\n    p = logits.softmax(dim=1)\n"
         "    confidence, labels = p.max(dim=1)\n    logits.copy_(p)\n    return labels, confidence >= threshold\n",
         "changed the logits it was given", 1),
    ],
}
HOSTILE_AT = {}  # (question, index in WRONG) -> the score it may earn
for _q, _items in HOSTILE.items():
    for _source, _text, _score in _items:
        HOSTILE_AT[(_q, len(WRONG[_q]))] = _score
        WRONG[_q].append((_source, _text))


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """The solution, the exercise and every crafted notebook, graded in one run (two sandboxes)."""
    paths = {"solution": SOLUTION, "exercise": EXERCISE,
             **write_crafted(tmp_path_factory.mktemp("submissions"), SOLUTION, WRONG, "03_wrong")}
    return grade_together(paths, TIMEOUT, "chapter 03")


def test_solution_gets_full_marks(graded):
    expect_full_marks(graded[0]["solution"], FULL)


def test_exercise_gets_zero_with_kind_messages(graded):
    expect_zero_with_kind_messages(graded[0]["exercise"], FULL)


@pytest.mark.parametrize("case", [(q, i) for q, v in WRONG.items() for i in range(len(v))],
                         ids=lambda c: f"{c[0]}-wrong{c[1]}")
def test_wrong_answer_loses_points_with_a_specific_message(graded, case):
    qid, i = case
    expect_points_lost(graded[0][i], qid, FULL[qid], WRONG[qid][i])


@pytest.mark.parametrize("case", sorted(HOSTILE_AT), ids=lambda c: f"{c[0]}-wrong{c[1]}")
def test_hostile_answer_earns_only_what_it_should(graded, case):
    """Each answer of HOSTILE scores at most what it really does right (0 for most)."""
    qid, i = case
    q = next(q for q in graded[0][i].questions if q.id == qid)
    assert q.score == HOSTILE_AT[case], (WRONG[qid][i][0], [(t.name, t.passed) for t in q.tests])


def test_grading_takes_seconds(graded):
    subs, seconds = graded
    assert seconds < 30, f"{len(subs)} notebooks took {seconds:.1f} s"
    assert max(s.seconds for s in subs.values()) < 10


def test_in_notebook_check_names_the_mistake_and_skips_hidden_tests():
    """check() runs the visible tests only: a GRL that keeps lambd on the class passes it
    (one reversal at a time is right) and loses the hidden test's point in grading."""
    import torch

    from tlcourse.grading import CheckFailed, checker

    check = checker("03")
    ns: dict = {"torch": torch, "math": math}
    exec(WRONG["q1"][1][0], ns)
    with pytest.raises(CheckFailed) as err:
        check("q1", namespace=ns)
    text = "\n".join(err.value._render_traceback_())
    assert text.startswith("❌ q1") and "multiply it by lambd" in text
    exec(WRONG["q1"][3][0], ns)
    check("q1", namespace=ns)  # passes: the mistake only shows with two reversals in one graph


def test_exercise_notebook_runs_through_without_errors():
    """'Run all' on a fresh exercise notebook reaches the end: unanswered checks only say so."""
    assert unanswered_after_run_all(EXERCISE) == len(FULL)


# --- the references in checks/ch03.py are tlcourse.adapt's functions ----------------------

def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("name", ["coral", "mmd"])
def test_loss_references_equal_tlcourse_adapt(name):
    import torch

    from tlcourse import adapt
    from tlcourse.grading.checks import ch03

    mine, theirs = {"coral": (ch03._reference_coral, adapt.coral_loss),
                    "mmd": (ch03._reference_mmd, adapt.mmd_loss)}[name]
    g = torch.Generator().manual_seed(0)
    for ns, nt, d in ((7, 11, 4), (16, 16, 32), (5, 3, 1)):
        s, t = torch.randn(ns, d, generator=g) * 2, torch.randn(nt, d, generator=g) + 0.5
        (a_s, a_t), (b_s, b_t) = _leaves(s, t), _leaves(s, t)
        a, b = mine(a_s, a_t), theirs(b_s, b_t)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (ns, nt, d, a, b)
        a.backward()
        b.backward()
        assert torch.allclose(a_s.grad, b_s.grad, rtol=1e-4, atol=1e-7)
        assert torch.allclose(a_t.grad, b_t.grad, rtol=1e-4, atol=1e-7)
    if name == "mmd":
        a, b = mine(s, t, (0.5, 2.0)), theirs(s, t, multipliers=(0.5, 2.0))
        assert torch.allclose(a, b, rtol=1e-5)


def test_other_references_equal_tlcourse_adapt():
    import torch

    from tlcourse import adapt
    from tlcourse.grading.checks import ch03

    for p in (0.0, 0.1, 0.5, 1.0):
        for gamma in (10.0, 3.0):
            assert math.isclose(ch03._reference_dann_lambda(p, gamma), adapt.dann_lambda(p, gamma), rel_tol=1e-12)
    x = torch.randn(3, 4)
    upstream = torch.randn(3, 4)
    (a,), (b,) = _leaves(x), _leaves(x)
    ch03._reference_grad_reverse(a, 0.3).backward(upstream)
    adapt.grad_reverse(b, 0.3).backward(upstream)
    assert torch.equal(a.grad, b.grad)

    logits = torch.randn(50, 6) * 3
    for threshold in (0.0, 0.5, 0.9):
        for u, v in zip(ch03._reference_pseudo_labels(logits, threshold), adapt.pseudo_labels(logits, threshold)):
            assert torch.equal(u, v)

    for batch_size, n in ((8, 24), (6, 20), (64, 20)):
        model, images = ch03._adabn_net(), ch03._target_images(n)
        mine = ch03._reference_statistics(model, images, batch_size)
        theirs = ch03._statistics(adapt.adabn(copy.deepcopy(model), images, batch_size))
        assert ch03._same_statistics(mine, theirs, atol=0)
