"""Layer 2: loss-landscape geometry: directions, slices, paths, curves, alignment."""

from lossgeom.geometry._alignment import AlignmentResult, align
from lossgeom.geometry._curves import ConnectResult, connect, curve_weights
from lossgeom.geometry._directions import (
    PCADirections,
    orthogonalize,
    pca_directions,
    random_direction,
    random_directions,
)
from lossgeom.geometry._neb_result import NEBResult
from lossgeom.geometry._paths import BARRIER_DEFINITION, PathResult, interpolate
from lossgeom.geometry._permutation_graph import PermutationGroup
from lossgeom.geometry._permutations import permutation_groups, permute_model
from lossgeom.geometry._ray_curvature import RayCurvature, ray_curvature
from lossgeom.geometry._slice_results import SliceResult, Surface
from lossgeom.geometry._slices import slice_1d, slice_2d
from lossgeom.objective import normalize_direction

__all__ = [
    # directions
    "PCADirections",
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
    "NEBResult",
    "connect",
    "curve_weights",
    # permutation alignment
    "AlignmentResult",
    "PermutationGroup",
    "align",
    "permutation_groups",
    "permute_model",
]
