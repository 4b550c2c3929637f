"""Checks for chapter 00 (setup and first look): logits, parameters, preprocessing, freezing.

Each test builds its own small inputs (seeded), so a check takes milliseconds and says
exactly which expectation failed. Format: :mod:`tlcourse.grading.spec`.
"""

import torch
from torch import nn

from tlcourse.grading.spec import expect_close, expect_int, expect_shape, expect_tensor, expect_tuple, points

QUESTIONS = {
    "q1": {"title": "top-k predictions from logits", "functions": ["topk_predictions"]},
    "q2": {"title": "counting parameters", "functions": ["count_parameters"]},
    "q3": {"title": "preprocessing for the backbone", "functions": ["normalize"]},
    "q4": {"title": "freezing a module", "functions": ["freeze"]},
}


def _logits(n=4, c=10, seed=0):
    # Distinct values: no ties, so "the top k" is one well-defined answer.
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 3


# --- q1: topk_predictions(logits, k) -> (probabilities, indices) -----------------------

@points(1)
def test_q1_shapes(topk_predictions):
    """returns (probabilities, indices), each of shape [N, k]"""
    logits = _logits()
    probs, idx = expect_tuple(topk_predictions(logits, 3), 2, "topk_predictions(logits, 3)")
    probs = expect_tensor(probs, "the probabilities")
    idx = expect_tensor(idx, "the indices")
    expect_shape(probs, (4, 3), "the probabilities")
    expect_shape(idx, (4, 3), "the indices")
    assert idx.dtype == torch.long, f"the indices should be integers (torch.long), not {idx.dtype}"


@points(1)
def test_q1_probabilities(topk_predictions):
    """gives softmax probabilities over all classes, largest first"""
    logits = _logits()
    probs, _ = expect_tuple(topk_predictions(logits.clone(), 3), 2, "topk_predictions(logits, 3)")
    probs = expect_tensor(probs, "the probabilities")
    want = logits.softmax(dim=1).topk(3, dim=1).values
    if probs.shape == want.shape and torch.allclose(probs, logits.topk(3, dim=1).values.softmax(dim=1), atol=1e-5):
        raise AssertionError("these are a softmax over the top k logits only; take the softmax "
                             "over all classes first, then pick the k largest")
    if probs.shape == want.shape and torch.allclose(probs, logits.topk(3, dim=1).values, atol=1e-5):
        raise AssertionError("these are the raw logits; turn them into probabilities with a softmax over the classes")
    expect_close(probs, want, "the probabilities")


@points(1)
def test_q1_indices(topk_predictions):
    """gives the class indices of the k largest logits in each row, and leaves the logits unchanged"""
    logits = _logits(n=5, c=7, seed=1)
    original = logits.clone()
    want = original.topk(2, dim=1).indices  # from our copy: the learner's code may change `logits`
    _, idx = expect_tuple(topk_predictions(logits, 2), 2, "topk_predictions(logits, 2)")
    expect_close(expect_tensor(idx, "the indices"), want, "the indices")
    assert torch.equal(logits, original), "the logits tensor passed in was changed; compute a new tensor instead"


# --- q2: count_parameters(model, trainable_only=False) -> int ---------------------------

def _mlp():
    return nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))  # 55 + 12 values


@points(1)
def test_q2_all(count_parameters):
    """counts every parameter value (weights and biases) of a model, as an int"""
    n = expect_int(count_parameters(_mlp()), "count_parameters(model)")
    if n == 4:
        raise AssertionError("got 4: that is the number of parameter tensors; count their values (numel)")
    assert n == 67, f"a Linear(10, 5) + Linear(5, 2) model has 67 parameter values, you counted {n}"


@points(1)
def test_q2_trainable_only(count_parameters):
    """with trainable_only=True, leaves out parameters whose requires_grad is False"""
    model = _mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    n = expect_int(count_parameters(model, trainable_only=True), "count_parameters(model, trainable_only=True)")
    assert n == 12, f"with the first layer frozen, 12 values are trainable; you counted {n}"
    n_all = expect_int(count_parameters(model, trainable_only=False), "count_parameters(model, trainable_only=False)")
    assert n_all == 67, f"with trainable_only=False frozen values count too: 67 expected, you counted {n_all}"


@points(1)
def test_q2_shared(count_parameters):
    """counts a layer that is used twice (shared weights) only once"""
    layer = nn.Linear(4, 4)
    n = expect_int(count_parameters(nn.Sequential(layer, nn.ReLU(), layer)), "count_parameters(model)")
    assert n == 20, (f"the same Linear(4, 4) used twice holds 20 values, you counted {n}; "
                     "model.parameters() already lists a shared parameter once")


# --- q3: normalize(images, mean, std) -> images for the backbone -------------------------

@points(1)
def test_q3_lite0_range(normalize):
    """maps images in [0, 1] to [-1, 1] with EfficientNet-Lite0's mean = std = 0.5"""
    images = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4), torch.full((3, 4, 4), 0.75)])
    out = expect_tensor(normalize(images.clone()), "normalize(images)")
    expect_shape(out, images.shape, "normalize(images)")
    assert out.dtype == images.dtype, f"the result should stay {images.dtype}, not {out.dtype}"
    expect_close(out, images * 2 - 1, "normalize(images)")


@points(1)
def test_q3_per_channel(normalize):
    """subtracts the mean and divides by the std of each colour channel (e.g. ImageNet's)"""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = torch.rand(2, 3, 5, 3, generator=torch.Generator().manual_seed(2))  # W = 3 = C on purpose
    out = expect_tensor(normalize(images.clone(), mean, std), "normalize(images, mean, std)")
    m, s = torch.tensor(mean), torch.tensor(std)
    if out.shape == images.shape and torch.allclose(out, (images - m) / s, atol=1e-5):
        raise AssertionError("the mean and std were applied along the last axis (width), not the "
                             "channels; shape them [1, 3, 1, 1] so they line up with [N, 3, H, W]")
    expect_close(out, (images - m.view(1, 3, 1, 1)) / s.view(1, 3, 1, 1), "normalize(images, mean, std)")


@points(1)
def test_q3_not_in_place(normalize):
    """returns a new tensor of normalised images and leaves the input images unchanged"""
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    original = images.clone()
    out = normalize(images)
    assert torch.equal(images, original), ("the input images were changed in place; "
                                           "compute a new tensor (no -=, /= or .sub_())")
    # The normalised images first: a function that returns its input (or nothing) leaves it unchanged too.
    expect_close(expect_tensor(out, "normalize(images)"), original * 2 - 1, "normalize(images)")


# --- q4: freeze(module) -> number of parameter values frozen ------------------------------

def _net():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))  # 16 + 8 + 10 values


def _trainable(params):
    # The test's own references: a submission cannot swap what we inspect.
    return [type(p) is nn.Parameter and p.requires_grad for p in params]


@points(1)
def test_q4_all_frozen(freeze):
    """sets requires_grad = False on every parameter of the module"""
    model = _net()
    params = list(model.parameters())
    freeze(model)
    still = sum(_trainable(params))
    assert still == 0, f"{still} of {len(params)} parameter tensors still have requires_grad=True"


@points(1)
def test_q4_count(freeze):
    """returns how many parameter values it froze, as an int"""
    model = _net()
    params = list(model.parameters())
    n = expect_int(freeze(model), "freeze(model)")
    if n == 6:
        raise AssertionError("got 6: that is the number of parameter tensors; count their values (numel)")
    assert n == 34, f"this model has 34 trainable values, so freeze should return 34, not {n}"
    still = sum(_trainable(params))
    assert still == 0, (f"freeze(model) returned 34 but left {still} of {len(params)} parameter tensors trainable: "
                        "it should freeze the values it counts")


@points(1)
def test_q4_only_given_module(freeze):
    """freezes only the module it is given (freeze(model[0]) keeps the rest trainable)"""
    model = _net()
    first = list(model[0].parameters())
    rest = list(model[1].parameters()) + list(model[2].parameters())
    n = expect_int(freeze(model[0]), "freeze(model[0])")
    # model[0] frozen first: a function that freezes nothing leaves the rest trainable too.
    assert not any(_trainable(first)), "freeze(model[0]) left model[0] trainable"
    assert all(_trainable(rest)), "freeze(model[0]) also froze layers other than model[0]"
    assert n == 16, f"model[0] is a Linear(3, 4) with 16 values; freeze(model[0]) returned {n}"


@points(1)
def test_q4_already_frozen(freeze):
    """counts only the values that were still trainable"""
    model = _net()
    params = list(model.parameters())
    for p in model[0].parameters():
        p.requires_grad_(False)
    n = expect_int(freeze(model), "freeze(model)")
    assert n == 18, (f"16 of the 34 values were frozen already, so freeze should return 18, not {n}; "
                     "count a parameter only if its requires_grad was True")
    still = sum(_trainable(params))
    assert still == 0, f"freeze(model) returned 18 but left {still} parameter tensors trainable"
