"""The peers of ``benchmarks/peers.py`` do the platform's work: the same schedule,
augmentation, model and loss, written independently (``benchmarks/peers/workload.py``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "peers"))
workload = pytest.importorskip("workload")

from methods.base import TaskInfo  # noqa: E402
from methods.registry import create_method  # noqa: E402
from tuner.data.stream import Decoder  # noqa: E402
from tuner.loop import TrainConfig, lr_factor  # noqa: E402


def test_peer_schedule_and_ema_are_the_shipped_hill_spaces() -> None:
    """The peers hard-code search_spaces/hill.yaml's training knobs; the loop computes them
    from the space, so a change of the space that the peers miss fails here."""
    import yaml

    from tuner.loop import ema_decay_for

    space = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces/hill.yaml")
                           .read_text())
    knobs = {k: v for k, v in space["train"].items() if not isinstance(v, dict)}
    cfg = TrainConfig(**knobs)
    assert (cfg.image_size, cfg.batch_size) == (workload.IMAGE_SIZE, workload.BATCH)
    assert space["asha"]["grace_period"] == workload.GRACE
    lr = space["train"]["lr"]["loguniform"]
    assert workload.suggest(_Fixed())["lr"] == pytest.approx(lr[0])
    steps = math.ceil(2571 / workload.BATCH)
    for epochs in (space["asha"]["max_epochs"], 2):  # the peers' budget and a --quick one
        total = epochs * steps
        for step in range(total + 1):
            assert workload._lr(step, total) == pytest.approx(lr_factor(step, total, cfg, steps),
                                                              abs=1e-12)
    # the peers validate the raw model only, as the loop does without an EMA
    assert ema_decay_for(cfg, steps) == 0.0
    data = workload.Data(*(np.zeros((2, 3, 24, 24), np.uint8), np.ones((2, 10), np.float32)) * 3,
                         num_classes=10)
    run = workload.Run({"lr": 1e-3, "weight_decay": 1e-4, "lam": 1.5, "margin": 1.0,
                        "gamma": 2.0}, data, max_epochs=1)
    assert not hasattr(run, "ema")


class _Fixed:
    """An Optuna-like trial that suggests each float range's low end."""

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        return low


def test_peer_augmentation_is_the_platforms_shift() -> None:
    images = np.random.default_rng(0).integers(0, 256, (40, 3, 24, 24), dtype=np.uint8)
    ours = workload._shift(images, np.random.default_rng(5))
    out = np.empty_like(images)
    Decoder(24, "shift").augment_decoded(images, out, np.random.default_rng(5))
    np.testing.assert_array_equal(ours, out)


def test_peer_loss_and_model_are_the_platforms() -> None:
    config = {"lr": 1e-3, "weight_decay": 1e-4, "lam": 1.7, "margin": 0.5, "gamma": 1.5}
    data = workload.Data(*(np.zeros((2, 3, 24, 24), np.uint8), np.ones((2, 10), np.float32)) * 3,
                         num_classes=10)
    run = workload.Run(config, data, max_epochs=1)
    task = TaskInfo(num_classes=10, num_train=2, class_counts=(2,) * 10, max_epochs=1)
    method = create_method("hill", {k: config[k] for k in ("lam", "margin", "gamma")}, task)
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    batch = {"target": (torch.rand(4, 10, generator=torch.Generator().manual_seed(1)) > 0.5).float()}
    torch.testing.assert_close(run.loss(logits, batch), method.loss(logits, batch))
    torch.manual_seed(0)
    from tuner.backbones import build_model

    reference = build_model("small_cnn", 10)
    for (name, a), (_, b) in zip(run.model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
