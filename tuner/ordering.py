"""A search whose answer does not depend on which trial's epoch finished first.

Every trial is deterministic (``tuner.loop``), yet Ray's asynchronous ASHA and a sampler that
learns from finished trials still make a search's answer depend on timing: two trials that
reach a rung together are ranked in whichever order their results arrive (the first one at a
rung always continues), and a new trial's configuration depends on which trials had finished
when its slot opened. Two runs of the same main job trained 44, 48 or 52 epochs and could end
on different configurations (``benchmarks/RESULTS.md`` section 9).

``search.order: trial`` (the default) takes those decisions on a *logical clock* instead:
trials are numbered in the order they were asked for, every epoch counts one unit of time and
``max_concurrent`` slots run trials one after another, so trial ``k`` starts when the
``k - slots + 1``-th trial end (in logical time) frees a slot. Then:

* a trial reaching a rung is ranked against the trials numbered before it only, exactly as
  Ray's ASHA would rank it had results arrived in trial order. When an earlier trial that may
  still reach the rung has not yet, the trial waits there (Tune's ``NOOP``: its process holds
  its slot, blocked in ``report``) until that trial records its value or ends;
* the sampler suggests trial ``k`` having been told exactly the trials that ended at or
  before trial ``k``'s logical start (:class:`tuner.optuna_search.PrunedAwareOptunaSearch`
  defers its ``tell``), waiting when a running trial could still end before then.

Tune carries out a decision only after it has saved the epoch's checkpoint, so a stop's end
and result are kept here when it is decided: the next suggestion needs neither to wait for
Tune's stop nor to see a trial as running that has ended (which made two runs differ), and
the next trial is pending when the stopped trial's process is freed, so it reuses it (Tune
keeps only one idle process when no trial is pending).

So a search's answer is a function of its space and seeds. The waits are short when trials'
epochs take about as long (they wait for the near-ties that arrival order used to break); a
space whose configurations differ a lot in speed (e.g. a searched batch size) waits longer,
which ``search.order: arrival`` (Ray's ASHA as it is) avoids. Not kept across a driver crash:
a resumed search continues as ``arrival`` (Tune does not save schedulers).

When an earlier trial is not running (a retry after a failure waiting for resources, a paused
trial), a decision does not wait for it: nothing may hold a slot waiting for a trial that needs
that slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler


@dataclass
class _Entry:
    index: int
    start: int  # logical start: the slot's time
    epochs: int = 0  # last epoch reported
    end: int | None = None  # epochs trained when it ended
    waiting: bool = False  # its decision at ``epochs`` is not taken yet
    result: dict | None = None  # the last result of a trial this scheduler stopped


@dataclass
class SearchClock:
    """Logical time of a search: the trials in the order asked for, one unit per epoch."""

    slots: int
    entries: dict[str, _Entry] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, trial_id: str, start: int) -> None:
        self.entries[trial_id] = _Entry(len(self.entries), start)

    def next_start(self) -> int | None:
        """Logical start of the next trial, or None while a running trial could still end
        at or before it (the caller asks again later)."""
        k = len(self.entries)
        if k < self.slots:
            return 0
        need = k - self.slots + 1  # the need-th trial end frees the next trial's slot
        ends = sorted(e.start + e.end for e in self.entries.values() if e.end is not None)
        if len(ends) < need:
            return None
        at = ends[need - 1]
        for e in self.entries.values():
            if e.end is None and self.earliest_end(e) <= at:
                return None
        starts = [e.start for e in self.entries.values()]
        return max(at, *starts)

    @staticmethod
    def earliest_end(e: _Entry) -> int:
        """A running trial ends at its last epoch (a decision pending there) or later."""
        return e.start + e.epochs + (0 if e.waiting else 1)

    def failed(self, trial_id: str) -> None:
        """A trial failed for good: it ended during the epoch after its last report."""
        e = self.entries.get(trial_id)
        if e is not None and e.end is None:
            e.end, e.waiting = e.epochs + 1, False

    def ended_by(self, at: int) -> list[str]:
        """Trials that ended at or before logical time ``at``, by end then number."""
        done = [(e.start + e.end, e.index, tid) for tid, e in self.entries.items()
                if e.end is not None and e.start + e.end <= at]
        return [tid for _, _, tid in sorted(done)]


def rungs(grace_period: int, max_t: int, reduction_factor: float) -> list[int]:
    """Ray's ASHA milestones (one bracket), ascending: ``grace * rf**k`` up to ``max_t``."""
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return sorted(grace_period * reduction_factor ** k for k in range(count))


class OrderedASHA(FIFOScheduler):
    """Ray's ASHA (one bracket, ``stop_last_trials``) deciding rungs in trial order.

    ``max_t`` stops a trial at its last epoch; without ``grace_period`` (``search.scheduler:
    fifo``) there are no rungs and the scheduler only keeps the clock. Trials the clock does
    not know (a search resumed after a driver crash) are decided on arrival, as Ray's ASHA does.
    """

    def __init__(self, clock: SearchClock, *, metric: str, mode: str, max_t: int,
                 time_attr: str = "epoch", grace_period: int | None = None,
                 reduction_factor: float = 2) -> None:
        super().__init__()
        self.clock = clock
        self._metric, self._mode = metric, mode
        self._sign = 1.0 if mode == "max" else -1.0
        self._time_attr = time_attr
        self._max_t = int(max_t)
        self._rf = float(reduction_factor)
        self._rungs = rungs(grace_period, max_t, reduction_factor) if grace_period else []
        self._recorded: dict[int, dict[str, float]] = {m: {} for m in self._rungs}
        self._waiting: dict[str, tuple[Any, dict]] = {}  # trial id -> (Tune trial, result)
        self._actions: dict[str, tuple[Any, str]] = {}  # decided, not yet carried out
        self._settling = False

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # given at construction

    # -- Tune's hooks
    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        epoch = result.get(self._time_attr)
        if epoch is None or self._metric not in result:
            return TrialScheduler.CONTINUE
        entry = self.clock.entries.get(trial.trial_id)
        if entry is not None:
            entry.epochs = int(epoch)
        if epoch >= self._max_t:
            action = TrialScheduler.STOP
        else:
            rung = self._rung_due(trial.trial_id, int(epoch))
            if rung is None:
                action = TrialScheduler.CONTINUE
            elif entry is not None and self._blockers(tune_controller, entry, rung):
                entry.waiting = True
                self._waiting[trial.trial_id] = (trial, result)
                action = TrialScheduler.NOOP
            else:
                action = self._decide(trial.trial_id, rung, result[self._metric])
        if action == TrialScheduler.STOP and entry is not None:
            # its end is known now; Tune stops it only after the epoch's checkpoint is saved,
            # and the searcher may take its result from here before that (no process start
            # for the next trial while two trials stop at once: Tune caches only one)
            entry.end, entry.result = entry.epochs, dict(result)
        if action != TrialScheduler.NOOP:
            self._settle(tune_controller)
        return action

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        self._carry_out(tune_controller)  # Tune calls this on every step of its loop
        return super().choose_trial_to_run(tune_controller)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._ended(tune_controller, trial, ended=True)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        # also called before a retry: the trial's end is set by the searcher's final
        # on_trial_complete(error=True) (SearchClock.failed)
        self._ended(tune_controller, trial, ended=False)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._ended(tune_controller, trial, ended=True)

    def debug_string(self) -> str:
        cut = ", ".join(f"epoch {m}: {len(r)} recorded" for m, r in self._recorded.items())
        return f"ASHA in trial order ({cut}); {len(self._waiting)} waiting at a rung"

    # -- the rung logic of ray.tune.schedulers.async_hyperband._Bracket, in trial order
    def _rung_due(self, trial_id: str, epoch: int) -> int | None:
        """The highest milestone reached that this trial has not recorded at, if any."""
        for milestone in reversed(self._rungs):
            if epoch >= milestone:
                return None if trial_id in self._recorded[milestone] else milestone
        return None

    def _decide(self, trial_id: str, rung: int, value: Any) -> str:
        recorded = self._recorded[rung]
        reward = self._sign * float(value)
        action = TrialScheduler.CONTINUE
        if recorded:
            cutoff = np.nanpercentile(list(recorded.values()), (1 - 1 / self._rf) * 100)
            if reward < cutoff:
                action = TrialScheduler.STOP
        recorded[trial_id] = reward
        return action

    def _blockers(self, tune_controller: Any, entry: _Entry, rung: int) -> list[str]:
        """Earlier trials still running that have not recorded at ``rung`` but may."""
        from ray.tune.experiment import Trial

        live = {t.trial_id: t for t in tune_controller.get_trials()}
        out = []
        for tid, other in self.clock.entries.items():
            if other.index >= entry.index or other.end is not None:
                continue
            if tid in self._recorded[rung] or (other.epochs >= rung and not other.waiting):
                continue  # recorded, or past the rung
            t = live.get(tid)
            if t is None or t.status not in (Trial.RUNNING, Trial.PENDING) or t.num_failures:
                continue  # never hold a slot for a trial that may need it
            out.append(tid)
        return out

    def _ended(self, tune_controller: Any, trial: Any, ended: bool) -> None:
        entry = self.clock.entries.get(trial.trial_id)
        if entry is not None:
            entry.waiting = False
            if ended and entry.end is None:
                entry.end = entry.epochs
        self._waiting.pop(trial.trial_id, None)
        self._actions.pop(trial.trial_id, None)
        self._settle(tune_controller)

    def _settle(self, tune_controller: Any) -> None:
        """Decide, in trial order, every waiting trial nothing holds any more."""
        if self._settling:
            return
        self._settling = True
        try:
            progress = True
            while progress:
                progress = False
                for tid in sorted(self._waiting, key=lambda t: self.clock.entries[t].index):
                    entry = self.clock.entries[tid]
                    rung = self._rung_due(tid, entry.epochs)
                    if rung is not None and self._blockers(tune_controller, entry, rung):
                        continue
                    trial, result = self._waiting.pop(tid)
                    entry.waiting = False
                    action = TrialScheduler.CONTINUE
                    if rung is not None:
                        action = self._decide(tid, rung, result[self._metric])
                    if action == TrialScheduler.STOP:
                        entry.end, entry.result = entry.epochs, dict(result)
                    self._actions[tid] = (trial, action)
                    progress = True
                    break  # the sets changed: start again from the earliest
        finally:
            self._settling = False
        self._carry_out(tune_controller)

    def _carry_out(self, tune_controller: Any) -> None:
        """Continue or stop the trials decided after waiting, once Tune has saved the
        checkpoint of their last epoch (it holds a trial's decisions until then)."""
        for tid, (trial, action) in list(self._actions.items()):
            if getattr(trial, "is_saving", False) or tid not in self._actions:
                continue
            del self._actions[tid]
            if action == TrialScheduler.STOP:
                tune_controller.stop_trial(trial)
            else:  # what Tune does on CONTINUE (Ray 2.60; tests/test_ordering.py), on the
                # controller itself, not the wrapper that warns on private names
                getattr(tune_controller, "_tune_controller",
                        tune_controller)._schedule_trial_train(trial)
