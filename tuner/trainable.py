"""The Ray Tune function trainable: one trial = the shared loop on one worker.

This and :mod:`tuner.search` are the only modules that import Ray Tune. A trial builds its
method, model and data from the trial ``config`` (``{"train": {...}, "method": {...}}``) and the
search-wide :class:`TrialSetup`, restores from its own Tune checkpoint when relaunched, and
reports ``epoch`` plus validation metrics after every epoch with a checkpoint of the full state.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from methods.base import TaskInfo
from methods.registry import create_method
from tuner.backbones import build_model
from tuner.data.corruption import ViewSpec
from tuner.data.prepared import PreparedData
from tuner.data.stream import (
    configure_data_context,
    iter_train_batches,
    load_split,
    sample_repeats,
    train_dataset,
)
from tuner.loop import TrainConfig, TrainData, evaluate, fit

STATE_FILE = "state.pt"


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


def load_state(checkpoint: Any) -> dict[str, Any] | None:
    """The loop state inside a Tune/Train checkpoint (or None)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)


def train_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: train one configuration, reporting every epoch."""
    from ray import tune

    torch.set_num_threads(max(1, math.floor(setup.cpus_per_trial)))
    cfg = train_config(config, setup)
    data = PreparedData(setup.data_dir)
    observed = torch.from_numpy(data.view_labels(setup.view)).float()
    method = create_method(setup.method, config.get("method", {}), task_info(data, setup, len(observed)))
    model = build_model(cfg.backbone, data.num_classes, cfg.weights)
    val_images, _ = load_split(data.shard_files("val"), cfg.image_size)
    _, val_targets = data.true_labels("val")
    configure_data_context(setup.data_cpus)
    augment = data.manifest["image"].get("augment", "flip")
    stream = train_dataset(data.shard_files("train"), cfg.image_size, augment)
    train_data = TrainData(
        train_batches=lambda epoch, weights: iter_train_batches(
            stream, cfg.batch_size,
            repeats=None if weights is None else sample_repeats(weights, cfg.seed * 100003 + epoch),
        ),
        train_targets=observed,
        steps_per_epoch=math.ceil(len(observed) / cfg.batch_size),
        val_images=val_images,
        val_targets=val_targets,
        groups=setup.groups,
    )

    def report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, os.path.join(tmp, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    fit(method, model, cfg, train_data, report, resume=load_state(tune.get_checkpoint()))


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
    metrics = evaluate(method, model, images, targets, setup.groups, cfg, device)
    return {"best_epoch": state["best"]["epoch"], **metrics}
