"""The experiment's Optuna storage opens safely when several processes open a new file at once."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import optuna

from tuner.optuna_search import sqlite_storage


def _open_and_create(path: str, barrier: mp.synchronize.Barrier, queue: mp.Queue) -> None:
    barrier.wait()  # all processes hit the fresh file at the same moment
    try:
        storage = sqlite_storage(path)
        optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
        queue.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(f"{type(exc).__name__}: {exc}"[:300])


def test_concurrent_first_open_of_a_new_database_succeeds(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    outcomes = []
    for round_ in range(5):
        path = str(tmp_path / f"optuna{round_}.db")
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_and_create, args=(path, barrier, queue))
                 for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        outcomes += [queue.get(timeout=10) for _ in procs]
        study = optuna.load_study(study_name="s", storage=f"sqlite:///{path}")
        assert study.trials == []
    assert outcomes == ["ok"] * len(outcomes), outcomes
