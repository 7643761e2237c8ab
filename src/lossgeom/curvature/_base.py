"""Shared machinery of the curvature operators: an operator bound to an Objective."""

from __future__ import annotations

from torch import Tensor

from lossgeom.linalg import SymmetricOperator
from lossgeom.objective import Objective

__all__ = ["ObjectiveOperator"]


class ObjectiveOperator(SymmetricOperator):
    """A symmetric operator of an :class:`Objective` at fixed parameters.

    The parameters are copied when the operator is built, so the operator stays
    the same matrix even if the model trains on afterwards.

    Attributes:
        objective: the objective the operator belongs to.
        theta: the parameters (a copy) at which the operator is taken.
    """

    def __init__(self, objective: Objective, theta: Tensor | None = None):
        if not isinstance(objective, Objective):
            raise TypeError(
                "expected a lossgeom Objective (lg.Objective(model, loss_fn, data)); "
                f"got {type(objective).__name__}."
            )
        super().__init__(objective.dim, objective.dtype, objective.device)
        self.objective = objective
        self.theta = objective.check_theta(theta).clone()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.shape[0]}, objective={self.objective!r})"
        )
