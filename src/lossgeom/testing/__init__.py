"""Dense references for validating lossgeom's numbers on small models.

These build full ``d x d`` matrices with :mod:`torch.func` (``hessian``,
``jacrev``) or plain autograd loops, along a code path independent of the
matrix-free products in :class:`~lossgeom.Objective`: use them in float64 on
models with at most a few thousand parameters. :func:`assert_results_equal`
compares two results exactly (e.g. one saved and loaded back).
"""

from lossgeom.testing._reference import (
    exact_ggn,
    exact_gradient,
    exact_gradient_covariance,
    exact_hessian,
    exact_loss,
)
from lossgeom.testing._results import assert_results_equal

__all__ = [
    "assert_results_equal",
    "exact_gradient",
    "exact_gradient_covariance",
    "exact_ggn",
    "exact_hessian",
    "exact_loss",
]
