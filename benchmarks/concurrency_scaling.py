"""Concurrency scaling: wall time of one fixed search with 1 vs K trials at once.

Runs the same search (same space, trial count, epochs, sampler seed; ASHA's grace period set
to the full budget so that no trial is stopped and both runs do the same work) on a fresh
local Ray cluster, first with 1 trial at a time (the baseline of this run), then with
``--concurrency`` trials at once, and prints each run's wall time, the summed trial time,
and the speed-up ``wall(1) / wall(K)``.

    python benchmarks/concurrency_scaling.py --method bce --trials 4 --epochs 4 --concurrency 2

On a GPU machine, ``--gpus-per-trial 0.5`` (or 0.25) packs 2 (4) trials per GPU against
``--gpus-per-trial 1`` with the same command.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
from _search import run_space


def run(concurrency: int, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    def edit(space: dict) -> None:
        space["asha"] = {"max_epochs": args.epochs, "grace_period": args.epochs,
                         "reduction_factor": 2}
        space["search"].update(num_trials=args.trials, max_concurrent=concurrency, seed=0)
        space["resources"]["gpus_per_trial"] = args.gpus_per_trial

    start = time.perf_counter()
    trials = run_space(args.method, f"scaling-{concurrency}", edit, tmp, args.data_dir)
    wall = time.perf_counter() - start
    per_trial = trials.groupby("trial_id")["time_total_s"].max()
    return {"concurrency": concurrency, "wall_s": wall, "trial_s_sum": float(per_trial.sum()),
            "trials": len(per_trial), "epochs": int(trials.groupby("trial_id")["epoch"].max().sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="bce")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=2, help="trials at once of the second run")
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--data-dir", help="prepared DigitsMLT (default: the cache)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(1, args, Path(tmp)), run(args.concurrency, args, Path(tmp))]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    base, multi = rows[0]["wall_s"], rows[1]["wall_s"]
    print(f"\nwall time: 1 at a time {base:.1f} s, {args.concurrency} at a time {multi:.1f} s, "
          f"speed-up {base / multi:.2f}x (ideal {args.concurrency}x; epochs run "
          f"{rows[0]['epochs']} vs {rows[1]['epochs']})")


if __name__ == "__main__":
    main()
