"""The evaluator against scikit-learn on small random data, ties and empty classes included.

AP is scikit-learn's ``average_precision_score`` recomputed in NumPy (scikit-learn stays out of
the training processes' imports); these tests check that it is bit-identical to scikit-learn,
pin the platform's conventions around it (classes without a positive skipped, percent, groups,
logits vs probabilities) and check the convention on hand-computed values that do not come from
scikit-learn.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from tuner.metrics import average_precision, evaluate, f1_scores, mean_ap, per_class_ap

SEEDS = [0, 1, 2, 3, 4]


def random_scores(rng: np.random.Generator, shape: tuple[int, ...], ties: bool) -> np.ndarray:
    scores = rng.normal(size=shape)
    return np.round(scores, 1) if ties else scores


def random_targets(rng: np.random.Generator, shape: tuple[int, ...], rate: float) -> np.ndarray:
    return (rng.random(shape) < rate).astype(np.int64)


def sklearn_aps(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.array(
        [
            average_precision_score(targets[:, c], scores[:, c]) if targets[:, c].any() else np.nan
            for c in range(targets.shape[1])
        ]
    )


# ---------------------------------------------------------------- average precision
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [5, 40, 300])
@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_matches_sklearn(seed: int, n: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    scores = random_scores(rng, (n,), ties)
    targets = random_targets(rng, (n,), rate=0.3)
    targets[rng.integers(n)] = 1
    assert_allclose(average_precision(scores, targets), average_precision_score(targets, scores))


@pytest.mark.parametrize("rate", [0.01, 0.3, 0.9])
@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_is_bit_identical_to_sklearn(seed: int, rate: float) -> None:
    """Not only close: equal to the last bit, so results and rankings are unchanged."""
    rng = np.random.default_rng(seed)
    for n, decimals in [(2000, None), (2000, 2), (500, 0), (1, None)]:
        scores = rng.normal(size=n) * 3.0
        if decimals is not None:
            scores = np.round(scores, decimals)
        targets = random_targets(rng, (n,), rate)
        targets[rng.integers(n)] = 1
        assert average_precision(scores, targets) == average_precision_score(targets, scores)
        as_float32 = scores.astype(np.float32)  # logits from a model arrive as float32
        assert average_precision(torch.from_numpy(as_float32), targets) == \
            average_precision_score(targets, as_float32.astype(np.float64))


def test_the_evaluator_does_not_import_sklearn() -> None:
    """Every driver and trial process imports tuner.metrics; scikit-learn costs 0.9 s there."""
    code = ("import sys, numpy as np, tuner.metrics as m; "
            "m.evaluate(np.random.default_rng(0).normal(size=(30, 4)), np.eye(30, 4)); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('sklearn', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_average_precision_with_heavy_ties() -> None:
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 3, size=50).astype(float)
    targets = random_targets(rng, (50,), rate=0.5)
    assert_allclose(average_precision(scores, targets), average_precision_score(targets, scores))
    constant = np.zeros(50)
    assert_allclose(average_precision(constant, targets), targets.mean())


def test_average_precision_by_hand_with_a_tie() -> None:
    # 3 positives; thresholds 0.9 | 0.8 (three tied rows, two positive: one threshold) | 0.1:
    # recall steps 1/3 at precision 1, 2/3 at precision 3/4, 0 at 3/5
    scores = np.array([0.9, 0.8, 0.8, 0.8, 0.1])
    targets = np.array([1, 1, 0, 1, 0])
    expected = 1 / 3 + 2 / 3 * 3 / 4
    assert average_precision(scores, targets) == pytest.approx(expected)
    # any order inside the tie would give another value (1, 11/12 or 29/36)
    for order_value in (1.0, 1 / 3 + 1 / 3 + 1 / 4, 1 / 3 + 2 / 9 + 1 / 4):
        assert expected != pytest.approx(order_value)


def test_average_precision_edge_cases() -> None:
    targets = np.array([1, 0, 1, 0])
    assert average_precision(np.array([4.0, 1.0, 3.0, 2.0]), targets) == pytest.approx(1.0)
    assert average_precision(np.array([1.0, 2.0, 3.0]), np.ones(3)) == pytest.approx(1.0)
    assert np.isnan(average_precision(np.array([1.0, 2.0]), np.zeros(2)))


def test_average_precision_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same shape"):
        average_precision(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="0 and 1"):
        average_precision(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([0.0, np.nan]), np.array([0, 1]))


# ---------------------------------------------------------------- mAP
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_per_class_ap_and_mean_ap_match_sklearn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    scores = random_scores(rng, (60, 8), ties)
    targets = random_targets(rng, (60, 8), rate=0.25)
    targets[:, [2, 5]] = 0  # classes without a positive are skipped
    expected = sklearn_aps(scores, targets)
    ap = per_class_ap(scores, targets)
    np.testing.assert_array_equal(ap, expected)
    assert np.isnan(ap[[2, 5]]).all()
    assert_allclose(mean_ap(scores, targets)["mAP"], 100 * np.nanmean(expected))


@pytest.mark.parametrize("seed", SEEDS)
def test_group_map_is_the_mean_over_the_group(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = random_scores(rng, (50, 9), ties=True)
    targets = random_targets(rng, (50, 9), rate=0.3)
    targets[:, [7, 8]] = 0
    groups = {"head": [0, 1, 2], "medium": (3, 4, 7), "tail": [5, 6], "empty": [8]}
    result = mean_ap(scores, targets, groups)
    expected = sklearn_aps(scores, targets)
    assert set(result) == {"mAP", "mAP_head", "mAP_medium", "mAP_tail", "mAP_empty"}
    assert_allclose(result["mAP_head"], 100 * expected[[0, 1, 2]].mean())
    assert_allclose(result["mAP_medium"], 100 * expected[[3, 4]].mean())
    assert_allclose(result["mAP_tail"], 100 * expected[[5, 6]].mean())
    assert np.isnan(result["mAP_empty"])


def test_map_with_a_single_class_with_positives() -> None:
    scores = np.array([[3.0, 0.1, 2.0], [1.0, 0.2, 1.0], [2.0, 0.3, 0.0], [0.0, 0.4, 3.0]])
    targets = np.zeros((4, 3))
    targets[[0, 2], 0] = 1  # only class 0 has positives: ranks 1 and 2 -> AP 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ap = per_class_ap(scores, targets)
    assert ap[0] == pytest.approx(1.0) and np.isnan(ap[1:]).all()
    targets[:, 0] = [0, 1, 0, 1]  # ranks 3 and 4 -> AP (1/3 + 2/4) / 2
    assert mean_ap(scores, targets)["mAP"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)


def test_map_without_any_positive_is_nan_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(mean_ap(np.zeros((4, 3)), np.zeros((4, 3)))["mAP"])


# ---------------------------------------------------------------- F1
@pytest.mark.parametrize("threshold", [0.3, 0.5])
@pytest.mark.parametrize("seed", SEEDS)
def test_f1_scores_match_sklearn(seed: int, threshold: float) -> None:
    rng = np.random.default_rng(seed)
    probs = rng.random((40, 6))
    targets = random_targets(rng, (40, 6), rate=0.3)
    probs[:, 1] = 0.1  # no predicted positive: precision 0, not NaN
    targets[:, 4] = 0  # no true positive: recall 0
    pred = (probs >= threshold).astype(np.int64)
    kw = {"y_true": targets, "y_pred": pred, "zero_division": 0}
    cp = precision_score(average="macro", **kw)
    cr = recall_score(average="macro", **kw)
    result = f1_scores(probs, targets, threshold)
    assert_allclose(result["CP"], 100 * cp)
    assert_allclose(result["CR"], 100 * cr)
    assert_allclose(result["CF1"], 100 * 2 * cp * cr / (cp + cr))
    assert_allclose(result["OP"], 100 * precision_score(average="micro", **kw))
    assert_allclose(result["OR"], 100 * recall_score(average="micro", **kw))
    assert_allclose(result["OF1"], 100 * f1_score(average="micro", **kw))


def test_cf1_is_harmonic_mean_of_cp_and_cr_not_mean_f1() -> None:
    targets = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    probs = np.array([[0.9, 0.9], [0.9, 0.9], [0.1, 0.9], [0.1, 0.9]])
    result = f1_scores(probs, targets)
    assert_allclose([result["CP"], result["CR"]], [75.0, 100.0])
    assert_allclose(result["CF1"], 100 * 2 * 0.75 / 1.75)
    mean_class_f1 = f1_score(targets, (probs >= 0.5).astype(int), average="macro")
    assert not np.isclose(result["CF1"], 100 * mean_class_f1)


def test_f1_scores_with_nothing_predicted_or_true_are_zero() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = f1_scores(np.zeros((3, 2)), np.zeros((3, 2)))
    assert result == {"CP": 0.0, "CR": 0.0, "CF1": 0.0, "OP": 0.0, "OR": 0.0, "OF1": 0.0}


# ---------------------------------------------------------------- evaluate
@pytest.mark.parametrize("seed", SEEDS)
def test_evaluate_combines_map_on_logits_and_f1_on_probabilities(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = 4 * rng.normal(size=(30, 5))
    targets = random_targets(rng, (30, 5), rate=0.4)
    targets[0] = 1
    groups = {"head": [0, 1], "medium": [2], "tail": [3, 4]}
    result = evaluate(logits, targets, groups)
    keys = ["mAP", "mAP_head", "mAP_medium", "mAP_tail", "CF1", "OF1", "CP", "CR", "OP", "OR"]
    assert list(result) == keys
    assert all(isinstance(value, float) for value in result.values())
    expected = {**mean_ap(logits, targets, groups), **f1_scores(1 / (1 + np.exp(-logits)), targets)}
    assert_allclose([result[k] for k in keys], [expected[k] for k in keys])
    pred = (logits >= 0).astype(np.int64)  # probability 0.5 is logit 0
    assert_allclose(result["OF1"], 100 * f1_score(targets, pred, average="micro"))


def test_evaluate_accepts_tensors_and_extreme_logits() -> None:
    logits = torch.tensor([[1000.0, -1000.0], [-1000.0, 1000.0], [0.0, 0.0]])
    targets = torch.tensor([[1, 0], [0, 1], [0, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(logits, targets)
    assert_allclose(result["mAP"], 100.0)
    assert_allclose([result["OP"], result["OR"]], [50.0, 100.0])


def test_ignored_entries_are_left_out_of_ap_as_sklearn_on_the_kept_entries() -> None:
    """VOC07 protocol: each class's AP on its kept (non-ignored) entries only."""
    from sklearn.metrics import average_precision_score

    from tuner.metrics import evaluate, f1_scores, mean_ap, per_class_ap

    rng = np.random.default_rng(21)
    scores = rng.normal(size=(60, 4))
    targets = (rng.random((60, 4)) < 0.3).astype(np.uint8)
    targets[0] = 1
    ignore = rng.random((60, 4)) < 0.2
    ignore[:, 3] = False  # one class without ignored entries
    targets[ignore] = 0  # an ignored entry holds no label
    scores[ignore] += 5.0  # high scores on ignored entries: they would hurt AP if counted
    ap = per_class_ap(scores, targets, ignore)
    for c in range(4):
        keep = ~ignore[:, c]
        assert ap[c] == pytest.approx(average_precision_score(targets[keep, c], scores[keep, c]))
    plain = per_class_ap(scores, targets)
    assert (ap[:3] > plain[:3]).all() and ap[3] == pytest.approx(plain[3])
    assert mean_ap(scores, targets, {"a": [0, 1]}, ignore)["mAP_a"] == pytest.approx(
        100 * ap[:2].mean())
    assert evaluate(scores, targets, ignore=ignore)["mAP"] == pytest.approx(100 * ap.mean())
    probs = 1 / (1 + np.exp(-scores))
    f1 = f1_scores(probs, targets, 0.5, ignore)
    pred = (probs >= 0.5) & ~ignore
    tp = (pred & (targets == 1)).sum()
    assert f1["OP"] == pytest.approx(100 * tp / pred.sum())
    with pytest.raises(ValueError, match="same shape"):
        per_class_ap(scores, targets, ignore[:5])
