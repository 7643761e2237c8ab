"""lossgeom: the geometry of neural-network loss landscapes, measured and certified."""

from lossgeom import _results
from lossgeom import geometry as geometry  # subpackage: lg.geometry
from lossgeom import measures as measures  # subpackage: lg.measures
from lossgeom import optim as optim  # subpackage: lg.optim
from lossgeom import testing as testing  # subpackage: lg.testing
from lossgeom import theory as theory  # subpackage: lg.theory
from lossgeom import train as train  # callable subpackage: lg.train(config)
from lossgeom import zoo as zoo  # subpackage: lg.zoo
from lossgeom._results import Cost, Result, load_result, save_result
from lossgeom.curvature import (
    GGNOperator,
    GradientCovarianceOperator,
    HessianOperator,
    OutlierResult,
    SpectralEstimate,
    condition_number,
    density,
    diagonal,
    effective_rank,
    eigenvalues,
    ggn,
    gradient_covariance,
    hessian,
    hessian_directions,
    logdet,
    negative_mass,
    outliers,
    trace,
)
from lossgeom.geometry import (
    AlignmentResult,
    ConnectResult,
    NEBResult,
    PathResult,
    PCADirections,
    RayCurvature,
    SliceResult,
    Surface,
    align,
    connect,
    interpolate,
    normalize_direction,
    orthogonalize,
    pca_directions,
    permutation_groups,
    random_direction,
    random_directions,
    ray_curvature,
    slice_1d,
    slice_2d,
)
from lossgeom.linalg import (
    DenseOperator,
    DensityResult,
    DiagonalResult,
    EigenResult,
    SymmetricOperator,
    TraceResult,
)
from lossgeom.measures import (
    DifficultyIndexResult,
    EffectiveDimensionResult,
    GradientFractionResult,
    GradientNoiseResult,
    IntrinsicDimensionResult,
    NoiseAlignmentResult,
    NoiseCurvatureResult,
    NoiseScaleResult,
    QuadraticPredictionResult,
    SharpnessResult,
    difficulty_index,
    effective_dimension,
    gradient_fraction,
    gradient_noise,
    intrinsic_dimension,
    noise_alignment,
    noise_curvature,
    noise_scale,
    quadratic_prediction,
    random_projection,
    sharpness,
)
from lossgeom.objective import Counters, NonFiniteError, Objective
from lossgeom.report import (
    plot_density,
    plot_paths,
    plot_slice,
    plot_surface,
    plot_training,
)
from lossgeom.train import TrainConfig, TrainResult, load_config

__version__ = "0.1.0"

__all__ = [
    # results
    "Cost",
    "Result",
    "load_result",
    "save_result",
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
    "DensityResult",
    "DiagonalResult",
    "EigenResult",
    "TraceResult",
    "OutlierResult",
    "SpectralEstimate",
    "condition_number",
    "density",
    "diagonal",
    "effective_rank",
    "eigenvalues",
    "logdet",
    "negative_mass",
    "outliers",
    "trace",
    # landscape geometry
    "AlignmentResult",
    "ConnectResult",
    "NEBResult",
    "PCADirections",
    "PathResult",
    "RayCurvature",
    "SliceResult",
    "Surface",
    "align",
    "connect",
    "hessian_directions",
    "interpolate",
    "normalize_direction",
    "orthogonalize",
    "pca_directions",
    "permutation_groups",
    "random_direction",
    "random_directions",
    "ray_curvature",
    "slice_1d",
    "slice_2d",
    # measures (lossgeom.measures holds the rest)
    "DifficultyIndexResult",
    "EffectiveDimensionResult",
    "GradientFractionResult",
    "GradientNoiseResult",
    "IntrinsicDimensionResult",
    "NoiseAlignmentResult",
    "NoiseCurvatureResult",
    "NoiseScaleResult",
    "QuadraticPredictionResult",
    "SharpnessResult",
    "difficulty_index",
    "effective_dimension",
    "gradient_fraction",
    "gradient_noise",
    "intrinsic_dimension",
    "noise_alignment",
    "noise_curvature",
    "noise_scale",
    "quadratic_prediction",
    "random_projection",
    "sharpness",
    # figures (lossgeom.report holds the rest)
    "plot_density",
    "plot_paths",
    "plot_slice",
    "plot_surface",
    "plot_training",
    # training (lossgeom.train holds the rest; lg.train is the function)
    "TrainConfig",
    "TrainResult",
    "load_config",
    "train",
]


_results.LAZY_MODULES[:] = ["lossgeom.study", "lossgeom.analysis"]


def __getattr__(name: str):
    """``lg.study``, ``lg.analysis``: imported on first use (they bring pandas)."""
    if name in ("study", "analysis"):
        import importlib

        return importlib.import_module(f"lossgeom.{name}")
    raise AttributeError(f"module 'lossgeom' has no attribute {name!r}")
