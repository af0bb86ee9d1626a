"""Memory of a search: peak RSS per trial and of the whole local cluster vs the machine.

Starts a local Ray cluster (as ``python -m tuner.search`` does, dashboard included), samples
the proportional set size (PSS: shared pages split between the processes that map them, so
the sum over processes is what the machine really holds) of this process and every process
below it (GCS, raylet, dashboard, workers, Ray Data tasks) twice a second, first for a few
seconds idle (the baseline of this run), then during one search with ``--concurrency`` trials
at once. Prints the idle and peak totals, the search's share of the machine's memory, and
each trial's own peak RSS (``peak_rss_mb`` of its reports).

    python benchmarks/memory.py --method hill --concurrency 2

Linux only (reads ``/proc``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from _search import run_space


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_pss_mb(root: int) -> float:
    """PSS (MiB) of ``root`` and all its descendants."""
    tree, todo, total = _children(), [root], 0.0
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
        except (OSError, StopIteration):
            continue
    return total


class Sampler(threading.Thread):
    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period, self.peak, self.samples, self.stop = period, 0.0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_pss_mb(os.getpid()))
            self.samples += 1
            self.stop.wait(self.period)


def machine_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="hill")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--idle-s", type=float, default=5.0, help="idle sampling before the search")
    p.add_argument("--data-dir", help="prepared DigitsMLT (default: the cache)")
    args = p.parse_args()

    import ray

    from tuner import search

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2 * args.concurrency),
             include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=search.free_port())
    idle = Sampler()
    idle.start()
    time.sleep(args.idle_s)
    idle.stop.set()
    idle.join()

    def edit(space: dict) -> None:
        space["asha"]["max_epochs"] = args.epochs
        space["asha"]["grace_period"] = min(space["asha"]["grace_period"], args.epochs)
        space["search"].update(num_trials=args.trials, max_concurrent=args.concurrency, seed=0)

    busy = Sampler()
    busy.start()
    with tempfile.TemporaryDirectory() as tmp:
        trials = run_space(args.method, "memory", edit, Path(tmp), args.data_dir)
    busy.stop.set()
    busy.join()
    per_trial = trials.groupby("trial_id")["peak_rss_mb"].max()
    total = machine_mb()
    print(f"{args.method}: {len(per_trial)} trials, {args.concurrency} at a time, "
          f"{busy.samples} samples")
    print(f"peak RSS per trial process: {per_trial.min():.0f}-{per_trial.max():.0f} MiB "
          f"(median {per_trial.median():.0f})")
    print(f"whole cluster (PSS, driver included): idle {idle.peak:.0f} MiB (baseline), peak "
          f"during the search {busy.peak:.0f} MiB, {busy.peak / idle.peak:.2f}x idle; "
          f"{100 * busy.peak / total:.1f}% of this machine's {total / 1024:.1f} GiB")


if __name__ == "__main__":
    main()
