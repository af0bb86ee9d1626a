"""``python -m tuner.prepare``: write a benchmark's Parquet shards, label views and manifest.

Examples::

    python -m tuner.prepare --benchmark digits-mlt --out data/digits-mlt
    python -m tuner.prepare --benchmark digits-mlt --out data/digits-mlt --view missing:0.6
    python -m tuner.prepare --verify data/digits-mlt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
    p = argparse.ArgumentParser(prog="python -m tuner.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--benchmark", choices=EMBEDDED, help="benchmark to prepare")
    p.add_argument("--out", help="output directory (must be empty unless --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="build and view seed (default 0)")
    p.add_argument("--rows-per-shard", type=int, default=64, help="images per Parquet shard")
    p.add_argument(
        "--view",
        action="append",
        default=[],
        help="also cache a label view, e.g. missing:0.6 or candidate:0.2 (repeatable)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--verify", metavar="DIR", help="only check a prepared DIR's checksums")
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
    if args.rows_per_shard < 1:
        raise ConfigError(f"--rows-per-shard must be >= 1, got {args.rows_per_shard}")
    views = [parse_view(v, args.seed) for v in args.view]
    manifest = prepare_digits(
        args.out, seed=args.seed, rows_per_shard=args.rows_per_shard, overwrite=args.overwrite
    )
    data = PreparedData(args.out)
    for spec in views:
        entry = data.ensure_view(spec)
        print(f"view {spec.name}: {entry['labels_per_image']:.2f} labels per image")
    counts = manifest["class_counts"]["train"]
    print(
        f"wrote {args.out}: "
        + ", ".join(f"{s} {manifest['splits'][s]['num_images']}" for s in ("train", "val", "test"))
        + f" images; train class counts {counts} (max/min {max(counts) / max(min(counts), 1):.0f})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
