"""LipConvNet-5 to 40 (Singla & Feizi 2021; Singla, Singla & Feizi 2022).

Guarantee: the map pixels -> features is ``1/min(std)``-Lipschitz (upper bound, within each
convolution's tolerance: SOC's Taylor truncation, BCOP's Björck convergence, Cayley's float
error), because every block is a (near-)orthogonal convolution (``conv="soc"``, ``"cayley"`` or
``"bcop"``) followed by a GNP activation, after an input normalization whose Lipschitz constant
is ``1/min(std)``. The model *claims* this bound for the map its certificate uses: logits for an
orthogonal last layer, features for LLN (see :mod:`lipverify.certificates`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lipverify.layers import BCOP, CONV_LAYERS, LLN, SOC, CayleyLinear, make_activation

__all__ = ["LipConvNet", "Normalize", "LipBlock", "ORTHO_LAST_LAYERS"]


def _soc_last(features: int, classes: int) -> nn.Module:
    return SOC(features, classes, kernel_size=1)


def _bcop_last(features: int, classes: int) -> nn.Module:
    return BCOP(features, classes, kernel_size=1)


# Orthogonal last layer per conv family; other families register theirs here.
ORTHO_LAST_LAYERS = {"soc": _soc_last, "cayley": CayleyLinear, "bcop": _bcop_last}


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel. Lipschitz constant ``1 / min(std)`` (exact)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std must have one entry per input channel")
        if min(std) <= 0:
            raise ValueError("std must be positive")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1))

    @property
    def lipschitz(self) -> float:
        return 1.0 / float(self.std.min())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class LipBlock(nn.Module):
    """One convolution followed by one pair activation."""

    def __init__(self, conv: nn.Module, activation: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x))


class LipConvNet(nn.Module):
    """The reference LipConvNet: five stages of ``num_layers / 5`` blocks, each stage ending
    with a stride-2 block (kernel 1 in stage 5), then an LLN or orthogonal last layer.

    Takes pixels in [0, 1], NCHW; normalizes inside.
    """

    def __init__(
        self,
        conv: str = "soc",
        activation: str = "maxmin",
        num_layers: int = 5,
        init_channels: int = 32,
        num_classes: int = 10,
        last_layer: str = "ortho",
        input_size: int = 32,
        in_channels: int = 3,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2507, 0.2507, 0.2507),
    ) -> None:
        super().__init__()
        if conv not in CONV_LAYERS:
            raise ValueError(f"unknown conv {conv!r}; choose one of {sorted(CONV_LAYERS)}")
        if num_layers not in range(5, 45, 5):
            raise ValueError(f"num_layers must be one of 5, 10, ..., 40, got {num_layers}")
        if last_layer not in ("ortho", "lln"):
            raise ValueError(f"last_layer must be 'ortho' or 'lln', got {last_layer!r}")
        if input_size % 32 or input_size <= 0:
            raise ValueError(f"input_size must be a positive multiple of 32, got {input_size}")
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean and std need {in_channels} entries (one per input channel)")
        self.config = dict(
            conv=conv, activation=activation, num_layers=num_layers,
            init_channels=init_channels, num_classes=num_classes, last_layer=last_layer,
            input_size=input_size, in_channels=in_channels,
            mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        )
        conv_cls = CONV_LAYERS[conv]
        self.normalize = Normalize(mean, std)
        block_size = num_layers // 5
        width = in_channels
        for stage in range(1, 6):
            planes = init_channels if stage == 1 else width
            blocks = []
            for b in range(block_size):
                last = b == block_size - 1
                stride, kernel = (2, 1 if stage == 5 else 3) if last else (1, 3)
                out = planes * stride
                blocks.append(
                    LipBlock(
                        conv_cls(width, out, kernel_size=kernel, stride=stride),
                        make_activation(activation, out),
                    )
                )
                width = out
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.num_features = (input_size // 32) ** 2 * width
        if last_layer == "lln":
            self.last_layer = LLN(self.num_features, num_classes)
        else:
            self.last_layer = ORTHO_LAST_LAYERS[conv](self.num_features, num_classes)

    # -- the claim ---------------------------------------------------------------------------
    @property
    def certificate_kind(self) -> str:
        """``"lln"`` or ``"ortho"``: which certificate formula applies."""
        return self.config["last_layer"]

    @property
    def lipschitz_claim(self) -> float:
        """Claimed Lipschitz bound of pixels -> logits (ortho) or pixels -> features (LLN)."""
        return self.normalize.lipschitz

    # -- the function ------------------------------------------------------------------------
    @property
    def blocks(self) -> list[LipBlock]:
        return [blk for s in range(1, 6) for blk in getattr(self, f"layer{s}")]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate map: pixels -> flattened features."""
        x = self.normalize(x)
        for s in range(1, 6):
            x = getattr(self, f"layer{s}")(x)
        return x.flatten(1)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        """Last layer on flattened features."""
        if isinstance(self.last_layer, LLN) or getattr(self.last_layer, "flat_input", False):
            return self.last_layer(f)
        return self.last_layer(f[:, :, None, None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
