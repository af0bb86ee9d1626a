"""Experiment trackers of a search (``--track tensorboard``, ``--track mlflow[=URI]``).

Both go through Ray Tune's own logger callbacks, which run on the driver:

* **TensorBoard**: Tune's ``TBXLoggerCallback`` writes one event file per trial into its trial
  directory (every numeric metric the trial reports, as ``ray/tune/<metric>``; the
  hyperparameters and final metrics in the HParams plugin when the trial ends).
  ``tensorboard --logdir EXPERIMENT_DIR`` shows them.
* **MLflow**: Tune's ``MLflowLoggerCallback`` makes one run per trial (its configuration as
  parameters, every epoch's metrics), each a child (``mlflow.parentRunId``) of one parent run
  per search that the driver creates here. At the end the parent run gets the best trial's
  test metrics and the search's output files as artifacts; ``tuner.report`` adds its report.
  Default store: a SQLite file in the experiment directory (``mlflow.db``, artifacts under
  ``mlartifacts/``): MLflow 3 refuses a plain file store (``./mlruns``) unless
  ``MLFLOW_ALLOW_FILE_STORE=true``.

The one change to Ray's callbacks: the step of every metric is the trial's ``epoch``, not
Tune's ``training_iteration``, which restarts from zero when a trial is relaunched from a
checkpoint. (Without ``--track tensorboard`` Tune still adds its stock TBX logger when
tensorboardX is installed, as it is with ``ray[tune]``: event files stepped by iteration.) A resumed search continues the same parent run and the same child runs
(``tracking.json`` holds what was started). Both packages come with the ``track`` extra:
``pip install -e '.[track]'``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import ConfigError

__all__ = ["TRACKERS", "Track", "Tracking", "log_report", "parse_track"]

#: tracker name -> the module it needs to write
TRACKERS = {"tensorboard": "tensorboardX", "mlflow": "mlflow"}
STATE_FILE = "tracking.json"
#: what starting the trackers writes into an experiment directory
FILES = {STATE_FILE, "mlflow.db", "mlartifacts"}
INSTALL = "pip install -e '.[track]'"


@dataclass(frozen=True)
class Track:
    """One ``--track`` value: the tracker and, for MLflow, its tracking URI (None: default)."""

    kind: str
    uri: str | None = None


def parse_track(text: str) -> Track:
    """``--track`` values: ``tensorboard``, ``mlflow`` or ``mlflow=URI`` (argparse type).

    The tracker's package must be importable: a missing one is refused before anything runs.
    """
    kind, sep, uri = text.partition("=")
    if kind not in TRACKERS or (sep and (kind != "mlflow" or not uri)):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected tensorboard, mlflow or mlflow=URI (e.g. mlflow=http://host:5000)")
    import importlib.util

    if importlib.util.find_spec(TRACKERS[kind]) is None:
        raise argparse.ArgumentTypeError(
            f"{kind} needs the {TRACKERS[kind]} package, which is not installed: {INSTALL}")
    return Track(kind, uri or None)


def default_mlflow_uri(exp_dir: Path) -> str:
    """The search's own MLflow store: SQLite in the experiment directory."""
    return f"sqlite:///{exp_dir.resolve() / 'mlflow.db'}"


class Tracking:
    """The trackers of one search: Tune callbacks and the MLflow parent run."""

    def __init__(self, exp_dir: Path, state: Mapping[str, Any]) -> None:
        self.exp_dir = exp_dir
        self.state = dict(state)

    @classmethod
    def start(cls, tracks: Sequence[Track] | None, exp_dir: Path, resume: bool) -> Tracking:
        """Start (or, in an experiment that has them, continue) the trackers of a search.

        A resumed search keeps the trackers it was started with (Tune restores its callbacks
        with it); ``--track`` values that differ are ignored with a note.
        """
        saved_file = exp_dir / STATE_FILE
        saved = json.loads(saved_file.read_text()) if saved_file.is_file() else None
        wanted = {t.kind: t.uri for t in tracks or ()}
        if saved is not None and (resume or set(wanted) == set(saved["tracks"])):
            if wanted and set(wanted) != set(saved["tracks"]):
                print(f"note: the resumed search keeps its trackers "
                      f"({', '.join(saved['tracks']) or 'none'}); --track is ignored")
            return cls(exp_dir, saved)
        if resume:
            if wanted:
                print("note: the resumed search was started without trackers; --track is ignored")
            return cls(exp_dir, {"tracks": {}})
        state: dict[str, Any] = {"tracks": dict(wanted)}
        if not wanted:
            return cls(exp_dir, state)
        if "mlflow" in wanted:
            state["mlflow"] = _start_parent(exp_dir, wanted["mlflow"])
        exp_dir.mkdir(parents=True, exist_ok=True)
        saved_file.write_text(json.dumps(state, indent=1))
        return cls(exp_dir, state)

    def callbacks(self) -> list[Any]:
        """The Tune logger callbacks (a new search; a resumed one restores its own)."""
        out: list[Any] = []
        if "tensorboard" in self.state["tracks"]:
            out.append(_epoch_tbx_callback())
        if "mlflow" in self.state:
            ml = self.state["mlflow"]
            out.append(_mlflow_callback(ml["uri"], ml["experiment"], ml["parent_run_id"]))
        return out

    def finish(self, best: Mapping[str, Any] | None, test: Mapping[str, float] | None) -> None:
        """End of the search: the best trial (``best``: its last Tune result) with its test
        metrics, and the search's output files, on the parent run."""
        if "tensorboard" in self.state["tracks"]:
            print(f"TensorBoard: tensorboard --logdir {self.exp_dir}")
        if "mlflow" not in self.state:
            return
        ml = self.state["mlflow"]
        client = _client(ml["uri"])
        run_id = ml["parent_run_id"]
        if best is not None:
            client.set_tag(run_id, "best_trial", str(best.get("trial_id")))
            client.log_metric(run_id, "best_val_mAP", float(best.get("best_val_mAP", "nan")))
        for key, value in (test or {}).items():
            if isinstance(value, (int, float)):
                client.log_metric(run_id, f"test_{key}", float(value))
        _log_files(client, run_id, self.exp_dir, _OUTPUTS, "search")
        client.set_terminated(run_id, "FINISHED")
        print(f"MLflow: parent run {run_id} in experiment {ml['experiment']!r} at {ml['uri']}")


#: the search's output files logged as artifacts of the parent run
_OUTPUTS = ("leaderboard.csv", "best_config.yaml", "test_metrics.json", "search.json",
            "trials.parquet")


def log_report(exp_dir: Path, files: Iterable[Path]) -> str | None:
    """Log a report's files on the search's MLflow parent run, when the search had one."""
    saved = exp_dir / STATE_FILE
    if not saved.is_file():
        return None
    ml = json.loads(saved.read_text()).get("mlflow")
    if not ml:
        return None
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        print(f"note: the search logged to MLflow but mlflow is not installed ({INSTALL}); "
              f"the report is not logged there")
        return None
    client = _client(ml["uri"])
    names = [str(Path(f).relative_to(exp_dir)) for f in files]
    _log_files(client, ml["parent_run_id"], exp_dir, names, "report")
    return str(ml["parent_run_id"])


def _log_files(client: Any, run_id: str, root: Path, names: Iterable[str], where: str) -> None:
    for name in names:
        path = root / name
        if path.is_file():
            sub = str(Path(where) / Path(name).parent) if Path(name).parent != Path(".") else where
            client.log_artifact(run_id, str(path), artifact_path=sub)


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _start_parent(exp_dir: Path, uri: str | None) -> dict[str, str]:
    """Create the search's MLflow experiment (named after the directory) and parent run."""
    from mlflow.exceptions import MlflowException

    own = uri is None
    if own:
        exp_dir.mkdir(parents=True, exist_ok=True)  # the store lives in it
    uri = uri or default_mlflow_uri(exp_dir)
    name = exp_dir.name
    try:
        client = _client(uri)
        found = client.get_experiment_by_name(name)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            where = (exp_dir.resolve() / "mlartifacts").as_uri() if own else None
            experiment_id = client.create_experiment(name, artifact_location=where)
        run = client.create_run(experiment_id, run_name=name,
                                tags={"mlt.role": "search", "mlt.experiment": name})
    except MlflowException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise ConfigError(
            f"--track mlflow={uri}: MLflow refused it ({first}); pass a database or server URI "
            f"(sqlite:///PATH/mlflow.db, http://HOST:PORT) or plain --track mlflow") from None
    return {"uri": uri, "experiment": name, "experiment_id": str(experiment_id),
            "parent_run_id": run.info.run_id}


def _with_epoch_step(result: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a Tune result whose step (``timesteps_total``) is the trial's epoch."""
    from ray.tune.result import TIMESTEPS_TOTAL

    out = dict(result)
    if "epoch" in result:
        out[TIMESTEPS_TOTAL] = int(result["epoch"])
    return out


def _epoch_tbx_callback() -> Any:
    """Ray's ``TBXLoggerCallback``, stepping every scalar by epoch."""
    from ray.tune.logger import TBXLoggerCallback

    class EpochTBXLoggerCallback(TBXLoggerCallback):
        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            super().log_trial_result(iteration, trial, _with_epoch_step(result))

    return EpochTBXLoggerCallback()


def _mlflow_callback(uri: str, experiment: str, parent_run_id: str) -> Any:
    """Ray's ``MLflowLoggerCallback``: child runs of ``parent_run_id``, stepped by epoch, and a
    trial that already has a child run (a resumed search) continues it."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class ChildRunsMLflowLoggerCallback(MLflowLoggerCallback):
        def log_trial_start(self, trial: Any) -> None:
            if trial not in self._trial_runs:
                client = self.mlflow_util._get_client()
                found = client.search_runs(
                    [self.mlflow_util.experiment_id], max_results=1,
                    filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                  f"tags.trial_name = '{trial}'")
                if found:
                    self._trial_runs[trial] = found[0].info.run_id
            super().log_trial_start(trial)

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            metrics = {k: v for k, v in result.items() if k != "config"}
            step = int(result.get("epoch", iteration))
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial],
                                         metrics_to_log=metrics, step=step)

    return ChildRunsMLflowLoggerCallback(
        tracking_uri=uri, experiment_name=experiment,
        tags={"mlflow.parentRunId": parent_run_id, "mlt.role": "trial",
              "mlt.experiment": experiment})
