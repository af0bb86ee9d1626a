r"""The one evaluator: mAP (total and per class group) and CF1/OF1 at a probability threshold.

AP is scikit-learn's ``sklearn.metrics.average_precision_score``, computed here by the same
NumPy operations in the same order (sort, cumulative sums at the distinct thresholds,
step-wise sum), so the values are bit-identical to scikit-learn's; F1 is a few NumPy sums that
match scikit-learn's macro / micro precision and recall. ``tests/test_metrics.py`` checks both
against scikit-learn itself. Not importing scikit-learn here keeps it (0.9 s of SciPy and pandas
imports) out of every search driver and trial process, which all import this module. Tensors
are accepted and moved to the CPU.

Conventions, fixed platform-wide:

* AP is scikit-learn's ``average_precision_score``: the step-wise sum
  :math:`\sum_k (R_k - R_{k-1}) P_k` over the distinct score thresholds, tied scores forming
  one threshold. It is computed on the raw scores (logits).
* mAP averages AP over the classes with at least one positive; all mAP, precision, recall and
  F1 values are in percent.
* CF1 is :math:`2 \cdot CP \cdot CR / (CP + CR)` with CP and CR the class-averaged precision
  and recall (the textbook / CoNeS definition). The Hill/SPLC ``validate.py`` instead averages
  the per-class F1, which gives a different number.
* ``ignore``: an optional ``(N, C)`` bool mask of label entries that are neither positive nor
  negative (VOC2007 "difficult" objects under ``--voc-difficult ignore``). Each class's AP is
  computed on its kept entries only (the VOC07 protocol), and ignored entries count in no F1
  total. Applied before the AP call; the AP itself is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = ["average_precision", "evaluate", "f1_scores", "mean_ap", "per_class_ap"]

ArrayLike = np.ndarray | torch.Tensor


def _as_numpy(values: ArrayLike, name: str, ndim: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    out = np.asarray(values, dtype=np.float64)
    if out.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {out.shape}")
    return out


def _check_pair(scores: ArrayLike, targets: ArrayLike, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 arrays of the same ``ndim``-D shape, targets 0/1, scores finite."""
    s = _as_numpy(scores, "scores", ndim)
    t = _as_numpy(targets, "targets", ndim)
    if s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must have the same shape")
    if not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("targets must contain only 0 and 1")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return s, t


def _safe_div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """``num / den`` with 0 where ``den == 0``."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _percent_mean(values: np.ndarray) -> float:
    """100 * the mean of the non-NaN entries; NaN (without a warning) when there are none."""
    kept = values[~np.isnan(values)]
    return float(100.0 * kept.mean()) if kept.size else float("nan")


def _binary_ap(targets: np.ndarray, scores: np.ndarray) -> float:
    """AP of one class with a positive, as ``sklearn.metrics.average_precision_score``.

    The steps of scikit-learn 1.9's ``precision_recall_curve`` (without dropping
    intermediate thresholds) and of its step-function integral, one for one: rows in
    descending score order, the true and false positives at each distinct score, precision
    and recall there, both reversed and closed by the point (recall 0, precision 1), and
    ``-sum(diff(recall) * precision[:-1])`` clipped at 0.
    """
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    positives = targets[order].astype(np.float64)
    thresholds = np.concatenate([np.flatnonzero(np.diff(ranked)), [ranked.size - 1]])
    tps = np.cumsum(positives, dtype=np.float64)[thresholds]
    fps = 1 + thresholds.astype(np.float64) - tps
    predicted = tps + fps
    precision = np.where(predicted != 0, np.divide(tps, predicted), 0.0)
    recall = tps / tps[-1]
    precision = np.concatenate([precision[::-1], [1.0]])
    recall = np.concatenate([recall[::-1], [0.0]])
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def average_precision(scores: ArrayLike, targets: ArrayLike) -> float:
    """Average precision of one class: ``sklearn.metrics.average_precision_score``.

    Args:
        scores: ``(N,)`` real-valued scores, higher meaning more likely positive.
        targets: ``(N,)`` 0/1 ground truth.

    Returns:
        AP in [0, 1]; NaN when ``targets`` has no positive.
    """
    s, t = _check_pair(scores, targets, ndim=1)
    return float(per_class_ap(s[:, None], t[:, None])[0])


def _ignore_mask(ignore: ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``ignore`` as an ``(N, C)`` bool array of ``shape`` (None when nothing is ignored)."""
    if ignore is None:
        return None
    mask = _as_numpy(ignore, "ignore", 2) != 0
    if mask.shape != shape:
        raise ValueError(f"ignore {mask.shape} and targets {shape} must have the same shape")
    return mask if mask.any() else None


def per_class_ap(
    scores: ArrayLike, targets: ArrayLike, ignore: ArrayLike | None = None
) -> np.ndarray:
    """AP of every class, as ``sklearn.metrics.average_precision_score(average=None)``.

    Args:
        scores: ``(N, C)`` scores.
        targets: ``(N, C)`` 0/1 ground truth.
        ignore: optional ``(N, C)`` bool mask; class c's AP uses only the rows where
            ``ignore[:, c]`` is False.

    Returns:
        ``(C,)`` AP in [0, 1], NaN for classes without a (kept) positive (scikit-learn is not
        asked about them: it would warn and return 0).
    """
    s, t = _check_pair(scores, targets, ndim=2)
    mask = _ignore_mask(ignore, t.shape)
    if mask is not None:  # each class on its own kept rows
        return np.array([per_class_ap(s[~mask[:, c], c:c + 1], t[~mask[:, c], c:c + 1])[0]
                         for c in range(s.shape[1])])
    ap = np.full(s.shape[1], np.nan)
    for c in np.flatnonzero(t.any(0)):
        ap[c] = _binary_ap(t[:, c], s[:, c])
    return ap


def mean_ap(
    scores: ArrayLike,
    targets: ArrayLike,
    groups: Mapping[str, Sequence[int]] | None = None,
    ignore: ArrayLike | None = None,
) -> dict[str, float]:
    """mAP in percent over the classes with a positive, in total and per class group.

    Args:
        scores: ``(N, C)`` scores.
        targets: ``(N, C)`` 0/1 ground truth.
        groups: optional group name -> class indices (e.g. ``head`` / ``medium`` / ``tail``).
        ignore: optional ``(N, C)`` bool mask of entries left out of their class's AP.

    Returns:
        ``{"mAP": ..., "mAP_<name>": ... for each group}``; a value is NaN when none of its
        classes has a positive.
    """
    ap = per_class_ap(scores, targets, ignore)
    out = {"mAP": _percent_mean(ap)}
    for name, classes in (groups or {}).items():
        out[f"mAP_{name}"] = _percent_mean(ap[np.asarray(classes, dtype=np.int64)])
    return out


def _f1(precision: float, recall: float) -> float:
    return float(_safe_div(2.0 * precision * recall, precision + recall))


def f1_scores(probs: ArrayLike, targets: ArrayLike, threshold: float = 0.5,
              ignore: ArrayLike | None = None) -> dict[str, float]:
    """Class-averaged (C*) and overall (O*) precision, recall and F1 at ``probs >= threshold``.

    CP and CR average the per-class precision and recall over all C classes, a class with no
    predicted (resp. true) positive counting 0 (``sklearn`` macro averaging with
    ``zero_division=0``); OP and OR pool all N x C decisions (micro averaging). Then
    ``CF1 = 2 CP CR / (CP + CR)`` and ``OF1 = 2 OP OR / (OP + OR)``, 0 when both terms are 0.

    Args:
        probs: ``(N, C)`` probabilities.
        targets: ``(N, C)`` 0/1 ground truth.
        threshold: a label is predicted positive when its probability is ``>= threshold``.
        ignore: optional ``(N, C)`` bool mask of entries counted nowhere.

    Returns:
        ``CP``, ``CR``, ``CF1``, ``OP``, ``OR``, ``OF1``, in percent.
    """
    p, t = _check_pair(probs, targets, ndim=2)
    mask = _ignore_mask(ignore, t.shape)
    pred = (p >= threshold).astype(np.float64)
    if mask is not None:
        pred, t = np.where(mask, 0.0, pred), np.where(mask, 0.0, t)
    tp, n_pred, n_true = (pred * t).sum(0), pred.sum(0), t.sum(0)
    cp = float(_safe_div(tp, n_pred).mean())
    cr = float(_safe_div(tp, n_true).mean())
    op = float(_safe_div(tp.sum(), n_pred.sum()))
    o_r = float(_safe_div(tp.sum(), n_true.sum()))
    values = {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": o_r, "OF1": _f1(op, o_r)}
    return {key: 100.0 * value for key, value in values.items()}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def evaluate(
    scores: ArrayLike,
    targets: ArrayLike,
    groups: Mapping[str, Sequence[int]] | None = None,
    threshold: float = 0.5,
    ignore: ArrayLike | None = None,
) -> dict[str, float]:
    """Every reported metric of one evaluation pass.

    Args:
        scores: ``(N, C)`` logits; mAP uses them as they are, F1 uses ``sigmoid(scores)``.
        targets: ``(N, C)`` 0/1 ground truth.
        groups: optional group name -> class indices, giving ``mAP_<name>`` entries.
        threshold: probability threshold of the F1 metrics.
        ignore: optional ``(N, C)`` bool mask of entries excluded from AP and F1.

    Returns:
        ``mAP``, ``mAP_<group>`` for each group, ``CF1``, ``OF1``, ``CP``, ``CR``, ``OP``,
        ``OR``, all in percent.
    """
    s, t = _check_pair(scores, targets, ndim=2)
    f1 = f1_scores(_sigmoid(s), t, threshold, ignore)
    out = mean_ap(s, t, groups, ignore)
    out.update({key: f1[key] for key in ("CF1", "OF1", "CP", "CR", "OP", "OR")})
    return out
