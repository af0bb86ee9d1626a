"""Seeds as part of the search: re-train the top configurations with K seeds, pick by mean.

A trial's validation mAP is one draw: the same configuration with another ``train.seed``
moves by about as much as neighbouring configurations differ (``benchmarks/RESULTS.md``
section 3), so the best single trial is partly the luckiest. With ``search.repeats: K``
(``--repeats K``) the search then

1. takes its ``search.repeats_top`` best *distinct* configurations (leaderboard order, failed
   trials left out),
2. re-trains each with K new seeds (:func:`repeat_seeds`: ``train.seed`` + 1 ... + K; the
   search's own run is not counted, because its value was used to select it and is biased
   upwards) as a second Ray Tune run in ``EXPERIMENT/repeats/`` (FIFO, every run the full
   budget, resumable like the search),
3. picks the configuration with the highest **mean** best validation mAP over its K seeds,
   prints ``mean ± std (K seeds)`` for each (sample standard deviation), and writes
   ``repeats.csv`` (one row per run), the winner's spread into ``search.json``
   (``repeats``), the winner as ``best_config.yaml``, and scores the winner's K runs on the
   test split: ``test_metrics.json`` holds the run with the highest validation mAP (one
   model, as without repeats), ``search.json`` the test mean ± std over the K seeds.

``python -m tuner.compare --seeds K`` runs each method's search with ``repeats: K`` and
``repeats_top: 1`` (its best configuration re-trained with K seeds), and reads the winner's
per-seed test metrics from ``repeats.csv``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

OBJECTIVE = "val_mAP"
RUN_DIR = "repeats"
CSV = "repeats.csv"
PLAN = "repeats_plan.json"
TEST_KEYS = ("mAP", "mAP_head", "mAP_medium", "mAP_tail", "CF1", "OF1")


def repeat_seeds(seed: int, count: int) -> list[int]:
    """``count`` training seeds that differ from the one the search used (``seed``)."""
    return [int(seed) + 1 + k for k in range(count)]


def top_configs(rows: Sequence[Mapping[str, Any]], top: int) -> list[dict[str, Any]]:
    """The ``top`` best distinct configurations of the leaderboard ``rows`` (best first):
    ``{rank, trial_id, search_val_mAP, config}``; failed trials are left out."""
    out, seen = [], set()
    scored = [r for r in rows if r.get("status") != "ERROR" and not math.isnan(_num(r.get(OBJECTIVE)))]
    for row in sorted(scored, key=lambda r: -_num(r[OBJECTIVE])):
        key = json.dumps(json.loads(row["config"]), sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append({"rank": len(out) + 1, "trial_id": str(row["trial_id"]),
                    "search_val_mAP": float(row[OBJECTIVE]), "config": json.loads(key)})
        if len(out) == top:
            break
    return out


def plan_runs(top: Sequence[Mapping[str, Any]], count: int) -> list[dict[str, Any]]:
    """One run per (configuration, seed): ``{rank, trial_id, seed, config}``."""
    runs = []
    for entry in top:
        base = int((entry["config"].get("train") or {}).get("seed", 0))
        for seed in repeat_seeds(base, count):
            config = {**entry["config"], "train": {**entry["config"].get("train", {}),
                                                   "seed": seed}}
            runs.append({"rank": entry["rank"], "trial_id": entry["trial_id"], "seed": seed,
                         "config": config})
    return runs


def train_repeat(config: dict[str, Any], setup: Any, runs: Sequence[Mapping[str, Any]]) -> None:
    """Tune function trainable of the repeats run: the ``config["repeat"]``-th planned run."""
    from tuner.trainable import train_trial

    train_trial(dict(runs[int(config["repeat"])]["config"]), setup)


def run_repeats(space: Any, setup: Any, exp_dir: Path, runs: Sequence[Mapping[str, Any]]) -> Any:
    """Train every planned run (a FIFO Ray Tune run in ``exp_dir/repeats``, resumed when it
    exists); returns the ResultGrid."""
    import ray
    from ray import tune

    from tuner.search import concurrency, trial_resources

    cluster = ray.cluster_resources()
    trainable = tune.with_resources(
        tune.with_parameters(train_repeat, setup=setup, runs=list(runs)),
        trial_resources(space, cluster))
    path = exp_dir / RUN_DIR
    _check_plan(path, runs)
    if tune.Tuner.can_restore(str(path)):
        print(f"resuming the repeats in {path}")
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False).fit()
    tuner = tune.Tuner(
        trainable,
        param_space={"repeat": tune.grid_search(list(range(len(runs))))},
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode="max",
            max_concurrent_trials=min(len(runs), concurrency(space, cluster))),
        run_config=tune.RunConfig(
            name=RUN_DIR, storage_path=str(exp_dir),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=space.search["max_failures"]),
            verbose=1),
    )
    return tuner.fit()


def _check_plan(path: Path, runs: Sequence[Mapping[str, Any]]) -> None:
    """Record the planned runs beside the Tune run; a resumed run must plan the same ones
    (its trials are numbered by position in the plan)."""
    from tuner.errors import ConfigError

    plan = path.with_name(PLAN)
    text = json.dumps([dict(r) for r in runs], sort_keys=True, indent=1)
    if plan.is_file() and plan.read_text() != text:
        raise ConfigError(f"{plan} holds other repeats (different search.repeats, repeats_top or "
                          f"leaderboard); use the same settings or another --name")
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.write_text(text)


def run_table(runs: Sequence[Mapping[str, Any]], results: Any) -> pd.DataFrame:
    """One row per planned run: its configuration's rank, seed, best val mAP, epochs, status."""
    rows = [{"rank": r["rank"], "trial_id": r["trial_id"], "seed": r["seed"],
             "repeat_trial_id": "", OBJECTIVE: math.nan, "best_epoch": math.nan,
             "epochs": 0, "status": "MISSING", "config": json.dumps(r["config"], sort_keys=True)}
            for r in runs]
    for result in results:
        row = rows[int(result.config["repeat"])]
        metrics = result.metrics or {}
        row.update(repeat_trial_id=str(metrics.get("trial_id", Path(result.path).name)),
                   status="ERROR" if result.error is not None else "COMPLETE")
        if "best_val_mAP" in metrics:
            row.update({OBJECTIVE: float(metrics["best_val_mAP"]),
                        "best_epoch": int(metrics["best_epoch"]), "epochs": int(metrics["epoch"])})
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: mean and sample std (ddof=1; NaN for one seed) of the best val mAP
    over its finished seeds; sorted by the mean, best first."""
    out = []
    for (rank, trial_id), rows in table.groupby(["rank", "trial_id"], sort=True):
        values = rows.loc[rows["status"] == "COMPLETE", OBJECTIVE].dropna().to_numpy(float)
        out.append({"rank": int(rank), "trial_id": trial_id, "seeds": len(values),
                    "mean": float(values.mean()) if len(values) else math.nan,
                    "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan})
    frame = pd.DataFrame(out)
    return frame.sort_values(["mean", "rank"], ascending=[False, True], na_position="last",
                             ignore_index=True)


def pm(mean: float, std: float, seeds: int) -> str:
    """``mean ± std (K seeds)``."""
    spread = "" if math.isnan(std) else f" ± {std:.2f}"
    return f"{mean:.2f}{spread} ({seeds} seed{'s' if seeds != 1 else ''})"


def format_summary(table: pd.DataFrame, top: Sequence[Mapping[str, Any]]) -> str:
    search_val = {e["trial_id"]: e["search_val_mAP"] for e in top}
    lines = ["", "Repeats (validation split; the search's own run not counted)",
             f"{'rank':<6}{'trial':<14}{'val mAP, mean ± std':<28}{'search val mAP':>15}",
             "-" * 63]
    for _, row in summary(table).iterrows():
        lines.append(f"{row['rank']:<6}{str(row['trial_id'])[:13]:<14}"
                     f"{pm(row['mean'], row['std'], row['seeds']):<28}"
                     f"{search_val.get(row['trial_id'], math.nan):>15.2f}")
    return "\n".join(lines)


def score_runs(runs: Sequence[Mapping[str, Any]], results: Any, indices: Sequence[int],
               setup: Any, space: Any) -> dict[int, dict[str, float]]:
    """Test metrics of the chosen runs' best weights (one Ray task each, on the cluster)."""
    import ray

    from tuner.trainable import evaluate_checkpoint, trial_checkpoint

    res = space.resources
    task = ray.remote(evaluate_checkpoint).options(num_cpus=res["cpus_per_trial"],
                                                   num_gpus=res["gpus_per_trial"])
    by_index = {int(r.config["repeat"]): r for r in results}
    refs = {i: task.remote(trial_checkpoint(by_index[i]), runs[i]["config"], setup, "test")
            for i in indices if i in by_index and trial_checkpoint(by_index[i]) is not None}
    return {i: ray.get(ref) for i, ref in refs.items()}


def repeat_top_configs(rows: Sequence[Mapping[str, Any]], space: Any, setup: Any, exp_dir: Path,
                       test: bool = True) -> dict[str, Any] | None:
    """Step 2 of a search with ``search.repeats`` (see the module docstring); returns the
    ``repeats`` entry written into ``search.json`` (None when no trial finished)."""
    from tuner.space import to_yaml

    count, top = int(space.search["repeats"]), top_configs(rows, int(space.search["repeats_top"]))
    if not top:
        print("repeats: no finished trial to re-train")
        return None
    runs = plan_runs(top, count)
    print(f"repeats: re-training the {len(top)} best configurations with {count} seeds each "
          f"({len(runs)} runs, full budget) in {exp_dir / RUN_DIR}")
    results = run_repeats(space, setup, exp_dir, runs)
    table = run_table(runs, results)
    print(format_summary(table, top))
    ranked = summary(table)
    if ranked.empty or math.isnan(ranked.loc[0, "mean"]):
        table.to_csv(exp_dir / CSV, index=False)
        print("repeats: no run finished; nothing chosen")
        return None
    winner = ranked.iloc[0]
    mine = table.index[(table["rank"] == winner["rank"]) & (table["status"] == "COMPLETE")]
    chosen = int(table.loc[mine, OBJECTIVE].idxmax())  # the winner's best seed by validation
    entry: dict[str, Any] = {
        "seeds_per_config": count, "top": len(top), "winner_trial": str(winner["trial_id"]),
        "winner_rank": int(winner["rank"]), "val_mAP_mean": float(winner["mean"]),
        "val_mAP_std": float(winner["std"]), "seeds": int(winner["seeds"]),
        "val_mAP_per_seed": {str(table.loc[i, "seed"]): float(table.loc[i, OBJECTIVE])
                             for i in mine},
        "test_from_seed": int(table.loc[chosen, "seed"]),
    }
    print(f"winner: the configuration of trial {winner['trial_id']} (search rank "
          f"{winner['rank']}), val mAP {pm(winner['mean'], winner['std'], winner['seeds'])}")
    config = runs[chosen]["config"]
    (exp_dir / "best_config.yaml").write_text(
        f"# configuration of trial {winner['trial_id']} of {exp_dir.name}, chosen by its mean "
        f"val mAP over {int(winner['seeds'])} seeds (repeats.csv)\n"
        + to_yaml(space.fixed_config({**config, "train": {**config["train"],
                                                          "seed": _seed_of(top, winner)}})))
    if test:
        scores = score_runs(runs, results, list(mine), setup, space)
        for i, metrics in scores.items():
            for key in TEST_KEYS:
                table.loc[i, f"test_{key}"] = float(metrics.get(key, math.nan))
        if chosen in scores:
            (exp_dir / "test_metrics.json").write_text(json.dumps(
                {**scores[chosen], "seed": entry["test_from_seed"]}, indent=1))
        values = pd.Series([s["mAP"] for s in scores.values() if "mAP" in s], dtype=float)
        entry.update(test_mAP_mean=float(values.mean()),
                     test_mAP_std=float(values.std(ddof=1)) if len(values) > 1 else math.nan)
        print(f"winner on test: mAP {pm(entry['test_mAP_mean'], entry['test_mAP_std'], len(values))}"
              f"; test_metrics.json holds seed {entry['test_from_seed']} (best on validation)")
    table.to_csv(exp_dir / CSV, index=False)
    _record(exp_dir, entry)
    return entry


def _seed_of(top: Sequence[Mapping[str, Any]], winner: Any) -> int:
    """The winner's seed in the search (best_config.yaml keeps the searched configuration)."""
    entry = next(e for e in top if e["rank"] == winner["rank"])
    return int((entry["config"].get("train") or {}).get("seed", 0))


def _record(exp_dir: Path, entry: Mapping[str, Any]) -> None:
    """Add ``repeats`` to ``search.json`` (NaN written as null)."""
    path = exp_dir / "search.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["repeats"] = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                       for k, v in entry.items()}
    path.write_text(json.dumps(data, indent=1))


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
