"""Curvature products of an Objective: Hessian-vector products, per-sample gradients.

Two exact HVP backends: forward-mode differentiation of the reverse-mode gradient
(forward-over-reverse, ``vmap``-ed over the vectors) and reverse mode twice
(double backward, one backward pass per vector through the gradient's graph).
``"auto"`` tries the faster one for the device first and falls back to the other
when an operation lacks the derivative it needs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from lossgeom.linalg import check_block
from lossgeom.linalg._operator import NonFiniteError
from lossgeom.objective._core import HvpBackend, ObjectiveCore

__all__ = ["ProductsMixin", "hvp_from_graph"]


class ProductsMixin(ObjectiveCore):
    """Hessian-vector products and per-sample gradients.

    Attributes:
        hvp_backend: the backend asked for; ``hvp_backend_used`` is the one that ran
            (``None`` until ``"auto"`` has run once).
        hvp_fallback_reason: why ``"auto"`` fell back to its second backend, or
            ``None``.
    """

    hvp_backend: HvpBackend
    hvp_backend_used: str | None
    hvp_fallback_reason: str | None

    def hvp(self, V: Tensor, theta: Tensor | None = None) -> Tensor:
        """Hessian-vector products ``H @ V`` for ``V`` of shape ``(d,)`` or ``(d, m)``.

        All ``m`` vectors go through one pass over the data (``vmap`` over the
        tangents, so the forward and backward pass of the model is shared).

        Args:
            V: one vector ``(d,)`` or a block ``(d, m)``, on the model's device and
                dtype.
            theta: where to take the Hessian (default: the model's parameters).

        Returns:
            ``H @ V`` with the shape of ``V``.
        """
        check_block(V, self._dim, self._dtype, self._device)
        theta = self.check_theta(theta)
        single = V.ndim == 1
        block = V.unsqueeze(1) if single else V
        m = block.shape[1]
        if m == 0:
            return torch.empty_like(V)
        backend = self.hvp_backend_used
        if backend is None:  # "auto", not resolved yet
            first, second = _auto_backends(self._device)
            try:
                out = self._hvp_with(first, block, theta)
                self.hvp_backend_used = first
            except NonFiniteError:
                raise
            except (RuntimeError, NotImplementedError) as err:
                self.hvp_fallback_reason = (
                    f"{type(err).__name__}: {str(err).splitlines()[0]}"
                )
                out = self._hvp_with(second, block, theta)
                self.hvp_backend_used = second
                warnings.warn(
                    f"{first} HVP failed, using {second} instead "
                    f"({self.hvp_fallback_reason}).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            out = self._hvp_with(backend, block, theta)
        self.counters.hvp += m
        return out.squeeze(1) if single else out

    def _hvp_with(self, backend: str, V: Tensor, theta: Tensor) -> Tensor:
        if backend == "forward-over-reverse":
            return self.accumulate(
                lambda x, y: _hvp_forward_over_reverse(self.batch_term, theta, V, x, y),
                what="Hessian-vector product",
            )
        return self.accumulate(
            lambda x, y: _hvp_double_backward(self.batch_term, theta, V, x, y),
            what="Hessian-vector product",
        )

    def per_sample_grad(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        r"""Per-sample gradients on one batch, shape ``(n, d)``, via ``vmap``.

        The objective is a sum of per-sample contributions,
        :math:`L = \sum_i c_i` (:math:`c_i` is sample ``i``'s term, see
        :meth:`loss_term`: :math:`w_i \ell_i / W` for class-weighted
        cross-entropy, :math:`\ell_i / N` for a plain mean); row ``i`` is
        :math:`g_i = N \nabla c_i`, so that the mean of the rows over the data set
        is the full-data gradient. For a plain mean over samples :math:`g_i` is
        the gradient of sample ``i``'s loss. Needs ``mode="eval"``: batch
        statistics of a single sample are meaningless.
        """
        if self.mode != "eval":
            raise ValueError(
                "per-sample gradients need mode='eval' (BatchNorm in train mode "
                "normalises each sample by statistics of the whole batch); build the "
                "Objective with mode='eval'."
            )

        scale = float(self.loss_totals().n_samples)

        def one(t: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
            out = self.model_fn(t, xi.unsqueeze(0))
            return self.loss_term(out, yi.unsqueeze(0), scale)

        return vmap(grad(one), in_dims=(None, 0, 0))(theta, x, y)


def _auto_backends(device: torch.device) -> tuple[str, str]:
    """The HVP backend tried first under ``"auto"``, and the fallback.

    Measured with ``benchmarks/hvp.py`` (float32, eval mode): on CPU double backward
    was faster than forward-over-reverse on an MLP (2.1x), a BatchNorm CNN (1.06x)
    and ResNet-20 (1.09x), so CPU starts with double backward; elsewhere
    forward-over-reverse comes first. Either falls back to the other when an
    operation lacks the derivative it needs. Both are exact; the choice only
    changes speed (and round-off).
    """
    if device.type == "cpu":
        return "double-backward", "forward-over-reverse"
    return "forward-over-reverse", "double-backward"


def _hvp_forward_over_reverse(
    batch_loss: Callable[..., Tensor], theta: Tensor, V: Tensor, x: Tensor, y: Tensor
) -> Tensor:
    """H_b @ V by forward-mode differentiation of the reverse-mode gradient."""
    g = grad(batch_loss)
    if y.is_floating_point():
        # Give the targets an explicit zero tangent. Without it, forward AD through
        # mse_loss's backward writes into an immutable "efficient zero" tangent and
        # fails (pytorch/pytorch#123996); a materialised zero avoids that path.
        y_tangent = torch.zeros_like(y)

        def one(v: Tensor) -> Tensor:
            return jvp(lambda t, yy: g(t, x, yy), (theta, y), (v, y_tangent))[1]

    else:

        def one(v: Tensor) -> Tensor:
            return jvp(lambda t: g(t, x, y), (theta,), (v,))[1]

    if V.shape[1] == 1:
        return one(V[:, 0]).unsqueeze(1)
    return vmap(one, in_dims=1, out_dims=1)(V)


def _hvp_double_backward(
    batch_loss: Callable[..., Tensor], theta: Tensor, V: Tensor, x: Tensor, y: Tensor
) -> Tensor:
    """H_b @ V by differentiating the gradient's inner product with V (reverse twice).

    The forward and first backward pass are shared by all columns of ``V``; each
    column costs one backward pass through the gradient's graph. (A ``vmap`` over
    the columns, ``is_grads_batched``, was slower than this loop for convolutions
    on CPU.)
    """
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(batch_loss(t, x, y), t, create_graph=True)
        return hvp_from_graph(g, t, V)


def hvp_from_graph(g: Tensor, t: Tensor, V: Tensor) -> Tensor:
    """Columns ``d(g . v)/dt`` for each column ``v`` of ``V``, keeping ``g``'s graph."""
    if not g.requires_grad:  # the loss is linear in theta: zero Hessian
        return torch.zeros_like(V)
    cols = []
    for j in range(V.shape[1]):
        (hv,) = torch.autograd.grad(g, t, V[:, j], retain_graph=True, allow_unused=True)
        cols.append(torch.zeros_like(t) if hv is None else hv)
    return torch.stack(cols, dim=1)
