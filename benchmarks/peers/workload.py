"""The user's training code shared by the two peer scripts: data, model, loss, one epoch.

What a user comparing with the platform writes once, outside any tuning library: read and
decode the same Parquet shards into memory, the platform's model (``small_cnn``), loss
(Hill) and metrics (``tuner.metrics.evaluate``), AdamW with weight decay on weights only,
``search_spaces/hill.yaml``'s schedule (a per-step linear warm-up over the first 10% of the
budget, then cosine to 0 at its end; no model EMA), the same random-shift augmentation, batch
size and shuffling,
deterministic torch on one thread per trial, ASHA's first rung at ``GRACE`` epochs. Only the
orchestration differs between ``plain_optuna.py`` and ``stock_ray_tune.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from methods.hill import Hill, HillParams
from tuner.backbones import build_model
from tuner.data.corruption import ViewSpec
from tuner.data.prepared import PreparedData, ensure_prepared
from tuner.data.stream import load_split
from tuner.metrics import evaluate

IMAGE_SIZE, BATCH, EVAL_BATCH = 24, 32, 256
#: hill.yaml: warm-up share of the budget, ASHA grace period / early-stopping rung
WARMUP_FRAC, GRACE = 0.1, 4
VIEW = ViewSpec("missing", 0.6, 0)  # search_spaces/hill.yaml's labels


@dataclass
class Data:
    """Decoded uint8 images and labels of the three splits (train: observed labels)."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


def load_data(data_dir: str | None = None) -> Data:
    """The benchmark's shards decoded once (rows looked up by their ``index``)."""
    path = ensure_prepared("digits-mlt", data_dir, seed=0)
    data = PreparedData(path)
    data.ensure_view(VIEW)
    out = {}
    for split in ("train", "val", "test"):
        images, index = load_split(data.shard_files(split), IMAGE_SIZE)
        labels = data.view_labels(VIEW) if split == "train" else data.true_labels(split)[1]
        out[f"{split}_x"] = images.numpy()
        out[f"{split}_y"] = np.asarray(labels, dtype=np.float32)[index.numpy()]
    return Data(num_classes=data.num_classes, **out)


def suggest(trial: Any) -> dict[str, float]:
    """The hill.yaml space through an Optuna trial (define-by-run)."""
    return {"lr": trial.suggest_float("lr", 1e-3, 1e-2, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-3, log=True),
            "lam": trial.suggest_float("lam", 1.0, 2.5),
            "margin": trial.suggest_float("margin", 0.0, 1.5),
            "gamma": trial.suggest_float("gamma", 0.0, 4.0)}


class Run:
    """One configuration's model, loss, optimizer and schedule (seed 0, one thread)."""

    def __init__(self, config: dict[str, float], data: Data, max_epochs: int) -> None:
        torch.manual_seed(0)
        torch.use_deterministic_algorithms(True)  # the platform's trial settings (equal compute)
        torch.utils.deterministic.fill_uninitialized_memory = False
        self.data, self.rng = data, np.random.default_rng(0)
        self.model = build_model("small_cnn", data.num_classes)
        self.loss = Hill(HillParams(lam=config["lam"], margin=config["margin"],
                                    gamma=config["gamma"]), task=None).loss
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        rest = [p for p in self.model.parameters() if p.ndim <= 1]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": config["weight_decay"]},
                                      {"params": rest, "weight_decay": 0.0}], lr=config["lr"])
        total = max_epochs * math.ceil(len(data.train_x) / BATCH)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr(s, total))
        self.first_step_at = math.nan
        self.best: tuple[float, dict[str, torch.Tensor] | None] = (-math.inf, None)

    def train_epoch(self) -> None:
        self.model.train()
        x, y = self.data.train_x, self.data.train_y
        order = self.rng.permutation(len(x))
        for start in range(0, len(x), BATCH):
            rows = order[start : start + BATCH]
            images = _normalize(torch.from_numpy(_shift(x[rows], self.rng)))
            loss = self.loss(self.model(images), {"target": torch.from_numpy(y[rows])})
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if math.isnan(self.first_step_at):
                self.first_step_at = time.time()
            self.opt.step()
            self.sched.step()

    def score(self, split: str, state: dict[str, torch.Tensor] | None = None) -> float:
        """mAP on ``val`` of the model (the best epoch's weights are kept) or on ``test`` of
        ``state``'s weights."""
        if state is not None:
            model = build_model("small_cnn", self.data.num_classes)
            model.load_state_dict(state)
            return self._map(model, split)
        value = self._map(self.model, split)
        if split == "val" and value > self.best[0]:
            self.best = (value, {k: v.clone() for k, v in self.model.state_dict().items()})
        return value

    def _map(self, model: torch.nn.Module, split: str) -> float:
        x, y = getattr(self.data, f"{split}_x"), getattr(self.data, f"{split}_y")
        model.eval()
        with torch.no_grad():
            scores = torch.cat([model(_normalize(torch.from_numpy(x[i : i + EVAL_BATCH])))
                                for i in range(0, len(x), EVAL_BATCH)]).numpy()
        return evaluate(scores, y)["mAP"]


def _lr(step: int, total: int) -> float:
    """Linear warm-up from 4% over WARMUP_FRAC of the ``total`` steps, then cosine to 0."""
    warm = WARMUP_FRAC * total
    if step < warm:
        return 0.04 + 0.96 * step / warm
    return 0.5 * (1.0 + math.cos(math.pi * min((step - warm) / (total - warm), 1.0)))


def _shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zero-padded random translation by up to S/12 pixels (the digits' augmentation)."""
    n, size = len(images), images.shape[-1]
    pad = max(1, size // 12)
    padded = np.zeros((n, 3, size + 2 * pad, size + 2 * pad), dtype=np.uint8)
    padded[:, :, pad : pad + size, pad : pad + size] = images
    out = np.empty_like(images)
    for i, (dy, dx) in enumerate(rng.integers(0, 2 * pad + 1, size=(n, 2))):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


def _normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0 - 0.5) / 0.25
