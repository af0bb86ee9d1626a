"""Where a search runs: a new loopback-only local Ray cluster, or a running cluster it joins.

* :func:`start_local` starts a new local cluster (``address="local"``: never one that another
  program started with ``ray start``) whose every server — GCS, raylet, object manager, core
  workers, dashboard, dashboard agent, metrics export, runtime-env agent — listens on
  127.0.0.1 only. Ray binds its servers to the node IP and, when that IP is the loopback
  address, to loopback only (what it does on macOS and Windows); on Linux it picks the
  machine's network address, so the node IP is set to 127.0.0.1 for the start of the cluster.
* :func:`join` joins ``--address`` / ``RAY_ADDRESS``. An address where nothing answers fails
  with one line within :data:`CONNECT_TIMEOUT_S` seconds instead of Ray's minutes of GCS
  retries.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from tuner.errors import ConfigError

#: how long a joined cluster's GCS port may take to accept a TCP connection
CONNECT_TIMEOUT_S = 10.0
LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Make Ray take 127.0.0.1 as this node's IP while a local cluster starts.

    ``ray.init(_node_ip_address="127.0.0.1")`` is rewritten to the machine's address, but
    Ray's own macOS/Windows switch (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once at
    import into ``ray_constants.ENABLE_RAY_CLUSTER``) makes ``get_node_ip_address`` return
    the loopback address, and every server then binds it (Ray 2.60, pinned).
    """
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


@contextlib.contextmanager
def _environment(env_vars: dict[str, str]) -> Iterator[None]:
    """Set ``env_vars`` in this process while the cluster's processes start, then restore.

    The raylet inherits this environment and passes it to every worker it starts, so the
    variables reach all workers without a job runtime environment; that one costs each new
    worker process a round trip to the runtime-env agent (0.5-1 s per trial actor here).
    """
    before = {key: os.environ.get(key) for key in env_vars}
    os.environ.update(env_vars)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


#: Ray settings of a local cluster. ``prestart_worker_first_driver`` off: Ray otherwise
#: starts idle worker processes as the driver connects, while ``ray.init`` still waits for
#: the dashboard; on 2 cores that made ``ray.init`` 3.0-4.1 s instead of 2.7 s, and a trial's
#: process then starts on demand in 0.55 s instead of 0.3 s (`benchmarks/RESULTS.md` 9)
SYSTEM_CONFIG = {"prestart_worker_first_driver": False}


def start_local(num_cpus: int, dashboard_port: int, env_vars: dict[str, str]) -> Any:
    """A new local Ray cluster listening on 127.0.0.1 only, ``env_vars`` set in every
    process it starts; returns ray.init's context."""
    import ray

    with _loopback_node_ip(), _environment(env_vars):
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                           dashboard_host=LOOPBACK, dashboard_port=dashboard_port,
                           _system_config=SYSTEM_CONFIG)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:  # a Ray upgrade changed the switch: never run on open ports
        ray.shutdown()
        raise RuntimeError(f"the local Ray cluster took node IP {node_ip}, not {LOOPBACK}: "
                           f"its ports would listen on the network (tuner.cluster)")
    return context


def stop_local() -> None:
    """``ray.shutdown()`` of the local cluster this process started, less 1 s.

    ``ray.shutdown()`` stops the raylet and the GCS before Ray's autoscaler monitor. On SIGTERM
    the monitor first reports its end to the GCS, which is gone by then, so it stays until
    ``ray.shutdown()``'s 1 s grace runs out and it is killed (1.0 of ``ray.shutdown()``'s
    1.4 s, 2026-12-03). A local cluster has no autoscaler: the monitor is killed first, the
    end it reached anyway, and the rest stops as ``ray.shutdown()`` stops it. Falls back to
    plain ``ray.shutdown()`` when Ray's node internals are not where Ray 2.60 keeps them.
    """
    import subprocess

    import ray

    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        monitors = list(node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, ()))
    except Exception:  # noqa: BLE001 - another Ray version: the plain shutdown below
        monitors = []
    for info in monitors:
        process = getattr(info, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass  # ray.shutdown() below tries again
    ray.shutdown()


def requested(cli_address: str | None) -> tuple[str, str] | None:
    """``(address, where it came from)`` of the cluster to join, or None for a local one."""
    if cli_address:
        return cli_address, "--address"
    env = os.environ.get("RAY_ADDRESS")
    return (env, "RAY_ADDRESS") if env else None


def gcs_endpoint(address: str, source: str = "--address") -> tuple[str, int]:
    """``(host, port)`` of a cluster address: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``."""
    from ray._private import services

    text = address
    if address.startswith("ray://"):
        text = address[len("ray://"):]
    elif address == "auto":
        try:
            text = services.canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError:
            raise ConfigError(
                f"{source} auto: no running Ray cluster on this machine; start one with "
                "`ray start --head`, pass its HOST:PORT, or leave out --address for a "
                "local cluster") from None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{source} {address!r}: expected auto, HOST:PORT or ray://HOST:PORT "
                          f"(e.g. 10.0.0.5:6379)")
    return host.strip("[]"), int(port)


def check_reachable(address: str, source: str = "--address",
                    timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Stop with one line when nothing accepts TCP connections at the cluster's address.

    A refused connection is retried (a head node that is still starting) until ``timeout``.
    """
    host, port = gcs_endpoint(address, source)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.5, min(5.0, left))):
                return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if time.monotonic() + 1.0 >= deadline:
                raise ConfigError(
                    f"{source} {address}: no Ray cluster answers at {host}:{port} ({reason}, "
                    f"tried for {timeout:.0f} s); check the address and that the head node "
                    f"runs (`ray start --head`), or leave out --address for a local cluster"
                ) from None
            time.sleep(1.0)


def join(address: str, source: str = "--address") -> Any:
    """Join the running cluster at ``address`` (checked first); returns ray.init's context.

    ``source`` names where the address came from (``--address`` or ``RAY_ADDRESS``).
    """
    import ray

    check_reachable(address, source)
    try:
        return ray.init(address=address)
    except (ConnectionError, TimeoutError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"{source} {address}: could not join the Ray cluster ({first}); "
                          f"check that it runs the same Ray version") from None
