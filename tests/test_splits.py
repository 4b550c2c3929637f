"""splits.stratified_split: the one --val-split behind image folders and text CSVs."""

import numpy as np
import pytest

from tlcourse.splits import stratified_split


def test_every_class_is_on_both_sides_even_beside_large_ones():
    labels = np.array([0] * 2 + [1] * 998)
    for seed in range(10):                                  # scikit-learn's stratify gave class 0 no validation
        train, val = stratified_split(labels, 0.2, seed)
        assert (labels[val] == 0).sum() == 1 and (labels[train] == 0).sum() == 1
        assert (labels[val] == 1).sum() == round(0.2 * 998)
    train, val = stratified_split(np.array([0] * 2 + [1] * 98), 0.9)
    assert (np.array([0] * 2 + [1] * 98)[train] == 0).sum() == 1  # a large fraction still leaves one to train on


def test_the_split_is_a_partition_fixed_by_the_seed():
    labels = np.random.default_rng(0).integers(0, 5, 200)
    train, val = stratified_split(labels, 0.25, seed=3)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(200))
    assert np.array_equal(val, stratified_split(labels, 0.25, seed=3)[1])
    assert not np.array_equal(val, stratified_split(labels, 0.25, seed=4)[1])
    for c in range(5):
        n = (labels == c).sum()
        assert (labels[val] == c).sum() == min(max(round(0.25 * n), 1), n - 1)


def test_a_class_of_one_is_refused_with_its_name():
    with pytest.raises(KeyError, match="'greet' have fewer than 2 examples.*a file"):
        stratified_split([0, 1, 1], 0.5, classes=["greet", "bye"], elsewhere="a file", error=KeyError)
    with pytest.raises(ValueError, match="between 0 and 1"):
        stratified_split([0, 0, 1, 1], 1.0)
