"""Lipschitz layers: SOC convolutions, pair activations, last layers.

Every layer here documents its guarantee in its module docstring. Convolution families are
registered in :data:`CONV_LAYERS` under the names ``LipConvNet(conv=...)`` accepts.
"""

from lipverify.layers.activations import (
    HouseholderOrder1,
    HouseholderOrder2,
    MaxMin,
    make_activation,
)
from lipverify.layers.bcop import BCOP
from lipverify.layers.cayley import CayleyConv, CayleyLinear
from lipverify.layers.last import LLN
from lipverify.layers.soc import SOC, skew_filter, space_to_depth

CONV_LAYERS = {"soc": SOC, "cayley": CayleyConv, "bcop": BCOP}

__all__ = [
    "SOC",
    "CayleyConv",
    "CayleyLinear",
    "BCOP",
    "LLN",
    "MaxMin",
    "HouseholderOrder1",
    "HouseholderOrder2",
    "make_activation",
    "skew_filter",
    "space_to_depth",
    "CONV_LAYERS",
]
