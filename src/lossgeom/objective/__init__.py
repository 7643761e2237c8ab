"""Layer 1: model + loss + data as a function of a flat parameter vector."""

from lossgeom.objective._data import Batch, DataSource
from lossgeom.objective._objective import (
    Counters,
    NonFiniteError,
    Objective,
    hvp_from_graph,
)

__all__ = [
    "Batch",
    "Counters",
    "DataSource",
    "NonFiniteError",
    "Objective",
    "hvp_from_graph",
]
