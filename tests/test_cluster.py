"""cluster.yaml: Ray's own launcher validator (offline) plus the project's deployment rules."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tuner.search import DRIVER_RESOURCE

ROOT = Path(__file__).resolve().parents[1]
GPU_TYPES = ("gpu_spot", "gpu_ondemand")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before touching a cloud: merge defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_validator_accepts_cluster_yaml(raw: dict[str, Any]) -> None:
    prepared = ray_validate(raw)
    assert set(prepared["available_node_types"]) == {"head", *GPU_TYPES}
    assert prepared["head_node_type"] == "head"


def test_image_is_the_installed_ray_with_cuda(raw: dict[str, Any]) -> None:
    image = raw["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray:(?P<version>[\d.]+)-py(?P<py>3\d+)-gpu", image)
    assert match, f"{image}: expected rayproject/ray:<ray version>-py3xx-gpu"
    assert match["version"] == ray.__version__
    assert int(match["py"][1:]) >= 10  # requires-python >= 3.10
    text = (ROOT / "cluster.yaml").read_text()
    assert "ray-ml" not in text.replace("ray-ml images are deprecated", "")


def test_head_is_on_demand_and_hosts_the_drivers(raw: dict[str, Any]) -> None:
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be spot"
    assert head["resources"].get(DRIVER_RESOURCE, 0) >= 1
    assert head["resources"].get("GPU", 0) == 0
    for name in GPU_TYPES:
        assert DRIVER_RESOURCE not in types[name]["resources"], f"{name} must not host drivers"


def test_gpu_workers_scale_from_zero_and_spot_exists(raw: dict[str, Any]) -> None:
    types = raw["available_node_types"]
    for name in GPU_TYPES:
        assert types[name]["min_workers"] == 0, name
        assert types[name]["resources"]["GPU"] >= 1, name
    market = types["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"]
    assert market == "spot"
    assert sum(types[n]["max_workers"] for n in GPU_TYPES) <= raw["max_workers"]


def test_machine_image_is_pinned(raw: dict[str, Any]) -> None:
    for name, node in raw["available_node_types"].items():
        image = node["node_config"]["ImageId"]
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", image), f"{name}: pin an AMI, got {image}"


def test_shared_storage_project_install_and_security(raw: dict[str, Any]) -> None:
    mount = "-v /mnt/cluster_storage:/mnt/cluster_storage"
    assert mount in raw["docker"]["run_options"]
    assert any("mount -t nfs4" in c for c in raw["initialization_commands"])
    assert any(re.search(r"pip install .*-e ~/mlt-tuner", c) for c in raw["setup_commands"])
    assert raw["file_mounts"]["~/mlt-tuner"] == "."
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard must not listen publicly"
    for commands in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(commands)
    assert "security_group" not in raw["provider"], "no extra inbound rules (ports stay closed)"
    # secrets come from the user's home directory / environment, never from the repository
    for remote, local in raw["file_mounts"].items():
        assert local == "." or local.startswith("~/"), (remote, local)


def test_every_user_edited_field_is_commented() -> None:
    lines = (ROOT / "cluster.yaml").read_text().splitlines()
    edited = ("region:", "max_workers:", "InstanceType:", "ImageId:", "cluster_name:")
    for i, line in enumerate(lines):
        if line.strip().startswith(edited) and "EDIT" not in line:
            above = [lines[j] for j in range(max(0, i - 8), i) if lines[j].strip().startswith("#")]
            first = line.strip().split(":")[0]
            same_node_copy = first in ("InstanceType", "ImageId") and "gpu_ondemand" in "\n".join(
                lines[max(0, i - 12):i])
            assert same_node_copy or any("EDIT" in c for c in above), f"line {i + 1}: {line}"
    assert any("fs-0123456789abcdef0" in line for line in lines)


def broken(raw: dict[str, Any], how: str) -> dict[str, Any]:
    cfg = copy.deepcopy(raw)
    types = cfg["available_node_types"]
    if how == "typo":
        types["gpu_spot"]["min_worker"] = types["gpu_spot"].pop("min_workers")
    elif how == "head":
        cfg["head_node_type"] = "head_node"
    elif how == "float":
        types["gpu_spot"]["resources"]["GPU"] = 0.5
    return cfg


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("typo", ["'min_worker' was unexpected"]),
        ("head", ["head_node_type", "available_node_types"]),
        ("float", ["0.5 is not of type 'integer'"]),
    ],
)
def test_broken_copies_are_rejected_readably(raw: dict[str, Any], how: str, words: list[str]) -> None:
    with pytest.raises((jsonschema.ValidationError, ValueError)) as info:
        ray_validate(broken(raw, how))
    exc = info.value
    message = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
    assert len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, message
    if isinstance(exc, jsonschema.ValidationError):  # the path names the bad node type
        assert "gpu_spot" in list(exc.absolute_path), list(exc.absolute_path)


def test_on_prem_variant_from_the_docs_validates(raw: dict[str, Any]) -> None:
    """docs/cluster.md: provider local, fixed IPs, the driver resource on the ray start line."""
    cfg = copy.deepcopy(raw)
    cfg["provider"] = {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2"]}
    cfg["auth"] = {"ssh_user": "ubuntu", "ssh_private_key": "~/.ssh/id_ed25519"}
    for key in ("available_node_types", "head_node_type", "initialization_commands"):
        cfg.pop(key)
    cfg["max_workers"] = 1
    cfg["head_start_ray_commands"][-1] += f""" --resources='{{"{DRIVER_RESOURCE}": 1000}}'"""
    prepared = ray_validate(cfg)
    assert prepared["provider"]["type"] == "local"
    assert prepared["available_node_types"]["local.cluster.node"]["max_workers"] == 1


def test_search_progress_classifies_trial_outcomes() -> None:
    """Outside Ray the export is a no-op, but the counting is the same as on a cluster."""
    from tuner.monitoring import SearchProgress, images_per_second

    progress = SearchProgress("unit", max_epochs=3)
    progress.result({"val_mAP": 40.0, "epoch": 1})
    progress.ended({"val_mAP": 55.5, "epoch": 3})  # ran its budget
    progress.ended({"val_mAP": 35.0, "epoch": 1})  # stopped by ASHA
    progress.ended(None, failed=True)
    progress.result({"val_mAP": float("nan")})
    assert progress.counts == {"finished": 1, "pruned": 1, "failed": 1}
    assert progress.best == 55.5
    assert images_per_second({"train_images": 880, "train_time": 2.2}) == pytest.approx(400.0)


@pytest.mark.integration
def test_stop_local_stops_every_process_of_the_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """tuner.cluster.stop_local: the autoscaler monitor is killed before ray.shutdown() (which
    otherwise waits 1 s for it), and every process the local cluster started has ended."""
    from ray._private import ray_constants, worker

    from tuner.cluster import start_local, stop_local
    from tuner.search import free_port, local_worker_env

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    start_local(1, port, local_worker_env(port))
    processes = {kind: [info.process for info in infos]
                 for kind, infos in worker._global_node.all_processes.items()}
    monitor = processes[ray_constants.PROCESS_TYPE_MONITOR][0]
    assert ray_constants.PROCESS_TYPE_RAYLET in processes and monitor.poll() is None
    monitor_when_shutdown: list[int | None] = []
    shutdown = ray.shutdown

    def watched_shutdown(*args: Any, **kwargs: Any) -> None:  # the real one, observed
        monitor_when_shutdown.append(monitor.poll())
        shutdown(*args, **kwargs)

    monkeypatch.setattr(ray, "shutdown", watched_shutdown)
    stop_local()
    assert not ray.is_initialized()
    # killed before ray.shutdown() stopped the GCS: no report to a dead GCS to wait out
    assert monitor_when_shutdown == [-9]
    running = [kind for kind, procs in processes.items() for p in procs if p.poll() is None]
    assert running == []


def test_a_local_cluster_starts_no_preemption_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """A local cluster's processes get Ray Train's switch for its preemption watcher off (an
    actor per multi-worker trial; no cloud preempts this machine), unless the user set it;
    the switch is the one Ray's Train controller reads."""
    from ray.train.v2._internal import constants

    from tuner.search import PREEMPTION_WATCHER, local_worker_env

    assert constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR == PREEMPTION_WATCHER
    assert constants.DEFAULT_ENABLE_PREEMPTION_WATCHER is True  # what the switch turns off
    monkeypatch.delenv(PREEMPTION_WATCHER, raising=False)
    assert local_worker_env(8265)[PREEMPTION_WATCHER] == "0"
    monkeypatch.setenv(PREEMPTION_WATCHER, "1")
    assert local_worker_env(8265)[PREEMPTION_WATCHER] == "1"
