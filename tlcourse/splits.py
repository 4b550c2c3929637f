"""One stratified train/validation split for every kind of labelled data the CLI reads.

``tlcourse probe`` holds out ``--val-split`` of an image folder (:func:`tlcourse.folders.load_train_val`)
or of a text CSV (:func:`tlcourse.text.stratified_split`) the same way: a share of
every class on both sides, after checks that say what is wrong in the learner's terms.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["stratified_split"]


def stratified_split(labels, fraction: float, seed: int = 0, classes: Sequence[str] | None = None,
                     unit: str = "examples", elsewhere: str = "separate validation data",
                     error: type[Exception] = ValueError) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of every class: ``labels [N]`` (integers) -> sorted indices
    ``(train, val)``.

    Each class of ``n`` examples gives ``round(fraction * n)`` of them to validation, but at least
    one and at most ``n - 1``, so every class is on both sides and every class needs two.
    Written by hand because scikit-learn's ``train_test_split(stratify=...)`` shares the
    validation size out over all classes at once: a class of two beside large ones can get
    nothing on one side. ``classes`` (names indexed by label), ``unit`` ("images", "examples")
    and ``elsewhere`` (where else validation data could come from) only make the message of
    ``error`` readable. ``seed`` fixes the draw (NumPy's ``default_rng``; the global random
    state is not used).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"--val-split must be a fraction between 0 and 1 (e.g. 0.2), not {fraction}.")
    labels = np.asarray(labels)
    present, counts = np.unique(labels, return_counts=True)
    if (counts < 2).any():
        rare = [repr(classes[i]) if classes is not None else str(i) for i in present[counts < 2]]
        raise error(f"Class(es) {', '.join(rare)} have fewer than 2 {unit}, so --val-split cannot put one in "
                    f"each of train and validation. Add {unit}, or give {elsewhere}.")
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.choice(np.flatnonzero(labels == c), min(max(round(fraction * n), 1), n - 1),
                                     replace=False) for c, n in zip(present, counts)])
    val = np.sort(val)
    return np.setdiff1d(np.arange(len(labels)), val), val
