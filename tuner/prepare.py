"""``python -m tuner.prepare``: write a benchmark's Parquet shards, label views and manifest.

Examples::

    python -m tuner.prepare --benchmark digits-mlt --out data/digits-mlt
    python -m tuner.prepare --benchmark digits-mlt --out data/digits-mlt --view missing:0.6
    python -m tuner.prepare --verify data/digits-mlt
    python -m tuner.prepare --benchmark coco-mlt --images ~/data/coco --out data/coco-mlt
    python -m tuner.prepare --benchmark voc --images ~/data/VOCdevkit/VOC2007 --out data/my-voc \
        --view missing:0.4

Real benchmarks (coco-mlt, voc-mlt, coco2014-missing, voc2007-partial, coco, voc) are described
in docs/benchmarks.md and :mod:`tuner.data.benchmarks`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from tuner.cli import run_cli
from tuner.data.corruption import ViewSpec
from tuner.data.prepared import EMBEDDED, PreparedData, prepare_digits
from tuner.errors import ConfigError


def parse_view(text: str, seed: int) -> ViewSpec:
    """``missing:0.6`` / ``candidate:0.2`` / ``clean`` -> :class:`ViewSpec`."""
    kind, _, rate = text.partition(":")
    try:
        return ViewSpec(kind, float(rate or 0.0), seed)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"--view {text!r}: rate must be a number, e.g. missing:0.6") from None


def build_parser() -> argparse.ArgumentParser:
    from tuner.data.benchmarks import REAL

    p = argparse.ArgumentParser(prog="python -m tuner.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--benchmark", choices=EMBEDDED + REAL, help="benchmark to prepare")
    p.add_argument("--out", help="output directory (must be empty unless --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="build, validation-split and view seed (default 0)")
    p.add_argument("--rows-per-shard", type=int, default=None,
                   help="images per Parquet shard (default 64 for digits-mlt, 256 for real images)")
    p.add_argument(
        "--view",
        action="append",
        default=[],
        help="also cache a label view, e.g. missing:0.6 or candidate:0.2 (repeatable)",
    )
    p.add_argument("--head-share", type=float, default=None, metavar="F",
                   help="digits-mlt: share of training images holding the most frequent class "
                        "(default 0.7; lower = more images with fewer labels each)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a benchmark the platform prepared in --out (only the files it "
                        "wrote are deleted; a folder with other files is refused)")
    p.add_argument("--verify", metavar="DIR", help="only check a prepared DIR's checksums")
    real = p.add_argument_group("real benchmarks (see docs/benchmarks.md)")
    real.add_argument("--images", metavar="DIR", help="image root (COCO root, VOC year folder, ...)")
    real.add_argument("--annotations", metavar="PATH",
                      help="coco: training instances JSON; coco2014-missing: instances_val2014.json "
                           "(default IMAGES/annotations/instances_val2014.json)")
    real.add_argument("--test-annotations", metavar="PATH", help="coco: test instances JSON")
    real.add_argument("--test-images", metavar="DIR", help="test image root (default --images)")
    real.add_argument("--split-files", metavar="DIR",
                      help="read the benchmark's original release files from DIR instead of the "
                           "copies shipped in the package (.pkl/.npy through a restricted loader)")
    real.add_argument("--train-set", default="trainval", help="voc: training image set (trainval)")
    real.add_argument("--test-set", default="test", help="voc: test image set (test)")
    real.add_argument("--voc-difficult", choices=("positive", "negative", "ignore"),
                      default="positive",
                      help="VOC objects marked difficult count as positives (default), as "
                           "negatives, or (ignore) as negatives in training and left out of "
                           "evaluation's AP (the VOC07 protocol)")
    real.add_argument("--image-size", type=int, default=224, help="stored square side in px (224)")
    real.add_argument("--quality", type=int, default=90, help="stored JPEG quality (90)")
    real.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="decoding processes (default: all cores)")
    real.add_argument("--strict", action="store_true", help="fail on an unreadable image (default: skip)")
    real.add_argument("--skip-missing", action="store_true",
                      help="leave out listed images that are not on disk (default: fail)")
    real.add_argument("--val-fraction", type=float, default=0.5,
                      help="share of the test set used as the validation split (0.5)")
    real.add_argument("--val-from-train", type=float, metavar="FRACTION",
                      help="hold the validation split out of the training set instead")
    real.add_argument("--captions", action="store_true", help="coco-mlt/voc-mlt: store TailCLIP captions")
    real.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.verify:
        data = PreparedData(args.verify)
        data.verify()
        print(f"ok: {args.verify} ({data.manifest['benchmark']}, all checksums match)")
        return 0
    if not args.benchmark or not args.out:
        raise ConfigError("--benchmark and --out are required (or --verify DIR)")
    if args.rows_per_shard is not None and args.rows_per_shard < 1:
        raise ConfigError(f"--rows-per-shard must be >= 1, got {args.rows_per_shard}")
    views = [parse_view(v, args.seed) for v in args.view]
    start = time.perf_counter()
    if args.benchmark in EMBEDDED:
        manifest = prepare_digits(
            args.out, seed=args.seed, rows_per_shard=args.rows_per_shard or 64,
            overwrite=args.overwrite, progress=not args.no_progress, head_share=args.head_share,
        )
    else:
        if args.head_share is not None:
            raise ConfigError(f"--head-share is for digits-mlt only, not {args.benchmark}")
        manifest = _prepare_real(args)
    seconds = time.perf_counter() - start
    data = PreparedData(args.out)
    for spec in views:
        entry = data.ensure_view(spec)
        print(f"view {spec.name}: {entry['labels_per_image']:.2f} labels per image")
    counts = manifest["class_counts"]["train"]
    total = sum(manifest["splits"][s]["num_images"] for s in ("train", "val", "test"))
    print(
        f"wrote {args.out}: "
        + ", ".join(f"{s} {manifest['splits'][s]['num_images']}" for s in ("train", "val", "test"))
        + f" images; train class counts {counts} (max/min {max(counts) / max(min(counts), 1):.0f}); "
        + f"{seconds:.1f} s ({1000 * seconds / max(total, 1):.1f} s per 1,000 images)"
    )
    return 0


def _prepare_real(args: argparse.Namespace) -> dict[str, Any]:
    from tuner.data.benchmarks import Options, prepare_real

    for name in ("image_size", "quality", "workers"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.quality <= 95:
        raise ConfigError(f"--quality must be in 1..95 (JPEG), got {args.quality}")
    for flag, value in (("--val-fraction", args.val_fraction), ("--val-from-train", args.val_from_train)):
        if value is not None and not 0.0 < value < 1.0:
            raise ConfigError(f"{flag} must be in (0, 1), got {value}")
    options = Options(
        images=args.images, annotations=args.annotations, test_images=args.test_images,
        test_annotations=args.test_annotations, split_files=args.split_files,
        train_set=args.train_set, test_set=args.test_set, voc_difficult=args.voc_difficult,
        image_size=args.image_size, quality=args.quality, workers=args.workers,
        strict=args.strict, skip_missing=args.skip_missing, val_fraction=args.val_fraction,
        val_from_train=args.val_from_train, seed=args.seed, captions=args.captions,
        rows_per_shard=args.rows_per_shard or 256, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return prepare_real(args.benchmark, args.out, options)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
