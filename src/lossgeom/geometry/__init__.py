"""Layer 2: loss-landscape geometry: directions, slices, paths, curves, alignment."""

from lossgeom.geometry._alignment import AlignmentResult, align
from lossgeom.geometry._curves import ConnectResult, connect, curve_weights
from lossgeom.geometry._directions import (
    PCADirections,
    hessian_directions,
    normalize_direction,
    orthogonalize,
    pca_directions,
    random_direction,
    random_directions,
)
from lossgeom.geometry._paths import BARRIER_DEFINITION, PathResult, interpolate
from lossgeom.geometry._permutations import (
    PermutationGroup,
    permutation_groups,
    permute_model,
)
from lossgeom.geometry._plots import plot_paths, plot_slice, plot_surface
from lossgeom.geometry._slices import (
    RayCurvature,
    SliceResult,
    Surface,
    ray_curvature,
    slice_1d,
    slice_2d,
)
from lossgeom.geometry._store import load_result, save_result

__all__ = [
    # directions
    "PCADirections",
    "hessian_directions",
    "normalize_direction",
    "orthogonalize",
    "pca_directions",
    "random_direction",
    "random_directions",
    # slices
    "RayCurvature",
    "SliceResult",
    "Surface",
    "ray_curvature",
    "slice_1d",
    "slice_2d",
    # paths
    "BARRIER_DEFINITION",
    "PathResult",
    "interpolate",
    # mode connectivity
    "ConnectResult",
    "connect",
    "curve_weights",
    # permutation alignment
    "AlignmentResult",
    "PermutationGroup",
    "align",
    "permutation_groups",
    "permute_model",
    # figures
    "plot_paths",
    "plot_slice",
    "plot_surface",
    # results
    "load_result",
    "save_result",
]
