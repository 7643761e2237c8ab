r"""The curvature posterior of :func:`~lossgeom.theory.pac_bayes_bounds`: its pieces.

:math:`H_+ = V\operatorname{diag}(\lambda_+)V^T` from the top Lanczos pairs of
the Hessian or Gauss-Newton operator (:func:`lossgeom.curvature.eigenvalues`),
and :math:`D_+ = \max(0, \operatorname{diag}(H - H_+))` from Hutchinson probes
of the deflated operator :math:`H - H_+` (:func:`lossgeom.curvature.diagonal`),
whose diagonal is the same as :math:`\operatorname{diag}H - \operatorname{diag}H_+`
but whose estimate has a smaller variance (the top pairs' off-diagonal entries
are gone). Whatever their estimation errors, these computed pieces *define*
the posterior, whose KL is then exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lossgeom.curvature import diagonal, eigenvalues, ggn, hessian
from lossgeom.linalg import SymmetricOperator
from lossgeom.objective import Objective
from lossgeom.theory._gaussian import StructuredCovariance

__all__ = ["CurvaturePieces", "curvature_candidates", "curvature_pieces"]

#: Relative residual tolerance of the Lanczos pairs.
LANCZOS_TOL = 1e-4


@dataclass(frozen=True)
class CurvaturePieces:
    """What the curvature posterior is built from (float64 where it matters)."""

    values: Tensor  # (k,) the computed eigenvalues, in the operator's dtype
    residuals: Tensor  # (k,)
    converged: bool
    vectors: Tensor  # (d, k) float64
    positive: Tensor  # (k,) float64, lambda_+
    diagonal: Tensor  # (d,) float64, D_+
    reference: float  # lambda_ref: the largest of lambda_+ and D_+ (1 if all 0)
    details: dict[str, Any]


class _Deflated(SymmetricOperator):
    """``op - V diag(lam) V^T``."""

    def __init__(self, op: SymmetricOperator, V: Tensor, lam: Tensor):
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op
        self.V = V.to(op.dtype)
        self.lam = lam.to(op.dtype)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.op @ X - self.V @ (self.lam[:, None] * (self.V.T @ X))


def curvature_pieces(obj: Objective, opts: Any) -> CurvaturePieces:
    """Top pairs and deflated diagonal of the objective's Hessian or GGN at theta."""
    op = hessian(obj) if opts.curvature == "hessian" else ggn(obj)
    try:
        res = eigenvalues(op, opts.hessian_rank, tol=LANCZOS_TOL, seed=opts.seed)
        V = res.vectors.detach().double()
        positive = res.values.detach().double().clamp_min(0.0)
        diag = diagonal(
            _Deflated(op, V, positive), opts.diagonal_matvecs, seed=opts.seed
        )
    finally:
        release = getattr(op, "release", None)
        if callable(release):
            release()  # the Hessian's kept graphs
    rest = diag.values.detach().double().clamp_min(0.0)
    top = max(float(positive.max()) if positive.numel() else 0.0, float(rest.max()))
    details = {
        "operator": opts.curvature,
        "lanczos_tol": LANCZOS_TOL,
        "eigen_matvecs": res.cost.matvecs,
        "diagonal_matvecs": diag.cost.matvecs,
        "diagonal_stderr_rms": float(diag.stderr.double().pow(2).mean().sqrt()),
        "diagonal_clipped": int((diag.values < 0).sum()),
        "negative_eigenvalues": int((res.values < 0).sum()),
    }
    return CurvaturePieces(
        values=res.values.detach().cpu(),
        residuals=res.residuals.detach().cpu(),
        converged=bool(res.converged.all()),
        vectors=V,
        positive=positive,
        diagonal=rest,
        reference=top if top > 0 else 1.0,
        details=details,
    )


def curvature_candidates(
    pieces: CurvaturePieces, opts: Any
) -> Iterator[tuple[float, StructuredCovariance, dict[str, float]]]:
    r"""``(prior sigma, posterior covariance, its parameters)`` over the grids.

    :math:`\Sigma = c\,(H_+ + D_+ + \epsilon I)^{-1}` with
    ``c = sigma^2 lambda_ref / s`` and ``eps = e lambda_ref / s``, i.e.
    :math:`\Sigma^{-1} = (eI + s(H_+ + D_+)/\lambda_\text{ref})/\sigma^2`.
    """
    ref = pieces.reference
    for s in opts.scale_grid:
        for e in opts.eps_grid:
            eps = e * ref / s
            base = StructuredCovariance(
                pieces.diagonal + eps, pieces.vectors, pieces.positive, c=1.0
            )
            for sigma in opts.prior_sigmas:
                c = sigma**2 * ref / s
                posterior = {
                    "c": c,
                    "eps": eps,
                    "scale": s,
                    "eps_factor": e,
                    "reference_curvature": ref,
                }
                yield sigma, base.scaled(c), posterior
