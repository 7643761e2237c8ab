"""Layer 2: scalar diagnostics: sharpness, gradient noise, dimensionality, difficulty."""

from lossgeom.linalg.projections import (
    DenseProjection,
    FastfoodProjection,
    Projection,
    SparseProjection,
    fwht,
    random_projection,
)
from lossgeom.measures._difficulty import (
    DifficultyIndexResult,
    GradientFractionResult,
    NoiseAlignmentResult,
    QuadraticPredictionResult,
    difficulty_index,
    gradient_fraction,
    noise_alignment,
    quadratic_prediction,
)
from lossgeom.measures._dimension import (
    IntrinsicDimensionResult,
    SubspaceRun,
    intrinsic_dimension,
    subspace_train,
)
from lossgeom.measures._escape import NoiseCurvatureResult, noise_curvature
from lossgeom.measures._noise import (
    GradientNoiseResult,
    NoiseScaleResult,
    gradient_noise,
    noise_scale,
)
from lossgeom.measures._registry import (
    CALLBACKS,
    check_options,
    default_key,
    register,
    row_entries,
    run_measure,
)
from lossgeom.measures._sharpness import SharpnessResult, sharpness
from lossgeom.measures._trajectory import (
    EffectiveDimensionResult,
    TrajectoryRecorder,
    effective_dimension,
)

register("sharpness", sharpness)
register("noise_scale", noise_scale)
register("gradient_fraction", gradient_fraction)
register("difficulty_index", difficulty_index)
register("noise_curvature", noise_curvature)

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
    "NoiseCurvatureResult",
    "NoiseScaleResult",
    "QuadraticPredictionResult",
    "difficulty_index",
    "gradient_fraction",
    "gradient_noise",
    "noise_alignment",
    "noise_curvature",
    "noise_scale",
    "quadratic_prediction",
    # measures by name (training callbacks, studies)
    "CALLBACKS",
    "check_options",
    "default_key",
    "register",
    "row_entries",
    "run_measure",
]
