"""Checks for chapter 01 (feature extraction): freeze, new head, cached features, accuracy, few-shot.

The checks run on a miniature of timm's EfficientNet (``TinyEfficientNet`` below: the same
attribute layout, ``get_classifier()``, ``reset_classifier()`` and a ``BatchNorm2d``
subclass like timm's ``BatchNormAct2d``) with 16 x 16 images, so a question grades in
milliseconds; importing timm alone would take seconds. A function written for the real
``tf_efficientnet_lite0`` works on it unchanged. Format: :mod:`tlcourse.grading.spec`.
"""

import copy
import random

import torch
from torch import nn
from torch.nn import functional as F

from tlcourse.grading.spec import expect_close, expect_int, expect_shape, expect_tensor, expect_tuple, expect_float, points

QUESTIONS = {
    "q1": {"title": "freezing the backbone", "functions": ["freeze_backbone"]},
    "q2": {"title": "a new head", "functions": ["replace_head"]},
    "q3": {"title": "extracting features once", "functions": ["extract_features"]},
    "q4": {"title": "accuracy", "functions": ["accuracy"]},
    "q5": {"title": "k examples per class", "functions": ["sample_per_class"]},
}


from tlcourse.grading.checks._tiny import BatchNormAct2d, TinyEfficientNet  # noqa: F401


def _images(n=4, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _trainable_names(model, params):
    # Our own references (taken before the learner's code ran), not the model's current ones.
    return {name for name, p in params.items() if type(p) is nn.Parameter and p.requires_grad}


# --- q1: freeze_backbone(model) -> trainable values left ----------------------------------

@points(2)
def test_q1_backbone_frozen_head_trainable(freeze_backbone):
    """freezes every parameter except those of the classifier, which stay trainable"""
    model = TinyEfficientNet()
    params = dict(model.named_parameters())
    freeze_backbone(model)
    trainable = _trainable_names(model, params)
    head = {"classifier.weight", "classifier.bias"}
    missing = sorted(head - trainable)
    assert not missing, (f"{' and '.join(missing)} got frozen too: the classifier is the only part that "
                         "learns in feature extraction, so it must stay trainable")
    extra = sorted(trainable - head)
    assert not extra, (f"{len(extra)} backbone parameter tensors are still trainable (e.g. {extra[0]}); "
                       "freeze every parameter that is not in model.classifier")


@points(1)
def test_q1_count(freeze_backbone):
    """returns how many parameter values stay trainable, as an int"""
    model = TinyEfficientNet(num_classes=3, num_features=16)  # 16 * 3 + 3 = 51 values in the head
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    n = expect_int(freeze_backbone(model), "freeze_backbone(model)")
    if n == 2:
        raise AssertionError("got 2: that is the number of parameter tensors left trainable; count their values (numel)")
    if n == total - 51:
        raise AssertionError(f"got {n}: that is how many values you froze; return how many stay trainable")
    assert n == 51, f"the classifier Linear(16, 3) has 51 values, so 51 stay trainable; you returned {n}"
    # The count must describe the model: returning 51 without freezing anything is not freezing.
    left = sum(params[name].numel() for name in _trainable_names(model, params))
    assert left == 51, f"freeze_backbone returned 51, but {left} values of the model are still trainable"


@points(1)
def test_q1_head_trainable_even_if_frozen_before(freeze_backbone):
    """leaves the classifier trainable even when the whole model was frozen before the call"""
    model = TinyEfficientNet()
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    freeze_backbone(model)
    trainable = _trainable_names(model, params)
    assert trainable == {"classifier.weight", "classifier.bias"}, (
        "the model came in fully frozen (e.g. after ch00's freeze(model)) and the classifier is still "
        "frozen afterwards: set requires_grad=True on its parameters explicitly, don't just skip them")


@points(1)
def test_q1_same_modules_and_weights(freeze_backbone):
    """changes only requires_grad: the same classifier module and the same weights"""
    model = TinyEfficientNet()
    head = model.classifier
    params = dict(model.named_parameters())
    before = copy.deepcopy(model.state_dict())
    freeze_backbone(model)
    # The backbone frozen first: a function that does nothing changes nothing else either.
    left = sorted(_trainable_names(model, params) - {"classifier.weight", "classifier.bias"})
    assert not left, (f"freeze_backbone(model) left {len(left)} backbone parameter tensors trainable (e.g. {left[0]}); "
                      "freeze them first, then this test checks that nothing else changed")
    assert model.classifier is head, ("model.classifier was replaced by a new layer; freeze_backbone should "
                                      "only set requires_grad (replacing the head is q2's job)")
    after = model.state_dict()
    changed = [k for k in before if k not in after or not torch.equal(before[k], after[k])]
    assert not changed, f"freezing changed the model's weights or buffers ({changed[0]}); only set requires_grad"


# --- q2: replace_head(model, num_classes) -> the model with a new nn.Linear head ----------

def _expect_linear_weights(head, in_features, out_features):
    weight = tuple(head.weight.shape)
    bias = None if head.bias is None else tuple(head.bias.shape)
    assert weight == (out_features, in_features) and bias in (None, (out_features,)), (
        f"model.classifier should be a new nn.Linear({in_features}, {out_features}), whose weight has shape "
        f"[{out_features}, {in_features}]; this one's weight has shape {list(weight)}"
        + ("" if bias in (None, (out_features,)) else f" and its bias {list(bias)}"))


@points(2)
def test_q2_output_shape(replace_head):
    """returns the same model, now giving [N, num_classes] logits"""
    model = TinyEfficientNet(num_classes=10)
    out = replace_head(model, 3)
    assert out is model, ("replace_head should change the model it is given and return it "
                          f"(it returned a {type(out).__name__} that is not that model)")
    with torch.no_grad():
        logits = expect_tensor(model.eval()(_images(4)), "model(images)")
    expect_shape(logits, (4, 3), "the logits of the model with its new head")


@points(1)
def test_q2_linear_head(replace_head):
    """the new head is one nn.Linear(num_features, num_classes): raw logits, no activation"""
    model = TinyEfficientNet(num_classes=10)
    replace_head(model, 4)
    head = model.classifier
    kinds = [type(m) for m in head.modules()]
    if any(k in (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.GELU) for k in kinds):
        raise AssertionError("the head contains an activation (ReLU, ...): a ReLU at the end clips every "
                             "negative logit to 0, so the model cannot express 'surely not this class'; "
                             "the head is a plain nn.Linear that returns raw logits")
    if any(k in (nn.Softmax, nn.LogSoftmax) for k in kinds):
        raise AssertionError("the head ends in a softmax: nn.CrossEntropyLoss expects raw logits and applies "
                             "log-softmax itself; a softmax here is applied twice and flattens the gradients")
    assert type(head) is nn.Linear, f"model.classifier should be an nn.Linear, but it is a {type(head).__name__}"
    assert (head.in_features, head.out_features) == (24, 4), (
        f"the new head should be Linear(24, 4) for this model (24 features, 4 classes), "
        f"not Linear({head.in_features}, {head.out_features})")
    # Its weights, not only its attributes (which any code can set): [out_features, in_features].
    _expect_linear_weights(head, 24, 4)


@points(1)
def test_q2_in_features_from_model(replace_head):
    """reads in_features from the model (any backbone width), not a hard-coded 1280"""
    for width in (40, 7):
        model = TinyEfficientNet(num_classes=10, num_features=width)
        replace_head(model, 2)
        head = model.classifier
        # The new head's weights, not an attribute: the model's own head already has in_features = width.
        assert type(head) is nn.Linear, f"model.classifier should be an nn.Linear, but it is a {type(head).__name__}"
        got = head.weight.shape[1] if head.weight.ndim == 2 else None
        if got == 1280:
            raise AssertionError("in_features is a hard-coded 1280 (right for EfficientNet-Lite0 only); read it "
                                 "from the old head (model.classifier.in_features) or model.num_features")
        assert got == width, f"for a backbone with {width} features the head needs in_features={width}, not {got}"
        _expect_linear_weights(head, width, 2)


@points(1)
def test_q2_backbone_untouched(replace_head):
    """keeps the (frozen) backbone's weights as they are; the new head is trainable"""
    model = TinyEfficientNet(num_classes=10)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier"))
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}
    stem, old_head = model.conv_stem, model.classifier
    replace_head(model, 3)
    # A new head first: a function that does nothing leaves the backbone as it was too.
    assert model.classifier is not old_head and any(True for _ in model.classifier.parameters()), (
        "model.classifier is still the old head (or a layer without parameters): replace it by a new nn.Linear")
    state = model.state_dict()
    changed = [k for k, v in backbone.items() if k not in state or not torch.equal(state[k], v)]
    assert not changed and model.conv_stem is stem, (
        "the backbone changed: replace only the classifier. (Building a new model, e.g. with "
        "timm.create_model, throws away the pretrained weights that make transfer learning work.)")
    still_frozen = all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("classifier"))
    assert still_frozen, "the backbone was frozen before and some of it is trainable now; leave it as it was"
    assert all(p.requires_grad for p in model.classifier.parameters()), "the new head should be trainable"


# --- q3: extract_features(backbone, loader) -> (features [N, D], labels [N]) --------------

def _backbone():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(1), nn.Dropout(0.5), nn.Linear(6, 5))
    return net


def _loader(n=10, batch_size=4):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, 8, 8, generator=g) * 2 + 1
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size), x, y


def _eval_features(backbone, x):
    """The features the learner's function should return, from our own copy, before the call."""
    with torch.no_grad():
        return copy.deepcopy(backbone).eval()(x)


def _extract(extract_features, backbone, loader, want=None):
    try:
        result = extract_features(backbone, loader)
    except RuntimeError as exc:
        if "stack expects each tensor to be equal size" in str(exc):
            raise AssertionError("torch.stack needs batches of equal size, but the last batch is smaller "
                                 "(10 images in batches of 4); join the batches with torch.cat") from None
        raise
    feats, labels = expect_tuple(result, 2, "extract_features(backbone, loader)")
    # Every q3 test asks for the features of all the loader's images first: otherwise an answer that
    # never runs the backbone (and so never changes its statistics, mode or graph) would pass half of them.
    expect_shape(expect_tensor(feats, "the features"), (len(loader.dataset), 5), "the features")
    # And their values (``want``: eval mode, computed before the call): zeros of that shape never ran it either.
    if want is not None and not torch.allclose(expect_tensor(feats, "the features").float(), want, atol=1e-5):
        raise AssertionError("the features are not the backbone's outputs for the loader's images, in eval mode "
                             "and in the loader's order")
    return feats, labels


@points(1)
def test_q3_shapes_and_types(extract_features):
    """returns (features [N, D] float32, labels [N] long) for all N images, the last small batch included"""
    loader, x, y = _loader()
    y = y.clone()  # our copy: the loader's own labels reach the learner's code, which may change them
    backbone = _backbone().eval()  # in eval mode already: this test is about the format
    feats, labels = _extract(extract_features, backbone, loader, _eval_features(backbone, x))
    feats, labels = expect_tensor(feats, "the features"), expect_tensor(labels, "the labels")
    expect_shape(feats, (10, 5), "the features")
    expect_shape(labels, (10,), "the labels")
    assert feats.dtype == torch.float32, f"the features should be float32, not {feats.dtype}"
    assert labels.dtype == torch.long, f"the labels should be torch.long (class indices), not {labels.dtype}"
    expect_close(labels, y, "the labels (in the loader's order)")


@points(2)
def test_q3_eval_mode_values(extract_features):
    """computes the features in eval mode, even if the backbone was in train mode"""
    loader, x, _ = _loader()
    backbone = _backbone().train()
    with torch.no_grad():   # before the call: nothing the learner's code does to x can move the target
        want = copy.deepcopy(backbone).eval()(x)
    feats, _ = _extract(extract_features, backbone, loader)
    feats = expect_tensor(feats, "the features")
    expect_shape(feats, want.shape, "the features")
    assert torch.allclose(feats, want, atol=1e-5), (
        "the features differ from the backbone's output in eval mode: call backbone.eval() before the loop. "
        "In train mode BatchNorm normalises with each batch's own statistics and Dropout zeroes features "
        "at random, so the same image would get different features every time")


@points(1)
def test_q3_batchnorm_statistics_unchanged(extract_features):
    """leaves the backbone's BatchNorm running statistics unchanged"""
    loader, x, _ = _loader()
    backbone = _backbone().train()
    bn = backbone[1]
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    _extract(extract_features, backbone, loader, _eval_features(backbone, x))
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var), (
        "the BatchNorm running mean/variance changed: a forward pass in train mode updates them (even under "
        "torch.no_grad()), which slowly overwrites the pretrained statistics; use eval mode")


@points(1)
def test_q3_no_autograd_graph(extract_features):
    """returns plain features without an autograd graph (computed under torch.no_grad())"""
    loader, x, _ = _loader()
    backbone = _backbone().eval()  # in eval mode already: this test is about the graph
    feats, _ = _extract(extract_features, backbone, loader, _eval_features(backbone, x))
    assert type(feats) is torch.Tensor, f"the features should be a torch.Tensor, not a {type(feats).__name__}"
    assert not feats.requires_grad and feats.grad_fn is None, (
        "the features carry an autograd graph: run the backbone under torch.no_grad(). Without it PyTorch "
        "keeps every intermediate activation of every batch in memory, for gradients nobody needs")


@points(1)
def test_q3_restores_mode(extract_features):
    """leaves the backbone in the mode it was in (train stays train, eval stays eval)"""
    loader, x, _ = _loader()
    backbone = _backbone().train()
    # Eval-mode features from a backbone in train mode: a function that never switches modes keeps them too.
    _extract(extract_features, backbone, loader, _eval_features(backbone, x))
    assert all(m.training for m in backbone.modules()), (
        "the backbone was in train mode before and is (partly) in eval mode after: remember "
        "was_training = backbone.training and call backbone.train(was_training) at the end")
    backbone.eval()
    _extract(extract_features, backbone, loader, _eval_features(backbone, x))
    assert not any(m.training for m in backbone.modules()), "the backbone was in eval mode before and not after"


# --- q4: accuracy(logits, labels) -> float in [0, 1] --------------------------------------

def _known(n=8, c=5, correct=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g)
    pred = labels.clone()
    pred[correct:] = (labels[correct:] + 1 + torch.randint(0, c - 1, (n - correct,), generator=g)) % c
    logits[torch.arange(n), pred] = logits.abs().max() + 1 + torch.rand(n, generator=g)
    return logits, labels


def _accuracy(accuracy, logits, labels, what="accuracy(logits, labels)"):
    try:
        value = accuracy(logits, labels)
    except RuntimeError as exc:
        if "must match the size" in str(exc):
            raise AssertionError(f"{what} failed: the predictions and the labels have different lengths "
                                 f"({exc}). Take the argmax over the classes (dim=1), which gives one "
                                 "prediction per image, not over the batch (dim=0)") from None
        raise
    return expect_float(value, what)


@points(2)
def test_q4_value(accuracy):
    """returns the fraction of rows whose largest logit is at the true label, e.g. 5 of 8 -> 0.625"""
    logits, labels = _known()
    got = _accuracy(accuracy, logits.clone(), labels.clone())
    if abs(got - 62.5) < 1e-6:
        raise AssertionError("got 62.5: that is a percentage; return the fraction 0.625 (format it as % when printing)")
    assert got != 0, ("got 0 where 5 of 8 predictions are right: integer division (//) or comparing "
                       "integer tensors can round the fraction down to 0; divide with / as floats")
    assert abs(got - 0.625) < 1e-6, f"5 of the 8 predictions are right, so the accuracy is 0.625, not {got:g}"
    logits, labels = _known(n=6, c=3, correct=6, seed=1)
    got = _accuracy(accuracy, logits, labels)
    assert abs(got - 1.0) < 1e-6, f"every prediction is right, so the accuracy is 1.0, not {got:g}"


@points(1)
def test_q4_classes_dimension(accuracy):
    """takes the argmax over the classes (dim=1), also when N equals the number of classes"""
    logits, labels = _known(n=4, c=4, correct=3, seed=2)
    wrong = float((logits.argmax(dim=0) == labels).float().mean())
    assert abs(wrong - 0.75) > 1e-6  # this case tells the two apart
    got = _accuracy(accuracy, logits, labels)
    if abs(got - wrong) < 1e-6:
        raise AssertionError("you took the argmax over the batch (dim=0), not over the classes (dim=1); with "
                             "4 images and 4 classes both have the right shape, so nothing warns you")
    assert abs(got - 0.75) < 1e-6, f"3 of the 4 predictions are right: 0.75 expected, not {got:g}"


@points(1)
def test_q4_no_broadcasting(accuracy):
    """compares predictions [N] with labels [N] element by element (no [N, 1] vs [N] broadcasting)"""
    logits, labels = _known(n=6, c=3, correct=2, seed=3)
    broadcast = float((logits.argmax(dim=1, keepdim=True) == labels).float().mean())
    got = _accuracy(accuracy, logits, labels)
    if abs(got - broadcast) < 1e-6 and abs(broadcast - 2 / 6) > 1e-6:
        raise AssertionError("predictions of shape [N, 1] (keepdim=True) compared with labels of shape [N] "
                             "broadcast to an [N, N] table of every pair; take argmax(dim=1) without keepdim")
    assert abs(got - 2 / 6) < 1e-6, f"2 of the 6 predictions are right: {2 / 6:.4f} expected, not {got:g}"


@points(1)
def test_q4_inputs_unchanged(accuracy):
    """works on probabilities as well as logits, and leaves both inputs unchanged"""
    logits, labels = _known(n=5, c=4, correct=4, seed=4)
    probs = logits.softmax(dim=1)
    original = probs.clone(), labels.clone()
    got = _accuracy(accuracy, probs, labels, "accuracy(probabilities, labels)")
    assert abs(got - 0.8) < 1e-6, f"4 of the 5 predictions are right: 0.8 expected, not {got:g}"
    assert torch.equal(probs, original[0]) and torch.equal(labels, original[1]), "accuracy changed its inputs"


# --- q5: sample_per_class(labels, k, seed) -> indices ---------------------------------------

def _labels(per_class=(20, 20, 20), seed=5, shuffled=True):
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(per_class)])
    if shuffled:
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    return labels


def _indices(value, what="sample_per_class(labels, k, seed)"):
    if isinstance(value, list):
        value = torch.tensor(value, dtype=torch.long)
    idx = expect_tensor(value, what)
    assert idx.ndim == 1, f"{what} should be 1-D, a list of indices, but it has shape {list(idx.shape)}"
    assert not idx.is_floating_point() and idx.dtype != torch.bool, (
        f"{what} should hold integer indices (torch.long), not {idx.dtype}")
    return idx


def _expect_sample(idx, labels, k, what):
    """``idx``: k indices of each class of ``labels`` (our copy). The tests of other properties ask for it
    first: an answer that returns no sample (or raises) has those properties for free. (Distinct and
    sorted is the first test's business.)"""
    classes = int(labels.max()) + 1
    ok = (len(idx) == k * classes and int(idx.min()) >= 0 and int(idx.max()) < len(labels)
          and torch.bincount(labels[idx], minlength=classes).tolist() == [k] * classes)
    assert ok, f"{what} is not {k} indices of each of the {classes} classes; see the first test"


@points(2)
def test_q5_k_per_class(sample_per_class):
    """returns k distinct indices of each class, sorted ascending, as a 1-D long tensor"""
    labels = _labels()
    idx = _indices(sample_per_class(labels.clone(), 4, 0))
    assert len(idx) == 12, f"3 classes with k=4 give 12 indices, you returned {len(idx)}"
    assert int(idx.min()) >= 0 and int(idx.max()) < len(labels), "some indices are outside the dataset"
    assert len(set(idx.tolist())) == len(idx), ("an index appears twice: sample without replacement "
                                                "(torch.randperm), not with torch.randint")
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts == [4, 4, 4], f"the sample holds {counts} examples of classes 0, 1, 2; k=4 of each expected"
    assert idx.tolist() == sorted(idx.tolist()), "return the indices sorted ascending (idx.sort().values)"


@points(1)
def test_q5_reproducible_and_random(sample_per_class):
    """gives the same indices for the same seed and (almost always) other ones for another seed"""
    labels = _labels(shuffled=False)  # sorted by class, as an ImageFolder is
    runs = []
    for s in (0, 0, 1, 2, 3):
        idx = _indices(sample_per_class(labels.clone(), 3, s))
        _expect_sample(idx, labels, 3, f"sample_per_class(labels, 3, {s})")
        runs.append(idx.tolist())
    assert runs[0] == runs[1], "two calls with the same seed gave different indices; the curve must be reproducible"
    first_k = [i for c in range(3) for i in range(20 * c, 20 * c + 3)]
    if all(r == first_k for r in runs):
        raise AssertionError("these are the first k examples of each class: pick them at random (with a generator "
                             "seeded by seed); the first files of a folder are often alike and not representative")
    assert len({tuple(r) for r in runs[1:]}) > 1, ("seeds 0, 1, 2 and 3 all gave the same indices; the seed should "
                                                  "drive the random choice")


@points(1)
def test_q5_global_random_state_untouched(sample_per_class):
    """uses its own generator: torch's, Python's and NumPy's global random state stay as they were"""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    try:
        import numpy

        np_state = numpy.random.get_state()[1].copy()
    except ImportError:  # pragma: no cover
        numpy = np_state = None
    labels = _labels()
    idx = _indices(sample_per_class(labels.clone(), 2, 7), "sample_per_class(labels, 2, 7)")
    assert torch.equal(torch.get_rng_state(), torch_state), (
        "torch's global random state changed: torch.manual_seed(seed) inside a helper resets the randomness of "
        "the whole notebook (shuffling, dropout, initialisation); use g = torch.Generator().manual_seed(seed) "
        "and torch.randperm(n, generator=g)")
    assert random.getstate() == py_state, "Python's global random state changed (random.seed?); use random.Random(seed)"
    if numpy is not None:
        assert (numpy.random.get_state()[1] == np_state).all(), (
            "NumPy's global random state changed (np.random.seed?); use numpy.random.default_rng(seed)")
    _expect_sample(idx, labels, 2, "sample_per_class(labels, 2, 7)")  # a function that draws nothing keeps them too


@points(1)
def test_q5_too_few_examples(sample_per_class):
    """raises ValueError when a class has fewer than k examples (and samples when each has k)"""
    enough = _labels(per_class=(10, 10, 5))  # first a sample where the smallest class has exactly k
    _expect_sample(_indices(sample_per_class(enough.clone(), 5, 0), "sample_per_class(labels, 5, 0)"), enough, 5,
                   "sample_per_class(labels, 5, 0) with 10, 10 and 5 examples per class")
    labels = _labels(per_class=(10, 10, 3))
    try:
        result = sample_per_class(labels, 5, 0)
    except ValueError:
        return
    raise AssertionError("class 2 has only 3 examples but k=5 and no ValueError was raised (the function returned "
                         f"{type(result).__name__}); silently returning fewer would skew a few-shot curve")
