"""DigitsMLT: the embedded long-tailed multi-label benchmark, built from scikit-learn's digits.

Each image is a 3x3 mosaic of 8x8 cells (24x24 grey pixels): some cells hold a handwritten
digit (a native 8x8 scikit-learn digit, shifted by up to one pixel and noised), the others are
blank. The labels are the digits an image shows (10 classes, 1 to 9 labels per image).
Version 3 (issue 18) made the images 4x smaller than version 2's 48x48 mosaics of upscaled
digits, so that about the same compute per epoch trains on 2.9x more images (and, at batch
32, 5.8x more optimizer steps), and gave the label sets scene structure; the figures are in
``benchmarks/RESULTS.md`` section 7.

* **Scenes.** Every image belongs to one of 5 latent scene types; a scene is a distribution
  over classes: its 4 *core* classes weigh 1, the others ``off_scene`` (0.03). The classes
  are laid out on a seeded ring and scene ``s`` holds ring positions ``2s .. 2s+3``, so every
  class is core in exactly 2 scenes and ``P(j | i)`` ranges from near 0 (classes that share
  no scene) to high (ring neighbours), as between COCO's classes
  (``benchmarks/cooccurrence.py`` prints both).
* **Long tail.** Training class counts follow a profile with a head plateau,
  ``count_k = max * (min / max) ** ((k / 9) ** 2)`` for rank k = 0..9 (default 1,800 -> 60,
  ratio 30): 1800, 1726, 1522, 1234, 919, 630, 397, 230, 123, 60. DBL's Pareto(b=6) profile,
  used by version 1, is too steep for 10 classes (the head class alone then sits in 90% of
  the images and a split averages 1.75 labels per image, so a missing-label rate of q=0.6
  cannot leave 40% of the positives while keeping one per image). Which digit gets which
  count is a seeded permutation.
* The training split has ``round(max / head_share)`` = 2,571 images (the head class is in
  70% of them, so it has negatives to learn from), about 3.4 labels each. Classes are placed from the most to the least frequent, each
  on exactly its count of images, an image drawn with weight ``affinity(scene, class) /
  (1 + labels so far) ** 2``; an image left without labels takes one over from the image
  with the most.
* Validation and test images (2,000 each: a larger validation split makes the best epoch's
  mAP less noisy) draw a scene uniformly, then 2 to 5 classes without replacement in
  proportion to the scene's weights, so their class marginals are close to balanced.
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

VERSION = 3
#: each generator version's default ``head_share``: a build that records another one is a
#: variant (``tuner.prepare --head-share``), and a rebuild after a version bump keeps it
DEFAULT_HEAD_SHARE = {3: 0.7}
GRID = 3
CELL = 8
#: side of an image in pixels
IMAGE_SIZE = GRID * CELL
NUM_CLASSES = 10
#: label-set sizes of validation / test images and their probabilities
LABELS_PER_IMAGE = (2, 3, 4, 5)
LABELS_PER_IMAGE_P = (0.25, 0.35, 0.25, 0.15)
#: group sizes (head, medium, tail): COCO-MLT's 22 / 33 / 25 of 80 classes scaled to 10
GROUP_SIZES = (3, 4, 3)
#: latent scene types and the ring positions each holds as core classes
NUM_SCENES = 5
SCENE_CORE = 4


@dataclass(frozen=True)
class DigitsConfig:
    """Build settings of DigitsMLT (all recorded in the manifest)."""

    seed: int = 0
    max_count: int = 1800
    min_count: int = 60
    num_val: int = 2000
    num_test: int = 2000
    noise: float = 10.0
    #: share of training images holding the most frequent class (sets the split's size)
    head_share: float = 0.7
    #: weight of a non-core class in a scene (core classes weigh 1)
    off_scene: float = 0.03


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


def scene_affinity(ring: np.ndarray, off_scene: float) -> np.ndarray:
    """``(NUM_SCENES, NUM_CLASSES)`` class weights of the scenes.

    ``ring`` orders the classes on a circle; scene ``s`` weighs the ``SCENE_CORE`` classes at
    ring positions ``2s, ..., 2s + SCENE_CORE - 1`` (mod 10) by 1 and every other class by
    ``off_scene``: each class is core in two scenes and shares one with its ring neighbours.
    """
    affinity = np.full((NUM_SCENES, NUM_CLASSES), off_scene, dtype=np.float64)
    for scene in range(NUM_SCENES):
        positions = (2 * scene + np.arange(SCENE_CORE)) % NUM_CLASSES
        affinity[scene, np.asarray(ring)[positions]] = 1.0
    return affinity


def _quota_label_sets(
    quota: np.ndarray, affinity: np.ndarray, head_share: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """``round(max(quota) / head_share)`` label sets in which class c appears exactly quota[c]
    times, each image of a uniformly drawn scene whose ``affinity`` row weighs the classes."""
    quota = np.asarray(quota, dtype=np.int64)
    n = int(round(quota.max() / head_share))
    scene = rng.integers(len(affinity), size=n)
    member = np.zeros((n, len(quota)), dtype=bool)
    for cls in np.argsort(-quota, kind="stable"):
        sizes = member.sum(1)
        open_rows = np.flatnonzero(sizes < GRID * GRID)
        weights = affinity[scene[open_rows], cls] / (1.0 + sizes[open_rows]) ** 2
        rows = rng.choice(open_rows, size=int(quota[cls]), replace=False, p=weights / weights.sum())
        member[rows, cls] = True
    for row in np.flatnonzero(member.sum(1) == 0):  # move one label from the fullest image
        donor = int(np.argmax(member.sum(1)))
        cls = int(rng.choice(np.flatnonzero(member[donor])))
        member[donor, cls], member[row, cls] = False, True
    return [np.flatnonzero(r) for r in member]


def _scene_label_sets(n: int, affinity: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` evaluation label sets: a uniform scene, then 2-5 classes in proportion to it."""
    sizes = rng.choice(LABELS_PER_IMAGE, size=n, p=LABELS_PER_IMAGE_P)
    scenes = rng.integers(len(affinity), size=n)
    weights = affinity / affinity.sum(1, keepdims=True)
    return [np.sort(rng.choice(NUM_CLASSES, size=k, replace=False, p=weights[s]))
            for k, s in zip(sizes, scenes)]


def _render(
    label_set: np.ndarray,
    pool: list[np.ndarray],
    digits: np.ndarray,
    rng: np.random.Generator,
    noise: float,
) -> tuple[np.ndarray, list[int]]:
    """One 24x24 uint8 mosaic showing one source digit of each class in ``label_set``."""
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    cells = rng.choice(GRID * GRID, size=len(label_set), replace=False)
    sources = []
    for cls, cell in zip(label_set, cells):
        src = int(rng.choice(pool[cls]))
        sources.append(src)
        dy, dx = (int(d) for d in rng.integers(-1, 2, size=2))
        glyph = _shifted(digits[src].astype(np.float32) * (255.0 / 16.0), dy, dx)
        r, c = divmod(int(cell), GRID)
        canvas[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = glyph
    canvas += rng.normal(0.0, noise, canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8), sources


def _shifted(glyph: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``glyph`` moved by ``(dy, dx)`` pixels inside its cell, zero-filled (nothing wraps round
    into the neighbouring side)."""
    out = np.zeros_like(glyph)
    h, w = glyph.shape
    out[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] = \
        glyph[max(0, -dy) : h + min(0, -dy), max(0, -dx) : w + min(0, -dx)]
    return out


@dataclass
class BuiltSplit:
    """Images ``(N, 24, 24)`` uint8, labels ``(N, 10)`` uint8, source-digit ids per image."""

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
    ring = rng.permutation(NUM_CLASSES)
    affinity = scene_affinity(ring, config.off_scene)
    label_sets = {
        "train": _quota_label_sets(quota, affinity, config.head_share, rng),
        "val": _scene_label_sets(config.num_val, affinity, rng),
        "test": _scene_label_sets(config.num_test, affinity, rng),
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
    facts = {"version": VERSION, "quota": quota.tolist(), "scene_ring": ring.tolist(),
             "head_min": head_min, "tail_below": tail_below}
    return splits, facts
