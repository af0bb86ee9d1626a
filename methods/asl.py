"""Asymmetric Loss (Ridnik et al., ICCV 2021), the baseline of the Hill/SPLC release."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.base import Batch, Method, MethodParams, hp
from methods.registry import register_method

__all__ = ["ASL", "ASLParams"]

_EPS = 1e-8


@dataclass(frozen=True)
class ASLParams(MethodParams):
    """Hyperparameters of :class:`ASL` (defaults: the paper's and the released train.py)."""

    gamma_neg: float = hp(4.0, 0.0, 10.0, doc="focusing exponent on negatives (gamma-)")
    gamma_pos: float = hp(0.0, 0.0, 10.0, doc="focusing exponent on positives (gamma+)")
    clip: float = hp(0.05, 0.0, 0.5, doc="probability margin shifted off negatives")
    detach_focal: bool = hp(
        False, choices=(False, True), doc="compute the focal weights without gradient"
    )


@register_method
class ASL(Method):
    r"""Asymmetric Loss: asymmetric focusing plus a probability shift on negatives.

    With :math:`p = \sigma(z)` and the shifted negative probability
    :math:`p_m = \max(p - \text{clip}, 0)`, per element

    .. math:: \ell = -\left[ y (1 - p)^{\gamma_+} \log p
              + (1 - y)\, p_m^{\gamma_-} \log (1 - p_m) \right]

    Logits and targets are ``(B, C)``; the loss is summed over classes and averaged over the
    batch (the released code sums over the batch too, i.e. it is ``B`` times larger).

    Differences from the released ``AsymmetricLoss``:

    * ``log p`` is ``logsigmoid(z)`` (and ``log(1 - p)`` is ``logsigmoid(-z)`` when
      ``clip == 0``) instead of ``log(clamp(., 1e-8))``, so per-element losses are not capped
      at ``-log(1e-8)``; with ``clip > 0``, ``1 - p_m = min(sigmoid(-z) + clip, 1)`` is
      clamped at ``1e-8`` as in the release. The base of ``p_m^gamma-`` is clamped at
      ``1e-8`` so that ``gamma_neg < 1`` keeps finite gradients where ``p_m = 0``.
    * The release builds the loss with ``disable_torch_grad_focal_loss=True`` (focal weights
      without gradient); here that is ``detach_focal`` and it defaults to False (the paper's
      loss). The value is the same either way, only the gradient differs.
    """

    name = "asl"
    Params = ASLParams
    params: ASLParams

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """Scalar loss from ``(B, C)`` logits and the ``(B, C)`` 0/1 ``batch["target"]``."""
        prm = self.params
        target = batch["target"].to(logits)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not prm.detach_focal):
            w_pos = torch.exp(prm.gamma_pos * F.logsigmoid(-logits))  # (1 - p)^gamma+
            p_m = (torch.sigmoid(logits) - prm.clip).clamp(min=_EPS)
            w_neg = p_m.pow(prm.gamma_neg)  # p_m^gamma-
        pos = w_pos * F.logsigmoid(logits)
        neg = w_neg * self._log_one_minus_pm(logits)
        elementwise = target * pos + (1.0 - target) * neg
        return -elementwise.sum(dim=1).mean()

    def _log_one_minus_pm(self, logits: Tensor) -> Tensor:
        """``log(1 - p_m) = log(min(sigmoid(-z) + clip, 1))``, ``(B, C)``."""
        if self.params.clip == 0:
            return F.logsigmoid(-logits)
        return torch.log((torch.sigmoid(-logits) + self.params.clip).clamp(min=_EPS, max=1.0))
