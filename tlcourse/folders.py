"""Bring your own images: train/validation sets from any folders of class-named subfolders.

Used by ``tlcourse probe`` and ``tlcourse finetune`` (and by notebooks on a learner's own
photos). Layout mistakes raise :class:`tlcourse.datasets.ImageFolderError` with what to
change; unreadable images are reported by name and left out, never crash a run mid-epoch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset, Subset

from tlcourse import datasets
from tlcourse.datasets import ImageFolderError
from tlcourse.splits import stratified_split


@dataclass
class TrainVal:
    """Training and validation sets over the same classes (``classes[i]`` is label ``i``)."""

    train: Dataset
    val: Dataset
    classes: list[str]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable images left out

    def counts(self, which: str) -> dict[str, int]:
        labels = _labels(getattr(self, which))
        return {c: int((labels == i).sum()) for i, c in enumerate(self.classes)}


def _labels(dataset: Dataset) -> np.ndarray:
    if isinstance(dataset, Subset):
        return np.asarray(dataset.dataset.targets)[np.asarray(dataset.indices)]
    return np.asarray(dataset.targets)


def _readable_folder(root, transform) -> tuple[Dataset, list[tuple[Path, str]]]:
    folder = datasets.image_folder(root, transform)
    bad = datasets.check_images(folder)
    if bad:
        bad_paths = {str(p) for p, _ in bad}
        folder.samples = [s for s in folder.samples if s[0] not in bad_paths]
        folder.imgs = folder.samples
        folder.targets = [label for _, label in folder.samples]
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"Leaving out {len(bad)} unreadable image(s): {shown}", UserWarning, stacklevel=3)
        empty = [c for i, c in enumerate(folder.classes) if i not in set(folder.targets)]
        if empty:
            raise ImageFolderError(f"No readable images left in class folder(s) {', '.join(map(repr, empty))} of {root}.")
    return folder, bad


def load_train_val(
    train_dir: str | Path, val_dir: str | Path | None = None, val_split: float | None = None,
    transform: Callable | None = None, val_transform: Callable | None = None, seed: int = 0,
) -> TrainVal:
    """Load ``train_dir`` and either ``val_dir`` or a stratified ``val_split`` fraction of it.

    ``transform`` applies to training images, ``val_transform`` (default: ``transform``) to
    validation images. With ``val_dir``, its class folders must match ``train_dir``'s.
    """
    if val_dir is not None and val_split is not None:
        raise ValueError("Give either a validation folder or --val-split, not both.")
    datasets.image_folder(train_dir, warn_skipped=False)  # layout errors first, before reading any image
    if val_dir is None and val_split is None:
        raise ValueError("No validation data: give a validation folder with the same class subfolders, "
                         "or --val-split 0.2 to hold out 20% of the training images.")
    val_transform = val_transform or transform
    train_set, skipped = _readable_folder(train_dir, transform)
    if val_dir is not None:
        val_set, more = _readable_folder(val_dir, val_transform)
        skipped += more
        if val_set.classes != train_set.classes:
            raise ImageFolderError(
                f"The class folders differ: {train_dir} has {train_set.classes}, {val_dir} has {val_set.classes}. "
                "Both need the same class subfolders (same names).")
        return TrainVal(train_set, val_set, list(train_set.classes), skipped)

    train_idx, val_idx = stratified_split(train_set.targets, val_split, seed, train_set.classes, unit="images",
                                          elsewhere="a validation folder", error=ImageFolderError)
    val_view = datasets.image_folder(train_dir, val_transform, warn_skipped=False)
    val_view.samples, val_view.targets = train_set.samples, train_set.targets
    return TrainVal(Subset(train_set, train_idx.tolist()), Subset(val_view, val_idx.tolist()),
                    list(train_set.classes), skipped)


def samples(dataset: Dataset) -> list[tuple[str, int]]:
    """``(path, label)`` of every image of an ImageFolder or of a Subset of one."""
    if isinstance(dataset, Subset):
        return [dataset.dataset.samples[i] for i in dataset.indices]
    return list(dataset.samples)


def per_class_accuracy(predicted, labels, classes: list[str]) -> dict[str, float]:
    """Accuracy within each class (a classifier that ignores a rare class shows up here)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    return {c: float((predicted[labels == i] == i).mean()) if (labels == i).any() else float("nan")
            for i, c in enumerate(classes)}
