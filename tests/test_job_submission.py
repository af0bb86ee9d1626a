"""End to end on a real local Ray cluster: `ray start --head` with the dashboard and token
authentication, a small search submitted through the Jobs API, and the platform's metrics read
back from the node's Prometheus endpoint and checked against the experiment's own files.

The cluster is one `ray start --head --block` process in its own process group, on loopback,
with free ports and its own temp dir; teardown signals that group only. (`ray stop` would stop
every Ray process on the machine, including other test sessions' clusters.)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tuner.monitoring import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
MAX_EPOCHS = 2
TRIALS = 2
PORT_FLAGS = (
    "--port", "--dashboard-port", "--metrics-export-port", "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--ray-client-server-port",
    "--node-manager-port", "--object-manager-port",
)


@dataclass
class Head:
    dashboard: str
    metrics: str
    token: str
    tmp: Path
    seen: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    actors: list[dict] = field(default_factory=list)

    def get(self, path: str, auth: bool = True) -> tuple[int, bytes]:
        request = urllib.request.Request(self.dashboard + path)
        if auth:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def dashboard_up(node: Head) -> bool:
    try:
        return node.get("/api/version")[0] == 200
    except OSError:  # not listening yet
        return False


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the cluster's process group, SIGKILL what is left after 5 s.

    (`ray start --block` was seen ignoring SIGTERM for over 20 s while its children exited.)
    """
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, else its zombie keeps the group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
    proc.wait(timeout=5)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    tmp = Path(tempfile.mkdtemp(prefix="mlt-job-"))  # short: Ray's socket paths are limited
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_metrics_report_interval_ms": "1000", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", "--num-cpus=4", f"--temp-dir={tmp / 'ray'}",
           *(f"{flag}={port}" for flag, port in ports.items())]
    log = (tmp / "ray-start.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    node = Head(f"http://127.0.0.1:{ports['--dashboard-port']}",
                f"http://127.0.0.1:{ports['--metrics-export-port']}/metrics", token, tmp)
    try:
        deadline = time.monotonic() + 60
        while not dashboard_up(node):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray start --head failed:\n" + (tmp / "ray-start.log").read_text()[-3000:])
            time.sleep(1)
        yield node
    finally:
        stop_group(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def scrape(node: Head) -> None:
    """Record every ``ray_mlt_*`` sample of the node's Prometheus endpoint."""
    try:
        with urllib.request.urlopen(node.metrics, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return
    for line in text.splitlines():
        match = re.match(r"(ray_mlt_\w+)\{(.*)\} (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match[2]))
            node.seen.setdefault(match[1], []).append((labels, float(match[3])))


@pytest.fixture(scope="module")
def job(head: Head, digits_dir: Path) -> dict:
    from ray.job_submission import JobStatus, JobSubmissionClient

    space = yaml.safe_load((ROOT / "search_spaces/bce.yaml").read_text())
    space["asha"] = {"max_epochs": MAX_EPOCHS, "grace_period": 1, "reduction_factor": 2}
    space["search"].update(num_trials=TRIALS, max_concurrent=2, seed=3)
    (head.tmp / "space.yaml").write_text(yaml.safe_dump(space))
    data = head.tmp / "data"
    shutil.copytree(digits_dir, data)
    entrypoint = (f"{sys.executable} -m tuner.search --method bce --space {head.tmp / 'space.yaml'}"
                  f" --out {head.tmp / 'exp'} --name js --data-dir {data} --no-test --address auto")
    client = JobSubmissionClient(head.dashboard, headers={"Authorization": f"Bearer {head.token}"})
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(ROOT), "excludes": [".git", "experiments", "*.egg-info"]},
        metadata={"test": "test_job_submission"},
    )
    deadline = time.monotonic() + 100
    shot = os.environ.get("MLT_DASHBOARD_SCREENSHOT")
    while not (status := client.get_job_status(job_id)).is_terminal():
        scrape(head)
        if "ray_mlt_trial_epoch" in head.seen and not head.actors:
            head.actors = running_actors(head)
            if shot:
                screenshot(head, job_id, Path(shot))
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail("the job did not finish in 100 s:\n" + client.get_job_logs(job_id)[-3000:])
        time.sleep(1)
    scrape(head)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return {"id": job_id, "entrypoint": entrypoint, "logs": logs, "exp": head.tmp / "exp" / "js"}


def running_actors(head: Head) -> list[dict]:
    """Alive actors from the dashboard's State API (``/api/v0/actors``)."""
    status, body = head.get("/api/v0/actors?limit=200&detail=1")
    assert status == 200, body[:300]
    return [a for a in json.loads(body)["data"]["result"]["result"] if a["state"] == "ALIVE"]


def screenshot(head: Head, job_id: str, path: Path) -> None:
    """The dashboard's job page as a PNG (docs/img/dashboard.png), with a headless Chromium.

    Only when ``MLT_DASHBOARD_SCREENSHOT=PATH`` is set; needs ``playwright`` and a Chromium
    (``CHROMIUM=/usr/bin/chromium-headless-shell`` for Debian's package).
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=os.environ.get("CHROMIUM"))
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.context.add_cookies([{"name": "ray-authentication-token", "value": head.token,
                                   "url": head.dashboard}])
        page.goto(f"{head.dashboard}/#/jobs/{job_id}", wait_until="networkidle")
        page.wait_for_timeout(4000)
        page.screenshot(path=str(path))
        browser.close()


def test_dashboard_requires_the_token(head: Head) -> None:
    assert head.get("/api/jobs/", auth=False)[0] == 401
    assert head.get("/api/jobs/")[0] == 200


def test_job_succeeded_through_the_dashboard_api(head: Head, job: dict) -> None:
    status, body = head.get(f"/api/jobs/{job['id']}")
    info = json.loads(body)
    assert status == 200 and info["status"] == "SUCCEEDED", info
    assert info["entrypoint"] == job["entrypoint"]
    assert "dashboard at http://127.0.0.1:" in job["logs"]
    assert (job["exp"] / "trials.parquet").is_file()


def test_trials_are_named_actors(head: Head, job: dict) -> None:
    trials = set(pd.read_parquet(job["exp"] / "trials.parquet")["trial_id"])
    names = sorted({(a["class_name"], a.get("repr_name") or "") for a in head.actors})
    trial_actors = [a for a in head.actors
                    if "train_trial" in a["class_name"] + (a.get("repr_name") or "")]
    assert trial_actors, names
    assert all(a["job_id"] == trial_actors[0]["job_id"] for a in trial_actors)
    assert len(trial_actors) <= len(trials)


def test_trial_metrics_match_the_experiment(head: Head, job: dict) -> None:
    trials = pd.read_parquet(job["exp"] / "trials.parquet")
    names = set(head.seen)
    assert {"ray_mlt_trial_epoch", "ray_mlt_trial_val_map", "ray_mlt_trial_images_per_s"} <= names
    for labels, value in head.seen["ray_mlt_trial_epoch"]:
        assert labels["experiment"] == "js"
        assert labels["trial_id"] in set(trials["trial_id"])
        assert 1 <= value <= MAX_EPOCHS
    reported = {round(v, 6) for v in trials["val_mAP"]}
    for _, value in head.seen["ray_mlt_trial_val_map"]:  # each is an epoch's val mAP
        assert round(value, 6) in reported, (value, reported)
    per_s = trials["train_images"] / trials["train_time"]
    for _, value in head.seen["ray_mlt_trial_images_per_s"]:
        assert any(abs(value - x) <= 1e-6 * x for x in per_s), (value, list(per_s))


def test_search_metrics_count_the_trials(head: Head, job: dict) -> None:
    trials = pd.read_parquet(job["exp"] / "trials.parquet")
    epochs = trials.groupby("trial_id")["epoch"].max()
    last = {name: max(v for labels, v in head.seen.get(name, []) if labels["experiment"] == "js")
            for name in ("ray_mlt_search_trials_finished_total", "ray_mlt_search_trials_pruned_total")
            if name in head.seen}
    assert last.get("ray_mlt_search_trials_finished_total", 0) == sum(epochs == MAX_EPOCHS)
    assert last.get("ray_mlt_search_trials_pruned_total", 0) == sum(epochs < MAX_EPOCHS)
    assert "ray_mlt_search_trials_failed_total" not in head.seen
    best = [v for _, v in head.seen["ray_mlt_search_best_val_map"]]
    assert max(best) == pytest.approx(trials["val_mAP"].max())
    assert set(head.seen) <= set(METRIC_NAMES)
