"""Co-occurrence statistics against a matrix worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tuner.data.cooccurrence import conditional_matrix, cooccurrence_stats

# 4 images, classes 0-2; class 3 never occurs
LABELS = np.array([
    [1, 1, 0, 0],
    [1, 0, 0, 0],
    [1, 1, 1, 0],
    [0, 0, 1, 0],
])


def test_conditional_probabilities_match_the_hand_count() -> None:
    # n_0 = 3, n_1 = 2, n_2 = 2; n_01 = 2, n_02 = 1, n_12 = 1
    expected = np.array([
        [0, 2 / 3, 1 / 3, 0],
        [1, 0, 1 / 2, 0],
        [1 / 2, 1 / 2, 0, 0],
        [0, 0, 0, 0],
    ])
    cond, valid = conditional_matrix(LABELS)
    np.testing.assert_allclose(cond * valid, expected)
    # the diagonal and the absent class's row are undefined; pairs (i, 3) are real zeros
    assert valid.sum() == 9 and not valid[3].any() and not valid.diagonal().any()


def test_summary_statistics_match_the_hand_count() -> None:
    stats = cooccurrence_stats(LABELS)
    pairs = np.array([2 / 3, 1 / 3, 0, 1, 1 / 2, 0, 1 / 2, 1 / 2, 0])  # rows 0..2, j != i
    assert stats["zero_share"] == pytest.approx(3 / 9)
    assert stats["p_q50"] == pytest.approx(1 / 2)
    assert stats["p_std"] == pytest.approx(pairs.std())
    assert stats["labels_per_image"] == pytest.approx(7 / 4)
    # lift P(j|i) / P(j), P = (3/4, 1/2, 1/2, 0): the absent class's column counts as 0
    lift = np.array([4 / 3, 2 / 3, 0, 4 / 3, 1, 0, 2 / 3, 1, 0])
    assert stats["lift_q90"] == pytest.approx(np.quantile(lift, 0.9))


def test_independent_classes_have_lift_near_one() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((20000, 5)) < np.array([0.5, 0.4, 0.3, 0.2, 0.1])).astype(int)
    stats = cooccurrence_stats(labels)
    assert 0.9 < stats["lift_q10"] <= stats["lift_q90"] < 1.1


def test_non_binary_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="0/1 matrix"):
        conditional_matrix(np.array([[0, 2], [1, 0]]))
