"""OptunaSearch with the fidelity fixes this platform needs (Ray 2.60 behaviour, pinned).

Ray's OptunaSearch tells Optuna that an ASHA-stopped trial is COMPLETE with its low-fidelity
value (so TPE mixes fidelities), drops the final result from the intermediate values, and
numbers intermediate values by Tune's ``training_iteration`` (which restarts on a relaunch).
:class:`PrunedAwareOptunaSearch`:

* reports each result at step ``epoch`` (reported once per epoch);
* on completion, first records the final result as an intermediate value, then tells Optuna
  PRUNED when the trial ran fewer than ``max_epochs`` epochs (Optuna then keeps the last
  intermediate value as its value) and COMPLETE with ``objective`` (the trial's best
  validation mAP) otherwise; errored trials are FAIL. ``stopped_state="complete"`` restores
  the stock behaviour for comparison (an early-stopped trial is COMPLETE with its best
  validation mAP so far, so TPE ranks low-fidelity values with full ones:
  ``benchmarks/search_efficiency.py --compare-stopped`` measures what that costs);
* tags every Optuna trial with its Tune trial id (user attribute ``tune_trial_id``), and after
  a driver crash (``restore``, or a new searcher on the study of a search killed before Tune
  saved any state) hands Optuna trials that were asked for but never reached Tune's saved
  state to the next new Tune trials, with their parameters, so a resumed study has exactly
  one Optuna trial per Tune trial and nothing is suggested twice;
* with a :class:`tuner.ordering.SearchClock` (``search.order: trial``), suggests each trial
  having told Optuna exactly the trials that ended at or before its logical start, and waits
  (returns None, so Tune asks again) while a running trial could still end before then; the
  tells of other ended trials are deferred until then, or until the last trial is asked for
  (a sampler that ignores results, ``sampler_learns=False``, only numbers the trials);
* after a search that ended with trials unfinished (Ctrl-C, a full disk, an error:
  ``tuner.faults`` tells them FAIL with user attribute ``interrupted``), continues each
  resumed Tune trial as a new Optuna trial with the same parameters and intermediate values
  (user attribute ``continues_trial``: the old trial's number).
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from tuner.faults import INTERRUPTED_ATTR

logger = logging.getLogger(__name__)


def _closed_as_interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and INTERRUPTED_ATTR in trial.user_attrs


def sqlite_storage(path: str | Path, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The Optuna storage of an experiment's ``optuna.db``, safe against a concurrent opener.

    Optuna stamps a new database's schema version on first open; when a second process (an
    ``optuna-dashboard``, a monitoring script, a test polling the study) opens the same fresh
    file at that moment, one of the two stamps fails with a UNIQUE-constraint error. The
    schema is then complete, so opening again succeeds: retry a few times before giving up.
    """
    import sqlalchemy.exc

    url = f"sqlite:///{Path(path)}"
    for attempt in range(1, attempts):
        try:
            return optuna.storages.RDBStorage(url)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            time.sleep(0.2 * attempt)
    return optuna.storages.RDBStorage(url)  # the last attempt raises what it meets


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that marks early-stopped trials PRUNED and keeps every epoch's value."""

    def __init__(self, *args: Any, max_epochs: int, objective: str = "best_val_mAP",
                 stopped_state: str = "pruned", clock: Any = None,
                 num_trials: int | None = None, sampler_learns: bool = True,
                 **kwargs: Any) -> None:
        if stopped_state not in ("pruned", "complete"):
            raise ValueError(f"stopped_state must be pruned or complete, got {stopped_state!r}")
        super().__init__(*args, **kwargs)
        self._stopped = TrialState.PRUNED if stopped_state == "pruned" else TrialState.COMPLETE
        self._max_epochs = int(max_epochs)
        self._objective = objective
        self._reported: dict[str, set[int]] = {}
        self._clock = clock  # tuner.ordering.SearchClock, or None: tell and ask on arrival
        self._num_trials = num_trials
        # a sampler that ignores results (random search) needs the clock's trial numbers only
        self._learns = sampler_learns
        self._deferred: dict[str, tuple[dict[str, Any] | None, bool]] = {}
        # a search started again in place (killed before Tune saved any state) finds the
        # Optuna trials it had asked for in the study: hand them to its first trials
        self._orphans = self._unclaimed() if getattr(self, "_ot_study", None) else []

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        clock, start = self.__dict__.get("_clock"), None
        if clock is not None and trial_id not in self._ot_trials:
            start = clock.next_start() if self._learns else 0
            if start is None:  # a running trial may still end before this one's start
                return None
            ended = clock.ended_by(start)
            for t in ended:  # stopped, not yet handed over by Tune: the scheduler's result
                if t not in self._deferred and t not in self._completed_trials:
                    if clock.entries[t].result is None:
                        return None
                    self._deferred[t] = (clock.entries[t].result, False)
            self._tell_deferred(ended)
        if trial_id not in self._ot_trials and self._orphans:
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, self._orphans.pop(0))
        params = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        if start is not None and isinstance(params, dict):
            clock.add(trial_id, start)
            if self._num_trials is not None and len(clock) >= self._num_trials:
                self._stop_deferring()  # nothing left to ask for
        return params

    def _tell_deferred(self, trial_ids: list[str]) -> None:
        for trial_id in trial_ids:
            if trial_id in self._deferred:
                result, error = self._deferred.pop(trial_id)
                self._tell(trial_id, result, error)

    def _stop_deferring(self) -> None:
        """Tell every deferred trial now and every later one on arrival."""
        self._clock = None
        self._tell_deferred(list(self._deferred))

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.__dict__.setdefault("_deferred", {})
        self.__dict__.setdefault("_learns", True)
        self._clock = None  # a resumed search decides on arrival (tuner.ordering)
        self.__dict__.setdefault("_orphans", [])
        self.__dict__.setdefault("_stopped", TrialState.PRUNED)
        self._orphans = self._unclaimed()
        self._interrupted = {  # closed FAIL when the previous run ended (tuner.faults)
            tune_id for tune_id, t in self._ot_trials.items()
            if _closed_as_interrupted(self._ot_study._storage.get_trial(t._trial_id))
        }
        self._tell_deferred(list(self._deferred))  # trials that ended before the crash

    def _live_trial(self, trial_id: str) -> optuna.trial.Trial:
        """The Optuna trial of a Tune trial; a trial the previous run closed as interrupted
        continues as a new Optuna trial with its parameters and intermediate values."""
        ot_trial = self._ot_trials[trial_id]
        if trial_id not in self.__dict__.get("_interrupted", ()):
            return ot_trial
        self._interrupted.discard(trial_id)
        storage = self._ot_study._storage
        old = storage.get_trial(ot_trial._trial_id)
        attrs = {k: v for k, v in old.user_attrs.items() if k != INTERRUPTED_ATTR}
        template = optuna.trial.FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None,
            datetime_start=datetime.datetime.now(), datetime_complete=None,
            params=old.params, distributions=old.distributions,
            user_attrs={**attrs, "continues_trial": old.number}, system_attrs={},
            intermediate_values=old.intermediate_values, trial_id=-1)
        new_id = storage.create_new_trial(self._ot_study._study_id, template_trial=template)
        logger.info("trial %s continues Optuna trial %d as a new one", trial_id, old.number)
        self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, new_id)
        return self._ot_trials[trial_id]

    def _unclaimed(self) -> list[int]:
        """Optuna trials asked for (RUNNING) that no Tune trial of this searcher holds."""
        known = {t._trial_id for t in self._ot_trials.values()}
        orphans = [
            t._trial_id
            for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t._trial_id not in known
        ]
        if orphans:
            logger.info("re-using %d Optuna trial(s) asked for before the crash", len(orphans))
        return orphans

    def _report(self, trial_id: str, result: dict[str, Any]) -> None:
        value, epoch = result.get(self.metric), result.get("epoch")
        if value is None or epoch is None or not math.isfinite(float(value)):
            return
        steps = self._reported.setdefault(trial_id, set())
        if int(epoch) not in steps:
            self._live_trial(trial_id).report(float(value), int(epoch))
            steps.add(int(epoch))

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        clock = self.__dict__.get("_clock")
        if clock is not None and trial_id in clock.entries:
            if error:
                clock.failed(trial_id)
            if self._learns:
                self._deferred[trial_id] = (result, error)  # told when a later trial may see it
                return
        self._tell(trial_id, result, error)

    def _tell(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        state, value = self._final_state(result, error)
        if result and state != TrialState.FAIL:
            self._report(trial_id, result)
        ot_trial = self._live_trial(trial_id)
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except (ValueError, RuntimeError) as exc:
            logger.warning("could not tell Optuna about trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)
        self._reported.pop(trial_id, None)

    def _final_state(self, result: dict[str, Any] | None,
                     error: bool) -> tuple[TrialState, float | None]:
        if error or not result or result.get(self.metric) is None:
            return TrialState.FAIL, None
        if int(result.get("epoch", 0)) < self._max_epochs and self._stopped == TrialState.PRUNED:
            return TrialState.PRUNED, None
        value = float(result.get(self._objective, result[self.metric]))
        if not math.isfinite(value):
            return TrialState.FAIL, None
        return TrialState.COMPLETE, value
