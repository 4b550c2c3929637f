"""One stratified train/validation split for every kind of labelled data the CLI reads.

``tlcourse probe`` holds out ``--val-split`` of an image folder (:func:`tlcourse.folders.load_train_val`)
or of a text CSV (:func:`tlcourse.text.stratified_split`) the same way: scikit-learn's
``train_test_split`` with ``stratify``, after checks that say what is wrong in the learner's terms.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["stratified_split"]


def stratified_split(labels, fraction: float, seed: int = 0, classes: Sequence[str] | None = None,
                     unit: str = "examples", elsewhere: str = "separate validation data",
                     error: type[Exception] = ValueError) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of every class: ``labels [N]`` -> sorted indices ``(train, val)``.

    At least one example of each class goes to each side, so every class needs two. ``classes``
    (names indexed by label), ``unit`` ("images", "examples") and ``elsewhere`` (where else
    validation data could come from) only make the messages of ``error`` readable. ``seed``
    fixes the draw.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ValueError(f"--val-split must be a fraction between 0 and 1 (e.g. 0.2), not {fraction}.")
    labels = np.asarray(labels)
    present, counts = np.unique(labels, return_counts=True)
    if (counts < 2).any():
        rare = [repr(classes[i]) if classes is not None else str(i) for i in present[counts < 2]]
        raise error(f"Class(es) {', '.join(rare)} have fewer than 2 {unit}, so --val-split cannot put one in "
                    f"each of train and validation. Add {unit}, or give {elsewhere}.")
    n_val = max(len(present), round(fraction * len(labels)))
    if len(labels) - n_val < len(present):
        raise error(f"--val-split {fraction} leaves {len(labels) - n_val} training {unit} for "
                    f"{len(present)} classes: use a smaller fraction, or add {unit}.")
    train, val = train_test_split(np.arange(len(labels)), test_size=n_val, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)
