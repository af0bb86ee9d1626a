"""Optuna's own early stopping run by the platform: TPE + ``SuccessiveHalvingPruner``.

The choice a user could make instead of Ray Tune's ASHA (``search_efficiency.py``'s
``sha-tpe``). Same budget as the Ray searches: the space's sampler (:func:`tuner.search.
build_sampler`: TPE, seeded, the same start-up trials), ``num_trials`` trials,
``max_concurrent`` at once, and a pruner with ``min_resource = grace_period`` and the same
reduction factor. Each trial is the platform's own trial code (:func:`_search.
train_in_process`: the trainable's method, model and in-memory batches, ``tuner.loop.fit``)
in its own process, so an epoch costs what a Ray trial's does and a configuration trains to
the same curve. After every epoch the trial process sends its metrics and waits; the driver
reports the val mAP to Optuna and answers with ``trial.should_prune()`` (never at the last
epoch: pruning there saves nothing). A pruned trial is told PRUNED, a finished one COMPLETE
with its best val mAP, as the platform's searcher does.

Writes, in the experiment directory, what ``search_efficiency.py`` reads from a Ray search:
``trials.parquet`` (one row per epoch: ``trial_id``, ``epoch``, ``val_mAP``, ``timestamp``,
``time_total_s``, ``trial_status`` and ``config/...`` columns), ``leaderboard.csv`` and
``optuna.db``. An unfinished run is started again from scratch.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from _search import ROOT, nested_config, train_in_process

#: per-epoch metrics a trial process sends back (the rest stays in the process)
SENT = ("epoch", "val_mAP", "best_val_mAP", "train_loss", "train_time", "eval_time")


class _Stop(Exception):
    """The driver answered "prune": leave the loop."""


def trial_process(conn: Connection, config: dict[str, Any], setup: Any) -> None:
    """One trial in a spawned process: train, send each epoch's metrics, obey the answer."""
    import torch

    torch.set_num_threads(1)  # one core per trial, as a Ray trial with cpus_per_trial 1

    def report(metrics: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        conn.send(("epoch", {k: metrics[k] for k in SENT if k in metrics}))
        if conn.recv():
            raise _Stop

    try:
        train_in_process(config, setup, report)
        conn.send(("done", None))
    except _Stop:
        pass
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which fails the trial
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


@dataclass
class _Running:
    """A trial in flight: its Optuna trial, process, pipe, start time and epochs so far."""

    trial: Any
    config: dict[str, Any]
    process: Any
    conn: Connection
    started: float = field(default_factory=time.time)
    rows: list[dict[str, Any]] = field(default_factory=list)


def run_sha_search(method: str, name: str, edit: Callable[[dict[str, Any]], None], out: Path,
                   data_dir: str | None = None) -> pd.DataFrame:
    """``search_spaces/<method>.yaml`` edited by ``edit``, searched with Optuna TPE +
    SuccessiveHalvingPruner as experiment ``name`` under ``out``; its per-epoch trials."""
    import optuna

    from tuner.optuna_search import sqlite_storage
    from tuner.search import build_sampler, prepare_data
    from tuner.space import parse_space

    raw = yaml.safe_load((ROOT / f"search_spaces/{method}.yaml").read_text())
    edit(raw)
    if data_dir:
        raw["data"]["data_dir"] = data_dir
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    space = parse_space(raw, str(path), method)
    exp = out / name
    if exp.exists() and any(exp.iterdir()) and not (exp / "optuna.db").is_file():
        raise SystemExit(f"{exp} exists and is not a sha-tpe run of this script (no optuna.db); "
                         f"move it away or pass another --out")
    shutil.rmtree(exp, ignore_errors=True)  # an unfinished run of ours starts again
    exp.mkdir(parents=True)
    _, setup = prepare_data(space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", study_name=name, storage=sqlite_storage(exp / "optuna.db"),
        sampler=build_sampler(space.search),
        pruner=optuna.pruners.SuccessiveHalvingPruner(
            min_resource=int(space.asha["grace_period"]),
            reduction_factor=int(space.asha["reduction_factor"])))
    rows = _drive(study, space, setup)
    trials = pd.DataFrame(rows)
    trials.to_parquet(exp / "trials.parquet")
    _leaderboard(trials).to_csv(exp / "leaderboard.csv", index=False)
    return trials


def _drive(study: Any, space: Any, setup: Any) -> list[dict[str, Any]]:
    """Keep ``max_concurrent`` trial processes busy until ``num_trials`` have ended."""
    ctx = multiprocessing.get_context("spawn")
    running: dict[Connection, _Running] = {}
    asked, rows = 0, []
    while asked < space.search["num_trials"] or running:
        while asked < space.search["num_trials"] and len(running) < space.search["max_concurrent"]:
            trial = study.ask()
            config = nested_config({**space.define_by_run(trial), **trial.params})
            parent, child = ctx.Pipe()
            process = ctx.Process(target=trial_process, args=(child, config, setup), daemon=True)
            process.start()
            child.close()
            running[parent] = _Running(trial, config, process, parent)
            asked += 1
        for conn in wait(list(running)):
            if _step(study, running[conn], space.max_epochs):
                done = running.pop(conn)
                done.process.join(timeout=60)
                rows += done.rows
    return rows


def _step(study: Any, run: _Running, max_epochs: int) -> bool:
    """Handle one message of a trial process; True when the trial has ended."""
    from optuna.trial import TrialState

    try:
        kind, payload = run.conn.recv()
    except EOFError:  # the process died without a word
        kind, payload = "error", f"trial process exited with code {run.process.exitcode}"
    if kind == "epoch":
        now = time.time()
        epoch = int(payload["epoch"])
        run.rows.append({"trial_id": f"{run.trial.number:05d}", **payload, "timestamp": now,
                         "time_total_s": now - run.started, "trial_status": "RUNNING",
                         **{f"config/{s}/{k}": v for s, c in run.config.items()
                            for k, v in c.items()}})
        run.trial.report(float(payload["val_mAP"]), epoch)
        prune = epoch < max_epochs and run.trial.should_prune()
        run.conn.send(prune)
        if not prune:
            return False
        study.tell(run.trial, state=TrialState.PRUNED)
        _close(run, "STOPPED")
        return True
    if kind == "done":
        study.tell(run.trial, max(r["val_mAP"] for r in run.rows))
        _close(run, "COMPLETE")
    else:
        print(f"sha-tpe trial {run.trial.number} failed: {payload}", flush=True)
        study.tell(run.trial, state=TrialState.FAIL)
        _close(run, "ERROR")
    return True


def _close(run: _Running, status: str) -> None:
    for row in run.rows:
        row["trial_status"] = status
    best = max((r["val_mAP"] for r in run.rows), default=float("nan"))
    print(f"sha-tpe trial {run.trial.number}: {status} after {len(run.rows)} epochs, "
          f"best val mAP {best:.2f}", flush=True)


def _leaderboard(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: status, config, best val mAP and its epoch, epochs run."""
    rows = []
    for trial_id, df in trials.groupby("trial_id"):
        best = df.loc[df["val_mAP"].idxmax()]
        config: dict[str, dict[str, Any]] = {"train": {}, "method": {}}
        for col in (c for c in df.columns if c.startswith("config/")):
            _, section, key = col.split("/", 2)
            config[section][key] = best[col]
        rows.append({"trial_id": trial_id, "status": best["trial_status"],
                     "config": json.dumps(config, sort_keys=True, default=str),
                     "val_mAP": float(best["val_mAP"]), "best_epoch": int(best["epoch"]),
                     "epochs": int(df["epoch"].max())})
    return pd.DataFrame(rows).sort_values("val_mAP", ascending=False)
