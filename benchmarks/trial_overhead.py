"""Trial overhead: start-up and the share of a trial's wall time not spent training or evaluating.

Runs the same small search twice on a fresh local Ray cluster, with 1 and with N Train
workers per trial, and prints per trial:

* ``startup``: seconds from the trial function's start to its first training step (process,
  model and dataset set-up; for N workers also the TorchTrainer and its worker group, each
  worker starting its own share of the stream);
* ``worker_start``: of that, seconds until the Train workers' loop began (N workers: the
  TorchTrainer's controller, placement group and worker processes; 0 for 1 worker);
* ``overhead``: ``1 - (train_time + eval_time) / wall`` over the trial's epochs, where
  ``wall`` is Tune's ``time_total_s`` (set-up, reporting and checkpointing included);

and the ratio of the N-worker start-up to the 1-worker start-up (the baseline of this run).
``--processes`` also prints, per search, the CPU seconds of every kind of process of the
cluster (Ray's ``ray::...`` titles, sampled from ``/proc`` every 0.1 s as ``peers.py`` does)
and how many processes of each kind ran, per trial: what a trial's Train controller, its
helper actors and its workers cost on the machine's cores. Linux only.

    python benchmarks/trial_overhead.py --epochs 4 --trials 2 --workers 2 [--processes]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import pandas as pd
from _search import run_space


def process_table(tree, trials: int) -> pd.DataFrame:
    """CPU seconds (``peers.TreeCpu.by_name``) and process count per kind of process, in all
    and per trial."""
    count = Counter(tree.names.get(pid, "?") for pid in tree.last)
    table = pd.DataFrame({"processes": pd.Series(count), "cpu_s": pd.Series(tree.by_name())})
    table = table.sort_values("cpu_s", ascending=False)
    table["processes_per_trial"] = table["processes"] / trials
    table["cpu_s_per_trial"] = table["cpu_s"] / trials
    return table


def run(method: str, workers: int, args: argparse.Namespace, tmp: Path) -> pd.DataFrame:
    def edit(space: dict) -> None:
        space["asha"] = {"max_epochs": args.epochs, "grace_period": args.epochs,
                         "reduction_factor": 2}
        space["search"].update(num_trials=args.trials, max_concurrent=1, seed=0)
        space["resources"].update(workers_per_trial=workers, cpus_per_worker=1)

    tree = contextlib.nullcontext()
    if args.processes:  # every process the cluster starts inherits the token
        from peers import TOKEN_VAR, TreeCpu

        os.environ[TOKEN_VAR] = token = uuid.uuid4().hex
        tree = TreeCpu(token)
    with tree:
        trials = run_space(method, f"overhead-{workers}w", edit, tmp, args.data_dir)
    if args.processes:
        tree.sample()
        table = process_table(tree, args.trials)
        print(f"\nprocesses of the {workers}-worker search ({args.trials} trials; CPU s):\n"
              + table.to_string(float_format=lambda v: f"{v:.2f}")
              + f"\nall: {table['cpu_s'].sum():.1f} CPU s, "
              f"{table['cpu_s_per_trial'].sum():.1f} per trial\n")
    rows = []
    for trial_id, df in trials.groupby("trial_id"):
        df = df.sort_values("epoch")
        wall = float(df["time_total_s"].iloc[-1])
        busy = float((df["train_time"] + df["eval_time"]).sum())
        rows.append({"workers": workers, "trial": trial_id, "epochs": int(df["epoch"].max()),
                     "wall_s": wall, "startup_s": float(df["startup_time"].iloc[0]),
                     "worker_start_s": float(df["worker_start_time"].iloc[0])
                     if "worker_start_time" in df else 0.0,
                     "overhead": 1.0 - busy / wall})
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="bce")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="workers of the multi-worker run")
    p.add_argument("--data-dir", help="prepared DigitsMLT (default: the cache)")
    p.add_argument("--processes", action="store_true",
                   help="also the CPU seconds and count of each kind of process, per trial")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = pd.concat([run(args.method, 1, args, Path(tmp)),
                           run(args.method, args.workers, args, Path(tmp))])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    by = table.groupby("workers")[["startup_s", "worker_start_s", "overhead", "wall_s"]].mean()
    print("\nmean per trial:\n" + by.to_string(float_format=lambda v: f"{v:.3f}"))
    base, multi = by.loc[1, "startup_s"], by.loc[args.workers, "startup_s"]
    print(f"\nstart-up: 1 worker {base:.1f} s, {args.workers} workers {multi:.1f} s, "
          f"ratio {multi / base:.2f}x")


if __name__ == "__main__":
    main()
