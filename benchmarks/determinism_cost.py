"""The cost of deterministic trials: seconds per training epoch, deterministic vs not.

Runs one trial's loop as the Tune trainable runs it (``tuner.trainable``: the method, model,
``EpochStream`` over the Parquet shards and the shared ``tuner.loop.fit``) in a local Ray
started here, alternating two modes ``--rounds`` times:

* **on** (what trials run): the stream delivers each epoch's decode tasks in their planned
  order (a task that finishes early waits for the ones before it) and torch uses
  deterministic algorithms (``tuner.loop.deterministic_torch``);
* **off** (before issue 18): blocks in arrival order, torch's default algorithms.

and with ``--split`` a third, **order only** (planned order, default algorithms), which splits
the cost between the two. ``--path memory`` times the in-memory path instead (what a trial
runs when train + val fit the object store, e.g. DigitsMLT: the split decoded once, each
epoch augmented in the trial's process in the planned order, no Ray Data); there only torch's
algorithms differ between the modes.

Both modes draw the same seeded plan, so they do the same work. Per mode it prints the median
``train_time`` per epoch (data waits included; the first epoch of each run, with the
pipeline's start, is left out) and ``eval_time``, and the ratio on / off of the training
time (target, issue 18: at most 1.05).

    python benchmarks/determinism_cost.py                       # DigitsMLT, small CNN, CPU
    python benchmarks/determinism_cost.py --split --rounds 5    # + planned order alone
    python benchmarks/determinism_cost.py --path memory         # the in-memory path
    python benchmarks/determinism_cost.py --backbone resnet18 --image-size 96 --epochs 4

Measure on a quiet machine: a loaded one moves epoch times by more than the effect.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from tuner.data.corruption import ViewSpec
from tuner.data.memory import MemoryEpochs, decode_split
from tuner.data.prepared import PreparedData, ensure_prepared
from tuner.loop import fit
from tuner.trainable import (
    TrialSetup,
    _epoch_stream,
    _method_and_model,
    build_train_data,
    train_config,
)

#: mode name -> (planned-order delivery, deterministic torch algorithms)
MODES = {"deterministic (trials)": (True, True), "order only": (True, False),
         "arrival order, default": (False, False)}


def run_once(setup: TrialSetup, config: dict[str, Any], ordered: bool, deterministic: bool,
             device: torch.device, split: Any = None) -> list[dict[str, float]]:
    """One trial's epochs in one mode; the per-epoch metrics. ``split``: the decoded training
    split of the in-memory path (None: the Ray Data stream)."""
    cfg = train_config(config, setup)
    data = PreparedData(setup.data_dir)
    method, model, observed = _method_and_model(config, setup, cfg, data)
    if split is None:
        stream = _epoch_stream(data, cfg, setup)
        stream.ordered = ordered
    else:
        stream = MemoryEpochs(split, cfg.image_size,
                              data.manifest["image"].get("augment", "flip"), cfg.seed)
    train_data = build_train_data(setup, cfg, data, observed, stream, cfg.batch_size)
    epochs: list[dict[str, float]] = []
    try:
        fit(method, model, cfg, train_data, lambda m, s: epochs.append(dict(m)),
            device=device, deterministic=deterministic)
    finally:
        stream.close()
    return epochs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", help="prepared benchmark (default: DigitsMLT in a temp dir)")
    p.add_argument("--method", default="bce")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--image-size", type=int, default=24, help="DigitsMLT v3 is 24 px")
    p.add_argument("--batch-size", type=int, default=32, help="the DigitsMLT spaces' batch")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two modes")
    p.add_argument("--cpus", type=int, default=1, help="training threads (and data CPUs)")
    p.add_argument("--path", choices=("stream", "memory"), default="stream",
                   help="the Ray Data stream, or the in-memory path (only torch's algorithms "
                        "differ there)")
    p.add_argument("--split", action="store_true",
                   help="also time planned order with default algorithms (stream only)")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    data_dir = Path(args.data_dir) if args.data_dir else ensure_prepared(
        "digits-mlt", Path(tmp.name) / "d")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.cpus)
    setup = TrialSetup(method=args.method, data_dir=str(data_dir),
                       view=ViewSpec("clean", 0.0, 0), max_epochs=args.epochs,
                       data_cpus=float(args.cpus), groups=PreparedData(data_dir).groups())
    config = {"train": {"backbone": args.backbone, "image_size": args.image_size,
                        "batch_size": args.batch_size, "seed": 0}, "method": {}}
    import ray

    ray.init(address="local", num_cpus=2 * args.cpus + 1, include_dashboard=False,
             log_to_driver=False)
    modes = [m for m in MODES if args.split and args.path == "stream" or m != "order only"]
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    try:
        split = None
        if args.path == "memory":
            split = decode_split(PreparedData(data_dir).shard_files("train"), args.image_size)
        for _ in range(args.rounds):
            for mode in modes:
                epochs = run_once(setup, config, *MODES[mode], device, split)[1:]
                times[mode] += [(e["train_time"], e["eval_time"]) for e in epochs]
    finally:
        ray.shutdown()
    print(f"{args.method}, {args.backbone} {args.image_size}px, batch {args.batch_size}, "
          f"{device}, {args.path} path, {args.rounds} rounds x {args.epochs - 1} timed epochs "
          "per mode")
    med = {}
    for mode in modes:
        train = statistics.median(t for t, _ in times[mode])
        evals = statistics.median(e for _, e in times[mode])
        med[mode] = train
        print(f"{mode:<24}: train {train:.3f} s/epoch, eval {evals:.3f} s/epoch, "
              f"epochs [{' '.join(f'{t:.2f}' for t, _ in times[mode])}]")
    base = med["arrival order, default"]
    if "order only" in med:
        print(f"ratio order only / not: {med['order only'] / base:.3f}x train time per epoch")
    print(f"ratio deterministic / not: {med['deterministic (trials)'] / base:.3f}x train time "
          "per epoch (target, issue 18: <= 1.05x)")


if __name__ == "__main__":
    main()
