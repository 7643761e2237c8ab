"""Layer 2: scalar diagnostics: sharpness, gradient noise, dimensionality, difficulty."""

from lossgeom.measures._dimension import (
    DenseProjection,
    EffectiveDimensionResult,
    FastfoodProjection,
    IntrinsicDimensionResult,
    Projection,
    SparseProjection,
    SubspaceRun,
    TrajectoryRecorder,
    effective_dimension,
    fwht,
    intrinsic_dimension,
    random_projection,
    subspace_train,
)
from lossgeom.measures._registry import CALLBACKS, register

__all__ = [
    # dimensionality
    "DenseProjection",
    "EffectiveDimensionResult",
    "FastfoodProjection",
    "IntrinsicDimensionResult",
    "Projection",
    "SparseProjection",
    "SubspaceRun",
    "TrajectoryRecorder",
    "effective_dimension",
    "fwht",
    "intrinsic_dimension",
    "random_projection",
    "subspace_train",
    # callbacks by name
    "CALLBACKS",
    "register",
]
