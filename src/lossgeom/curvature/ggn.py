"""The generalized Gauss-Newton matrix as a matrix-free operator."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from lossgeom.curvature._base import ObjectiveOperator
from lossgeom.objective import Objective

__all__ = ["GGNOperator", "ggn"]


class GGNOperator(ObjectiveOperator):
    r"""The generalized Gauss-Newton matrix :math:`G = \sum_b J_b^T H_b J_b`.

    :math:`J_b` is the Jacobian of the model's outputs on batch ``b`` with respect
    to the parameters and :math:`H_b` the Hessian of batch ``b``'s contribution
    to the objective (:meth:`Objective.loss_term`) with respect to those
    outputs. For mean cross-entropy :math:`H_b` is
    :math:`(\mathrm{diag}(p) - pp^T)/N` per sample, for mean MSE it is
    :math:`2 I / (N k)` with ``k`` outputs per sample; both are computed by
    automatic differentiation of the loss in the outputs, so any loss that is
    twice differentiable in the outputs works. ``G`` is positive semi-definite when
    the loss is convex in the outputs (cross-entropy, MSE). ``G`` equals the
    Hessian minus the term with the model's second derivatives; it is exact for
    models linear in their parameters.

    Products use forward mode for :math:`J v` (with the objective's
    ``hvp_backend``: a reverse-only path is used with ``"double-backward"``, or
    when forward mode fails under ``"auto"``).
    """

    def __init__(self, objective: Objective, theta: Tensor | None = None):
        super().__init__(objective, theta)
        self.backend_used: str | None = (
            "double-backward" if objective.hvp_backend == "double-backward" else None
        )

    def _matmat(self, V: Tensor) -> Tensor:
        obj = self.objective

        def product(backend: str) -> Tensor:
            batch = _ggn_forward if backend == "forward-over-reverse" else _ggn_reverse
            return obj.accumulate(
                lambda x, y: batch(obj, self.theta, V, x, y),
                what="Gauss-Newton-vector product",
            )

        if self.backend_used is not None:
            out = product(self.backend_used)
        else:
            try:
                out = product("forward-over-reverse")
                self.backend_used = "forward-over-reverse"
            except (RuntimeError, NotImplementedError):
                out = product("double-backward")
                self.backend_used = "double-backward"
        obj.counters.ggn += V.shape[1]
        return out


def _ggn_forward(
    obj: Objective, theta: Tensor, V: Tensor, x: Tensor, y: Tensor
) -> Tensor:
    def outputs(t: Tensor) -> Tensor:
        return obj.model_fn(t, x)

    out, pullback = vjp(outputs, theta)
    out = out.detach()
    loss_grad = grad(obj.loss_term)
    # An explicit zero tangent for floating targets sidesteps pytorch/pytorch#123996
    # (forward AD through mse_loss's backward fails on an implicit zero tangent).
    y_tangent = torch.zeros_like(y) if y.is_floating_point() else None

    def one(v: Tensor) -> Tensor:
        jv = jvp(outputs, (theta,), (v,))[1]
        if y_tangent is None:
            hjv = jvp(lambda o: loss_grad(o, y), (out,), (jv,))[1]
        else:
            hjv = jvp(loss_grad, (out, y), (jv, y_tangent))[1]
        return pullback(hjv)[0]

    if V.shape[1] == 1:
        return one(V[:, 0]).unsqueeze(1)
    return vmap(one, in_dims=1, out_dims=1)(V)


def _ggn_reverse(
    obj: Objective, theta: Tensor, V: Tensor, x: Tensor, y: Tensor
) -> Tensor:
    """J^T H J V with reverse mode only: J v is the derivative of u -> (J^T u) . v."""
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        out = obj.model_fn(t, x)
        o = out.detach().requires_grad_(True)
        (gl,) = torch.autograd.grad(obj.loss_term(o, y), o, create_graph=True)
        u = torch.zeros_like(out, requires_grad=True)
        (jtu,) = torch.autograd.grad(out, t, u, create_graph=True)
        cols = []
        for j in range(V.shape[1]):
            (jv,) = torch.autograd.grad(jtu, u, V[:, j], retain_graph=True)
            if gl.requires_grad:
                (hjv,) = torch.autograd.grad(gl, o, jv, retain_graph=True)
            else:  # loss linear in the outputs
                hjv = torch.zeros_like(out)
            (col,) = torch.autograd.grad(out, t, hjv, retain_graph=True)
            cols.append(col)
    return torch.stack(cols, dim=1)


def ggn(obj: Objective, theta: Tensor | None = None) -> GGNOperator:
    """The generalized Gauss-Newton matrix of ``obj`` at ``theta``.

    Args:
        obj: the objective.
        theta: parameters (default: the model's); copied.

    Returns:
        A symmetric positive semi-definite operator (for convex losses).

    Example:
        >>> import torch
        >>> from lossgeom import Objective
        >>> X = torch.randn(30, 2, dtype=torch.float64); y = X.sum(1, keepdim=True)
        >>> obj = Objective(torch.nn.Linear(2, 1, bias=False).double(), torch.nn.MSELoss(), (X, y))
        >>> torch.allclose(ggn(obj).to_dense(), 2 * X.T @ X / 30)  # linear model: G = H
        True
    """
    return GGNOperator(obj, theta)
