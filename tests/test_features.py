import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tlcourse import features


def _blobs(n_per_class=20, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, dim, generator=g) * 3
    x = torch.cat([c + torch.randn(n_per_class, dim, generator=g) for c in centres])
    y = torch.arange(3).repeat_interleave(n_per_class)
    return x, y


class CountingBackbone(nn.Module):
    """Doubles its input and counts calls; BatchNorm shows whether eval mode was used."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.bn(x * 2)


def test_extract_features_uses_eval_mode_and_restores_mode():
    backbone = CountingBackbone().train()
    data = TensorDataset(torch.randn(10, 4), torch.arange(10))
    feats, labels = features.extract_features(backbone, data, batch_size=4, progress=False)
    assert feats.shape == (10, 4) and feats.dtype == torch.float32
    assert torch.equal(labels, torch.arange(10))
    assert backbone.training, "the previous mode must be restored"
    assert torch.equal(backbone.bn.running_mean, torch.zeros(4)), "eval mode: BatchNorm statistics must not move"
    torch.testing.assert_close(feats, data.tensors[0] * 2 / (1 + 1e-5) ** 0.5)


def test_cached_features_computes_once_and_detects_changes(tmp_path):
    backbone = CountingBackbone()
    data = TensorDataset(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    a = features.cached_features(backbone, data, "demo", cache_dir=tmp_path, progress=False)
    calls = backbone.calls
    b = features.cached_features(backbone, data, "demo", cache_dir=tmp_path, progress=False)
    assert backbone.calls == calls, "the second call must come from the cache"
    assert torch.equal(a[0], b[0])
    assert not list(tmp_path.glob("*.part")), "no temporary file left behind"
    # A damaged cache file is recomputed with a warning, never trusted.
    next(tmp_path.glob("demo-*.pt")).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable feature cache"):
        c = features.cached_features(backbone, data, "demo", cache_dir=tmp_path, progress=False)
    assert backbone.calls > calls and torch.equal(a[0], c[0])


def test_fingerprint_changes_with_the_files(tmp_path):
    from PIL import Image

    from tlcourse import datasets

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8), "red").save(tmp_path / cls / "1.png")
    before = features.dataset_fingerprint(datasets.image_folder(tmp_path))
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b" / "2.png")
    assert features.dataset_fingerprint(datasets.image_folder(tmp_path)) != before


def test_linear_probe_and_its_torch_equivalent():
    x, y = _blobs()
    probe = features.linear_probe(x, y)
    assert probe.score(x.numpy(), y.numpy()) > 0.95
    layer = features.probe_to_linear(probe)
    assert isinstance(layer, nn.Linear) and layer.out_features == 3
    assert np.array_equal(layer(x).argmax(1).numpy(), probe.predict(x.numpy()))


def test_binary_probe_becomes_two_logits():
    x, y = _blobs()
    keep = y < 2
    probe = features.linear_probe(x[keep], y[keep])
    layer = features.probe_to_linear(probe)
    probs = layer(x[keep]).softmax(1)[:, 1].detach().numpy()
    np.testing.assert_allclose(probs, probe.predict_proba(x[keep].numpy())[:, 1], atol=1e-5)


def test_mlp_head_ends_in_linear_and_trains():
    head = features.mlp_head(16, 3, hidden=32)
    assert isinstance(head[-1], nn.Linear), "cross-entropy needs raw logits: no ReLU/softmax at the end"
    x, y = _blobs()
    torch.manual_seed(0)
    hist = features.train_head(head, x, y, x, y, epochs=30)
    assert hist["val_acc"][-1] > 0.95 and hist["train_loss"][-1] < hist["train_loss"][0]


def test_sample_per_class_is_balanced_and_reproducible():
    y = np.array([0] * 10 + [1] * 3 + [2] * 7)
    idx = features.sample_per_class(y, 5, seed=1)
    assert np.bincount(y[idx]).tolist() == [5, 3, 5]  # a class with fewer gives all it has
    assert np.array_equal(idx, features.sample_per_class(y, 5, seed=1))
    assert not np.array_equal(idx, features.sample_per_class(y, 5, seed=2))


def test_accuracy_vs_labels_improves_with_labels():
    x, y = _blobs(n_per_class=40, seed=3)
    x = x + torch.randn_like(x) * 3  # make it hard enough that labels matter
    curve = features.accuracy_vs_labels(x[::2], y[::2], x[1::2], y[1::2], shots=[1, 20], seeds=5)
    assert set(curve) == {1, 20} and all(len(v) == 5 for v in curve.values())
    assert np.mean(curve[20]) > np.mean(curve[1])


def test_extract_stage_features_pools_every_stage_in_one_pass():
    from tlcourse import models

    backbone, _ = models.split_backbone_head(models.efficientnet_lite0(pretrained=False))
    backbone.train()
    data = TensorDataset(torch.randn(5, 3, 64, 64), torch.arange(5))
    stages, labels = features.extract_stage_features(backbone, data, batch_size=2, progress=False)
    assert list(stages) == ["stem"] + [f"stage {i}" for i in range(1, 8)] + ["pooled"]
    assert [v.shape[1] for v in stages.values()] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    assert all(v.shape[0] == 5 and v.dtype == torch.float32 for v in stages.values())
    assert torch.equal(labels, torch.arange(5)) and backbone.training      # mode restored
    pooled, _ = features.extract_features(backbone, data, batch_size=2, progress=False)
    torch.testing.assert_close(stages["pooled"], pooled)                   # the usual features, too


def test_extract_stage_features_needs_a_timm_backbone():
    with pytest.raises(TypeError, match="forward_intermediates"):
        features.extract_stage_features(nn.Linear(4, 2), TensorDataset(torch.randn(2, 4), torch.zeros(2)), progress=False)


def test_accuracy_vs_labels_takes_explicit_seeds():
    x, y = torch.randn(40, 3), torch.arange(40) % 2
    a = features.accuracy_vs_labels(x, y, x, y, [2], seeds=[7, 8, 9])
    b = features.accuracy_vs_labels(x, y, x, y, [2], seeds=[7, 8, 9])
    assert len(a[2]) == 3 and a == b


def test_probe_and_label_curve_keep_sparse_features_sparse():
    # TF-IDF vectors (chapter 07) are SciPy sparse matrices: the same draws and the same
    # regression as on the dense copy, without densifying them.
    from scipy import sparse

    x, y = _blobs(n_per_class=20, seed=4)
    dense = x.numpy()
    assert features.linear_probe(sparse.csr_matrix(dense), y).score(dense, y) == \
        features.linear_probe(dense, y).score(dense, y)
    on_sparse = features.accuracy_vs_labels(sparse.csr_matrix(dense), y, sparse.csr_matrix(dense), y, [1, 3], seeds=2)
    assert on_sparse == features.accuracy_vs_labels(dense, y, dense, y, [1, 3], seeds=2)
