"""NDLP (Zhong, Shang et al., Pattern Recognition 2026): noise correction and distribution
fine-tuning for long-tailed partial (candidate-label) multi-label learning."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from methods.base import Batch, Method, TaskInfo, hp
from methods.dbl import DBLoss, DBLParams, class_aware_draws, class_aware_weights
from methods.registry import register_method

__all__ = ["NDLP", "NDLPParams", "PSEUDO_RULES", "ramp", "sharpen"]

#: ``pseudo_rule`` values: the paper's thresholds; class thresholds scaled by each image's
#: candidate count; a per-image share of the uniform confidence (dense multi-label images)
PSEUDO_RULES = ("paper", "scaled", "share")


@dataclass(frozen=True)
class NDLPParams(DBLParams):
    """Hyperparameters of :class:`NDLP` (defaults: the released VOC-MLT settings).

    The DBL fields (inherited from :class:`~methods.dbl.DBLParams`) configure the loss used
    for both the pseudo-label and the mixup terms.
    """

    eta: float = hp(0.9, 0.0, 5.0, doc="weight of the mixup loss at the end of its ramp")
    gamma: float = hp(
        3.0, 0.0, 10.0, low_open=True,
        doc="confidence sharpening exponent (3 VOC, 2 COCO; not the focal gamma)",
    )
    alpha_start: float = hp(0.4, 0.0, 1.0, doc="share of the batch quota selected at epoch 0")
    alpha_end: float = hp(0.8, 0.0, 1.0, doc="share of the batch quota selected at max_epochs")
    conf_ema: float = hp(
        0.1, 0.0, 1.0, low_open=True, doc="confidence EMA rate mu: Q <- (1-mu) Q + mu p"
    )
    mix_beta: float = hp(4.0, 0.0, 100.0, low_open=True, doc="mixup lambda ~ Beta(a, a)")
    prior_clamp: float = hp(
        10.0, 1.0, 1e6,
        doc="the class prior stays within [1/(K C), K/C] (K = this); 1 keeps it uniform",
    )
    pseudo_rule: str = hp(
        "paper", choices=PSEUDO_RULES,
        doc="pseudo-labels: paper (sharpened softmax > phi_c) | scaled (confidences and "
            "thresholds times the image's candidate count) | share (|s_i| Q_ic >= share_min); "
            "scaled and share (dense images) also scale the mixup targets",
    )
    share_min: float = hp(
        0.5, 0.0, 1.0,
        doc="pseudo_rule share: a candidate stays positive while its confidence is at least "
            "this share of its image's uniform confidence 1/|s_i|",
    )

    def cross_field_problems(self) -> list[str]:
        if self.alpha_end < self.alpha_start:
            return [
                f"alpha_end must be >= alpha_start, got alpha_start={self.alpha_start!r}, "
                f"alpha_end={self.alpha_end!r}; sample alpha_end from [alpha_start, 1]"
            ]
        return []


def ramp(epoch: float, max_epochs: int) -> float:
    """Linear ramp ``min(1, epoch / max_epochs)`` over the full budget (SoLar's
    ``linear_rampup``): 0 at epoch 0, 1 at ``max_epochs``."""
    return min(1.0, max(0.0, float(epoch) / max(int(max_epochs), 1)))


def sharpen(confidence: Tensor, gamma: float) -> Tensor:
    r"""``(B, C)`` :math:`\tilde q_{ic} = Q_{ic}^{\gamma} / \sum_{c'} Q_{ic'}^{\gamma}`.

    Computed as powers of ``Q / max_c Q`` (no underflow of the largest entry); all-zero rows
    stay zero.
    """
    top = confidence.amax(dim=1, keepdim=True)
    powered = (confidence / top.clamp(min=1e-30)).pow(gamma)
    total = powered.sum(dim=1, keepdim=True)
    return torch.where(total > 0, powered / total.clamp(min=1e-30), torch.zeros_like(powered))


@register_method
class NDLP(Method):
    r"""NDLP: DB-loss training on pseudo-labels from a candidate confidence table, plus mixup
    of reliable samples, with noise correction and class-prior fine-tuning.

    State: the confidence table :math:`Q` (``N x C``, row = the batch ``index``, i.e. keyed by
    image id), initialised uniform over each image's candidates, and the class prior
    :math:`\pi` (reset to uniform at every epoch start). Per batch (epochs count from 0,
    :math:`r(t) = \min(1, t / T)` with :math:`T` the full epoch budget, not an ASHA rung):

    1. thresholds :math:`\phi_c` = mean of :math:`Q_{ic}` over the candidates of class c;
    2. sharpened :math:`\tilde q = Q^{\gamma} / \sum Q^{\gamma}` and pseudo-labels
       :math:`\hat y_{ic} = 1[\tilde q_{ic} > \phi_c]`;
    3. :math:`L_{pseu} = \ell_{DB}(z, \hat y)`;
    4. from epoch 1 on: per class c, of the samples with :math:`\hat y_{ic} = 1`, the
       :math:`k_c = \max(1, \min(\lceil \pi_c B \alpha_t \rceil, |I_c|))` with the lowest
       mean DB loss; over their union, mixup with :math:`\lambda \sim` Beta(a, a),
       :math:`\lambda \leftarrow \max(\lambda, 1 - \lambda)`, soft targets
       :math:`\lambda \tilde q + (1 - \lambda) \tilde q_{perm}`; :math:`L = L_{pseu} +
       \eta_t L_{mix}` with :math:`\eta_t = \eta r(t)`, :math:`\alpha_t = \alpha_s +
       (\alpha_e - \alpha_s) r(t)`;
    5. after the step: :math:`Q_i \leftarrow (1 - \mu) Q_i + \mu\, \mathrm{softmax}(z_i)
       \odot s_i / \Sigma` (rows stay on the candidate simplex), then :math:`\pi \leftarrow
       \mathrm{normalise}(\pi / (\varepsilon + 10^{-8}))` with :math:`\varepsilon` the batch
       share of confidence mass per class.

    Epoch 0, as the release: ``Q`` starts uniform over each image's candidates, so
    :math:`\tilde q_{ic} = 1/|s_i|` and :math:`\phi_c` is the mean of :math:`1/|s_j|` over
    the images with candidate c; with the strict comparison an image gets pseudo-positives
    only where its candidate set is smaller than that class's "average" one, and an image
    with more candidates than every class's threshold allows gets none (on a VOC-like table
    about half of the images in the first batches) and is trained as all-negative in
    :math:`L_{pseu}` until its row sharpens. The released ``main/train.py`` and
    ``PML_Confidence`` do exactly this (uniform ``Q``, ``ce_label > Threshold_phi``, no
    warm-up, no mixup at epoch 0); it is kept as the default ``pseudo_rule: paper``.

    Dense multi-label images (``pseudo_rule``; the default ``paper`` is the above; the
    shipped space searches ``{paper, share, scaled}`` so the leaderboard shows which won).
    :math:`\phi_c` is about the mean of :math:`1/|s_i|`; on VOC (2 true labels among ~7.4
    candidates) a true label's sharpened confidence clears it, but on an image with many
    true labels the softmax spreads the confidence, every :math:`\tilde q_{ic}` falls under
    :math:`\phi_c`, and the image loses all its pseudo-positives; the softmax-normalised
    mixup targets :math:`\tilde q` shrink with the number of labels too. Two rules measure
    confidences in units of the image's uniform share :math:`1/|s_i|`, so a row spread
    evenly over its candidates keeps them all and every row keeps its top candidate:

    * ``scaled``: :math:`\hat y_{ic} = 1[|s_i| \tilde q_{ic} \ge \psi_c]` over the
      candidates, :math:`\psi_c = \min(1,` mean of :math:`|s_i| Q_{ic}` over the candidates
      of c) (the paper's class thresholds, rescaled);
    * ``share``: :math:`\hat y_{ic} = 1[|s_i| Q_{ic} \ge` ``share_min``] over the candidates
      (a candidate is dropped once its confidence falls under that share of uniform);

    both use the soft targets :math:`\min(1, |s_i| \tilde q_{ic})` for the mixup. Evidence
    (DigitsMLT, 3.87 true labels per image, rho 0.3: 5.7 candidates, candidate precision
    0.68; one 8-epoch run per rule at fixed hyperparameters, lr 2e-3; pseudo-label
    precision / recall against the clean labels after epochs 1 and 8, best val mAP):

    ======================================  ===========  ===========  =======
    rule                                    P / R ep. 1  P / R ep. 8  val mAP
    ======================================  ===========  ===========  =======
    paper (18-26% of images get none)       .68 / .44    .67 / .46    32.4
    paper + each row's top candidate        .71 / .53    .74 / .47    36.5
    max-normalised, vs mean of Q / max Q    .70 / .54    .85 / .38    43.0
    same, unsharpened comparison            .69 / .68    .72 / .62    42.0
    max-normalised >= 0.5                   .68 / 1.0    .93 / .42    44.4
    all candidates, soft s / n_cand         .68 / 1.0    .68 / 1.0    44.8
    scaled, unsharpened comparison          .70 / .72    .72 / .62    45.6
    scaled, no mixup (eta 0)                .70 / .65    .89 / .35    46.5
    scaled                                  .70 / .65    .91 / .34    46.9
    share, share_min 1                      .70 / .64    .93 / .33    46.1
    share, share_min 0.75                   .68 / 1.0    .74 / .92    50.9
    share, share_min 0.5                    .68 / 1.0    .68 / 1.0    52.4
    share 0.5, no mixup (eta 0)             .68 / 1.0    .68 / 1.0    52.8
    ======================================  ===========  ===========  =======

    Every rule that drops candidates early loses recall for good: the softmax table
    concentrates on one or two labels per image, and a pseudo-negative is trained as a
    negative and loses more confidence. On DigitsMLT the best rule, ``share`` at 0.5 (the
    space's setting), drops no candidate within 8 epochs, i.e. the pseudo-labels are the
    candidates; the scaled mixup targets are then worth +7.6 over the softmax-normalised
    ones (44.8), and no mixup at all gives exactly DBL on the candidates (52.8). So on dense
    images NDLP's disambiguation has not helped yet, and ``share`` at 0.5 is DBL on the
    candidates plus mixup, not the paper's algorithm: it is a searchable variant, never the
    default. ``share_min`` is the knob that trades recall for precision where it helps.
    (These measurements predate the release's class-aware epoch length, ``epoch_draws``.)

    Differences from the released code (all intended behaviour, see the spec's pitfalls):

    * ``Q`` is keyed by image id (the release misaligns COCO rows);
    * the prior update runs in log space and is clamped to ``[1/(K C), K/C]`` (``K`` =
      ``prior_clamp``) and renormalised, so it cannot collapse to one-hot or underflow;
    * the class-aware sampler and the DB-loss class counts use the observed candidate labels
      (the release reads the clean ones; ``data.class_stats: clean`` gives both the loss
      counts and the sampler the clean labels, as an explicit oracle setting);
    * losses are summed over classes and averaged over the batch (the release averages over
      ``B x C``); validation runs every epoch;
    * the epoch is the release's class-aware epoch (``epoch_draws: release``,
      :math:`\lfloor \max_c n_c C / 4 \rfloor` draws, see :class:`~methods.dbl.DBL`), with
      the counts of the sampler's labels (observed candidates by default); the ramps move
      per epoch and ``Q`` / :math:`\pi` per batch, so both follow it.

    Platform variants (not in the paper): ``pseudo_rule`` ``scaled`` / ``share`` (above;
    categorical choices of the shipped space, so the search decides). ``epoch_draws: images``
    and ``class_aware: false`` are settings (budget / sampler ablations), fixed to the
    release's values in the space.

    Several workers: each updates the rows of its own images; ``Q`` is merged with
    ``dist.merge_rows`` at epoch end, and the batch confidence mass of the prior update is
    all-reduced every batch, so ``pi`` is the same on every worker. Thresholds use the
    worker's own table within an epoch.
    """

    name = "ndlp"
    Params = NDLPParams
    params: NDLPParams
    regimes = ("candidate",)
    logit_loss = False

    def __init__(self, params: NDLPParams, task: TaskInfo) -> None:
        super().__init__(params, task)
        self.db = DBLoss(task.counts_tensor(), task.num_train, params)
        c = task.num_classes
        self.candidates = torch.zeros(task.num_train, c)
        self.confidence = torch.zeros(task.num_train, c)
        self.prior = torch.full((c,), 1.0 / c)
        self.touched = torch.zeros(task.num_train, dtype=torch.bool)
        self._sample_weights: Tensor | None = None
        self._draws: int | None = None

    # ----------------------------------------------------------------- set-up
    def set_train_targets(self, targets: Tensor) -> None:
        """Candidate sets ``s`` and the uniform initial confidences ``Q = s / sum(s)``."""
        s = (targets > 0).float().cpu()
        self.candidates = s
        self.confidence = s / s.sum(dim=1, keepdim=True).clamp(min=1.0)
        self.touched = torch.zeros(len(s), dtype=torch.bool)
        self.set_stats_targets(s)

    def set_stats_targets(self, targets: Tensor) -> None:
        """Class-aware sampler weights: the observed candidate sets by default, the clean labels
        under ``data.class_stats: clean`` (the released code's oracle)."""
        s = (targets > 0).float().cpu()
        self._sample_weights = class_aware_weights(s) if self.params.class_aware else None
        release = self.params.class_aware and self.params.epoch_draws == "release"
        self._draws = class_aware_draws(s) if release else None

    def sample_weights(self, epoch: int) -> Tensor | None:
        return self._sample_weights

    def epoch_draws(self) -> int | None:
        return self._draws

    # ----------------------------------------------------------------- ramps
    def eta_t(self, epoch: int) -> float:
        return self.params.eta * ramp(epoch, self.task.max_epochs)

    def alpha_t(self, epoch: int) -> float:
        prm = self.params
        return prm.alpha_start + (prm.alpha_end - prm.alpha_start) * ramp(
            epoch, self.task.max_epochs
        )

    # ----------------------------------------------------------------- per batch
    def thresholds(self) -> Tensor:
        r"""``(C,)`` :math:`\phi_c`: mean of the non-zero entries of column c of the whole table
        (the release's ``Q.sum(0) / (Q != 0).sum(0)``; the non-zero entries are the
        candidates unless a softmax underflowed); 1 for a class without any."""
        conf = self.confidence * self.candidates
        mass = conf.sum(dim=0)
        count = (conf != 0).sum(dim=0).float()
        return torch.where(count > 0, mass / count.clamp(min=1.0), torch.ones_like(mass))

    def scaled_thresholds(self) -> Tensor:
        r"""``(C,)`` :math:`\psi_c = \min(1, \text{mean of } |s_i| Q_{ic}` over the candidates
        of class c) (1 for a class without candidates)."""
        count = self.candidates.sum(dim=0)
        mass = (self.confidence * self.candidates.sum(dim=1, keepdim=True)).sum(dim=0)
        mean = (mass / count.clamp(min=1.0)).clamp(max=1.0)
        return torch.where(count > 0, mean, torch.ones_like(mass))

    def pseudo_targets(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Soft targets ``(B, C)`` (of the mixup) and 0/1 pseudo-labels ``(B, C)`` of rows
        ``index``, under ``pseudo_rule`` (see the class docstring)."""
        if self.params.pseudo_rule == "scaled":
            return self._scaled_targets(index.cpu())
        if self.params.pseudo_rule == "share":
            return self._share_targets(index.cpu())
        sharp = sharpen(self.confidence[index.cpu()], self.params.gamma)
        return sharp, (sharp > self.thresholds()).float()

    def _scaled_targets(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`|s_i| \tilde q_{ic}` against :math:`\psi_c`, compared as
        :math:`|s_i| P_{ic} \ge \psi_c \sum_{c'} P_{ic'}` with :math:`P = (Q / \max Q)^{\gamma}`
        so that a uniform row (``P = 1`` on each candidate) and each row's top candidate pass
        exactly, without rounding; soft targets :math:`\min(1, |s_i| \tilde q_{ic})`."""
        conf, cand = self.confidence[rows], self.candidates[rows]
        top = conf.amax(dim=1, keepdim=True)
        powered = (conf / top.clamp(min=1e-30)).pow(self.params.gamma) * (cand > 0)
        total = powered.sum(dim=1, keepdim=True)
        size = cand.sum(dim=1, keepdim=True)
        keep = (size * powered >= self.scaled_thresholds() * total) & (cand > 0) & (top > 0)
        soft = (size * powered / total.clamp(min=1e-30)).clamp(max=1.0)
        return soft, keep.float()

    def _share_targets(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`\hat y_{ic} = 1[|s_i| Q_{ic} \ge` ``share_min``] over the candidates, and
        each row's top candidate (a uniform row keeps all, whatever the rounding); soft
        targets :math:`\min(1, |s_i| \tilde q_{ic})` as for ``scaled``."""
        conf, cand = self.confidence[rows], self.candidates[rows]
        size = cand.sum(dim=1, keepdim=True)
        top = conf.amax(dim=1, keepdim=True)
        keep = ((size * conf >= self.params.share_min) | (conf >= top)) & (cand > 0) & (top > 0)
        soft = (size * sharpen(conf, self.params.gamma)).clamp(max=1.0)
        return soft, keep.float()

    def select(self, score: Tensor, pseudo: Tensor, alpha: float) -> Tensor:
        """``(B,)`` bool: per class, the ``k_c`` lowest-``score`` samples among its pseudo
        positives (``k_c = max(1, min(ceil(pi_c B alpha), |I_c|))``), united over classes."""
        positive = pseudo > 0
        b = len(score)
        masked = torch.where(positive, score.unsqueeze(1), torch.full_like(pseudo, math.inf))
        order = masked.argsort(dim=0, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(0, order, torch.arange(b, device=order.device).unsqueeze(1).expand_as(order))
        quota = torch.ceil(self.prior.to(score) * b * alpha).clamp(min=1.0)
        chosen = (rank < quota.unsqueeze(0)) & positive
        return chosen.any(dim=1)

    def mixup_loss(self, model: nn.Module, images: Tensor, soft: Tensor) -> Tensor:
        """DB loss of the model on mixed ``images`` with mixed soft targets (scalar)."""
        a = torch.tensor(float(self.params.mix_beta))
        lam = float(torch.distributions.Beta(a, a).sample())
        lam = max(lam, 1.0 - lam)
        perm = torch.randperm(len(images)).to(images.device)
        mixed = lam * images + (1.0 - lam) * images[perm]
        target = lam * soft + (1.0 - lam) * soft[perm]
        return self.db(model(mixed), target).sum(dim=1).mean()

    def training_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Pseudo-label DB loss, plus the ramped mixup term on reliable samples (epoch >= 1)."""
        logits = model(batch["image"])
        sharp, pseudo = (t.to(logits) for t in self.pseudo_targets(batch["index"]))
        elementwise = self.db(logits, pseudo)
        loss = elementwise.sum(dim=1).mean()
        eta = self.eta_t(self.current_epoch)
        if self.current_epoch > 0 and eta > 0:
            chosen = self.select(elementwise.detach().mean(dim=1), pseudo,
                                 self.alpha_t(self.current_epoch))
            if chosen.any():
                loss = loss + eta * self.mixup_loss(model, batch["image"][chosen], sharp[chosen])
        return {"loss": loss, "logits": logits}

    # ----------------------------------------------------------------- state updates
    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        c = self.task.num_classes
        self.prior = torch.full((c,), 1.0 / c)
        self.touched = torch.zeros(len(self.confidence), dtype=torch.bool)

    def on_batch_end(self, batch: Batch, output: Mapping[str, Tensor]) -> None:
        index = batch["index"].cpu()
        self.update_confidence(index, output["logits"].detach().float().cpu())
        self.update_prior(self.confidence[index].sum(dim=0))

    def update_confidence(self, index: Tensor, logits: Tensor) -> None:
        """``Q_i <- (1 - mu) Q_i + mu softmax(z_i)|candidates`` for the rows ``index``."""
        s = self.candidates[index]
        masked = logits.masked_fill(s <= 0, -math.inf)
        has = s.sum(dim=1, keepdim=True) > 0
        probs = torch.where(has, torch.softmax(masked.where(has, 0.0), dim=1), 0.0)
        mu = self.params.conf_ema
        self.confidence[index] = (1.0 - mu) * self.confidence[index] + mu * probs
        self.touched[index] = True

    def update_prior(self, batch_mass: Tensor) -> None:
        """``pi <- normalise(pi / (eps + 1e-8))`` in log space, clamped around uniform."""
        mass = self.dist.all_reduce_sum(batch_mass.float())
        total = mass.sum()
        if not total > 0:
            return
        share = mass / total
        share = torch.where(share > 0, share, self.prior)
        log_prior = torch.log(self.prior) - torch.log(share + 1e-8)
        c = len(log_prior)
        bound = math.log(self.params.prior_clamp)
        for _ in range(2):  # normalise, clamp, normalise
            log_prior = log_prior - torch.logsumexp(log_prior, dim=0)
            log_prior = log_prior.clamp(-math.log(c) - bound, -math.log(c) + bound)
        self.prior = torch.softmax(log_prior, dim=0)

    def on_epoch_end(self, epoch: int) -> None:
        self.confidence = self.dist.merge_rows(self.confidence, self.touched)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "confidence": self.confidence.clone(),
            "prior": self.prior.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.confidence = torch.as_tensor(state["confidence"]).float().clone()
        self.prior = torch.as_tensor(state["prior"]).float().clone()
        if self.candidates.shape != self.confidence.shape:  # restored without the label table
            self.candidates = (self.confidence > 0).float()
