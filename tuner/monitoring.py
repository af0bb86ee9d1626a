"""Platform metrics for the Ray dashboard, exported with Ray's metrics API.

Ray's metrics agent on every node serves these in Prometheus format (``ray start
--metrics-export-port``; Ray prefixes every name with ``ray_``), the dashboard's Metrics page
charts them once Prometheus/Grafana scrape the head node, and they are plain numbers, so any
scraper can alert on them.

Per trial (gauges, tags ``experiment`` and ``trial_id``), set by :func:`trial_metrics` after
every epoch inside the trial:

- ``mlt_trial_epoch``: completed epochs,
- ``mlt_trial_val_map``: validation mAP (percent) of the last epoch,
- ``mlt_trial_images_per_s``: training images per second of the last epoch.

Per search (tag ``experiment``), set by :func:`search_progress` (or a :class:`SearchProgress`)
on the driver whenever a trial ends:

- ``mlt_search_trials_finished``, ``mlt_search_trials_pruned``, ``mlt_search_trials_failed``:
  counters (exported as ``..._total``) of trials that ran their full budget, were stopped early
  by ASHA, or raised,
- ``mlt_search_best_val_map``: gauge, best validation mAP of any trial so far.

Outside a Ray worker or driver (unit tests, a plain ``fit``) every call is a no-op, so the loop
and the methods stay runnable without a cluster.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from typing import Any

__all__ = [
    "METRIC_NAMES",
    "SearchProgress",
    "images_per_second",
    "quiet_ray_console",
    "search_progress",
    "trial_metrics",
]

TRIAL_TAGS = ("experiment", "trial_id")
SEARCH_TAGS = ("experiment",)
OUTCOMES = ("finished", "pruned", "failed")

#: metric name -> (kind, description, tag keys)
_SPECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mlt_trial_epoch": ("gauge", "completed epochs of a trial", TRIAL_TAGS),
    "mlt_trial_val_map": ("gauge", "validation mAP (percent) of a trial's last epoch", TRIAL_TAGS),
    "mlt_trial_images_per_s": ("gauge", "training images/s of a trial's last epoch", TRIAL_TAGS),
    "mlt_search_best_val_map": ("gauge", "best validation mAP (percent) so far", SEARCH_TAGS),
    **{
        f"mlt_search_trials_{outcome}": ("counter", f"trials {outcome} so far", SEARCH_TAGS)
        for outcome in OUTCOMES
    },
}
#: the names as Prometheus shows them (Ray adds ``ray_``, counters get ``_total``)
METRIC_NAMES = tuple(
    f"ray_{name}" + ("_total" if kind == "counter" else "") for name, (kind, _, _) in _SPECS.items()
)

_lock = threading.Lock()
_metrics: dict[str, Any] = {}
#: the Ray session the cached metric objects belong to (node id, job id)
_owner: tuple[str, str] | None = None


def _ray_session() -> tuple[str, str] | None:
    """(node id, job id) of this process's Ray connection, or None when Ray is not up."""
    import ray

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    return context.get_node_id(), context.get_job_id()


def _metric(name: str) -> Any | None:
    """The metric object ``name`` of this process's current Ray session, or None outside Ray.

    Metric objects are bound to the Ray connection that created them: after a
    ``ray.shutdown()`` and a new ``ray.init()`` in the same process (tests, notebooks) the
    old ones are dropped with the gauges they were refreshing.
    """
    global _owner
    session = _ray_session()
    if session is None:
        return None
    with _lock:
        if session != _owner:
            _metrics.clear()
            _gauges.clear()
            _exported.clear()
            _owner = session
        if name not in _metrics:
            from ray.util import metrics

            kind, description, tags = _SPECS[name]
            cls = metrics.Gauge if kind == "gauge" else metrics.Counter
            _metrics[name] = cls(name, description=description, tag_keys=tags)
        return _metrics[name]


REFRESH_S = 1.0
_gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
_refresher: threading.Thread | None = None
_stop = threading.Event()


def _set(name: str, value: float, tags: Mapping[str, str]) -> None:
    """Set a gauge and keep re-sending its value while this process's Ray session lives.

    Ray's metrics agent forgets a gauge two report intervals after its last update (Ray 2.60,
    ``OpenTelemetryMetricRecorder``), while an epoch can take minutes: without the refresh a
    trial's gauges would vanish from the dashboard between epochs. A finished trial's process
    exits, so its gauges then age out as they should. The refresh thread stops when Ray shuts
    down or its session changes, and at interpreter exit (before Ray's own exit handler), so
    it never calls into a torn-down Ray core worker.
    """
    metric = _metric(name)
    if metric is None or not math.isfinite(value):
        return
    metric.set(value, tags=dict(tags))
    global _refresher
    with _lock:
        _gauges[(name, tuple(sorted(tags.items())))] = value
        if _refresher is None or not _refresher.is_alive():
            import atexit

            _stop.clear()
            _refresher = threading.Thread(target=_refresh, args=(_owner,), name="mlt-metrics",
                                          daemon=True)
            _refresher.start()
            atexit.register(_stop_refresher)


def _stop_refresher() -> None:
    """Stop the refresh thread and wait for it (registered with ``atexit`` when it starts)."""
    _stop.set()
    thread = _refresher
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=2 * REFRESH_S)


def _refresh(owner: tuple[str, str] | None) -> None:
    while not _stop.wait(REFRESH_S):
        if _ray_session() != owner:
            return  # Ray shut down or re-initialised: these gauges belong to a gone session
        with _lock:
            if _owner != owner:
                return
            values = [(_metrics[name], tags, value) for (name, tags), value in _gauges.items()]
        for metric, tags, value in values:
            metric.set(value, tags=dict(tags))


def images_per_second(metrics: Mapping[str, Any]) -> float:
    """Training throughput of an epoch from the loop's ``train_images`` and ``train_time``."""
    seconds = float(metrics.get("train_time", 0.0))
    return float(metrics.get("train_images", 0)) / seconds if seconds > 0 else math.nan


def trial_metrics(metrics: Mapping[str, Any], trial_id: str, experiment: str) -> None:
    """Export a trial's epoch, validation mAP and images/s (call after every epoch).

    Args:
        metrics: the loop's per-epoch metrics (``epoch``, ``val_mAP``, ``train_images``,
            ``train_time``).
        trial_id: Tune's trial id (``tune.get_context().get_trial_id()``).
        experiment: the experiment name (``tune.get_context().get_experiment_name()``).
    """
    tags = {"experiment": experiment, "trial_id": trial_id}
    _set("mlt_trial_epoch", float(metrics.get("epoch", math.nan)), tags)
    _set("mlt_trial_val_map", float(metrics.get("val_mAP", math.nan)), tags)
    _set("mlt_trial_images_per_s", images_per_second(metrics), tags)


_exported: dict[tuple[str, str], float] = {}


def search_progress(counts: Mapping[str, int], best: float | None, experiment: str) -> None:
    """Export a search's running totals (call on the driver whenever they change).

    Args:
        counts: trials ``finished`` / ``pruned`` / ``failed`` so far (cumulative; the counters
            are advanced by the difference to the previous call of this process).
        best: best validation mAP so far (None before the first result).
        experiment: the experiment name.
    """
    tags = {"experiment": experiment}
    for outcome in OUTCOMES:
        name = f"mlt_search_trials_{outcome}"
        total = float(counts.get(outcome, 0))
        counter = _metric(name)
        if counter is None:
            continue
        with _lock:
            delta = total - _exported.get((name, experiment), 0.0)
            _exported[(name, experiment)] = total
        if delta > 0:  # Ray counters only move up; a series appears with its first trial
            counter.inc(delta, tags=tags)
    if best is not None:
        _set("mlt_search_best_val_map", float(best), tags)


class SearchProgress:
    """Counts a search's trial outcomes and exports them (no Tune import: feed it from a callback).

    A trial that ends without an error is *finished* when it reached ``max_epochs`` and
    *pruned* otherwise (ASHA stopped it).
    """

    def __init__(self, experiment: str, max_epochs: int, objective: str = "val_mAP") -> None:
        self.experiment = experiment
        self.max_epochs = max_epochs
        self.objective = objective
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.best: float | None = None
        search_progress(self.counts, None, experiment)

    def result(self, metrics: Mapping[str, Any]) -> None:
        """An intermediate result of any trial (updates the best value)."""
        value = metrics.get(self.objective)
        if value is not None and math.isfinite(float(value)):
            if self.best is None or float(value) > self.best:
                self.best = float(value)
                search_progress(self.counts, self.best, self.experiment)

    def ended(self, last_metrics: Mapping[str, Any] | None, failed: bool = False) -> None:
        """A trial ended: ``failed`` when it raised, else finished or pruned by its epochs."""
        if failed:
            outcome = "failed"
        else:
            epochs = int((last_metrics or {}).get("epoch", 0))
            outcome = "finished" if epochs >= self.max_epochs else "pruned"
        self.counts[outcome] += 1
        if last_metrics:
            self.result(last_metrics)
        search_progress(self.counts, self.best, self.experiment)


#: loggers of Ray that print an INFO line per epoch of every trial (the checkpoint's path)
CHATTY_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage")


def quiet_ray_console() -> None:
    """Keep a trial's routine Ray INFO lines off the search's console.

    Without this every trial prints Ray Data's "Starting execution ... / Execution plan ...
    / Progress bars disabled" and every epoch Train's "Checkpoint successfully created at
    ...", which bury Tune's progress table. Warnings and errors still reach the console
    (except the progress-bar notice: the platform turns them off on purpose); Ray Data's own
    log file (``ray-data.log`` in the session's logs) keeps its INFO lines. Call it in the
    trial's process, before its first Ray Data execution.
    """
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # marks Ray's one-time notice as shown
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.level < logging.WARNING:
            handler.setLevel(logging.WARNING)
