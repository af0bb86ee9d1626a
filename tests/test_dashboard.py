"""python -m tuner.dashboard: an experiment's study loads in optuna-dashboard.

The study is written the way a search writes it (the platform's searcher driven as Tune drives
it, over a real SQLite file in an experiment directory); optuna-dashboard's own server is then
queried over HTTP on a loopback port for the trials' states, values and per-epoch intermediate
values. No mocks.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest

import tuner.dashboard
from tuner.dashboard import find_study, serve
from tuner.errors import DataError
from tuner.optuna_search import PrunedAwareOptunaSearch, sqlite_storage

pytest.importorskip("optuna_dashboard", reason="the dashboard extra: pip install -e '.[dashboard]'")

ROOT = Path(__file__).resolve().parents[1]
FULL = [10.0, 30.0, 20.0, 25.0]  # ran all 4 epochs: COMPLETE with its best, 30
EARLY = [40.0, 35.0]  # stopped by ASHA after epoch 2: PRUNED with its last value, 35


def write_study(exp: Path) -> None:
    """Two trials through the platform's searcher, as Tune reports them."""
    exp.mkdir(parents=True)

    def space(trial: optuna.Trial) -> None:
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)

    searcher = PrunedAwareOptunaSearch(
        space=space, metric="val_mAP", mode="max", sampler=optuna.samplers.RandomSampler(0),
        storage=sqlite_storage(exp / "optuna.db"), study_name=exp.name, max_epochs=4)
    for trial_id, values in (("full", FULL), ("early", EARLY)):
        assert searcher.suggest(trial_id) is not None
        result: dict[str, Any] = {}
        for epoch, value in enumerate(values, start=1):
            result = {"val_mAP": value, "epoch": epoch, "best_val_mAP": max(values[:epoch])}
            searcher.on_trial_result(trial_id, result)
        searcher.on_trial_complete(trial_id, result)


@pytest.fixture()
def experiment(tmp_path: Path) -> Path:
    exp = tmp_path / "experiments" / "hill-20261202-101500"
    write_study(exp)
    return exp


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


def check_study(base: str, name: str) -> None:
    """The dashboard's API lists the study with both trials, values, states and epochs."""
    summaries = get_json(f"{base}/api/studies")["study_summaries"]
    study_id = next(s["study_id"] for s in summaries if s["study_name"] == name)
    trials = get_json(f"{base}/api/studies/{study_id}")["trials"]
    by_tune = {t["user_attrs"][0]["value"]: t for t in trials}  # the tune_trial_id attribute
    assert [a["key"] for t in trials for a in t["user_attrs"]] == ["tune_trial_id"] * 2
    full, early = by_tune["full"], by_tune["early"]
    assert full["state"] == "Complete" and full["values"] == [30.0]
    assert early["state"] == "Pruned" and early["values"] == [35.0]
    assert [(v["step"], v["value"]) for v in full["intermediate_values"]] == list(
        enumerate(FULL, start=1))
    assert [(v["step"], v["value"]) for v in early["intermediate_values"]] == list(
        enumerate(EARLY, start=1))
    assert [p["name"] for p in full["params"]] == ["lr"]


def test_the_study_loads_in_optuna_dashboard(experiment: Path) -> None:
    db, study_id, name = find_study(experiment)
    assert (db, name) == (experiment / "optuna.db", experiment.name)
    server = serve(db, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        check_study(base, name)
        assert get_json(f"{base}/api/studies/{study_id}")["name"] == name
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_one_command_serves_the_study_and_prints_its_url(experiment: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuner.dashboard", str(experiment), "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"optuna-dashboard for study {experiment.name!r} at http://127.0.0.1:"), (
            line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[1].split()[0]
        base = url.split("/dashboard/")[0]
        with urllib.request.urlopen(url, timeout=30) as page:  # the web page itself
            assert page.status == 200 and b"<html" in page.read().lower()
        check_study(base, experiment.name)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "dashboard stopped" in out
    assert "warning" not in err  # loopback by default


def test_a_renamed_experiment_with_one_study_still_opens(experiment: Path) -> None:
    moved = experiment.rename(experiment.parent / "kept")
    db, _, name = find_study(moved)
    assert name == "hill-20261202-101500" and db == moved / "optuna.db"


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert tuner.dashboard.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_directory_that_is_not_an_experiment_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = one_line_error(capsys, [str(tmp_path / "nowhere")])
    assert "does not exist" in err and "python -m tuner.search" in err
    err = one_line_error(capsys, [str(tmp_path)])
    assert "is not an experiment directory (no optuna.db" in err
    assert not (tmp_path / "optuna.db").exists()  # nothing created
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "optuna.db").write_bytes(b"not a database")
    assert "is not an Optuna study database" in one_line_error(capsys, [str(foreign)])
    assert (foreign / "optuna.db").read_bytes() == b"not a database"  # untouched


def test_a_database_without_the_experiments_study_is_refused(tmp_path: Path) -> None:
    exp = tmp_path / "mine"
    exp.mkdir()
    for name in ("a", "b"):
        optuna.create_study(study_name=name, storage=sqlite_storage(exp / "optuna.db"))
    with pytest.raises(DataError, match=r"holds 2 studies \(a, b\) and none is named 'mine'"):
        find_study(exp)


def test_a_busy_port_is_named(experiment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = one_line_error(capsys, [str(experiment), "--port", str(port)])
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pass another --port" in err
