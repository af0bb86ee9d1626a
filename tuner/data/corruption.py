"""Training-label corruption views: missing labels, candidate (partial) labels, clean.

Each view is generated once per (benchmark, kind, rate, seed) by :func:`make_view` and cached
as a label table beside the shards (see :mod:`tuner.data.prepared`); trials never re-sample it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from tuner.errors import ConfigError

KINDS = ("clean", "missing", "candidate")
_KIND_CODE = {"clean": 0, "missing": 1, "candidate": 2}


@dataclass(frozen=True)
class ViewSpec:
    """A corruption view: ``kind`` with ``rate`` (q for missing, rho for candidate) and ``seed``."""

    kind: str = "clean"
    rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "rate", float(self.rate))
            object.__setattr__(self, "seed", int(self.seed))
        except (TypeError, ValueError):
            raise ConfigError(f"label rate and seed must be numbers, got rate={self.rate!r}, "
                              f"seed={self.seed!r}") from None
        if self.kind not in KINDS:
            raise ConfigError(f"label regime must be one of {list(KINDS)}, got {self.kind!r}")
        if not 0.0 <= float(self.rate) < 1.0:
            raise ConfigError(f"label rate must be in [0, 1), got rate={self.rate!r}")
        if self.kind == "clean" and self.rate != 0:
            raise ConfigError(f"the clean regime takes no rate, got rate={self.rate!r}; use 0")

    @property
    def name(self) -> str:
        """File-safe view name, e.g. ``missing-q0.6-s0``."""
        if self.kind == "clean":
            return "clean"
        letter = "q" if self.kind == "missing" else "rho"
        return f"{self.kind}-{letter}{self.rate:g}-s{self.seed}"

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, _KIND_CODE[self.kind], round(self.rate * 1e6)])


def _kept_fraction(drop: float, k: np.ndarray) -> float:
    """Expected kept share of positives when each is dropped w.p. ``drop``, >= 1 kept per image."""
    k = k[k > 0]
    expected = k * (1 - drop) + drop**k  # the all-dropped case restores exactly one label
    return float(expected.sum() / k.sum())


def calibrated_drop(q: float, positives_per_image: np.ndarray) -> float:
    """Per-label drop probability whose expected kept share, with the keep-one rule, is 1 - q.

    The literal rule "drop each positive w.p. q, keep at least one" keeps more than 1 - q of
    the labels on data with few labels per image (single-label images always keep theirs).
    Bisection finds the drop probability that keeps 1 - q overall; when even dropping
    everything but one label per image keeps more, that maximum is used with a warning.
    """
    k = np.asarray(positives_per_image)
    if q == 0 or k.sum() == 0:
        return 0.0
    target = 1.0 - q
    if _kept_fraction(1.0, k) > target:
        warnings.warn(
            f"missing rate q={q} is unreachable with at least one label kept per image; "
            f"keeping one label per image ({_kept_fraction(1.0, k):.1%} of labels)",
            stacklevel=2,
        )
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _kept_fraction(mid, k) > target else (lo, mid)
    return (lo + hi) / 2


def drop_positives(
    labels: np.ndarray, q: float, rng: np.random.Generator, calibrate: bool = True
) -> tuple[np.ndarray, float]:
    """Missing labels: drop each positive independently, keeping at least one per image.

    Args:
        labels: ``(N, C)`` 0/1 true labels.
        q: target share of positives dropped.
        rng: the view's generator.
        calibrate: choose the per-label drop probability so that about ``1 - q`` of all
            positives survive the keep-one rule (see :func:`calibrated_drop`); with False
            each positive is dropped with probability exactly ``q``.

    Returns:
        The observed ``(N, C)`` uint8 labels and the per-label drop probability used.
    """
    labels = np.asarray(labels, dtype=np.uint8)
    k = labels.sum(1)
    drop = calibrated_drop(q, k) if calibrate else q
    keep = (rng.random(labels.shape) >= drop) & (labels == 1)
    emptied = np.flatnonzero((keep.sum(1) == 0) & (k > 0))
    for i in emptied:  # restore one random true positive
        keep[i, rng.choice(np.flatnonzero(labels[i]))] = True
    return keep.astype(np.uint8), float(drop)


def add_candidates(labels: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Candidate labels: each true negative becomes a candidate w.p. ``rho``; positives kept."""
    labels = np.asarray(labels, dtype=np.uint8)
    flips = (rng.random(labels.shape) < rho) & (labels == 0)
    return (labels | flips).astype(np.uint8)


def unobserved_positive_share(labels: np.ndarray, observed: np.ndarray) -> dict[str, float]:
    """How often an unobserved label is a missing positive, in a missing-label view.

    Methods that treat unobserved labels as negatives, or correct confident ones to positive
    (SPLC), face this base rate: the share of the ``observed == 0`` entries whose true label
    is 1, over all entries (``all``), for the median class (``median_class``) and for the most
    frequent class (``head_class``, its prevalence ``head_prevalence``).
    """
    y = np.asarray(labels).astype(bool)
    seen = np.asarray(observed).astype(bool)
    if y.shape != seen.shape or (seen & ~y).any():
        raise ValueError("observed must be a subset of labels, of the same (N, C) shape")
    unobserved = ~seen
    missing = y & unobserved
    per_class = missing.sum(0) / np.maximum(unobserved.sum(0), 1)
    prevalence = y.mean(0)
    head = int(np.argmax(prevalence))
    return {"all": float(missing.sum() / max(unobserved.sum(), 1)),
            "median_class": float(np.median(per_class)),
            "head_class": float(per_class[head]),
            "head_prevalence": float(prevalence[head])}


def make_view(labels: np.ndarray, spec: ViewSpec) -> tuple[np.ndarray, dict[str, float]]:
    """The observed training labels of ``spec`` and facts about them for the manifest."""
    rng = spec.rng()
    info: dict[str, float] = {}
    if spec.kind == "missing":
        observed, drop = drop_positives(labels, spec.rate, rng)
        info["drop_probability"] = drop
    elif spec.kind == "candidate":
        observed = add_candidates(labels, spec.rate, rng)
    else:
        observed = np.asarray(labels, dtype=np.uint8).copy()
    info["labels_per_image"] = float(observed.sum(1).mean())
    info["kept_positive_share"] = float((observed & labels).sum() / max(labels.sum(), 1))
    return observed, info
