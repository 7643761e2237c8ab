r"""Gaussians over parameters with a structured precision: KL and exact sampling.

The curvature posterior of :func:`~lossgeom.theory.pac_bayes_bounds` has
covariance :math:`\Sigma = c\,A^{-1}` with :math:`A = \operatorname{diag}(a) +
V\operatorname{diag}(\lambda)V^T` (``a > 0``, ``V`` of shape ``(d, k)``,
:math:`\lambda \ge 0`). With :math:`U = D^{-1/2}VL^{1/2}` (:math:`D =
\operatorname{diag}(a)`, :math:`L = \operatorname{diag}(\lambda)`) and the
``k x k`` matrix :math:`M = I + U^TU = R R^T` (Cholesky),

* :math:`A = D^{1/2}(I + UU^T)D^{1/2}`, so
  :math:`\ln\det A = \sum_i \ln a_i + 2\sum_j \ln R_{jj}` (matrix determinant
  lemma);
* :math:`A^{-1} = D^{-1} - WM^{-1}W^T` with :math:`W = D^{-1}VL^{1/2}`
  (Woodbury), so :math:`\operatorname{tr}A^{-1} = \sum_i 1/a_i -
  \|R^{-1}W^T\|_F^2` and :math:`A^{-1}y` costs :math:`O(dk)`;
* :math:`y = D^{1/2}z_1 + VL^{1/2}z_2` with independent standard normal
  :math:`z_1, z_2` has covariance ``A``, so :math:`x = c^{1/2}A^{-1}y` has
  covariance :math:`cA^{-1}AA^{-1} = \Sigma`: an exact sample.

Everything is :math:`O(dk^2)`; no ``d x d`` matrix is formed. ``V`` need not be
orthonormal and :math:`\lambda` may hold zeros. All arithmetic is float64.

:func:`gaussian_kl` is :math:`\mathrm{KL}(\mathcal N(\mu_q, \Sigma_q)\,\|\,
\mathcal N(\mu_p, \sigma_p^2 I)) = \frac12\big[\operatorname{tr}\Sigma_q/\sigma_p^2
+ \|\mu_q - \mu_p\|^2/\sigma_p^2 - d - \ln\det(\Sigma_q/\sigma_p^2)\big]`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["StructuredCovariance", "gaussian_kl"]

_DENSE_MAX_DIM = 5000


def _vector(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}.")
    return x.detach().to(torch.float64)


class StructuredCovariance:
    r"""The covariance :math:`c\,(\operatorname{diag}(a) + V\operatorname{diag}(\lambda)V^T)^{-1}`.

    Args:
        a: the diagonal, shape ``(d,)``, every entry > 0.
        vectors: ``V``, shape ``(d, k)`` (``k`` may be 0).
        values: :math:`\lambda`, shape ``(k,)``, every entry >= 0.
        c: the scale, > 0.

    Attributes:
        a, vectors, values: the pieces, float64, on the device they came on.
        c: the scale.

    Example:
        >>> d, k = 6, 2
        >>> V = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64))[0]
        >>> cov = StructuredCovariance(torch.rand(d, dtype=torch.float64) + 0.5, V,
        ...                            torch.tensor([3.0, 1.0], dtype=torch.float64), c=0.1)
        >>> S = cov.to_dense()
        >>> bool(torch.isclose(cov.trace(), S.trace()))
        True
        >>> bool(torch.isclose(cov.logdet(), torch.logdet(S)))
        True
    """

    def __init__(self, a: Tensor, vectors: Tensor, values: Tensor, c: float = 1.0):
        a, V, lam = (
            _vector("a", a),
            _vector("vectors", vectors),
            _vector("values", values),
        )
        if a.ndim != 1 or a.numel() == 0:
            raise ValueError(f"a must have shape (d,); got {tuple(a.shape)}.")
        d = a.shape[0]
        if V.ndim != 2 or V.shape[0] != d or lam.shape != (V.shape[1],):
            raise ValueError(
                f"vectors must have shape (d, k) = ({d}, k) and values shape (k,); got "
                f"{tuple(V.shape)} and {tuple(lam.shape)}."
            )
        if not bool(torch.isfinite(a).all()) or not bool((a > 0).all()):
            raise ValueError(
                "a must be finite and > 0 elementwise (add a positive eps to the "
                f"diagonal); its smallest entry is {float(a.min())!r}."
            )
        if not bool(torch.isfinite(lam).all()) or not bool((lam >= 0).all()):
            raise ValueError(
                "values must be finite and >= 0 (take the positive part of the "
                f"eigenvalues); got {lam.tolist()}."
            )
        if not bool(torch.isfinite(V).all()):
            raise ValueError("vectors hold non-finite entries.")
        c = float(c)
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"c must be a finite number > 0; got {c!r}.")
        self.a, self.vectors, self.values, self.c = a, V, lam, c
        root = lam.sqrt()
        self._W = V * root / a[:, None]  # D^{-1} V L^{1/2}
        U = V * root / a.sqrt()[:, None]  # D^{-1/2} V L^{1/2}
        M = torch.eye(V.shape[1], dtype=torch.float64, device=a.device) + U.T @ U
        self._R = torch.linalg.cholesky(M)

    @property
    def dim(self) -> int:
        """``d``."""
        return self.a.shape[0]

    def scaled(self, c: float) -> StructuredCovariance:
        """The same ``A`` with scale ``c`` (the factorisation is shared)."""
        out = object.__new__(StructuredCovariance)
        out.__dict__.update(self.__dict__)
        c = float(c)
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"c must be a finite number > 0; got {c!r}.")
        out.c = c
        return out

    def solve(self, Y: Tensor) -> Tensor:
        """:math:`A^{-1}Y` for ``Y`` of shape ``(d,)`` or ``(d, m)`` (float64)."""
        Y = _vector("Y", Y)
        single = Y.ndim == 1
        Y = Y[:, None] if single else Y
        Z = torch.cholesky_solve(self._W.T @ Y, self._R)
        X = Y / self.a[:, None] - self._W @ Z
        return X[:, 0] if single else X

    def trace(self) -> Tensor:
        r""":math:`\operatorname{tr}\Sigma = c\operatorname{tr}A^{-1}` (float64 scalar)."""
        T = torch.linalg.solve_triangular(self._R, self._W.T, upper=False)
        return self.c * ((1.0 / self.a).sum() - T.pow(2).sum())

    def logdet(self) -> Tensor:
        r""":math:`\ln\det\Sigma = d\ln c - \ln\det A` (float64 scalar)."""
        logdet_A = self.a.log().sum() + 2 * self._R.diagonal().log().sum()
        return self.dim * math.log(self.c) - logdet_A

    def sample(self, num: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""``num`` exact draws of :math:`\mathcal N(0, \Sigma)`, shape ``(num, d)``.

        :math:`x = c^{1/2}A^{-1}(D^{1/2}z_1 + VL^{1/2}z_2)`.
        """
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            raise ValueError(f"num must be an integer >= 0; got {num!r}.")
        dev, f64 = self.a.device, torch.float64
        z1 = torch.randn(self.dim, num, generator=generator, device=dev, dtype=f64)
        k = self.values.shape[0]
        z2 = torch.randn(k, num, generator=generator, device=dev, dtype=f64)
        Y = self.a.sqrt()[:, None] * z1 + self.vectors @ (
            self.values.sqrt()[:, None] * z2
        )
        return (math.sqrt(self.c) * self.solve(Y)).T

    def to_dense(self) -> Tensor:
        r"""The ``d x d`` matrix :math:`\Sigma` (for tests; ``d <= 5000``)."""
        if self.dim > _DENSE_MAX_DIM:
            raise ValueError(
                f"to_dense() would build a {self.dim} x {self.dim} matrix; it is "
                f"meant for tests with d <= {_DENSE_MAX_DIM}."
            )
        A = torch.diag(self.a) + (self.vectors * self.values) @ self.vectors.T
        return self.c * torch.linalg.inv(A)

    def __repr__(self) -> str:
        return (
            f"StructuredCovariance(d={self.dim}, k={self.values.shape[0]}, "
            f"c={self.c:g})"
        )


def gaussian_kl(
    mean_q: Tensor,
    mean_p: Tensor,
    sigma_p: float,
    *,
    sigma_q: float | None = None,
    cov_q: StructuredCovariance | None = None,
) -> float:
    r""":math:`\mathrm{KL}(\mathcal N(\mu_q, \Sigma_q)\,\|\,\mathcal N(\mu_p, \sigma_p^2 I))` in nats.

    :math:`\Sigma_q` is :math:`\sigma_q^2 I` (``sigma_q``) or a
    :class:`StructuredCovariance` (``cov_q``); give exactly one. Exact in float64
    (the structured case through Woodbury and the determinant lemma, see the
    module docstring), :math:`O(dk^2)`.

    Args:
        mean_q: the posterior mean :math:`\mu_q`, shape ``(d,)``.
        mean_p: the prior mean :math:`\mu_p`, shape ``(d,)``.
        sigma_p: the prior standard deviation, > 0.
        sigma_q: the posterior standard deviation (isotropic case), > 0.
        cov_q: the posterior covariance (structured case).

    Returns:
        The divergence, >= 0.

    Example:
        >>> mu = torch.ones(4, dtype=torch.float64)
        >>> gaussian_kl(mu, torch.zeros(4, dtype=torch.float64), 0.5, sigma_q=0.5)  # ||mu||^2 / (2 sigma^2)
        8.0
    """
    mq, mp = _vector("mean_q", mean_q), _vector("mean_p", mean_p)
    if mq.ndim != 1 or mq.shape != mp.shape:
        raise ValueError(
            f"mean_q and mean_p must be flat vectors of one shape (d,); got "
            f"{tuple(mq.shape)} and {tuple(mp.shape)}."
        )
    sp = float(sigma_p)
    if not (math.isfinite(sp) and sp > 0):
        raise ValueError(f"sigma_p must be a finite number > 0; got {sigma_p!r}.")
    if (sigma_q is None) == (cov_q is None):
        raise ValueError(
            "give exactly one of sigma_q (posterior sigma_q^2 I) and cov_q "
            "(a StructuredCovariance)."
        )
    d = mq.shape[0]
    mean_term = float((mq - mp.to(mq.device)).pow(2).sum()) / sp**2
    if sigma_q is not None:
        sq = float(sigma_q)
        if not (math.isfinite(sq) and sq > 0):
            raise ValueError(f"sigma_q must be a finite number > 0; got {sigma_q!r}.")
        r = (sq / sp) ** 2
        shape_term = d * ((r - 1.0) - math.log1p(r - 1.0))  # tr/s^2 - d - logdet
    else:
        if not isinstance(cov_q, StructuredCovariance):
            raise TypeError(
                f"cov_q must be a StructuredCovariance; got {type(cov_q).__name__}."
            )
        if cov_q.dim != d:
            raise ValueError(
                f"cov_q is {cov_q.dim} x {cov_q.dim}; the means have d = {d}."
            )
        t = float(cov_q.trace()) / sp**2
        ld = float(cov_q.logdet()) - 2 * d * math.log(sp)
        shape_term = t - d - ld
    return 0.5 * (max(shape_term, 0.0) + mean_term)
