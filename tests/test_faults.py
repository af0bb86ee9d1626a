"""Issue 20, cases 3-6: a full disk, Ctrl-C, an unreachable --address, open ports.

The full-disk tests mount a real tmpfs of a few MiB (they need root, as on CI, and skip
cleanly where mounting is not permitted); the Ctrl-C tests send SIGINT to a real search
process; the port test lists the listening sockets of a real local cluster's processes from
/proc (Linux).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shlex
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from tuner import cluster, faults
from tuner.errors import ConfigError, TunerError
from tuner.optuna_search import PrunedAwareOptunaSearch, sqlite_storage

ROOT = Path(__file__).resolve().parents[1]


# -- helpers -----------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator:
    """``mount(size)``: a fresh tmpfs of that size at ``tmp_path/small`` (unmounted after)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        opts = f"remount,size={size}" if mounted else f"size={size}"
        cmd = ["mount", "-o", opts, str(mnt)] if mounted else \
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:100]}); the "
                        f"full-disk tests need root")
        mounted.append(mnt)
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _space(tmp_path: Path, trials: int, epochs: int, max_failures: int = 2) -> Path:
    space = yaml.safe_load((ROOT / "search_spaces/bce.yaml").read_text())
    space["asha"] = {"max_epochs": epochs, "grace_period": epochs, "reduction_factor": 2}
    space["search"].update(num_trials=trials, max_concurrent=1, seed=0, max_failures=max_failures)
    path = tmp_path / "bce.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.fixture(scope="module")
def data_copy(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the prepared DigitsMLT (searches add their label view to it)."""
    out = tmp_path_factory.mktemp("faults-data") / "digits-mlt"
    shutil.copytree(digits_dir, out)
    return out


def _study_states(exp: Path) -> list[tuple[str, dict]]:
    study = optuna.load_study(study_name=exp.name, storage=f"sqlite:///{exp / 'optuna.db'}")
    return [(t.state.name, t.user_attrs) for t in study.trials]


def _reported(exp: Path) -> int:
    """Intermediate values in the search's study, read-only (the search writes meanwhile)."""
    db = exp / "optuna.db"
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            (count,) = con.execute("SELECT COUNT(*) FROM trial_intermediate_values").fetchone()
    except sqlite3.OperationalError:
        return 0
    return int(count)


# -- case 3: full disk -------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(small_fs) -> None:
    mnt = small_fs("256k")
    target = mnt / "leaderboard.csv"
    target.write_text("the last good leaderboard\n")
    big = b"x" * (512 * 1024)
    with pytest.raises(OSError) as info:
        faults.atomic_write(target, big)
    assert info.value.errno == errno.ENOSPC and faults.is_disk_full(info.value)
    assert target.read_text() == "the last good leaderboard\n"
    assert sorted(p.name for p in mnt.iterdir()) == ["leaderboard.csv"]  # no temporary left
    with pytest.raises(OSError):  # what a plain write does: the old content is gone
        target.write_bytes(big)
    assert target.read_bytes() != b"the last good leaderboard\n"


def test_a_checkpoint_must_leave_the_headroom_free(small_fs, tmp_path: Path) -> None:
    mnt = small_fs("2m")
    free = shutil.disk_usage(mnt).free
    faults.ensure_room(mnt, free - faults.TRIAL_HEADROOM_BYTES)  # leaves exactly the headroom
    with pytest.raises(OSError) as refused:
        faults.ensure_room(mnt, free - faults.TRIAL_HEADROOM_BYTES + 1)
    assert refused.value.errno == errno.ENOSPC and faults.is_disk_full(refused.value)
    assert str(mnt) in str(refused.value)
    faults.ensure_room("s3://bucket/exp", 1 << 60)  # not a local path: not checked
    faults.ensure_room(tmp_path / "not-here", 1 << 60)  # not seen from this node
    faults.ensure_room("", 1 << 60)  # no experiment directory: not checked
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"x" * 1000)
    (ckpt / "sub" / "more").write_bytes(b"y" * 24)
    assert faults.tree_bytes(ckpt) == 1024


def test_a_trial_error_is_read_from_the_drivers_copy_before_storage(tmp_path: Path) -> None:
    """Tune writes the error next to the driver at once and uploads it later: the first
    disk-full failure must be seen from the local copy, or Tune retries the trial."""

    class Trial:  # the two attributes of ray.tune.experiment.Trial the callback reads
        def __init__(self, error_file: Path | None, stored: str | None) -> None:
            self.error_file, self._stored = error_file, stored

        def get_error(self) -> str | None:
            return self._stored

    local = tmp_path / "error.txt"
    local.write_text("Failure # 1\nOSError: [Errno 28] No space left on device\n")
    assert faults.says_disk_full(faults._trial_error_text(Trial(local, None)))
    other = "Failure # 1\nActorDiedError: The actor died unexpectedly"  # a lost node
    assert faults._trial_error_text(Trial(None, other)) == other
    assert not faults.says_disk_full(faults._trial_error_text(Trial(None, other)))
    assert faults._trial_error_text(Trial(tmp_path / "missing.txt", None)) is None
    assert not faults.says_disk_full(None)


def test_disk_full_is_recognised_through_wrapping_errors() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("trial failed") from exc
    except RuntimeError as wrapped:
        assert faults.is_disk_full(wrapped)
    assert faults.is_disk_full(Exception("sqlite3.OperationalError: database or disk is full"))
    assert not faults.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not faults.is_disk_full(None)


def _state_files(exp: Path, searcher: bytes, experiment: bytes = b'{"trial_data": []}') -> None:
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "experiment_state-2026-12-02_06-00-00.json").write_bytes(experiment)
    (exp / "searcher-state-2026-12-02_06-00-00.pkl").write_bytes(searcher)
    (exp / "search_gen_state-2026-12-02_06-00-00.json").write_bytes(pickle.dumps({"n": 1}))


def test_resume_refuses_empty_or_cut_off_tune_state(tmp_path: Path) -> None:
    whole = pickle.dumps({"trials": list(range(100))})
    _state_files(tmp_path / "good", whole)
    faults.check_resumable(tmp_path / "good")  # whole files: no complaint
    _state_files(tmp_path / "cut", whole[:40])
    with pytest.raises(TunerError) as info:
        faults.check_resumable(tmp_path / "cut")
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "searcher-state-2026-12-02_06-00-00.pkl is cut off (40 bytes" in message
    assert "another --name" in message
    _state_files(tmp_path / "empty", whole, experiment=b"")
    with pytest.raises(TunerError, match=r"experiment_state-.*\.json is empty \(0 bytes\)"):
        faults.check_resumable(tmp_path / "empty")


@pytest.mark.integration
def test_full_disk_stops_with_one_line_and_resumes_after_space_is_freed(
        tmp_path: Path, small_fs, data_copy: Path) -> None:
    """A 3.7 MiB filesystem holds the 1 MiB reserve, the first trial's checkpoint (about 1 MB
    with DigitsMLT v3's small_cnn) and the 1 MiB every checkpoint leaves free, not the second
    checkpoint. Tune retries the failed trial (``max_failures`` 2, the default): the retry
    meets the same limit and cannot take the room freed for Tune's last state."""
    mnt = small_fs("3700k")
    exp = mnt / "full"
    cmd = [sys.executable, "-m", "tuner.search", "--method", "bce",
           "--space", str(_space(tmp_path, trials=2, epochs=1)), "--out",
           str(mnt), "--name", "full", "--data-dir", str(data_copy), "--no-test"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = first.stdout + first.stderr
    assert first.returncode == 2, log[-3000:]
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left on the filesystem at {mnt} ("), last
    assert "run the same command again to resume" in last
    assert len(log.splitlines()) < 1500, len(log.splitlines())  # was ~9,000 lines here
    assert faults.count_running(exp / "optuna.db", "full") == 0
    states = _study_states(exp)
    assert [s for s, _ in states] == ["COMPLETE", "FAIL"]
    assert states[1][1][faults.INTERRUPTED_ATTR] == "disk full"
    faults.check_resumable(exp)  # Tune's last state was written whole (the reserve freed)
    assert not (exp / faults.RESERVE_NAME).exists()

    small_fs("24m")  # space freed: the same command resumes
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "exists: resuming it" in again.stdout
    trials = pd.read_parquet(exp / "trials.parquet")
    assert trials["trial_id"].nunique() == 2 and sorted(trials["epoch"]) == [1, 1]
    states = _study_states(exp)
    assert [s for s, _ in states] == ["COMPLETE", "FAIL", "COMPLETE"]  # none RUNNING
    assert states[2][1]["continues_trial"] == 1
    assert states[2][1]["tune_trial_id"] == states[1][1]["tune_trial_id"]

    state = next(exp.glob("searcher-state-*.pkl"))  # what the old code left after ENOSPC
    state.write_bytes(state.read_bytes()[:4096])
    record = json.loads((exp / "experiment.json").read_text())
    assert record.pop("finished")  # a finished search is reported, not resumed: make it
    (exp / "experiment.json").write_text(json.dumps(record))  # one that stopped early
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot resume {exp}: Tune's state file {state.name} is cut off")
    assert "Restoring the run" not in refused.stdout + refused.stderr


# -- the study never keeps RUNNING trials; a resume continues them -----------------------


def _space_x(trial: optuna.Trial) -> None:
    trial.suggest_float("x", 0.0, 1.0)


def _searcher(tmp_path: Path) -> PrunedAwareOptunaSearch:
    return PrunedAwareOptunaSearch(
        space=_space_x, metric="val_mAP", mode="max", sampler=optuna.samplers.RandomSampler(0),
        storage=sqlite_storage(tmp_path / "s.db"), study_name="s", max_epochs=3)


def test_closed_trials_continue_as_new_optuna_trials_on_resume(tmp_path: Path) -> None:
    first = _searcher(tmp_path)
    params = first.suggest("t1")
    first.on_trial_result("t1", {"val_mAP": 10.0, "epoch": 1, "best_val_mAP": 10.0})
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's saved searcher state
    storage = first._ot_study._storage
    assert faults.close_study(storage, "s", "interrupted") == 1  # the search ended (Ctrl-C)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    assert study.trials[0].user_attrs[faults.INTERRUPTED_ATTR] == "interrupted"

    again = _searcher(tmp_path)  # the resumed driver
    again.restore(str(tmp_path / "searcher.pkl"))
    for epoch, value in ((2, 20.0), (3, 15.0)):
        again.on_trial_result("t1", {"val_mAP": value, "epoch": epoch, "best_val_mAP": 20.0})
    again.on_trial_complete("t1", {"val_mAP": 15.0, "epoch": 3, "best_val_mAP": 20.0})
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    old, new = trials
    assert new.params == old.params == {"x": params["x"]}
    assert new.intermediate_values == {1: 10.0, 2: 20.0, 3: 15.0}
    assert new.value == 20.0
    assert new.user_attrs["tune_trial_id"] == "t1" and new.user_attrs["continues_trial"] == 0
    assert faults.close_study(storage, "s", "ended") == 0


# -- case 4: Ctrl-C ----------------------------------------------------------------------


def test_resume_command_is_the_same_command_with_the_name() -> None:
    argv = ["--method", "bce", "--space", "my space.yaml", "--out", "exp"]
    assert faults.resume_command(argv, "bce-20261202-070000") == (
        "python -m tuner.search --method bce --space 'my space.yaml' --out exp "
        "--name bce-20261202-070000")
    named = ["--name", "x", "--method", "bce", "--space", "s.yaml"]
    assert faults.resume_command(named, "x") == "python -m tuner.search " + shlex.join(named)
    assert faults.resume_command(argv + ["--name=x"], "x").endswith("--out exp --name=x")
    resumed = ["--method", "bce", "--space", "s.yaml", "--resume", "exp/x"]
    assert faults.resume_command(resumed, "x") == "python -m tuner.search " + shlex.join(resumed)


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_a_result(proc: subprocess.Popen, exp: Path, log: Path) -> None:
    deadline = time.monotonic() + 400
    while _reported(exp) < 1:  # a trial is training and has reported an epoch
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial reported"
        time.sleep(0.5)


@pytest.mark.integration
def test_ctrl_c_exits_130_with_the_resume_command_and_no_test_scoring(
        tmp_path: Path, data_copy: Path, kill_session) -> None:
    exp = tmp_path / "exp" / "ctrlc"
    cmd = [sys.executable, "-m", "tuner.search", "--method", "bce",
           "--space", str(_space(tmp_path, trials=2, epochs=2)), "--out", str(tmp_path / "exp"),
           "--name", "ctrlc", "--data-dir", str(data_copy)]  # test scoring on
    log = tmp_path / "first.log"
    proc = _start(cmd, log)
    try:
        _wait_for_a_result(proc, exp, log)
        proc.send_signal(signal.SIGINT)  # Ctrl-C (to the driver)
        assert proc.wait(timeout=180) == 130, log.read_text()[-3000:]
    finally:
        kill_session(proc)
    out = log.read_text()
    assert "Tuner.restore(" not in out  # Ray's hint replaced by the platform's command
    hint = [line for line in out.splitlines() if line.startswith("interrupted; resume with: ")]
    assert len(hint) == 1, out[-3000:]
    again = shlex.split(hint[0].split(": ", 1)[1])
    assert again[:3] == ["python", "-m", "tuner.search"] and again[3:] == cmd[3:]
    assert not (exp / "test_metrics.json").exists()  # no test scoring of a partial search
    assert faults.count_running(exp / "optuna.db", "ctrlc") == 0

    resumed = subprocess.run([sys.executable, *again[1:]], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "exists: resuming it" in resumed.stdout
    assert (exp / "test_metrics.json").is_file()
    trials = pd.read_parquet(exp / "trials.parquet")
    assert trials["trial_id"].nunique() == 2
    for trial_id, rows in trials.groupby("trial_id"):
        assert sorted(rows["epoch"]) == [1, 2], trial_id  # continued, nothing repeated
    states = _study_states(exp)
    finished = [attrs["tune_trial_id"] for s, attrs in states if s == "COMPLETE"]
    assert sorted(finished) == sorted(trials["trial_id"].unique())
    assert all(s == "COMPLETE" or attrs.get(faults.INTERRUPTED_ATTR) == "interrupted"
               for s, attrs in states)  # only the trials Ctrl-C stopped are FAIL


@pytest.mark.integration
def test_a_second_ctrl_c_stops_at_once(tmp_path: Path, data_copy: Path, kill_session) -> None:
    exp = tmp_path / "exp" / "twice"
    cmd = [sys.executable, "-m", "tuner.search", "--method", "bce",
           "--space", str(_space(tmp_path, trials=2, epochs=3)), "--out", str(tmp_path / "exp"),
           "--name", "twice", "--data-dir", str(data_copy)]
    log = tmp_path / "twice.log"
    proc = _start(cmd, log)
    try:
        _wait_for_a_result(proc, exp, log)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
        took = time.monotonic() - sent
    finally:
        kill_session(proc)
    out = log.read_text()
    assert "interrupted; resume with: python -m tuner.search" in out
    assert took < 60, took  # the Ray cluster's shutdown, not the trials' end
    assert not (exp / "test_metrics.json").exists()
    assert faults.count_running(exp / "optuna.db", "twice") == 0


# -- case 5: --address where no cluster runs ---------------------------------------------


def test_address_forms_are_parsed_or_named() -> None:
    assert cluster.gcs_endpoint("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert cluster.gcs_endpoint("ray://head:10001") == ("head", 10001)
    assert cluster.gcs_endpoint("[::1]:6379") == ("::1", 6379)
    with pytest.raises(ConfigError, match="expected auto, HOST:PORT"):
        cluster.gcs_endpoint("head-node")


def test_unreachable_address_fails_in_one_line_within_20_s() -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        cluster.join("127.0.0.1:1")  # what the issue ran; nothing listens on port 1
    took = time.monotonic() - start
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("--address 127.0.0.1:1: no Ray cluster answers at 127.0.0.1:1")
    assert cluster.CONNECT_TIMEOUT_S - 1 <= took <= 20, took
    with socket.socket() as server:  # something that listens passes the check at once
        server.bind(("127.0.0.1", 0))
        server.listen()
        start = time.monotonic()
        cluster.check_reachable(f"127.0.0.1:{server.getsockname()[1]}")
        assert time.monotonic() - start < 2


@pytest.mark.integration
def test_search_with_an_unreachable_address_prints_one_line(
        tmp_path: Path, data_copy: Path) -> None:
    cmd = [sys.executable, "-m", "tuner.search", "--method", "bce",
           "--space", str(_space(tmp_path, trials=1, epochs=1)), "--out", str(tmp_path / "exp"),
           "--data-dir", str(data_copy), "--address", "127.0.0.1:1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --address 127.0.0.1:1: no Ray cluster answers"), lines
    assert "Traceback" not in done.stderr and "GCS" not in done.stderr


# -- case 6: a local cluster listens on loopback only ------------------------------------


def _descendants(root: int) -> set[int]:
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = {root}, [root]
    while todo:
        pid = todo.pop()
        children = [c for c, p in parent.items() if p == pid and c not in found]
        found.update(children)
        todo.extend(children)
    return found


def _address(hexaddr: str, v6: bool) -> str:
    raw = bytes.fromhex(hexaddr)
    if v6:  # /proc/net/tcp6 prints four host-order 32-bit words
        return socket.inet_ntop(socket.AF_INET6,
                                b"".join(struct.pack("<I", w) for w in struct.unpack(">4I", raw)))
    return socket.inet_ntop(socket.AF_INET, raw[::-1])


def listening_sockets(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """``(pid, process name, address, port)`` of every listening TCP socket of ``pids``."""
    table = {}
    for name, v6 in (("tcp", False), ("tcp6", True)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                host, port = fields[1].split(":")
                table[fields[9]] = (_address(host, v6), int(port, 16))
    out = set()
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in table:
                out.add((pid, comm, *table[link[8:-1]]))
    return sorted(out)


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")
def test_a_local_cluster_listens_on_loopback_only(kill_session) -> None:
    script = (
        "import time, ray\n"
        "from tuner.cluster import start_local\n"
        "from tuner.search import free_port, state_api_env\n"
        "port = free_port()\n"
        "start_local(2, port, state_api_env(port))\n"
        "assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker is up too\n"
        "print('up', flush=True)\n"
        "time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        time.sleep(3)  # the dashboard agent and runtime-env agent bind after start-up
        sockets = listening_sockets(_descendants(proc.pid))
    finally:
        kill_session(proc)
    names = {name for _, name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the cluster's own servers were seen
    assert len(sockets) >= 8, sockets
    public = [s for s in sockets if s[2] not in LOOPBACK]
    assert not public, f"listening beyond loopback: {public}"
