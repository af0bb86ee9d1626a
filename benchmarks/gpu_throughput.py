"""Training images/s through the platform's loop fed by Ray Data vs the compute limit.

Both paths run ``tuner.loop.fit`` (the loop every trial runs: ``bce`` loss, AdamW, schedule,
autocast, one small validation per epoch) on the same model and batch size:

* **limit**: synthetic uint8 batches already on the device (no data path at all);
* **platform**: the trials' stream (``EpochStream`` over ``epochs_dataset`` +
  ``iter_train_batches``) reading Parquet shards of 224 px JPEGs written here (as
  ``python -m tuner.prepare`` writes real benchmarks), decoded and augmented (flip + shift)
  by ``--data-cpus`` Ray Data tasks.

The first epoch of each path is a warm-up (kernel selection, worker start-up) and is not
counted; the rest give images/s (training images / training time), the share of training
time spent waiting for data, and the peak device memory. Prints platform / limit (target:
>= 0.9) and the data-wait share (target: < 5%).

    python benchmarks/gpu_throughput.py                  # ResNet-50, 224 px, bf16 + NHWC, GPU
    python benchmarks/gpu_throughput.py --no-amp --no-channels-last
    python benchmarks/gpu_throughput.py --backbone small_cnn --image-size 64 --images 512 \\
        --batch-size 32 --data-cpus 1 --epochs 2          # CPU smoke run
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from clip_throughput import make_task
from PIL import Image

import methods
from tuner.backbones import build_model
from tuner.loop import TrainConfig, TrainData, fit

SHARD_ROWS = 256


def write_jpeg_shards(out: Path, n: int, size: int, seed: int) -> list[str]:
    """``n`` smooth random RGB images, ``size`` px JPEG (quality 90), in Parquet shards with
    the columns the training stream reads (``index``, ``image``)."""
    rng = np.random.default_rng(seed)
    files = []
    for start in range(0, n, SHARD_ROWS):
        rows = range(start, min(n, start + SHARD_ROWS))
        images = []
        for _ in rows:
            small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            images.append(buf.getvalue())
        path = out / f"train-{start // SHARD_ROWS:05d}.parquet"
        pq.write_table(pa.table({"index": pa.array(list(rows), pa.int64()),
                                 "image": pa.array(images, pa.binary())}), path)
        files.append(str(path))
    return files


def run_fit(args: argparse.Namespace, labels: torch.Tensor, task: Any, batches: Any,
            device: torch.device) -> dict[str, float]:
    """``fit`` for ``--epochs`` epochs; images/s and data-wait share over epochs 2.."""
    torch.manual_seed(args.seed)
    cfg = TrainConfig.from_dict({
        "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
        "lr": 1e-3, "max_epochs": args.epochs, "amp": args.amp,
        "channels_last": args.channels_last, "eval_batch_size": args.batch_size})
    val = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size),
                        dtype=torch.uint8)
    data = TrainData(batches, labels, steps_per_epoch=-(-len(labels) // args.batch_size),
                     val_images=val, val_targets=labels[: len(val)].numpy().astype(np.uint8))
    method = methods.create_method("bce", {}, task)
    reports: list[dict[str, Any]] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fit(method, build_model(args.backbone, task.num_classes), cfg, data,
        lambda metrics, state: reports.append(metrics), device=device)
    timed = reports[1:] or reports
    images = sum(m["train_images"] for m in timed)
    train = sum(m["train_time"] for m in timed)
    return {"images_per_s": images / train,
            "data_wait": sum(m["data_wait_time"] for m in timed) / train,
            "peak_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                         if device.type == "cuda" else float("nan")),
            "first_epoch_s": reports[0]["train_time"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=8192, help="training images per epoch")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="epochs per path (the first is warm-up)")
    p.add_argument("--data-cpus", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 instead of bf16")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    task, labels = make_task(args.images, args.classes, args.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.data_cpus))

    # the limit: the same uint8 batches, already on the device, every epoch
    gen = torch.Generator().manual_seed(args.seed)
    resident = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size),
                             dtype=torch.uint8, generator=gen).to(device)

    def synthetic(epoch: int, weights: Any) -> Any:
        for start in range(0, args.images, args.batch_size):
            n = min(args.batch_size, args.images - start)
            yield {"image": resident[:n], "index": torch.arange(start, start + n)}

    limit = run_fit(args, labels, task, synthetic, device)

    import ray

    from tuner.data.stream import (
        EpochStream,
        configure_data_context,
        epochs_dataset,
        iter_train_batches,
    )

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = write_jpeg_shards(Path(tmp), args.images, args.image_size, args.seed)
        mb = sum(os.path.getsize(f) for f in files) / 2**20
        print(f"wrote {args.images} {args.image_size}px JPEGs ({mb:.0f} MB, {len(files)} shards) "
              f"in {time.perf_counter() - t0:.0f} s")
        ray.init(address="local", num_cpus=args.data_cpus + 1, include_dashboard=False, log_to_driver=False)
        try:
            configure_data_context(args.data_cpus)
            stream = EpochStream(
                lambda epochs: epochs_dataset(files, args.image_size, "flip", epochs,
                                              data_cpus=args.data_cpus),
                args.images, args.epochs)
            platform = run_fit(args, labels, task,
                               lambda e, w: iter_train_batches(stream.blocks(e), args.batch_size),
                               device)
            stream.close()
        finally:
            ray.shutdown()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.backbone} {args.image_size}px batch {args.batch_size} "
          f"{'bf16 autocast' if args.amp and device.type == 'cuda' else 'fp32'}"
          f"{', channels-last' if args.channels_last else ''}"
          f" on {device} ({name}), {args.images} images/epoch, {args.data_cpus} data CPUs, "
          f"epochs 2-{args.epochs} timed")
    for label, r in (("limit (synthetic on device)", limit), ("platform (Ray Data stream) ", platform)):
        print(f"{label}: {r['images_per_s']:8.1f} images/s, data wait {100 * r['data_wait']:5.1f}% "
              f"of training time, peak device memory {r['peak_gib']:.2f} GiB, "
              f"warm-up epoch {r['first_epoch_s']:.1f} s")
    ratio = platform["images_per_s"] / limit["images_per_s"]
    print(f"platform / limit: {ratio:.2f} (target >= 0.90); data wait "
          f"{100 * platform['data_wait']:.1f}% (target < 5%)")


if __name__ == "__main__":
    main()
