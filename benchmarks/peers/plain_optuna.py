"""Peer B: the hill search as plain Optuna, as its documentation shows it.

TPE (seeded, 2 random start-up trials) + ``SuccessiveHalvingPruner`` (min resource GRACE = 4
epochs as hill.yaml, reduction factor 2), 8 trials of at most 8 epochs, two at once in this process
(``study.optimize(n_jobs=2)``), the decoded images held in memory; the best trial's best
weights scored on test at the end. Prints one JSON line (read by ``benchmarks/peers.py``).

    python benchmarks/peers/plain_optuna.py [--trials 8 --epochs 8 --data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import time

import optuna
import torch
from workload import GRACE, Run, load_data, suggest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--grace", type=int, default=GRACE, help="first rung, epochs (hill.yaml: 4)")
    p.add_argument("--data-dir")
    args = p.parse_args()
    torch.set_num_threads(1)  # one core per trial, two trials at once
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load_data(args.data_dir)
    trials: dict[int, dict] = {}
    best_weights: dict[int, dict] = {}

    def objective(trial: optuna.Trial) -> float:
        entered = time.time()
        run = Run(suggest(trial), data, args.epochs)
        info = trials[trial.number] = {"started_at": entered, "epochs": 0, "epoch_s": []}
        try:
            for epoch in range(1, args.epochs + 1):
                t0 = time.perf_counter()
                run.train_epoch()
                value = run.score("val")
                info.update(epochs=epoch, ended_at=time.time(),
                            startup_s=run.first_step_at - entered)
                info["epoch_s"].append(time.perf_counter() - t0)
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return run.best[0]
        finally:
            best_weights[trial.number] = run.best[1]

    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=args.grace, reduction_factor=2),
    )
    study.optimize(objective, n_trials=args.trials, n_jobs=2)
    finished = [t for t in study.trials if t.intermediate_values]
    best = max(finished, key=lambda t: max(t.intermediate_values.values()))
    run = Run(best.params, data, args.epochs)
    test = run.score("test", best_weights[best.number])
    print(json.dumps({"system": "plain_optuna", "trials": list(trials.values()),
                      "best_val_mAP": max(best.intermediate_values.values()),
                      "test_mAP": test, "scored_at": time.time()}))


if __name__ == "__main__":
    main()
