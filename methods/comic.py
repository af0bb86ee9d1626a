r"""COMIC (Zhang et al., ICCV 2023): Correction -> ModificatIon -> balanCe for PLT-MLC.

Partial-label, long-tailed multi-label learning with three branches on one backbone:

* **Correction** (reflective label corrector, RLC): a margin on observed positives and the
  recall of missing labels whose probability exceeds both a global threshold ``tau`` and the
  class-aware batch mean, with class weights re-computed from the counts recalled so far in the
  epoch (:func:`recall_targets`, :func:`rlc_loss`).
* **Modification** (prior focal modifier, PFM): an asymmetric focal loss whose positive and
  negative probabilities are modified by the observed-label co-occurrence of each image's
  labels and whose terms are weighted by the class prior (:func:`pfm_loss`).
* **Balance**: a balanced, a head and a tail branch, each with its sampler (instance,
  reversed, class-balanced), a cosine classifier, a moving feature mean and TDE-adjusted
  ("moving") logits; the balanced branch fuses the head and tail features with a trained
  additive attention. The paper's head-tail balancer loss (:func:`htb_loss`) is off by
  default, as in the release.

Defaults = the paper as released (bugs fixed): frozen trunk, log-softmax branch features,
dataset-level samplers, no HTB term, the balanced branch's logits as scores.

Differences from the released code (``wannature/COMIC``), each with its reason:

* One backbone, three branch heads (fits the platform's one-model loop and a third of the
  memory). Each branch owns a projection ``Linear(D, D)`` (the release's trainable ``fc`` of
  its frozen ResNet-50 feature model, log-softmax by default) and a cosine classifier; the
  trunk is shared and frozen (``freeze_trunk: true``, the release) or fine-tuned (``false``,
  a platform variant for an untrained trunk such as DigitsMLT's ``small_cnn``; searched).
* Samplers (``views``): ``dataset`` (default, the paper's ``utils/dataloader.py``): the
  balanced branch sees the batch (instance sampling); the head branch B images of a
  dataset-level reversed sampler (a class with probability :math:`\propto n_{\max}/n_c`,
  then a uniform image of it) and the tail branch B images of a class-balanced sampler
  (uniform class), drawn by the data layer over the whole epoch through
  :meth:`~methods.base.Method.view_weights` (:func:`view_sample_weights`, observed counts;
  as many draws per view as the epoch has images; a repeated image carries its one
  augmentation of the epoch, the release augments each draw). One trunk forward serves the
  batch and both views. ``batch`` (a platform variant, searched): the head / tail views
  resample the current batch's rows (a class present in the batch drawn as above, then a
  uniform row of it; torch RNG), so the tail branch never sees a tail image the batch lacks.
* ``feature_act: relu`` (and ``none``) are platform variants of the release's log-softmax
  (searched; ReLU trained better on DigitsMLT with a fine-tuned trunk).
* ``eval_logits: balanced`` (default) scores the balanced branch only, as the release (its
  untrained attention aside); ``ensemble`` (a platform variant, searched) averages the balanced
  and the head/tail TDE logits.
* Each branch's logits are scored against the labels of its own images (the release pairs the
  head logits with the instance labels, the tail logits with the reversed labels and the
  balanced logits with the class-balanced labels).
* The PFM's ``gamma_neg``, ``gamma_pos``, ``clip`` and class-negative factor come from the
  config (the release's ``create_loss`` hard-codes them).
* The head-tail balancer (``htb``, default off: the release comments its call out) follows the
  released ``HeadTailBalancerLoss`` when on: weights :math:`L_h^\gamma / (L_h^\gamma +
  L_t^\gamma)` (the branch with the higher PFM loss weighs more) and terms PFM(softmax(z_h)
  * softmax(z_b)). ``htb_weighting: inverse`` (the better branch teaches more) and
  ``htb_term: distill`` (BCE to the teachers' sigmoids) are platform variants. The attention
  fusion is trained with the balanced branch, or left out with ``attention=False`` (the
  release evaluates an untrained attention, a bug).
* Reported head/medium/tail groups: the PLT protocol's (observed counts, head >= 100, tail
  < 20 scaled to the benchmark) through the space's ``data.groups: observed``.
* Co-occurrence and class priors come from the observed (corrupted) training labels; nothing
  reads the clean labels.
* Reduction: sums over classes, means over the batch. The RLC term is divided by the number of
  corrected positives instead of multiplied by ``32 / #positives`` (release, with a hard-coded
  32): ``B / #pos`` in the release's sum convention is ``1 / #pos`` here.
* Epochs count from 0 here; ``compute_epoch`` keeps COMIC's count from 1, so the corrector runs
  from loop epoch ``compute_epoch - 1`` on (default 1: from the start). Before that the RLC
  term is 0, as in the release.
* The moving means are updated after each step (``on_batch_end``) with the step's view means,
  so a step's TDE logits use the means of the previous steps (the release includes the current
  batch). With several workers the view means are averaged over workers at every step, and the
  RLC's recalled counts are summed over workers; the current step's weights use the other
  workers' recalls of previous steps only.

Inferred (not in the released code): the co-occurrence matrix has a zero diagonal (counts of
images with both of two distinct observed labels).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import Batch, Method, MethodParams, TaskInfo, hp
from methods.registry import register_method

__all__ = [
    "BRANCHES",
    "COMIC",
    "COMICNet",
    "COMICParams",
    "CosineClassifier",
    "attention_scores",
    "cooccurrence",
    "htb_loss",
    "pfm_loss",
    "prior_weights",
    "recall_targets",
    "rlc_loss",
    "view_rows",
    "view_sample_weights",
]

BRANCHES = ("balanced", "head", "tail")
_EPS = 1e-8


@dataclass(frozen=True)
class COMICParams(MethodParams):
    """Hyperparameters of :class:`COMIC` (defaults: the paper's / released code's)."""

    # correction (RLC)
    tau: float = hp(0.7, 0.0, 1.0, low_open=True, high_open=True,
                    doc="global probability threshold for recalling a missing label")
    margin: float = hp(1.0, 0.0, 3.0, doc="logit margin m subtracted for observed positives")
    compute_epoch: int = hp(1, 1, 10000, doc="first epoch (from 1) with label recall and RLC")
    rlc_weight: float = hp(0.2, 0.0, 10.0, doc="weight of the RLC term in every branch")
    rlc_exponent: float = hp(1 / 6, 0.0, 2.0, doc="exponent of the RLC class weights")
    rlc_gamma_neg: float = hp(3.0, 0.0, 10.0, doc="RLC focal exponent on negatives")
    rlc_gamma_pos: float = hp(0.0, 0.0, 10.0, doc="RLC focal exponent on positives")
    rlc_clip: float = hp(0.05, 0.0, 0.5, doc="RLC probability shift on negatives")
    # modification (PFM)
    gamma_neg: float = hp(3.0, 0.0, 10.0, doc="PFM focal exponent on negatives (gamma-)")
    gamma_pos: float = hp(0.0, 0.0, 10.0, doc="PFM focal exponent on positives (gamma+)")
    clip: float = hp(0.05, 0.0, 0.5, doc="PFM probability shift on negatives")
    gamma_class_ng: float = hp(1.2, 1.0, 5.0,
                               doc="PFM factor on negatives that co-occur with the image's labels")
    prior_exponent: float = hp(1 / 3, 0.0, 2.0, doc="exponent of the PFM class-prior weights")
    # balance (branches, classifiers, HTB)
    scale: float = hp(16.0, 0.0, 128.0, low_open=True, doc="cosine classifier scale")
    norm_offset: float = hp(1 / 32, 0.0, 1.0, doc="offset g in w / (|w| + g)")
    tde_alpha: float = hp(2.0, 0.0, 5.0, doc="tail TDE factor alpha on the moving-mean direction")
    mean_momentum: float = hp(0.9, 0.0, 1.0, high_open=True,
                              doc="moving feature mean c <- mu c + batch mean")
    feature_act: str = hp("log_softmax", choices=("log_softmax", "relu", "none"),
                          doc="activation after each branch projection (release: log_softmax)")
    views: str = hp("dataset", choices=("dataset", "batch"),
                    doc="head/tail sampler views: dataset-level reversed / class-balanced "
                        "samplers (the paper) or resamples of the current batch")
    attention: bool = hp(True, choices=(True, False),
                         doc="train and use the additive attention fusion of the balanced branch")
    attention_mix: float = hp(0.1, 0.0, 1.0, doc="weight of the attention output in the fusion")
    htb: bool = hp(False, choices=(False, True),
                   doc="head-tail balancer term (the paper's L_htb; the release disables it)")
    htb_weight: float = hp(1.0, 0.0, 10.0, doc="weight of the HTB term")
    htb_gamma: float = hp(2.0, 0.0, 10.0, doc="exponent of the HTB learning-effect ratio")
    htb_weighting: str = hp("release", choices=("release", "inverse"),
                            doc="release: each branch's term weighted by its own PFM loss^gamma "
                                "(HeadTailBalancerLoss); inverse: by the other branch's")
    htb_term: str = hp("release", choices=("release", "distill"),
                       doc="release: PFM of softmax(z_teacher) * softmax(z_b) as in "
                           "HeadTailBalancerLoss; distill: BCE to the teacher's sigmoids")
    eval_logits: str = hp("balanced", choices=("balanced", "ensemble"),
                          doc="scores: balanced branch only (the release) or the mean of "
                              "balanced + head/tail TDE logits")
    freeze_trunk: bool = hp(True, choices=(True, False),
                            doc="freeze the backbone trunk (release: frozen ResNet-50)")
    cls_lr_scale: float = hp(0.1, 1e-4, 100.0,
                             doc="learning-rate multiplier of the cosine classifiers (lr_cls/lr)")


# ------------------------------------------------------------------------------ statistics
def prior_weights(counts: Tensor, exponent: float) -> Tensor:
    r"""Class weights :math:`w_c = (1 - \log(n_c / n_{\max}))^{e}` from ``(C,)`` counts.

    Counts below 1 are treated as 1 (a class without observed positives gets the largest
    finite weight).
    """
    counts = counts.clamp(min=1.0)
    return (1.0 - torch.log(counts / counts.max())).pow(exponent)


def cooccurrence(targets: Tensor) -> Tensor:
    """Column-normalised co-occurrence ``(C, C)`` of distinct classes in ``(N, C)`` labels.

    ``T[i, j]`` counts images with both ``i`` and ``j`` (``i != j``; zero diagonal) and the
    result is ``T / colsum(T)`` (columns without co-occurrence stay 0).
    """
    y = targets.float()
    counts = y.t() @ y
    counts.fill_diagonal_(0.0)
    return counts / counts.sum(dim=0, keepdim=True).clamp(min=_EPS)


def attention_scores(target: Tensor, cooc: Tensor) -> Tensor:
    r"""PFM attention :math:`a_k`: mean of ``cooc[i, :]`` over the positives ``i`` of each row,
    renormalised to sum 1; ``(B, C)``. Rows without positives (or co-occurrence) give 0."""
    y = target.to(cooc.dtype)
    mean = (y @ cooc) / y.sum(dim=1, keepdim=True).clamp(min=1.0)
    total = mean.sum(dim=1, keepdim=True)
    return torch.where(total > 0, mean / total.clamp(min=_EPS), torch.zeros_like(mean))


# ------------------------------------------------------------------------------ losses
def _focal_bce(pos_prob: Tensor, neg_prob: Tensor, target: Tensor, weight: Tensor,
               gamma_pos: float, gamma_neg: Tensor | float) -> Tensor:
    """Element-wise ``-w [t log p+ + (1-t) log p-] (1 - p_t)^(g+ t + g- (1-t))``, focal detached."""
    log_term = target * torch.log(pos_prob.clamp(min=_EPS)) + (1 - target) * torch.log(
        neg_prob.clamp(min=_EPS))
    with torch.no_grad():
        p_t = pos_prob * target + neg_prob * (1 - target)
        focal = torch.pow(1 - p_t, gamma_pos * target + gamma_neg * (1 - target))
    return -weight * log_term * focal


def pfm_loss(logits: Tensor, target: Tensor, attn: Tensor, class_w: Tensor, *,
             gamma_pos: float, gamma_neg: float, clip: float, gamma_class_ng: float) -> Tensor:
    r"""Prior focal modifier loss, summed over classes and averaged over the batch.

    With :math:`p = \sigma(z)`, the attention :math:`a` (:func:`attention_scores`) and the prior
    weights :math:`w` (:func:`prior_weights`):
    :math:`p^+ = p (1 - a)`, :math:`p^- = \min(1, 1 - p + \text{clip})`, then
    :math:`p^- \leftarrow \min(1, \gamma_{ng} p^-)` where :math:`a > 0`, and

    .. math:: \ell = -w_c [y \log p^+ + (1-y) \log p^-]
              (1 - p_t)^{\gamma_+ y + (\gamma_- + w_c)(1 - y)}

    with :math:`p_t = p^+` for positives, :math:`p^-` for negatives (focal factor without
    gradient). Shapes: ``(B, C)`` logits, target and attention, ``(C,)`` weights.
    """
    target = target.to(logits.dtype)
    prob = torch.sigmoid(logits)
    pos = prob * (1 - attn)
    neg = (1 - prob + clip).clamp(max=1.0)
    neg = torch.where(attn > 0, (neg * gamma_class_ng).clamp(max=1.0), neg)
    w = class_w.to(logits)
    return _focal_bce(pos, neg, target, w, gamma_pos, gamma_neg + w).sum(dim=1).mean()


def recall_targets(logits: Tensor, target: Tensor, *, tau: float, margin: float) -> Tensor:
    r"""RLC corrected targets :math:`\hat y` (no gradient), ``(B, C)``.

    :math:`p' = \sigma(z - m y)`; :math:`\hat y = 1` where :math:`y = 1`, or where
    :math:`p' > \tau` and :math:`p'` exceeds its class's batch mean :math:`\bar p'_c`.
    """
    with torch.no_grad():
        target = target.to(logits.dtype)
        prob = torch.sigmoid(logits - margin * target)
        recalled = (prob > tau) & (prob > prob.mean(dim=0, keepdim=True))
        return torch.where(recalled, torch.ones_like(target), target)


def rlc_loss(logits: Tensor, target: Tensor, corrected: Tensor, class_w: Tensor, *,
             margin: float, gamma_pos: float, gamma_neg: float, clip: float) -> Tensor:
    r"""Reflective label corrector loss on the corrected targets, per corrected positive.

    With :math:`p' = \sigma(z - m y)` (margin on *observed* positives only),
    :math:`p^- = \min(1, 1 - p' + \text{clip})` and class weights :math:`w`:

    .. math:: L = -\frac{1}{\#\{\hat y = 1\}} \sum_{i,c} w_c [\hat y \log p' + (1 - \hat y)
              \log p^-] (1 - p_t)^{\gamma_+ \hat y + (\gamma_- + w_c)(1 - \hat y)}

    (the release's ``32 / #pos`` scale in the platform's batch-mean convention).
    """
    target = target.to(logits.dtype)
    corrected = corrected.to(logits.dtype)
    prob = torch.sigmoid(logits - margin * target)
    neg = (1 - prob + clip).clamp(max=1.0)
    w = class_w.to(logits)
    elementwise = _focal_bce(prob, neg, corrected, w, gamma_pos, gamma_neg + w)
    return elementwise.sum() / corrected.sum().clamp(min=1.0)


def _soft_bce(logits: Tensor, soft: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, soft, reduction="none").sum(dim=1).mean()


def htb_loss(balanced: Tensor, head: Tensor, tail: Tensor, head_effect: Tensor,
             tail_effect: Tensor, gamma: float, *, weighting: str = "release",
             term: str = "release", pfm: Any = None) -> Tensor:
    r"""Head-tail balancer: the balanced branch learns from the head and tail branches.

    Weights from the branches' PFM losses :math:`L_h`, :math:`L_t` on the same images (no
    gradient). ``weighting="release"`` (the released ``HeadTailBalancerLoss``):
    :math:`w_h = L_h^\gamma / (L_h^\gamma + L_t^\gamma)`, :math:`w_t = 1 - w_h`, so the
    branch with the *higher* loss weighs more; ``"inverse"`` (a platform variant, the
    "better branch teaches more" reading of the paper) swaps them.

    Terms, with teachers detached: ``term="release"``: :math:`\mathrm{PFM}(\mathrm{softmax}
    (z_h) \odot \mathrm{softmax}(z_b))` (the release feeds the product of the softmax
    probabilities to the PFM as if it were logits; ``pfm`` is that loss as a callable of
    ``(B, C)`` inputs); ``term="distill"``: binary cross-entropy of :math:`z_b` against
    :math:`\sigma(z_h)`, summed over classes and averaged over the batch. Then
    :math:`L = w_h T_h + w_t T_t`.
    """
    eff_h = head_effect.detach().clamp(min=_EPS).pow(gamma)
    eff_t = tail_effect.detach().clamp(min=_EPS).pow(gamma)
    w_h = eff_h / (eff_h + eff_t)
    if weighting == "inverse":
        w_h = 1 - w_h
    if term == "release":
        if pfm is None:
            raise ValueError("htb_loss(term='release') needs the PFM loss callable")
        prob_b = torch.softmax(balanced, dim=-1)
        t_h = pfm(torch.softmax(head.detach(), dim=-1) * prob_b)
        t_t = pfm(torch.softmax(tail.detach(), dim=-1) * prob_b)
    else:
        t_h = _soft_bce(balanced, torch.sigmoid(head.detach()))
        t_t = _soft_bce(balanced, torch.sigmoid(tail.detach()))
    return w_h * t_h + (1 - w_h) * t_t


def view_sample_weights(labels: Tensor) -> dict[str, Tensor]:
    r"""``(N,)`` image weights of the paper's dataset-level head and tail samplers.

    Both draw a class, then a uniform image of it (``utils/dataloader.py``): ``head``
    ("reverse") draws class c with probability :math:`\propto n_{\max} / n_c`, ``tail``
    ("balance") uniformly, so image i is drawn with probability :math:`\propto \sum_c y_{ic}
    / n_c^2` and :math:`\propto \sum_c y_{ic} / n_c` respectively (``n_c`` = the column sums
    of ``labels``; classes without an image take no part). All-zero weights fall back to 1.
    """
    y = (labels > 0).double()
    counts = y.sum(dim=0)
    inv = torch.where(counts > 0, 1.0 / counts.clamp(min=1.0), torch.zeros_like(counts))
    out = {"head": y @ (inv * inv), "tail": y @ inv}
    return {k: w if w.sum() > 0 else torch.ones(len(y), dtype=torch.float64)
            for k, w in out.items()}


# ------------------------------------------------------------------------------ sampler views
def view_rows(target: Tensor, class_w: Tensor, num: int) -> tuple[Tensor, Tensor]:
    """Resample ``num`` rows of a batch: a class, then a uniform row holding that class.

    Classes are drawn in proportion to ``class_w`` among those with a positive in ``target``
    (``(B, C)``); a batch without positives falls back to uniform rows. Uses the torch RNG.

    Returns:
        ``(rows, classes)``: ``(num,)`` row indices and the drawn classes (-1 on fallback).
    """
    target = target.detach().float().cpu()
    present = target.sum(dim=0) > 0
    probs = class_w.detach().float().cpu() * present
    if probs.sum() <= 0:
        return torch.randint(len(target), (num,)), torch.full((num,), -1)
    classes = torch.multinomial(probs, num, replacement=True)
    rows = torch.multinomial(target[:, classes].t(), 1).squeeze(1)
    return rows, classes


# ------------------------------------------------------------------------------ modules
class CosineClassifier(nn.Module):
    r"""Causal-norm classifier: :math:`z_c = s \langle v, w_c / (\|w_c\| + g) \rangle`.

    ``v`` is the (already normalised or TDE-adjusted) ``(B, D)`` feature; ``(B, C)`` logits.
    """

    def __init__(self, dim: int, num_classes: int, scale: float, offset: float) -> None:
        super().__init__()
        bound = dim ** -0.5
        self.weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))
        self.scale, self.offset = scale, offset

    def forward(self, v: Tensor) -> Tensor:
        w = self.weight / (self.weight.norm(dim=1, keepdim=True) + self.offset)
        return self.scale * v @ w.t()


class AdditiveAttention(nn.Module):
    """Additive attention of one query over ``K`` key/value tokens: ``(B, D), (B, K, D) -> (B, D)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.w_v = nn.Linear(dim, 1, bias=False)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        scores = self.w_v(torch.tanh(self.w_q(query).unsqueeze(1) + self.w_k(keys))).squeeze(-1)
        return (scores.softmax(dim=1).unsqueeze(-1) * keys).sum(dim=1)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=_EPS)


class COMICNet(nn.Module):
    """The backbone with COMIC's three branch heads and the attention fusion.

    ``backbone.features(x)`` gives pooled ``(B, D)`` features; every branch projects them
    (``Linear(D, D)`` + activation), and has its cosine classifier. The backbone's own linear
    classifier is unused (frozen).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, prm: COMICParams) -> None:
        super().__init__()
        dim = int(backbone.feature_dim)  # type: ignore[arg-type]
        self.backbone = backbone
        for p in getattr(backbone, "classifier", nn.Identity()).parameters():
            p.requires_grad_(False)
        if prm.freeze_trunk:
            for p in backbone.parameters():
                p.requires_grad_(False)
        self.freeze_trunk = prm.freeze_trunk
        self.act = prm.feature_act
        self.proj = nn.ModuleDict({b: nn.Linear(dim, dim) for b in BRANCHES})
        self.cls = nn.ModuleDict(
            {b: CosineClassifier(dim, num_classes, prm.scale, prm.norm_offset) for b in BRANCHES})
        self.attention = AdditiveAttention(dim) if prm.attention else None
        self.attention_mix = prm.attention_mix
        self.tde_alpha = prm.tde_alpha

    def train(self, mode: bool = True) -> COMICNet:
        super().train(mode)
        if self.freeze_trunk:
            self.backbone.eval()  # frozen trunk: BatchNorm statistics stay fixed too
        return self

    def branch_features(self, images: Tensor) -> dict[str, Tensor]:
        """``(B, D)`` features of every branch for the same images."""
        feats = self.backbone.features(images)  # type: ignore[operator]
        out = {}
        for b in BRANCHES:
            h = self.proj[b](feats)
            if self.act == "log_softmax":
                h = F.log_softmax(h, dim=1)
            elif self.act == "relu":
                h = F.relu(h)
            out[b] = h
        return out

    def fuse(self, feats: Mapping[str, Tensor]) -> Tensor:
        """Balanced features plus the attention over the head and tail features (if any)."""
        if self.attention is None:
            return feats["balanced"]
        keys = torch.stack([feats["head"], feats["tail"]], dim=1)
        return feats["balanced"] + self.attention_mix * self.attention(feats["balanced"], keys)

    def logits(self, branch: str, feats: Tensor, mean: Tensor | None = None) -> Tensor:
        """Branch logits; with the moving ``mean``, the head/tail TDE-adjusted ("moving") ones.

        Head: :math:`\\hat x - \\cos(\\hat x, \\hat c) \\hat c`; tail:
        :math:`\\hat x + \\alpha \\cos(\\hat x, \\hat c) \\hat c` (a zero mean changes nothing).
        """
        x = _unit(feats)
        if mean is not None and branch != "balanced":
            c = mean.to(x)
            c = c / c.norm().clamp(min=_EPS) if c.norm() > 0 else c
            cos = x @ c
            factor = -1.0 if branch == "head" else self.tde_alpha
            x = x + factor * cos.unsqueeze(1) * c
        return self.cls[branch](x)

    def scores(self, images: Tensor, means: Tensor, mode: str = "ensemble") -> Tensor:
        """Evaluation logits ``(B, C)``: balanced (fused), or its mean with head/tail TDE logits."""
        feats = self.branch_features(images)
        balanced = self.logits("balanced", self.fuse(feats))
        if mode == "balanced":
            return balanced
        head = self.logits("head", feats["head"], means[1])
        tail = self.logits("tail", feats["tail"], means[2])
        return (balanced + head + tail) / 3

    def forward(self, images: Tensor) -> Tensor:
        """Balanced-branch logits (without moving means); evaluation uses :meth:`scores`."""
        return self.logits("balanced", self.fuse(self.branch_features(images)))


# ------------------------------------------------------------------------------ the method
@register_method
class COMIC(Method):
    """COMIC: RLC correction, PFM modification and a head/tail/balanced branch balancer.

    See the module docstring for the formulas' sources and the differences from the release.
    Method state (checkpointed): the three moving feature means ``(3, D)`` and the RLC's
    per-branch recalled counts of the current epoch ``(3, C)``.
    """

    name = "comic"
    Params = COMICParams
    params: COMICParams
    regimes = ("missing", "clean")
    logit_loss = False

    def __init__(self, params: MethodParams, task: TaskInfo) -> None:
        super().__init__(params, task)
        counts = task.counts_tensor()
        self.counts = counts
        self.pfm_weights = prior_weights(counts, self.params.prior_exponent)
        clamped = counts.clamp(min=1.0)
        # class-draw weights of the batch-resample views (``views: batch``)
        self.class_view_weights = {"head": clamped.max() / clamped,
                                   "tail": torch.ones_like(counts)}
        self._view_image_weights: dict[str, Tensor] | None = None
        self.cooc = torch.zeros(task.num_classes, task.num_classes)
        self.means: Tensor | None = None  # (3, D), set by configure_model
        self.recalled = torch.zeros(len(BRANCHES), task.num_classes)

    # ------------------------------------------------------------------ set-up
    def set_train_targets(self, targets: Tensor) -> None:
        """Co-occurrence of the observed training labels (for the PFM attention) and the
        image weights of the dataset-level head / tail samplers (``views: dataset``)."""
        self.cooc = cooccurrence(targets)
        self._view_image_weights = view_sample_weights(targets.cpu())

    def view_weights(self, epoch: int) -> Mapping[str, Tensor] | None:
        """The paper's reversed (head) and class-balanced (tail) samplers over the whole
        training set, drawn by the data layer (``views: dataset``); None for ``batch``."""
        if self.params.views != "dataset" or self._view_image_weights is None:
            return None
        return self._view_image_weights

    def configure_model(self, model: nn.Module) -> nn.Module:
        net = COMICNet(model, self.task.num_classes, self.params)
        if self.means is None:
            self.means = torch.zeros(len(BRANCHES), int(model.feature_dim))  # type: ignore[arg-type]
        return net

    def lr_scale(self, param_name: str) -> float:
        return self.params.cls_lr_scale if param_name.startswith("cls.") else 1.0

    # ------------------------------------------------------------------ per batch
    def _corrector_active(self) -> bool:
        return self.current_epoch + 1 >= self.params.compute_epoch

    def _branch_loss(self, net: COMICNet, branch: str, feats: Tensor, target: Tensor,
                     means: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """PFM, weighted RLC and recalled counts ``(C,)`` of one branch on its view."""
        prm = self.params
        plain = net.logits(branch, feats).float()  # losses in float32 (also under autocast)
        attn = attention_scores(target, self.cooc.to(plain))
        pfm = pfm_loss(plain, target, attn, self.pfm_weights.to(plain), gamma_pos=prm.gamma_pos,
                       gamma_neg=prm.gamma_neg, clip=prm.clip, gamma_class_ng=prm.gamma_class_ng)
        zero = plain.new_zeros(())
        if not self._corrector_active() or prm.rlc_weight == 0:
            return pfm, zero, torch.zeros_like(self.counts)
        moving = plain if branch == "balanced" else net.logits(
            branch, feats, means[BRANCHES.index(branch)]).float()
        corrected = recall_targets(moving, target, tau=prm.tau, margin=prm.margin)
        recalled = (corrected - target.to(corrected)).sum(dim=0).detach().cpu()
        counts = self.counts + self.recalled[BRANCHES.index(branch)] + recalled
        weights = prior_weights(counts, prm.rlc_exponent).to(plain)
        rlc = rlc_loss(moving, target, corrected, weights, margin=prm.margin,
                       gamma_pos=prm.rlc_gamma_pos, gamma_neg=prm.rlc_gamma_neg, clip=prm.rlc_clip)
        return pfm, prm.rlc_weight * rlc, recalled

    def training_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Three branches on their views; returns loss, logits and step statistics.

        ``views: dataset`` with the data layer's view rows in the batch (``head_image``,
        ``head_target``, ...): the head and tail branches train on those images (one trunk
        forward over the batch and both views). Otherwise (``views: batch``, or a view that
        ran out of rows on a worker's shard) the view is a resample of the batch's rows.
        """
        net: COMICNet = model  # type: ignore[assignment]
        prm = self.params
        target = batch["target"]
        n = len(target)
        images = [batch["image"]]
        dataset_views = [b for b in ("head", "tail") if prm.views == "dataset"
                         and len(batch.get(f"{b}_index", ())) > 0]
        images += [batch[f"{b}_image"] for b in dataset_views]
        every = net.branch_features(torch.cat(images) if len(images) > 1 else images[0])
        feats = {b: f[:n] for b, f in every.items()}
        means = self._means(feats["balanced"])
        view_feats, view_y = {}, {}
        start = n
        for b in ("head", "tail"):
            if b in dataset_views:
                m = len(batch[f"{b}_index"])
                view_feats[b] = every[b][start:start + m]
                view_y[b] = batch[f"{b}_target"].float()
                start += m
            else:
                rows = view_rows(target, self.class_view_weights[b], n)[0].to(target.device)
                view_feats[b], view_y[b] = feats[b][rows], target[rows].float()
        view_feats["balanced"] = net.fuse(feats)
        view_y["balanced"] = target.float()
        pfm, rlc, recalled = {}, {}, []
        for b in BRANCHES:
            pfm[b], rlc[b], r = self._branch_loss(net, b, view_feats[b], view_y[b], means)
            recalled.append(r)
        loss_b = pfm["balanced"] + torch.stack(list(pfm.values())).mean() + rlc["balanced"]
        head_t = net.logits("head", feats["head"], means[1]).float()
        tail_t = net.logits("tail", feats["tail"], means[2]).float()
        balanced = net.logits("balanced", view_feats["balanced"]).float()
        if prm.htb and prm.htb_weight > 0:
            loss_b = loss_b + prm.htb_weight * self._htb(balanced, head_t, tail_t, target)
        loss = pfm["head"] + rlc["head"] + pfm["tail"] + rlc["tail"] + loss_b
        scores = balanced if prm.eval_logits == "balanced" else (balanced + head_t + tail_t) / 3
        view_means = torch.stack([feats["balanced"].mean(0)]
                                 + [view_feats[b].mean(0) for b in ("head", "tail")])
        return {"loss": loss, "logits": scores.detach(), "view_means": view_means.detach(),
                "recalled": torch.stack(recalled)}

    def _htb(self, balanced: Tensor, head: Tensor, tail: Tensor, target: Tensor) -> Tensor:
        prm = self.params
        attn = attention_scores(target, self.cooc.to(head))
        kw = dict(gamma_pos=prm.gamma_pos, gamma_neg=prm.gamma_neg, clip=prm.clip,
                  gamma_class_ng=prm.gamma_class_ng)
        w = self.pfm_weights.to(head)
        with torch.no_grad():
            eff_h = pfm_loss(head, target, attn, w, **kw)
            eff_t = pfm_loss(tail, target, attn, w, **kw)

        def pfm(inputs: Tensor) -> Tensor:
            return pfm_loss(inputs, target, attn, w, **kw)

        return htb_loss(balanced, head, tail, eff_h, eff_t, prm.htb_gamma,
                        weighting=prm.htb_weighting, term=prm.htb_term, pfm=pfm)

    def _means(self, like: Tensor) -> Tensor:
        if self.means is None or self.means.shape[1] != like.shape[1]:
            self.means = torch.zeros(len(BRANCHES), like.shape[1])
        return self.means.to(like.device)

    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        net: COMICNet = model  # type: ignore[assignment]
        feats_dim = net.proj["balanced"].out_features
        means = self.means if self.means is not None else torch.zeros(len(BRANCHES), feats_dim)
        return net.scores(images, means.to(images.device), self.params.eval_logits)

    # ------------------------------------------------------------------ hooks
    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.recalled = torch.zeros(len(BRANCHES), self.task.num_classes)

    def on_batch_end(self, batch: Batch, output: Mapping[str, Tensor]) -> None:
        """Moving means ``c <- mu c + view mean`` and the epoch's recalled counts (all workers)."""
        view_means = self.dist.all_reduce_mean(output["view_means"].detach().float()).cpu()
        if self.means is None or self.means.shape != view_means.shape:
            self.means = torch.zeros_like(view_means)
        self.means = self.params.mean_momentum * self.means + view_means
        self.recalled = self.recalled + self.dist.all_reduce_sum(output["recalled"].float()).cpu()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["means"] = None if self.means is None else self.means.detach().cpu().clone()
        state["recalled"] = self.recalled.detach().cpu().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        means = state.get("means")
        self.means = None if means is None else torch.as_tensor(means).float().clone()
        self.recalled = torch.as_tensor(state["recalled"]).float().clone()
