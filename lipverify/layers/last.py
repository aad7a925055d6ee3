"""Last layers of a LipConvNet.

- :class:`LLN` (Last Layer Normalization, ICLR 2022 Sec. 5): a linear map whose rows are
  normalized to unit l2 norm. It is *not* 1-Lipschitz in general (its norm can reach
  sqrt(classes)); certificates instead use the exact pairwise row distances ``||w_y - w_j||``,
  so the claimed bound covers the map to the features, not the logits.
- The orthogonal last layer is a 1x1 :class:`~lipverify.layers.soc.SOC` on the flattened
  features, 1-Lipschitz within the SOC truncation tolerance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LLN"]


class LLN(nn.Linear):
    """``y = (W / ||W||_row) x + b`` on flattened features."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(in_features))

    def normalized_weight(self) -> torch.Tensor:
        return self.weight / self.weight.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(1), self.normalized_weight(), self.bias)
