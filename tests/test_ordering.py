"""A search's decisions in trial order (tuner.ordering): the same whatever arrives first.

The unit tests drive :class:`tuner.ordering.OrderedASHA` and the searcher's clock as Tune
calls them, with a stand-in for Tune's controller that records what the scheduler asks of it
(``stop_trial``, ``_schedule_trial_train``), and compare with Ray's own ASHA fed the same
results in trial order. The end-to-end test runs the same search twice on a real local
cluster, the second time beside a busy process, and compares everything it decided.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from tuner.optuna_search import PrunedAwareOptunaSearch, sqlite_storage
from tuner.ordering import OrderedASHA, SearchClock, rungs

CONTINUE, STOP, NOOP = TrialScheduler.CONTINUE, TrialScheduler.STOP, TrialScheduler.NOOP


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id, self.status, self.num_failures = trial_id, Trial.RUNNING, 0
        self.last_result: dict[str, Any] = {}
        self.is_saving = False  # Tune saves each epoch's checkpoint before acting on it


class _Controller:
    """What OrderedASHA uses of Tune's controller; records the scheduler's later actions."""

    def __init__(self, trials: list[_Trial], scheduler: OrderedASHA) -> None:
        self.trials, self.scheduler, self.actions = trials, scheduler, []

    def get_trials(self) -> list[_Trial]:
        return self.trials

    def stop_trial(self, trial: _Trial) -> None:  # as Tune's: the scheduler hears of it
        self.actions.append((trial.trial_id, STOP))
        self.scheduler.on_trial_complete(self, trial, trial.last_result)
        trial.status = Trial.TERMINATED

    def _schedule_trial_train(self, trial: _Trial) -> None:
        self.actions.append((trial.trial_id, CONTINUE))


def _ordered(n: int, slots: int = 2, **asha: Any) -> tuple[OrderedASHA, _Controller, list]:
    clock = SearchClock(slots)
    sched = OrderedASHA(clock, metric="val_mAP", mode="max", **asha)
    trials = [_Trial(f"t{k}") for k in range(n)]
    for k, t in enumerate(trials):
        clock.add(t.trial_id, 0 if k < slots else k)
    return sched, _Controller(trials, sched), trials


def _report(sched: OrderedASHA, ctl: _Controller, trial: _Trial, epoch: int, value: float) -> str:
    result = {"epoch": epoch, "val_mAP": value}
    decision = sched.on_trial_result(ctl, trial, result)
    trial.last_result = result
    return decision


def test_tune_controller_still_has_what_the_scheduler_calls() -> None:
    """Pins Ray 2.60's controller methods a waiting trial is continued or stopped with."""
    assert callable(TuneController._schedule_trial_train)
    assert callable(TuneController.stop_trial)


def test_rungs_match_rays_asha() -> None:
    for grace, max_t, rf in [(4, 8, 2), (2, 8, 2), (1, 3, 2), (1, 27, 3)]:
        ray_asha = ASHAScheduler(time_attr="epoch", metric="m", mode="max", max_t=max_t,
                                 grace_period=grace, reduction_factor=rf)
        expected = sorted(m for m, _ in ray_asha._brackets[0]._rungs)
        assert rungs(grace, max_t, rf) == expected


def test_a_later_trial_arriving_first_waits_and_is_ranked_in_trial_order() -> None:
    # t0 and t1 start together; t1 reaches the rung first with the higher value
    values = {"t0": 50.0, "t1": 60.0}
    # Ray's ASHA on arrival: t1 is first at the rung and continues, t0 is cut below it
    ray_asha = ASHAScheduler(time_attr="epoch", metric="val_mAP", mode="max", max_t=3,
                             grace_period=1, reduction_factor=2)
    ray_trials = {k: _Trial(k) for k in values}
    for t in ray_trials.values():
        ray_asha.on_trial_add(None, t)
    arrival = [ray_asha.on_trial_result(None, ray_trials[k], {"epoch": 1, "val_mAP": values[k]})
               for k in ("t1", "t0")]
    assert arrival == [CONTINUE, STOP]
    # in trial order (t0 first), both continue: 60 is above t0's 50
    in_order = ASHAScheduler(time_attr="epoch", metric="val_mAP", mode="max", max_t=3,
                             grace_period=1, reduction_factor=2)
    for t in ray_trials.values():
        in_order.on_trial_add(None, t)
    assert [in_order.on_trial_result(None, ray_trials[k], {"epoch": 1, "val_mAP": values[k]})
            for k in ("t0", "t1")] == [CONTINUE, CONTINUE]

    sched, ctl, (t0, t1) = _ordered(2, max_t=3, grace_period=1, reduction_factor=2)
    assert _report(sched, ctl, t1, 1, values["t1"]) == NOOP  # waits for t0
    assert ctl.actions == []
    assert _report(sched, ctl, t0, 1, values["t0"]) == CONTINUE
    assert ctl.actions == [("t1", CONTINUE)]  # then t1, ranked after t0: continues


def test_waiting_trial_is_stopped_when_an_earlier_one_ranks_above_it() -> None:
    sched, ctl, (t0, t1) = _ordered(2, max_t=4, grace_period=1, reduction_factor=2)
    assert _report(sched, ctl, t1, 1, 40.0) == NOOP
    assert _report(sched, ctl, t0, 1, 70.0) == CONTINUE
    assert ctl.actions == [("t1", STOP)]
    assert sched.clock.entries["t1"].end == 1


def test_a_decision_waits_for_the_checkpoint_save_of_the_waiting_trial() -> None:
    sched, ctl, (t0, t1) = _ordered(2, max_t=4, grace_period=1, reduction_factor=2)
    assert _report(sched, ctl, t1, 1, 40.0) == NOOP
    t1.is_saving = True  # Tune is still saving t1's epoch-1 checkpoint
    assert _report(sched, ctl, t0, 1, 70.0) == CONTINUE
    assert ctl.actions == [] and sched.clock.entries["t1"].end == 1  # decided, end known
    sched.choose_trial_to_run(ctl)
    assert ctl.actions == []
    t1.is_saving = False
    sched.choose_trial_to_run(ctl)  # Tune's next step
    assert ctl.actions == [("t1", STOP)]


def test_a_stop_returned_to_tune_sets_the_end_at_once() -> None:
    """Tune carries out a returned STOP after the checkpoint save; the clock must not count
    the trial as running meanwhile (the next trial's start would depend on that timing)."""
    sched, ctl, (t0, t1) = _ordered(2, max_t=2, grace_period=1, reduction_factor=2)
    assert _report(sched, ctl, t0, 1, 70.0) == CONTINUE
    assert _report(sched, ctl, t1, 1, 40.0) == STOP
    assert sched.clock.entries["t1"].end == 1
    assert sched.clock.entries["t1"].result == {"epoch": 1, "val_mAP": 40.0}
    assert _report(sched, ctl, t0, 2, 75.0) == STOP  # max_t
    assert sched.clock.entries["t0"].end == 2


def test_an_earlier_trial_ending_before_the_rung_releases_the_wait() -> None:
    sched, ctl, (t0, t1) = _ordered(2, max_t=8, grace_period=2, reduction_factor=2)
    assert _report(sched, ctl, t0, 1, 30.0) == CONTINUE
    assert _report(sched, ctl, t1, 1, 35.0) == CONTINUE
    assert _report(sched, ctl, t1, 2, 45.0) == NOOP  # t0 may still reach epoch 2
    t0.status = Trial.ERROR  # t0 fails for good during its epoch 2
    sched.on_trial_error(ctl, t0)
    assert ctl.actions == [("t1", CONTINUE)]  # first at the rung: continues
    # a trial waiting for a retry of an earlier one would hold the retry's slot: no wait
    sched2, ctl2, (u0, u1) = _ordered(2, max_t=8, grace_period=2, reduction_factor=2)
    u0.num_failures, u0.status = 1, Trial.PENDING
    assert _report(sched2, ctl2, u1, 2, 45.0) == CONTINUE


@pytest.mark.parametrize("order", [("t0", "t1", "t2"), ("t2", "t1", "t0"), ("t1", "t2", "t0")])
def test_any_arrival_order_gives_the_trial_order_decisions(order: tuple[str, ...]) -> None:
    values = {"t0": 55.0, "t1": 70.0, "t2": 60.0}
    reference = ASHAScheduler(time_attr="epoch", metric="val_mAP", mode="max", max_t=4,
                              grace_period=1, reduction_factor=2)
    ref_trials = {k: _Trial(k) for k in values}
    for t in ref_trials.values():
        reference.on_trial_add(None, t)
    expected = {k: reference.on_trial_result(None, ref_trials[k],
                                             {"epoch": 1, "val_mAP": values[k]})
                for k in sorted(values)}
    sched, ctl, trials = _ordered(3, slots=3, max_t=4, grace_period=1, reduction_factor=2)
    by_id = {t.trial_id: t for t in trials}
    decided = {}
    for k in order:
        d = _report(sched, ctl, by_id[k], 1, values[k])
        if d != NOOP:
            decided[k] = d
    decided.update(dict(ctl.actions))
    assert decided == expected


def test_clock_waits_while_a_running_trial_could_end_before_the_next_start() -> None:
    clock = SearchClock(slots=2)
    assert clock.next_start() == 0
    clock.add("a", 0)
    clock.add("b", 0)
    assert clock.next_start() is None  # nothing ended: no slot yet
    clock.entries["b"].epochs, clock.entries["b"].end = 4, 4  # b stopped at its rung, time 4
    clock.entries["a"].epochs = 3  # a has trained 3 epochs: it may still end at time 4
    assert clock.next_start() is None
    clock.entries["a"].epochs = 4
    clock.entries["a"].waiting = True  # a's own decision at time 4 is pending
    assert clock.next_start() is None
    clock.entries["a"].waiting = False  # a continues: it ends at 5 or later
    assert clock.next_start() == 4
    assert clock.ended_by(4) == ["b"]
    clock.add("c", 4)
    clock.entries["a"].end = 8
    clock.entries["c"].epochs, clock.entries["c"].end = 4, 4  # c ends at 4 + 4 = 8 too
    assert clock.next_start() == 8
    assert clock.ended_by(8) == ["b", "a", "c"]  # by end time, then trial number


def _searcher(tmp_path: Path, clock: SearchClock | None, num_trials: int,
              learns: bool = True) -> Any:
    def space(trial: optuna.Trial) -> None:
        trial.suggest_float("x", 0.0, 1.0)

    return PrunedAwareOptunaSearch(
        space=space, metric="val_mAP", mode="max",
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2),
        storage=sqlite_storage(tmp_path / "s.db"), study_name="s", max_epochs=4,
        clock=clock, num_trials=num_trials, sampler_learns=learns)


def test_searcher_tells_only_what_ended_before_the_next_start(tmp_path: Path) -> None:
    clock = SearchClock(slots=2)
    searcher = _searcher(tmp_path, clock, num_trials=4)
    assert searcher.suggest("a") is not None and searcher.suggest("b") is not None
    for epoch in (1, 2):
        searcher.on_trial_result("b", {"val_mAP": 10.0 * epoch, "epoch": epoch})
        searcher.on_trial_result("a", {"val_mAP": 30.0 + epoch, "epoch": epoch})
    clock.entries["a"].epochs = 2  # a continues past epoch 2
    clock.entries["b"].epochs, clock.entries["b"].end = 2, 2  # b's stop decided at time 2...
    assert searcher.suggest("c") is None  # ... but neither Tune nor the scheduler has its result
    # the scheduler keeps the result of a stop it decided (Tune hands it over after the save)
    clock.entries["b"].result = {"val_mAP": 20.0, "epoch": 2, "best_val_mAP": 20.0}
    for epoch in (3, 4):
        searcher.on_trial_result("a", {"val_mAP": 30.0 + epoch, "epoch": epoch})
    clock.entries["a"].epochs, clock.entries["a"].end = 4, 4  # a ended in real time first...
    searcher.on_trial_complete("a", {"val_mAP": 34.0, "epoch": 4, "best_val_mAP": 34.0})
    study = searcher._ot_study
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [optuna.trial.TrialState.RUNNING] * 2  # ... both are told later
    assert searcher.suggest("c") is not None  # c starts at time 2, when b ended
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states == {0: optuna.trial.TrialState.RUNNING, 1: optuna.trial.TrialState.PRUNED,
                      2: optuna.trial.TrialState.RUNNING}
    assert study.get_trials(deepcopy=False)[1].intermediate_values == {1: 10.0, 2: 20.0}
    searcher.on_trial_complete("b", {"val_mAP": 20.0, "epoch": 2, "best_val_mAP": 20.0})
    assert searcher.suggest("d") is None  # needs a second end: c may end before a's 4
    clock.entries["c"].epochs = 2  # c: start 2 + 2 epochs, continuing: ends at 5 or later
    assert searcher.suggest("d") is not None  # the last trial: every deferred tell goes out
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[0] == optuna.trial.TrialState.COMPLETE
    assert states[3] == optuna.trial.TrialState.RUNNING


def test_random_search_numbers_trials_without_waiting(tmp_path: Path) -> None:
    clock = SearchClock(slots=2)
    searcher = _searcher(tmp_path, clock, num_trials=5, learns=False)  # search.sampler: random
    for k in "abc":  # no slot has freed in logical time, yet c is drawn at once
        assert searcher.suggest(k) is not None
    assert [clock.entries[k].index for k in "abc"] == [0, 1, 2]
    searcher.on_trial_complete("a", {"val_mAP": 1.0, "epoch": 4, "best_val_mAP": 1.0})
    assert searcher._ot_study.get_trials(deepcopy=False)[0].state.name == "COMPLETE"


def _spin(seconds: float) -> None:
    import time

    end = time.time() + seconds
    while time.time() < end:
        pass


def _decisions(exp: Path) -> list[tuple[Any, ...]]:
    """Per Optuna trial number: parameters, state, value and every epoch's val mAP."""
    study = optuna.load_study(study_name=exp.name, storage=f"sqlite:///{exp / 'optuna.db'}")
    return [(t.number, t.params, t.state.name, t.value, sorted(t.intermediate_values.items()))
            for t in study.get_trials(deepcopy=False)]


@pytest.mark.integration
def test_the_same_search_twice_decides_the_same(tmp_path: Path, digits_dir: Path,
                                                 kill_session) -> None:
    """Two runs of one search, the second beside a busy process that shifts every trial's
    timing, train the same trials for the same epochs and end on the same answer; each rung
    decision is Ray's ASHA's had the results arrived in trial order."""
    from conftest import run_search_cli

    args = ["--method", "hill", "--space", "search_spaces/hill.yaml", "--data-dir",
            str(digits_dir), "--trials", "6", "--epochs", "3", "--grace-period", "1",
            "--concurrency", "2", "--num-cpus", "2", "--no-test", "--out", str(tmp_path)]
    run_search_cli([*args, "--name", "quiet"], tmp_path / "quiet.log", kill_session)
    hog = multiprocessing.get_context("spawn").Process(target=_spin, args=(600,), daemon=True)
    hog.start()
    try:
        run_search_cli([*args, "--name", "busy"], tmp_path / "busy.log", kill_session)
    finally:
        hog.terminate()
    quiet, busy = _decisions(tmp_path / "quiet"), _decisions(tmp_path / "busy")
    assert quiet == busy
    assert len(quiet) == 6 and all(state in ("COMPLETE", "PRUNED") for _, _, state, _, _ in quiet)
    best = [yaml.safe_load((tmp_path / n / "best_config.yaml").read_text())
            for n in ("quiet", "busy")]
    assert best[0]["train"] == best[1]["train"] and best[0]["params"] == best[1]["params"]
    # Ray's ASHA, fed each trial's curve whole in trial-number order, stops where they stopped
    reference = ASHAScheduler(time_attr="epoch", metric="val_mAP", mode="max", max_t=3,
                              grace_period=1, reduction_factor=2)
    epochs_run = []
    for number, _, _, _, curve in quiet:
        trial = _Trial(f"n{number}")
        reference.on_trial_add(None, trial)
        for epoch, value in curve:
            if reference.on_trial_result(None, trial, {"epoch": epoch, "val_mAP": value}) == STOP:
                break
        epochs_run.append(epoch)
    assert epochs_run == [len(curve) for *_, curve in quiet]
    assert 3 < sum(epochs_run) < 18  # some trials stopped early, some ran the budget
