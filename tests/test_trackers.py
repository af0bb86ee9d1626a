"""Experiment trackers (TensorBoard, MLflow), readable trial directories and the report's
best-so-far figure: real searches on a local Ray cluster, real Parquet, Optuna and MLflow
SQLite stores, TensorBoard's own event reader."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from tuner import report, search, tracking
from tuner.errors import ConfigError
from tuner.optuna_search import sqlite_storage
from tuner.space import load_space, to_yaml

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
DIRNAME = re.compile(r"^train_trial_([0-9a-f]+)_(\d+)$")


# ---------------------------------------------------------------------------- units
@pytest.mark.parametrize("text, kind, uri", [
    ("tensorboard", "tensorboard", None),
    ("mlflow", "mlflow", None),
    ("mlflow=http://127.0.0.1:5000", "mlflow", "http://127.0.0.1:5000"),
    ("mlflow=sqlite:///a=b.db", "mlflow", "sqlite:///a=b.db"),
])
def test_track_values(text: str, kind: str, uri: str | None) -> None:
    assert tracking.parse_track(text) == tracking.Track(kind, uri)


@pytest.mark.parametrize("text", ["wandb", "mlflow=", "tensorboard=x", "", "MLflow"])
def test_bad_track_value_is_one_line_usage_error(text: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        search.main(["--method", "bce", "--space", "x.yaml", "--track", text])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --track" in err and "tensorboard, mlflow or mlflow=URI" in err


def test_missing_tracker_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tracking.TRACKERS, "mlflow", "mlt_no_such_module")
    with pytest.raises(Exception, match=r"pip install -e '\.\[track\]'"):
        tracking.parse_track("mlflow")


def test_refused_mlflow_uri_is_one_line_error(tmp_path: Path) -> None:
    """MLflow 3 refuses a plain file store: one line naming the URI and what to pass."""
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(ConfigError, match=r"--track mlflow=file:.*sqlite:///") as exc:
        tracking.Tracking.start([tracking.Track("mlflow", uri)], tmp_path / "exp", resume=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "exp").exists()  # nothing written for a refused tracker


def test_trial_dirname_is_id_and_number() -> None:
    from ray.tune.experiment import Trial

    trial = Trial("train_trial", config={}, trial_id="0b9c2dcc", stub=True,
                  experiment_tag="12_attention=True,lr=0.0010,weight_decay=0.0001")
    assert search.trial_dirname(trial) == "train_trial_0b9c2dcc_12"


def test_trial_checkpoint_finds_old_and_new_directory_names(tmp_path: Path) -> None:
    """Experiments of older versions keep Tune's long names; both are found by trial id."""
    old = tmp_path / "train_trial_aaaa1111_1_backbone=small_cnn,lr=0.0014_2026-12-01_10-00-00"
    new = tmp_path / "train_trial_bbbb2222_2"
    for d in (old, new):
        (d / "checkpoint_000001").mkdir(parents=True)
        (d / "checkpoint_000001" / "state.pt").write_bytes(b"x")
    exp = report.Experiment(path=tmp_path, trials=pd.DataFrame(), board=pd.DataFrame(),
                            search={}, space=None, test={})
    assert report.trial_checkpoint(exp, "aaaa1111").parent.parent == old
    assert report.trial_checkpoint(exp, "bbbb2222").parent.parent == new


# ---------------------------------------------------------------------------- efficiency
def _trials(rows: list[tuple[str, int, float, float, int]]) -> pd.DataFrame:
    """Per-epoch rows (trial, epoch, time_total_s, val_mAP, timestamp) as trials.parquet has."""
    df = pd.DataFrame(rows, columns=["trial_id", "epoch", "time_total_s", "val_mAP", "timestamp"])
    df["config/train/lr"] = [0.001 * (1 + ord(t[0]) % 7) for t in df["trial_id"]]
    df["config/train/weight_decay"] = 1e-4
    return df


#: two trials that overlap in time: A's epochs end at 100, 125, 145 s, B's at 112, 120 s
TWO_TRIALS = [("a1", 1, 10.0, 30.0, 100), ("a1", 2, 25.0, 40.0, 125), ("a1", 3, 45.0, 35.0, 145),
              ("b2", 1, 12.0, 20.0, 112), ("b2", 2, 20.0, 45.0, 120)]


def write_experiment(path: Path, rows: list, sampler: str = "tpe", scheduler: str = "asha",
                     method: str = "bce", params: tuple[str, ...] = ("lr", "weight_decay"),
                     resources: dict | None = None) -> Path:
    """An experiment directory as tuner.search writes it (Parquet, CSV, YAML, JSON and a real
    Optuna study), without running the search."""
    path.mkdir(parents=True)
    trials = _trials(rows)
    trials.to_parquet(path / "trials.parquet")
    best = trials.groupby("trial_id")["val_mAP"].max().sort_values(ascending=False)
    epochs = trials.groupby("trial_id")["epoch"].max()
    pd.DataFrame({
        "trial_id": best.index, "status": ["COMPLETE"] * len(best), "val_mAP": best.values,
        "epochs": epochs[best.index].values, "best_epoch": 1,
        "config": json.dumps({"train": {"lr": 0.001}}),
    }).to_csv(path / "leaderboard.csv", index=False)
    space = load_space(ROOT / f"search_spaces/{method}.yaml")
    fixed = space.fixed_config({"train": {"lr": 0.001, "weight_decay": 1e-4}})
    fixed["search"].update(sampler=sampler, scheduler=scheduler)
    fixed["asha"]["max_epochs"] = 3
    fixed["resources"].update(resources or {})
    (path / "best_config.yaml").write_text(to_yaml(fixed))
    (path / "search.json").write_text(json.dumps(
        {"method": method, "view": "missing-q0.6-s0", "data_dir": "unused", "ray": "2.60.0"}))
    study = optuna.create_study(study_name=path.name, storage=sqlite_storage(path / "optuna.db"),
                                direction="maximize")
    dists = {f"train/{p}": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
             for p in params}
    for i, value in enumerate(best.values):
        study.add_trial(optuna.trial.create_trial(
            params={name: 1e-4 * (i + 1) for name in dists}, distributions=dists, value=value))
    return path


def test_efficiency_series_against_hand_computed_values(tmp_path: Path) -> None:
    exp = report.load_experiment(write_experiment(
        tmp_path / "asha", TWO_TRIALS, resources={"cpus_per_trial": 2, "data_cpus": 1,
                                                  "gpus_per_trial": 0.5}))
    s = report.efficiency_series(exp)
    # finishing order 100 (a1 e1), 112 (b2 e1), 120 (b2 e2), 125 (a1 e2), 145 (a1 e3)
    assert list(zip(s["trial_id"], s["epoch"])) == [("a1", 1), ("b2", 1), ("b2", 2), ("a1", 2),
                                                    ("a1", 3)]
    assert s["epochs_trained"].tolist() == [1, 2, 3, 4, 5]
    wall = np.cumsum([10.0, 12.0, 8.0, 15.0, 20.0])  # each epoch's own share of time_total_s
    np.testing.assert_allclose(s["cpu_hours"], wall * 3 / 3600)  # 2 training + 1 data CPU
    np.testing.assert_allclose(s["gpu_hours"], wall * 0.5 / 3600)
    np.testing.assert_allclose(s["best_val_mAP"], [30, 30, 45, 45, 45])
    _, totals = report.cost_ledger(exp)
    assert s["cpu_hours"].iloc[-1] == pytest.approx(totals["cpu_hours"])
    assert s["gpu_hours"].iloc[-1] == pytest.approx(totals["gpu_hours"])
    assert (s["strategy"] == "tpe+asha").all()


def test_report_compares_searches_of_the_same_space(tmp_path: Path) -> None:
    root = tmp_path / "experiments"
    asha = write_experiment(root / "asha", TWO_TRIALS)
    random_rows = [("c3", e, 20.0 * e, 25.0 + 5 * e, 200 + e) for e in (1, 2, 3)]
    write_experiment(root / "random", random_rows, sampler="random", scheduler="fifo")
    write_experiment(root / "seed2", TWO_TRIALS)                     # same strategy: not added
    write_experiment(root / "narrow", random_rows, sampler="random", scheduler="fifo",
                     params=("lr",))                                 # another space
    write_experiment(root / "hill", random_rows, sampler="random", scheduler="fifo",
                     method="hill")                                  # another method
    (root / "not-a-search").mkdir()
    (root / "not-a-search" / "search.json").write_text("{}")

    exp = report.load_experiment(asha)
    found = report.comparable_experiments(exp)
    assert [e.path.name for e in found] == ["random"]
    assert [e.path.name for e in report.comparable_experiments(exp, [root / "seed2"])] == [
        "seed2", "random"]
    with pytest.raises(ConfigError, match=r"--against .*narrow.*tuned parameters differs"):
        report.comparable_experiments(exp, [root / "narrow"])

    page = report.build_report(asha, per_class=False)
    assert (asha / "figures" / "efficiency.png").stat().st_size > 1000
    assert "compared with random (random+fifo)" in page.read_text()
    written = pd.read_csv(asha / "efficiency.csv", dtype={"trial_id": str})
    assert set(written["experiment"]) == {"asha", "random"}
    rand = written[written["experiment"] == "random"]
    np.testing.assert_allclose(rand["best_val_mAP"], [30, 35, 40])
    np.testing.assert_allclose(rand["cpu_hours"], np.array([20, 40, 60]) * 2 / 3600)
    assert (asha / "report.html").is_file() and not (asha / "tracking.json").exists()


def test_against_a_missing_directory_is_one_line_error(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    asha = write_experiment(tmp_path / "asha", TWO_TRIALS)
    assert report.main([str(asha), "--no-per-class", "--against", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope" in err and "\n" not in err


# ---------------------------------------------------------------------------- real searches
@pytest.fixture(scope="module")
def searches(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> dict[str, Path]:
    """Two real 2-trial, 2-epoch BCE searches of one space in one --out: ASHA + TPE tracked in
    TensorBoard and MLflow, and random search (FIFO) without trackers."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tmp = tmp_path_factory.mktemp("trackers")
    shutil.copytree(digits_dir, tmp / "data")
    space = yaml.safe_load((ROOT / "search_spaces/bce.yaml").read_text())
    space["asha"] = {"max_epochs": EPOCHS, "grace_period": 1, "reduction_factor": 2}
    space["search"].update(num_trials=2, max_concurrent=2, seed=5)
    (tmp / "bce.yaml").write_text(yaml.safe_dump(space))
    common = ["--method", "bce", "--space", str(tmp / "bce.yaml"), "--out", str(tmp / "exp"),
              "--data-dir", str(tmp / "data")]
    try:
        assert search.main([*common, "--name", "tracked", "--track", "tensorboard",
                            "--track", "mlflow"]) == 0
        assert search.main([*common, "--name", "random", "--sampler", "random",
                            "--scheduler", "fifo", "--no-test"]) == 0
    finally:
        ray.shutdown()
    return {"tracked": tmp / "exp" / "tracked", "random": tmp / "exp" / "random"}


def _trial_dirs(exp: Path) -> dict[str, Path]:
    return {DIRNAME.match(d.name).group(1): d for d in exp.iterdir()
            if d.is_dir() and d.name.startswith("train_trial_")}


@pytest.mark.integration
def test_trial_directories_are_named_by_id_and_number(searches: dict[str, Path]) -> None:
    for exp in searches.values():
        names = sorted(d.name for d in exp.iterdir() if d.name.startswith("train_trial_"))
        assert len(names) == 2 and all(DIRNAME.match(n) for n in names), names
        assert sorted(DIRNAME.match(n).group(2) for n in names) == ["1", "2"]
        board = pd.read_csv(exp / "leaderboard.csv", dtype={"trial_id": str})
        assert sorted(board["trial_dir"]) == names
        for _, row in board.iterrows():
            assert DIRNAME.match(row["trial_dir"]).group(1) == row["trial_id"]
            assert json.loads(row["config"])["train"]["lr"] > 0  # the configuration is there


@pytest.mark.integration
def test_tensorboard_reads_every_epoch_and_the_hyperparameters(searches: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    exp = searches["tracked"]
    trials = pd.read_parquet(exp / "trials.parquet")
    dirs = _trial_dirs(exp)
    assert set(dirs) == set(trials["trial_id"])
    for trial_id, rows in trials.groupby("trial_id"):
        events = EventAccumulator(str(dirs[trial_id]))
        events.Reload()
        scalars = set(events.Tags()["scalars"])
        for metric in ("val_mAP", "val_mAP_tail", "train_loss", "lr", "epoch"):
            assert f"ray/tune/{metric}" in scalars, metric
        logged = events.Scalars("ray/tune/val_mAP")
        assert [e.step for e in logged] == rows["epoch"].tolist()  # steps are epochs
        np.testing.assert_allclose([e.value for e in logged], rows["val_mAP"], rtol=1e-6)
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert hparams["train/lr"].number_value == pytest.approx(rows["config/train/lr"].iloc[0])


@pytest.mark.integration
def test_mlflow_has_one_parent_and_a_child_run_per_trial(searches: dict[str, Path]) -> None:
    from mlflow.tracking import MlflowClient

    exp = searches["tracked"]
    state = json.loads((exp / "tracking.json").read_text())
    assert state["mlflow"]["uri"] == f"sqlite:///{exp.resolve() / 'mlflow.db'}"
    client = MlflowClient(state["mlflow"]["uri"])
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    trials = pd.read_parquet(exp / "trials.parquet")
    for child in children:
        trial_id = child.data.tags["trial_name"].removeprefix("train_trial_")
        rows = trials[trials["trial_id"] == trial_id].sort_values("epoch")
        history = client.get_metric_history(child.info.run_id, "val_mAP")
        assert [m.step for m in history] == rows["epoch"].tolist()
        np.testing.assert_allclose([m.value for m in history], rows["val_mAP"], rtol=1e-6)
        assert float(child.data.params["train/lr"]) == pytest.approx(
            rows["config/train/lr"].iloc[0])
        assert child.info.status == "FINISHED"
    test = json.loads((exp / "test_metrics.json").read_text())
    assert parent.data.metrics["test_mAP"] == pytest.approx(test["mAP"])
    assert parent.data.metrics["test_mAP_tail"] == pytest.approx(test["mAP_tail"])
    board = pd.read_csv(exp / "leaderboard.csv", dtype={"trial_id": str})
    assert parent.data.tags["best_trial"] == board["trial_id"].iloc[0]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/leaderboard.csv", "search/test_metrics.json"} <= artifacts
    assert str(exp.resolve() / "mlartifacts") in parent.info.artifact_uri


@pytest.mark.integration
def test_report_figure_compares_asha_with_random_search(searches: dict[str, Path]) -> None:
    """The report of the tracked search finds the random search next to it, and logs itself
    on the MLflow parent run."""
    from mlflow.tracking import MlflowClient

    exp = searches["tracked"]
    assert report.main([str(exp)]) == 0  # per-class figure: the checkpoint under the new name
    series = pd.read_csv(exp / "efficiency.csv", dtype={"trial_id": str})
    assert list(series["experiment"].unique()) == ["tracked", "random"]
    for name, path in searches.items():
        own = series[series["experiment"] == name]
        trials = pd.read_parquet(path / "trials.parquet")
        assert len(own) == len(trials) and own["epochs_trained"].tolist() == list(
            range(1, len(trials) + 1))
        assert own["best_val_mAP"].iloc[-1] == pytest.approx(trials["val_mAP"].max())
        assert own["best_val_mAP"].is_monotonic_increasing
        _, totals = report.cost_ledger(report.load_experiment(path))
        assert own["cpu_hours"].iloc[-1] == pytest.approx(totals["cpu_hours"])
    rand = series[series["experiment"] == "random"]
    assert (rand["strategy"] == "random+fifo").all() and len(rand) == 2 * EPOCHS
    state = json.loads((exp / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(state["uri"])
    logged = {a.path for a in client.list_artifacts(state["parent_run_id"], "report")}
    assert {"report/report.html", "report/efficiency.csv", "report/per_class_ap.csv"} <= logged
    assert not math.isnan(series["cpu_hours"].max())


def _finished_trials(exp: Path) -> int:
    """Finished Optuna trials, read without writing to the database (see test_resume)."""
    import sqlite3

    if not (exp / "optuna.db").is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{exp / 'optuna.db'}?mode=ro", uri=True, timeout=5) as con:
            (count,) = con.execute("SELECT COUNT(*) FROM trials WHERE state IN "
                                   "('COMPLETE', 'PRUNED', 'FAIL')").fetchone()
    except sqlite3.OperationalError:
        return 0
    return int(count)


@pytest.mark.integration
def test_resumed_search_continues_its_mlflow_runs(tmp_path: Path, kill_session) -> None:
    """A tracked search killed after its first trial and resumed: still one parent run and one
    child run per trial, each child with every epoch (Tune restores the callbacks)."""
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    space = yaml.safe_load((ROOT / "search_spaces/bce.yaml").read_text())
    space["asha"] = {"max_epochs": EPOCHS, "grace_period": EPOCHS, "reduction_factor": 2}
    space["search"].update(num_trials=2, max_concurrent=1, seed=0)
    (tmp_path / "bce.yaml").write_text(yaml.safe_dump(space))
    exp = tmp_path / "exp" / "crash"
    cmd = [sys.executable, "-m", "tuner.search", "--method", "bce", "--space",
           str(tmp_path / "bce.yaml"), "--out", str(tmp_path / "exp"), "--name", "crash",
           "--data-dir", str(tmp_path / "data"), "--no-test", "--track", "mlflow"]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        while _finished_trials(exp) < 1:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first trial never finished"
            time.sleep(1)
        time.sleep(3)  # let the second trial start
    finally:
        kill_session(proc)
    parent_id = json.loads((exp / "tracking.json").read_text())["mlflow"]["parent_run_id"]

    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming it" in resumed.stdout
    state = json.loads((exp / "tracking.json").read_text())["mlflow"]
    assert state["parent_run_id"] == parent_id
    client = MlflowClient(state["uri"])
    runs = client.search_runs([state["experiment_id"]])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(runs) == 3 and len(children) == 2, [r.info.run_name for r in runs]
    assert client.get_run(parent_id).info.status == "FINISHED"
    for child in children:
        steps = {m.step for m in client.get_metric_history(child.info.run_id, "val_mAP")}
        assert steps == set(range(1, EPOCHS + 1)), child.info.run_name
