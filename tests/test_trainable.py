"""Trial-level pieces without a cluster: deterministic-failure marker, resources, concurrency."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner import search
from tuner.errors import ConfigError, NonFiniteLossError
from tuner.space import parse_space
from tuner.trainable import FATAL_FILE, TrialFatalError, _guard_deterministic


def test_deterministic_failure_is_recorded_and_not_retrained(tmp_path: Path) -> None:
    calls = []

    def diverges() -> None:
        calls.append(1)
        raise NonFiniteLossError("bce: training loss became nan at epoch 2, step 5; lower lr")

    with pytest.raises(NonFiniteLossError):
        _guard_deterministic(diverges, str(tmp_path))
    assert "loss became nan" in (tmp_path / FATAL_FILE).read_text()
    with pytest.raises(TrialFatalError, match="not retried: .*loss became nan"):
        _guard_deterministic(diverges, str(tmp_path))  # the retry
    assert len(calls) == 1


def test_transient_failure_is_retried(tmp_path: Path) -> None:
    def node_lost() -> None:
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        _guard_deterministic(node_lost, str(tmp_path))
    assert not (tmp_path / FATAL_FILE).exists()


def test_worker_error_text_counts_as_deterministic(tmp_path: Path) -> None:
    def train_run_failed() -> None:  # how a Train worker's error reaches the trial function
        raise RuntimeError("TrainingFailedError: ... tuner.errors.NonFiniteLossError: nan loss")

    with pytest.raises(RuntimeError):
        _guard_deterministic(train_run_failed, str(tmp_path))
    assert "NonFiniteLossError" in (tmp_path / FATAL_FILE).read_text()


def _space(**resources) -> object:
    return parse_space({"method": "bce", "search": {"num_trials": 8, "max_concurrent": "auto"},
                        "train": {"lr": {"loguniform": [1e-4, 1e-2]}},  # something to tune
                        "resources": resources})


def test_trial_demand_and_auto_concurrency() -> None:
    one = _space(cpus_per_trial=1, data_cpus=1)
    assert search.trial_demand(one) == {"CPU": 2, "GPU": 0}
    assert search.trial_resources(one, {}) == {"cpu": 1, "gpu": 0}
    assert search.concurrency(one, {"CPU": 8}) == 4
    multi = _space(workers_per_trial=2, cpus_per_worker=2, gpus_per_worker=1, data_cpus=1)
    demand = search.trial_demand(multi)
    assert demand["GPU"] == 2 and demand["CPU"] == pytest.approx(search.DRIVER_CPU + 5)
    assert search.concurrency(multi, {"CPU": 64, "GPU": 8}) == 4  # the GPUs decide
    assert search.concurrency(multi, {"CPU": 64, "GPU": 0}) == 1  # autoscaler: start with one
    assert search.trial_resources(multi, {"trial_driver": 1}) == {
        "cpu": search.DRIVER_CPU, "trial_driver": 0.001}


def test_memory_plan_shares_the_splits_only_when_they_fit_the_budget() -> None:
    from tuner.space import Domain
    from tuner.trainable import memory_plan

    need = 1389 * (3 * 48 * 48 + 8)  # DigitsMLT train + val as decoded RGB uint8 + index
    assert memory_plan(1389, 48, need)[0]
    use, why = memory_plan(1389, 48, need - 1)
    assert not use and "budget" in why
    assert memory_plan(1389, 48, need - 1, "memory")[0]  # forced: no budget check
    assert not memory_plan(1389, 48, 10 * need, "stream")[0]
    use, why = memory_plan(1389, Domain("choice", (32, 48)), 10 * need)
    assert not use and "image_size is tuned" in why
    with pytest.raises(ConfigError, match="data_path: must be one of auto/memory/stream"):
        memory_plan(1389, 48, need, "ram")
