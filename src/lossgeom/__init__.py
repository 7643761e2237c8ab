"""lossgeom: the geometry of neural-network loss landscapes, measured and certified."""

from lossgeom.curvature import (
    GGNOperator,
    GradientCovarianceOperator,
    HessianOperator,
    ggn,
    gradient_covariance,
    hessian,
)
from lossgeom.linalg import DenseOperator, SymmetricOperator
from lossgeom.objective import Counters, NonFiniteError, Objective

__version__ = "0.1.0"

__all__ = [
    # objective
    "Counters",
    "NonFiniteError",
    "Objective",
    # operators
    "DenseOperator",
    "GGNOperator",
    "GradientCovarianceOperator",
    "HessianOperator",
    "SymmetricOperator",
    "ggn",
    "gradient_covariance",
    "hessian",
]
