"""Distribution-Balanced loss (Wu et al., ECCV 2020), a long-tailed multi-label baseline.

The element-wise loss :func:`db_loss_elementwise` is shared with NDLP (``methods/ndlp.py``),
which feeds it pseudo-labels and, for its mixup term, soft targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.base import Batch, Method, MethodParams, TaskInfo, hp
from methods.registry import register_method

__all__ = [
    "CLASS_AWARE_REDUCE",
    "DBL",
    "DBLParams",
    "DBLoss",
    "class_aware_draws",
    "class_aware_weights",
    "db_loss_elementwise",
]

_EPS = 1e-12
#: the released ``ClassAwareSampler``'s ``reduce``: an epoch is ``max_c n_c * C / 4`` draws
CLASS_AWARE_REDUCE = 4


@dataclass(frozen=True)
class DBLParams(MethodParams):
    """Hyperparameters of the Distribution-Balanced loss (defaults: the VOC-MLT config).

    The COCO-MLT config uses ``neg_scale=2`` and ``map_gamma=0.2``. ``map_alpha=0.5,
    map_beta=0, neg_scale=1, init_bias=0, balance_param=1`` is plain focal BCE, and
    ``focal_gamma=0`` on top of that is plain BCE.
    """

    map_alpha: float = hp(0.1, 0.0, 1.0, doc="re-balancing weight offset alpha (r = alpha + ...)")
    map_beta: float = hp(10.0, 0.0, 50.0, doc="re-balancing sigmoid slope beta")
    map_gamma: float = hp(0.3, 0.0, 1.0, doc="re-balancing sigmoid centre mu (0.2 COCO, 0.3 VOC)")
    neg_scale: float = hp(
        5.0, 1.0, 10.0, doc="negative-tolerant logit scale lambda (2 COCO, 5 VOC); 1 = off"
    )
    init_bias: float = hp(0.05, 0.0, 1.0, doc="kappa of the prior logit bias; 0 = off")
    focal_gamma: float = hp(2.0, 0.0, 5.0, doc="focal exponent (not NDLP's sharpening gamma)")
    balance_param: float = hp(2.0, 0.0, 10.0, low_open=True, doc="constant loss multiplier")
    class_aware: bool = hp(
        True, choices=(True, False),
        doc="class-aware sampler (pick a class, then an image of it) over the observed labels",
    )
    epoch_draws: str = hp(
        "release", choices=("release", "images"),
        doc="class-aware epoch length: release = floor(max_c n_c * C / 4) draws (DBL's "
            "ClassAwareSampler, reduce 4); images = N draws",
    )


class DBLoss:
    """The DB loss with its class statistics fixed: counts ``n_c`` of ``N`` training images.

    Args:
        counts: ``(C,)`` per-class positive counts (observed labels by default).
        num_train: N.
        params: the DBL knobs (any dataclass with the :class:`DBLParams` loss fields).
    """

    def __init__(self, counts: Tensor, num_train: int, params: DBLParams) -> None:
        self.params = params
        # a class never observed would give 1/0; one present in every image gives log(0)
        n = counts.double().clamp(min=1.0)
        self.freq_inv = 1.0 / n  # float64; cast to the logits' dtype per call
        ratio = (float(num_train) / n - 1.0).clamp(min=1.0 / max(num_train, 1))
        self.bias = -params.init_bias * torch.log(ratio) / params.neg_scale

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        """``(B, C)`` element-wise loss (see :func:`db_loss_elementwise`)."""
        return db_loss_elementwise(logits, target, self.freq_inv, self.bias, self.params)


def rebalance_weight(target: Tensor, freq_inv: Tensor, params: DBLParams) -> Tensor:
    r"""``(B, C)`` re-balancing weight :math:`r_{ic} = \alpha + \sigma(\beta (P_{ic} - \mu))`.

    :math:`P_{ic} = (1/n_c) / R_i` with :math:`R_i = \sum_j y_{ij} / n_j` (fractional ``y``
    allowed). An image with no positive (``R_i = 0``) gets :math:`P = \infty`, i.e.
    :math:`r = \alpha + 1`, as the released code does through a division by zero.
    """
    freq_inv = freq_inv.to(target)
    repeat = (target * freq_inv).sum(dim=1, keepdim=True)
    ratio = freq_inv.unsqueeze(0) / repeat.clamp(min=_EPS)
    return params.map_alpha + torch.sigmoid(params.map_beta * (ratio - params.map_gamma))


def db_loss_elementwise(
    logits: Tensor, target: Tensor, freq_inv: Tensor, bias: Tensor, params: DBLParams
) -> Tensor:
    r"""Element-wise Distribution-Balanced loss, ``(B, C)``.

    With the re-balancing weight :math:`r` (:func:`rebalance_weight`), the prior bias
    :math:`b_c = -\kappa \log(N / n_c - 1) / \lambda`, :math:`z' = z + b`, the
    negative-tolerant logit :math:`z'' = y z' + (1 - y) \lambda z'` and weight
    :math:`w = y r + (1 - y) r / \lambda`:

    .. math:: \ell = s\, (1 - p_t)^{\gamma}\, w\, \mathrm{BCE}(z'', y), \qquad
              p_t = \exp(-\mathrm{BCE}(z'', y))

    (:math:`s` = ``balance_param``, :math:`\gamma` = ``focal_gamma``). ``y`` may be
    fractional (NDLP's mixup targets); the formulas are then applied as written. The focal
    factor is not detached, as in the release.
    """
    y = target.to(logits)
    lam = params.neg_scale
    r = rebalance_weight(y, freq_inv, params)
    z = logits + bias.to(logits)
    z = y * z + (1.0 - y) * lam * z
    w = y * r + (1.0 - y) * r / lam
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    # (1 - p_t)^gamma, its base kept off 0: with gamma < 1 (the space searches [0, 3]) a
    # saturated logit (bce == 0 in float32) gave pow's infinite gradient times 0 = NaN, and the
    # trial died with a non-finite loss. Below 1e-12 the factor's gradient is 0 (its true
    # limit); the loss there is below 1e-12 either way.
    focal = (-torch.expm1(-bce)).clamp(min=_EPS).pow(params.focal_gamma)
    return params.balance_param * focal * w * bce


def class_aware_draws(labels: Tensor, reduce: int = CLASS_AWARE_REDUCE) -> int:
    r"""Draws of one epoch of the released class-aware sampler, :math:`\lfloor \max_c n_c
    \cdot C / \text{reduce} \rfloor` (at least 1), from ``(N, C)`` labels.

    COCO-MLT: 1128 x 80 / 4 = 22,560; VOC-MLT: 775 x 20 / 4 = 3,875 (against 1,909 and
    1,142 images).
    """
    counts = (labels > 0).sum(dim=0)
    return max(1, int(counts.max().item()) * labels.shape[1] // reduce)


def class_aware_weights(labels: Tensor) -> Tensor:
    r"""``(N,)`` per-image weights of DBL's class-aware sampler, :math:`\sum_c y_{ic} / n_c`.

    The sampler picks a class uniformly, then an image of that class uniformly, so image
    ``i`` is drawn with probability :math:`\frac{1}{C'} \sum_{c \in y_i} 1 / n_c` (``C'`` =
    classes with an image). Images without a label get weight 0; if every weight is 0 the
    weights are uniform.
    """
    labels = (labels > 0).double()
    counts = labels.sum(dim=0)
    inv = torch.where(counts > 0, 1.0 / counts.clamp(min=1.0), torch.zeros_like(counts))
    weights = labels @ inv
    if weights.sum() <= 0:
        return torch.ones(len(labels), dtype=torch.float64)
    return weights


@register_method
class DBL(Method):
    r"""Distribution-Balanced loss: re-balanced weighting, negative-tolerant regularisation
    and a focal form (:func:`db_loss_elementwise`), with DBL's class-aware sampler.

    Class counts ``n_c`` and ``N`` come from :class:`~methods.base.TaskInfo`, i.e. the
    *observed* training labels (the released code reads the clean ``class_freq.pkl``; the
    space's ``data.class_stats: clean`` reproduces that as an explicit oracle setting). The
    sampler weights (:func:`class_aware_weights`) use the observed per-image labels too (the
    clean ones under ``data.class_stats: clean``, through ``set_stats_targets``).

    Epoch length: with the sampler on, an epoch is the released ``ClassAwareSampler``'s
    :math:`\lfloor \max_c n_c \cdot C / 4 \rfloor` draws (``epoch_draws: release``, the
    default; :func:`class_aware_draws`, counts of the sampler's labels): 3,875 draws on
    VOC-MLT and 22,560 on COCO-MLT, i.e. 3.4x and 11.8x the images, so "10 epochs" means the
    release's number of steps, and the LR schedule (defined on steps) follows it.
    ``epoch_draws: images`` draws N images per epoch (this platform's earlier default).

    Reduction: sum over classes, mean over the batch (the released loss averages over all
    ``B x C`` elements, i.e. it is ``C`` times smaller). The prior bias is added inside the
    loss only, as in the release; predictions are the raw logits (a per-class shift does not
    change the per-class AP).
    """

    name = "dbl"
    Params = DBLParams
    params: DBLParams

    def __init__(self, params: DBLParams, task: TaskInfo) -> None:
        super().__init__(params, task)
        self.db = DBLoss(task.counts_tensor(), task.num_train, params)
        self._sample_weights: Tensor | None = None
        self._draws: int | None = None

    def set_train_targets(self, targets: Tensor) -> None:
        self.set_stats_targets(targets)

    def set_stats_targets(self, targets: Tensor) -> None:
        """Class-aware sampler weights from the statistics labels (observed by default)."""
        self._sample_weights = class_aware_weights(targets) if self.params.class_aware else None
        release = self.params.class_aware and self.params.epoch_draws == "release"
        self._draws = class_aware_draws(targets) if release else None

    def sample_weights(self, epoch: int) -> Tensor | None:
        return self._sample_weights

    def epoch_draws(self) -> int | None:
        return self._draws

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """Scalar loss from ``(B, C)`` logits and the ``(B, C)`` 0/1 ``batch["target"]``."""
        return self.db(logits, batch["target"].to(logits)).sum(dim=1).mean()
