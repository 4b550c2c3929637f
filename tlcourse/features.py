"""Feature extraction: a frozen backbone computes features once, a small head learns on them.

With the backbone frozen, its output for an image never changes, so running it every epoch
repeats the expensive part of training for nothing. Compute the features once
(:func:`extract_features`, or :func:`cached_features` to keep them on disk between runs), then
train any head on the ``[N, D]`` matrix in milliseconds per epoch: a scikit-learn logistic
regression (:func:`linear_probe`) or a small MLP (:func:`mlp_head` + :func:`train_head`).
:func:`probe_to_linear` turns a fitted probe back into an ``nn.Linear`` so backbone + probe
is one PyTorch model again, ready to save and to use on new images.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from tlcourse import train


@torch.no_grad()
def extract_features(
    backbone: nn.Module, data: Dataset | DataLoader, batch_size: int = 64,
    device: torch.device | str = "cpu", progress: bool = True, desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backbone once over ``data``: features ``[N, D]`` (float32, CPU), labels ``[N]``.

    The backbone is used in eval mode (BatchNorm uses its ImageNet statistics, dropout is
    off) and restored to its previous mode afterwards.
    """
    device = torch.device(device)
    loader = data if isinstance(data, DataLoader) else train.make_loader(data, batch_size, device=device)
    was_training = backbone.training
    train.channels_last(backbone.eval(), device)
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        with train.autocast(device):
            feats.append(backbone(train.to_device(x, device)).float().cpu())
        labels.append(torch.as_tensor(y))
    train.channels_last(backbone, on=False).train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


def extract_stage_features(
    backbone: nn.Module, data: Dataset | DataLoader, batch_size: int = 64,
    device: torch.device | str = "cpu", progress: bool = True, desc: str = "features by stage",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Features of every stage of a timm backbone, in one pass: ``({name: [N, C_i]}, labels [N])``.

    Each stage's feature map ``[N, C_i, h, w]`` is averaged over space (as the backbone's own
    head does with its last one), so a linear probe can be fitted on each: the direct test of
    Yosinski et al. (2014)'s general-to-specific layers. Names run from the input up: ``"stem"``,
    ``"stage 1"`` … (timm's ``forward_intermediates(extra_blocks=True)``), then ``"pooled"``,
    the ``[N, D]`` vector :func:`extract_features` returns. Eval mode, restored afterwards.
    """
    if not hasattr(backbone, "forward_intermediates"):
        raise TypeError(f"{type(backbone).__name__} has no forward_intermediates(): use a timm model "
                        "(e.g. models.efficientnet_lite0()) for per-stage features")
    device = torch.device(device)
    loader = data if isinstance(data, DataLoader) else train.make_loader(data, batch_size, device=device)
    was_training = backbone.training
    train.channels_last(backbone.eval(), device)
    parts: dict[str, list[torch.Tensor]] = {}
    labels = []
    with torch.no_grad():
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
            with train.autocast(device):
                final, maps = backbone.forward_intermediates(train.to_device(x, device), extra_blocks=True)
                pooled = backbone.forward_head(final)
            names = ["stem"] + [f"stage {i}" for i in range(1, len(maps))]
            for name, fmap in zip(names, maps):
                parts.setdefault(name, []).append(fmap.float().mean(dim=(2, 3)).cpu())
            parts.setdefault("pooled", []).append(pooled.float().cpu())
            labels.append(torch.as_tensor(y))
    train.channels_last(backbone, on=False).train(was_training)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}, torch.cat(labels).long()


def features_cache_dir() -> Path:
    """Where :func:`cached_features` keeps feature files: ``TLCOURSE_CACHE`` or ``~/.cache/tlcourse/features``.

    Separate from the dataset folder, which may be a read-only mirror.
    """
    base = os.environ.get("TLCOURSE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tlcourse"
    return Path(base) / "features"


def dataset_fingerprint(dataset: Dataset) -> str:
    """A short hash that changes when the images of an ImageFolder-like dataset change.

    Uses every file's path, size and modification time (``dataset.samples``) and the
    transform's repr; for other datasets, their length and type.
    """
    h = hashlib.sha256()
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        for path, label in samples:
            stat = os.stat(path)
            h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    else:
        h.update(f"{type(dataset).__name__}:{len(dataset)}".encode())
    h.update(repr(getattr(dataset, "transform", None)).encode())
    return h.hexdigest()[:16]


def cached_features(
    backbone: nn.Module, dataset: Dataset, name: str, cache_dir: str | Path | None = None, **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features`, remembered on disk under ``name`` + the dataset's fingerprint.

    ``name`` must identify the backbone and preprocessing (e.g. ``"lite0-160-train"``): the
    cache cannot tell two backbones apart by itself. A cache folder that cannot be written
    only costs the caching, with a warning.
    """
    folder = Path(cache_dir) if cache_dir else features_cache_dir()
    path = folder / f"{name}-{dataset_fingerprint(dataset)}.pt"
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            return saved["features"], saved["labels"]
        except Exception as exc:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
            warnings.warn(f"Ignoring the unreadable feature cache {path} ({exc}); recomputing.", stacklevel=2)
    feats, labels = extract_features(backbone, dataset, **kwargs)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".part", delete=False) as tmp:
            torch.save({"features": feats, "labels": labels}, tmp)
        os.replace(tmp.name, path)  # atomic: an interrupted save never leaves a half file
    except OSError as exc:
        warnings.warn(f"Could not cache features in {folder} ({exc}); they will be recomputed next time.", stacklevel=2)
    return feats, labels


def linear_probe(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, C: float = 1.0, max_iter: int = 3000):
    """Fit an L2-regularised multinomial logistic regression on ``features [N, D]``.

    Returns the fitted scikit-learn ``LogisticRegression`` (``.score``, ``.predict``).
    ``features`` may be a SciPy sparse matrix (TF-IDF vectors, chapter 07): kept sparse.
    No standardisation: the backbone's features are already on a common scale (ReLU6
    outputs averaged over positions), and with one or two labels per class a
    ``StandardScaler`` estimates each feature's spread from two numbers, which measured
    here cost ~20 points of accuracy at 1–2 shots.
    """
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=max_iter).fit(_matrix(features), np.asarray(labels))


def _matrix(x):
    """``x`` as NumPy, unless it is a SciPy sparse matrix (``np.asarray`` would wrap it in a 0-d
    object array)."""
    from scipy import sparse

    return x if sparse.issparse(x) else np.asarray(x)


def probe_to_linear(probe) -> nn.Linear:
    """The fitted :func:`linear_probe` as one ``nn.Linear(D, C)``: backbone + probe is then
    one PyTorch model, to save and to run on new images.

    A binary logistic regression has one weight row ``w``; its two-class equivalent gives
    logits ``[0, w·x + b]``, which have the same softmax.
    """
    weight = torch.as_tensor(probe.coef_, dtype=torch.float32)
    bias = torch.as_tensor(probe.intercept_, dtype=torch.float32)
    if weight.shape[0] == 1:
        weight = torch.cat([torch.zeros_like(weight), weight])
        bias = torch.cat([torch.zeros_like(bias), bias])
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def mlp_head(in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.3) -> nn.Sequential:
    """A small MLP head: ``[N, D] -> [N, C]`` logits.

    It ends in a plain ``nn.Linear``: cross-entropy wants raw logits, so no ReLU or softmax
    after the last layer (a ReLU there would clip every negative logit to zero).
    """
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


def train_head(
    head: nn.Module, train_features: torch.Tensor, train_labels: torch.Tensor,
    val_features: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
    epochs: int = 60, lr: float = 1e-3, weight_decay: float = 1e-2, batch_size: int = 32,
    device: torch.device | str = "cpu", progress: bool = False, seed: int = 0,
) -> train.History:
    """Train ``head`` on cached features with AdamW and :func:`tlcourse.train.fit`.

    Each epoch touches only ``[N, D]`` numbers, so hundreds of epochs take seconds.
    """
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(TensorDataset(train_features, train_labels), batch_size=batch_size, shuffle=True, generator=generator)
    val_loader = None
    if val_features is not None:
        val_loader = DataLoader(TensorDataset(val_features, val_labels), batch_size=256)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    return train.fit(head, train_loader, val_loader, optimizer, epochs, device=device, progress=progress, keep_best=False)


def sample_per_class(labels: torch.Tensor | np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Indices of ``k`` random examples of every class (all of a class if it has fewer), sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def accuracy_vs_labels(
    train_features, train_labels, val_features, val_labels, shots: Sequence[int],
    seeds: int | Sequence[int] = 5, fit: Callable | None = None,
) -> dict[int, list[float]]:
    """Validation accuracy with ``k`` labelled examples per class, for each ``k`` in ``shots``.

    Each ``k`` is repeated over random draws, one per seed: ``seeds`` is a number of draws
    (seeds 0 … n−1) or the seeds themselves (``cfg.seeds(5)`` in a notebook). The spread
    matters most for small ``k``. ``fit(features, labels)`` returns a classifier with
    ``.score``; default :func:`linear_probe`. Features ``[N, D]``: arrays, tensors or SciPy
    sparse matrices.
    """
    fit = fit or linear_probe
    train_features, val_features, val_labels = _matrix(train_features), _matrix(val_features), np.asarray(val_labels)
    seeds = range(seeds) if isinstance(seeds, int) else list(seeds)
    results = {}
    for k in shots:
        scores = []
        for seed in seeds:
            idx = sample_per_class(train_labels, k, seed)
            clf = fit(train_features[idx], np.asarray(train_labels)[idx])
            scores.append(float(clf.score(val_features, val_labels)))
        results[k] = scores
    return results
