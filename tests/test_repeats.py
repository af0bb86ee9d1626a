"""Seeds as part of the search (issue 18): ``search.repeats`` re-trains the top configurations
with K seeds and picks by the mean; and two Tune trials of one configuration (1 worker) train
identically."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import run_search_cli

from tuner import repeats
from tuner.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _row(trial: str, lr: float, value: float, status: str = "COMPLETE") -> dict:
    config = {"train": {"lr": lr, "seed": 0}, "method": {}}
    return {"trial_id": trial, "status": status, "val_mAP": value,
            "config": json.dumps(config, sort_keys=True)}


def test_top_configs_are_distinct_and_skip_failures() -> None:
    rows = [_row("a", 1e-3, 50.0), _row("b", 1e-3, 49.0), _row("c", 2e-3, 48.0, "STOPPED"),
            _row("d", 3e-3, 60.0, "ERROR"), _row("e", 4e-3, 47.0), _row("f", 5e-3, math.nan)]
    top = repeats.top_configs(rows, 3)
    assert [(t["rank"], t["trial_id"]) for t in top] == [(1, "a"), (2, "c"), (3, "e")]
    runs = repeats.plan_runs(top[:2], 3)
    assert [(r["rank"], r["seed"]) for r in runs] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert runs[4]["config"] == {"train": {"lr": 2e-3, "seed": 2}, "method": {}}
    assert top[1]["config"]["train"]["seed"] == 0  # the plan copies, never edits


def test_the_winner_has_the_best_mean_not_the_best_run() -> None:
    runs = repeats.plan_runs(repeats.top_configs([_row("a", 1e-3, 50.0), _row("b", 2e-3, 49.0)],
                                                 2), 3)
    values = [70.0, 40.0, 41.0, 56.0, 55.0, 57.0]  # a: one lucky seed; b: better on average
    results = [SimpleNamespace(config={"repeat": i}, error=None, path=f"/x/r{i}",
                               metrics={"trial_id": f"r{i}", "best_val_mAP": v, "best_epoch": 2,
                                        "epoch": 2}) for i, v in enumerate(values)]
    results[2].error = RuntimeError("lost node")
    table = repeats.run_table(runs, reversed(results))  # any order
    assert list(table["status"]) == ["COMPLETE"] * 2 + ["ERROR"] + ["COMPLETE"] * 3
    summary = repeats.summary(table)
    assert list(summary["trial_id"]) == ["b", "a"]
    assert summary.loc[0, "mean"] == pytest.approx(statistics.fmean([56.0, 55.0, 57.0]))
    assert summary.loc[0, "std"] == pytest.approx(statistics.stdev([56.0, 55.0, 57.0]))
    assert summary.loc[1, "seeds"] == 2  # a failed run does not count
    assert summary.loc[1, "mean"] == pytest.approx(55.0)
    assert repeats.pm(55.0, 1.0, 3) == "55.00 ± 1.00 (3 seeds)"
    assert repeats.pm(55.0, math.nan, 1) == "55.00 (1 seed)"


def test_a_resumed_repeats_run_must_plan_the_same_runs(tmp_path: Path) -> None:
    top = repeats.top_configs([_row("a", 1e-3, 50.0), _row("b", 2e-3, 49.0)], 2)
    repeats._check_plan(tmp_path / repeats.RUN_DIR, repeats.plan_runs(top, 2))
    repeats._check_plan(tmp_path / repeats.RUN_DIR, repeats.plan_runs(top, 2))  # same: fine
    with pytest.raises(ConfigError, match="other repeats"):
        repeats._check_plan(tmp_path / repeats.RUN_DIR, repeats.plan_runs(top, 3))


# ---------------------------------------------------------------- a real small search
@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, kill_session_module) -> tuple[Path, str]:
    """3 trials of 2 configurations (sampler seed 0 draws lr 3e-3, 1e-3, 3e-3), then the top
    2 re-trained with 2 seeds each; FIFO, 2 epochs."""
    tmp = tmp_path_factory.mktemp("repeats")
    space = yaml.safe_load((ROOT / "search_spaces/bce.yaml").read_text())
    space["data"].update(label_regime="clean", rate=0.0)
    space["train"].update(lr={"choice": [1.0e-3, 3.0e-3]}, weight_decay=1.0e-4)
    space["asha"] = {"max_epochs": 2, "grace_period": 2, "reduction_factor": 2}
    space["search"].update(num_trials=3, max_concurrent=2, seed=0, n_startup_trials=3,
                           scheduler="fifo", repeats=2, repeats_top=2)
    path = tmp / "bce.yaml"
    path.write_text(yaml.safe_dump(space))
    args = ["--method", "bce", "--space", str(path), "--out", str(tmp / "exp"), "--name", "rep",
            "--data-dir", str(tmp / "data")]
    text = run_search_cli(args, tmp / "search.log", kill_session_module,
                          what="the search with repeats")
    return tmp / "exp" / "rep", text


@pytest.mark.integration
def test_two_tune_trials_of_one_configuration_train_identically(searched: tuple[Path, str]) -> None:
    trials = pd.read_parquet(searched[0] / "trials.parquet")
    same = [rows.sort_values("epoch") for _, rows in trials.groupby("trial_id")
            if rows["config/train/lr"].iloc[0] == 3.0e-3]
    assert len(same) == 2, "the sampler was expected to draw lr 3e-3 twice"
    a, b = same
    for key in ("epoch", "train_loss", "val_mAP", "val_mAP_tail", "val_OF1", "best_val_mAP"):
        np.testing.assert_array_equal(a[key].to_numpy(), b[key].to_numpy(), err_msg=key)


@pytest.mark.integration
def test_repeats_pick_by_mean_and_report_the_spread(searched: tuple[Path, str]) -> None:
    exp, log = searched
    table = pd.read_csv(exp / "repeats.csv")
    assert len(table) == 4 and set(table["status"]) == {"COMPLETE"}
    assert sorted(table["seed"]) == [1, 1, 2, 2] and set(table["epochs"]) == {2}
    means = table.groupby("rank")["val_mAP"].mean()
    winner = int(means.idxmax())
    values = table.loc[table["rank"] == winner, "val_mAP"].tolist()
    info = json.loads((exp / "search.json").read_text())["repeats"]
    assert info["winner_rank"] == winner
    assert info["val_mAP_mean"] == pytest.approx(statistics.fmean(values))
    assert info["val_mAP_std"] == pytest.approx(statistics.stdev(values))
    assert sorted(info["val_mAP_per_seed"].values()) == pytest.approx(sorted(values))
    assert f"{info['val_mAP_mean']:.2f} ± {info['val_mAP_std']:.2f} (2 seeds)" in log
    # the winner's configuration is the best_config; its best seed is scored on test
    lr = json.loads(table.loc[table["rank"] == winner, "config"].iloc[0])["train"]["lr"]
    assert yaml.safe_load((exp / "best_config.yaml").read_text())["train"]["lr"] == lr
    test = json.loads((exp / "test_metrics.json").read_text())
    mine = table[table["rank"] == winner]
    best_seed = mine.loc[mine["val_mAP"].idxmax()]
    assert test["seed"] == best_seed["seed"] == info["test_from_seed"]
    assert test["mAP"] == pytest.approx(best_seed["test_mAP"])
    assert info["test_mAP_mean"] == pytest.approx(mine["test_mAP"].mean())


@pytest.mark.integration
def test_the_report_puts_test_on_the_repeats_winner_and_shows_the_seeds(
        searched: tuple[Path, str]) -> None:
    """After repeats, the test figures belong to the winning configuration (which need not be
    the search's best single run), the per-class AP is that seed's model, and the report
    shows each re-trained configuration's mean ± std."""
    from tuner.report import build_report, load_experiment, per_class_table, tested_run

    exp_dir, _ = searched
    info = json.loads((exp_dir / "search.json").read_text())["repeats"]
    exp = load_experiment(exp_dir)
    tested = tested_run(exp)
    assert tested.trial_id == info["winner_trial"] and tested.run == "repeats"
    assert tested.config["train"]["seed"] == info["test_from_seed"]
    test = json.loads((exp_dir / "test_metrics.json").read_text())
    table = per_class_table(exp)
    assert np.nanmean(table["ap"]) == pytest.approx(test["mAP"], abs=1e-6)
    page = build_report(exp_dir).read_text()
    assert "<h3>Seeds</h3>" in page and "highest mean validation mAP" in page
    assert f"{info['val_mAP_mean']:.2f} ± {info['val_mAP_std']:.2f} (2 seeds)" in page
    from tuner.report import cost_ledger, leaderboard_rows

    rows = leaderboard_rows(exp, cost_ledger(exp)[0])
    with_test = [r["trial"] for r in rows if not math.isnan(r["test mAP"])]
    assert with_test == [info["winner_trial"]]
