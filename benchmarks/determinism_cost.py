"""The cost of deterministic trials: seconds per training epoch, deterministic vs not.

Runs one trial's loop as the Tune trainable runs it (``tuner.trainable``: the method, model,
``EpochStream`` over the Parquet shards and the shared ``tuner.loop.fit``) in a local Ray
started here, alternating two modes ``--rounds`` times:

* **on** (what trials run): the stream delivers each epoch's decode tasks in their planned
  order (a task that finishes early waits for the ones before it) and torch uses
  deterministic algorithms (``tuner.loop.deterministic_torch``);
* **off** (before issue 18): blocks in arrival order, torch's default algorithms.

Both modes draw the same seeded plan, so they do the same work. Per mode it prints the median
``train_time`` per epoch (data waits included; the first epoch of each run, with the
pipeline's start, is left out) and ``eval_time``, and the ratio on / off of the training
time (target, issue 18: at most 1.05).

    python benchmarks/determinism_cost.py                       # DigitsMLT, small CNN, CPU
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
from tuner.data.prepared import PreparedData, ensure_prepared
from tuner.loop import fit
from tuner.trainable import (
    TrialSetup,
    _epoch_stream,
    _method_and_model,
    build_train_data,
    train_config,
)


def run_once(setup: TrialSetup, config: dict[str, Any], deterministic: bool,
             device: torch.device) -> list[dict[str, float]]:
    """One trial's epochs in one mode; the per-epoch metrics."""
    cfg = train_config(config, setup)
    data = PreparedData(setup.data_dir)
    method, model, observed = _method_and_model(config, setup, cfg, data)
    stream = _epoch_stream(data, cfg, setup)
    stream.ordered = deterministic
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
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two modes")
    p.add_argument("--cpus", type=int, default=1, help="training threads (and data CPUs)")
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
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    try:
        for _ in range(args.rounds):
            for mode in (True, False):
                epochs = run_once(setup, config, mode, device)[1:]
                times[mode] += [(e["train_time"], e["eval_time"]) for e in epochs]
    finally:
        ray.shutdown()
    print(f"{args.method}, {args.backbone} {args.image_size}px, batch {args.batch_size}, "
          f"{device}, {args.rounds} rounds x {args.epochs - 1} timed epochs per mode")
    med = {}
    for mode, name in ((True, "deterministic (trials)"), (False, "arrival order, default ")):
        train = statistics.median(t for t, _ in times[mode])
        evals = statistics.median(e for _, e in times[mode])
        med[mode] = train
        print(f"{name}: train {train:.3f} s/epoch, eval {evals:.3f} s/epoch, "
              f"epochs [{' '.join(f'{t:.2f}' for t, _ in times[mode])}]")
    print(f"ratio deterministic / not: {med[True] / med[False]:.3f}x train time per epoch "
          f"(target, issue 18: <= 1.05x)")


if __name__ == "__main__":
    main()
