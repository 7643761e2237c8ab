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
from lossgeom.measures._noise import (
    DifficultyIndexResult,
    GradientFractionResult,
    GradientNoiseResult,
    NoiseAlignmentResult,
    NoiseScaleResult,
    QuadraticPredictionResult,
    difficulty_index,
    gradient_fraction,
    gradient_noise,
    noise_alignment,
    noise_scale,
    quadratic_prediction,
)
from lossgeom.measures._registry import CALLBACKS, register
from lossgeom.measures._sharpness import SharpnessResult, sharpness

register("sharpness", sharpness)
register("noise_scale", noise_scale)
register("gradient_fraction", gradient_fraction)
register("difficulty_index", difficulty_index)

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
    # sharpness
    "SharpnessResult",
    "sharpness",
    # gradient noise and difficulty
    "DifficultyIndexResult",
    "GradientFractionResult",
    "GradientNoiseResult",
    "NoiseAlignmentResult",
    "NoiseScaleResult",
    "QuadraticPredictionResult",
    "difficulty_index",
    "gradient_fraction",
    "gradient_noise",
    "noise_alignment",
    "noise_scale",
    "quadratic_prediction",
    # callbacks by name
    "CALLBACKS",
    "register",
]
