r"""TailCLIP (Timmermann et al., 2024; released as damilab/lm-clip): CLIP fine-tuning for
long-tailed multi-label classification with a contrastive loss plus a balanced asymmetric loss.

The method replaces the platform backbone with a CLIP model (:mod:`tuner.clip`, built in
:meth:`TailCLIP.configure_model` from ``clip_arch`` / ``clip_weights``; the backbone the loop
passes in is ignored). Class logits are cosine similarities to class-prompt embeddings, scaled
by CLIP's learnable temperature; the text tower also encodes one caption per image for the
contrastive term; images are drawn by a class-occurrence weighted sampler.

Sampling with Ray Data: :meth:`TailCLIP.sample_weights` returns the per-image weights
:math:`\omega_i`. The loop hands them to the trial's stream, which draws one epoch of N images
with replacement in proportion to them (``tuner.data.stream.sample_repeats``: a seeded
multinomial over the N rows, i.e. the released ``WeightedRandomSampler(w, N,
replacement=True)``) and repeats each streamed row that many times (0 = skipped) before the
local shuffle buffer, so the Parquet shards are still read once per epoch.

Multi-worker trials: gradients are averaged by the loop; each worker's InfoNCE uses only its
own batch as negatives (no cross-worker gather of embeddings); class-prompt embeddings are
computed from the (identical) weights on every worker, so they agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import Batch, Method, MethodParams, TaskInfo, hp
from methods.registry import register_method
from tuner.clip import ARCHS, ClipBackbone
from tuner.errors import ConfigError, DataError

__all__ = [
    "TailCLIP",
    "TailCLIPParams",
    "balanced_asymmetric_elementwise",
    "class_weights",
    "contrastive_loss",
    "max_normalise",
    "occurrence_sample_weights",
    "softmax_map",
]

_EPS = 1e-8  # clamp of the release's logs (and of the focal base, see the class docstring)
_MAX_EPS = 1e-6  # smallest accepted maximum of the max-normalisation


@dataclass(frozen=True)
class TailCLIPParams(MethodParams):
    """Hyperparameters of :class:`TailCLIP` (defaults: the TailCLIP VOC config, tiny CPU CLIP,
    label-derived captions).

    Differences of the defaults from the TailCLIP VOC config, each with its reason: captions
    are label-derived (``captions: labels``, the LM-CLIP configs' choice) because the TailCLIP
    configs' machine-generated LMPT captions exist only as a file of COCO-MLT / VOC-MLT
    (``captions: file`` with ``caption_file``, e.g. a prepared benchmark's
    ``labels/captions.parquet``, gives the paper's setting there); the architecture is the
    tiny CPU CLIP (the paper's RN50 / ViT-B/16 need weights files).

    ``sample_power`` None ties the sampler's power to ``class_power`` (the release uses one
    ``s`` for both). Use ``clip_arch`` RN50 / ViT-B-16 with ``clip_weights`` (OpenAI's files,
    ``clip_quick_gelu`` True) for real use; the tiny default trains from scratch on CPU.
    """

    lambda_bal: float = hp(6.0, 0.0, 100.0, doc="lambda: weight of the balanced loss (asl_mul)")
    class_power: float = hp(1.25, 0.0, 4.0, doc="s: power of the class weights (N/n_c)^s")
    sample_power: float | None = hp(
        None, doc="power of the image sampling weights; None = class_power (tied)"
    )
    weighted_sampling: bool = hp(
        True, choices=(True, False), doc="class-occurrence weighted sampling; False = each once"
    )
    class_weighting: bool = hp(
        True, choices=(True, False), doc="(1 + w_c) factor on positive terms; False = factor 1"
    )
    gamma_neg: float = hp(4.0, 0.0, 10.0, doc="focusing exponent on negatives (gamma-)")
    gamma_pos: float = hp(0.0, 0.0, 10.0, doc="focusing exponent on positives (gamma+)")
    clip: float = hp(0.05, 0.0, 0.5, doc="probability margin added to negatives' 1 - p")
    label_smoothing: float = hp(
        0.1, 0.0, 1.0, high_open=True, doc="epsilon of the smoothed targets (1-eps) y + eps/C"
    )
    prompt: str = hp("a photo of a ", doc="text before a class name (prompts and captions)")
    captions: str = hp(
        "labels", choices=("labels", "file"),
        doc="captions: label-derived (prompt + comma-joined names) or caption_file",
    )
    caption_file: str | None = hp(
        None, doc="CSV/Parquet of index (or image_id), caption: e.g. labels/captions.parquet"
    )
    clip_arch: str = hp("tiny", choices=ARCHS, doc="CLIP architecture (tiny = CPU config)")
    clip_weights: str | None = hp(
        None, doc="local CLIP weights file; None = random initialisation (warned)"
    )
    clip_image_size: int = hp(
        0, 0, 1024, doc="image side of the CLIP image tower; 0 = the architecture's"
    )
    clip_quick_gelu: bool = hp(
        True, choices=(True, False), doc="QuickGELU as in OpenAI's weights (False: LAION's)"
    )

    def cross_field_problems(self) -> list[str]:
        out = []
        sp = self.sample_power
        if sp is not None and (isinstance(sp, bool) or not isinstance(sp, (int, float))
                               or not math.isfinite(sp) or not 0.0 <= sp <= 4.0):
            out.append(f"sample_power must be None or a number in [0, 4], got "
                       f"sample_power={sp!r}")
        for name in ("prompt", "caption_file", "clip_weights"):
            value = getattr(self, name)
            if not (value is None and name != "prompt") and not isinstance(value, str):
                out.append(f"{name} must be a string, got {name}={value!r}")
        if self.captions == "file" and not self.caption_file:
            out.append("captions='file' needs caption_file (a CSV/Parquet of index, caption); "
                       "or set captions='labels'")
        size = self.clip_image_size
        if isinstance(size, bool) or (isinstance(size, float) and not size.is_integer()):
            out.append(f"clip_image_size must be an integer, got "
                       f"clip_image_size={self.clip_image_size!r}")
        return out


# ----------------------------------------------------------------------------- losses
def max_normalise(logits: Tensor) -> Tensor:
    r"""``logits / m`` with :math:`m` the maximum over the whole ``(B, C)`` matrix, guarded.

    :math:`m = \max z` as released when it is at least ``1e-6``; otherwise (the release would
    flip signs or divide by ~0) :math:`m = \max(\max |z|, 10^{-6})`. ``m`` keeps its gradient,
    as released.
    """
    top = logits.max()
    guard = logits.abs().max().clamp(min=_MAX_EPS)
    return logits / torch.where(top >= _MAX_EPS, top, guard)


def balanced_asymmetric_elementwise(
    logits: Tensor,
    target: Tensor,
    pos_weight: Tensor | None,
    gamma_pos: float,
    gamma_neg: float,
    clip: float,
    label_smoothing: float,
) -> Tensor:
    r"""``(B, C)`` balanced asymmetric loss (the release's ``BalancedAsymmetricLossOptimized``).

    With :math:`\tilde x = z / \max z` (:func:`max_normalise`), :math:`p = \sigma(\tilde x)`,
    :math:`\tilde y = (1 - \varepsilon) y + \varepsilon / C`,
    :math:`p^- = \min(1, 1 - p + \text{clip})` and :math:`w_c` = ``pos_weight`` (0 if None):

    .. math:: \ell = -\left[(1 + w_c)\,\tilde y \log p + (1 - y) \log p^-\right]
              \left(1 - p \tilde y - p^- (1 - y)\right)^{\gamma_+ \tilde y + \gamma_- (1 - y)}

    The focal weight keeps its gradient, as released. ``log p`` is ``logsigmoid`` (the
    release's ``log(clamp(p, 1e-8))`` is the same here, since :math:`|\tilde x| \le 1` makes
    ``p`` >= 0.27 in the normal case). Difference (a latent bug of the release): with label
    smoothing a negative whose :math:`p^- = 1` has a *negative* focal base
    :math:`-p\varepsilon/C`, which gives NaN for any non-integer exponent; the base is clamped
    at ``1e-8`` (the release's integer ``gamma_neg = 4`` makes that term ~1e-14 anyway).

    Args:
        logits: ``(B, C)`` scaled cosine logits :math:`z`.
        target: ``(B, C)`` 0/1 labels (anti-targets use the raw labels).
        pos_weight: ``(C,)`` class weights :math:`w_c \in (0, 1]`, or None.
    """
    num_classes = logits.shape[1]
    y = target.to(logits)
    y_smooth = (1.0 - label_smoothing) * y + label_smoothing / num_classes
    x = max_normalise(logits)
    p = torch.sigmoid(x)
    p_neg = (1.0 - p + clip).clamp(max=1.0)
    log_neg = F.logsigmoid(-x) if clip == 0 else torch.log(p_neg.clamp(min=_EPS))
    pos = y_smooth * F.logsigmoid(x)
    if pos_weight is not None:
        pos = pos * (1.0 + pos_weight.to(logits))
    base = (1.0 - p * y_smooth - p_neg * (1.0 - y)).clamp(min=_EPS)
    focal = base.pow(gamma_pos * y_smooth + gamma_neg * (1.0 - y))
    return -(pos + (1.0 - y) * log_neg) * focal


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, scale: Tensor | float) -> Tensor:
    r"""Symmetric InfoNCE of ``(B, D)`` unit image and caption embeddings (CLIP's loss).

    With :math:`S = \exp(t)\, V U^\top`,
    :math:`L = \tfrac12 [\mathrm{CE}(S, I) + \mathrm{CE}(S^\top, I)]`, each cross-entropy a mean
    over the batch with the matching pair on the diagonal. Identical captions in a batch stay
    negatives, as released.
    """
    logits = scale * image_emb @ text_emb.T
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _inverse_frequency(counts: Sequence[int] | Tensor, num_train: int) -> Tensor:
    """``(C,)`` float64 :math:`N / n_c`, with a never-observed class counted once (no 1/0)."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1.0)
    return float(num_train) / n


def class_weights(counts: Sequence[int] | Tensor, num_train: int, power: float) -> Tensor:
    r"""``(C,)`` :math:`w_c = (N/n_c)^s / \max_{c'} (N/n_{c'})^s \in (0, 1]` (float32)."""
    w = _inverse_frequency(counts, num_train) ** power
    return (w / w.max()).float()


def occurrence_sample_weights(
    targets: Tensor, counts: Sequence[int] | Tensor, num_train: int, power: float
) -> Tensor:
    r"""``(N,)`` :math:`\omega_i = (\sum_{c \in y_i} N/n_c)^s`, divided by its maximum.

    An image without observed positives gets weight 0 (it is never drawn), as released.
    """
    inv = _inverse_frequency(counts, num_train)
    w = ((targets.double() > 0.5).double() @ inv) ** power
    w = torch.where(targets.double().sum(1) > 0, w, torch.zeros_like(w))
    return w / w.max().clamp(min=torch.finfo(torch.float64).tiny)


def softmax_map(
    scores: np.ndarray | Tensor, targets: np.ndarray | Tensor,
    groups: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, float]:
    """The release's mAP: AP on the *softmax over classes* of the logits (paper comparison).

    Returns ``mAP_softmax`` and ``mAP_softmax_<group>`` (percent). Not the platform metric:
    the softmax changes each class's ranking across images (METHODS.md 5f).
    """
    from tuner.metrics import mean_ap

    probs = torch.softmax(torch.as_tensor(np.asarray(scores), dtype=torch.float64), dim=1)
    out = mean_ap(probs.numpy(), np.asarray(targets), groups)
    return {k.replace("mAP", "mAP_softmax", 1): v for k, v in out.items()}


def _read_caption_file(path: str, num_train: int) -> list[str | None]:
    """Captions of the training rows ``0..N-1`` from a CSV or Parquet file.

    Columns ``index, caption`` (row of the training label table), or ``image_id, caption``
    (a prepared benchmark's ``labels/captions.parquet``): rows are then taken in image-id
    order, the order of the training label table. Empty captions come back as None.
    """
    import pandas as pd

    from tuner.clip import resolve_weights_path

    try:
        file = resolve_weights_path(path)
    except ConfigError:
        raise ConfigError(f"caption_file={path!r} is not a file; give a CSV/Parquet with "
                          f"columns index (or image_id), caption") from None
    frame = pd.read_parquet(file) if file.suffix == ".parquet" else pd.read_csv(file)
    if "caption" not in frame.columns or not {"index", "image_id"} & set(frame.columns):
        raise DataError(f"caption_file={path!r} needs columns index (or image_id), caption; "
                        f"found {list(frame.columns)}")
    if "index" in frame.columns:
        rows = frame["index"].astype(int).tolist()
    else:
        frame = frame.sort_values("image_id", kind="stable", key=lambda c: c.astype(str))
        rows = list(range(len(frame)))
    texts = [c if isinstance(c, str) and c.strip() else None for c in frame["caption"]]
    table = dict(zip(rows, texts))
    missing = [i for i in range(num_train) if i not in table]
    if missing or len(frame) != len(table) or max(table, default=-1) >= num_train:
        raise DataError(f"caption_file={path!r} does not match the {num_train} training rows "
                        f"({len(missing)} missing, {len(frame)} rows in the file); "
                        f"use the benchmark's own caption file")
    return [table[i] for i in range(num_train)]


# ----------------------------------------------------------------------------- method
@register_method
class TailCLIP(Method):
    r"""TailCLIP: :math:`L = L_{CLIP} + \lambda\, L_{BAL}` on a CLIP backbone.

    * Class logits :math:`z_{ic} = \exp(t) \langle v_i, e_c \rangle` with :math:`v_i` the unit
      image embedding and :math:`e_c` the unit text embedding of ``prompt + class name``;
      :math:`\exp(t)` is CLIP's learnable scale (clamped at 100, as CLIP does). The class
      embeddings are recomputed without gradient at the first step of each epoch, as
      released, so :math:`L_{BAL}` trains the image tower only (and not :math:`t`, which the
      max-normalisation cancels).
    * :math:`L_{CLIP}`: :func:`contrastive_loss` between the images and their captions
      (label-derived: ``prompt`` + comma-joined observed class names; or ``caption_file``).
    * :math:`L_{BAL}`: :func:`balanced_asymmetric_elementwise` with class weights
      :func:`class_weights` (power ``class_power``), summed over classes and averaged over the
      batch. The release averages over batch *and* classes, so the total here is
      :math:`L_{CLIP} + (\lambda / C) \sum_c \bar\ell_c`, numerically the release's
      :math:`L_{CLIP} + \lambda\, \mathrm{mean}_{B \times C}(\ell)`: ``lambda_bal`` keeps the
      paper's scale (6 TailCLIP, 0.4 / 5 LM-CLIP).
    * Sampling: :func:`occurrence_sample_weights` (power ``sample_power``, default tied to
      ``class_power``), see the module docstring for the Ray Data realisation.
    * Evaluation scores are the raw logits :math:`z` (the platform's sigmoid / raw-score mAP);
      :meth:`extra_metrics` adds the release's softmax-over-classes mAP for comparison.
      F1 at sigmoid > 0.5 means :math:`z > 0`, which is not a calibrated threshold for CLIP.
    """

    name = "tailclip"
    Params = TailCLIPParams
    params: TailCLIPParams
    regimes = ("clean",)
    logit_loss = False

    def __init__(self, params: MethodParams, task: TaskInfo) -> None:
        super().__init__(params, task)
        if len(task.class_names) != task.num_classes:
            raise ConfigError(f"tailclip needs one class name per class for its prompts, got "
                              f"{len(task.class_names)} names for {task.num_classes} classes; "
                              f"use a benchmark whose manifest lists class names")
        self.pos_weight = class_weights(task.class_counts, task.num_train,
                                        self.params.class_power)
        self.targets: Tensor | None = None
        self.class_emb: Tensor | None = None  # (C, D) of the current epoch, no gradient
        self.class_emb_epoch = -1
        self._class_tokens: Tensor | None = None
        self._file_tokens: Tensor | None = None
        self._caption_cache: dict[tuple[int, ...], Tensor] = {}

    # ----------------------------------------------------------------- set-up
    @property
    def context_length(self) -> int:
        from tuner.clip import clip_config

        return int(clip_config(self.params.clip_arch)["text_cfg"]["context_length"])

    def configure_model(self, model: nn.Module) -> nn.Module:
        """A CLIP model built from ``clip_arch`` / ``clip_weights`` (``model`` is ignored)."""
        from tuner.clip import build_clip

        prm = self.params
        return build_clip(prm.clip_arch, prm.clip_weights, int(prm.clip_image_size),
                          prm.clip_quick_gelu)

    def set_train_targets(self, targets: Tensor) -> None:
        self.targets = targets.detach().float().cpu()
        if self.params.captions == "file":
            from tuner.clip import tokenize

            captions = _read_caption_file(str(self.params.caption_file), len(self.targets))
            fallback = [self.label_caption(row.nonzero().flatten().tolist())
                        for row in self.targets > 0.5]  # images without a caption
            texts = [c if c is not None else f for c, f in zip(captions, fallback)]
            self._file_tokens = tokenize(texts, self.context_length)

    def sample_weights(self, epoch: int) -> Tensor | None:
        if not self.params.weighted_sampling or self.targets is None:
            return None
        power = self.params.sample_power
        power = self.params.class_power if power is None else float(power)
        return occurrence_sample_weights(self.targets, self.task.class_counts,
                                         self.task.num_train, power)

    # ----------------------------------------------------------------- text
    def class_tokens(self) -> Tensor:
        """``(C, L)`` tokens of ``prompt + class name``."""
        if self._class_tokens is None:
            from tuner.clip import tokenize

            prompts = [self.params.prompt + name for name in self.task.class_names]
            self._class_tokens = tokenize(prompts, self.context_length)
        return self._class_tokens

    def label_caption(self, positives: Sequence[int]) -> str:
        """``prompt`` + the comma-joined names of the classes ``positives``."""
        return self.params.prompt + ", ".join(self.task.class_names[c] for c in positives)

    def caption_tokens(self, batch: Batch) -> Tensor:
        """``(B, L)`` caption tokens of the batch (label-derived or from the caption file)."""
        if self._file_tokens is not None:
            return self._file_tokens[batch["index"].cpu()]
        keys = [tuple(row.nonzero().flatten().tolist()) for row in batch["target"].cpu() > 0.5]
        new = sorted({k for k in keys if k not in self._caption_cache})
        if new:
            from tuner.clip import tokenize

            tokens = tokenize([self.label_caption(k) for k in new], self.context_length)
            self._caption_cache.update(zip(new, tokens))
        return torch.stack([self._caption_cache[k] for k in keys])

    def _epoch_class_embeddings(self, model: ClipBackbone, device: torch.device) -> Tensor:
        if self.class_emb is None or self.class_emb_epoch != self.current_epoch:
            with torch.no_grad():
                self.class_emb = model.encode_text(self.class_tokens().to(device)).float()
            self.class_emb_epoch = self.current_epoch
        return self.class_emb.to(device)

    # ----------------------------------------------------------------- per batch
    def balanced_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """:math:`L_{BAL}`: summed over classes, mean over the batch (scalar)."""
        prm = self.params
        elementwise = balanced_asymmetric_elementwise(
            logits, target, self.pos_weight if prm.class_weighting else None,
            prm.gamma_pos, prm.gamma_neg, prm.clip, prm.label_smoothing,
        )
        return elementwise.sum(dim=1).mean()

    def training_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        image = batch["image"]
        image_emb = model.encode_image(image)
        caption_emb = model.encode_text(self.caption_tokens(batch).to(image.device))
        scale = model.logit_scale()
        class_emb = self._epoch_class_embeddings(model, image.device)
        logits = (scale * image_emb @ class_emb.T.to(image_emb)).float()  # fp32 loss under AMP
        loss_clip = contrastive_loss(image_emb, caption_emb, scale)
        loss_bal = self.balanced_loss(logits, batch["target"])
        loss = loss_clip + self.params.lambda_bal / self.task.num_classes * loss_bal
        return {"loss": loss, "logits": logits, "loss_clip": loss_clip.detach(),
                "loss_bal": loss_bal.detach()}

    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        """Raw logits :math:`z` against the current class-prompt embeddings."""
        class_emb = model.encode_text(self.class_tokens().to(images.device))
        return model.logit_scale() * model.encode_image(images) @ class_emb.T

    def extra_metrics(
        self, scores: np.ndarray, targets: np.ndarray, groups: Mapping[str, Sequence[int]]
    ) -> dict[str, float]:
        """Extra evaluation fields: the release's softmax-over-classes mAP (paper parity)."""
        return softmax_map(scores, targets, groups)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "class_emb": None if self.class_emb is None else self.class_emb.detach().cpu(),
            "class_emb_epoch": self.class_emb_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.class_emb = state.get("class_emb")
        self.class_emb_epoch = int(state.get("class_emb_epoch", -1))
