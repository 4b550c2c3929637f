"""Exercise sets of chapters 01 (feature extraction) and 02 (fine-tuning): honest checks.

Solutions score full marks, untouched exercises score zero with a kind note, and for every
question plausible wrong answers (the mistakes the text warns about) lose points with a
message that names the mistake. Wrong answers are crafted from the solution notebooks in a
temporary folder; each crafted notebook carries one wrong variant of *every* question (the
grader runs each question on its own), so a few notebooks cover all the cases.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from grading_support import (crafted, expect_full_marks, expect_points_lost, expect_zero_with_kind_messages,
                             grade_together, unanswered_after_run_all)

from tlcourse.grading import extract

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = {"01": ROOT / "solutions" / "01_feature_extraction.ipynb",
             "02": ROOT / "solutions" / "02_fine_tuning.ipynb"}
EXERCISES = {ch: ROOT / "exercises" / p.name for ch, p in SOLUTIONS.items()}
FULL = {"01": {"q1": 5, "q2": 5, "q3": 6, "q4": 5, "q5": 5}, "02": {"q1": 5, "q2": 5, "q3": 6, "q4": 5}}
TIMEOUT = 5.0

# (chapter, question) -> [(wrong answer source, text expected in a failure message)]
WRONG = {
    ("01", "q1"): [
        ("def freeze_backbone(model):\n    model.requires_grad_(False)\n    return 0\n", "got frozen too"),
        ("def freeze_backbone(model):\n    model.requires_grad_(False)\n    model.classifier.requires_grad_(True)\n"
         "    return sum(1 for p in model.parameters() if p.requires_grad)\n", "number of parameter tensors"),
        ("def freeze_backbone(model):\n    for n, p in model.named_parameters():\n"
         "        if not n.startswith('classifier'):\n            p.requires_grad_(False)\n"
         "    return sum(p.numel() for p in model.parameters() if p.requires_grad)\n", "came in fully frozen"),
        ("def freeze_backbone(model):\n    ps = list(model.parameters())\n    for p in ps[:-1]:\n"
         "        p.requires_grad_(False)\n    return ps[-1].numel()\n", "classifier.weight got frozen"),
    ],
    ("01", "q2"): [
        ("def replace_head(model, num_classes):\n    model.classifier = nn.Sequential(\n"
         "        nn.Linear(model.num_features, num_classes), nn.ReLU())\n    return model\n", "clips every negative"),
        ("def replace_head(model, num_classes):\n    model.classifier = nn.Linear(1280, num_classes)\n    return model\n",
         "hard-coded 1280"),
        ("def replace_head(model, num_classes):\n    model.classifier = nn.Sequential(\n"
         "        nn.Linear(model.num_features, num_classes), nn.Softmax(dim=1))\n    return model\n", "softmax"),
        ("import copy\ndef replace_head(model, num_classes):\n    new = copy.deepcopy(model)\n"
         "    new.classifier = nn.Linear(new.num_features, num_classes)\n    return new\n", "should change the model"),
    ],
    ("01", "q3"): [
        ("def extract_features(backbone, loader):\n    feats, labels = [], []\n    with torch.no_grad():\n"
         "        for x, y in loader:\n            feats.append(backbone(x))\n            labels.append(y)\n"
         "    return torch.cat(feats), torch.cat(labels)\n", "call backbone.eval()"),
        ("def extract_features(backbone, loader):\n    backbone.eval()\n    feats, labels = [], []\n"
         "    for x, y in loader:\n        feats.append(backbone(x))\n        labels.append(y)\n"
         "    return torch.cat(feats), torch.cat(labels)\n", "autograd graph"),
        ("def extract_features(backbone, loader):\n    backbone.eval()\n    feats, labels = [], []\n"
         "    with torch.no_grad():\n        for x, y in loader:\n            feats.append(backbone(x))\n"
         "            labels.append(y)\n    return torch.stack(feats), torch.stack(labels)\n", "torch.cat"),
        ("def extract_features(backbone, loader):\n    backbone.eval()\n    feats, labels = [], []\n"
         "    with torch.no_grad():\n        for x, y in loader:\n            feats.append(backbone(x))\n"
         "            labels.append(y)\n    return torch.cat(feats), torch.cat(labels)\n", "train mode before"),
        # never runs the backbone: its statistics, mode and graph stay untouched, but it earns nothing
        ("def extract_features(backbone, loader):\n    return torch.empty(0, 5), torch.empty(0, dtype=torch.long)\n",
         "the features should have shape [10, 5]"),
    ],
    ("01", "q4"): [
        ("def accuracy(logits, labels):\n    return (logits.argmax(dim=0) == labels).float().mean().item()\n",
         "over the batch (dim=0)"),
        ("def accuracy(logits, labels):\n    return 100 * (logits.argmax(1) == labels).float().mean().item()\n",
         "percentage"),
        ("def accuracy(logits, labels):\n    return (logits.argmax(1, keepdim=True) == labels).float().mean().item()\n",
         "broadcast"),
        ("import torch.nn.functional as F\ndef accuracy(logits, labels):\n    return F.accuracy(logits, labels)\n",
         "has no attribute 'accuracy'"),
    ],
    ("01", "q5"): [
        ("def sample_per_class(labels, k, seed=0):\n    torch.manual_seed(seed)\n    out = []\n"
         "    for c in labels.unique():\n        w = (labels == c).nonzero().flatten()\n"
         "        if len(w) < k:\n            raise ValueError('too few')\n"
         "        out.append(w[torch.randperm(len(w))[:k]])\n    return torch.cat(out).sort().values\n",
         "torch.manual_seed(seed) inside a helper"),
        ("def sample_per_class(labels, k, seed=0):\n    out = []\n    for c in labels.unique():\n"
         "        w = (labels == c).nonzero().flatten()\n        if len(w) < k:\n            raise ValueError('too few')\n"
         "        out.append(w[:k])\n    return torch.cat(out).sort().values\n", "first k examples"),
        ("def sample_per_class(labels, k, seed=0):\n    g = torch.Generator().manual_seed(seed)\n    out = []\n"
         "    for c in labels.unique():\n        w = (labels == c).nonzero().flatten()\n"
         "        out.append(w[torch.randperm(len(w), generator=g)[:k]])\n    return torch.cat(out).sort().values\n",
         "no ValueError"),
        ("def sample_per_class(labels, k, seed=0):\n    g = torch.Generator().manual_seed(seed)\n    out = []\n"
         "    for c in labels.unique():\n        w = (labels == c).nonzero().flatten()\n"
         "        if len(w) < k:\n            raise ValueError('too few')\n"
         "        out.append(w[torch.randint(len(w), (k,), generator=g)])\n    return torch.cat(out)\n", None),
    ],
    ("02", "q1"): [
        ("def unfreeze_last_blocks(model, k):\n    model.requires_grad_(False)\n    model.classifier.requires_grad_(True)\n"
         "    model.conv_head.requires_grad_(True)\n    model.bn2.requires_grad_(True)\n"
         "    for s in model.blocks[-k:]:\n        s.requires_grad_(True)\n"
         "    return sum(p.numel() for p in model.parameters() if p.requires_grad)\n", "-0 == 0"),
        ("def unfreeze_last_blocks(model, k):\n    model.requires_grad_(False)\n    model.classifier.requires_grad_(True)\n"
         "    for s in model.blocks[:k]:\n        s.requires_grad_(True)\n"
         "    return sum(p.numel() for p in model.parameters() if p.requires_grad)\n", "first k stages"),
        ("def unfreeze_last_blocks(model, k):\n    model.classifier.requires_grad_(True)\n    n = len(model.blocks)\n"
         "    if k >= 1:\n        model.conv_head.requires_grad_(True)\n        model.bn2.requires_grad_(True)\n"
         "    for s in model.blocks[n - k:]:\n        s.requires_grad_(True)\n    if k >= n:\n"
         "        model.requires_grad_(True)\n"
         "    return sum(p.numel() for p in model.parameters() if p.requires_grad)\n", "came in fully trainable"),
        ("def unfreeze_last_blocks(model, k):\n    model.requires_grad_(False)\n    model.classifier.requires_grad_(True)\n"
         "    n = len(model.blocks)\n    for s in model.blocks[n - k:]:\n        s.requires_grad_(True)\n"
         "    return sum(p.numel() for p in model.parameters() if p.requires_grad)\n", "conv_head and bn2"),
    ],
    ("02", "q2"): [
        ("def layerwise_param_groups(model, base_lr, decay):\n    groups = [{'params': list(model.parameters()), 'lr': base_lr}]\n"
         "    for d, s in enumerate(reversed(list(model.blocks)), start=1):\n"
         "        groups.append({'params': list(s.parameters()), 'lr': base_lr * decay ** d})\n    return groups\n",
         "more than one group"),
        ("def layerwise_param_groups(model, base_lr, decay):\n    stages = list(model.blocks)\n"
         "    parts = [[model.conv_stem, model.bn1, stages[0]]] + [[s] for s in stages[1:-1]]\n"
         "    parts += [[stages[-1], model.conv_head, model.bn2], [model.classifier]]\n"
         "    return [{'params': [p for m in ms for p in m.parameters() if p.requires_grad], 'lr': base_lr * decay ** d}\n"
         "            for d, ms in enumerate(parts)]\n", "other way round"),
        ("def layerwise_param_groups(model, base_lr, decay):\n    stages = list(model.blocks)\n"
         "    parts = [[model.classifier], [stages[-1], model.conv_head, model.bn2]] + [[s] for s in stages[-2:0:-1]]\n"
         "    parts += [[model.conv_stem, model.bn1, stages[0]]]\n"
         "    return [{'params': [p for m in ms for p in m.parameters()], 'lr': base_lr * decay ** d}\n"
         "            for d, ms in enumerate(parts)]\n", "frozen parameters are in the groups"),
        ("def layerwise_param_groups(model, base_lr, decay):\n    groups = [{'params': list(model.classifier.parameters()), 'lr': base_lr}]\n"
         "    for d, s in enumerate(reversed(list(model.blocks)), start=1):\n"
         "        groups.append({'params': [p for p in s.parameters() if p.requires_grad], 'lr': base_lr * decay ** d})\n"
         "    return groups\n", "in no group"),
    ],
    ("02", "q3"): [
        ("def set_batchnorm_eval(model):\n    return model.eval()\n", "switches Dropout off"),
        ("def set_batchnorm_eval(model):\n    for _, m in model.named_modules():\n        if type(m) is nn.BatchNorm2d:\n"
         "            m.eval()\n    return model\n", "BatchNormAct2d"),
        ("def set_batchnorm_eval(model):\n    for _, m in model.named_modules():\n"
         "        if isinstance(m, nn.BatchNorm2d):\n            m.requires_grad_(False)\n    return model\n",
         "requires_grad=False does not stop them"),
        ("def set_batchnorm_eval(model):\n    for _, m in model.named_modules():\n        if isinstance(m, nn.BatchNorm2d):\n"
         "            m.eval()\n    return model\n", "BatchNorm1d"),
    ],
    ("02", "q4"): [
        ("def warmup_cosine_lr(step, warmup_steps, total_steps, base_lr, min_lr=0.0):\n"
         "    if step < warmup_steps:\n        return base_lr * step / warmup_steps\n"
         "    p = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))\n"
         "    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(p))\n", "from 0 to pi"),
        ("def warmup_cosine_lr(step, warmup_steps, total_steps, base_lr, min_lr=0.0):\n"
         "    if step < warmup_steps:\n        return base_lr * (step + 1) / warmup_steps\n"
         "    p = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))\n"
         "    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))\n", "one step ahead"),
        ("def warmup_cosine_lr(step, warmup_steps, total_steps, base_lr, min_lr=0.0):\n"
         "    if step <= warmup_steps:\n        return base_lr * step / warmup_steps\n"
         "    p = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))\n"
         "    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))\n", "divides by zero"),
        ("def warmup_cosine_lr(step, warmup_steps, total_steps, base_lr, min_lr=0.0):\n"
         "    if step < warmup_steps:\n        return base_lr * step / warmup_steps\n"
         "    p = (step - warmup_steps) / (total_steps - warmup_steps)\n"
         "    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))\n", "clamp progress"),
    ],
}

# Hostile answers (the audit of the checks): each earned points without doing the work, by satisfying a
# property that a function doing nothing has too, by forging what a check reads, or by changing an input
# the check computed its answer from after the call. (chapter, question) -> [(source, text expected in a
# failure message, the question's score it may earn)]. They join WRONG, so they are graded (and compared
# with check() by test_check_agreement) like the others.
HOSTILE = {
    ("01", "q1"): [  # counts without freezing: earned q1_count and q1_same_modules_and_weights (2 of 5)
        ("def freeze_backbone(model):\n    return sum(p.numel() for p in model.classifier.parameters())\n",
         "returned 51, but", 0),
    ],
    ("01", "q2"): [  # only the out_features attribute changed: earned q2_linear_head, q2_in_features_from_model
        # and q2_backbone_untouched (3 of 5)
        ("def replace_head(model, num_classes):\n    model.classifier.out_features = num_classes\n    return model\n",
         "whose weight has shape", 0),
    ],
    ("01", "q3"): [
        # zeros of the right shape, the backbone never run: earned every test but the values' (4 of 6)
        ("def extract_features(backbone, loader):\n"
         "    return torch.zeros(len(loader.dataset), 5), loader.dataset.tensors[1].clone()\n",
         "not the backbone's outputs", 0),
        # wrong labels, and the loader's own labels zeroed to match them (the reference was read after the
        # call): full marks (6 of 6)
        ("def extract_features(backbone, loader):\n    was = backbone.training\n    backbone.eval()\n"
         "    with torch.no_grad():\n        f = torch.cat([backbone(x) for x, _ in loader])\n    backbone.train(was)\n"
         "    y = loader.dataset.tensors[1]\n    y.zero_()\n    return f, torch.zeros(len(y), dtype=torch.long)\n",
         "the labels (in the loader's order)", 5),
    ],
    ("01", "q5"): [  # no sample at all, a ValueError for k >= 5: earned q5_reproducible_and_random,
        # q5_global_random_state_untouched and q5_too_few_examples (3 of 5)
        ("def sample_per_class(labels, k, seed=0):\n    if k >= 5:\n        raise ValueError('too few')\n"
         "    return torch.tensor([seed])\n", "indices of each of the 3 classes", 0),
    ],
    ("02", "q2"): [
        # one empty group: earned q2_optimizer_accepts and q2_decay_one_is_uniform (2 of 5)
        ("def layerwise_param_groups(model, base_lr, decay):\n    return [{'params': [], 'lr': base_lr}]\n",
         "in no group", 0),
        # unfreezes the model, then groups every parameter: q2_only_trainable read requires_grad after the
        # call, so the frozen parameters in the groups went unseen: full marks (5 of 5)
        ("def layerwise_param_groups(model, base_lr, decay):\n    model.requires_grad_(True)\n"
         "    stages = list(model.blocks)\n    by_depth = [[model.classifier]]\n"
         "    for depth, stage in enumerate(reversed(stages), start=1):\n        parts = [stage]\n"
         "        if depth == 1:\n            parts += [model.conv_head, model.bn2]\n"
         "        if depth == len(stages):\n            parts += [model.conv_stem, model.bn1]\n"
         "        by_depth.append(parts)\n"
         "    return [{'params': [p for m in ms for p in m.parameters()], 'lr': base_lr * decay ** d}\n"
         "            for d, ms in enumerate(by_depth)]\n", "frozen parameters are in the groups", 4),
    ],
    ("02", "q3"): [
        # does nothing: earned q3_other_layers_still_train and q3_gamma_beta_still_learn (2 of 6)
        ("def set_batchnorm_eval(model):\n    return model\n", "says nothing yet", 0),
        # BN layers left in train mode, normalising with each batch's statistics, which are then never
        # stored: earned everything but q3_batchnorm_in_eval_mode (4 of 6)
        ("from torch.nn.modules.batchnorm import _BatchNorm\n\ndef set_batchnorm_eval(model):\n"
         "    for m in model.modules():\n        if isinstance(m, _BatchNorm):\n"
         "            m.track_running_stats = False\n    return model\n",
         "normalise with their running statistics", 0),
        # BN layers taken out of the model (their statistics then never move): 3 of 6
        ("from torch.nn.modules.batchnorm import _BatchNorm\n\ndef set_batchnorm_eval(model):\n"
         "    for parent in list(model.modules()):\n        for name, child in list(parent.named_children()):\n"
         "            if isinstance(child, _BatchNorm):\n                parent.add_module(name, nn.Identity())\n"
         "    return model\n", "normalise with their running statistics", 0),
    ],
    ("02", "q4"): [  # min_lr everywhere: earned q4_stays_at_min_after_the_end (1 of 5)
        ("def warmup_cosine_lr(step, warmup_steps, total_steps, base_lr, min_lr=0.0):\n    return min_lr\n",
         "0.1 at step 2", 0),
    ],
}
HOSTILE_AT = {}  # (chapter, question, index in WRONG) -> the score it may earn
for (_ch, _q), _items in HOSTILE.items():
    for _source, _text, _score in _items:
        HOSTILE_AT[(_ch, _q, len(WRONG[(_ch, _q)]))] = _score
        WRONG[(_ch, _q)].append((_source, _text))
ROUNDS = max(len(v) for v in WRONG.values())


def _solution(ch: str) -> dict:
    return json.loads(SOLUTIONS[ch].read_text(encoding="utf-8"))


def _crafted(ch: str, i: int) -> dict:
    """The solution notebook with wrong variant ``i`` in every question that has one."""
    return crafted(_solution(ch), {qid: v for (c, qid), v in WRONG.items() if c == ch}, i)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Solutions, exercises and every crafted notebook, graded in one run (two sandboxes)."""
    folder = tmp_path_factory.mktemp("submissions")
    paths = {}
    for ch in SOLUTIONS:
        paths[("solution", ch)] = SOLUTIONS[ch]
        paths[("exercise", ch)] = EXERCISES[ch]
        for i in range(ROUNDS):
            path = folder / f"{ch}_wrong{i}.ipynb"
            path.write_text(json.dumps(_crafted(ch, i)), encoding="utf-8")
            paths[(i, ch)] = path
    return grade_together(paths, TIMEOUT, "chapters 01-02")


@pytest.mark.parametrize("ch", list(SOLUTIONS))
def test_solution_gets_full_marks(graded, ch):
    expect_full_marks(graded[0][("solution", ch)], FULL[ch])


@pytest.mark.parametrize("ch", list(SOLUTIONS))
def test_exercise_gets_zero_with_kind_messages(graded, ch):
    expect_zero_with_kind_messages(graded[0][("exercise", ch)], FULL[ch])


@pytest.mark.parametrize("case", [(ch, q, i) for (ch, q), v in WRONG.items() for i in range(len(v))],
                         ids=lambda c: f"ch{c[0]}-{c[1]}-wrong{c[2]}")
def test_wrong_answer_loses_points_with_a_specific_message(graded, case):
    ch, qid, i = case
    expect_points_lost(graded[0][(i, ch)], qid, FULL[ch][qid], WRONG[(ch, qid)][i])


def test_an_answer_that_never_runs_the_backbone_earns_nothing_on_q3(graded):
    """Its BatchNorm statistics, mode and graph stay untouched, so without the shape asked for first
    in every q3 test it would earn those tests' points."""
    i = next(i for i, (source, _) in enumerate(WRONG[("01", "q3")]) if "torch.empty(0, 5)" in source)
    q3 = next(q for q in graded[0][(i, "01")].questions if q.id == "q3")
    assert q3.score == 0, [(t.name, t.passed) for t in q3.tests]


@pytest.mark.parametrize("case", sorted(HOSTILE_AT), ids=lambda c: f"ch{c[0]}-{c[1]}-wrong{c[2]}")
def test_hostile_answer_earns_only_what_it_should(graded, case):
    """Each answer of HOSTILE scores at most what it really does right (0 for most)."""
    ch, qid, i = case
    q = next(q for q in graded[0][(i, ch)].questions if q.id == qid)
    assert q.score == HOSTILE_AT[case], (WRONG[(ch, qid)][i][0], [(t.name, t.passed) for t in q.tests])


def test_grading_takes_seconds(graded):
    subs, seconds = graded
    assert seconds < 40, f"{len(subs)} notebooks took {seconds:.1f} s"
    assert max(s.seconds for s in subs.values()) < 10


def test_schedule_reference_is_torchs_linear_then_cosine():
    """The closed form the q4 checks compare with is torch's LinearLR + CosineAnnealingLR."""
    import warnings

    import torch
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    from tlcourse.grading.checks.ch02 import _reference_lr

    for warmup, total, base, low in ((5, 20, 0.1, 0.0), (3, 12, 2e-3, 1e-4), (1, 4, 1.0, 0.5)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
        sched = SequentialLR(opt, [LinearLR(opt, start_factor=1e-12, total_iters=warmup),
                                   CosineAnnealingLR(opt, T_max=total - warmup, eta_min=low)], milestones=[warmup])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(total + 1):
                assert math.isclose(opt.param_groups[0]["lr"], _reference_lr(step, warmup, total, base, low),
                                    rel_tol=1e-9, abs_tol=1e-9 * base), (warmup, total, step)
                opt.step()
                sched.step()


def test_solution_groups_are_accepted_by_adamw_and_wrong_ones_refused():
    """Outside the sandbox (where building an optimizer would import torch._dynamo): AdamW itself."""
    import torch

    from tlcourse.grading.checks.ch02 import TinyEfficientNet

    def load(source):
        ns = {"torch": torch, "nn": torch.nn, "math": math}
        exec(source, ns)
        return ns["layerwise_param_groups"]

    answer = next(extract.cell_source(c) for c in _solution("02")["cells"] if extract.question_of(c) == "q2")
    model = TinyEfficientNet()
    torch.optim.AdamW(load(answer)(model, 1e-3, 0.5))
    with pytest.raises(ValueError, match="more than one parameter group"):
        torch.optim.AdamW(load(WRONG[("02", "q2")][0][0])(model, 1e-3, 0.5))


def test_in_notebook_check_names_the_mistake():
    from tlcourse.grading import CheckFailed, checker

    ns: dict = {}
    exec(WRONG[("01", "q4")][0][0], ns)
    with pytest.raises(CheckFailed) as err:
        checker("01")("q4", namespace=ns)
    text = "\n".join(err.value._render_traceback_())
    assert text.startswith("❌ q4") and "dim=0" in text


@pytest.mark.parametrize("ch", list(SOLUTIONS))
def test_exercise_notebook_runs_through_without_errors(ch):
    """'Run all' on a fresh exercise notebook reaches the end: unanswered checks only say so."""
    assert unanswered_after_run_all(EXERCISES[ch]) == len(FULL[ch])
