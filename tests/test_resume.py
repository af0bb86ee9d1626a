"""A search killed mid-way (the driver's whole process group, SIGKILL) and resumed."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
NUM_TRIALS, EPOCHS = 4, 3


def _finished_trials(exp: Path) -> int:
    """Finished trials in the search's study, read without writing to the database.

    ``optuna.load_study`` would open the storage read-write and may stamp the schema of a
    database the search is creating at that moment (a race that once crashed the search), so
    the poll reads the file read-only with sqlite3.
    """
    db = exp / "optuna.db"
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            (count,) = con.execute(
                "SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED', 'FAIL')"
            ).fetchone()
    except sqlite3.OperationalError:  # the schema is not there yet, or the file is locked
        return 0
    return int(count)


def test_killed_search_resumes_without_losing_or_repeating_trials(
    tmp_path: Path, kill_session
) -> None:
    space = yaml.safe_load((ROOT / "search_spaces/bce.yaml").read_text())
    space["asha"] = {"max_epochs": EPOCHS, "grace_period": EPOCHS, "reduction_factor": 2}
    space["search"].update(num_trials=NUM_TRIALS, max_concurrent=1, seed=0)
    path = tmp_path / "bce.yaml"
    path.write_text(yaml.safe_dump(space))
    exp = tmp_path / "exp" / "crash"
    cmd = [sys.executable, "-m", "tuner.search", "--method", "bce", "--space", str(path),
           "--out", str(tmp_path / "exp"), "--name", "crash", "--data-dir", str(tmp_path / "data"),
           "--no-test"]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        while _finished_trials(exp) < 1:  # kill after one finished trial, mid-way
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first trial never finished"
            time.sleep(1)
        time.sleep(3)  # let the next trial start and report
    finally:
        kill_session(proc)
    assert _finished_trials(exp) < NUM_TRIALS

    resumed = subprocess.run(cmd[:-1] + ["--resume", str(exp), "--no-test"], cwd=ROOT,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the search" in resumed.stdout

    trials = pd.read_parquet(exp / "trials.parquet")
    assert trials["trial_id"].nunique() == NUM_TRIALS
    for trial_id, rows in trials.groupby("trial_id"):
        assert sorted(rows["epoch"]) == list(range(1, EPOCHS + 1)), trial_id  # no gap, no repeat
    configs = trials.groupby("trial_id")["config/train/lr"].first()
    assert configs.nunique() == NUM_TRIALS  # nothing suggested twice
    study = optuna.load_study(study_name="crash", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert len(study.trials) == NUM_TRIALS
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert {t.user_attrs["tune_trial_id"] for t in study.trials} == set(trials["trial_id"])


def test_search_killed_in_its_first_seconds_starts_again_in_place(
    tmp_path: Path, kill_session
) -> None:
    """Killed before Tune saved any trial state (only the Optuna study exists): the same
    command starts the search again in the same directory and runs every trial once, with
    one Optuna trial each (``test_search_options`` checks that trials the study had handed
    out are re-used)."""
    space = yaml.safe_load((ROOT / "search_spaces/bce.yaml").read_text())
    space["asha"] = {"max_epochs": 1, "grace_period": 1, "reduction_factor": 2}
    space["search"].update(num_trials=3, max_concurrent=1, seed=0)
    path = tmp_path / "bce.yaml"
    path.write_text(yaml.safe_dump(space))
    exp = tmp_path / "exp" / "early"
    cmd = [sys.executable, "-m", "tuner.search", "--method", "bce", "--space", str(path),
           "--out", str(tmp_path / "exp"), "--name", "early", "--data-dir",
           str(tmp_path / "data"), "--no-test"]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not (exp / "optuna.db").is_file():  # the searcher's study: its first file
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the search never created its study"
            time.sleep(0.05)
    finally:
        kill_session(proc)
    assert not list(exp.glob("experiment_state-*.json"))  # nothing Tune could resume from

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "starting it again in place" in again.stdout
    assert "Tried to resume experiment" not in again.stdout + again.stderr  # Ray's restore
    trials = pd.read_parquet(exp / "trials.parquet")
    assert trials["trial_id"].nunique() == 3
    study = optuna.load_study(study_name="early", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3  # no RUNNING orphan
