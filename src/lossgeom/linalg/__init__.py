"""Layer 0: matrix-free linear algebra on symmetric operators (tensors only)."""

from lossgeom.linalg._operator import (
    DenseOperator,
    NonFiniteError,
    SymmetricOperator,
    check_block,
)
from lossgeom.linalg.density import (
    DensityResult,
    Quadrature,
    kpm_density,
    slq,
    slq_density,
)
from lossgeom.linalg.diagonal import DiagonalResult, diagonal_estimate
from lossgeom.linalg.lanczos import EigenResult, lanczos, power_iteration
from lossgeom.linalg.trace import TraceResult, trace_estimate

__all__ = [
    "DenseOperator",
    "DensityResult",
    "DiagonalResult",
    "Quadrature",
    "EigenResult",
    "NonFiniteError",
    "SymmetricOperator",
    "TraceResult",
    "check_block",
    "diagonal_estimate",
    "kpm_density",
    "slq",
    "slq_density",
    "lanczos",
    "power_iteration",
    "trace_estimate",
]
