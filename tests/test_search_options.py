"""Search options of the space (sampler, scheduler, stopped trials' state) and their effects.

The searcher is driven directly (suggest / result / complete, as Tune calls it) over a real
SQLite Optuna storage; no Ray cluster is needed for that.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from tuner import search
from tuner.errors import ConfigError
from tuner.optuna_search import PrunedAwareOptunaSearch, sqlite_storage
from tuner.space import load_space

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces/splc.yaml"


def test_defaults_are_tpe_asha_pruned() -> None:
    space = load_space(SPACE)
    assert (space.search["sampler"], space.search["scheduler"],
            space.search["stopped_trials"]) == ("tpe", "asha", "pruned")
    sampler = search.build_sampler(space.search)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == max(2, space.search["num_trials"] // 3)
    assert isinstance(search.build_scheduler(space), ASHAScheduler)


def test_random_fifo_from_the_command_line() -> None:
    args = search.build_parser().parse_args(
        ["--method", "splc", "--space", str(SPACE), "--sampler", "random", "--scheduler", "fifo"])
    space = load_space(SPACE, search.overrides_from_args(args), method="splc")
    assert isinstance(search.build_sampler(space.search), optuna.samplers.RandomSampler)
    assert isinstance(search.build_scheduler(space), FIFOScheduler)


def test_bad_search_choices_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        load_space(SPACE, {"search": {"sampler": "grid", "stopped_trials": "done"}})
    text = str(err.value)
    assert "search.sampler: must be one of tpe/random, got 'grid'" in text
    assert "search.stopped_trials: must be one of pruned/complete, got 'done'" in text
    with pytest.raises(SystemExit) as exit_:  # argparse: one usage line naming the choices
        search.build_parser().parse_args(["--method", "splc", "--space", str(SPACE),
                                          "--scheduler", "hyperband"])
    assert exit_.value.code == 2


def _searcher(tmp_path: Path, stopped: str) -> PrunedAwareOptunaSearch:
    def space(trial: optuna.Trial) -> None:
        trial.suggest_float("x", 0.0, 1.0)

    return PrunedAwareOptunaSearch(
        space=space, metric="val_mAP", mode="max", sampler=optuna.samplers.RandomSampler(0),
        storage=sqlite_storage(tmp_path / f"{stopped}.db"), study_name=stopped, max_epochs=4,
        stopped_state=stopped)


def _run(searcher: PrunedAwareOptunaSearch, trial_id: str, values: list[float]) -> None:
    assert searcher.suggest(trial_id) is not None
    result = {}
    for epoch, value in enumerate(values, start=1):
        result = {"val_mAP": value, "epoch": epoch, "best_val_mAP": max(values[:epoch])}
        searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, result)


@pytest.mark.parametrize("stopped", ["pruned", "complete"])
def test_stopped_trials_state(tmp_path: Path, stopped: str) -> None:
    searcher = _searcher(tmp_path, stopped)
    _run(searcher, "full", [10.0, 30.0, 20.0, 25.0])   # the whole budget: always COMPLETE
    _run(searcher, "early", [40.0, 35.0])              # stopped by the scheduler at epoch 2
    study = optuna.load_study(study_name=stopped, storage=f"sqlite:///{tmp_path / stopped}.db")
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    full, early = by_tune["full"], by_tune["early"]
    assert full.state == TrialState.COMPLETE and full.value == 30.0
    assert full.intermediate_values == {1: 10.0, 2: 30.0, 3: 20.0, 4: 25.0}
    assert early.intermediate_values == {1: 40.0, 2: 35.0}
    if stopped == "pruned":  # Optuna keeps the last intermediate value of a pruned trial
        assert early.state == TrialState.PRUNED and early.value == 35.0
    else:  # the stock behaviour: a low-fidelity value ranked with the full ones
        assert early.state == TrialState.COMPLETE and early.value == 40.0


def test_unknown_stopped_state_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stopped_state must be pruned or complete"):
        _searcher(tmp_path, "maybe")


def test_a_new_searcher_reuses_the_trials_a_stopped_search_asked_for(tmp_path: Path) -> None:
    """A search killed before Tune saved any state leaves RUNNING Optuna trials; the searcher
    of its restart hands them to its first trials instead of asking for new ones."""
    first = _searcher(tmp_path, "pruned")
    asked = first.suggest("killed-1")
    del first  # the driver died here: the Optuna trial stays RUNNING
    again = _searcher(tmp_path, "pruned")
    assert again.suggest("new-1") == asked  # the same parameters, the same Optuna trial
    _run(again, "new-2", [1.0, 2.0, 3.0, 4.0])
    study = optuna.load_study(study_name="pruned", storage=f"sqlite:///{tmp_path}/pruned.db")
    assert len(study.trials) == 2
    assert {t.user_attrs["tune_trial_id"] for t in study.trials} == {"new-1", "new-2"}


def test_a_search_stopped_before_its_first_state_starts_again_in_place(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "out" / "early"
    exp.mkdir(parents=True)
    args = search.build_parser().parse_args(
        ["--method", "bce", "--space", str(ROOT / "search_spaces/bce.yaml"),
         "--out", str(tmp_path / "out"), "--name", "early"])
    with pytest.raises(ConfigError, match="holds no resumable search"):  # an empty folder
        search.experiment_dir(args)
    sqlite_storage(exp / "optuna.db")  # the searcher's study: the first file a search writes
    assert search.experiment_dir(args) == (exp, False)
    (exp / "tuner.pkl").write_bytes(b"")  # what Tune writes next
    (exp / ".validate_storage_marker").write_bytes(b"")
    assert search.experiment_dir(args) == (exp, False)
    assert capsys.readouterr().out.count("starting it again in place") == 2
    args.resume = str(exp)
    assert search.experiment_dir(args) == (exp, False)
    (exp / "experiment_state-2026-12-01_20-04-06.json").write_text("{}")
    assert search.experiment_dir(args) == (exp, True)
    args.resume = None
    assert search.experiment_dir(args) == (exp, True)
    (tmp_path / "out" / "other").mkdir()
    (tmp_path / "out" / "other" / "notes.txt").write_text("not a search")
    args.name = "other"
    with pytest.raises(ConfigError, match="holds no resumable search"):
        search.experiment_dir(args)


def _efficiency():
    """``benchmarks/search_efficiency.py`` as a module (it imports its sibling ``_search``)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("search_efficiency")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_compute_to_reach_counts_epochs_in_finishing_order() -> None:
    eff = _efficiency()
    # two trials interleaved in time; trial b reaches 50 at its 2nd epoch, the 4th finished
    trials = pd.DataFrame({
        "trial_id": ["a", "b", "a", "b", "a"],
        "timestamp": [10, 11, 12, 13, 14],
        "time_total_s": [1.0, 1.0, 2.0, 2.0, 3.0],
        "val_mAP": [20.0, 30.0, 40.0, 50.0, 45.0],
    }).sample(frac=1.0, random_state=0)  # stored order is irrelevant
    assert eff.compute_to_reach(trials, 50.0) == 4
    assert eff.compute_to_reach(trials, 39.5) == 3
    assert eff.compute_to_reach(trials, 50.1) == math.inf
    # same second: the trial's own time orders its epochs
    tie = pd.DataFrame({"timestamp": [5, 5], "time_total_s": [2.0, 1.0], "val_mAP": [9.0, 1.0]})
    assert eff.compute_to_reach(tie, 9.0) == 2


def test_compare_pair_uses_the_best_of_both() -> None:
    eff = _efficiency()

    def run(values: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"timestamp": range(len(values)), "time_total_s": 1.0,
                             "val_mAP": values})

    runs = {"asha-tpe": run([10.0, 48.0, 49.8]), "random-fifo": run([5, 20, 30, 40, 50, 10])}
    row = eff.compare_pair(runs, "asha-tpe", "random-fifo", tolerance=0.5)
    assert row["target"] == 49.5
    assert (row["epochs_candidate"], row["epochs_baseline"]) == (3, 5)
    assert row["ratio"] == pytest.approx(3 / 5)


def test_rank_fidelity_is_spearman_against_the_final_best() -> None:
    eff = _efficiency()
    # 3 trials x 2 epochs: epoch 1 ranks them exactly backwards, epoch 2 exactly right
    trials = pd.DataFrame({"trial_id": ["a", "a", "b", "b", "c", "c"],
                           "epoch": [1, 2, 1, 2, 1, 2],
                           "val_mAP": [5.0, 10.0, 4.0, 20.0, 3.0, 30.0]})
    fidelity = eff.rank_fidelity(trials)
    assert fidelity[1] == pytest.approx(-1.0) and fidelity[2] == pytest.approx(1.0)


def test_asha_replay_follows_rays_rung_rule() -> None:
    eff = _efficiency()
    # trial 2 is the best but scores 0 until its last epoch; rungs at epochs 1 and 2 (rf 2)
    curves = np.array([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0], [0.0, 0.0, 10.0]])
    # trial 2 last: continues past nothing, stopped at rung 1 (0 < median of 1, 5)
    assert eff.asha_replay(curves, [0, 1, 2], grace=1, rf=2, target=9.5) == (math.inf, 9, 7)
    # trial 2 first: the first trial at a rung always continues, and reaches 10 at once
    assert eff.asha_replay(curves, [2, 0, 1], grace=1, rf=2, target=9.5) == (3, 3, 9)
    # over shuffled orders ASHA reaches the target only when trial 2 comes first (1/3)
    trials = pd.DataFrame([{"trial_id": t, "epoch": e + 1, "val_mAP": v}
                           for t, row in enumerate(curves) for e, v in enumerate(row)])
    (row,) = eff.replay_schedules(trials, [(1, 2)], tolerance=0.5).to_dict("records")
    assert abs(row["reached"] - 1 / 3) < 0.1
    assert row["ratio"] == pytest.approx(1.0)  # both need its 3 epochs when it comes first


def test_target_tolerance_is_twice_the_seed_std_at_least_half_a_point() -> None:
    eff = _efficiency()
    for std in (0.0, 0.1, 0.25, 0.26, 0.71, 3.0):
        assert eff.target_tolerance(std) == pytest.approx(max(0.5, std + std))
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="--seed-std"):
            eff.target_tolerance(bad)


def test_target_needs_a_third_of_random_in_two_of_three_seeds() -> None:
    eff = _efficiency()
    assert eff.meets_target(10, 30, 64) and not eff.meets_target(11, 30, 64)
    assert not eff.meets_target(math.inf, 30, 64)  # never reached it
    # random never reached it: it needed more than its 64 epochs, by an unknown amount
    assert eff.meets_target(21, math.inf, 64) and not eff.meets_target(22, math.inf, 64)
    assert not eff.meets_target(math.inf, math.inf, 64)
    assert [eff.verdict(k, 3) for k in range(4)] == ["missed", "missed", "met", "met"]


def test_budget_defaults_to_the_shipped_space() -> None:
    import yaml

    eff = _efficiency()
    for method in ("splc", "ndlp"):
        raw = yaml.safe_load((ROOT / f"search_spaces/{method}.yaml").read_text())
        budget = eff.method_budget(method, eff.parse_args(["--methods", method]))
        assert (budget.trials, budget.epochs, budget.grace_period, budget.reduction_factor) == (
            raw["search"]["num_trials"], raw["asha"]["max_epochs"],
            raw["asha"]["grace_period"], raw["asha"]["reduction_factor"])
        given = eff.method_budget(method, eff.parse_args(["--trials", "5", "--epochs", "7"]))
        assert (given.trials, given.epochs, given.grace_period) == (
            5, 7, raw["asha"]["grace_period"])
    args = eff.parse_args([])
    assert args.tolerance == pytest.approx(2 * eff.SEED_STD)
    assert "sha-tpe" in args.strategies


def test_sha_tpe_prunes_as_optuna_and_keeps_the_platform_curves(digits_dir: Path,
                                                                 tmp_path: Path,
                                                                 monkeypatch) -> None:
    """A tiny sha-tpe search (3 trials x 2 epochs, first rung 1, one at a time): Optuna's
    successive halving with fewer than 2 x rf trials at a rung keeps only a trial that is the
    best there so far; the stored curves are what Optuna was told, and trial 0's is the one
    the platform's trial code trains for its configuration in this process."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the spawned trials import it
    sha = importlib.import_module("_sha_search")

    def edit(space: dict) -> None:
        space["asha"] = {"max_epochs": 2, "grace_period": 1, "reduction_factor": 2}
        space["search"].update(num_trials=3, max_concurrent=1, seed=0, sampler="random")

    trials = sha.run_sha_search("splc", "sha", edit, tmp_path, str(digits_dir))
    curves = {t: df.sort_values("epoch")["val_mAP"].tolist() for t, df in
              trials.groupby("trial_id")}
    first = [curves[t][0] for t in sorted(curves)]
    for k, t in enumerate(sorted(curves)):
        kept = first[k] >= max(first[: k + 1])
        assert len(curves[t]) == (2 if kept else 1), (t, first)
    storage = sqlite_storage(tmp_path / "sha" / "optuna.db")
    study = optuna.load_study(study_name="sha", storage=storage)
    for trial in study.trials:
        curve = curves[f"{trial.number:05d}"]
        assert [trial.intermediate_values[e + 1] for e in range(len(curve))] == curve
        if len(curve) == 2:
            assert trial.state == TrialState.COMPLETE and trial.value == max(curve)
        else:
            assert trial.state == TrialState.PRUNED
    eff = _efficiency()
    assert eff.compute_to_reach(trials, max(first)) <= len(trials)

    import torch
    from _search import train_in_process

    from tuner.search import prepare_data
    from tuner.space import load_space as load

    setup = prepare_data(load(tmp_path / "sha.yaml"))[1]
    row = trials[trials["trial_id"] == "00000"].iloc[0]
    config = sha.nested_config({k.removeprefix("config/"): v.item() if hasattr(v, "item") else v
                                for k, v in row.items() if k.startswith("config/")})
    direct: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a trial process
    try:
        train_in_process(config, setup, lambda m, s: direct.append(float(m["val_mAP"])))
    finally:
        torch.set_num_threads(threads)
    assert direct[: len(curves["00000"])] == curves["00000"]


def test_an_interrupted_search_is_not_read_back_as_finished(tmp_path: Path) -> None:
    from tuner.faults import INTERRUPTED_ATTR

    eff = _efficiency()
    exp = tmp_path / "run"
    exp.mkdir()
    study = optuna.create_study(storage=sqlite_storage(exp / "optuna.db"), study_name="run",
                                direction="maximize")
    for value in (1.0, 2.0):
        study.tell(study.ask(), value)
    study.tell(study.ask(), state=TrialState.PRUNED)
    running = study.ask()
    for name in ("trials.parquet", "leaderboard.csv"):  # written by an interrupted search too
        (exp / name).write_bytes(b"")
    assert not eff.finished(exp, 4)  # one trial still RUNNING
    study._storage.set_trial_user_attr(running._trial_id, INTERRUPTED_ATTR, True)
    study.tell(running, state=TrialState.FAIL)
    assert not eff.finished(exp, 4)  # closed as interrupted (tuner.faults): to be resumed
    assert eff.finished(exp, 3) and eff.state_counts(exp) == {"COMPLETE": 2, "FAIL": 1,
                                                               "PRUNED": 1}
    study.tell(study.ask(), state=TrialState.FAIL)  # failed for good (a non-finite loss)
    assert eff.finished(exp, 4)
    (exp / "leaderboard.csv").unlink()
    assert not eff.finished(exp, 3)


def test_leaderboard_prints_a_trial_without_config() -> None:
    """A trial that failed before a resumed search has no config in Tune's restored state;
    the leaderboard still prints (it crashed the search's last line before)."""
    rows = [{"trial_id": "a", "status": "COMPLETE", "config": '{"train": {"lr": 0.01}}',
             "val_mAP": 80.0, "epochs": 8},
            {"trial_id": "b", "status": "ERROR", "config": "null", "error": "NonFiniteLossError"}]
    text = search.format_leaderboard(rows)
    assert "lr=0.01" in text and "[NonFiniteLossError]" in text
