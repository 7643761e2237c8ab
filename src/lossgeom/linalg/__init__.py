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
from lossgeom.linalg.lobpcg import lobpcg
from lossgeom.linalg.projections import (
    DenseProjection,
    FastfoodProjection,
    Projection,
    ProjectionKind,
    SparseProjection,
    fwht,
    random_projection,
)
from lossgeom.linalg.trace import TraceResult, trace_estimate

__all__ = [
    # operators
    "DenseOperator",
    "NonFiniteError",
    "SymmetricOperator",
    "check_block",
    # eigenvalues
    "EigenResult",
    "lanczos",
    "lobpcg",
    "power_iteration",
    # trace and diagonal
    "DiagonalResult",
    "TraceResult",
    "diagonal_estimate",
    "trace_estimate",
    # spectral density
    "DensityResult",
    "Quadrature",
    "kpm_density",
    "slq",
    "slq_density",
    # random projections
    "DenseProjection",
    "FastfoodProjection",
    "Projection",
    "ProjectionKind",
    "SparseProjection",
    "fwht",
    "random_projection",
]
