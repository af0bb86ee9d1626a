"""DigitsMLT: the embedded long-tailed multi-label benchmark, built from scikit-learn's digits.

Each image is a 3x3 mosaic of 16x16 cells (48x48 grey pixels): some cells hold a handwritten
digit (an 8x8 scikit-learn digit upscaled, slightly shifted and noised), the others are blank.
The labels are the digits an image shows (10 classes, 1 to 4 labels per image).

* Training class counts follow DBL's COCO-MLT construction: a Pareto(b=6) profile sampled on a
  linear grid of its 0..0.99 quantiles and scaled to [``min_count``, ``max_count``] (default
  800 / 10, ratio 80). Images are drawn until every class reaches its quota exactly, each
  image's classes chosen with probability proportional to the classes' remaining quota. Which
  digit gets which count is a seeded permutation.
* Validation and test images draw their classes uniformly, so they are close to balanced.
* The 1,797 source digits are split 60/20/20 (stratified by digit) into disjoint train / val /
  test pools, so no source digit is seen in both training and evaluation.
* Head / medium / tail use DBL's thresholds (100 / 20 at a maximum of 1,200) scaled to this
  dataset's maximum count; they are written to the manifest.

Everything is deterministic for a given seed. No network is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

GRID = 3
CELL = 16
NUM_CLASSES = 10
LABELS_PER_IMAGE = (1, 2, 3, 4)
LABELS_PER_IMAGE_P = (0.25, 0.35, 0.25, 0.15)


@dataclass(frozen=True)
class DigitsConfig:
    """Build settings of DigitsMLT (all recorded in the manifest)."""

    seed: int = 0
    max_count: int = 800
    min_count: int = 10
    num_val: int = 500
    num_test: int = 500
    noise: float = 10.0


def pareto_profile(num_classes: int, max_count: int, min_count: int, b: float = 6.0) -> np.ndarray:
    """DBL's reference long-tail profile: integer class counts, largest first."""
    x = np.linspace(stats.pareto.ppf(0.0, b), stats.pareto.ppf(0.99, b), num_classes)
    y = stats.pareto.pdf(x, b)
    scaled = (y - y.min()) / (y.max() - y.min()) * (max_count - min_count) + min_count
    return np.round(scaled).astype(np.int64)


def scaled_thresholds(max_count: int) -> tuple[int, int]:
    """DBL's head >= 100 / tail < 20 thresholds (COCO-MLT max 1,200) scaled to ``max_count``."""
    scale = max_count / 1200.0
    return max(2, round(100 * scale)), max(1, round(20 * scale))


def _split_pools(targets: np.ndarray, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Disjoint 60/20/20 pools of source-digit indices, per digit class."""
    pools: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n_train, n_val = int(0.6 * len(idx)), int(0.2 * len(idx))
        pools["train"].append(idx[:n_train])
        pools["val"].append(idx[n_train : n_train + n_val])
        pools["test"].append(idx[n_train + n_val :])
    return pools


def _quota_label_sets(quota: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Draw label sets until every class has exactly its quota of images."""
    remaining = quota.astype(np.int64).copy()
    sets = []
    while remaining.sum() > 0:
        avail = np.flatnonzero(remaining > 0)
        k = min(int(rng.choice(LABELS_PER_IMAGE, p=LABELS_PER_IMAGE_P)), len(avail))
        p = remaining[avail] / remaining[avail].sum()
        chosen = np.sort(rng.choice(avail, size=k, replace=False, p=p))
        remaining[chosen] -= 1
        sets.append(chosen)
    return sets


def _uniform_label_sets(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    sizes = rng.choice(LABELS_PER_IMAGE, size=n, p=LABELS_PER_IMAGE_P)
    return [np.sort(rng.choice(NUM_CLASSES, size=k, replace=False)) for k in sizes]


def _render(
    label_set: np.ndarray,
    pool: list[np.ndarray],
    digits: np.ndarray,
    rng: np.random.Generator,
    noise: float,
) -> tuple[np.ndarray, list[int]]:
    """One 48x48 uint8 mosaic showing one source digit of each class in ``label_set``."""
    canvas = np.zeros((GRID * CELL, GRID * CELL), dtype=np.float32)
    cells = rng.choice(GRID * GRID, size=len(label_set), replace=False)
    sources = []
    for cls, cell in zip(label_set, cells):
        src = int(rng.choice(pool[cls]))
        sources.append(src)
        glyph = np.kron(digits[src], np.ones((2, 2), dtype=np.float32)) * (255.0 / 16.0)
        dy, dx = rng.integers(-1, 2, size=2)
        glyph = np.roll(glyph, (int(dy), int(dx)), axis=(0, 1))
        r, c = divmod(int(cell), GRID)
        canvas[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = glyph
    canvas += rng.normal(0.0, noise, canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8), sources


@dataclass
class BuiltSplit:
    """Images ``(N, 48, 48)`` uint8, labels ``(N, 10)`` uint8, source-digit ids per image."""

    images: np.ndarray
    labels: np.ndarray
    sources: list[list[int]]


def build_digits_mlt(config: DigitsConfig) -> tuple[dict[str, BuiltSplit], dict[str, object]]:
    """Build all three splits; returns the splits and build facts for the manifest."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(config.seed)
    pools = _split_pools(data.target, rng)
    profile = pareto_profile(NUM_CLASSES, config.max_count, config.min_count)
    quota = np.empty(NUM_CLASSES, dtype=np.int64)
    quota[rng.permutation(NUM_CLASSES)] = profile
    label_sets = {
        "train": _quota_label_sets(quota, rng),
        "val": _uniform_label_sets(config.num_val, rng),
        "test": _uniform_label_sets(config.num_test, rng),
    }
    splits = {}
    for split, sets in label_sets.items():
        order = rng.permutation(len(sets))  # interleave head-heavy and mixed images
        rendered = [_render(sets[i], pools[split], data.images, rng, config.noise) for i in order]
        labels = np.zeros((len(sets), NUM_CLASSES), dtype=np.uint8)
        for row, i in enumerate(order):
            labels[row, sets[i]] = 1
        splits[split] = BuiltSplit(
            images=np.stack([img for img, _ in rendered]),
            labels=labels,
            sources=[src for _, src in rendered],
        )
    head_min, tail_below = scaled_thresholds(config.max_count)
    facts = {"quota": quota.tolist(), "head_min": head_min, "tail_below": tail_below}
    return splits, facts
