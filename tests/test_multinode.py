"""Searches on multi-node Ray clusters, simulated on this machine with Ray's own test tooling.

* ``ray.cluster_utils.Cluster``: a head node (no GPU) and two worker nodes with one fake GPU
  each (``num_gpus=1`` declares the resource; torch sees no CUDA and trains on CPU), all in
  this process's care. The search is the real user path: ``python -m tuner.search --address
  HEAD --gpus-per-trial 1`` in a subprocess. A worker node is killed with SIGKILL
  (``remove_node(allow_graceful=False)``: a spot preemption) in the middle of a trial; the
  driver is killed and the same command run again.
* The fake multi-node autoscaler (``provider: fake_multinode``, the provider behind
  ``ray.cluster_utils.AutoscalingCluster``): a head started with ``ray start --head
  --autoscaling-config`` and GPU worker nodes that the autoscaler launches from zero for the
  search's pending trials and terminates once idle. ``AutoscalingCluster.start()`` itself runs
  ``ray stop --force`` (every Ray process on the machine), so the head is started here the
  same way, in its own process group, with free ports and its own temp dir.

Which node ran what comes from Ray's State API (actors and tasks with their node ids) and the
pid Tune records with every result (``trials.parquet``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from tuner.trainable import STATE_FILE, load_state_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
MB = 2**20
#: a node whose raylet is gone is declared dead after about 2 s (default: about 30 s)
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_failure_threshold": 2}
#: a GPU worker: CPUs for its trial and the trial's decode tasks (a task pool of 2)
WORKER = {"num_cpus": 3, "num_gpus": 1, "object_store_memory": 80 * MB}


# ----------------------------------------------------------------------------- helpers
def write_space(path: Path, trials: int, epochs: int, concurrency: int) -> Path:
    space = yaml.safe_load((ROOT / "search_spaces/bce.yaml").read_text())
    space["asha"] = {"max_epochs": epochs, "grace_period": epochs, "reduction_factor": 2}
    space["search"].update(num_trials=trials, max_concurrent=concurrency, seed=0)
    space["resources"]["data_path"] = "stream"  # where the Ray Data decode tasks run
    path.write_text(yaml.safe_dump(space))
    return path


def search_cmd(space: Path, out: Path, name: str, data: Path, address: str,
               *extra: str) -> list[str]:
    return [sys.executable, "-m", "tuner.search", "--method", "bce", "--space", str(space),
            "--out", str(out), "--name", name, "--data-dir", str(data), "--no-test",
            "--gpus-per-trial", "1", "--address", address, *extra]


def env_for(address: str) -> dict[str, str]:
    """A search's (or head's) environment: this cluster only, no token authentication.

    ``ray start`` turns token authentication on by itself when ``~/.ray/auth_token`` exists
    (any earlier local ``ray.init()`` creates it); these test clusters keep it off explicitly
    so that this process's State API calls reach them (tests/test_job_submission.py covers
    token authentication)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


def checkpoints(exp: Path) -> list[Path]:
    return sorted(exp.glob("train_trial_*/checkpoint_*"))


def study_states(exp: Path, name: str) -> list[str]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{exp / 'optuna.db'}")
    return [t.state.name for t in study.trials]


def trial_actors(address: str) -> list:
    """Every Tune function-trainable actor the cluster has seen (alive or dead)."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, detail=True, limit=10000,
                         filters=[("class_name", "=", "ImplicitFunc")],
                         raise_on_missing_output=False)
    return list(actors)


def node_of_pid(address: str) -> dict[int, str]:
    return {int(a.pid): a.node_id for a in trial_actors(address) if a.pid}


def decode_task_nodes(address: str) -> set[str]:
    """The nodes that ran a trial's Ray Data decode tasks."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=address, detail=True, limit=10000,
                       raise_on_missing_output=False)
    return {t.node_id for t in tasks if "ReadShuffleDecode" in t.name and t.node_id}


def live_actors(address: str) -> list[tuple[str, str]]:
    from ray.util.state import list_actors

    return [(a.class_name, a.node_id) for a in list_actors(address=address, detail=True,
                                                             limit=10000) if a.state != "DEAD"]


def alive_nodes(address: str) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=address, detail=True, limit=100,
                                  raise_on_missing_output=False) if n.state == "ALIVE"]


def check_finished(exp: Path, name: str, trials: int, epochs: int) -> pd.DataFrame:
    """Every trial once in trials.parquet and optuna.db, every epoch once, none RUNNING."""
    df = pd.read_parquet(exp / "trials.parquet")
    assert df["trial_id"].nunique() == trials
    for trial_id, rows in df.groupby("trial_id"):
        assert sorted(rows["epoch"]) == list(range(1, epochs + 1)), trial_id  # no gap/repeat
    assert df.groupby("trial_id")["config/train/lr"].first().nunique() == trials
    assert study_states(exp, name) == ["COMPLETE"] * trials
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{exp / 'optuna.db'}")
    assert {t.user_attrs["tune_trial_id"] for t in study.trials} == set(df["trial_id"])
    board = pd.read_csv(exp / "leaderboard.csv")
    assert list(board["status"]) == ["COMPLETE"] * trials
    return df


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


# ----------------------------------------------------------- head + 2 fake-GPU workers
@pytest.fixture(scope="module")
def cluster() -> Iterator:
    from ray.cluster_utils import Cluster

    # The nodes inherit this process's environment, and an earlier local ray.init() in this
    # pytest process sets RAY_AUTH_MODE=token in it: keep these nodes as env_for() expects.
    auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "object_store_memory": 80 * MB,
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": 0,
        "_system_config": FAST_NODE_DEATH,
    })
    try:
        for _ in range(2):
            c.add_node(**WORKER)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        if auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth


@pytest.fixture(scope="module")
def data(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("multinode") / "data"
    shutil.copytree(digits_dir, out)
    return out


def test_spot_worker_killed_mid_trial_resumes_on_another_node(
    cluster, data: Path, tmp_path: Path
) -> None:
    """Trials run on the GPU workers, never the head, with checkpoints in ``--out``; a
    worker killed mid-trial costs only the epoch in flight: the trial continues from its
    last checkpoint on the other worker and the search finishes."""
    epochs, name = 3, "spot"
    space = write_space(tmp_path / "bce.yaml", trials=2, epochs=epochs, concurrency=1)
    exp = tmp_path / "exp" / name
    log_path = tmp_path / "search.log"
    cmd = search_cmd(space, tmp_path / "exp", name, data, cluster.address)
    head = cluster.head_node.node_id
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=env_for(cluster.address), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not checkpoints(exp):  # the first trial saved its first epoch
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial checkpointed in 300 s"
            time.sleep(0.2)
        running = [a for a in trial_actors(cluster.address) if a.state == "ALIVE"]
        assert len(running) == 1, running
        victim = next(n for n in cluster.worker_nodes if n.node_id == running[0].node_id)
        cluster.remove_node(victim, allow_graceful=False)  # spot preemption: SIGKILL
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    out = log_path.read_text()
    assert proc.returncode == 0, out[-3000:]
    cluster.add_node(**WORKER)  # back to two workers for the next test

    df = check_finished(exp, name, trials=2, epochs=epochs)
    nodes = node_of_pid(cluster.address)
    df["node"] = [nodes[int(pid)] for pid in df["pid"]]
    assert head not in set(df["node"])  # training never on the head
    decoded_on = decode_task_nodes(cluster.address)  # ... nor its data decoding
    assert decoded_on and head not in decoded_on, decoded_on
    killed = df.groupby("trial_id")["node"].agg(lambda s: victim.node_id in set(s))
    (trial_id,) = killed[killed].index
    rows = df[df["trial_id"] == trial_id].sort_values("epoch")
    before = rows[rows["node"] == victim.node_id]["epoch"].tolist()
    after = rows[rows["node"] != victim.node_id]
    # epochs 1..k on the killed node, k+1.. on another one: resumed from the epoch-k
    # checkpoint, nothing lost but the epoch in flight
    assert before == list(range(1, len(before) + 1)) and 1 <= len(before) < epochs, rows
    assert after["epoch"].tolist() == list(range(len(before) + 1, epochs + 1)), rows
    assert after["node"].nunique() == 1 and after["node"].iloc[0] not in (victim.node_id, head)
    # the latest checkpoint of every trial is in the shared --out directory
    for trial_dir in exp.glob("train_trial_*"):
        (ckpt,) = trial_dir.glob("checkpoint_*")
        assert load_state_file(ckpt / STATE_FILE)["epoch"] == epochs


def test_driver_killed_on_the_head_resumes_with_the_same_command(
    cluster, data: Path, tmp_path: Path
) -> None:
    """The search's driver (on the head) is killed while trials run on the workers; the
    same command resumes it: every trial once, every epoch once, nothing RUNNING."""
    epochs, name = 2, "driver"
    space = write_space(tmp_path / "bce.yaml", trials=2, epochs=epochs, concurrency=2)
    exp = tmp_path / "exp" / name
    cmd = search_cmd(space, tmp_path / "exp", name, data, cluster.address)
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=env_for(cluster.address), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not checkpoints(exp):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial checkpointed in 300 s"
            time.sleep(0.2)
    finally:
        kill_group(proc)
    assert "RUNNING" in study_states(exp, name)  # killed mid-search

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=env_for(cluster.address))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming it" in again.stdout
    df = check_finished(exp, name, trials=2, epochs=epochs)
    nodes = node_of_pid(cluster.address)
    assert cluster.head_node.node_id not in {nodes[int(pid)] for pid in df["pid"]}


# ------------------------------------------------- fake multi-node autoscaler (GPU from zero)
PORT_FLAGS = ("--port", "--dashboard-port", "--metrics-export-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--ray-client-server-port", "--node-manager-port",
              "--object-manager-port")
#: GPU worker nodes idle this long are terminated (fractions of a minute are allowed)
IDLE_MINUTES = 0.1


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def autoscaling_config(gcs_address: str) -> dict:
    """cluster.yaml's layout for the fake provider: a CPU head without GPUs and GPU workers
    that scale from zero (the keys of Ray's fake_multi_node/example.yaml, which the Ray
    2.60 wheel does not ship)."""
    return {
        "cluster_name": "mlt-fake", "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1, "GPU": 0}, "node_config": {},
                                 "max_workers": 0},
            "gpu_spot": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 80 * MB},
                         "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {},
        "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_MINUTES,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def stop_tree(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILL the head's process group and any process of this cluster left outside it
    (found by the cluster's own temp dir in its command line)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if marker in args and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def autoscaling_head() -> Iterator[str]:
    """A head with the fake multi-node autoscaler; yields its GCS address."""
    import ray._private.services as services

    tmp = Path(tempfile.mkdtemp(prefix="mlt-as-"))  # short: Ray's socket paths are limited
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    address = f"{services.get_node_ip_address()}:{ports['--port']}"
    config = tmp / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(address)))
    env = {**env_for(address), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           **{f"RAY_{k}": str(v) for k, v in FAST_NODE_DEATH.items()}}
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
           f"--autoscaling-config={config}", "--num-cpus=1", "--num-gpus=0",
           f"--object-store-memory={80 * MB}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--temp-dir={tmp / 'ray'}",
           *(f"{flag}={port}" for flag, port in ports.items())]
    log_path = tmp / "head.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if alive_nodes(address):
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray start --head failed:\n" + log_path.read_text()[-3000:])
            time.sleep(1)
        yield address
    finally:
        stop_tree(proc, str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


def test_autoscaler_starts_gpu_workers_from_zero_and_releases_them(
    autoscaling_head: str, data: Path, tmp_path: Path
) -> None:
    address = autoscaling_head
    (head,) = alive_nodes(address)  # from zero: no worker node yet
    assert head.is_head_node
    name = "autoscale"
    space = write_space(tmp_path / "bce.yaml", trials=2, epochs=2, concurrency=2)
    exp = tmp_path / "exp" / name
    cmd = search_cmd(space, tmp_path / "exp", name, data, address)
    log_path = tmp_path / "search.log"
    seen: dict[str, dict] = {}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=env_for(address), start_new_session=True)
    try:
        deadline = time.monotonic() + 500
        while proc.poll() is None:
            for node in alive_nodes(address):
                seen.setdefault(node.node_id, dict(node.resources_total))
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    check_finished(exp, name, trials=2, epochs=2)
    workers = {k: v for k, v in seen.items() if k != head.node_id}
    assert workers and all(v.get("GPU") == 1 for v in workers.values()), seen
    df = pd.read_parquet(exp / "trials.parquet")
    nodes = node_of_pid(address)
    assert {nodes[int(pid)] for pid in df["pid"]} <= set(workers)  # trials on GPU workers

    deadline = time.monotonic() + 90  # idle workers are terminated after IDLE_MINUTES
    while len(alive := alive_nodes(address)) > 1:
        if time.monotonic() > deadline:
            raise AssertionError(f"idle workers still up: {alive}, actors: {live_actors(address)}")
        time.sleep(1)
    assert alive[0].node_id == head.node_id


def test_epoch_logged_twice_after_a_driver_restart_keeps_the_later_row() -> None:
    """What a resumed search read back once (``result.json`` of a trial whose driver died
    after logging epoch 1 but before saving the experiment state with its checkpoint): the
    trial restarted from scratch, so epoch 1 came twice. trials.parquet and the leaderboard
    keep the row of the run that went on."""
    from types import SimpleNamespace

    from tuner.search import epoch_frame

    logged = pd.DataFrame({"epoch": [1, 1, 2], "training_iteration": [1, 1, 2],
                           "pid": [22343, 24501, 24501], "val_mAP": [30.0, 31.0, 35.0]})
    df = epoch_frame(SimpleNamespace(metrics_dataframe=logged))
    assert df["epoch"].tolist() == [1, 2]
    assert df["pid"].tolist() == [24501, 24501] and df["val_mAP"].tolist() == [31.0, 35.0]
    resumed = pd.DataFrame({"epoch": [1, 2, 2, 3], "val_mAP": [30.0, 33.0, 34.0, 36.0]})
    assert epoch_frame(SimpleNamespace(metrics_dataframe=resumed))["val_mAP"].tolist() == [
        30.0, 34.0, 36.0]
    assert epoch_frame(SimpleNamespace(metrics_dataframe=None)) is None
