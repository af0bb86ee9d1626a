"""DigitsMLT: the embedded long-tailed multi-label benchmark, built from scikit-learn's digits.

Each image is a 3x3 mosaic of 16x16 cells (48x48 grey pixels): some cells hold a handwritten
digit (an 8x8 scikit-learn digit upscaled, slightly shifted and noised), the others are blank.
The labels are the digits an image shows (10 classes, 1 to 9 labels per image, about 3.9 on
average in training).

* Training class counts follow a long-tailed profile with a head plateau,
  ``count_k = max * (min / max) ** ((k / 9) ** 2)`` for rank k = 0..9 (default 800 -> 10,
  ratio 80): 800, 758, 648, 492, 336, 207, 114, 56, 25, 10. DBL's Pareto(b=6) profile, used
  by version 1, is too steep for 10 classes: the head class alone then sits in 90% of the
  images and the split averages 1.75 labels per image, so a missing-label rate of q=0.6
  cannot leave 40% of the positives while keeping one per image (COCO-MLT has 80 classes and
  2.4 labels per image). Which digit gets which count is a seeded permutation.
* The training split has ``round(max / 0.9)`` images (the head class is in 90% of them).
  Classes are placed from the most to the least frequent, each on exactly its count of
  images, preferring images with fewer labels so far (weights ``1 / (1 + labels) ** 2``);
  an image left without labels takes one over from the image with the most.
* Validation and test images draw 2 to 5 classes uniformly, so they are close to balanced.
* The 1,797 source digits are split 60/20/20 (stratified by digit) into disjoint train / val /
  test pools, so no source digit is seen in both training and evaluation.
* Head / medium / tail: thresholds chosen at the profile's ranks so the groups have 3 / 4 / 3
  classes (COCO-MLT's 22 / 33 / 25 of 80 scaled to 10); they are written to the manifest.

Everything is deterministic for a given seed. No network is needed. ``VERSION`` changes
whenever the images or labels a seed gives change; cached builds of another version are
rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VERSION = 2
GRID = 3
CELL = 16
NUM_CLASSES = 10
#: label-set sizes of validation / test images and their probabilities
LABELS_PER_IMAGE = (2, 3, 4, 5)
LABELS_PER_IMAGE_P = (0.25, 0.35, 0.25, 0.15)
#: share of training images holding the most frequent class
HEAD_SHARE = 0.9
#: group sizes (head, medium, tail): COCO-MLT's 22 / 33 / 25 of 80 classes scaled to 10
GROUP_SIZES = (3, 4, 3)


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
    """DBL's reference long-tail profile (DigitsMLT version 1): class counts, largest first."""
    from scipy import stats  # only needed to build the benchmark; 0.5 s of every worker's import

    x = np.linspace(stats.pareto.ppf(0.0, b), stats.pareto.ppf(0.99, b), num_classes)
    y = stats.pareto.pdf(x, b)
    scaled = (y - y.min()) / (y.max() - y.min()) * (max_count - min_count) + min_count
    return np.round(scaled).astype(np.int64)


def plateau_profile(num_classes: int, max_count: int, min_count: int, power: float = 2.0):
    """Long tail with a head plateau: ``max * (min/max) ** ((k/(C-1)) ** power)``, largest first.

    ``power=1`` is a geometric (exponential) decay; larger powers keep more classes near the
    head before the tail falls off, which is what lets a 10-class split carry several
    labels per image.
    """
    rank = np.arange(num_classes) / max(num_classes - 1, 1)
    counts = max_count * (min_count / max_count) ** (rank**power)
    return np.round(counts).astype(np.int64)


def rank_thresholds(profile: np.ndarray, sizes: tuple[int, int, int] = GROUP_SIZES):
    """``(head_min, tail_below)`` giving the largest ``sizes[0]`` classes to head, smallest
    ``sizes[2]`` to tail (the DBL rule head: count >= head_min, tail: count < tail_below)."""
    ordered = np.sort(np.asarray(profile))[::-1]
    head_min = int(ordered[sizes[0] - 1])
    tail_below = int(ordered[len(ordered) - sizes[2]]) + 1
    return head_min, tail_below


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
    """``round(max(quota) / HEAD_SHARE)`` label sets in which class c appears exactly quota[c] times."""
    quota = np.asarray(quota, dtype=np.int64)
    n = int(round(quota.max() / HEAD_SHARE))
    member = np.zeros((n, len(quota)), dtype=bool)
    for cls in np.argsort(-quota, kind="stable"):
        sizes = member.sum(1)
        open_rows = np.flatnonzero(sizes < GRID * GRID)
        weights = 1.0 / (1.0 + sizes[open_rows]) ** 2
        rows = rng.choice(open_rows, size=int(quota[cls]), replace=False, p=weights / weights.sum())
        member[rows, cls] = True
    for row in np.flatnonzero(member.sum(1) == 0):  # move one label from the fullest image
        donor = int(np.argmax(member.sum(1)))
        cls = int(rng.choice(np.flatnonzero(member[donor])))
        member[donor, cls], member[row, cls] = False, True
    return [np.flatnonzero(r) for r in member]


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
    profile = plateau_profile(NUM_CLASSES, config.max_count, config.min_count)
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
    head_min, tail_below = rank_thresholds(profile)
    facts = {"version": VERSION, "quota": quota.tolist(), "head_min": head_min,
             "tail_below": tail_below}
    return splits, facts
