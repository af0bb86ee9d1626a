"""CoNeS (Zhong, Shang et al., IEEE TCSVT 2025): correlation-induced negative suppression for
partial (candidate-label) multi-label learning, with CAM-screened class prototypes."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import Batch, Method, MethodParams, TaskInfo, hp
from methods.registry import register_method
from tuner.errors import ConfigError

__all__ = [
    "CoNeS",
    "CoNeSParams",
    "cam_prototypes",
    "centroid_similarity",
    "cooccurrence_correlation",
    "kmeans_centroids",
    "negative_weights",
    "normalise_correlation",
]

#: the released code's k-means seed (``KMeans(random_state=42, n_init="auto")``)
KMEANS_SEED = 42
_TINY = 1e-30


@dataclass(frozen=True)
class CoNeSParams(MethodParams):
    """Hyperparameters of :class:`CoNeS` (defaults: the released VOC07 settings)."""

    beta: float = hp(0.1, 0.0, 100.0, doc="weight of the disambiguated, weighted BCE term")
    r_ws: float = hp(
        3.0, 1.0, 20.0, low_open=True,
        doc="exponent r of the negative-weight problem (> 1; 3 VOC, 2 COCO)",
    )
    tau_cam: float = hp(
        0.1, 0.0, 1.0, high_open=True, doc="CAM threshold (share of the batch maximum)"
    )
    n_clusters: int = hp(5, 1, 64, doc="k-means clusters per class memory")
    memory_size: int = hp(256, 1, 100_000, doc="prototypes kept per class (the most recent)")
    conf_momentum: float = hp(
        0.99, 0.0, 1.0, doc="confidence EMA mu: Q <- mu Q + (1 - mu) q"
    )
    corr_momentum: float = hp(
        0.99, 0.0, 1.0, doc="correlation EMA gamma: L <- gamma L + (1 - gamma) sim"
    )
    classifier_lr_mult: float = hp(
        10.0, 0.0, 1000.0, low_open=True, doc="learning-rate multiplier of the classifier"
    )
    neg_weight_norm: str = hp(
        "sum_power", choices=("sum_power", "simplex"),
        doc="sum_power: the released normaliser (default); simplex: the textbook closed form",
    )
    corr_norm: str = hp(
        "row", choices=("row", "transposed"),
        doc="row: rows of L sum to 1; transposed: the released L / L.sum(1) broadcast",
    )

    def cross_field_problems(self) -> list[str]:
        if self.memory_size < self.n_clusters:
            return [
                f"memory_size must be >= n_clusters, got memory_size={self.memory_size!r}, "
                f"n_clusters={self.n_clusters!r}; raise memory_size or lower n_clusters"
            ]
        return []


# --------------------------------------------------------------------- pure functions
def negative_weights(
    logits: Tensor, candidates: Tensor, r: float, norm: str = "sum_power"
) -> Tensor:
    r"""``(B, C)`` closed-form weights :math:`\varphi` of the non-candidates (0 on candidates).

    With :math:`\ell_c = -\log(1 - \sigma(z_c))`, :math:`N_i = \{c : s_{ic} = 0\}` and
    :math:`\xi_i = 1 / |N_i|`:

    * ``"sum_power"`` (the released code, the default):
      :math:`\varphi_c = \xi_i (r \ell_c)^{-1/(r-1)} / (\sum_{c'} (r \ell_{c'})^{-1})^{1/(r-1)}`;
      then :math:`\sum_{c} \varphi_c^{r-1} = \xi_i^{r-1}`. Equal to ``"simplex"`` at r = 2.
    * ``"simplex"`` (textbook): the solution of
      :math:`\min_{\varphi \ge 0,\ \sum_{c \in N_i} \varphi_c = \xi_i}
      \sum_{c \in N_i} \varphi_c^{r} \ell_c`, i.e.
      :math:`\varphi_c = \xi_i (r \ell_c)^{-1/(r-1)} / \sum_{c'} (r \ell_{c'})^{-1/(r-1)}`;
      the weights of a row sum to :math:`\xi_i`. At r = 3 the release's weights are larger
      by :math:`\sum_c \sqrt{a_c} / \sqrt{\sum_c a_c}` (:math:`a_c = 1/(r \ell_c)`), up to
      :math:`\sqrt{|N_i|}` (equal losses; 3.6x for 13 non-candidates).

    Computed in log space (no epsilon; :math:`\ell` is clamped at 1e-30), without gradient.
    Rows without non-candidates are all zero.
    """
    if not r > 1:
        raise ConfigError(f"r_ws must be > 1, got r_ws={r!r}; 1/(r-1) diverges at r = 1")
    if norm not in ("simplex", "sum_power"):
        raise ConfigError(f"neg_weight_norm must be 'simplex' or 'sum_power', got {norm!r}")
    with torch.no_grad():
        z = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
        negative = candidates.to(z) <= 0
        log_loss = torch.log(F.softplus(z).clamp(min=_TINY))  # log l_c, l_c = -log(1 - p_c)
        log_rl = math.log(r) + log_loss
        count = negative.sum(dim=1, keepdim=True)
        log_xi = -torch.log(count.clamp(min=1).to(z))
        exponent = torch.where(negative, -log_rl / (r - 1.0), torch.full_like(z, -math.inf))
        if norm == "simplex":
            log_norm = torch.logsumexp(exponent, dim=1, keepdim=True)
        else:
            inverse = torch.where(negative, -log_rl, torch.full_like(z, -math.inf))
            log_norm = torch.logsumexp(inverse, dim=1, keepdim=True) / (r - 1.0)
        log_phi = log_xi + exponent - torch.where(count > 0, log_norm, 0.0)
        return torch.where(negative, torch.exp(log_phi), torch.zeros_like(z)).to(logits.dtype)


def cam_prototypes(
    feature_maps: Tensor, weight: Tensor, tau: float
) -> tuple[Tensor, Tensor, float]:
    r"""CAM-screened prototype sums of one batch.

    With :math:`F` the ``(B, D, h, w)`` feature maps and :math:`W` the ``(C, D)`` classifier
    weight, :math:`\mathrm{CAM}_k = \sum_d W_{kd} F_d`; :math:`M_k = \mathrm{ReLU}(
    \mathrm{CAM}_k) / \max_{\text{batch}} \mathrm{ReLU}(\mathrm{CAM}_k)` and the prototype of
    class k is :math:`\sum_{(b, y, x): M_k > \tau} F_{b, :, y, x} / (B h w)`. Labels are not
    used. Classes whose CAM is :math:`\le 0` everywhere are not valid (no prototype).

    Returns:
        ``(C, D)`` sums of the screened feature vectors, ``(C,)`` bool valid mask and the
        pixel count ``B h w`` (divide the sums by it for the prototypes).
    """
    with torch.no_grad():
        fmap = feature_maps.detach().float()
        cam = torch.einsum("kd,bdhw->bkhw", weight.detach().float(), fmap).relu()
        peak = cam.amax(dim=(0, 2, 3))  # (C,)
        valid = peak > 0
        mask = (cam > tau * peak.view(1, -1, 1, 1)) & valid.view(1, -1, 1, 1)
        sums = torch.einsum("bkhw,bdhw->kd", mask.to(fmap), fmap)
        b, _, h, w = fmap.shape
        return sums, valid, float(b * h * w)


def cooccurrence_correlation(candidates: Tensor, norm: str = "row") -> Tensor:
    r"""``(C, C)`` initial correlation :math:`L_{ij} = P(s_j = 1 \mid s_i = 1)` of the candidate
    table, then :func:`normalise_correlation` (diagonal 0, normalise, diagonal 1)."""
    s = (candidates > 0).double()
    counts = s.sum(dim=0)
    joint = s.T @ s
    cond = torch.where(counts.unsqueeze(1) > 0, joint / counts.clamp(min=1).unsqueeze(1), 0.0)
    return normalise_correlation(cond.float(), norm)


def normalise_correlation(corr: Tensor, norm: str = "row") -> Tensor:
    """Diagonal set to 0, normalised, diagonal set to 1.

    ``"row"``: entry (i, j) divided by the sum of row i (each class spreads unit mass over the
    others). ``"transposed"`` (the released ``L / L.sum(1)`` broadcast): entry (i, j) divided
    by the sum of row j. An all-zero row (or divisor) leaves its entries 0.
    """
    if norm not in ("row", "transposed"):
        raise ConfigError(f"corr_norm must be 'row' or 'transposed', got {norm!r}")
    out = corr.clone().float()
    out.fill_diagonal_(0.0)
    sums = out.sum(dim=1)
    divisor = sums.unsqueeze(1) if norm == "row" else sums.unsqueeze(0)
    out = torch.where(divisor > 0, out / divisor.clamp(min=_TINY), torch.zeros_like(out))
    out.fill_diagonal_(1.0)
    return out


def kmeans_centroids(points: Tensor, n_clusters: int, seed: int = KMEANS_SEED) -> Tensor:
    """``(k, D)`` k-means centroids of ``(n, D)`` points (scikit-learn, k-means++, one init)."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    data = points.detach().double().cpu().numpy()
    with warnings.catch_warnings():  # fewer distinct points than clusters: still a valid fit
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = KMeans(n_clusters=n_clusters, random_state=seed, n_init="auto").fit(data)
    return torch.from_numpy(np.asarray(model.cluster_centers_)).float()


def centroid_similarity(centroids: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    """Mean cosine similarity over all centroid pairs of every two classes.

    Args:
        centroids: per class a ``(k, D)`` tensor, or None for a class without a fit.

    Returns:
        ``(C, C)`` similarities and the ``(C, C)`` bool mask of off-diagonal pairs where both
        classes have centroids.
    """
    c = len(centroids)
    have = torch.tensor([x is not None for x in centroids])
    sim = torch.zeros(c, c)
    fitted = [i for i in range(c) if centroids[i] is not None]
    if fitted:
        units = torch.stack([F.normalize(centroids[i].float(), dim=1) for i in fitted])
        means = torch.einsum("akd,bld->abkl", units, units).mean(dim=(2, 3))
        idx = torch.tensor(fitted)
        sim[idx.unsqueeze(1), idx.unsqueeze(0)] = means
    valid = have.unsqueeze(1) & have.unsqueeze(0) & ~torch.eye(c, dtype=torch.bool)
    return sim, valid


# --------------------------------------------------------------------- the method
@register_method
class CoNeS(Method):
    r"""CoNeS: candidate BCE plus a disambiguated BCE whose non-candidate terms are weighted by
    a closed-form negative-suppression solution; confidences flow through a label-correlation
    matrix built from k-means of CAM-screened class prototypes.

    State: the confidence table :math:`Q` (``N x C``, rows keyed by the batch ``index``, i.e.
    by image id), initialised uniform over each image's candidate set :math:`s`; the
    correlation :math:`L` (``C x C``), initialised from candidate co-occurrence; a per-class
    memory of the most recent ``memory_size`` prototypes. Per batch, with :math:`p = \sigma(z)`
    (no gradient through any of the state):

    1. CAM screening (:func:`cam_prototypes`) with the classifier weight, taken by name;
       each valid class pushes its prototype into its memory;
    2. :math:`q = \mathrm{normalise}((p L) \odot s)`, :math:`(pL)_c = \sum_j p_j L_{jc}`;
       :math:`Q_i \leftarrow \mu Q_i + (1 - \mu) q` (before the loss);
    3. targets :math:`t_{ic} = 1[Q_{ic} > 1 / |s_i|]`;
    4. weights :math:`\omega = s + \varphi` with :math:`\varphi` from :func:`negative_weights`
       (exponent :math:`r` = ``r_ws``);
    5. :math:`L = \mathrm{BCE}(z, s) + \beta\, \mathrm{BCE}_{\omega}(z, t)`, each summed over
       classes and averaged over the batch.

    After every epoch (the release does it at the start of the next one, from its epoch 2):
    one k-means fit per class memory (``n_clusters``, seed 42), :math:`\mathrm{sim}_{kj}` =
    mean cosine similarity over all centroid pairs, :math:`L_{kj} \leftarrow \gamma L_{kj} +
    (1 - \gamma) \mathrm{sim}_{kj}`, then diagonal 0, normalise, diagonal 1.

    Differences from the released code (intended behaviour; see the spec's pitfalls):

    * negative weights: the release's normaliser (``neg_weight_norm: sum_power``, the
      default), computed in log space; the textbook simplex form (``simplex``, equal at
      r = 2, up to :math:`\sqrt{|N_i|}` times smaller at r = 3) is a searchable variant;
    * correlation normalisation: rows of :math:`L` sum to 1 by default (``corr_norm=
      "transposed"`` is the release's broadcast, dividing (i, j) by row j's sum);
    * the CAM weight is the classifier's ``weight`` attribute (the release indexes
      ``parameters()[312]``); the release's per-class selector networks, created and
      optimised but never used, do not exist here;
    * k-means is fit once per class per epoch (the release refits C (C - 1) times); a class
      with fewer than ``n_clusters`` prototypes is skipped and its entries of :math:`L` keep
      their value (the release crashes); similarities are clamped at 0 so :math:`L` stays
      non-negative (post-ReLU features give non-negative similarities anyway);
    * the classifier gets ``classifier_lr_mult`` x the learning rate (the release's 10x group
      matches no parameter name and is empty); losses are summed over classes and averaged
      over the batch (the release averages over ``B x C``).

    Several workers: prototype sums and their pixel counts are all-reduced every batch (each
    worker normalises CAMs by its own batch maximum), so every worker holds the same memories
    and computes the same :math:`L`, which is also averaged over workers; each worker updates
    the rows of :math:`Q` of its own images, merged with ``dist.merge_rows`` at epoch end.
    """

    name = "cones"
    Params = CoNeSParams
    params: CoNeSParams
    regimes = ("candidate",)
    logit_loss = False

    def __init__(self, params: CoNeSParams, task: TaskInfo) -> None:
        super().__init__(params, task)
        c = task.num_classes
        self.candidates = torch.zeros(0, c)  # set by set_train_targets (or from a state)
        self.confidence = torch.zeros(task.num_train, c)
        self.correlation = torch.eye(c)
        self.memory = torch.zeros(c, params.memory_size, 0)
        self.memory_count = torch.zeros(c, dtype=torch.long)
        self.touched = torch.zeros(task.num_train, dtype=torch.bool)
        #: wall time of the last epoch's k-means fits and correlation update (seconds)
        self.kmeans_seconds = 0.0

    # ----------------------------------------------------------------- set-up
    def set_train_targets(self, targets: Tensor) -> None:
        """Candidate sets ``s``, uniform ``Q = s / |s|`` and the co-occurrence ``L``."""
        s = (targets > 0).float().cpu()
        self.candidates = s
        self.confidence = s / s.sum(dim=1, keepdim=True).clamp(min=1.0)
        self.correlation = cooccurrence_correlation(s, self.params.corr_norm)
        self.touched = torch.zeros(len(s), dtype=torch.bool)

    def configure_model(self, model: nn.Module) -> nn.Module:
        """The backbone itself; it must expose ``feature_maps``, ``pool_maps`` and a linear
        ``classifier``."""
        if not all(callable(getattr(model, f, None)) for f in ("feature_maps", "pool_maps")) or (
            not isinstance(getattr(model, "classifier", None), nn.Linear)
        ):
            raise ConfigError(
                f"cones needs a tuner.backbones.Classifier (feature_maps, pool_maps + a linear "
                f"`classifier`), got {type(model).__name__}; build it with build_model"
            )
        return model

    def lr_scale(self, param_name: str) -> float:
        return self.params.classifier_lr_mult if param_name.startswith("classifier.") else 1.0

    # ----------------------------------------------------------------- per batch
    def updated_confidence(self, logits: Tensor, index: Tensor, candidates: Tensor) -> Tensor:
        """``(B, C)`` rows ``mu Q_i + (1 - mu) normalise((p L) * s)`` (no gradient); a row
        whose propagated mass is 0 keeps its value."""
        with torch.no_grad():
            p = torch.sigmoid(logits.detach().float())
            old = self.confidence[index.cpu()].to(p.device)
            q = (p @ self.correlation.to(p.device)) * candidates.to(p)
            total = q.sum(dim=1, keepdim=True)
            q = torch.where(total > 0, q / total.clamp(min=_TINY), old)
            mu = self.params.conf_momentum
            return mu * old + (1.0 - mu) * q

    def training_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Candidate BCE + beta x weighted BCE on disambiguated targets; also returns the
        new confidence rows and the batch's prototype sums for :meth:`on_batch_end`."""
        prm = self.params
        fmap = model.feature_maps(batch["image"])
        logits = model.classifier(model.pool_maps(fmap))  # the model's own pooling (eval's)
        sums, valid, pixels = cam_prototypes(fmap, model.classifier.weight, prm.tau_cam)
        s = batch["target"].to(logits)
        confidence = self.updated_confidence(logits, batch["index"], s)
        size = s.sum(dim=1, keepdim=True)
        share = torch.where(size > 0, 1.0 / size.clamp(min=1.0), torch.full_like(size, math.inf))
        target = (confidence > share).to(logits)
        omega = s + negative_weights(logits, s, prm.r_ws, prm.neg_weight_norm)
        bce = F.binary_cross_entropy_with_logits(logits, s, reduction="none").sum(1).mean()
        weighted = F.binary_cross_entropy_with_logits(
            logits, target, weight=omega, reduction="none"
        ).sum(1).mean()
        return {
            "loss": bce + prm.beta * weighted,
            "logits": logits,
            "confidence": confidence,
            "prototype_sums": sums,
            "prototype_valid": valid,
            "prototype_pixels": torch.tensor(pixels),
        }

    def on_batch_end(self, batch: Batch, output: Mapping[str, Tensor]) -> None:
        index = batch["index"].cpu()
        self.confidence[index] = output["confidence"].detach().float().cpu()
        self.touched[index] = True
        sums = output["prototype_sums"].detach().float().cpu()
        valid = output["prototype_valid"].detach().float().cpu()
        pixels = output["prototype_pixels"].detach().float().cpu().reshape(1)
        if self.dist.world_size > 1:
            packed = torch.cat([sums.reshape(-1), valid, pixels])
            packed = self.dist.all_reduce_sum(packed)
            n = sums.numel()
            sums, valid, pixels = packed[:n].view_as(sums), packed[n:-1], packed[-1:]
        self.push_prototypes(sums / pixels.clamp(min=1.0), valid > 0)

    def push_prototypes(self, prototypes: Tensor, valid: Tensor) -> None:
        """Write the ``(C, D)`` prototypes of the ``valid`` classes into their ring buffers."""
        c, d = prototypes.shape
        if self.memory.shape[2] != d:
            self.memory = torch.zeros(c, self.params.memory_size, d)
            self.memory_count = torch.zeros(c, dtype=torch.long)
        classes = valid.nonzero().flatten()
        slots = self.memory_count[classes] % self.params.memory_size
        self.memory[classes, slots] = prototypes[classes]
        self.memory_count[classes] += 1

    # ----------------------------------------------------------------- per epoch
    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.touched = torch.zeros(len(self.confidence), dtype=torch.bool)

    def on_epoch_end(self, epoch: int) -> None:
        self.confidence = self.dist.merge_rows(self.confidence, self.touched)
        t0 = time.perf_counter()
        self.update_correlation()
        self.kmeans_seconds = time.perf_counter() - t0

    def class_centroids(self) -> list[Tensor | None]:
        """One k-means fit per class memory; None where it holds < ``n_clusters`` entries."""
        filled = self.memory_count.clamp(max=self.params.memory_size)
        k = self.params.n_clusters
        return [
            kmeans_centroids(self.memory[c, : int(n)], k) if n >= k and self.memory.shape[2]
            else None
            for c, n in enumerate(filled.tolist())
        ]

    def update_correlation(self) -> None:
        """``L <- gamma L + (1 - gamma) sim`` on the fitted class pairs, then renormalised."""
        sim, valid = centroid_similarity(self.class_centroids())
        if valid.any():
            gamma = self.params.corr_momentum
            mixed = gamma * self.correlation + (1.0 - gamma) * sim.clamp(min=0.0)
            corr = torch.where(valid, mixed, self.correlation)
            self.correlation = normalise_correlation(corr, self.params.corr_norm)
        if self.dist.world_size > 1:
            self.correlation = self.dist.all_reduce_mean(self.correlation)

    # ----------------------------------------------------------------- state
    def epoch_metrics(self) -> dict[str, float]:
        """The k-means time of the last correlation update (reported as method_kmeans_seconds)."""
        return {"kmeans_seconds": self.kmeans_seconds}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "confidence": self.confidence.clone(),
            "correlation": self.correlation.clone(),
            "memory": self.memory.clone(),
            "memory_count": self.memory_count.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.confidence = torch.as_tensor(state["confidence"]).float().clone()
        self.correlation = torch.as_tensor(state["correlation"]).float().clone()
        self.memory = torch.as_tensor(state["memory"]).float().clone()
        self.memory_count = torch.as_tensor(state["memory_count"]).long().clone()
        if self.candidates.shape != self.confidence.shape:  # restored without the label table
            self.candidates = (self.confidence > 0).float()
        if self.touched.shape != (len(self.confidence),):
            self.touched = torch.zeros(len(self.confidence), dtype=torch.bool)
