"""Exercise set of chapter 07 (transfer learning for text): honest checks.

Solutions score full marks, untouched exercises score zero with a kind note, and for every
question plausible wrong answers (the mistakes the text warns about, and those a clever learner
might hope the checks miss) lose points, most with a message that names the mistake, while other
correct ways of writing the answer keep full marks. As for chapters 01-06, answers are crafted
from the solution notebook in a temporary folder, one variant of *every* question per notebook;
a question without a variant in a notebook keeps the solution and must keep its full marks.

The checks compare with references written out in ``checks/ch07.py`` (a checks module stands
alone); the last tests here prove those references equal :mod:`tlcourse.text`'s and
sentence-transformers' (its mean ``Pooling`` and ``CosineSimilarityLoss``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from grading_support import exercise_set_tests

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "07_text_transfer.ipynb"
FULL = {"q1": 6, "q2": 5, "q3": 5, "q4": 4, "q5": 5}
TIMEOUT = 5.0

MASK = "mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)"


def _pool(*body):
    return "def masked_mean_pool(token_embeddings, attention_mask):\n" + "".join(f"    {line}\n" for line in body)


def _cos(*body):
    return "def cosine_similarity_matrix(a, b, eps=1e-8):\n" + "".join(f"    {line}\n" for line in body)


UNIT = "F.normalize(embeddings, dim=1)"
FIT_BODY = ("unit = {unit}", "classes = {classes}", "means = torch.stack([unit[labels == c].mean(dim=0) for c in classes])",
            "return {centroids}, classes")
PREDICT_BODY = ("similarity = {similarity}", "return {ret}")


def _centroids(unit=UNIT, classes="torch.unique(labels)", centroids="F.normalize(means, dim=1)",
               similarity="F.normalize(embeddings, dim=1) @ F.normalize(centroids, dim=1).T",
               ret="classes[similarity.argmax(dim=1)]", before_predict=""):
    fit = "".join(f"    {line}\n" for line in FIT_BODY).format(unit=unit, classes=classes, centroids=centroids)
    predict = "".join(f"    {line}\n" for line in PREDICT_BODY).format(similarity=similarity, ret=ret)
    return (f"def fit_centroids(embeddings, labels):\n{fit}\n\n"
            f"def predict_nearest_centroid(embeddings, centroids, classes):\n{before_predict}{predict}")


def _loss(value):
    return f"def cosine_pair_loss(a, b, same):\n    cos = F.cosine_similarity(a, b, dim=1)\n    return {value}\n"


# make_pairs: the solution's drawing, with the parts a variant changes named
PAIRS = '''def make_pairs(labels, n_pairs, seed=0):
    {seeding}
    labels = torch.as_tensor(labels)
    classes, counts = torch.unique(labels, return_counts=True)
    paired = torch.nonzero(torch.isin(labels, classes[counts >= 2])).flatten()
    if len(paired) == 0 or len(classes) < 2:
        raise ValueError("no pairs")
    index = torch.arange(len(labels))

    def pick(candidates):
        return int(candidates[{draw}])

    n_positive = {n_positive}
    first, second = [], []
    for k in range(n_pairs):
        if k < n_positive:
            i = pick(paired)
            j = pick({partner})
        else:
            i = pick(index)
            j = pick(index[labels != labels[i]])
        first.append(i)
        second.append(j)
    same = {same}
    return {ret}
'''
SEEDING = "g = torch.Generator().manual_seed(seed)"
DRAW = "torch.randint(len(candidates), (1,), generator=g)"
SAME = "torch.cat([torch.ones(n_positive), torch.zeros(n_pairs - n_positive)])"


def _pairs(seeding=SEEDING, draw=DRAW, n_positive="n_pairs // 2", partner="index[(labels == labels[i]) & (index != i)]",
           same=SAME, ret="torch.tensor(first), torch.tensor(second), same"):
    return PAIRS.format(seeding=seeding, draw=draw, n_positive=n_positive, partner=partner, same=same, ret=ret)


# Draws each partner until one fits: right while every class has two examples, endless for a class of one.
HANG = """def make_pairs(labels, n_pairs, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    n = len(labels)
    first, second = [], []
    for k in range(n_pairs):
        i = int(torch.randint(n, (1,), generator=g))
        while True:
            j = int(torch.randint(n, (1,), generator=g))
            if j != i and bool(labels[j] == labels[i]) == (k < n_pairs // 2):
                break
        first.append(i)
        second.append(j)
    same = torch.cat([torch.ones(n_pairs // 2), torch.zeros(n_pairs - n_pairs // 2)])
    return torch.tensor(first), torch.tensor(second), same
"""


# question -> [(wrong answer source, text expected in a failure message, or None)]
WRONG = {
    "q1": [
        (_pool("return token_embeddings.mean(dim=1)"), "padding positions were averaged in"),
        (_pool(MASK, "return (token_embeddings * mask).sum(dim=1) / token_embeddings.shape[1]"), "divided by T"),
        (_pool(MASK, "return (token_embeddings * mask).sum(dim=1)"), "summed but not averaged"),
        (_pool("return token_embeddings.sum(dim=1) / attention_mask.sum(dim=1, keepdim=True)"),
         "padding vectors were summed in"),
        (_pool("return token_embeddings[:, 0]"), "[CLS] pooling"),
        (_pool(MASK, "return (token_embeddings * mask).sum(dim=1) / mask.sum(dim=1)"), "gave nan or inf"),
        (_pool(MASK, "token_embeddings *= mask", "return token_embeddings.sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)"),
         "changed the values of its input token_embeddings"),
        (_pool("mask = attention_mask.unsqueeze(-1).float()",
               "return (token_embeddings * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)"),
         "convert the mask to the embeddings' dtype"),
        (_pool(MASK, "with torch.no_grad():",
               "    return (token_embeddings * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)"),
         "cut from the autograd graph"),
        # right only where the padding is at the end: the hidden test's left padding and holes catch it
        (_pool("rows = []", "for x, n in zip(token_embeddings, attention_mask.sum(dim=1).tolist()):",
               "    rows.append(x[:n].mean(dim=0) if n > 0 else x.new_zeros(x.shape[1]))", "return torch.stack(rows)"),
         "padding were always at the end"),
        (_pool(MASK, "return (token_embeddings * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)"),
         "without keepdim"),
        (_pool("mask = attention_mask.unsqueeze_(-1).to(token_embeddings.dtype)",
               "return (token_embeddings * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)"),
         "changed the shape of its input attention_mask"),
    ],
    "q2": [
        (_cos("return a @ b.T"), "dot products, not cosines"),
        (_cos("return F.normalize(a, dim=1) @ b.T"), "only the rows of a"),
        (_cos("return F.normalize(a, dim=0) @ F.normalize(b, dim=0).T"), "each column was normalised"),
        (_cos("return F.normalize(b, dim=1) @ F.normalize(a, dim=1).T"), "transposed"),
        (_cos("return 1 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).T"), "cosine distance"),
        (_cos("return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T"), "gave nan or inf"),
        (_cos("a /= a.norm(dim=1, keepdim=True).clamp(min=eps)", "b /= b.norm(dim=1, keepdim=True).clamp(min=eps)",
              "return a @ b.T"), "changed the values of its input a"),
        (_cos("return F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T"), "keep the inputs' dtype"),
        (_cos("return (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T).detach()"), "cut from the autograd graph"),
    ],
    "q3": [
        (_centroids(unit="embeddings", centroids="F.normalize(means, dim=1)"), "averaged before being normalised"),
        (_centroids(centroids="means"), "not scaled back to length 1"),
        (_centroids(unit="embeddings", centroids="means"), "plain means of the raw embeddings"),
        (_centroids(classes="torch.arange(len(torch.unique(labels)))"), "labels need not be"),
        (_centroids(classes="torch.tensor(list(dict.fromkeys(labels.tolist())))"), "return them sorted"),
        (_centroids(ret="classes[similarity.argmin(dim=1)]"), "least similar centroid"),
        (_centroids(ret="similarity.argmax(dim=1)"), "positions 0..C-1"),
        (_centroids(similarity="embeddings @ centroids.T"), "compared by dot product"),
        (_centroids(similarity="F.normalize(embeddings, dim=1) @ centroids.T"), "compared by dot product"),
        (_centroids(similarity="-torch.cdist(embeddings, centroids)"), "Euclidean distance"),
        (_centroids(unit="embeddings.div_(embeddings.norm(dim=1, keepdim=True))"), "changed the values of its input embeddings"),
        (_centroids(before_predict="    classes = classes.sort().values\n"), "classes given in the order"),
    ],
    "q4": [
        (_loss("((cos - same) ** 2).sum()"), "summed over the pairs"),
        (_loss("(((a * b).sum(dim=1) - same) ** 2).mean()"), "dot product"),
        (_loss("((1 - cos - same) ** 2).mean()"), "cosine distance"),
        (_loss("(((a - b).norm(dim=1) - same) ** 2).mean()"), "Euclidean distance"),
        (_loss("((cos - (1 - same)) ** 2).mean()"), "targets are swapped"),
        (_loss("((cos - (2 * same - 1)) ** 2).mean()"), "target −1"),
        (_loss("(cos - same).abs().mean()"), "mean absolute error"),
        (_loss("((cos - same) ** 2).mean().sqrt()"), "root of the mean squared error"),
        (_loss("((cos - same) ** 2 * same).mean()"), "only the pairs of one class"),
        (_loss("((cos - same) ** 2).mean().item()"), "(no .item())"),
        (_loss("((cos - same) ** 2).mean().detach()"), "cut from the autograd graph"),
        ("def cosine_pair_loss(a, b, same):\n    cos = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))\n"
         "    return ((cos - same) ** 2).mean()\n", "not finite"),
        ("def cosine_pair_loss(a, b, same):\n    d = (a - b).norm(dim=1)\n"
         "    return (same * d ** 2 + (1 - same) * F.relu(1 - d) ** 2).mean()\n", None),  # Hadsell et al.'s loss
    ],
    "q5": [
        (_pairs(seeding="torch.manual_seed(seed)", draw="torch.randint(len(candidates), (1,))"),
         "torch's global random state changed"),
        (_pairs(seeding="import numpy as np\n    np.random.seed(seed)", draw="int(np.random.randint(len(candidates)))"),
         "NumPy's global random state changed"),
        (_pairs(partner="index[labels == labels[i]]"), "joins an example with itself"),
        (_pairs(n_positive="0", same="(labels[torch.tensor(first)] == labels[torch.tensor(second)]).float()"),
         "positive pairs of"),
        (_pairs(same="torch.cat([torch.zeros(n_positive), torch.ones(n_pairs - n_positive)])"),
         "joins two different classes"),
        (_pairs(draw="0"), "all gave the same pairs"),
        (_pairs(same="torch.cat([torch.ones(n_positive), torch.zeros(n_pairs - n_positive)]).long()"),
         "should be a float tensor"),
        (_pairs(ret="first, second, same"), "should be a torch.Tensor"),
        (HANG, None),  # draws until a partner fits: endless for a class of one example (hidden test)
        (_pairs().replace("        raise ValueError(\"no pairs\")", "        pass"), None),
    ],
}

# Hostile answers: each would have earned points without a correct answer (references computed after the call
# from inputs its code changed in place, properties that an answer which does nothing satisfies). name ->
# (question, source, text expected in a failure message, tests it must not pass; "all": the question scores 0).
# They join WRONG, so they also lose points with that message.
HOSTILE = {
    # dot products where gradients are asked for, after zeroing both inputs (whose cosine, read again after the
    # call, was then 0 everywhere, with a zero gradient); the solution elsewhere
    "zeroed_inputs_matrix": ("q2", _cos("if a.requires_grad:", "    with torch.no_grad():", "        a.zero_()",
                                        "        b.zero_()", "    return a @ b.T",
                                        "a_unit = a / a.norm(dim=1, keepdim=True).clamp(min=eps)",
                                        "b_unit = b / b.norm(dim=1, keepdim=True).clamp(min=eps)", "return a_unit @ b_unit.T"),
                             "the wrong values", ["test_q2_gradients_and_square_matrices"]),
    # the same for the pair loss's gradient test
    "zeroed_inputs_pair_loss": ("q4", "def cosine_pair_loss(a, b, same):\n    if a.requires_grad:\n"
                                      "        with torch.no_grad():\n            a.zero_()\n            b.zero_()\n"
                                      "        return ((a * b).sum(dim=1) - same).pow(2).mean()\n"
                                      "    cos = F.cosine_similarity(a, b, dim=1)\n    return ((cos - same) ** 2).mean()\n",
                                "the gradient with respect to a", ["test_q4_gradients_reach_both_sides"]),
    # one pair: a loss of 0 after zeroing the first vector (the reference once read it after the call)
    "zeroed_single_pair": ("q4", "def cosine_pair_loss(a, b, same):\n    if len(a) == 1:\n"
                                 "        with torch.no_grad():\n            a.zero_()\n        return (a * 0).sum()\n"
                                 "    cos = F.cosine_similarity(a, b, dim=1)\n    return ((cos - same) ** 2).mean()\n",
                           "on one pair should be", ["test_q4_zero_vector_dtype_and_inputs"]),
    # draws nothing: fixed pairs leave every random state alone
    "fixed_pairs": ("q5", "def make_pairs(labels, n_pairs, seed=0):\n    zeros = torch.zeros(n_pairs, dtype=torch.long)\n"
                          "    return zeros, zeros.clone(), torch.zeros(n_pairs)\n", "positive pairs of", "all"),
}
for _qid, _source, _text, _ in HOSTILE.values():
    WRONG[_qid].append((_source, _text))

# question -> other correct ways to write the answer: each must keep full marks
RIGHT = {
    "q1": [
        _pool("mask = attention_mask.unsqueeze(-1).type_as(token_embeddings)",
              "return (token_embeddings * mask).sum(1) / torch.clamp(mask.sum(1), min=1)"),
        _pool("m = attention_mask.to(token_embeddings.dtype)",
              "total = torch.einsum('btd,bt->bd', token_embeddings, m)",
              "return total / m.sum(dim=1, keepdim=True).clamp_min(1e-9)"),
        _pool("m = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)",
              "return torch.nan_to_num((token_embeddings * m).sum(1) / m.sum(1))"),
    ],
    "q2": [
        _cos("return F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1)"),
        _cos("return torch.stack([torch.stack([F.cosine_similarity(x, y, dim=0) for y in b]) for x in a])"),
        _cos("return torch.mm(F.normalize(a, dim=-1), F.normalize(b, dim=-1).transpose(0, 1))"),
    ],
    "q3": [
        ("def fit_centroids(embeddings, labels):\n    unit = embeddings / embeddings.norm(dim=1, keepdim=True)\n"
         "    classes, inverse = torch.unique(labels, return_inverse=True)\n"
         "    sums = unit.new_zeros(len(classes), unit.shape[1]).index_add_(0, inverse, unit)\n"
         "    return sums / sums.norm(dim=1, keepdim=True), classes\n\n\n"
         "def predict_nearest_centroid(embeddings, centroids, classes):\n"
         "    sim = F.cosine_similarity(embeddings[:, None, :], centroids[None, :, :], dim=-1)\n"
         "    return classes[torch.argmax(sim, dim=1)]\n"),
        ("def fit_centroids(embeddings, labels):\n    classes = sorted(set(labels.tolist()))\n    rows = []\n"
         "    for c in classes:\n        members = embeddings[labels == c]\n"
         "        mean = (members / members.norm(dim=1, keepdim=True)).mean(0)\n        rows.append(mean / mean.norm())\n"
         "    return torch.stack(rows), classes\n\n\n"
         "def predict_nearest_centroid(embeddings, centroids, classes):\n"
         "    scores = (embeddings / embeddings.norm(dim=1, keepdim=True)) @ (centroids / centroids.norm(dim=1, keepdim=True)).T\n"
         "    return torch.as_tensor(classes)[scores.argmax(1)]\n"),
    ],
    "q4": [
        "def cosine_pair_loss(a, b, same):\n    return F.mse_loss(F.cosine_similarity(a, b), same)\n",
        ("def cosine_pair_loss(a, b, same):\n    loss_fct = torch.nn.MSELoss()\n"
         "    return loss_fct(torch.cosine_similarity(a, b), same.float().view(-1))\n"),
        ("def cosine_pair_loss(a, b, same):\n    an = a / a.norm(dim=1, keepdim=True).clamp(min=1e-8)\n"
         "    bn = b / b.norm(dim=1, keepdim=True).clamp(min=1e-8)\n    return ((an * bn).sum(1) - same).pow(2).mean()\n"),
    ],
    "q5": [
        ("def make_pairs(labels, n_pairs, seed=0):\n    g = torch.Generator().manual_seed(seed)\n"
         "    labels = torch.as_tensor(labels)\n    n = len(labels)\n"
         "    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing='ij')\n    i, j = i.flatten(), j.flatten()\n"
         "    same_class = labels[i] == labels[j]\n    pos = torch.nonzero(same_class & (i != j)).flatten()\n"
         "    neg = torch.nonzero(~same_class).flatten()\n    if len(pos) == 0 or len(neg) == 0:\n"
         "        raise ValueError('no positive or no negative pair exists')\n    k = n_pairs // 2\n"
         "    chosen = torch.cat([pos[torch.randint(len(pos), (k,), generator=g)],\n"
         "                        neg[torch.randint(len(neg), (n_pairs - k,), generator=g)]])\n"
         "    return i[chosen], j[chosen], same_class[chosen].float()\n"),
        ("import numpy as np\n\n\ndef make_pairs(labels, n_pairs, seed=0):\n    rng = np.random.default_rng(seed)\n"
         "    y = np.asarray(labels)\n    values, counts = np.unique(y, return_counts=True)\n"
         "    if (counts < 2).all() or len(values) < 2:\n        raise ValueError('no pairs')\n"
         "    anchors = np.flatnonzero(np.isin(y, values[counts >= 2]))\n    first, second, same = [], [], []\n"
         "    for k in range(n_pairs):\n        if k % 2 == 0:\n            i = rng.choice(anchors)\n"
         "            j = rng.choice(np.flatnonzero((y == y[i]) & (np.arange(len(y)) != i)))\n"
         "        else:\n            i = rng.integers(len(y))\n            j = rng.choice(np.flatnonzero(y != y[i]))\n"
         "        first.append(i)\n        second.append(j)\n        same.append(1.0 if k % 2 == 0 else 0.0)\n"
         "    return torch.tensor(first), torch.tensor(second), torch.tensor(same)\n"),
    ],
}


globals().update(exercise_set_tests("07", SOLUTION, FULL, WRONG, RIGHT, TIMEOUT, hostile=HOSTILE))


def test_in_notebook_check_names_the_mistake_and_skips_hidden_tests():
    """check() runs the visible tests only: pooling that assumes the padding is at the end passes it
    and loses the hidden test's point in grading."""
    import torch
    from torch.nn import functional as F

    from tlcourse.grading import CheckFailed, checker

    check = checker("07")
    ns: dict = {"torch": torch, "F": F}
    exec(WRONG["q1"][1][0], ns)  # divided by T
    with pytest.raises(CheckFailed) as err:
        check("q1", namespace=ns)
    text = "\n".join(err.value._render_traceback_())
    assert text.startswith("❌ q1") and "divided by T" in text
    exec(WRONG["q1"][9][0], ns)  # the first n tokens: right for right padding only
    check("q1", namespace=ns)


# --- the references in checks/ch07.py are tlcourse.text's and sentence-transformers' ---------------

def test_pooling_reference_equals_tlcourse_and_sentence_transformers():
    import torch

    from tlcourse import text
    from tlcourse.grading.checks import ch07

    st_models = pytest.importorskip("sentence_transformers.models")
    for seed, (B, T, D) in enumerate(((3, 5, 4), (4, 7, 6), (1, 2, 8))):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(B, T, D, generator=g)
        mask = (torch.rand(B, T, generator=g) > 0.4).long()
        mask[0] = 0  # an all-padding row
        ours = ch07._reference_pool(x, mask)
        assert torch.allclose(ours.float(), text.mean_pool(x, mask), atol=1e-6)
        pooling = st_models.Pooling(D, pooling_mode="mean")
        theirs = pooling({"token_embeddings": x, "attention_mask": mask})["sentence_embedding"]
        assert torch.allclose(ours.float(), theirs, atol=1e-6)


def test_centroid_references_equal_tlcourse_text():
    import torch

    from tlcourse import text
    from tlcourse.grading.checks import ch07

    for seed in range(3):
        x, labels = ch07._clustered((3, 1, 5), 6, seed=seed)
        centroids, classes = ch07._reference_centroids(x, labels)
        library = text.nearest_centroid(x.numpy(), labels.numpy())
        assert classes.tolist() == library.classes_.tolist()
        assert torch.allclose(centroids.float(), library.centroids, atol=1e-6)
        q = ch07._vectors(8, 6, seed=seed + 10)
        assert ch07._reference_predict(q, centroids, classes).tolist() == library.predict(q.numpy()).tolist()


def test_pair_loss_reference_equals_sentence_transformers_cosine_similarity_loss():
    import torch

    from tlcourse.grading.checks import ch07

    losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    loss = losses.CosineSimilarityLoss(None)  # compute_loss_from_embeddings needs no model
    for seed in range(3):
        a, b = ch07._vectors(6, 5, seed=seed), ch07._vectors(6, 5, seed=seed + 100)
        same = (torch.rand(6, generator=torch.Generator().manual_seed(seed)) > 0.5).float()
        theirs = loss.compute_loss_from_embeddings([a, b], same)
        assert torch.allclose(ch07._reference_pair_loss(a, b, same), theirs, atol=1e-7)
