"""Issue 21: each seed method's paper configuration against its platform variants, and against
BCE, on DigitsMLT in the label regime the method targets, all under the same tuning budget.

For every variant this writes a copy of the method's shipped space with the variant's
categorical choices fixed (``OUT/variant-spaces/<group>-<variant>/<method>.yaml``) and runs
``python -m tuner.compare`` on that folder (one search, then the best configuration retrained
with ``--seeds`` seeds and scored on test). BCE runs from the shipped ``bce.yaml`` in the same
regime (``compare`` sets the label view). Each run is its own comparison ``OUT/<group>-<variant>``,
so re-running the same command resumes: finished comparisons are skipped. At the end it writes
``OUT/ablation.md``: per group, mean ± sample std over seeds of test mAP (total / head / medium /
tail), the search's best validation mAP, and each row's gap to the group's reference row
(the paper configuration) with the sum of the two stds as the noise it must beat.

    python benchmarks/ablation.py --out ablation --groups cones,ndlp,comic

The generated spaces and results are outputs: keep them out of git.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("mAP", "mAP_head", "mAP_medium", "mAP_tail")
INTERRUPTED = 130  # tuner.cli.run_cli's status after Ctrl-C: stop, do not start the next run


@dataclass(frozen=True)
class Variant:
    """One row of a group: ``method`` with ``fixed`` params (empty: the shipped space as is)."""

    name: str
    method: str
    fixed: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Group:
    """A method's ablation in its own regime; the first variant is the reference (paper)."""

    name: str
    regime: str
    variants: tuple[Variant, ...]


COMIC_PAPER = {"views": "dataset", "feature_act": "log_softmax", "eval_logits": "balanced",
               "htb": False, "freeze_trunk": False}  # small_cnn is untrained: nothing to freeze
GROUPS = {
    "cones": Group("cones", "candidate:0.2", (
        Variant("sum_power", "cones", {"neg_weight_norm": "sum_power"}),
        Variant("simplex", "cones", {"neg_weight_norm": "simplex"}),
        Variant("bce", "bce"))),
    "ndlp": Group("ndlp", "candidate:0.3", (
        Variant("paper", "ndlp", {"pseudo_rule": "paper"}),
        Variant("bce", "bce"),  # before the variants: the against-BCE answer needs only it
        Variant("share", "ndlp", {"pseudo_rule": "share"}),
        Variant("scaled", "ndlp", {"pseudo_rule": "scaled"}))),
    "comic": Group("comic", "missing:0.6", (
        Variant("paper", "comic", COMIC_PAPER),
        Variant("bce", "bce"),
        # each platform variant: the paper configuration with one choice changed
        Variant("batch_views", "comic", {**COMIC_PAPER, "views": "batch"}),
        Variant("ensemble", "comic", {**COMIC_PAPER, "eval_logits": "ensemble"}),
        Variant("relu", "comic", {**COMIC_PAPER, "feature_act": "relu"}),
        Variant("htb", "comic", {**COMIC_PAPER, "htb": True}))),
}


def write_space(variant: Variant, folder: Path) -> Path:
    """The method's shipped space with ``variant.fixed`` as constants, in ``folder``."""
    space = yaml.load((ROOT / "search_spaces" / f"{variant.method}.yaml").read_text(),
                      Loader=yaml.SafeLoader)
    unknown = sorted(set(variant.fixed) - set(space.get("params") or {}))
    if unknown:
        raise KeyError(f"{variant.method}.yaml has no params {unknown}; fix GROUPS in {__file__}")
    space["params"].update(variant.fixed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{variant.method}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))  # named bounds need file order
    return path


def run_variant(group: Group, variant: Variant, args: argparse.Namespace) -> int:
    """One ``tuner.compare`` run (resumed when its folder exists); its exit status."""
    from tuner import compare

    spaces = ROOT / "search_spaces"
    if variant.fixed:
        spaces = write_space(variant, args.out / "variant-spaces" / f"{group.name}-{variant.name}").parent
    argv = ["--methods", variant.method, "--label-regime", group.regime,
            "--trials", str(args.trials), "--epochs", str(args.epochs),
            "--grace-period", str(args.grace_period), "--seeds", str(args.seeds),
            "--concurrency", str(args.concurrency), "--spaces", str(spaces),
            "--out", str(args.out), "--name", f"{group.name}-{variant.name}"]
    if args.num_cpus:
        argv += ["--num-cpus", str(args.num_cpus)]
    print(f"[ablation] python -m tuner.compare {' '.join(argv)}", flush=True)
    return compare.main(argv)


def group_rows(group: Group, out: Path) -> pd.DataFrame:
    """One row per variant from its ``comparison.csv`` (missing ones stay empty)."""
    rows = []
    for variant in group.variants:
        csv = out / f"{group.name}-{variant.name}" / "comparison.csv"
        row: dict[str, Any] = {"variant": variant.name}
        if csv.is_file():
            table = pd.read_csv(csv)
            row.update(table[table["method"] == variant.method].iloc[0].to_dict())
        rows.append(row)
    return pd.DataFrame(rows)


def _pm(row: pd.Series, key: str) -> str:
    mean, std = row.get(f"{key}_mean", math.nan), row.get(f"{key}_std", math.nan)
    return "–" if pd.isna(mean) else f"{mean:.2f} ± {std:.2f}"


def _gap(row: pd.Series, ref: pd.Series) -> str:
    """Gap of total mAP to the reference, the noise (sum of stds) and the verdict."""
    gap = row.get("mAP_mean", math.nan) - ref.get("mAP_mean", math.nan)
    noise = row.get("mAP_std", math.nan) + ref.get("mAP_std", math.nan)
    if pd.isna(gap) or pd.isna(noise):
        return "–"
    verdict = "beyond noise" if abs(gap) > noise else "within noise"
    return f"{gap:+.2f} (noise {noise:.2f}: {verdict})"


def group_markdown(group: Group, table: pd.DataFrame) -> str:
    """A group's table; the first row is the reference of every gap."""
    ref = table.iloc[0]
    lines = [f"### {group.name}, `{group.regime}` (reference: {group.variants[0].name})", "",
             "| variant | mAP | head | medium | tail | search val mAP | seeds | gap to reference |",
             "|---|---|---|---|---|---|---|---|"]
    for i, row in table.iterrows():
        val, seeds = row.get("search_val_mAP", math.nan), row.get("seeds", math.nan)
        lines.append(f"| {row['variant']} | " + " | ".join(_pm(row, k) for k in METRICS)
                     + f" | {'–' if pd.isna(val) else f'{val:.2f}'}"
                     + f" | {'–' if pd.isna(seeds) else int(seeds)}"
                     + f" | {'reference' if i == 0 else _gap(row, ref)} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("ablation"), help="results folder")
    p.add_argument("--groups", default="cones,ndlp,comic", help=f"of {','.join(GROUPS)}")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--grace-period", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--num-cpus", type=int, help="logical CPUs of each local Ray cluster")
    p.add_argument("--report-only", action="store_true", help="only write ablation.md")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out = args.out.resolve()
    names = [n.strip() for n in args.groups.split(",") if n.strip()]
    bad = [n for n in names if n not in GROUPS]
    if bad:
        sys.exit(f"unknown --groups {bad}; choose from {','.join(GROUPS)}")
    failed = []
    for group in (GROUPS[n] for n in names):
        for variant in group.variants:
            code = 0 if args.report_only else run_variant(group, variant, args)
            if code == INTERRUPTED:
                return code
            if code != 0:
                failed.append(f"{group.name}-{variant.name}")
    text = "\n".join(group_markdown(GROUPS[n], group_rows(GROUPS[n], args.out)) for n in names)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.md").write_text(text)
    print(text)
    if failed:
        print(f"[ablation] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
