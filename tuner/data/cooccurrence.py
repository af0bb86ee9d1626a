"""Class co-occurrence statistics of a multi-label matrix.

Real scenes are not bags of independent labels: on COCO a fork comes with a knife far more
often than with a giraffe. Methods that model label dependencies (graph heads, co-occurrence
priors, label-correction from related classes) only have something to exploit when the
conditional probabilities ``P(j | i)`` differ widely between class pairs. These numbers let a
synthetic benchmark (DigitsMLT) be compared with the real ones (``benchmarks/cooccurrence.py``).
"""

from __future__ import annotations

import numpy as np

#: quantiles of P(j | i) and of the lift P(j | i) / P(j) that are reported
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def conditional_matrix(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``P(j | i)`` of a ``(N, C)`` 0/1 label matrix, and the mask of pairs it is defined on.

    Returns ``(cond, valid)``, both ``(C, C)``: ``cond[i, j] = n_ij / n_i`` (images holding
    both classes over images holding ``i``); ``valid`` is True for ordered pairs ``i != j``
    whose class ``i`` occurs at least once (the diagonal and absent classes are left out).
    """
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim != 2 or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"labels must be an (N, C) 0/1 matrix, got shape {y.shape}")
    joint = y.T @ y
    counts = np.diag(joint).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.where(counts[:, None] > 0, joint / counts[:, None], 0.0)
    valid = (counts[:, None] > 0) & ~np.eye(len(counts), dtype=bool)
    return cond, valid


def cooccurrence_stats(labels: np.ndarray) -> dict[str, float]:
    """Summary of how unevenly classes co-occur in ``labels`` (``(N, C)`` 0/1).

    Over the ordered class pairs ``(i, j)``, ``i != j``, with ``i`` present:

    * ``p_q10`` .. ``p_q90``: quantiles of ``P(j | i)``; ``p_std``: their standard deviation;
    * ``zero_share``: share of pairs that never co-occur (``P(j | i) = 0``);
    * ``lift_q10`` / ``lift_q50`` / ``lift_q90``: quantiles of ``P(j | i) / P(j)`` (1 means
      independent classes; the spread, not the level, is the structure a method can use);
    * ``labels_per_image``, ``images``, ``classes`` for context.
    """
    y = np.asarray(labels)
    cond, valid = conditional_matrix(y)
    pairs = cond[valid]
    prior = y.mean(0)
    lift = (cond / np.where(prior > 0, prior, 1.0)[None, :])[valid]
    out: dict[str, float] = {"images": float(len(y)), "classes": float(y.shape[1]),
                             "labels_per_image": float(y.sum(1).mean()) if len(y) else 0.0}
    if not len(pairs):
        return out
    for q in QUANTILES:
        out[f"p_q{round(q * 100)}"] = float(np.quantile(pairs, q))
    out["p_std"] = float(pairs.std())
    out["zero_share"] = float((pairs == 0).mean())
    for q in (0.1, 0.5, 0.9):
        out[f"lift_q{round(q * 100)}"] = float(np.quantile(lift, q))
    return out
