"""Images/s of the Ray Data training stream vs a plain torch DataLoader over the same shards.

Both paths read the same Parquet shards and run the same decode + augmentation
(:class:`tuner.data.stream.Decoder`) with the same number of CPUs for decoding, and hand
``(B, 3, S, S)`` uint8 torch batches to the consumer. Epoch 1 (warm-up: worker start-up,
imports) is reported separately; the ratio uses the steady-state epochs.

    python benchmarks/data_throughput.py                # DigitsMLT, 2 decode CPUs, 4 epochs
    python benchmarks/data_throughput.py --cpus 1 --image-size 224

Target (issue 2): Ray Data >= 0.9x the DataLoader.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from tuner.data.prepared import PreparedData, ensure_prepared
from tuner.data.stream import Decoder, configure_data_context, iter_train_batches, train_dataset


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


def time_epochs(make_iter, epochs: int) -> list[tuple[int, float]]:
    runs = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for batch in make_iter():
            n += len(batch["index"])
        runs.append((n, time.perf_counter() - t0))
    return runs


def rate(runs: list[tuple[int, float]]) -> float:
    steady = runs[1:] or runs
    return sum(n for n, _ in steady) / sum(t for _, t in steady)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", help="prepared benchmark (default: DigitsMLT in a temp dir)")
    p.add_argument("--cpus", type=int, default=2, help="decode CPUs for both paths")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--repeat", type=int, default=8, help="repeat the training shards N times")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    data_dir = Path(args.data_dir) if args.data_dir else ensure_prepared("digits-mlt", Path(tmp.name) / "d")
    files = replicate(PreparedData(data_dir).shard_files("train"), args.repeat, Path(tmp.name))
    decoder = Decoder(args.image_size, "shift")

    loader = DataLoader(ShardDataset(files), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.cpus, collate_fn=Collate(decoder),
                        persistent_workers=True, prefetch_factor=4)
    torch_runs = time_epochs(lambda: iter(loader), args.epochs)

    import ray

    ray.init(num_cpus=args.cpus + 1, include_dashboard=False, log_to_driver=False)
    configure_data_context(args.cpus)
    ds = train_dataset(files, args.image_size, "shift", decode_batch_size=args.batch_size)
    ray_runs = time_epochs(lambda: iter_train_batches(ds, args.batch_size), args.epochs)
    ray.shutdown()

    images = torch_runs[0][0]
    print(f"{images} images/epoch, {args.epochs} epochs, {args.cpus} decode CPUs, "
          f"{args.image_size}px")
    print(f"torch DataLoader : {rate(torch_runs):8.0f} images/s (first epoch {torch_runs[0][1]:.2f}s)")
    print(f"Ray Data stream  : {rate(ray_runs):8.0f} images/s (first epoch {ray_runs[0][1]:.2f}s)")
    print(f"ratio Ray Data / DataLoader: {rate(ray_runs) / rate(torch_runs):.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
