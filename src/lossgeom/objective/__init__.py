"""Layer 1: model + loss + data as a function of a flat parameter vector."""

from lossgeom.objective._data import Batch, DataSource
from lossgeom.objective._layout import (
    Normalization,
    OneDim,
    check_direction,
    check_normalization,
    filter_blocks,
    filter_view,
    normalize_direction,
)
from lossgeom.objective._objective import (
    Counters,
    NonFiniteError,
    Objective,
)
from lossgeom.objective._optimize import MinimizeLog, minimize
from lossgeom.objective._products import hvp_from_graph
from lossgeom.objective._reduction import LossReduction, Totals, resolve_reduction

__all__ = [
    # the objective
    "Batch",
    "Counters",
    "DataSource",
    "NonFiniteError",
    "Objective",
    "hvp_from_graph",
    # how a loss reduces over samples: the loss over a data set
    "LossReduction",
    "Totals",
    "resolve_reduction",
    # parameter layout: directions and their normalization
    "Normalization",
    "OneDim",
    "check_direction",
    "check_normalization",
    "filter_blocks",
    "filter_view",
    "normalize_direction",
    # a small Adam loop on one tensor (curves, subspace training)
    "MinimizeLog",
    "minimize",
]
