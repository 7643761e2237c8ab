"""Layer 2: curvature operators of an Objective and their summaries."""

from lossgeom.curvature._base import ObjectiveOperator
from lossgeom.curvature.ggn import GGNOperator, ggn
from lossgeom.curvature.gradient_covariance import (
    GradientCovarianceOperator,
    gradient_covariance,
)
from lossgeom.curvature.hessian import HessianOperator, hessian

__all__ = [
    "GGNOperator",
    "GradientCovarianceOperator",
    "HessianOperator",
    "ObjectiveOperator",
    "ggn",
    "gradient_covariance",
    "hessian",
]
