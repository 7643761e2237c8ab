"""What the spectral summaries share: an operator from an Objective, a scalar result."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lossgeom._results import Result
from lossgeom.curvature.hessian import hessian
from lossgeom.linalg import SymmetricOperator
from lossgeom.objective import Objective

__all__ = ["SpectralEstimate", "as_operator"]


def as_operator(obj: SymmetricOperator | Objective) -> SymmetricOperator:
    """An operator as given, or the Hessian of an :class:`Objective`."""
    if isinstance(obj, Objective):
        return hessian(obj)
    if isinstance(obj, SymmetricOperator):
        return obj
    raise TypeError(
        "expected a lossgeom operator (lg.hessian(obj), lg.ggn(obj), "
        "lg.DenseOperator(A), ...) or an Objective (meaning its Hessian); got "
        f"{type(obj).__name__}."
    )


@dataclass(frozen=True)
class SpectralEstimate(Result):
    """A scalar spectral quantity with its error bar and definition.

    Attributes:
        value: the estimate.
        stderr: statistical standard error over random probes (jackknife for
            ratios); ``nan`` when the estimate has no random part.
        bound: deterministic error bound (from eigenpair residuals); ``nan``
            when there is none.
        converged: whether the eigenpairs behind it met their tolerance
            (always ``True`` for quadrature estimates, which have no tolerance).
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`.
    """

    value: float
    stderr: float = math.nan
    bound: float = math.nan
    converged: bool = True
