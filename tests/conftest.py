"""Shared fixtures: DigitsMLT prepared once per session, and a lazy local Ray instance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import tuner.prepare


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
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield
    if started:
        ray.shutdown()
