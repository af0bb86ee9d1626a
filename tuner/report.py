"""``python -m tuner.report EXPERIMENT_DIR``: an HTML report with PNG figures of one search.

Reads what :mod:`tuner.search` wrote (``trials.parquet``, ``leaderboard.csv``,
``best_config.yaml``, ``test_metrics.json``, ``search.json``, ``optuna.db`` and the best
trial's checkpoint) and writes, inside the experiment directory::

    report.html              leaderboard, cost ledger, figures
    cost.csv                 per trial: epochs, wall time, CPU-hours, GPU-hours, stopped or not
    per_class_ap.csv         the best trial's per-class AP on the test split, class frequencies
    figures/learning_curves.png      validation mAP per epoch of every trial, ASHA rungs marked
    figures/parallel_coordinates.png hyperparameters vs best validation mAP
    figures/importance.png           Optuna's hyperparameter importance (its default evaluator)
    figures/long_tail.png            per-class AP vs training class frequency (best trial)
    figures/efficiency.png   best-so-far validation mAP vs epochs trained and GPU-/CPU-hours,
                             with the other searches of the same space (another sampler or
                             scheduler, e.g. random search next to ASHA + TPE)
    efficiency.csv           the numbers of that figure, one row per trained epoch

A search that logged to MLflow (``--track mlflow``) also gets these files as artifacts of its
parent run (``report/``).

Costs are *reserved* resources times wall time, per trial: GPU-hours = ``gpus_per_trial`` x
Tune's ``time_total_s``; CPU-hours = (``cpus_per_trial`` + ``data_cpus``) x ``time_total_s``
(the trial's training CPUs and the cap of its Ray Data pipeline). The driver's test scoring
is not counted. The Optuna study opens in optuna-dashboard with
``python -m tuner.dashboard EXPERIMENT_DIR`` (or ``optuna-dashboard sqlite:///EXPERIMENT_DIR/optuna.db``).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tuner.cli import run_cli
from tuner.errors import ConfigError, DataError
from tuner.tracking import log_report

__all__ = [
    "Experiment",
    "asha_rungs",
    "build_report",
    "comparable_experiments",
    "cost_ledger",
    "efficiency_series",
    "load_experiment",
    "load_state_restricted",
    "pyplot",
    "save_figure",
    "main",
    "per_class_table",
]

GROUP_COLORS = {"head": "#1f77b4", "medium": "#ff7f0e", "tail": "#d62728"}
STATUS_COLORS = {"COMPLETE": "#2ca02c", "STOPPED": "#7f7f7f", "ERROR": "#d62728"}
METRIC_KEYS = ("mAP", "mAP_head", "mAP_medium", "mAP_tail")
REQUIRED = ("trials.parquet", "leaderboard.csv", "best_config.yaml", "search.json")


@dataclass
class Experiment:
    """One experiment directory, loaded.

    Attributes:
        path: the directory.
        trials: per-epoch rows of every trial (``trials.parquet``).
        board: one row per trial, best first (``leaderboard.csv``).
        search: ``search.json``.
        space: the best trial's space (``best_config.yaml``): data, ASHA and resource settings.
        test: ``test_metrics.json`` (empty when the search ran with ``--no-test``).
    """

    path: Path
    trials: pd.DataFrame
    board: pd.DataFrame
    search: dict[str, Any]
    space: Any
    test: dict[str, float]

    @property
    def study_url(self) -> str:
        return f"sqlite:///{self.path / 'optuna.db'}"

    def load_study(self) -> Any:
        """The Optuna study (named after the directory), or None without ``optuna.db``."""
        import optuna

        from tuner.optuna_search import sqlite_storage

        if not (self.path / "optuna.db").is_file():
            return None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.load_study(study_name=self.path.name,
                                 storage=sqlite_storage(self.path / "optuna.db"))


def load_experiment(path: str | Path) -> Experiment:
    """Load an experiment directory; a missing or foreign directory is one clear error."""
    from tuner.space import load_space

    exp = Path(path)
    if not exp.is_dir():
        raise DataError(f"experiment directory {exp} does not exist; pass the directory that "
                        "python -m tuner.search printed")
    missing = [name for name in REQUIRED if not (exp / name).is_file()]
    if missing:
        raise DataError(f"{exp} lacks {', '.join(missing)}; is it an unfinished search? "
                        "Run the search to the end (or pass another directory)")
    test_file = exp / "test_metrics.json"
    return Experiment(
        path=exp,
        trials=pd.read_parquet(exp / "trials.parquet"),
        board=pd.read_csv(exp / "leaderboard.csv", dtype={"trial_id": str}),
        search=json.loads((exp / "search.json").read_text()),
        space=load_space(exp / "best_config.yaml"),
        test=json.loads(test_file.read_text()) if test_file.is_file() else {},
    )


# ---------------------------------------------------------------------------- numbers
def asha_rungs(grace_period: int, max_epochs: int, reduction_factor: float) -> list[int]:
    """Epochs at which Ray's ASHA (one bracket) compares trials, below ``max_epochs``.

    Ray 2.60 ``_Bracket``: ``grace_period * reduction_factor**k`` for
    ``k < int(log(max_t / grace_period) / log(reduction_factor) + 1)``.
    """
    if grace_period >= max_epochs or reduction_factor <= 1:
        return []
    count = int(math.log(max_epochs / grace_period) / math.log(reduction_factor) + 1)
    rungs = [grace_period * reduction_factor**k for k in range(count)]
    return [int(r) for r in rungs if r < max_epochs]


def cost_ledger(exp: Experiment) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-trial and per-search GPU-hours and CPU-hours, and the share spent on stopped trials.

    Returns:
        ``(table, totals)``: the table has one row per trial (``trial_id``, ``status``,
        ``epochs``, ``wall_s``, ``cpu_hours``, ``gpu_hours``); totals sum them and give
        ``stopped_share_gpu`` / ``stopped_share_cpu`` (NaN when nothing was spent).
    """
    cpus, gpus = _reserved(exp)
    last = exp.trials.sort_values("epoch").groupby("trial_id", sort=False).tail(1)
    status = exp.board.set_index("trial_id")["status"]
    table = pd.DataFrame({
        "trial_id": last["trial_id"].astype(str).values,
        "epochs": last["epoch"].astype(int).values,
        "wall_s": last["time_total_s"].astype(float).values,
    })
    table["status"] = [status.get(t, "UNKNOWN") for t in table["trial_id"]]
    table["cpu_hours"] = table["wall_s"] * cpus / 3600.0
    table["gpu_hours"] = table["wall_s"] * gpus / 3600.0
    table = table.sort_values("trial_id").reset_index(drop=True)
    stopped = table["status"] == "STOPPED"
    totals = {"trials": float(len(table)), "wall_s": float(table["wall_s"].sum())}
    for unit in ("cpu", "gpu"):
        spent = float(table[f"{unit}_hours"].sum())
        totals[f"{unit}_hours"] = spent
        totals[f"stopped_share_{unit}"] = (
            float(table.loc[stopped, f"{unit}_hours"].sum()) / spent if spent > 0 else math.nan)
    totals["stopped_share_time"] = (
        float(table.loc[stopped, "wall_s"].sum()) / totals["wall_s"] if totals["wall_s"] else math.nan)
    return table, totals


def _reserved(exp: Experiment) -> tuple[float, float]:
    """CPUs and GPUs a trial reserves, as the cost ledger counts them."""
    res = exp.space.resources
    return float(res["cpus_per_trial"]) + float(res["data_cpus"]), float(res["gpus_per_trial"])


def strategy(exp: Experiment) -> str:
    """``sampler+scheduler`` of a search, e.g. ``tpe+asha`` or ``random+fifo``."""
    return f"{exp.space.search['sampler']}+{exp.space.search['scheduler']}"


def efficiency_series(exp: Experiment) -> pd.DataFrame:
    """Best-so-far validation mAP of a search against the compute it had spent.

    One row per trained epoch of any trial, in the order the epochs finished (Tune's
    ``timestamp``): ``epochs_trained`` counts them, ``cpu_hours`` / ``gpu_hours`` add each
    epoch's share of its trial's ``time_total_s`` times the reserved resources (so the last
    row equals the cost ledger's totals), ``best_val_mAP`` is the running maximum of
    ``val_mAP``.
    """
    cpus, gpus = _reserved(exp)
    rows = exp.trials.copy()
    rows["trial_id"] = rows["trial_id"].astype(str)
    rows = rows.sort_values(["trial_id", "epoch", "time_total_s"], kind="stable")
    spent = rows.groupby("trial_id")["time_total_s"].diff().fillna(rows["time_total_s"])
    rows["wall_s"] = spent.clip(lower=0.0).astype(float)
    order = ["timestamp", "time_total_s"] if "timestamp" in rows else ["time_total_s"]
    rows = rows.sort_values(order, kind="stable").reset_index(drop=True)
    return pd.DataFrame({
        "experiment": exp.path.name,
        "strategy": strategy(exp),
        "trial_id": rows["trial_id"],
        "epoch": rows["epoch"].astype(int),
        "val_mAP": rows["val_mAP"].astype(float),
        "epochs_trained": np.arange(1, len(rows) + 1),
        "cpu_hours": (rows["wall_s"] * cpus / 3600.0).cumsum(),
        "gpu_hours": (rows["wall_s"] * gpus / 3600.0).cumsum(),
        "best_val_mAP": rows["val_mAP"].astype(float).cummax().ffill(),
    })


def space_difference(a: Experiment, b: Experiment) -> str | None:
    """What keeps two searches from being runs of the same space (None: nothing).

    Same space = same method, label view, benchmark, epoch budget and tuned parameters (the
    names in their Optuna studies).
    """
    checks = {
        "method": (a.space.method, b.space.method),
        "label view": (a.search.get("view"), b.search.get("view")),
        "benchmark": (a.space.data["benchmark"], b.space.data["benchmark"]),
        "epoch budget": (a.space.max_epochs, b.space.max_epochs),
        "tuned parameters": (sorted(tunable_columns(a, a.load_study())),
                             sorted(tunable_columns(b, b.load_study()))),
    }
    for what, (x, y) in checks.items():
        if x != y:
            return f"{what} differs ({x} vs {y})"
    return None


def comparable_experiments(exp: Experiment, against: Sequence[str | Path] = ()) -> list[Experiment]:
    """The searches to plot next to ``exp``: each ``against`` directory (it must be a search
    of the same space), and every finished search in the same parent directory of the same
    space whose sampler or scheduler differs from ``exp``'s."""
    found: dict[Path, Experiment] = {}
    for path in against:
        other = load_experiment(path)
        diff = space_difference(exp, other)
        if diff is not None:
            raise ConfigError(f"--against {path}: not a search of the same space as "
                              f"{exp.path.name}: {diff}; pass a search of the same space")
        found[other.path.resolve()] = other
    for path in sorted(exp.path.resolve().parent.iterdir()):
        if path == exp.path.resolve() or path in found or not all(
                (path / name).is_file() for name in REQUIRED):
            continue
        try:
            if json.loads((path / "search.json").read_text()).get("method") != exp.space.method:
                continue
            other = load_experiment(path)
        except (DataError, ConfigError, ValueError, OSError):
            continue  # not a readable search: not a sibling
        if strategy(other) != strategy(exp) and space_difference(exp, other) is None:
            found[path] = other
    return list(found.values())


def tunable_columns(exp: Experiment, study: Any) -> dict[str, Any]:
    """``config/...`` column -> Optuna distribution (None when unknown) of every tuned value."""
    out: dict[str, Any] = {}
    if study is not None:
        for trial in study.trials:
            for name, dist in trial.distributions.items():
                key = f"config/{name}"
                out[key] = _widen(out[key], dist) if key in out else dist
    for col in exp.trials.columns:
        if col.startswith("config/") and col not in out and exp.trials[col].nunique() > 1:
            out[col] = None
    return {col: dist for col, dist in out.items() if col in exp.trials.columns}


def _widen(a: Any, b: Any) -> Any:
    """One axis for a parameter whose range depends on another (e.g. ``[alpha_start, 1]``)."""
    if hasattr(a, "low") and hasattr(b, "low") and type(a) is type(b):
        return type(a)(min(a.low, b.low), max(a.high, b.high), log=a.log)
    return a


# ---------------------------------------------------------------------------- per-class AP
def load_state_restricted(path: Path) -> dict[str, Any]:
    """A ``state.pt`` written by the loop, through the restricted loader of the trials."""
    from tuner.trainable import load_state_file

    return load_state_file(path)


def trial_checkpoint(exp: Experiment, trial_id: str, run: str = "") -> Path:
    """The latest ``state.pt`` of a trial (its ``best`` entry holds the best weights);
    ``run``: a Tune run inside the experiment (``repeats``), else the search's own trials."""
    base = exp.path / run if run else exp.path
    pattern = f"*_{trial_id}_*" if run else f"train_trial_{trial_id}_*"
    files = sorted(p for d in sorted(base.glob(pattern)) for p in d.glob("checkpoint_*/state.pt"))
    if not files:
        raise DataError(f"no checkpoint of trial {trial_id} under {base}; the per-class "
                        "figure needs the trial directories (or pass --no-per-class)")
    return files[-1]


@dataclass(frozen=True)
class TestedRun:
    """The run whose best weights ``test_metrics.json`` scored.

    Attributes:
        trial_id: the search trial whose leaderboard row carries the test figures (with
            ``search.repeats``: the winning configuration's search trial).
        config: the run's configuration (with repeats: the winner's, with the scored seed).
        run: ``""`` for a search trial, ``"repeats"`` for a re-trained seed.
        run_trial_id: the Tune trial id inside ``run``.

    Its ``state.pt`` is found by :meth:`state_file`.
    """

    trial_id: str
    config: dict[str, Any]
    run: str = ""
    run_trial_id: str = ""

    def state_file(self, exp: Experiment) -> Path:
        return trial_checkpoint(exp, self.run_trial_id or self.trial_id, self.run)


def tested_run(exp: Experiment) -> TestedRun:
    """Which run the test split was scored on: the best trial of the search, or, after
    ``search.repeats``, the winning configuration's seed with the best validation mAP."""
    info = exp.search.get("repeats") or {}
    table_file = exp.path / "repeats.csv"
    if info.get("winner_trial") is not None and table_file.is_file():
        table = pd.read_csv(table_file, dtype={"trial_id": str, "repeat_trial_id": str})
        mine = table[(table["trial_id"] == str(info["winner_trial"]))
                     & (table["seed"] == int(info.get("test_from_seed", -1)))]
        if not mine.empty:
            row = mine.iloc[0]
            return TestedRun(trial_id=str(info["winner_trial"]), config=json.loads(row["config"]),
                             run="repeats", run_trial_id=str(row["repeat_trial_id"]))
    row = _best_row(exp)
    return TestedRun(trial_id=str(row["trial_id"]), config=json.loads(row["config"]))


def per_class_table(exp: Experiment, split: str = "test") -> pd.DataFrame:
    """Per-class AP of the tested run's best weights on ``split`` (:func:`tested_run`: the
    best trial, or the repeats' winner) and training frequencies.

    Columns: ``class``, ``name``, ``group`` (head/medium/tail of the clean training labels),
    ``train_count`` (clean positives), ``observed_count`` (positives of the label view the
    method trained on), ``ap`` (in percent, NaN for a class without a positive in ``split``).
    """
    import torch

    from methods.registry import create_method
    from tuner.backbones import build_model
    from tuner.data.prepared import PreparedData
    from tuner.data.stream import load_split
    from tuner.loop import predict
    from tuner.metrics import per_class_ap
    from tuner.trainable import TrialSetup, task_info, train_config

    tested = tested_run(exp)
    config = tested.config
    data = PreparedData(exp.search["data_dir"])
    view = exp.space.view()
    setup = TrialSetup(method=exp.space.method, data_dir=str(data.root), view=view,
                       max_epochs=exp.space.max_epochs,
                       groups=data.groups(view if exp.space.data["groups"] == "observed" else None),
                       stats_from_clean=exp.space.data["class_stats"] == "clean")
    state = load_state_restricted(tested.state_file(exp))
    cfg = train_config(config, setup)
    method = create_method(setup.method, config.get("method", {}),
                           task_info(data, setup, data.manifest["splits"]["train"]["num_images"]))
    model = method.configure_model(build_model(cfg.backbone, data.num_classes))
    model.load_state_dict(state["best"]["model"])
    method.load_state_dict(state["best"].get("method") or state["method"])
    images, _ = load_split(data.shard_files(split), cfg.image_size)
    _, targets = data.true_labels(split)
    ignore = data.ignore_mask(split)  # e.g. VOC07 difficult objects, left out of AP
    scores = predict(method, model, images, cfg.eval_batch_size, torch.device("cpu"))
    group_of = {c: g for g, members in setup.groups.items() for c in members}
    return pd.DataFrame({
        "class": range(data.num_classes),
        "name": list(data.class_names),
        "group": [group_of.get(c, "") for c in range(data.num_classes)],
        "train_count": data.class_counts(None),
        "observed_count": data.class_counts(view),
        "ap": 100.0 * per_class_ap(scores, targets, ignore),
    })


def _best_row(exp: Experiment) -> pd.Series:
    ok = exp.board[exp.board["status"] != "ERROR"].dropna(subset=["val_mAP"])
    if ok.empty:
        raise DataError(f"every trial of {exp.path} failed; nothing to report per class")
    return ok.sort_values("val_mAP", ascending=False).iloc[0]


# ---------------------------------------------------------------------------- figures
def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(exp: Experiment, out: Path) -> Path:
    """Validation mAP per epoch of every trial; ASHA rungs as dashed lines, stops as crosses."""
    plt = pyplot()
    asha = exp.space.asha
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for rung in asha_rungs(int(asha["grace_period"]), exp.space.max_epochs,
                           float(asha["reduction_factor"])):
        ax.axvline(rung, color="0.6", ls="--", lw=1)
        ax.text(rung, 1.0, f" rung {rung}", transform=ax.get_xaxis_transform(),
                va="top", ha="left", fontsize=8, color="0.4")
    status = exp.board.set_index("trial_id")["status"]
    for trial_id, rows in exp.trials.sort_values("epoch").groupby("trial_id"):
        state = status.get(str(trial_id), "UNKNOWN")
        color = STATUS_COLORS.get(state, "k")
        ax.plot(rows["epoch"], rows["val_mAP"], "-o", ms=3, lw=1.2, color=color, alpha=0.8)
        if state == "STOPPED":
            ax.plot(rows["epoch"].iloc[-1], rows["val_mAP"].iloc[-1], "x", color="k", ms=7)
    handles = [plt.Line2D([], [], color=c, marker="o", label=s.lower())
               for s, c in STATUS_COLORS.items() if s in set(status)]
    handles.append(plt.Line2D([], [], color="k", marker="x", ls="", label="stopped by ASHA"))
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set(xlabel="epoch", ylabel="validation mAP (%)",
           title=f"{exp.path.name}: learning curves of {exp.trials['trial_id'].nunique()} trials")
    ax.set_xlim(0.5, exp.space.max_epochs + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return save_figure(fig, out / "learning_curves.png")


def _axis_values(values: pd.Series, dist: Any) -> tuple[np.ndarray, list[str]]:
    """Values scaled to [0, 1] for one parallel axis, and the tick labels of its ends."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution) or values.dtype == object:
        choices = list(dist.choices) if isinstance(dist, CategoricalDistribution) else sorted(
            values.astype(str).unique())
        pos = {str(c): i for i, c in enumerate(choices)}
        scaled = np.array([pos[str(v)] for v in values], dtype=float) / max(len(choices) - 1, 1)
        return scaled, [str(choices[0]), str(choices[-1])]
    log = isinstance(dist, (FloatDistribution, IntDistribution)) and dist.log
    low = dist.low if dist is not None else float(values.min())
    high = dist.high if dist is not None else float(values.max())
    f = np.log10 if log else (lambda x: np.asarray(x, dtype=float))
    span = (f(high) - f(low)) or 1.0
    scaled = (f(values.to_numpy(dtype=float)) - f(low)) / span
    return np.asarray(scaled, dtype=float), [f"{low:.3g}", f"{high:.3g}"]


def plot_parallel_coordinates(exp: Experiment, study: Any, out: Path) -> Path | None:
    """One line per trial across its tuned hyperparameters, coloured by best validation mAP."""
    plt = pyplot()
    columns = tunable_columns(exp, study)
    if not columns:
        return None
    first = exp.trials.groupby("trial_id").head(1).set_index("trial_id")
    score = exp.board.set_index("trial_id")["val_mAP"].reindex(first.index.astype(str))
    axes = [_axis_values(first[col], dist) for col, dist in columns.items()]
    names = [col.removeprefix("config/") for col in columns] + ["val mAP"]
    lo, hi = np.nanmin(score.values), np.nanmax(score.values)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(min(16, max(5, 1.2 * len(names))), 4.4))
    for i, value in enumerate(score.values):
        ys = [a[0][i] for a in axes] + [(value - lo) / ((hi - lo) or 1.0)]
        ax.plot(range(len(names)), ys, "-o", ms=3, color=cmap(ys[-1]), alpha=0.85)
    for j, (_, ends) in enumerate(axes + [(None, [f"{lo:.1f}", f"{hi:.1f}"])]):
        ax.axvline(j, color="0.3", lw=0.8)
        ax.text(j, -0.06, ends[0], ha="center", va="top", fontsize=7)
        ax.text(j, 1.06, ends[1], ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    ax.set_title("hyperparameters vs best validation mAP (axis ends = search range)", fontsize=10)
    return save_figure(fig, out / "parallel_coordinates.png")


def importances(study: Any) -> tuple[dict[str, float], str]:
    """Optuna's hyperparameter importance (its default evaluator) and a note on the trials used.

    Uses the COMPLETE trials (full budget) when there are at least two; otherwise every
    trial with a value, ASHA-stopped ones included at their lower fidelity (said in the note).
    """
    import optuna
    from optuna.importance import get_param_importances
    from optuna.trial import TrialState

    if study is None:
        return {}, "no optuna.db"
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    note = f"{len(complete)} complete trials (full budget)"
    if len(complete) < 2:
        valued = [t for t in study.get_trials(deepcopy=False) if t.value is not None]
        if len(valued) < 2:
            return {}, f"needs at least 2 trials with a value, found {len(valued)}"
        mixed = optuna.create_study(direction=study.direction)
        for t in valued:
            mixed.add_trial(optuna.trial.create_trial(
                params=t.params, distributions=t.distributions, value=t.value))
        study, note = mixed, (f"only {len(complete)} complete trial(s): {len(valued)} trials "
                              "incl. ASHA-stopped ones at their last (lower-fidelity) value")
    try:
        return get_param_importances(study), note
    except (RuntimeError, ValueError) as exc:
        return {}, f"Optuna could not evaluate importance: {exc}"


def plot_importance(values: Mapping[str, float], note: str, out: Path) -> Path | None:
    if not values:
        return None
    plt = pyplot()
    names = list(values)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    ax.barh(names, [values[n] for n in names], color="#4c72b0")
    ax.set(xlabel="importance (Optuna default evaluator, normalised)", xlim=(0, 1))
    ax.set_title(note, fontsize=9)
    return save_figure(fig, out / "importance.png")


def plot_long_tail(table: pd.DataFrame, split: str, out: Path) -> Path:
    """Per-class AP against the clean training frequency (log scale), coloured by group."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for group, rows in table.groupby("group"):
        ax.scatter(rows["train_count"], rows["ap"], s=40, label=group or "none",
                   color=GROUP_COLORS.get(group, "0.4"), zorder=3)
        ax.scatter(rows["observed_count"], rows["ap"], s=18, marker="x",
                   color=GROUP_COLORS.get(group, "0.4"), alpha=0.6, zorder=2)
    for _, r in table.iterrows():
        ax.annotate(str(r["name"]), (r["train_count"], r["ap"]), xytext=(4, 3),
                    textcoords="offset points", fontsize=7)
        ax.plot([r["observed_count"], r["train_count"]], [r["ap"]] * 2, color="0.8", lw=0.8,
                zorder=1)
    ax.set_xscale("log")
    ax.set(xlabel="training positives per class (dot: true labels, x: observed labels)",
           ylabel=f"{split} AP (%)", title="best trial: per-class AP vs class frequency")
    ax.legend(title="group", fontsize=8)
    return save_figure(fig, out / "long_tail.png")


def plot_efficiency(series: pd.DataFrame, out: Path) -> Path:
    """Best-so-far validation mAP vs epochs trained and vs GPU-hours (CPU-hours without GPUs),
    one step line per search; the search reported first is drawn thicker."""
    plt = pyplot()
    unit = "gpu" if series["gpu_hours"].max() > 0 else "cpu"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, (name, rows) in enumerate(series.groupby("experiment", sort=False)):
        label = f"{name} ({rows['strategy'].iloc[0]})"
        for ax, x in zip(axes, ("epochs_trained", f"{unit}_hours")):
            ax.step(rows[x], rows["best_val_mAP"], where="post", lw=2.4 if i == 0 else 1.4,
                    label=label)
            ax.plot(rows[x].iloc[-1], rows["best_val_mAP"].iloc[-1], "o", ms=4,
                    color=ax.lines[-1].get_color())
    axes[0].set(xlabel="epochs trained (all trials)", ylabel="best validation mAP so far (%)")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    axes[1].set(xlabel=f"{unit.upper()}-hours reserved (cost ledger)")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("did the tuner pay off? best-so-far validation mAP vs compute", fontsize=10)
    return save_figure(fig, out / "efficiency.png")


def save_figure(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------- HTML
def _cell(value: Any, digits: int = 2) -> str:
    if isinstance(value, (float, np.floating)):
        return "&ndash;" if math.isnan(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], digits: int = 2,
               cls: str = "") -> str:
    """A plain HTML table (every value escaped); missing entries show a dash."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(c, math.nan), digits)}</td>" for c in columns)
        + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def leaderboard_rows(exp: Experiment, costs: pd.DataFrame) -> list[dict[str, Any]]:
    """Leaderboard rows for the report: validation metrics, test (best trial only), cost."""
    cost = costs.set_index("trial_id")
    best_id = tested_run(exp).trial_id if exp.test else None
    rows = []
    for rank, (_, row) in enumerate(exp.board.iterrows(), start=1):
        trial_id = str(row["trial_id"])
        config = json.loads(row["config"]) if isinstance(row.get("config"), str) else {}
        out = {"rank": rank, "trial": trial_id, "status": row["status"],
               "epochs": row.get("epochs", math.nan), "best epoch": row.get("best_epoch", math.nan)}
        for key in METRIC_KEYS:
            out[f"val {key}"] = float(row.get(f"val_{key}", math.nan))
            out[f"test {key}"] = float(exp.test.get(key, math.nan)) if trial_id == best_id else math.nan
        if trial_id in cost.index:
            out.update({"wall s": float(cost.loc[trial_id, "wall_s"]),
                        "GPU-h": f"{cost.loc[trial_id, 'gpu_hours']:.4f}",
                        "CPU-h": f"{cost.loc[trial_id, 'cpu_hours']:.4f}"})
        out["config"] = ", ".join(f"{k}={_short(v)}" for sec in config.values()
                                  for k, v in (sec or {}).items())
        rows.append(out)
    return rows


def seed_rows(exp: Experiment) -> list[dict[str, Any]]:
    """The repeats' table for the report (empty without ``search.repeats``): per re-trained
    configuration its search rank and value, and mean ± std over its seeds, val and test."""
    from tuner.repeats import pm

    path = exp.path / "repeats.csv"
    if not path.is_file():
        return []
    table = pd.read_csv(path, dtype={"trial_id": str})
    search_val = dict(zip(exp.board["trial_id"].astype(str), exp.board["val_mAP"]))
    rows = []
    for (rank, trial_id), runs in table.groupby(["rank", "trial_id"], sort=True):
        done = runs[runs["status"] == "COMPLETE"]
        row = {"search rank": int(rank), "trial": trial_id, "seeds": len(done),
               "search val mAP": float(search_val.get(trial_id, math.nan))}
        for split, column in (("val", "val_mAP"), ("test", "test_mAP")):
            values = done[column].dropna().to_numpy(float) if column in done else np.array([])
            row[f"{split} mAP, mean ± std"] = (
                pm(values.mean(), values.std(ddof=1) if len(values) > 1 else math.nan, len(values))
                if len(values) else "")
            if split == "val":  # sort key, not a column
                row["_val"] = values.mean() if len(values) else -math.inf
        rows.append(row)
    return sorted(rows, key=lambda r: -r["_val"])


SEED_COLUMNS = ["search rank", "trial", "search val mAP", "seeds", "val mAP, mean ± std",
                "test mAP, mean ± std"]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


LEADER_COLUMNS = ["rank", "trial", "status", *(f"val {k}" for k in METRIC_KEYS),
                  *(f"test {k}" for k in METRIC_KEYS), "epochs", "best epoch", "wall s",
                  "GPU-h", "CPU-h", "config"]
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
td:last-child{text-align:left}img{max-width:100%;margin:0.5em 0}
code{background:#f4f4f4;padding:1px 4px}"""


def render_html(exp: Experiment, parts: Mapping[str, Any]) -> str:
    """The report page; ``parts`` holds tables and figure paths made by :func:`build_report`."""
    e = html.escape
    totals = parts["totals"]
    figs = "".join(f'<h3>{e(title)}</h3><img src="figures/{e(p.name)}" alt="{e(title)}">'
                   for title, p in parts["figures"] if p is not None)
    notes = "".join(f"<li>{e(n)}</li>" for n in parts["notes"])
    cost_rows = parts["costs"].to_dict("records")
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>{e(exp.path.name)}</title><style>{STYLE}</style></head><body>
<h1>{e(exp.path.name)}</h1>
<p>method <b>{e(exp.space.method)}</b>, label view <b>{e(str(exp.search.get('view')))}</b>,
{int(totals['trials'])} trials, {exp.space.max_epochs} epochs budget, ASHA
{e(json.dumps(exp.space.asha))}, Ray {e(str(exp.search.get('ray')))}.
Optuna study: <code>python -m tuner.dashboard {e(str(exp.path))}</code>
(or <code>optuna-dashboard {e(exp.study_url)}</code>)</p>
<h2>Leaderboard</h2><p>Validation metrics at each trial's best epoch; the test split is
scored once, for the selected trial ({e(parts['selected'])}).</p>
{html_table(parts['leaderboard'], LEADER_COLUMNS, cls='leaderboard')}
{parts['seeds_html']}
<h2>Cost ledger</h2><p>Reserved resources x wall time. Search total: {totals['gpu_hours']:.4f}
GPU-hours, {totals['cpu_hours']:.4f} CPU-hours, {totals['wall_s']:.0f} trial-seconds; share spent
on trials ASHA stopped: {_pct(totals['stopped_share_gpu'])} of GPU-hours,
{_pct(totals['stopped_share_cpu'])} of CPU-hours.</p>
{html_table(cost_rows, ['trial_id', 'status', 'epochs', 'wall_s', 'cpu_hours', 'gpu_hours'], 4, 'cost')}
<h2>Figures</h2>{figs}
<h2>Notes</h2><ul>{notes}</ul></body></html>
"""


def seed_parts(exp: Experiment) -> dict[str, str]:
    """The leaderboard's selection sentence and, after ``search.repeats``, the seeds table."""
    rows = seed_rows(exp)
    if not rows:
        return {"selected": "the best validation mAP of one run", "seeds_html": ""}
    tested = tested_run(exp)
    seed = (tested.config.get("train") or {}).get("seed")
    return {
        "selected": f"the highest mean validation mAP over seeds: trial {tested.trial_id}'s "
                    f"configuration, its seed {seed} run, the best of them on validation",
        "seeds_html": "<h3>Seeds</h3><p>The top configurations re-trained with new seeds "
                      "(<code>search.repeats</code>; the search's own run not counted). Read a "
                      "gap between two configurations as real only when it is larger than their "
                      "standard deviations.</p>" + html_table(rows, SEED_COLUMNS, cls="seeds"),
    }


def _pct(value: float) -> str:
    return "n/a (nothing spent)" if math.isnan(value) else f"{100 * value:.1f}%"


def build_report(path: str | Path, split: str = "test", per_class: bool = True,
                 against: Sequence[str | Path] = ()) -> Path:
    """Write ``report.html``, ``cost.csv``, ``per_class_ap.csv``, ``efficiency.csv`` and the
    figures; return the page. ``against``: other searches of the same space to compare with
    (those next to it are found by themselves, see :func:`comparable_experiments`)."""
    exp = load_experiment(path)
    others = comparable_experiments(exp, against)
    out = exp.path / "figures"
    out.mkdir(exist_ok=True)
    study = exp.load_study()
    costs, totals = cost_ledger(exp)
    costs.to_csv(exp.path / "cost.csv", index=False)
    values, note = importances(study)
    notes = [f"importance: {note}"]
    figures = [("Learning curves", plot_learning_curves(exp, out)),
               ("Parallel coordinates", plot_parallel_coordinates(exp, study, out)),
               ("Hyperparameter importance", plot_importance(values, note, out))]
    series = pd.concat([efficiency_series(e) for e in [exp, *others]], ignore_index=True)
    series.to_csv(exp.path / "efficiency.csv", index=False)
    figures.append(("Best-so-far validation mAP vs compute", plot_efficiency(series, out)))
    notes.append("efficiency: " + (
        "compared with " + ", ".join(f"{e.path.name} ({strategy(e)})" for e in others)
        if others else "no other search of the same space next to this one (a random-search "
        "baseline: --sampler random --scheduler fifo with the same --out; or --against DIR)"))
    if per_class:
        table = per_class_table(exp, split)
        table.to_csv(exp.path / "per_class_ap.csv", index=False)
        figures.append((f"Per-class {split} AP vs class frequency (best trial)",
                        plot_long_tail(table, split, out)))
        notes.append(f"per-class AP: best trial's best weights on the {split} split; mean "
                     f"{np.nanmean(table['ap']):.2f} (the leaderboard's test mAP)")
    parts = {"totals": totals, "costs": costs, "figures": figures, "notes": notes,
             "leaderboard": leaderboard_rows(exp, costs), **seed_parts(exp)}
    page = exp.path / "report.html"
    page.write_text(render_html(exp, parts))
    written = [page, exp.path / "cost.csv", exp.path / "efficiency.csv",
               *(p for _, p in figures if p is not None)]
    if per_class:
        written.append(exp.path / "per_class_ap.csv")
    run_id = log_report(exp.path, written)
    if run_id is not None:
        print(f"MLflow: report logged on parent run {run_id}")
    return page


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tuner.report", description=__doc__.split("\n")[0])
    p.add_argument("experiment", help="experiment directory written by python -m tuner.search")
    p.add_argument("--split", default="test", choices=("val", "test"),
                   help="split of the per-class AP figure (default test)")
    p.add_argument("--no-per-class", action="store_true",
                   help="skip the per-class figure (it loads the best checkpoint)")
    p.add_argument("--against", action="append", default=[], metavar="EXPERIMENT_DIR",
                   help="another search of the same space for the efficiency figure "
                        "(repeatable; searches next to this one are found by themselves)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.split not in ("val", "test"):
        raise ConfigError(f"--split must be val or test, got {args.split!r}")
    print(build_report(args.experiment, args.split, not args.no_per_class, args.against))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
