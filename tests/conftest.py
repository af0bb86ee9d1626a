"""Shared fixtures: DigitsMLT prepared once per session, and a lazy local Ray instance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import tuner.prepare

_EXIT_STATUS = pytest.StashKey[int]()



def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Shut down a Ray instance a test left running, while the interpreter is still whole."""
    import sys

    session.config.stash[_EXIT_STATUS] = int(exitstatus)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process with pytest's exit status once every report has been written.

    The suite loads torch, Ray's core worker, gloo, MLflow and TensorBoard into one process;
    tearing their native libraries down at interpreter exit crashed once in CI (exit 139 after
    "895 passed", no test running). Nothing of the tests' outcome is left to decide here, so
    the process leaves without that teardown; a crash before this point still fails the run,
    with a faulthandler traceback of every thread.
    """
    import os
    import sys

    status = config.stash.get(_EXIT_STATUS, None)
    if status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DigitsMLT (seed 0) prepared through the CLI entry point; treat it as read-only.

    Tests that modify a prepared directory copy it first (``shutil.copytree``).
    """
    out = tmp_path_factory.mktemp("digits") / "digits-mlt"
    status = tuner.prepare.main(["--benchmark", "digits-mlt", "--out", str(out), "--seed", "0"])
    assert status == 0, f"tuner.prepare exited with {status}"
    return out


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A 2-CPU local Ray instance, started only by the tests that request it."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield
    if started:
        ray.shutdown()


def _kill_session(proc) -> None:
    """SIGKILL a process started with ``start_new_session=True``, its group, and the Ray
    processes of the session it started (named after its pid)."""
    import os
    import re
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    pattern = re.compile(rf"session_[0-9_-]+_{proc.pid}\b")
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if pattern.search(args):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def kill_session():
    """The function that kills a search process and its local Ray cluster."""
    return _kill_session


@pytest.fixture(scope="module")
def kill_session_module():
    return _kill_session


def run_search_cli(args: list[str], log: Path, kill, what: str = "the search",
                   timeout: float = 900) -> str:
    """Run ``python -m tuner.search ARGS`` from the repository root in its own session, its
    output in ``log``; kill it (and its Ray cluster) and fail when it hangs or exits non-zero.
    Returns the log text."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuner.search", *args], cwd=root,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
            pytest.fail(f"{what} hung:\n" + log.read_text()[-3000:])
    assert code == 0, log.read_text()[-3000:]
    return log.read_text()

