"""lossgeom: the geometry of neural-network loss landscapes, measured and certified."""

from lossgeom import geometry as geometry  # subpackage: lg.geometry
from lossgeom import measures as measures  # subpackage: lg.measures
from lossgeom import testing as testing  # subpackage: lg.testing
from lossgeom import train as train  # callable subpackage: lg.train(config)
from lossgeom import zoo as zoo  # subpackage: lg.zoo
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
    logdet,
    negative_mass,
    outliers,
    trace,
)
from lossgeom.geometry import (
    AlignmentResult,
    ConnectResult,
    PathResult,
    PCADirections,
    RayCurvature,
    SliceResult,
    Surface,
    align,
    connect,
    hessian_directions,
    interpolate,
    load_result,
    normalize_direction,
    orthogonalize,
    pca_directions,
    permutation_groups,
    plot_paths,
    plot_slice,
    plot_surface,
    random_direction,
    random_directions,
    ray_curvature,
    save_result,
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
    EffectiveDimensionResult,
    IntrinsicDimensionResult,
    effective_dimension,
    intrinsic_dimension,
    random_projection,
)
from lossgeom.objective import Counters, NonFiniteError, Objective
from lossgeom.train import TrainConfig, TrainResult, load_config

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
    "PCADirections",
    "PathResult",
    "RayCurvature",
    "SliceResult",
    "Surface",
    "align",
    "connect",
    "hessian_directions",
    "interpolate",
    "load_result",
    "normalize_direction",
    "orthogonalize",
    "pca_directions",
    "permutation_groups",
    "plot_paths",
    "plot_slice",
    "plot_surface",
    "random_direction",
    "random_directions",
    "ray_curvature",
    "save_result",
    "slice_1d",
    "slice_2d",
    # measures (lossgeom.measures holds the rest)
    "EffectiveDimensionResult",
    "IntrinsicDimensionResult",
    "effective_dimension",
    "intrinsic_dimension",
    "random_projection",
    # training (lossgeom.train holds the rest; lg.train is the function)
    "TrainConfig",
    "TrainResult",
    "load_config",
    "train",
]
