"""The method plug-in interface: hyperparameters, loss, lifecycle hooks and declared state.

A method never iterates a data loader. The one training loop (:mod:`tuner.loop`) calls, per
epoch, ``on_epoch_start``; per batch, ``training_step`` (which by default runs the model and
calls ``loss``) and ``on_batch_end``; and ``on_epoch_end``. Anything a method keeps across
batches or epochs (confidence tables, moving means, priors) is returned by ``state_dict`` so the
loop can checkpoint it and a resumed trial continues exactly.

Batches are dicts of tensors:

* ``image``: ``(B, 3, H, W)`` float images;
* ``target``: ``(B, C)`` float 0/1 *observed* training labels (after corruption);
* ``index``: ``(B,)`` int64 row of each image in the training label table, which is sorted by
  image id (so per-sample state is keyed by image id, never by loader order).

Beyond the loss, a method may (all optional, defaults are no-ops):

* ``set_train_targets(targets)``: receive the full ``(N, C)`` observed label table once
  before training (to initialise per-sample tables such as confidences);
* ``set_stats_targets(targets)``: the ``(N, C)`` labels that per-image *statistics* (e.g. a
  class-aware sampler) are computed from: the observed labels, or the clean ones under the
  oracle setting ``data.class_stats: clean`` (called right after ``set_train_targets``);
* ``configure_model(model)``: return the module to train (the backbone itself, or a wrapper
  adding heads, memories, text encoders). The loop optimises, checkpoints, averages (EMA)
  and evaluates the returned module;
* ``lr_scale(param_name)``: a learning-rate multiplier per parameter of that module (e.g. a
  faster classifier);
* ``sample_weights(epoch)``: ``(N,)`` non-negative per-image weights; the epoch then draws N
  images (or ``epoch_draws()`` images) with replacement in proportion to them (class-aware /
  re-balanced samplers);
* ``epoch_draws()``: the number of weighted draws of an epoch (None = N; e.g. DBL's released
  class-aware epoch, ``floor(max_c n_c * C / 4)``); the epoch's optimizer steps follow it;
* ``view_weights(epoch)``: named extra dataset-level samplers, ``{name: (N,) weights}``; every
  batch then also carries ``<name>_image``, ``<name>_target`` and ``<name>_index``, up to B
  rows drawn over the whole epoch in proportion to that view's weights (COMIC's reversed
  and class-balanced views). The data layer fulfils these; it never knows the method;
* ``self.dist``: a :class:`Dist` set by the loop; with several data-parallel workers it
  all-reduces tensors and merges per-sample tables (each worker sees a shard of the images).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tuner.errors import ConfigError

Batch = dict[str, Tensor]

__all__ = [
    "Batch",
    "Dist",
    "Method",
    "MethodParams",
    "TaskInfo",
    "hp",
]


def hp(
    default: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    choices: Sequence[Any] | None = None,
    doc: str = "",
) -> Any:
    """Declare a hyperparameter field with its default and its valid range.

    Args:
        default: the default value (the paper's default where it has one).
        low: smallest valid value, inclusive unless ``low_open``.
        high: largest valid value, inclusive unless ``high_open``.
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.
        choices: the valid values, for categorical hyperparameters.
        doc: one line shown in error messages and docs.
    """
    meta = {
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "choices": tuple(choices) if choices is not None else None,
        "doc": doc,
    }
    return field(default=default, metadata=meta)


def _range_text(meta: Mapping[str, Any]) -> str:
    if meta.get("choices") is not None:
        return f"one of {list(meta['choices'])}"
    lo = "(" if meta["low_open"] else "["
    hi = ")" if meta["high_open"] else "]"
    low = "-inf" if meta["low"] is None else meta["low"]
    high = "inf" if meta["high"] is None else meta["high"]
    return f"in {lo}{low}, {high}{hi}"


def check_value(name: str, value: Any, meta: Mapping[str, Any]) -> str | None:
    """Return a one-line problem if ``value`` is outside the range in ``meta``, else None."""
    if meta.get("choices") is not None:
        if value not in meta["choices"]:
            return f"{name} must be {_range_text(meta)}, got {name}={value!r}"
        return None
    if meta.get("low") is None and meta.get("high") is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number {_range_text(meta)}, got {name}={value!r}"
    if not math.isfinite(value):
        return f"{name} must be finite, got {name}={value!r}"
    low, high = meta["low"], meta["high"]
    bad_low = low is not None and (value <= low if meta["low_open"] else value < low)
    bad_high = high is not None and (value >= high if meta["high_open"] else value > high)
    if bad_low or bad_high:
        return f"{name} must be {_range_text(meta)}, got {name}={value!r}"
    return None


@dataclass(frozen=True)
class MethodParams:
    """Base of every method's frozen hyperparameter dataclass.

    Subclasses declare fields with :func:`hp`; construction checks every field against its
    range and raises one :class:`~tuner.errors.ConfigError` listing all problems.
    """

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(f"{type(self).__qualname__}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """All range violations of this instance, plus ``cross_field_problems``."""
        out = []
        for f in dataclasses.fields(self):
            problem = check_value(f.name, getattr(self, f.name), f.metadata)
            if problem:
                out.append(problem)
        return out + self.cross_field_problems()

    def cross_field_problems(self) -> list[str]:
        """Constraints between fields (override); each problem is one line."""
        return []

    @classmethod
    def field_specs(cls) -> dict[str, Mapping[str, Any]]:
        """Name -> metadata (default, range, doc) of every hyperparameter."""
        return {
            f.name: {**f.metadata, "default": f.default} for f in dataclasses.fields(cls)
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MethodParams:
        """Build from a mapping, refusing unknown keys (all named at once)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__qualname__}: unknown hyperparameter(s) {unknown}; "
                f"valid ones are {sorted(known)}"
            )
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Dist:
    """Collective operations for method state; this base class is the single-process case.

    With several data-parallel workers (``tuner.distributed``), each worker trains on its own
    shard of the images, so a method must combine what it learned before using it globally:

    * ``all_reduce_sum(t)``: the element-wise sum of ``t`` over workers (batch statistics,
      counts, priors);
    * ``all_reduce_mean(t)``: the mean over workers;
    * ``merge_rows(table, touched)``: per-sample tables (confidences, corrected labels): each
      row takes the value written by the worker(s) that touched it this epoch (averaged if
      several did); untouched rows keep their value. ``touched`` is a ``(N,)`` bool mask.

    Every worker must call the same collectives in the same order.
    """

    world_size: int = 1
    rank: int = 0

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        return self.all_reduce_sum(tensor) / self.world_size

    def merge_rows(self, table: Tensor, touched: Tensor) -> Tensor:
        if self.world_size == 1:
            return table
        mask = touched.to(table.dtype).reshape(-1, *([1] * (table.ndim - 1)))
        total = self.all_reduce_sum(table * mask)
        count = self.all_reduce_sum(mask.expand_as(table).clone())
        return torch.where(count > 0, total / count.clamp_min(1), table)


@dataclass(frozen=True)
class TaskInfo:
    """What a method may know about the training task before it sees data.

    Attributes:
        num_classes: C.
        num_train: N, the number of training images (rows of the label table).
        class_counts: ``(C,)`` per-class positive counts of the *observed* training labels.
        max_epochs: the full epoch budget (schedules and ramps are defined on it, not on an
            ASHA rung).
        label_regime: ``"clean"``, ``"missing"`` or ``"candidate"``.
        groups: class indices of the ``head`` / ``medium`` / ``tail`` groups.
        class_names: the class names (prompts of vision-language methods).
    """

    num_classes: int
    num_train: int
    class_counts: tuple[int, ...]
    max_epochs: int
    label_regime: str = "clean"
    groups: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()

    def counts_tensor(self) -> Tensor:
        return torch.tensor(self.class_counts, dtype=torch.float32)


class Method:
    """A multi-label learning method: a loss plus optional hooks and state.

    Subclasses set ``name`` and ``Params`` and implement :meth:`loss` (or
    :meth:`training_step` when they need more than logits). Hooks default to no-ops.
    Losses use the platform-wide reduction: sum over classes, mean over the batch.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: label regimes the method is designed for (others still run, with a warning upstream)
    regimes: ClassVar[tuple[str, ...]] = ("clean", "missing", "candidate")
    #: True when ``loss(logits, batch)`` is the whole method (the contract tests then also
    #: check it on bare logits); methods needing features or extra heads set False
    logit_loss: ClassVar[bool] = True

    def __init__(self, params: MethodParams, task: TaskInfo) -> None:
        if not isinstance(params, self.Params):
            raise ConfigError(
                f"{self.name}: expected {self.Params.__qualname__}, got {type(params).__name__}"
            )
        self.params = params
        self.task = task
        self.current_epoch = 0
        self.dist: Dist = Dist()

    # ----------------------------------------------------------------- per batch
    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """Scalar training loss from ``(B, C)`` logits and the batch."""
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Forward one batch; returns at least ``loss`` (scalar) and ``logits`` (B, C)."""
        logits = model(batch["image"])
        return {"loss": self.loss(logits, batch), "logits": logits}

    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        """Scores ``(B, C)`` used for evaluation (raw logits by default)."""
        return model(images)

    def extra_metrics(
        self, scores: Any, targets: Any, groups: Mapping[str, Sequence[int]]
    ) -> dict[str, float]:
        """Method-specific evaluation fields added to the platform's metrics (default none).

        The platform's model selection always uses its own ``mAP``; these are for comparison
        with a paper's own evaluation.
        """
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        """Numbers reported with each epoch as ``method_<name>`` (timings, counts; default none)."""
        return {}

    # ----------------------------------------------------------------- set-up
    def set_train_targets(self, targets: Tensor) -> None:
        """The whole ``(N, C)`` observed training label table, once, before training."""

    def set_stats_targets(self, targets: Tensor) -> None:
        """``(N, C)`` labels for per-image statistics such as a class-aware sampler, once,
        after :meth:`set_train_targets`: the observed labels by default, the clean ones only
        under ``data.class_stats: clean`` (an oracle setting of some released code)."""

    def configure_model(self, model: nn.Module) -> nn.Module:
        """The module to train, checkpoint and evaluate (default: the backbone itself)."""
        return model

    def lr_scale(self, param_name: str) -> float:
        """Learning-rate multiplier of the configured module's parameter ``param_name``."""
        return 1.0

    def sample_weights(self, epoch: int) -> Tensor | None:
        """``(N,)`` per-image sampling weights for ``epoch`` (None = each image once)."""
        return None

    def epoch_draws(self) -> int | None:
        """Weighted draws per epoch when :meth:`sample_weights` is set (None = N images).

        Asked once, after :meth:`set_stats_targets`; the epoch's step count follows it.
        """
        return None

    def view_weights(self, epoch: int) -> Mapping[str, Tensor] | None:
        """Named dataset-level sampler views for ``epoch``: ``{name: (N,) weights}`` (None =
        none). Each view draws as many rows as the epoch's main rows, with replacement."""
        return None

    # ----------------------------------------------------------------- hooks
    def on_fit_start(self, model: nn.Module) -> None:
        """Called once before the first epoch (also after a resume)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch; ``epoch`` counts from 0. Subclasses call super()."""
        self.current_epoch = epoch

    def on_batch_end(self, batch: Batch, output: Mapping[str, Tensor]) -> None:
        """Called after each optimizer step with the batch and ``training_step``'s output."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called after each epoch's training steps, before validation."""

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything the method keeps across batches (tensors on CPU are fine)."""
        return {"current_epoch": self.current_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.current_epoch = int(state.get("current_epoch", 0))
