"""Layer 3: models and data sets (a first slice: sklearn digits, an MLP, CIFAR ResNets)."""

from lossgeom.zoo._digits import digits
from lossgeom.zoo._mlp import mlp
from lossgeom.zoo._resnet import cifar_resnet

__all__ = ["cifar_resnet", "digits", "mlp"]
