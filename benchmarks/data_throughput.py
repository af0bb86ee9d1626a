"""Images/s of the Ray Data training stream vs a plain torch DataLoader over the same shards.

Both paths read the same Parquet shards and run the same decode + augmentation
(:class:`tuner.data.stream.Decoder`, ``"shift"``) in the same number of decode processes
(``--cpus``), and hand ``(B, 3, S, S)`` uint8 torch batches with a shuffled order to the
consumer, which only counts them:

* DataLoader: a map-style dataset over the shards' encoded bytes (read into memory once,
  outside the timing), ``shuffle=True``, ``num_workers=--cpus`` persistent workers that decode
  each batch in ``collate_fn``;
* Ray Data, one execution (what a single-worker trial runs): ``EpochStream`` over
  ``epochs_dataset`` + ``iter_train_batches``: one Ray Data execution for a round's epochs;
* Ray Data, an execution per epoch: ``train_dataset`` + ``iter_train_batches`` (the input
  of Train's ``streaming_split``, which multi-worker trials used until 2026-12-01; each
  worker now runs the one-execution stream over its share of every epoch);

both in a local Ray started here with ``--cpus + 1`` logical CPUs and the data pipeline capped
at ``--cpus`` (``configure_data_context``). Ray is started before any path runs, so all share
the machine with Ray's idle system processes.

Each path runs one warm-up epoch (worker start-up, imports; reported separately) and then
``--epochs`` timed epochs; the two paths alternate ``--rounds`` times per image size and the
best round of each counts, which damps other load on the machine. Also printed: CPU time of
the whole process tree (driver, workers and Ray's own processes) per image, a measure that
other load disturbs less than wall time.

    python benchmarks/data_throughput.py --data-dir /tmp/dg           # 48 and 160 px
    python benchmarks/data_throughput.py --cpus 1 --image-size 224

Target (issue 2): Ray Data >= 0.9x the DataLoader.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from tuner.data.prepared import PreparedData, ensure_prepared
from tuner.data.stream import (
    Decoder,
    EpochStream,
    configure_data_context,
    epochs_dataset,
    iter_train_batches,
    train_dataset,
)


class ShardDataset(Dataset):
    """Map-style dataset over the shards' encoded images (bytes held in memory)."""

    def __init__(self, files: list[str]) -> None:
        tables = [pq.read_table(f, columns=["index", "image"]) for f in files]
        self.images = [b for t in tables for b in t.column("image").to_pylist()]
        self.index = np.concatenate([t.column("index").to_numpy() for t in tables])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        return self.images[i], int(self.index[i])


class Collate:
    """Decode + augment one batch in the DataLoader worker (the same Decoder as Ray Data)."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder

    def __call__(self, items: list[tuple[bytes, int]]) -> dict[str, torch.Tensor]:
        out = self.decoder({"image": [b for b, _ in items], "index": np.array([i for _, i in items])})
        return {"image": torch.from_numpy(out["image"]), "index": torch.from_numpy(out["index"])}


def replicate(files: list[str], times: int, root: Path) -> list[str]:
    """``times`` copies of each shard under distinct names (a larger epoch, same images)."""
    (root / "rep").mkdir(exist_ok=True)
    out = []
    for k in range(times):
        for f in files:
            dst = root / "rep" / f"{k}-{Path(f).name}"
            shutil.copyfile(f, dst)
            out.append(str(dst))
    return out


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (Linux ``/proc``)."""
    stats = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # after "pid (comm)": state ppid ... utime (14th field) stime (15th)
            stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    ticks = sum(stats[pid][1] for pid in tree if pid in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


class Run:
    """Timed epochs of one path: (images, wall seconds, tree CPU seconds) per epoch.

    ``begin(n)`` / ``end()`` (optional) bracket each group of ``n`` consecutive epochs: the
    multi-epoch stream starts one Ray Data execution for them and stops it afterwards, so it
    never decodes ahead while the other paths are timed.
    """

    def __init__(self, make_iter: Callable[[], Iterable[dict[str, torch.Tensor]]],
                 begin: Callable[[int], None] | None = None,
                 end: Callable[[], None] | None = None) -> None:
        self.make_iter = make_iter
        self.begin, self.end = begin or (lambda n: None), end or (lambda: None)
        self.first: tuple[int, float, float] | None = None
        self.rounds: list[list[tuple[int, float, float]]] = []

    def epoch(self) -> tuple[int, float, float]:
        c0, t0, n = tree_cpu_seconds(), time.perf_counter(), 0
        for batch in self.make_iter():
            n += len(batch["index"])
        return n, time.perf_counter() - t0, tree_cpu_seconds() - c0

    def round(self, epochs: int) -> None:
        if self.first is None:
            self.begin(1)
            self.first = self.epoch()
            self.end()
        self.begin(epochs)
        self.rounds.append([self.epoch() for _ in range(epochs)])
        self.end()

    def best(self) -> tuple[float, float]:
        """(images/s, CPU us/image) of the fastest round."""
        sums = [tuple(map(sum, zip(*r))) for r in self.rounds]
        n, wall, cpu = max(sums, key=lambda s: s[0] / s[1])
        return n / wall, cpu / n * 1e6

    def all_rates(self) -> str:
        return " ".join(f"{sum(e[0] for e in r) / sum(e[1] for e in r):.0f}" for r in self.rounds)


def bench_size(files: list[str], size: int, args: argparse.Namespace) -> tuple[Run, Run, Run]:
    decoder = Decoder(size, "shift")
    shards = ShardDataset(files)
    loader = DataLoader(shards, batch_size=args.batch_size, shuffle=True,
                        num_workers=args.cpus, collate_fn=Collate(decoder),
                        persistent_workers=True, prefetch_factor=4)
    ds = train_dataset(files, size, "shift", decode_batch_size=args.batch_size,
                       rows_per_task=args.rows_per_task, data_cpus=args.cpus)
    torch_run = Run(lambda: iter(loader))
    ray_run = Run(lambda: iter_train_batches(ds, args.batch_size))

    state: dict[str, Any] = {}

    def begin(n: int) -> None:
        state["epoch"] = 0
        state["stream"] = EpochStream(
            lambda epochs: epochs_dataset(files, size, "shift", epochs,
                                          decode_batch_size=args.batch_size,
                                          rows_per_task=args.rows_per_task,
                                          data_cpus=args.cpus),
            len(shards), last_epoch=n)

    def next_epoch() -> Iterable[dict[str, torch.Tensor]]:
        state["epoch"] += 1
        return iter_train_batches(state["stream"].blocks(state["epoch"] - 1), args.batch_size)

    multi_run = Run(next_epoch, begin, lambda: state.pop("stream").close())
    for _ in range(args.rounds):
        torch_run.round(args.epochs)
        ray_run.round(args.epochs)
        multi_run.round(args.epochs)
    torch_run.make_iter = ray_run.make_iter = None  # frees the loader: stops its workers
    return torch_run, ray_run, multi_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", help="prepared benchmark (default: DigitsMLT in a temp dir)")
    p.add_argument("--cpus", type=int, default=2, help="decode CPUs for both paths")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per round")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two paths")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rows-per-task", type=int,
                   help="rows per decode task of both Ray Data paths (default: sized by "
                        "pixels, tuner.data.stream.rows_per_task_for, as in the trials)")
    p.add_argument("--image-size", type=int, nargs="+", default=[48, 160])
    p.add_argument("--repeat", type=int, default=8, help="repeat the training shards N times")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    data_dir = Path(args.data_dir) if args.data_dir else ensure_prepared("digits-mlt", Path(tmp.name) / "d")
    files = replicate(PreparedData(data_dir).shard_files("train"), args.repeat, Path(tmp.name))

    import ray

    ray.init(address="local", num_cpus=args.cpus + 1, include_dashboard=False, log_to_driver=False)
    try:
        configure_data_context(args.cpus)
        results = [(size, *bench_size(files, size, args)) for size in args.image_size]
    finally:
        ray.shutdown()

    print(f"{results[0][1].first[0]} images/epoch, {args.cpus} decode CPUs, batch {args.batch_size}, "
          f"best of {args.rounds} rounds x {args.epochs} epochs (load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    for size, torch_run, ray_run, multi_run in results:
        t_rate = torch_run.best()[0]
        for name, run in (("torch DataLoader                    ", torch_run),
                          ("Ray Data, one execution (trials)    ", multi_run),
                          ("Ray Data, execution per epoch (M-W) ", ray_run)):
            rate, cpu = run.best()
            print(f"{size:4d}px {name}: {rate:7.0f} images/s  {cpu:5.0f} CPU us/image  "
                  f"first epoch {run.first[1]:.2f}s  rounds [{run.all_rates()}]")
        print(f"{size:4d}px ratio Ray Data / DataLoader: trials' stream "
              f"{multi_run.best()[0] / t_rate:.2f}x, an execution per epoch "
              f"{ray_run.best()[0] / t_rate:.2f}x (target >= 0.9x; issue 12: >= 1.0x)")


if __name__ == "__main__":
    main()
