"""Peer C: the hill search as stock Ray Tune, as its documentation shows it.

A function trainable fed the decoded images through ``tune.with_parameters`` (one copy in
the object store), ``OptunaSearch`` (seeded TPE, 2 random start-up trials) + ``ASHAScheduler``
(grace GRACE = 4 as hill.yaml, reduction 2, max 8 epochs), 8 trials, 2 at once with 1 CPU
each, a checkpoint per epoch; the best trial's best weights scored on test in this process at
the end. Prints one JSON line (read by ``benchmarks/peers.py``).

    python benchmarks/peers/stock_ray_tune.py [--trials 8 --epochs 8 --data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import optuna
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from workload import GRACE, Data, Run, load_data, suggest


def train_fn(config: dict, data: Data, max_epochs: int) -> None:
    entered = time.time()
    torch.set_num_threads(1)
    run = Run(config, data, max_epochs)
    for epoch in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        run.train_epoch()
        value = run.score("val")
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                        "best": run.best[1]}, os.path.join(tmp, "state.pt"))
            tune.report({"epoch": epoch, "val_mAP": value, "best_val_mAP": run.best[0],
                         "epoch_s": time.perf_counter() - t0, "started_at": entered,
                         "startup_s": run.first_step_at - entered, "reported_at": time.time()},
                        checkpoint=tune.Checkpoint.from_directory(tmp))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--grace", type=int, default=GRACE, help="first rung, epochs (hill.yaml: 4)")
    p.add_argument("--data-dir")
    p.add_argument("--out", default=tempfile.gettempdir())
    args = p.parse_args()
    data = load_data(args.data_dir)
    ray.init(num_cpus=2)
    searcher = OptunaSearch(suggest, metric="val_mAP", mode="max",
                            sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_fn, data=data, max_epochs=args.epochs),
                            {"cpu": 1}),
        tune_config=tune.TuneConfig(
            metric="val_mAP", mode="max", search_alg=searcher, num_samples=args.trials,
            max_concurrent_trials=2,
            scheduler=ASHAScheduler(time_attr="epoch", max_t=args.epochs, grace_period=args.grace,
                                    reduction_factor=2)),
        run_config=tune.RunConfig(storage_path=os.path.abspath(args.out), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    results = tuner.fit()
    best = results.get_best_result(metric="best_val_mAP", mode="max")
    with best.checkpoint.as_directory() as path:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    run = Run(best.config, data, args.epochs)
    test = run.score("test", state["best"])
    trials = []
    for result in results:
        df = result.metrics_dataframe
        trials.append({"started_at": float(df["started_at"].iloc[0]), "epochs": int(df["epoch"].max()),
                       "ended_at": float(df["reported_at"].max()),
                       "startup_s": float(df["startup_s"].iloc[0]),
                       "epoch_s": df["epoch_s"].tolist()})
    print(json.dumps({"system": "stock_ray_tune", "trials": trials,
                      "best_val_mAP": float(best.metrics["best_val_mAP"]), "test_mAP": test,
                      "scored_at": time.time()}))
    ray.shutdown()


if __name__ == "__main__":
    main()
