"""How operations act on hidden units: the tables the permutation analysis reads.

Modules, functions and tensor methods are sorted by what they do to a permuted
axis: act on each unit alone (elementwise, activations, dropout, softmax), pool
over spatial axes, reduce axes away, or only reshape. Anything not listed here
that sees a permuted axis is refused by the analysis
(:mod:`lossgeom.geometry._permutation_graph`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "_ELEMENTWISE_FUNCTIONS",
    "_ELEMENTWISE_METHODS",
    "_ELEMENTWISE_MODULES",
    "_POOL_FUNCTIONS",
    "_POOL_MODULES",
    "_REDUCE_FUNCTIONS",
    "_REDUCE_METHODS",
    "_RESHAPE_FUNCTIONS",
    "_RESHAPE_METHODS",
    "_SHAPE_METHODS",
]

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    # softmax along an axis is equivariant to permutations of that axis
    nn.Softmax,
    nn.LogSoftmax,
)
_POOL_MODULES: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
    nn.LPPool1d: 1,
    nn.LPPool2d: 2,
}
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.neg,
    torch.maximum,
    torch.minimum,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    torch.exp,
    torch.abs,
    torch.clamp,
    torch.softmax,
    torch.log_softmax,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.celu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.softplus,
    F.tanh,
    F.sigmoid,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.softmax,
    F.log_softmax,
}
_ELEMENTWISE_METHODS = {
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "div",
    "div_",
    "neg",
    "relu",
    "relu_",
    "tanh",
    "sigmoid",
    "exp",
    "abs",
    "clamp",
    "clamp_min",
    "clamp_max",
    "pow",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "to",
    "type_as",
    "softmax",
    "log_softmax",
}
_POOL_FUNCTIONS: dict[Any, int] = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
# Reductions that are invariant to permutations of the reduced axes.
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "logsumexp"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {
    "flatten",
    "view",
    "reshape",
    "squeeze",
    "unsqueeze",
    "unflatten",
    "view_as",
    "reshape_as",
}
_SHAPE_METHODS = {"size", "dim"}
