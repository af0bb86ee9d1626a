"""Iterative multi-label stratification (Sechidis, Tsoumakas & Vlahavas, ECML PKDD 2011).

Used to carve a validation split out of a benchmark's test set (or its training set) so that
every class, tail classes included, keeps its share of positives in both parts.
"""

from __future__ import annotations

import numpy as np

from tuner.errors import ConfigError


def iterative_stratification(
    labels: np.ndarray, proportions: tuple[float, ...], seed: int = 0
) -> np.ndarray:
    """Assign each row of ``labels`` to a fold so that each class is spread as ``proportions``.

    Algorithm 1 of Sechidis et al.: repeatedly take the label with the fewest unassigned
    examples; give each of its examples (in a seeded random order) to the fold that still
    wants the most examples of that label, breaking ties by the fold that wants the most
    examples overall, then by the seeded generator. Examples without labels fill the folds
    up to their desired sizes. Deterministic for a given ``seed``.

    Args:
        labels: ``(N, C)`` 0/1 matrix.
        proportions: desired share of each fold (summing to 1).
        seed: tie-breaking seed.

    Returns:
        ``(N,)`` int64 fold index of every row.
    """
    labels = np.asarray(labels, dtype=bool)
    r = np.asarray(proportions, dtype=np.float64)
    if r.ndim != 1 or len(r) < 2 or (r <= 0).any() or abs(r.sum() - 1) > 1e-9:
        raise ConfigError(f"fold proportions must be >= 2 positive shares summing to 1, got {proportions}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    want = r * n  # examples each fold still wants
    want_label = np.outer(r, labels.sum(0)).astype(np.float64)  # (K, C)
    fold = np.full(n, -1, dtype=np.int64)
    remaining = labels.copy()
    while remaining.any():
        counts = remaining.sum(0)
        counts[counts == 0] = n + 1
        label = int(np.argmin(counts))  # lowest index among the rarest (deterministic)
        rows = np.flatnonzero(remaining[:, label])
        for i in rng.permutation(rows):
            j = _pick_fold(want_label[:, label], want, rng)
            fold[i] = j
            want[j] -= 1
            want_label[j] -= labels[i]
            remaining[i] = False
    for i in rng.permutation(np.flatnonzero(fold < 0)):
        j = _pick_fold(want, want, rng)
        fold[i] = j
        want[j] -= 1
    return fold


def _pick_fold(primary: np.ndarray, secondary: np.ndarray, rng: np.random.Generator) -> int:
    """Fold with the largest ``primary`` want; ties -> largest ``secondary``; ties -> random."""
    best = np.flatnonzero(primary >= primary.max() - 1e-9)
    if len(best) > 1:
        best = best[secondary[best] >= secondary[best].max() - 1e-9]
    return int(best[0] if len(best) == 1 else rng.choice(best))


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of exactly ``round(fraction * N)`` held-out rows, stratified per class."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction must be in (0, 1), got {fraction}")
    held = iterative_stratification(labels, (fraction, 1.0 - fraction), seed) == 0
    return _repair_size(np.asarray(labels, dtype=np.int64), held, fraction)


def _repair_size(labels: np.ndarray, held: np.ndarray, fraction: float) -> np.ndarray:
    """Move rows across until ``round(fraction * N)`` are held out, each move the one that
    least increases the per-class deviation from ``fraction`` of the positives.

    Iterative stratification matches class counts but not fold sizes (rows with many labels
    pull the small fold over its size); this makes the validation size exact.
    """
    held = held.copy()
    target = round(fraction * len(labels))
    desired = fraction * labels.sum(0)
    while held.sum() != target:
        move_out = held.sum() > target  # True: held -> rest, False: rest -> held
        step = -1 if move_out else 1
        dev = labels[held].sum(0) - desired
        cost = labels @ (np.abs(dev + step) - np.abs(dev))  # change of total deviation per row
        cost = np.where(held == move_out, cost, np.inf)
        held[int(np.argmin(cost))] = not move_out
    return held
