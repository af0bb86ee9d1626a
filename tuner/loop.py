"""The one training loop, used by every method. Plain PyTorch: no Ray import here.

Per epoch: ``method.on_epoch_start`` -> for each batch ``method.training_step`` (loss and
logits), a guarded optimizer step, the LR schedule, the EMA update and
``method.on_batch_end`` -> ``method.on_epoch_end`` -> validation of the regular (and EMA)
model -> ``report(metrics, state)``. ``state`` holds everything needed to continue exactly:
model, optimizer, schedule, grad scaler, EMA, RNG states, the method's own state and the best
weights so far (chosen on validation mAP only).

The learning-rate schedule (:func:`lr_factor`) is a pure function of the step: ``cosine``
is defined on the whole budget ``max_epochs``; ``constant`` and ``rsqrt`` with a warm-up in
epochs (``warmup_epochs``) train an epoch the same whatever the budget, which is what lets an
early ASHA rung rank trials as their full runs do (``docs/search.md``).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from methods.base import Method, MethodParams, hp
from tuner.backbones import BACKBONES
from tuner.data.stream import normalize
from tuner.errors import NonFiniteLossError
from tuner.metrics import evaluate as score_metrics

Reporter = Callable[[dict[str, Any], dict[str, Any]], None]

#: learning-rate shapes after the warm-up (:func:`lr_factor`); only ``cosine`` needs the budget
SCHEDULES = ("cosine", "constant", "rsqrt")


@dataclass(frozen=True)
class TrainConfig(MethodParams):
    """Training hyperparameters shared by every method (all visible to the tuner)."""

    backbone: str = hp("small_cnn", choices=BACKBONES, doc="network")
    weights: str | None = hp(None, doc="local file of pretrained trunk weights (no downloads)")
    image_size: int = hp(24, 16, 1024, doc="input side in pixels (DigitsMLT's is 24)")
    batch_size: int = hp(32, 1, 4096)
    optimizer: str = hp("adamw", choices=("adamw", "adam", "sgd"))
    lr: float = hp(5e-3, 0.0, 10.0, low_open=True, doc="peak learning rate")
    weight_decay: float = hp(1e-4, 0.0, 1.0, doc="decoupled; not applied to biases and norms")
    momentum: float = hp(0.9, 0.0, 1.0, high_open=True, doc="SGD momentum")
    schedule: str = hp("cosine", choices=SCHEDULES,
                       doc="after warm-up: cosine to 0 at max_epochs | constant | rsqrt")
    warmup_frac: float = hp(0.1, 0.0, 0.9, doc="share of all steps with linear warm-up")
    warmup_epochs: float = hp(0.0, 0.0, 1e4, doc="warm-up length in epochs, whatever the "
                              "budget; 0 = warmup_frac of the budget")
    ema_decay: float = hp(0.0, 0.0, 1.0, high_open=True, doc="model EMA decay; 0 = off")
    ema_epochs: float = hp(0.0, 0.0, 1e4, doc="model EMA horizon in epochs (decay 1 - 1 / "
                           "(ema_epochs x steps per epoch)); 0 = ema_decay decides")
    amp: bool = hp(False, choices=(False, True), doc="bfloat16 autocast on GPU")
    channels_last: bool = hp(False, choices=(False, True),
                             doc="NHWC memory format for model and images (faster convs on GPU)")
    grad_clip: float = hp(0.0, 0.0, 1e6, doc="max grad norm; 0 = off")
    max_epochs: int = hp(6, 1, 10000, doc="epoch budget; the cosine schedule ends on it")
    seed: int = hp(0, 0, 2**31 - 1)
    eval_batch_size: int = hp(256, 1, 65536)
    threshold: float = hp(0.5, 0.0, 1.0, low_open=True, high_open=True, doc="F1 threshold")


@dataclass
class TrainData:
    """What the loop trains and validates on.

    Attributes:
        train_batches: ``(epoch, weights, **sampling) -> iterable`` of ``{"image": uint8
            (B,3,S,S), "index": (B,)}``. ``weights`` is None (each image once, shuffled) or
            ``(N,)`` sampling weights: the epoch then draws N images (``draws=K``: K images)
            with replacement in proportion. ``views={name: (N,) weights}`` (only passed when
            a method asks for views) adds ``<name>_image`` / ``<name>_index`` rows of those
            dataset-level samplers to every batch (:func:`tuner.data.stream.iter_train_batches`).
        train_targets: ``(N, C)`` float observed training labels, row = ``index``.
        steps_per_epoch: optimizer steps per epoch (for the schedule).
        val_images: ``(M, 3, S, S)`` uint8 validation images.
        val_targets: ``(M, C)`` 0/1 true validation labels.
        groups: head / medium / tail class indices for the group mAPs.
        stats_targets: ``(N, C)`` labels for methods' per-image statistics
            (``Method.set_stats_targets``); None = the observed ``train_targets``.
        val_ignore: ``(M, C)`` bool "ignore" state of validation label entries (VOC07
            difficult objects), left out of AP and F1; None = none.
    """

    train_batches: Callable[[int, np.ndarray | None], Iterable[Mapping[str, Tensor]]]
    train_targets: Tensor
    steps_per_epoch: int
    val_images: Tensor
    val_targets: np.ndarray
    groups: Mapping[str, list[int]] = field(default_factory=dict)
    stats_targets: Tensor | None = None
    val_ignore: np.ndarray | None = None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (model initialisation, methods)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deterministic_torch(enabled: bool = True) -> None:
    """Make torch pick deterministic algorithms in this process (or allow any again).

    On CPU every op used by the shipped methods has a deterministic kernel. On GPU cuBLAS
    needs ``CUBLAS_WORKSPACE_CONFIG`` (set here unless already set; it is read when the
    first cuBLAS handle is created) and cuDNN's autotuner is off; an op without a
    deterministic CUDA kernel warns instead of failing the trial (``warn_only``).

    torch's debugging aid of filling every new ``torch.empty`` tensor with NaN under
    deterministic algorithms (``torch.utils.deterministic.fill_uninitialized_memory``) is
    turned off: the docs say a program that never reads uninitialised memory stays
    deterministic without it, and it was the whole 5% cost of determinism per epoch (a
    ``small_cnn`` step on CPU: 4.11 s per 150 steps with the fill, 3.90 s without, 3.90 s with
    no deterministic algorithms at all). ``tests/test_determinism.py`` checks that trials still
    repeat to the bit, 1 and 2 workers, and after a resume.
    """
    import os

    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = not enabled
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, lr_scale: Callable[[str], float] | None = None
) -> torch.optim.Optimizer:
    """Optimizer with weight decay on weights only (not biases or normalisation).

    ``lr_scale(name)`` gives each parameter's learning-rate multiplier (default 1); each group
    keeps its ``lr_scale`` so the schedule multiplies ``cfg.lr * lr_scale``.
    """
    groups_by_key: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = float(lr_scale(name)) if lr_scale is not None else 1.0
            groups_by_key.setdefault((scale, param.ndim > 1), []).append(param)
    groups = [
        {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
         "lr": cfg.lr * scale, "lr_scale": scale}
        for (scale, decay), params in sorted(groups_by_key.items(), key=lambda kv: (-kv[0][1], kv[0][0]))
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def warmup_steps(total: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Warm-up length in steps: ``warmup_epochs`` epochs when set, else ``warmup_frac`` of
    the budget. Epochs make it the same in a short rung and a long run (rungs that rank)."""
    if cfg.warmup_epochs > 0:
        return cfg.warmup_epochs * max(steps_per_epoch, 1)
    return cfg.warmup_frac * total


def lr_factor(step: int, total: int, cfg: TrainConfig, steps_per_epoch: int = 1) -> float:
    """Multiplier of the peak LR after ``step`` optimizer steps of ``total``.

    Linear warm-up from 4% over ``W`` steps (:func:`warmup_steps`), then, ``t = step - W``:

    * ``cosine``: ``0.5 (1 + cos(pi t / (total - W)))``, to 0 at the end of the budget; an
      early epoch then runs at a learning rate that depends on ``max_epochs``;
    * ``constant``: 1;
    * ``rsqrt``: ``1 / sqrt(1 + t / steps_per_epoch)``, a decay in epochs that knows no budget
      (0.71 one epoch after the warm-up, 0.5 after three).

    Only ``cosine`` reads ``total``: with the other two an epoch trains the same whatever
    the budget, so a trial at ASHA's first rung is the start of the full run's trajectory.
    """
    warm = warmup_steps(total, steps_per_epoch, cfg)
    if step < warm:
        return 0.04 + 0.96 * step / warm
    since = step - warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "rsqrt":
        return 1.0 / math.sqrt(1.0 + since / max(steps_per_epoch, 1))
    rest = min(since / max(total - warm, 1e-8), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * rest))


def ema_decay_for(cfg: TrainConfig, steps_per_epoch: int) -> float:
    """The EMA's decay: from its horizon in epochs (``ema_epochs``) when set, else
    ``ema_decay``. A horizon in epochs keeps the average as short at 14 steps an epoch as at
    600, so the averaged model at an early rung is not mostly its initial weights."""
    if cfg.ema_epochs > 0:
        return max(0.0, 1.0 - 1.0 / (cfg.ema_epochs * max(steps_per_epoch, 1)))
    return cfg.ema_decay


class ModelEma:
    """Exponential moving average of a model's weights, with the usual early warm-up."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                ema_state[name].mul_(d).add_(value.detach(), alpha=1 - d)
            else:
                ema_state[name].copy_(value)


def _to_device(images: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """uint8 ``(B, 3, S, S)`` images as normalized floats on ``device`` (NHWC if asked)."""
    out = normalize(images.to(device, non_blocking=True))
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


@torch.no_grad()
def predict(
    method: Method, model: nn.Module, images: Tensor, batch_size: int, device: torch.device,
    channels_last: bool = False,
) -> np.ndarray:
    """``(N, C)`` float scores of ``method.predict`` over uint8 images, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = _to_device(images[start : start + batch_size], device, channels_last)
        out.append(method.predict(model, batch).float().cpu())
    model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()


def evaluate(
    method: Method,
    model: nn.Module,
    images: Tensor,
    targets: np.ndarray,
    groups: Mapping[str, list[int]],
    cfg: TrainConfig,
    device: torch.device,
    ignore: np.ndarray | None = None,
) -> dict[str, float]:
    """Platform metrics (mAP, group mAPs, CF1/OF1) of ``model`` on one split, plus the
    method's ``extra_metrics`` (e.g. TailCLIP's softmax mAP, for comparison with a paper).
    ``ignore``: label entries in the "ignore" state, left out of AP and F1."""
    scores = predict(method, model, images, cfg.eval_batch_size, device, cfg.channels_last)
    metrics = score_metrics(scores, targets, groups, threshold=cfg.threshold, ignore=ignore)
    metrics.update(method.extra_metrics(scores, targets, groups))
    return metrics


class _Step:
    """One guarded optimisation step (autocast, finite check, clipping, schedule, EMA)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        total_steps: int,
        device: torch.device,
        lr_scale: Callable[[str], float] | None = None,
        grad_sync: Callable[[nn.Module], None] | None = None,
        steps_per_epoch: int = 1,
    ):
        self.model, self.cfg, self.total, self.device = model, cfg, total_steps, device
        self.grad_sync = grad_sync
        self.optimizer = build_optimizer(model, cfg, lr_scale)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, cfg, steps_per_epoch)
        )
        decay = ema_decay_for(cfg, steps_per_epoch)
        self.ema = ModelEma(model, decay) if decay > 0 else None
        self.amp = cfg.amp and device.type == "cuda"

    def __call__(self, method: Method, batch: dict[str, Tensor], where: str) -> dict[str, Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = method.training_step(self.model, batch)
        loss = out["loss"]
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"{method.name}: training loss became {loss.item()} at {where}; "
                f"lower the learning rate or check the method's hyperparameters"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(self.model)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.module.state_dict(),
            "ema_updates": 0 if self.ema is None else self.ema.updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
            self.ema.updates = int(state["ema_updates"])


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def fit(
    method: Method,
    model: nn.Module,
    cfg: TrainConfig,
    data: TrainData,
    report: Reporter,
    resume: Mapping[str, Any] | None = None,
    device: torch.device | None = None,
    dist: Any | None = None,
    started_at: float | None = None,
    deterministic: bool = True,
) -> dict[str, Any]:
    """Train for ``cfg.max_epochs`` epochs (or until the reporter stops the process).

    Args:
        method: the method plug-in (loss, hooks, state).
        model: a :class:`~tuner.backbones.Classifier`.
        cfg: training hyperparameters.
        data: training stream, label table and validation split.
        report: called after every epoch with the metrics (``epoch`` counts completed
            epochs, from 1) and the full state to checkpoint.
        resume: a state previously passed to ``report``; training continues after it.
        device: where to train (default: CUDA when available).
        dist: a :class:`tuner.distributed.TorchDist` when several data-parallel workers train
            this trial (gradients are averaged after every backward pass and the method gets
            it as ``method.dist``); None for one worker.
        started_at: ``time.time()`` when the trial (or its relaunch) started; every report then
            carries ``startup_time``, the seconds from then to the first training step.
        deterministic: run torch with deterministic algorithms (:func:`deterministic_torch`).
            With batches that depend only on ``(cfg.seed, epoch)`` (the trials' stream), a
            run's metrics then depend only on its configuration and ``cfg.seed``.

    Returns:
        The last state (with ``best`` holding the best validation metrics and weights).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    deterministic_torch(deterministic)
    seed_everything(cfg.seed)
    targets = data.train_targets.float()
    if dist is not None:
        method.dist = dist
    method.set_train_targets(targets)
    stats = data.stats_targets
    method.set_stats_targets(targets if stats is None else stats.float())
    draws = method.epoch_draws() if method.sample_weights(0) is not None else None
    steps_per_epoch = data.steps_per_epoch
    if draws is not None:  # a method's own epoch length (e.g. DBL's class-aware epoch):
        # ceil(draws / global batch), the global batch as the trainable splits it
        world = 1 if dist is None else int(getattr(dist, "world_size", 1))
        per_worker = max(1, math.ceil(cfg.batch_size / world))
        steps_per_epoch = max(1, math.ceil(int(draws) / (per_worker * world)))
    model = method.configure_model(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if dist is not None:
        dist.broadcast_module(model)
    step = _Step(
        model, cfg, cfg.max_epochs * steps_per_epoch, device, lr_scale=method.lr_scale,
        grad_sync=None if dist is None else dist.average_gradients,
        steps_per_epoch=steps_per_epoch,
    )
    start_epoch, best = 0, {"val_mAP": -math.inf, "epoch": 0, "model": None, "metrics": {}}
    if resume is not None:
        model.load_state_dict(resume["model"])
        step.load_state_dict(resume["step"])
        method.load_state_dict(resume["method"])
        _set_rng_state(resume["rng"])
        start_epoch, best = int(resume["epoch"]), dict(resume["best"])
    method.on_fit_start(model)
    state: dict[str, Any] = {}
    first_step = math.nan
    for epoch in range(start_epoch, cfg.max_epochs):
        metrics = _train_epoch(method, model, step, data, targets, epoch, device, dist, draws)
        if started_at is not None:
            first_step = first_step if epoch > start_epoch else metrics.pop("first_step_at")
            metrics["startup_time"] = max(0.0, first_step - started_at)
        metrics.pop("first_step_at", None)
        if dist is not None:  # BatchNorm statistics differ per shard: use rank 0's, like DDP
            dist.broadcast_buffers(model)
            if step.ema is not None:
                dist.broadcast_buffers(step.ema.module)
        t0 = time.perf_counter()
        val, used = _validate(method, model, step, data, cfg, device)
        metrics.update({f"val_{k}": v for k, v in val.items()}, eval_time=time.perf_counter() - t0)
        if val["mAP"] > best["val_mAP"]:
            weights = step.ema.module if used == "ema" else model
            best = {"val_mAP": val["mAP"], "epoch": epoch + 1, "model": _cpu_state(weights),
                    "method": copy.deepcopy(method.state_dict()), "metrics": dict(metrics)}
        metrics.update(epoch=epoch + 1, best_val_mAP=best["val_mAP"], best_epoch=best["epoch"],
                       val_model=used, peak_rss_mb=peak_rss_mb())
        state = {
            "epoch": epoch + 1,
            "model": _cpu_state(model),
            "step": step.state_dict(),
            "method": method.state_dict(),
            "rng": _rng_state(),
            "best": best,
        }
        report(metrics, state)
    return state


def _train_epoch(
    method: Method,
    model: nn.Module,
    step: _Step,
    data: TrainData,
    targets: Tensor,
    epoch: int,
    device: torch.device,
    dist: Any | None = None,
    draws: int | None = None,
) -> dict[str, Any]:
    """One epoch of training steps.

    With several workers, every step first checks that all workers still have a batch
    (one tiny all-reduce); the epoch ends for all when one runs out, so a worker whose shard
    is a batch short (or a re-weighted epoch with uneven shards) cannot leave the others
    waiting forever in a gradient all-reduce. The leftover batches are drained and dropped.
    """
    model.train()
    method.on_epoch_start(epoch)
    weights = method.sample_weights(epoch)
    sampling: dict[str, Any] = {}
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float64).cpu().numpy()
        if draws is not None:
            sampling["draws"] = int(draws)
    views = method.view_weights(epoch)
    if views:
        sampling["views"] = {name: torch.as_tensor(w, dtype=torch.float64).cpu().numpy()
                             for name, w in views.items()}
    t0 = time.perf_counter()
    wait, total_loss, seen, n = 0.0, 0.0, 0, 0
    first_step_at = math.nan
    t_wait = time.perf_counter()
    batches = iter(data.train_batches(epoch, weights, **sampling))
    while True:
        raw = next(batches, None)
        if dist is not None and not dist.all_have(raw is not None):
            for _ in batches:  # drain: the stream finishes its epoch on every worker
                pass
            break
        if raw is None:
            break
        if n == 0:
            first_step_at = time.time()
        wait += time.perf_counter() - t_wait
        index = raw["index"].long()
        batch = {
            "image": _to_device(raw["image"], device, step.cfg.channels_last),
            "target": targets[index].to(device, non_blocking=True),
            "index": index.to(device),
        }
        for name in sampling.get("views", {}):
            v_index = raw[f"{name}_index"].long()
            batch[f"{name}_image"] = _to_device(raw[f"{name}_image"], device,
                                                step.cfg.channels_last)
            batch[f"{name}_target"] = targets[v_index].to(device, non_blocking=True)
            batch[f"{name}_index"] = v_index.to(device)
        out = step(method, batch, where=f"epoch {epoch + 1}, step {n + 1}")
        method.on_batch_end(batch, out)
        total_loss += float(out["loss"].detach()) * len(index)
        seen += len(index)
        n += 1
        t_wait = time.perf_counter()
    method.on_epoch_end(epoch)
    return {
        **{f"method_{k}": float(v) for k, v in method.epoch_metrics().items()},
        "first_step_at": first_step_at,
        "train_loss": total_loss / max(seen, 1),
        "train_images": seen,
        "train_time": time.perf_counter() - t0,
        "data_wait_time": wait,
        "lr": step.optimizer.param_groups[0]["lr"],
    }


def _validate(
    method: Method, model: nn.Module, step: _Step, data: TrainData, cfg: TrainConfig,
    device: torch.device,
) -> tuple[dict[str, float], str]:
    """Validation metrics of the regular model, or of the EMA model when it scores higher."""
    val = evaluate(method, model, data.val_images, data.val_targets, data.groups, cfg, device,
                   data.val_ignore)
    if step.ema is None:
        return val, "model"
    ema_val = evaluate(
        method, step.ema.module, data.val_images, data.val_targets, data.groups, cfg, device,
        data.val_ignore,
    )
    return (ema_val, "ema") if ema_val["mAP"] > val["mAP"] else (val, "model")
