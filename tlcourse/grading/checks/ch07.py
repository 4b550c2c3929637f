"""Checks for chapter 07 (transfer learning for text): masked mean pooling, a cosine-similarity
matrix, a nearest-centroid (prototype) classifier, SetFit's pair loss and its pairs.

Every question runs on small random tensors (never the encoder), so a question grades in
milliseconds. The inputs are drawn from seeded generators inside each test, with shapes that
differ from the notebook's examples, so that an answer cannot be typed in. Tests marked
``after_due_date`` are not run by the in-notebook ``check()``; ``tlcourse grade`` runs them and
Gradescope shows them after the deadline.

The references (``_reference_*``) are written out here rather than imported from
:mod:`tlcourse.text` (a checks module stands alone, and a submission could rebind the library's
functions); ``tests/test_grading_ch07.py`` proves that they equal :mod:`tlcourse.text`'s and
sentence-transformers' (its ``Pooling`` and ``CosineSimilarityLoss``).

Decisions:

- q1 takes an integer mask (what the tokenizer returns), keeps the embeddings' dtype (float64,
  and bfloat16 as on a GPU), and gives zeros for an all-padding row (the count is clamped, as
  sentence-transformers does). Padding may be on either side or anywhere (hidden test).
- q2 treats a zero vector as similar to nothing (cosine 0), as ``F.cosine_similarity`` does.
- q3's centroids are those of :func:`tlcourse.text.nearest_centroid`: the mean of a class's
  L2-normalised embeddings, scaled to length 1 again; ``classes`` are the sorted labels seen
  (any integers). The prediction compares by cosine, so it must work for centroids of any
  length (the test gives it centroids of lengths 0.25 to 4).
- q4 is sentence-transformers' ``CosineSimilarityLoss`` with SetFit's targets (Tunstall et al.
  2022): the mean over the pairs of ``(cos(a_i, b_i) − same_i)²``, target 1 for a pair of one
  class and 0 for a pair of two classes.
- q5: ``n_pairs // 2`` positive pairs (two *different* examples of one class; a class with a
  single example only appears in negative pairs), the rest negative, drawn with the learner's
  own generator seeded by ``seed``; ``ValueError`` when no positive (or no negative) pair exists.
- "Leaves its inputs unchanged" compares shapes and values: ``tlcourse grade`` brings both back from
  the sandbox, so ``attention_mask.unsqueeze_(-1)`` fails there as it does in the notebook; every test
  goes on with copies made before the call.

Format: :mod:`tlcourse.grading.spec`.
"""

import random

import torch
from torch.nn import functional as F

from tlcourse.grading.spec import (close, expect_close, expect_loss, expect_shape, expect_tensor, expect_tuple,
                                   first_match, points, seeded_randn)

QUESTIONS = {
    "q1": {"title": "masked mean pooling", "functions": ["masked_mean_pool"]},
    "q2": {"title": "a cosine-similarity matrix", "functions": ["cosine_similarity_matrix"]},
    "q3": {"title": "a nearest-centroid classifier", "functions": ["fit_centroids", "predict_nearest_centroid"]},
    "q4": {"title": "SetFit's pair loss", "functions": ["cosine_pair_loss"]},
    "q5": {"title": "positive and negative pairs", "functions": ["make_pairs"]},
}

HIDDEN = "after_due_date"


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _row_scales(n, seed, low=0.2, high=5.0):
    """``[n, 1]`` lengths spread over ``[low, high]`` (log-uniform): rows of very different norms."""
    u = torch.rand(n, 1, generator=_generator(seed))
    return torch.exp(torch.log(torch.tensor(low)) + u * (torch.log(torch.tensor(high)) - torch.log(torch.tensor(low))))


# --- references (equal to tlcourse.text's and sentence-transformers'; tests/test_grading_ch07.py) ---

def _reference_pool(token_embeddings, attention_mask):
    """Mean of the real tokens' vectors, in float64: ``[B, T, D]``, ``[B, T]`` -> ``[B, D]``."""
    x = token_embeddings.detach().double()
    m = attention_mask.detach().unsqueeze(-1).double()
    return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _reference_cosine_matrix(a, b):
    """``[N, D]``, ``[M, D]`` -> ``[N, M]`` cosine similarities in float64 (0 for a zero vector)."""
    return F.cosine_similarity(a.detach().double()[:, None, :], b.detach().double()[None, :, :], dim=-1)


def _reference_centroids(embeddings, labels):
    """``(centroids [C, D] float64, classes [C])``: the unit-length mean of each class's unit vectors."""
    x = F.normalize(embeddings.detach().double(), dim=-1)
    classes = torch.unique(labels)
    means = torch.stack([x[labels == c].mean(0) for c in classes])
    return F.normalize(means, dim=-1), classes


def _reference_predict(embeddings, centroids, classes):
    """The class of the centroid with the highest cosine similarity: ``[M, D]`` -> ``[M]``."""
    return classes[_reference_cosine_matrix(embeddings, centroids).argmax(1)]


def _reference_pair_loss(a, b, same):
    """``mean((cos(a_i, b_i) − same_i)²)``: sentence-transformers' CosineSimilarityLoss."""
    return ((F.cosine_similarity(a, b, dim=-1) - same.to(a.dtype)) ** 2).mean()


def _which(got, want, variants, atol=1e-5):
    """The message of the first ``(tensor, message)`` variant (a known mistake) that ``got``
    equals while the right answer ``want`` does not; ``None`` when none fits."""
    got = got.double()
    for wrong, message in variants:
        wrong = wrong.double()
        if wrong.shape == got.shape and torch.allclose(got, wrong, atol=atol, rtol=1e-4) and not (
                wrong.shape == want.shape and torch.allclose(wrong, want.double(), atol=atol, rtol=1e-4)):
            return message
    return None


def _unchanged(before, after, what, hint):
    """Each input holds the shape and values it held before the call (``tlcourse grade`` sends both
    back from the sandbox); the tests then go on with the copies made before the call."""
    for name, (b, a) in zip(what, zip(before, after)):
        if b.shape != a.shape:
            raise AssertionError(f"your function changed the shape of its input {name} from {list(b.shape)} to "
                                 f"{list(a.shape)} (an in-place op such as unsqueeze_): {hint}")
        if b.dtype != a.dtype or not torch.equal(b, a):
            raise AssertionError(f"your function changed the values of its input {name}: {hint}")


# --- q1: masked_mean_pool(token_embeddings [B, T, D], attention_mask [B, T]) -> [B, D] ----------

def _mask(lengths, T, left=False):
    """Right padding (BERT's tokenizers) by default: ``lengths[b]`` ones, then zeros."""
    pos = torch.arange(T)
    mask = torch.stack([(pos >= T - n) if left else (pos < n) for n in lengths])
    return mask.long()


def _pool(masked_mean_pool, x, mask, what):
    B, T, D = x.shape        # before the call, which may reshape x in place (a mistake reported elsewhere)
    out = masked_mean_pool(x, mask)
    got = expect_tensor(out, what)
    if tuple(got.shape) == (B, 1, D):
        raise AssertionError(f"{what} has shape [B, 1, D] = {list(got.shape)}: sum over the tokens without keepdim "
                             f"(or squeeze it), so that the result is [B, D] = [{B}, {D}]")
    if tuple(got.shape) == (B, T, D):
        raise AssertionError(f"{what} still has a vector per token, shape {list(got.shape)}: pooling averages over the "
                             f"tokens (dim 1) to one vector per sentence, [B, D] = [{B}, {D}]")
    expect_shape(got, (B, D), what)
    return out, got


def _pool_mistakes(x, mask):
    x, m = x.double(), mask.unsqueeze(-1).double()
    T = x.shape[1]
    return [
        (x.mean(1), "the padding positions were averaged in (a plain mean over the tokens): a transformer's outputs "
                    "at padding positions are not zero, so a sentence would change with the length of its batch. "
                    "Multiply by the mask and divide by the number of real tokens"),
        ((x * m).sum(1) / T, "the sum over the real tokens was divided by T, the padded length of the batch: divide "
                             "each sentence by its own number of real tokens, attention_mask.sum(1)"),
        ((x * m).sum(1), "the real tokens were summed but not averaged: divide by each sentence's number of real "
                         "tokens"),
        (x.sum(1) / m.sum(1), "the padding vectors were summed in (only the count excludes them): multiply the token "
                              "vectors by the mask before summing"),
        (x[:, 0], "that is the first token's vector ([CLS] pooling); this model's sentence vector is the mean of its "
                  "real tokens"),
    ]


@points(2)
def test_q1_mean_over_real_tokens(masked_mean_pool):
    """averages each sentence's vectors over its real tokens only (mask 1), whatever the padding: [B, T, D] -> [B, D]"""
    x = seeded_randn(5, 7, 6, seed=11)  # padding positions hold real numbers too, as a transformer's do
    mask = _mask([7, 3, 1, 5, 2], 7)
    what = "masked_mean_pool(x [5, 7, 6], mask [5, 7])"
    _, got = _pool(masked_mean_pool, x.clone(), mask.clone(), what)
    want = _reference_pool(x, mask)
    message = _which(got, want, _pool_mistakes(x, mask))
    if message:
        raise AssertionError(f"{what}: {message}")
    expect_close(got, want, what, atol=1e-5)


@points(1)
def test_q1_all_padding_row_gives_zeros(masked_mean_pool):
    """a row with no real token (all padding) gives a vector of zeros, not nan: the count is clamped, as sentence-transformers does"""
    x = seeded_randn(4, 5, 3, seed=12)
    mask = _mask([5, 0, 2, 0], 5)
    what = "masked_mean_pool on a batch whose rows 1 and 3 are all padding"
    _, got = _pool(masked_mean_pool, x.clone(), mask.clone(), what)
    if not bool(torch.isfinite(got).all()):
        raise AssertionError(f"{what} gave nan or inf: with no real token the sum is 0 and the count is 0, and 0/0 "
                             "is nan. Clamp the count, mask.sum(1).clamp(min=1e-9), as sentence-transformers does: "
                             "the row then stays 0")
    assert not bool(got[[1, 3]].any()), (f"{what}: an all-padding row should give zeros (the sum of no vectors, "
                                         "divided by the clamped count), not the mean of its padding vectors")
    expect_close(got, _reference_pool(x, mask), what, atol=1e-5)


@points(1)
def test_q1_keeps_dtype_and_inputs(masked_mean_pool):
    """keeps the embeddings' dtype (float64, or bfloat16 as on a GPU) and leaves both inputs unchanged"""
    for dtype, atol, seed in ((torch.float64, 1e-10, 13), (torch.bfloat16, 5e-2, 14)):
        x = seeded_randn(3, 6, 4, seed=seed).to(dtype)
        mask = _mask([2, 6, 4], 6)
        originals = (x.clone(), mask.clone())
        what = f"masked_mean_pool on {str(dtype).replace('torch.', '')} embeddings"
        _, got = _pool(masked_mean_pool, x, mask, what)
        _unchanged(originals, (x, mask), ("token_embeddings", "attention_mask"),
                   "compute new tensors (token_embeddings * mask, not token_embeddings *= mask): the caller's batch "
                   "is still in use")
        assert got.dtype == dtype, (
            f"{what} returned {got.dtype}: convert the mask to the embeddings' dtype "
            "(attention_mask.unsqueeze(-1).to(token_embeddings.dtype)); mask.float() turns bfloat16 or float16 "
            "embeddings into float32")
        expect_close(got.double(), _reference_pool(*originals), what, atol=atol)


@points(1)
def test_q1_gradients_reach_the_real_tokens_only(masked_mean_pool):
    """stays in the autograd graph (fine-tuning backpropagates through it): each real token gets 1/count of the gradient, padding none"""
    x = seeded_randn(3, 6, 4, seed=15).requires_grad_(True)
    mask = _mask([6, 2, 4], 6)
    out = masked_mean_pool(x, mask.clone())
    expect_tensor(out, "masked_mean_pool(x, mask)")
    assert out.requires_grad, ("the result is cut from the autograd graph (torch.no_grad, .detach(), .data, NumPy?): "
                               "fine-tuning the encoder, as SetFit does, backpropagates through the pooling")
    x.grad = None  # the gradient read below is this backward()'s, not one the learner's code wrote
    w = seeded_randn(3, 4, seed=16)
    (out * w).sum().backward()
    assert x.grad is not None, "no gradient reached token_embeddings"
    count = mask.sum(1, keepdim=True).unsqueeze(-1).double()
    want = w.double().unsqueeze(1) * mask.unsqueeze(-1).double() / count
    if bool(x.grad[mask == 0].any()):
        raise AssertionError("a gradient reached the padding positions: they must take no part in the mean")
    expect_close(x.grad, want, "the gradient with respect to token_embeddings", atol=1e-6)


@points(1, visibility=HIDDEN)
def test_q1_padding_on_the_left_or_anywhere(masked_mean_pool):
    """the mask decides, not the position: padding on the left (some tokenizers), holes in the mask, one token, one sentence"""
    x = seeded_randn(4, 5, 3, seed=17)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]])
    what = "masked_mean_pool with padding on the left and holes in the mask"
    _, got = _pool(masked_mean_pool, x.clone(), mask.clone(), what)
    want = _reference_pool(x, mask)
    if not torch.allclose(got.double(), want, atol=1e-5):
        right = _reference_pool(x, _mask(mask.sum(1).tolist(), 5))
        if torch.allclose(got.double(), right, atol=1e-5):
            raise AssertionError(f"{what}: the first n tokens were averaged, as if the padding were always at the end; "
                                 "use the mask itself (multiply by it), not the count alone")
    expect_close(got, want, what, atol=1e-5)
    for shape, m in (((1, 1, 4), torch.ones(1, 1, dtype=torch.long)), ((1, 3, 2), torch.tensor([[1, 1, 0]]))):
        x = seeded_randn(*shape, seed=18)
        _, got = _pool(masked_mean_pool, x.clone(), m.clone(), f"masked_mean_pool on a batch of shape {list(shape)}")
        expect_close(got, _reference_pool(x, m), f"masked_mean_pool on a batch of shape {list(shape)}", atol=1e-5)


# --- q2: cosine_similarity_matrix(a [N, D], b [M, D]) -> [N, M] --------------------------------

def _vectors(n, d, seed):
    """``[n, d]`` random directions with lengths from 0.2 to 5: a dot product is not a cosine here."""
    return seeded_randn(n, d, seed=seed) * _row_scales(n, seed + 1000)


def _cosines(cosine_similarity_matrix, a, b, what):
    out = cosine_similarity_matrix(a, b)
    got = expect_tensor(out, what)
    N, M = a.shape[0], b.shape[0]
    if tuple(got.shape) == (M, N) and M != N:
        raise AssertionError(f"{what} has shape {list(got.shape)}, [M, N]: the matrix is transposed. Entry [i, j] "
                             f"compares a[i] with b[j], so the result is [N, M] = [{N}, {M}] (a @ b.T)")
    expect_shape(got, (N, M), what)
    return out, got


def _cosine_mistakes(a, b):
    a, b = a.double(), b.double()
    an, bn = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return [
        (a @ b.T, "those are dot products, not cosines: divide by both vectors' lengths (normalise each row to "
                  "length 1, then multiply); a long vector would otherwise look similar to everything"),
        (an @ b.T, "only the rows of a were normalised; normalise the rows of b too"),
        (a @ bn.T, "only the rows of b were normalised; normalise the rows of a too"),
        (F.normalize(a, dim=0) @ F.normalize(b, dim=0).T, "each column was normalised (dim 0); normalise each row, "
                                                          "one vector per row (dim 1)"),
        (1 - an @ bn.T, "that is the cosine distance 1 − cos; return the similarity cos itself"),
    ]


@points(2)
def test_q2_cosines_of_every_pair(cosine_similarity_matrix):
    """entry [i, j] is cos(a[i], b[j]), as F.cosine_similarity gives, for vectors of any length: [N, D], [M, D] -> [N, M]"""
    a, b = _vectors(5, 8, seed=21), _vectors(3, 8, seed=22)
    what = "cosine_similarity_matrix(a [5, 8], b [3, 8])"
    _, got = _cosines(cosine_similarity_matrix, a.clone(), b.clone(), what)
    want = _reference_cosine_matrix(a, b)
    message = _which(got, want, _cosine_mistakes(a, b))
    if message:
        raise AssertionError(f"{what}: {message}")
    expect_close(got, want, what, atol=1e-5)


@points(1)
def test_q2_zero_vectors_are_similar_to_nothing(cosine_similarity_matrix):
    """a zero vector gives cosine 0 with everything, not nan: the lengths are clamped to a small eps"""
    a, b = _vectors(4, 6, seed=23), _vectors(3, 6, seed=24)
    a[2] = 0.0
    b[0] = 0.0
    what = "cosine_similarity_matrix with a zero row in a and in b"
    _, got = _cosines(cosine_similarity_matrix, a.clone(), b.clone(), what)
    if not bool(torch.isfinite(got).all()):
        raise AssertionError(f"{what} gave nan or inf: a zero vector has length 0 and 0/0 is nan. Divide by the length "
                             "clamped to a small eps (F.normalize(x, dim=1) does, as F.cosine_similarity does), so a "
                             "zero vector is similar to nothing: 0")
    expect_close(got, _reference_cosine_matrix(a, b), what, atol=1e-5)


@points(1)
def test_q2_keeps_dtype_and_inputs(cosine_similarity_matrix):
    """keeps float64 as float64 and leaves both inputs unchanged"""
    a, b = _vectors(3, 5, seed=25).double(), _vectors(4, 5, seed=26).double()
    originals = (a.clone(), b.clone())
    what = "cosine_similarity_matrix on float64 inputs"
    _, got = _cosines(cosine_similarity_matrix, a, b, what)
    _unchanged(originals, (a, b), ("a", "b"), "normalise into new tensors (a / a.norm(...), F.normalize), not in place "
                                             "(a /= ..., a.div_): the caller's embeddings are still in use")
    assert got.dtype == torch.float64, f"{what} returned {got.dtype}: keep the inputs' dtype (no .float())"
    expect_close(got, _reference_cosine_matrix(*originals), what, atol=1e-10)


@points(1, visibility=HIDDEN)
def test_q2_gradients_and_square_matrices(cosine_similarity_matrix):
    """a square matrix is not symmetric ([i, j] compares a[i] with b[j]); gradients reach both inputs, as F.cosine_similarity's"""
    a = _vectors(4, 4, seed=27).requires_grad_(True)
    b = _vectors(4, 4, seed=28).requires_grad_(True)
    a0, b0 = a.detach().clone(), b.detach().clone()  # ours: the learner's code may change a and b in place
    out = cosine_similarity_matrix(a, b)
    got = expect_tensor(out, "cosine_similarity_matrix(a [4, 4], b [4, 4])")
    want = _reference_cosine_matrix(a0, b0)
    if torch.allclose(got.double(), want.T, atol=1e-5) and not torch.allclose(want, want.T, atol=1e-5):
        raise AssertionError("for square inputs the matrix is transposed: entry [i, j] compares a[i] with b[j]")
    expect_close(got, want, "cosine_similarity_matrix(a [4, 4], b [4, 4])", atol=1e-5)
    assert out.requires_grad, "the result is cut from the autograd graph (no_grad, .detach(), NumPy?)"
    w = seeded_randn(4, 4, seed=29)
    a.grad = b.grad = None
    (out * w).sum().backward()
    a64 = a0.double().requires_grad_(True)
    b64 = b0.double().requires_grad_(True)
    (_reference_cosine_matrix_graph(a64, b64) * w.double()).sum().backward()
    expect_close(a.grad, a64.grad, "the gradient with respect to a", atol=1e-5)
    expect_close(b.grad, b64.grad, "the gradient with respect to b", atol=1e-5)


def _reference_cosine_matrix_graph(a, b):
    return F.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1)


# --- q3: fit_centroids(embeddings, labels) -> (centroids, classes); predict_nearest_centroid ----

LABELS = (42, 3, 7)  # not 0..C-1, and not in sorted order of first appearance


def _clustered(sizes, d, seed, classes=LABELS):
    """Embeddings around one random direction per class, with lengths from 0.2 to 5, labels shuffled."""
    g = _generator(seed)
    centres = torch.randn(len(sizes), d, generator=g) * 2
    x = torch.cat([centres[i] + torch.randn(n, d, generator=g) for i, n in enumerate(sizes)])
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in zip(classes, sizes)])
    order = torch.randperm(len(labels), generator=g)
    return (x * _row_scales(len(x), seed + 1000))[order], labels[order]


def _as_classes(classes, what):
    if isinstance(classes, (list, tuple)) and all(type(c) is int for c in classes):
        classes = torch.tensor(classes, dtype=torch.long)
    classes = expect_tensor(classes, what)
    assert classes.ndim == 1 and not classes.is_floating_point() and classes.dtype != torch.bool, (
        f"{what} should be a 1-D tensor of integer labels (torch.unique(labels)), not {classes.dtype} of shape "
        f"{list(classes.shape)}")
    return classes


def _fit(fit_centroids, x, labels, what):
    centroids, classes = expect_tuple(fit_centroids(x, labels), 2, what)
    classes = _as_classes(classes, f"the classes returned by {what}")
    centroids = expect_tensor(centroids, f"the centroids returned by {what}")
    return centroids, classes


def _check_classes(classes, labels, what):
    want = torch.unique(labels).tolist()
    got = classes.tolist()
    if got == list(range(len(want))) and got != want:
        raise AssertionError(f"{what} returned classes {got}, but the labels are {want}: labels need not be "
                             f"0..C-1 (intent ids, ticket codes ...); return the labels that occur, torch.unique(labels)")
    if sorted(got) == want and got != want:
        raise AssertionError(f"{what} returned classes {got}; return them sorted, {want} (torch.unique sorts), with "
                             "row c of the centroids belonging to classes[c]")
    assert got == want, f"{what} should return the classes {want} (the sorted labels that occur), not {got}"


def _centroid_mistakes(x, labels, classes):
    x = x.double()
    unit = F.normalize(x, dim=-1)
    mean = lambda v: torch.stack([v[labels == c].mean(0) for c in classes])  # noqa: E731 - local shorthand
    appearance = list(dict.fromkeys(labels.tolist()))
    by_appearance = torch.stack([F.normalize(unit[labels == c].mean(0), dim=0) for c in appearance])
    return [
        (F.normalize(mean(x), dim=-1), "the embeddings were averaged before being normalised: normalise each one "
                                       "first, or a long vector outweighs the rest of its class"),
        (mean(unit), "each centroid is the mean of unit vectors, but not scaled back to length 1: normalise the mean "
                     "(its length only says how much the class's examples disagree)"),
        (mean(x), "the centroids are plain means of the raw embeddings: normalise each embedding, average, then "
                  "normalise the mean"),
        (by_appearance, "the centroids are in the order the labels first appear; row c must be the centroid of "
                        "classes[c], the sorted labels"),
    ]


@points(2)
def test_q3_fit_centroids(fit_centroids):
    """returns (centroids [C, D], classes [C]): the sorted labels (any integers), and per class the unit-length mean of its unit vectors"""
    x, labels = _clustered((4, 5, 3), 6, seed=31)
    what = "fit_centroids(embeddings [12, 6], labels with values 3, 7 and 42)"
    centroids, classes = _fit(fit_centroids, x.clone(), labels.clone(), what)
    _check_classes(classes, labels, what)
    want, _ = _reference_centroids(x, labels)
    expect_shape(centroids, (3, 6), f"the centroids returned by {what}")
    message = _which(centroids, want, _centroid_mistakes(x, labels, torch.unique(labels)))
    if message:
        raise AssertionError(f"{what}: {message}")
    expect_close(centroids, want, f"the centroids returned by {what}", atol=1e-5)


def _predict(predict_nearest_centroid, q, centroids, classes, what):
    out = expect_tensor(predict_nearest_centroid(q, centroids, classes), what)
    expect_shape(out, (q.shape[0],), what)
    assert not out.is_floating_point() and out.dtype != torch.bool, (
        f"{what} should hold integer labels (taken from classes), not {out.dtype}")
    return out


def _predict_mistakes(q, centroids, classes):
    cos = _reference_cosine_matrix(q, centroids)
    dots = q.double() @ centroids.double().T
    dist = torch.cdist(q.double(), centroids.double())
    return [
        (classes[cos.argmin(1)], "that is the least similar centroid (argmin): take the highest cosine (argmax)"),
        (cos.argmax(1), "those are positions 0..C-1 of the centroids, not labels: return classes[position]"),
        (classes[dots.argmax(1)], "the centroids were compared by dot product: a longer centroid then wins more "
                                  "often. Compare by cosine (normalise the centroids and the embeddings), which does not "
                                  "depend on the lengths"),
        (classes[dist.argmin(1)], "that is the nearest centroid by Euclidean distance between raw vectors; compare "
                                  "by cosine similarity, the angle, which the lengths do not change"),
    ]


@points(2)
def test_q3_predict_by_highest_cosine(predict_nearest_centroid):
    """each embedding gets the label (from classes) of the centroid with the highest cosine similarity, for centroids of any length"""
    d = 6
    g = _generator(33)
    centroids = torch.randn(3, d, generator=g)
    centroids = F.normalize(centroids, dim=1) * torch.tensor([[0.25], [1.0], [4.0]])  # lengths matter to a dot product
    classes = torch.tensor([3, 7, 42])
    q = _vectors(12, d, seed=34)
    what = "predict_nearest_centroid(embeddings [12, 6], centroids [3, 6] of lengths 0.25, 1 and 4, classes [3, 7, 42])"
    got = _predict(predict_nearest_centroid, q.clone(), centroids.clone(), classes.clone(), what)
    want = _reference_predict(q, centroids, classes)
    if not torch.equal(got.long(), want):
        for wrong, message in _predict_mistakes(q, centroids, classes):
            if torch.equal(got.long(), wrong.long()):
                raise AssertionError(f"{what}: {message}")
        raise AssertionError(f"{what} predicted {got.tolist()}; the centroids with the highest cosine similarity give "
                             f"{want.tolist()}")


@points(1, visibility=HIDDEN)
def test_q3_edge_cases_and_inputs_untouched(fit_centroids, predict_nearest_centroid):
    """inputs unchanged; a class with one example; one class; one query; classes given in any order with their centroids"""
    x, labels = _clustered((1, 4, 2), 5, seed=35, classes=(9, 1000, 12))
    originals = (x.clone(), labels.clone())
    what = "fit_centroids(embeddings [7, 5], labels with a class of one example)"
    centroids, classes = _fit(fit_centroids, x, labels, what)
    _unchanged(originals, (x, labels), ("embeddings", "labels"), "normalise into new tensors (F.normalize), not in "
                                                                 "place: the caller's embeddings are still in use")
    x, labels = originals
    _check_classes(classes, labels, what)
    want, _ = _reference_centroids(x, labels)
    expect_close(centroids, want, f"the centroids returned by {what}", atol=1e-5)
    one = torch.full((3,), 5, dtype=torch.long)
    centroids, classes = _fit(fit_centroids, x[:3].clone(), one.clone(), "fit_centroids with a single class, 5")
    assert classes.tolist() == [5], f"with a single class 5 the classes are [5], not {classes.tolist()}"
    expect_close(centroids, _reference_centroids(x[:3], one)[0], "the centroid of a single class", atol=1e-5)
    q = _vectors(6, 5, seed=36)
    ref_centroids, ref_classes = _reference_centroids(x, labels)
    order = torch.tensor([2, 0, 1])  # classes given unsorted, each with its own centroid
    args = (q.clone(), (ref_centroids[order] * 3.0).float(), ref_classes[order].clone())
    originals = tuple(t.clone() for t in args)
    got = _predict(predict_nearest_centroid, *args, "predict_nearest_centroid with classes [12, 9, 1000] in that order")
    _unchanged(originals, args, ("embeddings", "centroids", "classes"), "compute new tensors, not in place")
    assert torch.equal(got.long(), _reference_predict(q, ref_centroids, ref_classes)), (
        "with classes given in the order [12, 9, 1000] (row c of the centroids belonging to classes[c]) the "
        "predictions are wrong: return classes[argmax] for the classes as given, without sorting them")
    got = _predict(predict_nearest_centroid, q[:1].clone(), ref_centroids.float(), ref_classes.clone(),
                   "predict_nearest_centroid on one embedding [1, 5]")
    assert torch.equal(got.long(), _reference_predict(q[:1], ref_centroids, ref_classes)), (
        "the prediction for a single embedding [1, 5] is wrong")


# --- q4: cosine_pair_loss(a [B, D], b [B, D], same [B]) -> 0-d tensor -----------------------------

SAME = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])


def _pair_mistakes(a, b, same):
    a, b, same = a.double(), b.double(), same.double()
    cos = F.cosine_similarity(a, b, dim=-1)
    sq = (cos - same) ** 2
    return [
        (sq.sum(), "the squared errors were summed over the pairs; take their mean (MSE), so that the step does not "
                   "grow with the batch size"),
        (((a * b).sum(1) - same).pow(2).mean(), "that uses the dot product a_i · b_i, not the cosine: divide by "
                                                "both lengths (or normalise the rows first)"),
        (((1 - cos) - same).pow(2).mean(), "that is (cos − (1 − same))²: the targets are swapped, or, the same thing, "
                                           "the cosine distance 1 − cos was compared with the target. cos itself "
                                           "should be 1 for a pair of one class (same = 1), 0 for a pair of two"),
        (((a - b).norm(dim=1) - same).pow(2).mean(), "that uses the Euclidean distance between the vectors; the loss "
                                                     "compares their cosine similarity with the target"),
        (((cos - (2 * same - 1)) ** 2).mean(), "a pair of two classes got the target −1; SetFit's target for it is 0 "
                                               "(orthogonal), as CosineSimilarityLoss is trained with labels 0 and 1"),
        ((cos - same).abs().mean(), "that is the mean absolute error; square the differences (mean squared error)"),
        (sq.mean().sqrt(), "that is the root of the mean squared error; the loss is the mean squared error itself"),
        ((sq * same).mean(), "only the pairs of one class count; pairs of two classes (target 0) must count too"),
    ]


@points(2)
def test_q4_mean_squared_error_of_the_cosines(cosine_pair_loss):
    """the mean over the pairs of (cos(a_i, b_i) − same_i)²: target 1 for a pair of one class, 0 for a pair of two (SetFit's CosineSimilarityLoss)"""
    a, b = _vectors(7, 5, seed=41), _vectors(7, 5, seed=42)
    what = "cosine_pair_loss(a [7, 5], b [7, 5], same [7])"
    value = expect_loss(cosine_pair_loss(a.clone(), b.clone(), SAME.clone()), what)
    got, want = float(value.detach()), float(_reference_pair_loss(a.double(), b.double(), SAME))
    message = first_match(got, want, _pair_mistakes(a, b, SAME))
    if message:
        raise AssertionError(f"{what} = {got:.5g}, not {want:.5g}: {message}")
    assert close(got, want, rtol=1e-5, atol=1e-6), f"{what} should be {want:.5g}, not {got:.5g}"
    twins = _vectors(3, 4, seed=43)
    value = expect_loss(cosine_pair_loss(twins.clone(), 2.0 * twins, torch.ones(3)), "the loss of parallel vectors")
    assert close(float(value.detach()), 0.0, atol=1e-6), (
        "three pairs of parallel vectors (cosine 1) marked as one class should cost 0, not "
        f"{float(value.detach()):.5g}")


@points(1)
def test_q4_gradients_reach_both_sides(cosine_pair_loss):
    """a 0-d tensor still in the autograd graph: its gradient reaches both a and b, as the reference's does"""
    a = _vectors(6, 4, seed=44).requires_grad_(True)
    b = _vectors(6, 4, seed=45).requires_grad_(True)
    same = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    a0, b0 = a.detach().clone(), b.detach().clone()  # ours: the learner's code may change a and b in place
    loss = expect_loss(cosine_pair_loss(a, b, same.clone()), "cosine_pair_loss(a [6, 4], b [6, 4], same [6])")
    assert loss.requires_grad, ("the loss is cut from the autograd graph (no_grad, .detach(), .item(), NumPy?): it "
                                "exists to send gradients into the encoder")
    a.grad = b.grad = None  # the gradients read below are this backward()'s alone
    loss.backward()
    a64 = a0.double().requires_grad_(True)
    b64 = b0.double().requires_grad_(True)
    _reference_pair_loss(a64, b64, same).backward()
    for name, got, want in (("a", a.grad, a64.grad), ("b", b.grad, b64.grad)):
        assert got is not None, f"no gradient reached {name}: compute the cosine from {name} itself, not a detached copy"
        expect_close(got, want, f"the gradient with respect to {name}", atol=1e-6)


@points(1, visibility=HIDDEN)
def test_q4_zero_vector_dtype_and_inputs(cosine_pair_loss):
    """a zero vector counts as cosine 0 (a finite loss); float64 inputs; one pair; inputs unchanged"""
    a, b = _vectors(4, 6, seed=46).double(), _vectors(4, 6, seed=47).double()
    a[1] = 0.0
    same = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    originals = (a.clone(), b.clone(), same.clone())
    what = "cosine_pair_loss with a zero vector, in float64"
    value = expect_loss(cosine_pair_loss(a, b, same), what)
    _unchanged(originals, (a, b, same), ("a", "b", "same"), "compute new tensors, not in place")
    got = float(value.detach())
    assert torch.isfinite(value.detach()), (f"{what} is not finite: clamp the lengths to a small eps "
                                            "(F.cosine_similarity and F.normalize do), so a zero vector has cosine 0")
    assert close(got, float(_reference_pair_loss(*originals)), rtol=1e-8, atol=1e-10), f"{what} is {got:.6g}"
    a1, b1 = _vectors(1, 3, seed=48), _vectors(1, 3, seed=49)
    value = expect_loss(cosine_pair_loss(a1.clone(), b1.clone(), torch.zeros(1)), "cosine_pair_loss on one pair")
    want = float(_reference_pair_loss(a1, b1, torch.zeros(1)))
    assert close(float(value.detach()), want, atol=1e-6), (
        f"cosine_pair_loss on one pair should be {want:.6g}, not {float(value.detach()):.6g}")


# --- q5: make_pairs(labels [N], n_pairs, seed) -> (first [P], second [P], same [P]) -----------------

def _pair_labels(sizes=(5, 4, 6, 3), classes=(3, 7, 42, 5), seed=51):
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in zip(classes, sizes)])
    return labels[torch.randperm(len(labels), generator=_generator(seed))]


def _pairs(make_pairs, labels, n_pairs, seed, what):
    first, second, same = expect_tuple(make_pairs(labels, n_pairs, seed), 3, what)
    out = []
    for name, t in (("first", first), ("second", second)):
        t = expect_tensor(t, f"{name} (the {'first' if name == 'first' else 'second'} item of {what})")
        assert t.ndim == 1 and not t.is_floating_point() and t.dtype != torch.bool, (
            f"{name} should be a 1-D tensor of integer indices (torch.long), not {t.dtype} of shape {list(t.shape)}")
        out.append(t)
    same = expect_tensor(same, f"same (the third item of {what})")
    assert same.is_floating_point(), (f"same should be a float tensor of 0. and 1. (the loss's target), not {same.dtype}: "
                                      "(labels[first] == labels[second]).float()")
    for name, t in (("first", out[0]), ("second", out[1]), ("same", same)):
        expect_shape(t, (n_pairs,), f"{name} from {what}")
    return out[0], out[1], same


def _check_pairs(labels, first, second, same, n_pairs, what):
    n = len(labels)
    assert bool(((first >= 0) & (first < n) & (second >= 0) & (second < n)).all()), (
        f"{what}: some indices are outside 0..{n - 1}")
    assert bool(((same == 0) | (same == 1)).all()), f"{what}: same should hold only 0. and 1."
    pos = same == 1
    n_pos = int(pos.sum())
    assert n_pos == n_pairs // 2, (f"{what} gave {n_pos} positive pairs of {n_pairs}: make half of them positive "
                                   f"({n_pairs // 2}) and half negative, so the loss sees both kinds equally")
    a, b = labels[first], labels[second]
    assert bool((a[pos] == b[pos]).all()), f"{what}: a pair marked same = 1 joins two different classes"
    assert bool((a[~pos] != b[~pos]).all()), f"{what}: a pair marked same = 0 joins two examples of one class"
    assert bool((first[pos] != second[pos]).all()), (
        f"{what}: a positive pair joins an example with itself; its cosine is 1 by definition, so the loss learns "
        "nothing from it. Draw another example of the same class")


@points(2)
def test_q5_valid_and_balanced(make_pairs):
    """returns (first, second, same) [n_pairs]: half the pairs join two different examples of one class (same = 1.), half two classes (same = 0.)"""
    labels = _pair_labels()
    what = "make_pairs(labels [18] with classes 3, 5, 7 and 42, 40, seed=0)"
    first, second, same = _pairs(make_pairs, labels.clone(), 40, 0, what)
    _check_pairs(labels, first, second, same, 40, what)


@points(1)
def test_q5_reproducible_random_and_covering(make_pairs):
    """the same seed gives the same pairs, another seed other ones, and with many pairs every example takes part"""
    labels = _pair_labels(seed=52)
    runs = [tuple(tuple(t.tolist()) for t in _pairs(make_pairs, labels.clone(), 24, s, f"make_pairs(labels, 24, seed={s})"))
            for s in (3, 3, 4, 5, 6)]
    assert runs[0] == runs[1], ("two calls with seed 3 gave different pairs: draw from a generator seeded by seed, "
                                "torch.Generator().manual_seed(seed), so that an experiment can be repeated")
    assert len(set(runs[1:])) > 1, ("seeds 3, 4, 5 and 6 all gave the same pairs: the seed should drive a random "
                                    "draw, not a fixed enumeration")
    first, second, same = _pairs(make_pairs, labels.clone(), 400, 7, "make_pairs(labels [18], 400, seed=7)")
    _check_pairs(labels, first, second, same, 400, "make_pairs(labels [18], 400, seed=7)")
    seen = set(first.tolist()) | set(second.tolist())
    assert len(seen) == len(labels), (
        f"only {len(seen)} of the {len(labels)} examples appear in 400 pairs: draw the examples of each pair at "
        "random from all of them (a few labels are all SetFit has; every one should take part)")


@points(1)
def test_q5_global_random_state_untouched(make_pairs):
    """uses its own generator: torch's, Python's and NumPy's global random states stay as they were"""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    try:
        import numpy

        np_state = numpy.random.get_state()[1].copy()
    except ImportError:  # pragma: no cover
        numpy = np_state = None
    labels = _pair_labels(seed=53)
    what = "make_pairs(labels, 10, seed=8)"
    first, second, same = _pairs(make_pairs, labels.clone(), 10, 8, what)
    # Pairs first: an answer that draws nothing (fixed or empty pairs) leaves every random state alone too.
    _check_pairs(labels, first, second, same, 10, what)
    assert torch.equal(torch.get_rng_state(), torch_state), (
        "torch's global random state changed: torch.manual_seed(seed) inside a helper resets the randomness of the "
        "whole notebook (shuffling, dropout, initialisation); use g = torch.Generator().manual_seed(seed) and pass "
        "generator=g to torch.randint / torch.randperm")
    assert random.getstate() == py_state, "Python's global random state changed (random.seed?); use random.Random(seed)"
    if numpy is not None:
        assert (numpy.random.get_state()[1] == np_state).all(), (
            "NumPy's global random state changed (np.random.seed?); use numpy.random.default_rng(seed)")


@points(1, visibility=HIDDEN)
def test_q5_single_examples_small_sets_and_errors(make_pairs):
    """a class with one example only joins negative pairs; two classes of two; labels unchanged; ValueError when no positive pair exists"""
    labels = torch.tensor([4, 4, 4, 9, 2, 2, 11])  # 9 and 11 have one example each
    original = labels.clone()
    what = "make_pairs(labels with classes of one example, 30, seed=1)"
    first, second, same = _pairs(make_pairs, labels, 30, 1, what)
    _unchanged((original,), (labels,), ("labels",), "draw indices; leave the labels as they were")
    _check_pairs(original, first, second, same, 30, what)
    tiny = torch.tensor([6, 8, 8, 6])
    _check_pairs(tiny, *_pairs(make_pairs, tiny.clone(), 2, 2, "make_pairs([6, 8, 8, 6], 2, seed=2)"), 2,
                 "make_pairs([6, 8, 8, 6], 2, seed=2)")
    try:
        result = make_pairs(torch.tensor([0, 1, 2, 3]), 4, 0)
    except ValueError:
        return
    raise AssertionError("every class of [0, 1, 2, 3] has a single example, so no positive pair exists, and no "
                         f"ValueError was raised (the function returned a {type(result).__name__}); say so instead of "
                         "returning pairs of an example with itself")
