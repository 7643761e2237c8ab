"""lossgeom: the geometry of neural-network loss landscapes, measured and certified."""

from lossgeom.curvature import (
    GGNOperator,
    GradientCovarianceOperator,
    HessianOperator,
    eigenvalues,
    ggn,
    gradient_covariance,
    hessian,
    trace,
)
from lossgeom.linalg import DenseOperator, EigenResult, SymmetricOperator, TraceResult
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
    # spectra
    "EigenResult",
    "TraceResult",
    "eigenvalues",
    "trace",
]
