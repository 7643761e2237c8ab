"""Layer 2: curvature operators of an Objective and their summaries."""

from lossgeom.curvature._base import ObjectiveOperator
from lossgeom.curvature.directions import hessian_directions
from lossgeom.curvature.ggn import GGNOperator, ggn
from lossgeom.curvature.gradient_covariance import (
    GradientCovarianceOperator,
    gradient_covariance,
)
from lossgeom.curvature.hessian import HessianOperator, hessian
from lossgeom.curvature.spectra import (
    OutlierResult,
    SpectralEstimate,
    as_operator,
    condition_number,
    density,
    diagonal,
    effective_rank,
    eigenvalues,
    logdet,
    negative_mass,
    outliers,
    trace,
)

__all__ = [
    "GGNOperator",
    "GradientCovarianceOperator",
    "HessianOperator",
    "ObjectiveOperator",
    "OutlierResult",
    "SpectralEstimate",
    "condition_number",
    "density",
    "diagonal",
    "effective_rank",
    "logdet",
    "negative_mass",
    "outliers",
    "as_operator",
    "eigenvalues",
    "ggn",
    "gradient_covariance",
    "hessian",
    "hessian_directions",
    "trace",
]
