"""The Hessian of the mean loss as a matrix-free operator."""

from __future__ import annotations

from torch import Tensor

from lossgeom.curvature._base import ObjectiveOperator
from lossgeom.objective import Objective

__all__ = ["HessianOperator", "hessian"]


class HessianOperator(ObjectiveOperator):
    r"""The Hessian :math:`\nabla^2 L(\theta)` of an objective, through ``obj.hvp``."""

    def _matmat(self, V: Tensor) -> Tensor:
        return self.objective.hvp(V, self.theta)


def hessian(objective: Objective, theta: Tensor | None = None) -> HessianOperator:
    """The Hessian of ``objective`` at ``theta`` (default: the model's parameters).

    Args:
        objective: the objective.
        theta: parameters; copied, so later training does not change the operator.

    Returns:
        A symmetric operator: ``H @ v`` for ``(d,)`` or ``(d, m)``, ``to_dense()``.

    Example:
        >>> import torch
        >>> from lossgeom import Objective
        >>> X = torch.randn(30, 2, dtype=torch.float64); y = X.sum(1, keepdim=True)
        >>> obj = Objective(torch.nn.Linear(2, 1, bias=False).double(), torch.nn.MSELoss(), (X, y))
        >>> torch.allclose(hessian(obj).to_dense(), 2 * X.T @ X / 30)
        True
    """
    return HessianOperator(objective, theta)
