"""Class co-occurrence of DigitsMLT's training split next to COCO-MLT's and VOC-MLT's.

Reads the real benchmarks' training lists from a folder laid out like the shared benchmark
files (``coco_mlt/coco_lt_train.txt``, ``voc_mlt/voc_lt_train.txt``; a missing one is left
out) and builds DigitsMLT in memory. Prints :func:`tuner.data.cooccurrence.cooccurrence_stats`
for each: quantiles of ``P(j | i)`` over ordered class pairs, their spread, the share of pairs
that never co-occur, and quantiles of the lift ``P(j | i) / P(j)``.

A second table puts the missing-label regime next to the papers': how often an unobserved
label is a missing positive (:func:`tuner.data.corruption.unobserved_positive_share`) when
the platform removes ``--missing-rate`` of each matrix's positives (a missing view drawn with
seed 0), and in Hill/SPLC's released COCO-2014 "40% left" list against the full one
(``coco2014_missing/``, when the folder has it).

    python benchmarks/cooccurrence.py PATH/TO/benchmarks [--missing-rate 0.6]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tuner.data.cooccurrence import cooccurrence_stats
from tuner.data.corruption import drop_positives, unobserved_positive_share
from tuner.data.digits import DigitsConfig, build_digits_mlt
from tuner.data.importers import read_comma_list, read_space_list

REAL = {"COCO-MLT": ("coco_mlt/coco_lt_train.txt", 80), "VOC-MLT": ("voc_mlt/voc_lt_train.txt", 20)}
COLUMNS = ("images", "classes", "labels_per_image", "p_q10", "p_q25", "p_q50", "p_q75", "p_q90",
           "p_std", "zero_share", "lift_q10", "lift_q50", "lift_q90")


def label_matrices(folder: Path | None, seed: int) -> dict[str, np.ndarray]:
    """Training label matrices of DigitsMLT (seed ``seed``) and of the real lists found."""
    splits, _ = build_digits_mlt(DigitsConfig(seed=seed))
    out = {f"DigitsMLT s{seed}": splits["train"].labels}
    for name, (rel, classes) in REAL.items():
        if folder is not None and (folder / rel).is_file():
            out[name] = read_space_list(folder / rel, classes).labels
    return out


COCO_2014 = ("coco2014_missing/coco_train_full.txt", "coco2014_missing/coco_train_0.4left.txt")


def released_missing_view(folder: Path | None) -> tuple[np.ndarray, np.ndarray] | None:
    """COCO-2014's full labels and Hill/SPLC's released "40% left" labels, rows aligned."""
    if folder is None or not all((folder / rel).is_file() for rel in COCO_2014):
        return None
    full, part = (read_comma_list(folder / rel, 80) for rel in COCO_2014)
    row = {path: i for i, path in enumerate(full.paths)}
    return full.labels[[row[path] for path in part.paths]], part.labels


def missing_rows(matrices: dict[str, np.ndarray], q: float,
                 folder: Path | None) -> dict[str, dict[str, float]]:
    views = {f"{name}, q={q}": (y, drop_positives(y, q, np.random.default_rng(0))[0])
             for name, y in matrices.items()}
    released = released_missing_view(folder)
    if released is not None:
        views["COCO-2014 40% left (released)"] = released
    return {name: {"kept": observed.sum() / y.sum(), **unobserved_positive_share(y, observed)}
            for name, (y, observed) in views.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", nargs="?", type=Path,
                   help="folder with coco_mlt/ and voc_mlt/ (the shared benchmark files)")
    p.add_argument("--seed", type=int, default=0, help="DigitsMLT build seed")
    p.add_argument("--missing-rate", type=float, default=0.6,
                   help="share of positives removed in the second table (the shipped spaces: 0.6)")
    args = p.parse_args()
    if args.folder is not None and not args.folder.is_dir():
        raise SystemExit(f"{args.folder} is not a folder; pass the one holding coco_mlt/ and "
                         "voc_mlt/")
    matrices = label_matrices(args.folder, args.seed)
    rows = {name: cooccurrence_stats(y) for name, y in matrices.items()}
    print(f"| statistic | {' | '.join(rows)} |")
    print(f"|---|{'---|' * len(rows)}")
    for col in COLUMNS:
        cells = [f"{r[col]:.0f}" if col in ("images", "classes") else f"{r[col]:.3f}"
                 for r in rows.values()]
        print(f"| {col} | {' | '.join(cells)} |")
    print("\nMissing positives among unobserved labels (share of the observed-0 entries that are "
          "true positives):\n")
    print("| view | positives kept | all | median class | most frequent class (prevalence) |")
    print("|---|---|---|---|---|")
    for name, r in missing_rows(matrices, args.missing_rate, args.folder).items():
        print(f"| {name} | {r['kept']:.3f} | {r['all']:.3f} | {r['median_class']:.3f} | "
              f"{r['head_class']:.3f} ({r['head_prevalence']:.2f}) |")


if __name__ == "__main__":
    main()
