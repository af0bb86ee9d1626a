"""The Ray Tune function trainable: one trial = the shared loop on one or several workers.

This, :mod:`tuner.search` and :mod:`tuner.repeats` are the only modules that import Ray
Tune. A trial builds its method, model and data from the trial ``config`` (``{"train":
{...}, "method": {...}}``) and the search-wide :class:`TrialSetup`, restores from its own
checkpoint when relaunched, and reports ``epoch`` plus validation metrics after every epoch
with a checkpoint of the full state.

* **Data once per search** when the decoded train + val splits fit :data:`MEMORY_SHARE` of
  the object store (:func:`share_splits`, on the driver): every trial, one worker or
  several, maps them zero-copy and augments each planned task in its own process
  (:class:`tuner.data.memory.MemoryEpochs`), with the same batches as the stream below. Each
  report carries ``data_path`` (``memory`` / ``stream``).
* **One worker** (``workers_per_trial == 1``): the loop runs in the Tune function itself,
  streaming all its epochs from one Ray Data execution (:class:`tuner.data.stream.EpochStream`:
  no per-epoch pipeline start-up, the next epoch decodes during validation) unless the
  splits are shared; checkpoints are Tune checkpoints.
* **Several workers**: the Tune function (a small CPU fraction) runs a Ray Train
  ``TorchTrainer`` (Train V2) named after the Tune trial id, whose workers run the same loop
  data-parallel (:mod:`tuner.distributed`: gradients averaged every step, per-sample method
  state merged with ``method.dist``). Each worker streams its own share of every epoch
  (:func:`tuner.data.stream.epochs_dataset` with ``rank``/``world``: one Ray Data execution
  per worker for all epochs, the epochs planned alike on every rank from ``train.seed``,
  each task's rows dealt out by a shared permutation), so the shards are
  disjoint and equal to within a row per task. This replaced Train's
  ``streaming_split`` (its coordinator actor and a pipeline start every epoch: 2-worker
  start-up went from 25 s to 17-18 s here); ``train.batch_size`` stays the *global* batch
  (each worker takes
  ``ceil(batch_size / workers)``), so a configuration means the same on 1 or N workers.
  Rank 0 saves the checkpoint; ``TuneReportCallback`` forwards rank 0's metrics, with the
  Train checkpoint's path as ``checkpoint_path``. A relaunched trial's Train run restores
  from its own latest checkpoint.

**Deterministic trials**: a trial's metrics depend on its configuration and ``train.seed``
only (not on the trial id, Ray's scheduling or a relaunch): the model is initialised from the
seed, every epoch's plan (shard order, task groups, in-task permutation, augmentation draws,
the rank split) comes from ``(train.seed, epoch)``, the stream delivers each epoch's tasks in
their planned order, the shuffle buffer draws from ``(train.seed, epoch)``, and torch runs with
deterministic algorithms (:func:`tuner.loop.deterministic_torch`).

Deterministic failures (a non-finite loss, a bad configuration or data) are recorded in the
trial directory (``fatal_error.txt``) so Tune's retries re-raise them at once instead of
training again; other failures (a lost node, a killed worker) are retried from the last
checkpoint.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from methods.base import TaskInfo
from methods.registry import create_method
from tuner.backbones import build_model
from tuner.data.corruption import ViewSpec
from tuner.data.prepared import PreparedData
from tuner.data.stream import (
    EpochStream,
    configure_data_context,
    epochs_dataset,
    iter_train_batches,
    load_split,
    plan_epochs,
    sample_repeats,
)
from tuner.errors import ConfigError, DataError, NonFiniteLossError, TunerError
from tuner.faults import ensure_room, tree_bytes
from tuner.loop import TrainConfig, TrainData, evaluate, fit, seed_everything
from tuner.monitoring import quiet_ray_console, trial_metrics

STATE_FILE = "state.pt"
FATAL_FILE = "fatal_error.txt"
#: third seed word of the shuffle buffer's generator (the plan uses ``[seed, epoch]``)
SHUFFLE_STREAM = 1
#: errors that a retry would only repeat
DETERMINISTIC = (NonFiniteLossError, ConfigError, DataError)


class TrialFatalError(TunerError):
    """A trial failed deterministically earlier; its retry re-raises instead of training."""


@dataclass(frozen=True)
class TrialSetup:
    """Search-wide facts every trial needs (shipped once with ``tune.with_parameters``)."""

    method: str
    data_dir: str
    view: ViewSpec
    max_epochs: int
    cpus_per_trial: float = 1.0
    data_cpus: float = 1.0
    groups: Mapping[str, list[int]] = field(default_factory=dict)
    stats_from_clean: bool = False
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    #: where multi-worker trials keep their Train runs (the experiment's ``train_runs/``)
    train_storage: str = ""
    #: the experiment directory: each checkpoint leaves room there for Tune's last state
    #: (:func:`tuner.faults.ensure_room`); empty = not checked
    experiment_dir: str = ""
    #: splits decoded once by the driver: split name -> ObjectRef of a
    #: :class:`tuner.data.memory.DecodedSplit` (:func:`share_splits`); empty = stream them
    shared: Mapping[str, Any] = field(default_factory=dict)


def train_config(config: Mapping[str, Any], setup: TrialSetup) -> TrainConfig:
    return TrainConfig.from_dict({**config.get("train", {}), "max_epochs": setup.max_epochs})


def task_info(data: PreparedData, setup: TrialSetup, num_train: int) -> TaskInfo:
    """Class counts and groups of the *observed* training labels.

    The clean labels' statistics are used only when the space says ``data.class_stats:
    clean`` (an oracle setting, as in some released code; never the default).
    """
    view = None if setup.stats_from_clean else setup.view
    groups = data.groups(view)
    return TaskInfo(
        num_classes=data.num_classes,
        num_train=num_train,
        class_counts=tuple(data.class_counts(view)),
        max_epochs=setup.max_epochs,
        label_regime=setup.view.kind,
        groups={k: tuple(v) for k, v in groups.items()},
        class_names=tuple(data.class_names),
    )


def load_state_file(path: str | Path) -> dict[str, Any]:
    """A ``state.pt`` written by the loop, through torch's restricted (weights-only) unpickler.

    Tensors, plain containers and numbers, and NumPy arrays/dtypes (the RNG states) are the
    only things it can rebuild: a checkpoint file is never a way to run code.
    """
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core  # NumPy 2 renamed numpy.core
    allowed: list[Any] = [np.ndarray, np.dtype, core.multiarray._reconstruct]
    allowed += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32", "uint8",
                                            "int32", "bool")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError / RuntimeError / EOFError
        raise DataError(f"cannot load checkpoint {path} with the restricted loader ({exc}); "
                        "it was not written by tuner.loop or is damaged") from None


def load_state(checkpoint: Any) -> dict[str, Any] | None:
    """The loop state inside a Tune/Train checkpoint (or None)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        return load_state_file(Path(path) / STATE_FILE)


def build_train_data(
    setup: TrialSetup,
    cfg: TrainConfig,
    data: PreparedData,
    observed: torch.Tensor,
    stream: Any,
    batch_size: int,
    world_size: int = 1,
) -> TrainData:
    """The loop's data: the training stream (or a worker's shard of it) and the val split."""
    val_images = _shared_images(setup, "val", cfg.image_size)
    if val_images is None:
        val_images, _ = load_split(data.shard_files("val"), cfg.image_size)
    _, val_targets = data.true_labels("val")

    def batches(epoch: int, weights: Any, draws: int | None = None,
                views: Mapping[str, Any] | None = None) -> Any:
        repeats = None
        if weights is not None:  # the same draw on every worker; each applies it to its shard
            repeats = sample_repeats(weights, cfg.seed * 100003 + epoch, draws)
        rows = len(observed) if repeats is None else int(repeats.sum())
        view_repeats = {  # dataset-level views: as many draws as the epoch's main rows
            name: sample_repeats(w, cfg.seed * 100003 + epoch + 7919 * (k + 1), rows)
            for k, (name, w) in enumerate(sorted((views or {}).items()))}
        source = stream.blocks(epoch) if hasattr(stream, "blocks") else stream
        rng = np.random.default_rng([cfg.seed, epoch, SHUFFLE_STREAM])  # a resumed epoch alike
        return iter_train_batches(source, batch_size, repeats=repeats,
                                  views=view_repeats or None, rng=rng)

    stats = None
    if setup.stats_from_clean:  # oracle setting: statistics from the clean labels
        stats = torch.from_numpy(np.asarray(data.true_labels("train")[1])).float()
        if stats.shape != observed.shape:
            raise DataError(f"clean train labels {tuple(stats.shape)} do not match the observed "
                            f"view {tuple(observed.shape)}; re-run `python -m tuner.prepare`")
    return TrainData(
        stats_targets=stats,
        train_batches=batches,
        train_targets=observed,
        steps_per_epoch=math.ceil(len(observed) / (batch_size * world_size)),
        val_images=val_images,
        val_targets=val_targets,
        val_ignore=data.ignore_mask("val"),
        groups=setup.groups,
    )


def _method_and_model(config: Mapping[str, Any], setup: TrialSetup, cfg: TrainConfig,
                      data: PreparedData) -> tuple[Any, Any, torch.Tensor]:
    seed_everything(cfg.seed)  # the model's initial weights come from train.seed
    observed = torch.from_numpy(data.view_labels(setup.view)).float()
    method = create_method(setup.method, config.get("method", {}),
                           task_info(data, setup, len(observed)))
    model = build_model(cfg.backbone, data.num_classes, cfg.weights)
    return method, model, observed


# ---------------------------------------------------------------- data once per search
#: share of the object store that the decoded train + val splits may take (else: stream)
MEMORY_SHARE = 0.25
DATA_PATHS = ("auto", "memory", "stream")


def memory_plan(num_images: int, image_size: Any, budget_bytes: float,
                data_path: str = "auto") -> tuple[bool, str]:
    """Whether to decode the train + val splits once per search, and why (one line).

    ``auto``: when the image size is a constant and the decoded splits take at most
    ``budget_bytes`` (:data:`MEMORY_SHARE` of the object store); ``memory`` / ``stream``
    force a path (``memory`` still needs a constant image size).
    """
    from tuner.data.memory import decoded_bytes

    if data_path not in DATA_PATHS:
        raise ConfigError(f"resources.data_path: must be one of {'/'.join(DATA_PATHS)}, "
                          f"got {data_path!r}")
    if data_path == "stream":
        return False, "streamed by each trial (resources.data_path: stream)"
    if not isinstance(image_size, int):
        return False, "streamed by each trial (train.image_size is tuned)"
    need = decoded_bytes(num_images, image_size)
    if data_path == "auto" and need > budget_bytes:
        return False, (f"streamed by each trial ({need / 2**20:.0f} MiB decoded > budget "
                       f"{budget_bytes / 2**20:.0f} MiB, {MEMORY_SHARE:.0%} of the object store)")
    return True, (f"decoded once and shared by every trial ({need / 2**20:.1f} MiB in the "
                  f"object store, budget {budget_bytes / 2**20:.0f} MiB)")


def share_splits(setup: TrialSetup, image_size: Any, data_path: str = "auto") -> TrialSetup:
    """Driver side: decode train + val once and put them in the object store when they fit
    (:func:`memory_plan`); returns ``setup`` with their references (or unchanged). Prints
    which path the trials use."""
    import dataclasses

    import ray

    from tuner.data.memory import decode_split

    data = PreparedData(setup.data_dir)
    splits = data.manifest["splits"]
    num = sum(int(splits[s]["num_images"]) for s in ("train", "val"))
    budget = MEMORY_SHARE * float(ray.cluster_resources().get("object_store_memory", 0.0))
    use, why = memory_plan(num, image_size, budget, data_path)
    print(f"data: train + val {why}")
    if not use:
        return setup
    shared = {s: ray.put(decode_split(data.shard_files(s), image_size)) for s in ("train", "val")}
    return dataclasses.replace(setup, shared=shared)


def _shared_split(setup: TrialSetup, split: str, image_size: int) -> Any:
    """The driver's decoded ``split`` (zero-copy from the object store), or None."""
    ref = setup.shared.get(split)
    if ref is None:
        return None
    import ray

    decoded = ray.get(ref)
    return decoded if decoded.images.shape[-1] == image_size else None


def _shared_images(setup: TrialSetup, split: str, image_size: int) -> torch.Tensor | None:
    import warnings

    decoded = _shared_split(setup, split, image_size)
    if decoded is None:
        return None
    with warnings.catch_warnings():  # read-only shared memory; the loop never writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(decoded.images)


def data_path_of(stream: Any) -> str:
    """``memory`` or ``stream``: which path a trial's training data took (a reported metric)."""
    from tuner.data.memory import MemoryEpochs

    return "memory" if isinstance(stream, MemoryEpochs) else "stream"


def _epoch_stream(data: PreparedData, cfg: TrainConfig, setup: TrialSetup, rank: int = 0,
                  world: int = 1) -> Any:
    """A trial's training epochs: from the splits the driver decoded once
    (:class:`tuner.data.memory.MemoryEpochs`, when :func:`share_splits` shared them at this
    image size), else as one Ray Data execution: the whole stream (one worker) or rank
    ``rank``'s disjoint share of it (``world`` workers, each with the trial's
    ``data_cpus / world``). Either way every rank plans the epochs alike from
    ``train.seed`` and gets each epoch's tasks in their planned order: the same batches."""
    seed = cfg.seed
    augment = data.manifest["image"].get("augment", "flip")
    decoded = _shared_split(setup, "train", cfg.image_size)
    if decoded is not None:
        from tuner.data.memory import MemoryEpochs

        return MemoryEpochs(decoded, cfg.image_size, augment, seed, rank, world)
    data_cpus = setup.data_cpus / world
    configure_data_context(data_cpus)
    files = data.shard_files("train")

    def make(epochs: Any) -> Any:
        return epochs_dataset(files, cfg.image_size, augment, epochs, data_cpus=data_cpus,
                              seed=seed, rank=rank, world=world)

    rows: dict[int, list[int]] = {e: [] for e in range(cfg.max_epochs)}  # per planned task
    for item in plan_epochs(files, cfg.image_size, range(cfg.max_epochs), seed=seed,
                            rank=rank, world=world):
        rows[item["epoch"]].append(item["rows"])
    return EpochStream(make, rows.__getitem__, cfg.max_epochs)


def train_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: train one configuration, reporting every epoch."""
    from ray import tune

    started_at = time.time()
    quiet_ray_console()
    _guard_deterministic(lambda: _train_trial(config, setup, started_at),
                         tune.get_context().get_trial_dir())


def _train_trial(config: dict[str, Any], setup: TrialSetup, started_at: float) -> None:
    from ray import tune

    if setup.workers_per_trial > 1:
        _train_trial_multi(config, setup, started_at)
        return
    torch.set_num_threads(max(1, math.floor(setup.cpus_per_trial)))
    cfg = train_config(config, setup)
    data = PreparedData(setup.data_dir)
    method, model, observed = _method_and_model(config, setup, cfg, data)
    stream = _epoch_stream(data, cfg, setup)
    train_data = build_train_data(setup, cfg, data, observed, stream, cfg.batch_size)

    context = tune.get_context()
    trial_id, experiment = context.get_trial_id(), context.get_experiment_name()

    path = data_path_of(stream)

    def report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        # wall-clock trial start and report times: benchmarks/peers.py's driver overhead
        metrics.update(data_path=path, trial_started_at=started_at, reported_at=time.time())
        trial_metrics(metrics, trial_id, experiment)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, os.path.join(tmp, STATE_FILE))
            ensure_room(setup.experiment_dir, tree_bytes(tmp))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    try:
        fit(method, model, cfg, train_data, report, resume=load_state(tune.get_checkpoint()),
            started_at=started_at)
    finally:
        stream.close()


def _guard_deterministic(run: Callable[[], None], trial_dir: str | None) -> None:
    """Run the trial; record deterministic failures so that retries re-raise them at once."""
    marker = Path(trial_dir) / FATAL_FILE if trial_dir else None
    if marker is not None and marker.is_file():
        raise TrialFatalError(f"not retried: {marker.read_text().strip()}")
    try:
        run()
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        names = [cls.__name__ for cls in DETERMINISTIC]
        if marker is not None and (
            isinstance(exc, DETERMINISTIC) or any(name in text for name in names)
        ):
            marker.write_text(_last_line(text) + "\n")
        raise


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if any(cls.__name__ in line for cls in DETERMINISTIC):
            return line[:500]
    return (lines[-1] if lines else text)[:500]


# ---------------------------------------------------------------- several workers per trial
def _train_trial_multi(config: dict[str, Any], setup: TrialSetup, started_at: float) -> None:
    """Run the trial as a Ray Train ``TorchTrainer`` named after the Tune trial id."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    # a bad configuration or data directory fails here, before any worker starts
    train_config(config, setup)
    PreparedData(setup.data_dir)
    trial_id = tune.get_context().get_trial_id()
    resources = {"CPU": setup.cpus_per_worker}
    if setup.gpus_per_worker:
        resources["GPU"] = setup.gpus_per_worker
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config, "setup": setup, "started_at": started_at,
                           "trial_id": str(trial_id),
                           "experiment": tune.get_context().get_experiment_name()},
        scaling_config=ScalingConfig(
            num_workers=setup.workers_per_trial,
            use_gpu=setup.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        torch_config=TorchConfig(backend="nccl" if setup.gpus_per_worker > 0 else "gloo"),
        run_config=RunConfig(
            name=str(trial_id),
            storage_path=setup.train_storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=0),  # Tune retries the whole trial
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One Train worker: the shared loop on this worker's shard, data-parallel."""
    import ray.train
    import ray.train.torch

    from tuner.distributed import TorchDist

    entered = time.time()
    quiet_ray_console()
    config, setup = loop_config["config"], loop_config["setup"]
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    torch.set_num_threads(max(1, math.floor(setup.cpus_per_worker)))
    cfg = train_config(config, setup)
    data = PreparedData(setup.data_dir)
    method, model, observed = _method_and_model(config, setup, cfg, data)
    # every rank plans the same epochs from train.seed and decodes its own share of each
    stream = _epoch_stream(data, cfg, setup, rank, world)
    per_worker = max(1, math.ceil(cfg.batch_size / world))
    train_data = build_train_data(setup, cfg, data, observed, stream, per_worker, world)

    path = data_path_of(stream)

    def report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        metrics = {**metrics, "workers": world, "data_path": path}
        if loop_config.get("started_at") is not None:  # trial start -> this worker's loop
            metrics["worker_start_time"] = max(0.0, entered - loop_config["started_at"])
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        trial_metrics(metrics, loop_config["trial_id"], loop_config["experiment"])
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, os.path.join(tmp, STATE_FILE))
            ensure_room(setup.experiment_dir, tree_bytes(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    try:
        fit(method, model, cfg, train_data, report,
            resume=load_state(ray.train.get_checkpoint()), device=ray.train.torch.get_device(),
            dist=TorchDist(), started_at=loop_config.get("started_at"))
    finally:
        stream.close()


def trial_checkpoint(result: Any) -> Any:
    """A finished trial's latest checkpoint: Tune's own, or its Train run's (several workers)."""
    if result.checkpoint is not None:
        return result.checkpoint
    path = (result.metrics or {}).get("checkpoint_path")
    if path:
        from ray.tune import Checkpoint

        return Checkpoint(path)
    return None


def evaluate_checkpoint(
    checkpoint: Any, config: Mapping[str, Any], setup: TrialSetup, split: str = "test"
) -> dict[str, float]:
    """Score the best weights stored in a trial's checkpoint on ``split`` (once, at the end)."""
    state = load_state(checkpoint)
    if state is None or state["best"].get("model") is None:
        return {}
    cfg = train_config(config, setup)
    data = PreparedData(setup.data_dir)
    method = create_method(setup.method, config.get("method", {}),
                           task_info(data, setup, data.manifest["splits"]["train"]["num_images"]))
    model = method.configure_model(build_model(cfg.backbone, data.num_classes))
    model.load_state_dict(state["best"]["model"])
    method.load_state_dict(state["best"].get("method") or state["method"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    images, _ = load_split(data.shard_files(split), cfg.image_size)
    _, targets = data.true_labels(split)
    metrics = evaluate(method, model, images, targets, setup.groups, cfg, device,
                       ignore=data.ignore_mask(split))
    return {"best_epoch": state["best"]["epoch"], **metrics}
