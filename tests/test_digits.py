"""tlcourse.digits: SynDigits, scikit-learn handwriting, the MNIST-M blend, domain pairs.

Offline and fast: the online domains (MNIST, USPS, SVHN) are served by a fake
``datasets.torchvision_dataset`` that holds small random arrays in torchvision's layouts.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tlcourse import datasets as ds
from tlcourse import digits as dg


# ----------------------------------------------------------------------------- fonts


def test_fonts_found_and_symbol_fonts_left_out():
    fonts = dg.font_files()
    names = {f.name for f in fonts}
    assert len(fonts) >= 12 and {"DejaVuSans.ttf", "DejaVuSerif.ttf", "cmr10.ttf"} <= names
    assert names <= set(dg.FONT_FILES)
    folder = dg._font_dir()
    # Fonts without digit glyphs fail the check that the fonts we keep pass.
    for symbols in ("STIXSizOneSymReg.ttf", "LastResortHE-Regular.ttf", "DejaVuSansDisplay.ttf"):
        if (folder / symbols).is_file():
            assert not dg._has_digits(folder / symbols), symbols
    masks = dg._glyph_masks()
    assert masks.shape[:3] == (len(fonts), len(dg._STROKES), 10)
    ink = masks.sum(dim=(-1, -2))
    assert (ink > 50).all()                                   # every glyph is visible
    assert (ink[:, 1:] > ink[:, :-1]).all()                   # a wider stroke adds ink


# ----------------------------------------------------------------------------- SynDigits


def test_syn_digits_shapes_range_and_balance():
    X, y = dg.syn_digits(200, size=28, seed=0)
    assert X.shape == (200, 3, 28, 28) and X.dtype == torch.float32
    assert 0 <= X.min() and X.max() <= 1 and X.std() > 0.1
    assert y.dtype == torch.int64 and torch.bincount(y, minlength=10).tolist() == [20] * 10
    X, y = dg.syn_digits(25, size=16, seed=0)
    assert X.shape == (25, 3, 16, 16) and set(torch.bincount(y).tolist()) <= {2, 3}
    assert dg.syn_digits(0)[0].shape == (0, 3, 28, 28)


def test_syn_digits_is_deterministic_by_seed():
    a, ya = dg.syn_digits(50, seed=3)
    b, yb = dg.syn_digits(50, seed=3)
    c, yc = dg.syn_digits(50, seed=4)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c) and not torch.equal(ya, yc)


def test_syn_digits_draws_the_digit_not_just_colours():
    # With the style fixed to light-on-dark, each class's mean image differs from the others:
    # the label is in the shape.
    X, y = dg.syn_digits(500, seed=0, p_light_on_dark=1.0)
    grey = X.mean(1)
    means = torch.stack([grey[y == c].mean(0) for c in range(10)])
    dist = torch.cdist(means.flatten(1), means.flatten(1))
    assert dist[~torch.eye(10, dtype=torch.bool)].min() > 0.5
    # Light on dark: the centre (the digit) is brighter than the corners on average.
    assert grey[:, 10:18, 10:18].mean() > grey[:, :3, :3].mean() + 0.1


# ----------------------------------------------------------------------------- handwriting


def test_handwritten_digits_white_on_black():
    X, y = dg.handwritten_digits(size=20)
    X8, y8 = ds.digits()
    assert X.shape == (1797, 3, 20, 20) and X.dtype == torch.float32
    assert 0 <= X.min() and X.max() <= 1 and torch.equal(y, torch.from_numpy(y8))
    assert torch.equal(X[:, 0], X[:, 2])
    assert X[:, :, :, :2].mean() < 0.05 < 0.3 < X[:, :, 6:14, 6:14].mean()


# ----------------------------------------------------------------------------- the blend


def test_blend_is_the_mnist_m_formula_and_keeps_the_digit():
    X, _ = dg.handwritten_digits(size=28)
    X = X[:200]
    out = dg.blend_on_photos(X, seed=1)
    assert out.shape == (200, 3, 28, 28) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    # The patches depend only on the seed, so blending black images returns the patches.
    patch = dg.blend_on_photos(torch.zeros(200, 1, 28, 28), seed=1)
    assert torch.allclose(out, (patch - X).abs(), atol=1e-6)
    assert (out - X).abs().mean() > 0.1 and not torch.equal(out, dg.blend_on_photos(X, seed=2))
    assert torch.equal(out, dg.blend_on_photos(X[:, :1], seed=1))   # grey input, same result
    # The digit stays visible: stroke pixels differ from background pixels in colour.
    stroke, back = (X[:, 0] > 0.7)[:, None], (X[:, 0] < 0.1)[:, None]
    mean = lambda m: (out * m).sum((2, 3)) / m.sum((2, 3))          # noqa: E731
    contrast = (mean(stroke) - mean(back)).abs().max(1).values
    assert (contrast > 0.15).float().mean() > 0.9
    with pytest.raises(ValueError, match="eagle"):
        dg.blend_on_photos(X[:2], photos=["eagle"])
    with pytest.raises(ValueError, match=r"\[n, 1 or 3, H, W\]"):
        dg.blend_on_photos(X[0])


# ----------------------------------------------------------------------------- domain pairs


def _check_pair(pair, size):
    for name in ("source_train", "source_test", "target_train", "target_test"):
        x, y = getattr(pair, name)[0]
        assert x.shape == (3, size, size) and x.dtype == torch.float32, name
        assert y.dtype == torch.int64
        X, Y = getattr(pair, name).tensors
        assert 0 <= X.min() and X.max() <= 1 and set(Y.unique().tolist()) == set(range(10)), name
        assert len(pair.ids[name]) == len(Y)
    assert pair.classes == [str(d) for d in range(10)]


def test_offline_pair_shapes_and_split_sizes():
    pair = dg.domain_pair("syndigits", "digits", size=20, seed=0, n_syn=300)
    _check_pair(pair, 20)
    assert [len(getattr(pair, k)) for k in ("source_train", "source_test", "target_train",
                                            "target_test")] == [300, 60, 1198, 599]
    assert "syndigits -> digits" in str(pair)
    # Target train and test are disjoint images.
    assert not set(pair.ids["target_train"].tolist()) & set(pair.ids["target_test"].tolist())
    assert not torch.equal(pair.source_train.tensors[0][:60], pair.source_test.tensors[0])


def test_same_base_pair_uses_disjoint_images():
    pair = dg.domain_pair("digits", "digits_m", size=16, seed=0)
    _check_pair(pair, 16)
    ids = {k: set(v.tolist()) for k, v in pair.ids.items()}
    assert not ids["source_train"] & ids["target_train"]
    assert not (ids["source_train"] | ids["target_train"]) & ids["target_test"]
    assert len(ids["source_train"]) == len(pair.source_train) == 599
    # The ids are true: the source images are the scikit-learn digits they name, and no
    # source image appears among the target's base images.
    X, y = dg.handwritten_digits(16)
    src = pair.source_train.tensors[0]
    assert torch.equal(src, X[pair.ids["source_train"]])
    assert torch.equal(pair.target_train.tensors[1], y[pair.ids["target_train"]])
    tgt_base = X[pair.ids["target_train"]][:, 0].flatten(1)
    assert torch.cdist(src[:, 0].flatten(1), tgt_base).min() > 0
    counts = torch.bincount(pair.source_train.tensors[1], minlength=10)
    assert counts.max() - counts.min() <= 4                         # stratified halves


def test_pairs_are_deterministic_by_seed():
    a = dg.domain_pair("digits", "digits_m", size=16, seed=0)
    b = dg.domain_pair("digits", "digits_m", size=16, seed=0)
    c = dg.domain_pair("digits", "digits_m", size=16, seed=1)
    for k in ("source_train", "target_train", "target_test"):
        assert torch.equal(getattr(a, k).tensors[0], getattr(b, k).tensors[0])
        assert not torch.equal(a.ids[k], c.ids[k])
    # Train and test patches are drawn separately, not reused.
    syn = dg.domain_pair("syndigits", "syndigits", size=16, seed=0, n_syn=100)
    assert not torch.equal(syn.source_train.tensors[0], syn.target_train.tensors[0])


def test_unknown_domain_lists_the_names():
    with pytest.raises(ValueError, match="No digit domain named 'mnistm'") as err:
        dg.domain_pair("mnist", "mnistm")
    for name in dg.list_domains():
        assert name in str(err.value)
    assert dg.list_domains(online=False) == ["digits", "digits_m", "syndigits"]
    assert dg.list_domains(online=True) == ["mnist", "mnist_m", "svhn", "usps"]


def test_missing_online_domain_raises_dataset_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("TLCOURSE_DATA", str(tmp_path))
    with pytest.raises(ds.DatasetUnavailable, match="'mnist'") as err:
        dg.domain_pair("mnist", "mnist_m", download=False)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ds.DatasetUnavailable, match="'svhn'"):
        dg.domain_pair("digits", "svhn", download=False)


def _fake_torchvision(calls):
    """Small random arrays in each torchvision class's own layout and types."""
    rng = np.random.default_rng(0)

    def fake(name, split="train", transform=None, download=True):
        calls.append((name, split, download))
        n = 400 if split == "train" else 100
        labels = np.arange(n) % 10
        if name == "mnist":
            return types.SimpleNamespace(data=torch.from_numpy(rng.integers(0, 256, (n, 28, 28), np.uint8)),
                                         targets=torch.from_numpy(labels))
        if name == "usps":
            return types.SimpleNamespace(data=rng.integers(0, 256, (n, 16, 16), np.uint8),
                                         targets=labels.tolist())
        if name == "svhn":
            return types.SimpleNamespace(data=rng.integers(0, 256, (n, 3, 32, 32), np.uint8),
                                         labels=labels)
        raise AssertionError(name)
    return fake


def test_online_domains_from_torchvision_arrays(monkeypatch):
    calls = []
    monkeypatch.setattr(ds, "torchvision_dataset", _fake_torchvision(calls))
    pair = dg.domain_pair("mnist", "mnist_m", size=20, seed=0, limit=200, download=False)
    _check_pair(pair, 20)
    assert len(pair.source_train) == len(pair.target_train) == 100 and len(pair.target_test) == 100
    assert not set(pair.ids["source_train"].tolist()) & set(pair.ids["target_train"].tolist())
    assert ("mnist", "train", False) in calls and ("mnist", "test", False) in calls
    usps_svhn = dg.domain_pair("usps", "svhn", size=28, limit=None)
    _check_pair(usps_svhn, 28)
    assert len(usps_svhn.source_train) == len(usps_svhn.target_train) == 400
    # SVHN stays in colour; USPS is grey in three equal channels.
    assert not torch.equal(usps_svhn.target_test.tensors[0][:, 0], usps_svhn.target_test.tensors[0][:, 1])
    assert torch.equal(usps_svhn.source_test.tensors[0][:, 0], usps_svhn.source_test.tensors[0][:, 1])


def test_stratified_subset_is_balanced_and_exact():
    y = np.repeat(np.arange(10), [50, 40, 30, 60, 50, 50, 50, 50, 50, 5])
    idx = dg._stratified_subset(y, 100, seed=0)
    assert len(idx) == len(set(idx)) == 100
    counts = np.bincount(y[idx], minlength=10)
    assert counts[9] == 5 and counts[:9].min() >= 10
    assert np.array_equal(dg._stratified_subset(y, None, seed=0), np.arange(len(y)))


def test_jittered_moves_each_image_by_at_most_max_shift():
    X = torch.zeros(50, 1, 12, 12)
    X[:, :, 5, 6] = 1.0                                      # one lit pixel in every image
    out = dg.jittered(X, copies=3, max_shift=2, seed=0)
    assert out.shape == (150, 1, 12, 12)
    ys, xs = out[:, 0].flatten(1).argmax(1).div(12, rounding_mode="floor"), out[:, 0].flatten(1).argmax(1) % 12
    assert ((ys - 5).abs() <= 2).all() and ((xs - 6).abs() <= 2).all()
    assert len(set(zip(ys.tolist(), xs.tolist()))) > 15      # shifts differ from image to image
    assert torch.equal(out, dg.jittered(X, copies=3, max_shift=2, seed=0))
    assert torch.equal(dg.jittered(X, copies=1, max_shift=0), X)
    with pytest.raises(ValueError):
        dg.jittered(X, copies=0)
    # Ink at the edge leaves the frame instead of coming back at the other side.
    edge = torch.zeros(200, 1, 12, 12)
    edge[:, :, 0, :] = 1.0
    moved = dg.jittered(edge, copies=1, max_shift=2, seed=1)
    assert moved[:, :, -2:, :].sum() == 0 and moved.sum() < edge.sum()
