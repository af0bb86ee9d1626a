"""The main job side by side with the tools it replaces: plain Optuna and stock Ray Tune.

Runs, alternating their order every round, three systems doing the same hill search on
DigitsMLT (same shards, model, loss, optimizer, schedule, augmentation, metrics, trial count,
budget, early-stopping rule and concurrency):

* ``platform``: ``python -m tuner.search --method hill --space search_spaces/hill.yaml``;
* ``optuna``: ``benchmarks/peers/plain_optuna.py`` (TPE + SuccessiveHalvingPruner, n_jobs=2);
* ``ray_tune``: ``benchmarks/peers/stock_ray_tune.py`` (OptunaSearch + ASHAScheduler).

Each runs as its own process and is measured from outside: wall time, CPU seconds of the
whole process tree (user + system of every process carrying this run's token in its
environment, sampled from ``/proc`` every 0.1 s: that includes Ray's GCS, raylet, dashboard
and worker processes, which the raylet starts and which are no children the launcher could
wait for; a process's last < 0.1 s before it exits is missed), epochs trained, best val and
test mAP, the median per-trial start-up (trial entry to first optimizer step), the median
steady epoch (train + validation, first epoch of each trial left out) and the driver overhead
(launch to the first trial's entry, plus the last trial's last report to exit). Prints every
run, the medians per system and the platform's ratios against the issue's targets.

    python benchmarks/peers.py                 # 3 rounds of the full job (about 15 min, 2 cores)
    python benchmarks/peers.py --quick         # 1 round of 2 trials x 2 epochs, grace 1 (a smoke run)

Linux only (``/proc``). Timings on a loaded machine are not figures; give ``uptime`` with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
TOKEN_VAR = "MLT_PEERS_RUN"
SYSTEMS = ("platform", "optuna", "ray_tune")
#: also selectable with --systems: the platform deciding rungs and suggestions on arrival
#: (``--order arrival``, Ray's ASHA as it is) instead of in trial order (tuner.ordering)
EXTRA = ("platform_arrival",)
#: the issue's targets: (label, platform metric, peer, largest ratio)
TARGETS = [("wall per trained epoch", "wall_per_epoch", "faster peer", 1.0),
           ("total wall vs stock Ray Tune", "wall", "ray_tune", 1.0),
           ("total wall vs plain Optuna", "wall", "optuna", 1.25),
           ("CPU s per trained epoch vs plain Optuna", "cpu_per_epoch", "optuna", 1.15)]


# ---------------------------------------------------------------- CPU of a process tree
def _cpu_seconds(pid: str) -> float | None:
    """User + system CPU seconds of one process from ``/proc/PID/stat`` (None if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _has_token(pid: str, token: bytes) -> bool:
    try:
        return token in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


class TreeCpu:
    """Samples the CPU time of every process whose environment carries ``token``."""

    def __init__(self, token: str, interval: float = 0.1) -> None:
        self.token, self.interval = f"{TOKEN_VAR}={token}".encode(), interval
        self.last: dict[str, float] = {}
        self.names: dict[str, str] = {}
        self.others: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> int:
        """Update every matching process's CPU time; returns how many are alive."""
        alive = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid in self.others:
                continue
            if pid not in self.last:
                if not _has_token(pid, self.token):
                    self.others.add(pid)
                    continue
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self.last[pid] = max(cpu, self.last.get(pid, 0.0))
                name = _process_name(pid)  # Ray workers retitle themselves
                if name != "?":  # not a process that exited since
                    self.names[pid] = name
                alive += 1
        return alive

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    @property
    def total(self) -> float:
        return sum(self.last.values())

    def by_name(self) -> dict[str, float]:
        """CPU seconds per kind of process (e.g. ``raylet``, ``ray::ImplicitFunc``)."""
        out: dict[str, float] = {}
        for pid, cpu in self.last.items():
            name = self.names.get(pid, "?")
            out[name] = out.get(name, 0.0) + cpu
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _process_name(pid: str) -> str:
    """A short name of a process: Ray's ``ray::...`` title, a binary or a Python script."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in argv if w]
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split()[0]
    if "-c" in words[1:3]:
        return "python -c"
    scripts = [w for w in words[1:] if w.endswith(".py") or w == "-m"]
    if scripts:
        pick = words[words.index("-m") + 1] if scripts[0] == "-m" else Path(scripts[-1]).name
        return f"python {pick}"
    return Path(words[0]).name


# ---------------------------------------------------------------- one run of one system
def command(system: str, args: argparse.Namespace, out: Path, name: str) -> list[str]:
    size = ["--trials", str(args.trials), "--epochs", str(args.epochs)]
    platform = system.startswith("platform")
    grace = ["--grace-period" if platform else "--grace", str(args.grace)]
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    if platform:
        order = ["--order", "arrival"] if system == "platform_arrival" else []
        return [sys.executable, "-m", "tuner.search", "--method", "hill", "--space",
                str(args.platform_root / "search_spaces" / "hill.yaml"), "--out", str(out),
                "--name", name, *grace, *size, *data, *order]
    script = {"optuna": "plain_optuna.py", "ray_tune": "stock_ray_tune.py"}[system]
    extra = ["--out", str(out / name)] if system == "ray_tune" else []
    return [sys.executable, str(PEERS / script), *size, *grace, *data, *extra]


def run_once(system: str, args: argparse.Namespace, out: Path, name: str) -> dict[str, Any]:
    """Run one system to its end; its measurements (raises with the log on failure)."""
    token = uuid.uuid4().hex
    code = args.platform_root if system.startswith("platform") else ROOT
    env = {**os.environ, TOKEN_VAR: token,
           "PYTHONPATH": os.pathsep.join([str(code), str(PEERS), os.environ.get("PYTHONPATH", "")])}
    log = out / f"{name}.log"
    with TreeCpu(token) as cpu, log.open("w") as err:
        launched = time.time()
        proc = subprocess.run(command(system, args, out, name), cwd=code, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=err)
        exited = time.time()
        deadline = time.monotonic() + 15  # Ray's processes of this run end after the driver
        while cpu.sample() and time.monotonic() < deadline:
            time.sleep(0.1)
    if proc.returncode != 0:
        sys.exit(f"{system} failed (exit {proc.returncode}); log: {log}\n"
                 + log.read_text()[-2000:])
    if system.startswith("platform"):
        result = platform_result(out / name)
    else:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = summarize(system, result, exited - launched, cpu.total, launched, exited)
    summary["cpu_by_process"] = cpu.by_name()
    return summary


def platform_result(exp_dir: Path) -> dict[str, Any]:
    """The platform's per-trial facts from its ``trials.parquet`` and ``test_metrics.json``."""
    import pandas as pd

    df = pd.read_parquet(exp_dir / "trials.parquet")
    if "trial_started_at" not in df:  # an older platform (--platform-root): Tune's whole seconds
        df["trial_started_at"] = df["timestamp"] - df["time_total_s"]
        df["reported_at"] = df["timestamp"]
    trials = []
    for _, rows in df.groupby("trial_id"):
        rows = rows.sort_values("epoch")
        trials.append({"started_at": float(rows["trial_started_at"].iloc[0]),
                       "ended_at": float(rows["reported_at"].max()),
                       "epochs": int(rows["epoch"].max()),
                       "startup_s": float(rows["startup_time"].iloc[0]),
                       "epoch_s": (rows["train_time"] + rows["eval_time"]).tolist(),
                       "data_path": str(rows["data_path"].iloc[0]) if "data_path" in rows
                       else "stream"})
    test = json.loads((exp_dir / "test_metrics.json").read_text())
    return {"trials": trials, "best_val_mAP": float(df["val_mAP"].max()),
            "test_mAP": float(test["mAP"])}


def summarize(system: str, result: dict[str, Any], wall: float, cpu: float, launched: float,
              exited: float) -> dict[str, Any]:
    trials = result["trials"]
    epochs = sum(t["epochs"] for t in trials)
    steady = [s for t in trials for s in t["epoch_s"][1:]]
    first = min(t["started_at"] for t in trials)
    last = max(t["ended_at"] for t in trials)
    return {"system": system, "wall": wall, "cpu": cpu, "epochs": epochs,
            "wall_per_epoch": wall / epochs, "cpu_per_epoch": cpu / epochs,
            "best_val_mAP": result["best_val_mAP"], "test_mAP": result["test_mAP"],
            "startup": statistics.median(t["startup_s"] for t in trials),
            "steady_epoch": statistics.median(steady) if steady else float("nan"),
            "driver": (first - launched) + (exited - last),
            "data_path": ",".join(sorted({t.get("data_path", "-") for t in trials}))}


# ---------------------------------------------------------------- report
COLUMNS = [("system", "{:<17}"), ("wall", "{:>7.1f}"), ("cpu", "{:>7.1f}"), ("epochs", "{:>7d}"),
           ("wall_per_epoch", "{:>8.2f}"), ("cpu_per_epoch", "{:>8.2f}"),
           ("steady_epoch", "{:>7.2f}"), ("startup", "{:>7.2f}"), ("driver", "{:>7.1f}"),
           ("best_val_mAP", "{:>7.2f}"), ("test_mAP", "{:>7.2f}")]
HEADER = (f"{'system':<17}{'wall s':>7}{'CPU s':>7}{'epochs':>7}{'wall/ep':>8}{'CPU/ep':>8}"
          f"{'steady':>7}{'start':>7}{'driver':>7}{'val':>7}{'test':>7}")


def row(r: dict[str, Any]) -> str:
    return "".join(fmt.format(r[key]) for key, fmt in COLUMNS)


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for system in SYSTEMS + EXTRA:
        mine = [r for r in runs if r["system"] == system]
        if mine:
            out[system] = {"system": system, **{
                key: (statistics.median(r[key] for r in mine) if key != "epochs"
                      else int(statistics.median(r[key] for r in mine)))
                for key, _ in COLUMNS[1:]}}
    return out


def ratio_lines(med: dict[str, dict[str, Any]]) -> list[str]:
    plat = med["platform"]
    faster = min(("optuna", "ray_tune"), key=lambda s: med[s]["wall_per_epoch"])
    lines = []
    for label, key, peer, limit in TARGETS:
        other = faster if peer == "faster peer" else peer
        value = plat[key] / med[other][key]
        verdict = "met" if value <= limit else "MISSED"
        lines.append(f"{label:<42} {value:5.2f}x (target <= {limit:.2f}x vs {other}): {verdict}")
    lines.append(f"{'per-trial start-up, median':<42} {plat['startup']:5.2f} s (target <= 2 s): "
                 + ("met" if plat["startup"] <= 2.0 else "MISSED"))
    lines.append(f"{'driver overhead':<42} {plat['driver']:5.1f} s (target <= 15 s): "
                 + ("met" if plat["driver"] <= 15.0 else "MISSED"))
    return lines


def order_line(med: dict[str, dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """The cost of deciding in trial order, and whether each order gave one answer."""
    def answers(system: str) -> str:
        seen = sorted({(r["epochs"], round(r["best_val_mAP"], 2)) for r in runs
                       if r["system"] == system})
        return " / ".join(f"{e} epochs, val {v:.2f}" for e, v in seen)

    ratio = med["platform"]["wall"] / med["platform_arrival"]["wall"]
    return (f"search.order trial vs arrival: wall {ratio:.2f}x; answers over the rounds: "
            f"trial {answers('platform')}; arrival {answers('platform_arrival')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--grace", type=int, default=4,
                   help="ASHA grace period / pruner min resource (search_spaces/hill.yaml: 4)")
    p.add_argument("--quick", action="store_true", help="1 round of 2 trials x 2 epochs")
    p.add_argument("--data-dir", help="prepared DigitsMLT (default: the cache)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS + EXTRA)}")
    p.add_argument("--breakdown", action="store_true",
                   help="also print each run's CPU seconds by kind of process")
    p.add_argument("--platform-root", type=Path, default=ROOT,
                   help="checkout of the platform to time (e.g. `git archive` of an older "
                        "commit, for a before/after); default this one")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.trials, args.epochs, args.grace = 1, 2, 2, 1
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS + EXTRA))
    if unknown:
        sys.exit(f"--systems: unknown {unknown}; choose from {','.join(SYSTEMS + EXTRA)}")
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  load average {os.getloadavg()}  "
          f"{os.cpu_count()} CPUs; {args.rounds} rounds of {args.trials} trials x "
          f"{args.epochs} epochs", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        for k in range(args.rounds):
            order = systems[k % len(systems):] + systems[: k % len(systems)]  # alternate
            for system in order:
                runs.append(run_once(system, args, Path(tmp), f"{system}-r{k}"))
                print(row(runs[-1]) + f"   round {k}, load {os.getloadavg()[0]:.1f}", flush=True)
    print("\n" + HEADER)
    for r in runs:
        print(row(r))
    med = medians(runs)
    print("\nmedians\n" + HEADER)
    for r in med.values():
        print(row(r))
    if {"platform", "optuna", "ray_tune"} <= set(med):
        print("\n" + "\n".join(ratio_lines(med)))
    if {"platform", "platform_arrival"} <= set(med):
        print("\n" + order_line(med, runs))
    if args.breakdown:
        for r in runs:
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["cpu_by_process"].items())[:8])
            print(f"CPU s by process, {r['system']}: {top}")
    print(f"\nplatform data path: {','.join(sorted({r['data_path'] for r in runs if r['system'] == 'platform'}))}; "
          f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
