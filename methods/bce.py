"""Plain binary cross-entropy: the baseline every other loss reduces to at known settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from methods.base import Batch, Method, MethodParams
from methods.registry import register_method

__all__ = ["BCE", "BCEParams"]


@dataclass(frozen=True)
class BCEParams(MethodParams):
    """BCE has no hyperparameters."""


@register_method
class BCE(Method):
    r"""Binary cross-entropy with logits, treating every unobserved label as a negative.

    With :math:`p = \sigma(z)` and observed labels :math:`y \in \{0, 1\}`:

    .. math:: L = -\frac{1}{B} \sum_{b=1}^{B} \sum_{c=1}^{C}
              \left[ y_{bc} \log p_{bc} + (1 - y_{bc}) \log (1 - p_{bc}) \right]

    Reduction: sum over classes, mean over the batch (the platform-wide rule). The Hill/SPLC
    release sums over the batch as well, so its loss is ``B`` times this one.
    """

    name = "bce"
    Params = BCEParams

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """Scalar loss from ``(B, C)`` logits and the ``(B, C)`` 0/1 ``batch["target"]``."""
        target = batch["target"].to(logits)
        elementwise = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return elementwise.sum(dim=1).mean()
