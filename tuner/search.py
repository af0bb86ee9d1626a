"""``python -m tuner.search``: tune a method with Optuna TPE + ASHA through Ray Tune.

Example (embedded DigitsMLT, a few minutes on 2 CPU cores)::

    python -m tuner.search --method hill --space search_spaces/hill.yaml

Writes into ``OUT/NAME/`` (Tune's experiment directory): ``optuna.db`` (the Optuna study, named
NAME), ``trials.parquet`` (every trial's per-epoch metrics), ``leaderboard.csv``,
``best_config.yaml`` (a space file with the best trial's values, usable again with
``--space``), ``test_metrics.json`` (the best trial's best weights scored once on the test
split) and ``search.json`` (what was run).

Multi-worker trials (``--workers-per-trial N``) run a Ray Train ``TorchTrainer`` inside each
trial (see :mod:`tuner.trainable`). A crashed or interrupted search continues with
``--resume OUT/NAME`` (or the same command and ``--name`` again): finished trials are kept,
unfinished ones resume from their checkpoints and the Optuna study continues. Only the same
method, space and budget continue an experiment, and a finished one is not run again
(:mod:`tuner.experiment`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tuner import cluster, faults
from tuner.cli import exit_now, run_cli
from tuner.errors import ConfigError
from tuner.tracking import FILES as TRACKING_FILES
from tuner.tracking import Tracking, parse_track

OBJECTIVE = "val_mAP"
#: CPU share of a multi-worker trial's driver function (it only waits on its Train run)
DRIVER_CPU = 0.05
#: custom resource that pins trial drivers to the (non-spot) head node of a cluster
DRIVER_RESOURCE = "trial_driver"


def build_parser() -> argparse.ArgumentParser:
    from tuner.space import SEARCH_CHOICES

    p = argparse.ArgumentParser(prog="python -m tuner.search", description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, help="registered method name, e.g. hill")
    p.add_argument("--space", required=True, help="search space YAML, e.g. search_spaces/hill.yaml")
    p.add_argument("--trials", type=int, help="number of trials (search.num_trials)")
    p.add_argument("--concurrency", type=_int_or_auto,
                   help="trials at once, or auto (from the cluster's CPUs/GPUs)")
    p.add_argument("--epochs", type=int, help="epoch budget per trial (asha.max_epochs)")
    p.add_argument("--grace-period", type=int, help="ASHA grace period in epochs")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs each trial reserves")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs each trial reserves")
    p.add_argument("--data-cpus", type=float, help="CPUs for each trial's Ray Data pipeline")
    p.add_argument("--workers-per-trial", type=int,
                   help="data-parallel Ray Train workers per trial (default 1: no TorchTrainer)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs of each Train worker")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs of each Train worker")
    p.add_argument("--max-failures", type=int,
                   help="retries of a failed trial from its last checkpoint (default 2)")
    p.add_argument("--resume", metavar="EXPERIMENT_DIR",
                   help="continue an interrupted search in this experiment directory")
    p.add_argument("--seed", type=int, help="sampler seed (search.seed)")
    p.add_argument("--sampler", choices=SEARCH_CHOICES["sampler"],
                   help="Optuna sampler (search.sampler; default tpe, random is a baseline)")
    p.add_argument("--scheduler", choices=SEARCH_CHOICES["scheduler"],
                   help="early stopping (search.scheduler; default asha, fifo runs every epoch)")
    p.add_argument("--order", choices=SEARCH_CHOICES["order"],
                   help="rung decisions and suggestions in trial order, the same every run "
                        "(search.order; default trial), or on arrival (Ray's ASHA as it is)")
    p.add_argument("--data-dir", help="prepared benchmark directory (default: the cache)")
    p.add_argument("--benchmark", help="benchmark (data.benchmark), e.g. digits-mlt or voc-mlt")
    p.add_argument("--label-regime", metavar="KIND[:RATE]",
                   help="training labels (data.label_regime, data.rate): clean, missing:0.6, "
                        "candidate:0.3")
    p.add_argument("--out", default="experiments", help="experiments root (default ./experiments)")
    p.add_argument("--name", help="experiment (and Optuna study) name; default METHOD-TIMESTAMP")
    p.add_argument("--address", help="join a running Ray cluster (e.g. auto) instead of starting one")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local cluster (see README)")
    p.add_argument("--repeats", type=int, metavar="K",
                   help="re-train the top configurations with K new seeds after the search and "
                        "pick by mean val mAP (search.repeats; default 0: off)")
    p.add_argument("--repeats-top", type=int, metavar="N",
                   help="how many of the best configurations --repeats re-trains (default 3)")
    p.add_argument("--no-test", action="store_true", help="skip scoring the best model on test")
    p.add_argument("--track", action="append", type=parse_track, metavar="TRACKER",
                   help="experiment tracker: tensorboard, mlflow or mlflow=URI (repeatable; "
                        "needs the track extra, see tuner/tracking.py)")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Command-line knobs as space-section overrides."""
    table = {
        ("search", "num_trials"): args.trials,
        ("search", "max_concurrent"): args.concurrency,
        ("search", "seed"): args.seed,
        ("search", "sampler"): args.sampler,
        ("search", "scheduler"): args.scheduler,
        ("search", "order"): args.order,
        ("asha", "max_epochs"): args.epochs,
        ("asha", "grace_period"): args.grace_period,
        ("resources", "cpus_per_trial"): args.cpus_per_trial,
        ("resources", "gpus_per_trial"): args.gpus_per_trial,
        ("resources", "data_cpus"): args.data_cpus,
        ("resources", "workers_per_trial"): args.workers_per_trial,
        ("resources", "cpus_per_worker"): args.cpus_per_worker,
        ("resources", "gpus_per_worker"): args.gpus_per_worker,
        ("search", "max_failures"): args.max_failures,
        ("search", "repeats"): args.repeats,
        ("search", "repeats_top"): args.repeats_top,
        ("data", "data_dir"): args.data_dir,
    }
    if args.benchmark is not None:
        table["data", "benchmark"] = _checked_benchmark(args.benchmark)
    if args.label_regime is not None:
        table["data", "label_regime"], table["data", "rate"] = _label_regime(args.label_regime)
    out: dict[str, dict[str, Any]] = {}
    for (section, key), value in table.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    if args.benchmark is not None and table["data", "benchmark"] != "digits-mlt":
        out["data"]["head_share"] = None  # a DigitsMLT variant means nothing for another one
    if args.epochs is not None and args.grace_period is None:
        out["asha"]["grace_period"] = max(1, min(args.epochs // 3, args.epochs))
    return out


def _checked_benchmark(name: str) -> str:
    from tuner.data.prepared import known_benchmarks

    if name not in known_benchmarks():
        raise ConfigError(f"--benchmark {name!r}: unknown benchmark; choose one of "
                          f"{list(known_benchmarks())} (docs/benchmarks.md)")
    return name


def _label_regime(text: str) -> tuple[str, float]:
    """``--label-regime KIND[:RATE]``, checked here so that an error names the flag."""
    from tuner.data.corruption import ViewSpec

    kind, _, rate = text.partition(":")
    try:
        spec = ViewSpec(kind, float(rate or 0.0))
    except ValueError as exc:
        why = str(exc) if isinstance(exc, ConfigError) else "the rate must be a number"
        raise ConfigError(f"--label-regime {text!r}: {why}; e.g. clean, missing:0.6 or "
                          f"candidate:0.3") from None
    return spec.kind, spec.rate


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def trial_demand(space: Any) -> dict[str, float]:
    """Everything one trial holds while it runs: driver, training workers and data CPUs."""
    res = space.resources
    if res["workers_per_trial"] > 1:
        return {
            "CPU": DRIVER_CPU + res["workers_per_trial"] * res["cpus_per_worker"] + res["data_cpus"],
            "GPU": res["workers_per_trial"] * res["gpus_per_worker"],
        }
    return {"CPU": res["cpus_per_trial"] + res["data_cpus"], "GPU": res["gpus_per_trial"]}


def trial_resources(space: Any, cluster: Mapping[str, float]) -> dict[str, float]:
    """What Tune reserves for a trial's function: all of it (1 worker) or a small driver share.

    A multi-worker trial's function only waits on its TorchTrainer, whose workers reserve
    their own CPUs/GPUs; on a cluster that defines ``trial_driver`` the function is pinned to
    the head node with it (cluster.yaml), so spot GPU nodes never host a driver.
    """
    res = space.resources
    if res["workers_per_trial"] > 1:
        out = {"cpu": DRIVER_CPU}
        if cluster.get(DRIVER_RESOURCE):
            out[DRIVER_RESOURCE] = 0.001
        return out
    return {"cpu": res["cpus_per_trial"], "gpu": res["gpus_per_trial"]}


def concurrency(space: Any, cluster: Mapping[str, float]) -> int:
    """``search.max_concurrent``, or (``auto``) how many trials the cluster holds at once.

    A trial needs :func:`trial_demand`; the GPUs decide when trials use GPUs, else the CPUs.
    An autoscaling cluster may have no GPU node yet: auto then starts with 1 and Tune queues
    the rest (they start as nodes arrive).
    """
    wanted = space.search["max_concurrent"]
    demand = trial_demand(space)
    fits = [int(cluster.get(k, 0) // v) for k, v in demand.items() if v > 0]
    capacity = min(fits) if fits else 1
    if wanted == "auto":
        return max(1, min(capacity, space.search["num_trials"]))
    if capacity < wanted:
        print(f"note: {wanted} concurrent trials need {wanted} x {demand} but the cluster has "
              f"CPU {cluster.get('CPU', 0):g}, GPU {cluster.get('GPU', 0):g} now; the rest "
              f"wait for resources (lower --concurrency or add nodes)")
    return int(wanted)


def local_cpus(space: Any, requested: int | None) -> int:
    """Logical CPUs for a local cluster: enough for every concurrent trial and its data CPUs.

    Logical CPUs are Ray's scheduling slots, not cores: on a 2-core machine two trials of
    1 training CPU + 1 data CPU need 4 slots, or Ray Data's read tasks wait forever.
    """
    wanted = space.search["max_concurrent"]
    trials = 1 if wanted == "auto" else wanted
    need = trials * trial_demand(space)["CPU"]
    return max(int(requested or 0), os.cpu_count() or 1, int(-(-need // 1)))


def check_state_api(timeout: float = 30.0) -> None:
    """Stop with one line when the dashboard / State API does not answer.

    Ray Train's placement-group cleaner learns through the State API that an ASHA-stopped
    trial's controller died; without the dashboard process those groups are never removed
    and the next trials wait forever (ray-project/ray#54305).
    """
    import ray
    from ray.util.state import list_nodes

    try:  # this cluster's address: other Ray instances may run on the same machine
        list_nodes(address=ray.get_runtime_context().gcs_address, limit=1, timeout=timeout,
                   raise_on_missing_output=False)
    except Exception as exc:  # noqa: BLE001 - any failure means the same to the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(
            f"the Ray dashboard / State API does not answer ({first}); stopped trials would "
            f"never release their resources. Start Ray with the dashboard: install "
            f"'ray[default]' and use `ray start --head --include-dashboard=true` (or no "
            f"--address for a local cluster)"
        ) from None


def free_port() -> int:
    """A TCP port free on the loopback interface now (for this cluster's dashboard)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def state_api_env(dashboard_port: int) -> dict[str, str]:
    """Environment for every worker of a local cluster: its own State API address.

    Ray Train's placement-group cleaner (a detached actor of each Train run) calls the State
    API without an address. With a second Ray instance on the same machine (another search,
    a notebook's ``ray.init()``) the address lookup fails ("Found multiple active Ray
    instances"), the cleaner dies, a finished run's placement group is never removed and the
    next multi-worker trial waits forever for its workers. ``RAY_API_SERVER_ADDRESS`` is read
    before any lookup, so the cleaner always reaches this cluster's dashboard.
    """
    return {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}


#: seconds a reused trial process waits for the previous trial's function to return
#: (Tune's default, 2 s, is short for a stream's shutdown on a loaded machine; a reset
#: that times out fails the next trial)
REUSE_WAIT_S = "30"


#: Ray Train's watcher of node preemption (an actor per multi-worker trial)
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def local_worker_env(dashboard_port: int) -> dict[str, str]:
    """Environment of every process of a local cluster: :func:`state_api_env`, the
    wait of a reused trial process (``TUNE_FUNCTION_THREAD_TIMEOUT_S``, read there), and no
    preemption watcher (:data:`PREEMPTION_WATCHER`, unless set): a local cluster is this
    machine, which no cloud preempts, and Ray Train starts the watcher as an actor of its own
    in every multi-worker trial, a process and 1.2 s of imports beside the trial's start-up
    (Ray 2.60). A cluster of ``ray up`` keeps Ray's default."""
    env = os.environ
    return {**state_api_env(dashboard_port),
            "TUNE_FUNCTION_THREAD_TIMEOUT_S": env.get("TUNE_FUNCTION_THREAD_TIMEOUT_S",
                                                      REUSE_WAIT_S),
            PREEMPTION_WATCHER: env.get(PREEMPTION_WATCHER, "0")}


def reuse_trial_processes(space: Any, local: bool) -> bool:
    """Whether the next trial may run in a finished or stopped trial's process.

    On unless ``MLT_TUNER_REUSE_TRIAL_PROCESSES=0``. Reuse saves about 3 s of process start
    and imports per trial. (With reuse, Tune restarts a trial that failed for lack of space at
    once in its old process; its checkpoint used to fill the space the full-disk guard frees
    for Tune's last experiment state. Every checkpoint now leaves that room free,
    :func:`tuner.faults.ensure_room`, and ``tests/test_faults.py``'s full-disk test runs with
    reuse and Tune's retries.) Only for
    one-worker trials on a local cluster: there the process waits long enough for the
    previous trial to return (:data:`REUSE_WAIT_S`). A multi-worker trial's function returns
    only after its Train worker group is torn down, which overran the wait and left the next
    trial pending for good (Ray 2.60).
    """
    wanted = os.environ.get("MLT_TUNER_REUSE_TRIAL_PROCESSES", "1") != "0"
    return wanted and local and int(space.resources["workers_per_trial"]) == 1


def start_ray(args: argparse.Namespace, space: Any) -> bool:
    """Start a local cluster or join one; True when this search started its own cluster."""
    import ray

    if ray.is_initialized():
        check_state_api()
        return False
    join = cluster.requested(args.address)
    if join:
        context = cluster.join(*join)
        where = f"joined the Ray cluster at {join[0]}"
        from tuner.data.stream import keep_data_coordinator_here

        keep_data_coordinator_here()  # on the head, not on a worker the autoscaler may stop
    else:  # a new cluster, every port on 127.0.0.1
        num_cpus = local_cpus(space, args.num_cpus)
        port = free_port()
        context = cluster.start_local(num_cpus, port, local_worker_env(port))
        where = f"local Ray cluster: {num_cpus} logical CPUs"
    url = getattr(context, "dashboard_url", None)
    print(where + (f"; dashboard at http://{url}" if url else ""))
    check_state_api()
    return not join


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    join = cluster.requested(args.address)
    if join:  # an address where nothing answers: one line in seconds, before any other work
        cluster.check_reachable(*join)
    import methods
    from tuner import experiment
    from tuner.space import load_space

    cls = methods.get_method_class(args.method)
    space = load_space(args.space, overrides_from_args(args), method=args.method)
    regime = space.data["label_regime"]
    if regime not in cls.regimes:
        print(f"warning: {args.method} is designed for {'/'.join(cls.regimes)} labels; running it "
              f"on {regime} labels as asked", file=sys.stderr)
    if experiment.check_reuse(args, space):  # another method/space/budget is refused
        return 0  # finished: reported, nothing re-run or re-scored
    exp_dir, resume = experiment_dir(args)
    if resume:
        faults.check_resumable(exp_dir)
    data_dir, setup = prepare_data(space, exp_dir)
    tracking = Tracking.start(args.track, exp_dir, resume)
    local = start_ray(args, space)
    setup = share_data(space, setup)
    experiment.write_record(exp_dir, space)
    again = faults.resume_command(sys.argv[1:] if argv is None else argv, exp_dir.name)
    try:  # Ctrl-C, a full disk, the study's unfinished trials: tuner.faults
        with faults.SearchGuard(exp_dir) as guard:
            results = run_search(space, setup, exp_dir, resume=resume,
                                 callbacks=tracking.callbacks(),
                                 reuse_actors=reuse_trial_processes(space, local))
            faults.raise_if_disk_full(results, exp_dir)
            rows = write_outputs(results, space, setup, exp_dir, args, data_dir)
    except KeyboardInterrupt:
        print(f"interrupted; resume with: {again}", file=sys.stderr)
        raise
    print(format_leaderboard(rows))
    if guard.interrupted:  # no test scoring of an interrupted search
        print(f"interrupted; resume with: {again}", file=sys.stderr)
        return faults.EXIT_INTERRUPTED
    best, test = best_result(results), None
    if space.search["repeats"]:  # re-train the top configurations with K seeds, pick by mean
        from tuner.repeats import repeat_top_configs

        repeat_top_configs(rows, space, setup, exp_dir, test=not args.no_test)
        if (exp_dir / "test_metrics.json").is_file():
            test = json.loads((exp_dir / "test_metrics.json").read_text())
    elif not args.no_test and best is not None:
        test = score_test(best, setup, space)
        faults.atomic_write(exp_dir / "test_metrics.json", json.dumps(test, indent=1))
        print(f"best trial {best.metrics['trial_id']} on test: " + _fmt_metrics(test))
    tracking.finish(best.metrics if best is not None else None, test)
    experiment.mark_finished(exp_dir, results, space, tested=not args.no_test)
    print(f"experiment directory: {exp_dir}")
    if local:  # now, not in Ray's exit hook, which first sleeps 0.5 s for late worker errors
        cluster.stop_local()
    return 0


def experiment_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    """The experiment directory and whether to resume it.

    ``--resume DIR`` continues DIR; ``--name NAME`` of an existing, resumable experiment also
    continues it (re-running the same command after a crash is enough).
    """
    from ray import tune

    if args.resume:
        exp_dir = Path(args.resume).resolve()
        if _stopped_at_start(exp_dir):
            return exp_dir, False
        if not tune.Tuner.can_restore(str(exp_dir)):
            raise ConfigError(f"--resume {args.resume}: no Tune experiment state there; pass "
                              f"the experiment directory a search printed (OUT/NAME)")
        print(f"resuming the search in {exp_dir}")
        return exp_dir, True
    name = args.name or f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_dir = Path(args.out).resolve() / name
    if exp_dir.exists():
        if _stopped_at_start(exp_dir):
            return exp_dir, False
        if tune.Tuner.can_restore(str(exp_dir)):
            print(f"experiment {exp_dir} exists: resuming it")
            return exp_dir, True
        raise ConfigError(f"experiment {exp_dir} exists and holds no resumable search; "
                          f"choose another --name")
    return exp_dir, False


#: what a search writes before Tune saves its first trial state
_FIRST_FILES = {"experiment.json", "optuna.db", "optuna.db-journal", "tuner.pkl",
                ".validate_storage_marker", faults.RESERVE_NAME, *TRACKING_FILES}


def _stopped_at_start(exp_dir: Path) -> bool:
    """Whether ``exp_dir`` is a search stopped in its first seconds, before Tune saved any
    trial state (``experiment_state-*.json``): it holds only its Optuna study and maybe
    ``tuner.pkl``, which Tune cannot resume from. Such a search starts again in place, and
    its searcher re-uses the Optuna trials it had asked for (``PrunedAwareOptunaSearch``)."""
    if not exp_dir.is_dir() or any(exp_dir.glob("experiment_state-*.json")):
        return False
    names = {p.name for p in exp_dir.iterdir()}
    if not names or not names <= _FIRST_FILES:
        return False
    print(f"experiment {exp_dir} was stopped before Tune saved any trial state: "
          f"starting it again in place")
    return True


def prepare_data(space: Any, exp_dir: Path | None = None) -> tuple[Path, Any]:
    """Build/verify the benchmark and its label view on the driver, once per search."""
    from tuner.data.prepared import PreparedData, ensure_prepared
    from tuner.trainable import TrialSetup

    view = space.view()
    data_dir = ensure_prepared(space.data["benchmark"], space.data["data_dir"], seed=0,
                               head_share=space.data["head_share"])
    data = PreparedData(data_dir)
    if data.manifest["benchmark"] != space.data["benchmark"]:
        raise ConfigError(f"{data_dir} holds {data.manifest['benchmark']!r}, not "
                          f"{space.data['benchmark']!r}; fix data.data_dir or data.benchmark")
    data.ensure_view(view)
    data.verify()
    res = space.resources
    setup = TrialSetup(
        method=space.method,
        data_dir=str(data_dir.resolve()),
        view=view,
        max_epochs=space.max_epochs,
        cpus_per_trial=float(res["cpus_per_trial"]),
        data_cpus=float(res["data_cpus"]),
        groups=data.groups(view if space.data["groups"] == "observed" else None),
        stats_from_clean=space.data["class_stats"] == "clean",
        workers_per_trial=int(res["workers_per_trial"]),
        cpus_per_worker=float(res["cpus_per_worker"]),
        gpus_per_worker=float(res["gpus_per_worker"]),
        train_storage=str(exp_dir / "train_runs") if exp_dir is not None else "",
        experiment_dir=str(exp_dir) if exp_dir is not None else "",
    )
    return data_dir, setup


def share_data(space: Any, setup: Any) -> Any:
    """Decode train + val once for every trial when they fit (:func:`tuner.trainable.share_splits`)."""
    from tuner.loop import TrainConfig
    from tuner.trainable import share_splits

    size = space.train.get("image_size", TrainConfig.image_size)
    return share_splits(setup, size, space.resources["data_path"])


def run_search(space: Any, setup: Any, exp_dir: Path, resume: bool = False,
               callbacks: Sequence[Any] = (), reuse_actors: bool = False) -> Any:
    """Run (or, with ``resume``, continue) the Tune experiment; returns the ResultGrid.

    ``callbacks`` (trackers) join a new search; a resumed one restores those it started with.
    ``reuse_actors`` (:func:`reuse_trial_processes`): a stopped trial's process (torch, the
    loop, the shared data mapped) runs the next trial, without a process start and 3 s of
    imports per trial (:mod:`tuner.trainable` resets every per-trial setting: seeds, torch
    flags, Ray Data context).
    """
    import ray
    from ray import tune

    from tuner.optuna_search import PrunedAwareOptunaSearch, sqlite_storage
    from tuner.ordering import SearchClock
    from tuner.trainable import train_trial

    # save Tune's experiment state (trials + searcher) at least every second, so a crash
    # loses little. Tune also saves it after every trial checkpoint (every epoch), as
    # CheckpointConfig(num_to_keep=1) makes it; "0" (every step of Tune's loop, ~10 a
    # second) cost the driver 4.4 CPU s of a 100 s main job on 2 cores
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # ... which is deliberate: silence Tune's "snapshotting triggered multiple times" warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    exp_dir.mkdir(parents=True, exist_ok=True)  # experiment_dir decided new/resume/restart
    search = space.search
    cluster = ray.cluster_resources()
    slots = concurrency(space, cluster)
    clock = SearchClock(slots) if search["order"] == "trial" else None
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, setup=setup), trial_resources(space, cluster)
    )
    progress = _progress_callback(exp_dir.name, space.max_epochs)
    if resume:
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        with light_callback_usage_tag():
            return tuner.fit()
    searcher = PrunedAwareOptunaSearch(  # re-uses trials a search stopped at once had asked for
        space=space.define_by_run,
        metric=OBJECTIVE,
        mode="max",
        sampler=build_sampler(search),
        storage=sqlite_storage(exp_dir / "optuna.db"),
        study_name=exp_dir.name,
        max_epochs=space.max_epochs,
        stopped_state=search["stopped_trials"],
        clock=clock,
        num_trials=search["num_trials"],
        sampler_learns=search["sampler"] != "random",
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            search_alg=searcher,
            scheduler=build_scheduler(space, clock),
            num_samples=search["num_trials"],
            max_concurrent_trials=slots,
            trial_dirname_creator=trial_dirname,
            reuse_actors=reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=exp_dir.name,
            storage_path=str(exp_dir.parent),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=search["max_failures"]),
            callbacks=[progress, faults.disk_full_callback(exp_dir), *callbacks],
            verbose=1,
        ),
    )
    with light_callback_usage_tag():
        return tuner.fit()


@contextlib.contextmanager
def light_callback_usage_tag() -> Iterator[None]:
    """While a search runs, Ray's usage tag of its callbacks imports nothing.

    Ray 2.60's ``tune.run`` records which callback classes a search uses (a usage-stats tag,
    ``ray.air._internal.usage.tag_callbacks``) by importing the MLflow, W&B, Comet and Aim
    integrations to compare class names: with MLflow installed that was 0.6-0.7 s of the
    driver's start-up, before the first trial. Here the tag is recorded as before when
    MLflow's integration (the one installed with the platform's trackers) is already imported,
    and skipped otherwise; nothing else changes. Should a later Ray drop the function, this
    does nothing.
    """
    from ray.air._internal import usage

    original = getattr(usage, "tag_callbacks", None)
    if original is None:
        yield
        return

    def tag_callbacks(callbacks: Any) -> Any:
        if "ray.air.integrations.mlflow" in sys.modules:
            return original(callbacks)
        return False

    usage.tag_callbacks = tag_callbacks
    try:
        yield
    finally:
        usage.tag_callbacks = original


def build_sampler(search: Mapping[str, Any]) -> Any:
    """The Optuna sampler of ``search.sampler``: TPE after ``n_startup_trials`` random ones
    (default ``num_trials // 3``, at least 2), or plain random search (a baseline)."""
    import optuna

    if search["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=search["seed"])
    startup = search["n_startup_trials"] or max(2, search["num_trials"] // 3)
    return optuna.samplers.TPESampler(seed=search["seed"], n_startup_trials=startup)


def build_scheduler(space: Any, clock: Any = None) -> Any:
    """ASHA on ``epoch`` (``search.scheduler: asha``), or FIFO: every trial runs every epoch.

    With a :class:`tuner.ordering.SearchClock` (``search.order: trial``), the same rules
    decided in trial order (:class:`tuner.ordering.OrderedASHA`)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if clock is not None:
        from tuner.ordering import OrderedASHA

        asha = space.asha
        return OrderedASHA(
            clock, metric=OBJECTIVE, mode="max", time_attr="epoch", max_t=asha["max_epochs"],
            grace_period=asha["grace_period"] if space.search["scheduler"] == "asha" else None,
            reduction_factor=asha["reduction_factor"],
        )
    if space.search["scheduler"] == "fifo":
        return FIFOScheduler()
    asha = space.asha
    return ASHAScheduler(
        time_attr="epoch",
        max_t=asha["max_epochs"],
        grace_period=asha["grace_period"],
        reduction_factor=asha["reduction_factor"],
    )


def trial_dirname(trial: Any) -> str:
    """``train_trial_<trial id>_<number>``: Tune's default name without the ~200 characters of
    hyperparameters and the timestamp (the configuration is in leaderboard.csv)."""
    number = str(trial.experiment_tag).split("_", 1)[0] or "0"
    return f"train_trial_{trial.trial_id}_{number}"


def _progress_callback(experiment: str, max_epochs: int) -> Any:
    """A Tune callback exporting the search's progress (tuner.monitoring) to Ray's metrics."""
    from ray.tune import Callback

    from tuner.monitoring import SearchProgress

    class _Progress(Callback):
        def setup(self, **info: Any) -> None:
            self.progress = SearchProgress(experiment, max_epochs, objective=OBJECTIVE)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                            **info: Any) -> None:
            self.progress.result(result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.progress.ended(trial.last_result)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.progress.ended(trial.last_result, failed=True)

    return _Progress()


def trial_status(result: Any, max_epochs: int) -> str:
    if result.error is not None:
        return "ERROR"
    epoch = (result.metrics or {}).get("epoch", 0)
    return "COMPLETE" if epoch >= max_epochs else "STOPPED"


def epoch_frame(result: Any) -> Any:
    """A trial's per-epoch results (Tune's ``metrics_dataframe``), one row per epoch.

    A driver killed after Tune logged an epoch's result but before it saved the experiment
    state with that epoch's checkpoint restarts the trial from its previous checkpoint on
    resume, so the epoch is trained and logged again; the later row (of the run that went
    on) is kept (tests/test_multinode.py).
    """
    df = result.metrics_dataframe
    if df is None or not len(df) or "epoch" not in df:
        return df
    df = df.drop_duplicates("epoch", keep="last")
    return df.sort_values("epoch", kind="stable").reset_index(drop=True)


def leaderboard_rows(results: Any, space: Any) -> list[dict[str, Any]]:
    """One row per trial: config, best validation metrics (at its best epoch), epochs run."""
    rows = []
    for result in results:
        df = epoch_frame(result)
        row: dict[str, Any] = {
            "trial_id": (result.metrics or {}).get("trial_id", Path(result.path).name),
            "status": trial_status(result, space.max_epochs),
            "config": json.dumps(result.config, sort_keys=True),
            "trial_dir": Path(result.path).name,
        }
        if df is not None and OBJECTIVE in df and len(df):
            best = df.loc[df[OBJECTIVE].idxmax()]
            row.update({k: float(best[k]) for k in df.columns
                        if k.startswith("val_") and k != "val_model"})
            row["best_epoch"] = int(best["epoch"])
            row["epochs"] = int(df["epoch"].max())
        if result.error is not None:
            row["error"] = str(result.error).strip().splitlines()[-1][:300]
        rows.append(row)
    rows.sort(key=lambda r: -r.get(OBJECTIVE, float("-inf")))
    return rows


def write_outputs(results: Any, space: Any, setup: Any, exp_dir: Path, args: Any,
                  data_dir: Path) -> list[dict[str, Any]]:
    """Per-epoch metrics (Parquet), leaderboard (CSV), best config (YAML), search.json."""
    import pandas as pd

    from tuner.space import to_yaml

    frames = []
    for result in results:
        df = epoch_frame(result)
        if df is not None and len(df):
            df = df.copy()
            df["trial_status"] = trial_status(result, space.max_epochs)
            for section, values in result.config.items():
                for key, value in (values or {}).items():
                    df[f"config/{section}/{key}"] = value
            frames.append(df)
    if frames:  # every file written to a temporary name, then renamed (tuner.faults)
        with faults.atomic_path(exp_dir / "trials.parquet") as tmp:
            pd.concat(frames, ignore_index=True).to_parquet(tmp)
    rows = leaderboard_rows(results, space)
    with faults.atomic_path(exp_dir / "leaderboard.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    best = best_result(results)
    if best is not None:
        faults.atomic_write(
            exp_dir / "best_config.yaml",
            f"# best trial {best.metrics.get('trial_id')} of {exp_dir.name}; reuse with\n"
            f"# python -m tuner.search --method {space.method} --space {exp_dir / 'best_config.yaml'}\n"
            + to_yaml(space.fixed_config(best.config)))
    import ray

    faults.atomic_write(exp_dir / "search.json", json.dumps({
        "argv": sys.argv, "method": space.method, "space_file": space.path,
        "data_dir": str(data_dir), "view": setup.view.name, "ray": ray.__version__,
        "trials": len(rows),
    }, indent=1))
    return rows


def best_result(results: Any) -> Any:
    """The non-failed trial with the highest best validation mAP (never test)."""
    from tuner.trainable import trial_checkpoint

    best, score = None, float("-inf")
    for result in results:
        if result.error is None and trial_checkpoint(result) is not None and result.metrics:
            value = result.metrics.get("best_val_mAP", float("-inf"))
            if value > score:
                best, score = result, value
    return best


def score_test(result: Any, setup: Any, space: Any) -> dict[str, float]:
    """Score the chosen trial's best weights on the test split, once.

    In this process when it can (a CPU trial, or a GPU here): no task and worker to start,
    about 10 s less on a small machine; in a Ray task with the trial's resources when the
    trials use GPUs that this driver does not have (a cluster's CPU head node).
    """
    import ray
    import torch

    from tuner.trainable import evaluate_checkpoint, trial_checkpoint

    res = space.resources
    checkpoint = trial_checkpoint(result)
    if not res["gpus_per_trial"] or torch.cuda.is_available():
        return evaluate_checkpoint(checkpoint, result.config, setup, "test")
    task = ray.remote(evaluate_checkpoint).options(
        num_cpus=res["cpus_per_trial"], num_gpus=res["gpus_per_trial"])
    return ray.get(task.remote(checkpoint, result.config, setup, "test"))


def _fmt_metrics(metrics: Mapping[str, float]) -> str:
    keys = [k for k in ("mAP", "mAP_head", "mAP_medium", "mAP_tail", "CF1", "OF1") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.2f}" for k in keys)


def format_leaderboard(rows: list[dict[str, Any]], top: int = 20) -> str:
    """A fixed-width text table of the best trials."""
    head = f"{'trial':<14}{'status':<10}{'val mAP':>8}{'head':>7}{'med':>7}{'tail':>7}{'ep':>4}  config"
    lines = ["", "Leaderboard (validation split)", head, "-" * len(head)]
    for row in rows[:top]:
        cfg = json.loads(row["config"]) or {}  # null: a trial that failed before a resume
        flat = ", ".join(f"{k}={_short(v)}" for sec in cfg.values() for k, v in (sec or {}).items())
        lines.append(
            f"{str(row['trial_id'])[:13]:<14}{row['status']:<10}"
            f"{row.get('val_mAP', float('nan')):>8.2f}{row.get('val_mAP_head', float('nan')):>7.2f}"
            f"{row.get('val_mAP_medium', float('nan')):>7.2f}{row.get('val_mAP_tail', float('nan')):>7.2f}"
            f"{row.get('epochs', 0):>4}  {flat}" + (f"  [{row['error']}]" if row.get("error") else ""))
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    exit_now(main())
