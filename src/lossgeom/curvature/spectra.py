"""Spectral summaries of curvature operators (an Objective means its Hessian).

The implementations live in one module per kind of summary:
:mod:`~lossgeom.curvature._estimates` (eigenvalues, trace, diagonal),
:mod:`~lossgeom.curvature._quadrature` (density, log-determinant, negative mass,
effective rank, by stochastic Lanczos quadrature) and
:mod:`~lossgeom.curvature._conditioning` (condition numbers, outliers), on the
shared :mod:`~lossgeom.curvature._spectral`.
"""

from lossgeom.curvature._conditioning import (
    OutlierResult,
    condition_number,
    outliers,
)
from lossgeom.curvature._estimates import diagonal, eigenvalues, trace
from lossgeom.curvature._quadrature import (
    density,
    effective_rank,
    logdet,
    negative_mass,
)
from lossgeom.curvature._spectral import SpectralEstimate, as_operator

__all__ = [
    "OutlierResult",
    "SpectralEstimate",
    "as_operator",
    "condition_number",
    "density",
    "diagonal",
    "effective_rank",
    "eigenvalues",
    "logdet",
    "negative_mass",
    "outliers",
    "trace",
]
