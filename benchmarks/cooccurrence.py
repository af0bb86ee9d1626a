"""Class co-occurrence of DigitsMLT's training split next to COCO-MLT's and VOC-MLT's.

Reads the real benchmarks' training lists from a folder laid out like the shared benchmark
files (``coco_mlt/coco_lt_train.txt``, ``voc_mlt/voc_lt_train.txt``; a missing one is left
out) and builds DigitsMLT in memory. Prints :func:`tuner.data.cooccurrence.cooccurrence_stats`
for each: quantiles of ``P(j | i)`` over ordered class pairs, their spread, the share of pairs
that never co-occur, and quantiles of the lift ``P(j | i) / P(j)``.

    python benchmarks/cooccurrence.py PATH/TO/benchmarks
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tuner.data.cooccurrence import cooccurrence_stats
from tuner.data.digits import DigitsConfig, build_digits_mlt
from tuner.data.importers import read_space_list

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", nargs="?", type=Path,
                   help="folder with coco_mlt/ and voc_mlt/ (the shared benchmark files)")
    p.add_argument("--seed", type=int, default=0, help="DigitsMLT build seed")
    args = p.parse_args()
    if args.folder is not None and not args.folder.is_dir():
        raise SystemExit(f"{args.folder} is not a folder; pass the one holding coco_mlt/ and "
                         "voc_mlt/")
    rows = {name: cooccurrence_stats(y) for name, y in label_matrices(args.folder, args.seed).items()}
    print(f"| statistic | {' | '.join(rows)} |")
    print(f"|---|{'---|' * len(rows)}")
    for col in COLUMNS:
        cells = [f"{r[col]:.0f}" if col in ("images", "classes") else f"{r[col]:.3f}"
                 for r in rows.values()]
        print(f"| {col} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
