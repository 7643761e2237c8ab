"""Hessian eigenvectors as directions in parameter space.

The top (or bottom) eigenvectors of the Hessian are flat vectors like
``obj.theta``, so slices, paths and sharpness take them like any other direction.
"""

from __future__ import annotations

from torch import Tensor

from lossgeom.curvature.spectra import eigenvalues
from lossgeom.linalg.lanczos import Which
from lossgeom.objective import Objective

__all__ = ["hessian_directions"]


def hessian_directions(
    obj: Objective,
    k: int = 2,
    *,
    which: Which = "largest",
    tol: float = 1e-6,
    seed: int = 0,
) -> Tensor:
    """The top (or bottom) Hessian eigenvectors at ``obj.theta`` as directions.

    Shape ``(k, d)``, or ``(2 k, d)`` for ``which="both"`` (largest first, then
    smallest). Unit vectors (not filter-normalized: an eigenvector's scale is its
    own).
    Uses :func:`lossgeom.eigenvalues` (Lanczos with residual certificates); raises
    if they did not converge.

    Example:
        >>> import torch, lossgeom as lg
        >>> _ = torch.manual_seed(0)
        >>> X = torch.randn(30, 3, dtype=torch.float64)
        >>> y = torch.randn(30, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> obj = lg.Objective(model, torch.nn.MSELoss(), (X, y))
        >>> u = hessian_directions(obj, 1, tol=1e-10)[0]  # H = 2 X^T X / 30
        >>> top = torch.linalg.eigh(2 * X.T @ X / 30).eigenvectors[:, -1]
        >>> bool(abs(u @ top) > 1 - 1e-8)
        True
    """
    res = eigenvalues(obj, k, which=which, tol=tol, seed=seed)
    if not res.all_converged:
        raise RuntimeError(
            f"the Hessian eigenvectors did not converge to tol={tol} "
            f"(residuals {res.residuals.tolist()}); loosen tol, or call "
            "lg.eigenvalues(obj, k, max_matvecs=...) with a larger budget and use "
            "its .vectors.T."
        )
    return res.vectors.T.contiguous()
