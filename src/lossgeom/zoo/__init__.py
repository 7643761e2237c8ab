"""Layer 3: models and data sets (a first slice: sklearn digits and an MLP)."""

from lossgeom.zoo._digits import digits
from lossgeom.zoo._mlp import mlp

__all__ = ["digits", "mlp"]
