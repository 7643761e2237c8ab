"""Random-matrix laws: Marchenko-Pastur, its edges, and the spiked covariance model.

**Convention.** ``X`` is an ``(n, p)`` matrix of i.i.d. entries with mean 0 and
variance 1 (``n`` samples of dimension ``p``) and

    ``W = (scale / n) X^T X``  (``p x p``),   ``ratio = p / n``.

As ``n, p -> inf`` with ``p / n -> ratio``, the empirical distribution of the
``p`` eigenvalues of ``W`` tends to the Marchenko-Pastur law (Marchenko & Pastur
1967; Bai & Silverstein 2010, Thm. 3.6) with edges
``lambda_pm = scale (1 +- sqrt(ratio))^2`` and the density

    ``f(x) = sqrt((lambda_+ - x)(x - lambda_-)) / (2 pi scale ratio x)``

on ``[lambda_-, lambda_+]``. The aspect ratio sits in the denominator: for
``ratio <= 1`` the density integrates to 1; for ``ratio > 1``, ``W`` has rank
``n < p`` and the law adds a point mass ``1 - 1/ratio`` at 0, while ``f``
integrates to ``1/ratio``. Its mean is ``scale`` and its second moment
``scale^2 (1 + ratio)``.

**Spiked covariance.** If the rows of ``X`` have covariance
``scale (I + sum_i theta_i u_i u_i^T)`` (orthonormal ``u_i``), a spike
``theta > sqrt(ratio)`` pulls one eigenvalue of ``W`` out of the bulk, to
``scale (1 + theta)(1 + ratio / theta)`` (Baik & Silverstein 2006; Paul 2007),
while a spike ``0 < theta <= sqrt(ratio)`` leaves the top eigenvalue at the edge
``lambda_+`` (the phase transition of Baik, Ben Arous & Peche 2005). A spike
``-1 < theta < -sqrt(ratio)`` (only possible when ``ratio < 1``) pushes one below
``lambda_-`` by the same formula.

The CDF has a closed form: with ``x = scale (1 + ratio) + 2 scale sqrt(ratio)
cos t`` (``t`` from 0 at ``lambda_+`` to ``pi`` at ``lambda_-``) the mass of the
continuous part below ``x`` is

    ``(1 + r)/(2 r) (1 - t/pi) + sin t / (pi sqrt r)
    - |1 - r| / (pi r) atan2(cos(t/2), q sin(t/2))``,
    ``q = |1 - sqrt r| / (1 + sqrt r)``, ``r = ratio``,

which integrates the density after the substitution (``int dt / (c + r cos t)``
in closed form); it is exact and smooth in ``ratio`` through ``ratio = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "bbp_threshold",
    "check_ratio",
    "check_scale",
    "marchenko_pastur",
    "marchenko_pastur_cdf",
    "mp_cdf",
    "mp_edges",
    "point_mass",
    "spiked_outliers",
    "values_of",
    "wishart_eigenvalues",
]

Numbers = Tensor | np.ndarray | Sequence[float] | float


# ------------------------------------------------------------------ checks
def check_ratio(ratio: Any, name: str = "ratio") -> float:
    """``ratio`` as a float in ``(0, inf)``, or a ``ValueError`` naming it."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a number (the aspect ratio p / n, dimension over "
            f"samples); got {type(ratio).__name__}."
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{name} must lie in (0, inf) (the aspect ratio p / n, dimension over "
            f"samples; e.g. 0.5 for twice as many samples as dimensions); got "
            f"{ratio!r}."
        )
    return value


def check_scale(scale: Any, name: str = "scale") -> float:
    """``scale`` as a positive finite float, or a ``ValueError`` naming it."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a number (the variance of the entries, the mean "
            f"eigenvalue); got {type(scale).__name__}."
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{name} must be positive and finite (the variance of the entries, "
            f"which is the mean eigenvalue); got {scale!r}."
        )
    return value


def values_of(x: Numbers, name: str, *, min_size: int = 0) -> np.ndarray:
    """``x`` as a flat float64 array; NaN and infinities refused, naming ``x``."""
    if isinstance(x, Tensor):
        arr = x.detach().to("cpu", torch.float64).numpy().reshape(-1)
    else:
        try:
            arr = np.asarray(x, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{name} must be numbers (a tensor, array or list); got "
                f"{type(x).__name__} ({err})."
            ) from None
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise ValueError(
            f"{name} holds {bad} non-finite values (NaN or infinite) among "
            f"{arr.size}; pass finite numbers (check the eigensolver's "
            "convergence, or drop the failed entries)."
        )
    if arr.size < min_size:
        raise ValueError(
            f"{name} must hold at least {min_size} values; got {arr.size}."
        )
    return arr


def _like(values: np.ndarray, x: Numbers) -> Tensor:
    """``values`` as a tensor with ``x``'s device, shape and floating dtype."""
    if isinstance(x, Tensor):
        dtype = x.dtype if x.is_floating_point() else torch.float64
        return torch.as_tensor(values, dtype=dtype, device=x.device).reshape(x.shape)
    shape = np.shape(x)
    return torch.as_tensor(values, dtype=torch.float64).reshape(shape)


# -------------------------------------------------------------------- laws
def point_mass(ratio: float) -> float:
    """The Marchenko-Pastur law's mass at 0: ``max(0, 1 - 1/ratio)``."""
    return max(0.0, 1.0 - 1.0 / ratio)


def mp_edges(ratio: float, scale: float = 1.0) -> tuple[float, float]:
    """The edges ``scale (1 -+ sqrt(ratio))^2`` of the Marchenko-Pastur bulk.

    Args:
        ratio: ``p / n`` (dimension over samples), in ``(0, inf)``.
        scale: the variance of the entries (the mean eigenvalue), positive.

    Returns:
        ``(lambda_-, lambda_+)``; for ``ratio > 1`` the law also has mass
        ``1 - 1/ratio`` at 0, below ``lambda_-``.

    Example:
        >>> mp_edges(0.25, 2.0)
        (0.5, 4.5)
    """
    y, s = check_ratio(ratio), check_scale(scale)
    return s * (1.0 - math.sqrt(y)) ** 2, s * (1.0 + math.sqrt(y)) ** 2


def mp_pdf(x: np.ndarray, y: float, s: float) -> np.ndarray:
    """The continuous part's density (numpy, no checks)."""
    lo, hi = s * (1 - math.sqrt(y)) ** 2, s * (1 + math.sqrt(y)) ** 2
    inside = (x > lo) & (x < hi)
    xi = np.where(inside, x, 1.0)
    dens = np.sqrt(np.clip((hi - xi) * (xi - lo), 0, None)) / (2 * math.pi * s * y * xi)
    return np.where(inside, dens, 0.0)


def mp_cdf(x: np.ndarray, y: float, s: float) -> np.ndarray:
    """The CDF, point mass included (numpy, no checks; see the module docstring)."""
    sy = math.sqrt(y)
    c, r = s * (1 + y), 2 * s * sy
    t = np.arccos(np.clip((x - c) / r, -1.0, 1.0))
    q = abs(1 - sy) / (1 + sy)
    cont = (
        (1 + y) / (2 * y) * (1 - t / math.pi)
        + np.sin(t) / (math.pi * sy)
        - abs(1 - y) / (math.pi * y) * np.arctan2(np.cos(t / 2), q * np.sin(t / 2))
    )
    cont = np.clip(cont, 0.0, min(1.0, 1.0 / y))
    return np.where(x < 0, 0.0, point_mass(y) + cont)


def marchenko_pastur(x: Numbers, ratio: float, scale: float = 1.0) -> Tensor:
    """The Marchenko-Pastur density of the eigenvalues of ``(scale/n) X^T X``.

    ``f(x) = sqrt((lambda_+ - x)(x - lambda_-)) / (2 pi scale ratio x)`` on
    ``(lambda_-, lambda_+)``, 0 elsewhere (Marchenko & Pastur 1967), for ``X`` of
    shape ``(n, p)`` with i.i.d. unit-variance entries and ``ratio = p / n``.
    This is the continuous part only: it integrates to ``min(1, 1/ratio)``, and
    for ``ratio > 1`` the law adds a point mass ``1 - 1/ratio`` at 0 (see
    :func:`marchenko_pastur_cdf`, which includes it).

    Args:
        x: points (tensor, array, list or number).
        ratio: ``p / n``, in ``(0, inf)``.
        scale: the variance of the entries (the mean eigenvalue), positive.

    Returns:
        The density at ``x``, a tensor of ``x``'s shape (and device and
        floating dtype when ``x`` is a tensor; float64 otherwise).

    Example:
        >>> x = torch.linspace(0, 4, 4001, dtype=torch.float64)
        >>> round(torch.trapezoid(marchenko_pastur(x, 0.5), x).item(), 3)
        1.0
    """
    y, s = check_ratio(ratio), check_scale(scale)
    return _like(mp_pdf(values_of(x, "x"), y, s), x)


def marchenko_pastur_cdf(x: Numbers, ratio: float, scale: float = 1.0) -> Tensor:
    """The Marchenko-Pastur CDF, the point mass at 0 included, in closed form.

    ``F(x) = P(lambda <= x)``: 0 below 0, ``max(0, 1 - 1/ratio)`` on
    ``[0, lambda_-]``, then rising to 1 at ``lambda_+`` (the formula is in the
    module docstring of ``lossgeom.theory._rmt``).

    Args:
        x: points.
        ratio: ``p / n``, in ``(0, inf)``.
        scale: the variance of the entries, positive.

    Returns:
        The CDF at ``x`` (shape, device and dtype as :func:`marchenko_pastur`).

    Example:
        >>> marchenko_pastur_cdf([-1.0, 0.0, 100.0], ratio=4.0).tolist()
        [0.0, 0.75, 1.0]
    """
    y, s = check_ratio(ratio), check_scale(scale)
    return _like(mp_cdf(values_of(x, "x"), y, s), x)


# ----------------------------------------------------------------- spikes
def bbp_threshold(ratio: float) -> float:
    """The BBP detection threshold ``theta_c = sqrt(ratio)`` of a relative spike.

    In the spiked covariance model ``scale (I + sum_i theta_i u_i u_i^T)``, a
    spike ``theta > theta_c`` produces an eigenvalue of ``(scale/n) X^T X``
    outside the Marchenko-Pastur bulk, one with ``theta <= theta_c`` does not
    (Baik, Ben Arous & Peche 2005, complex case; Baik & Silverstein 2006 and
    Paul 2007, real case). The threshold is relative, so ``scale`` does not
    enter: the population eigenvalue at the threshold is
    ``scale (1 + sqrt(ratio))`` and the sample one the edge
    ``scale (1 + sqrt(ratio))^2``.

    Args:
        ratio: ``p / n``, in ``(0, inf)``.

    Returns:
        ``sqrt(ratio)``.

    Example:
        >>> bbp_threshold(0.25)
        0.5
    """
    return math.sqrt(check_ratio(ratio))


def spiked_outliers(spikes: Numbers, ratio: float, scale: float = 1.0) -> Tensor:
    """Where the eigenvalues of a spiked sample covariance go (``n, p -> inf``).

    For population covariance ``scale (I + sum_i theta_i u_i u_i^T)``: a spike
    with ``|theta| > sqrt(ratio)`` gives an eigenvalue at
    ``scale (1 + theta)(1 + ratio / theta)`` (Baik & Silverstein 2006, Thm. 1.1,
    with population eigenvalue ``l = 1 + theta``: ``l (1 + ratio / (l - 1))``);
    below the threshold the eigenvalue sticks to the nearest edge,
    ``scale (1 + sqrt(ratio))^2`` for ``theta >= 0`` and
    ``scale (1 - sqrt(ratio))^2`` for ``theta < 0``. The formula is continuous
    at the threshold. Finite-size fluctuations of a separated eigenvalue are
    Gaussian of order ``n^-1/2`` (Paul 2007), those of the edge of order
    ``n^-2/3`` (Johnstone 2001).

    Args:
        spikes: relative spikes ``theta_i > -1``.
        ratio: ``p / n``, in ``(0, inf)``.
        scale: the variance of the noise entries, positive.

    Returns:
        The predicted eigenvalues, one per spike, float64.

    Example:
        >>> spiked_outliers([0.2, 2.0], ratio=0.25).tolist()
        [2.25, 3.375]
    """
    y, s = check_ratio(ratio), check_scale(scale)
    theta = values_of(spikes, "spikes")
    if np.any(theta <= -1):
        raise ValueError(
            "spikes must be relative spikes theta > -1 (the population "
            "eigenvalue is scale * (1 + theta), which must be positive); got "
            f"{theta[theta <= -1].tolist()}."
        )
    crit = math.sqrt(y)
    out = np.where(theta >= 0, s * (1 + crit) ** 2, s * (1 - crit) ** 2)
    sep = np.abs(theta) > crit
    safe = np.where(sep, theta, 1.0)
    out = np.where(sep, s * (1 + safe) * (1 + y / safe), out)
    return torch.as_tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------- sampling
def wishart_eigenvalues(
    p: int, n: int, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """The ``p`` eigenvalues of ``(scale/n) X^T X``, ``X`` ``(n, p)`` Gaussian.

    Drawn from the bidiagonal model of the Laguerre ensemble (Dumitriu & Edelman
    2002, beta = 1) in ``O(m^2)``, ``m = min(n, p)``: ``B`` lower bidiagonal with
    diagonal ``chi_{N}, ..., chi_{N-m+1}`` and subdiagonal ``chi_{m-1}, ...,
    chi_1`` (``N = max(n, p)``) has ``B B^T`` distributed as the non-zero
    eigenvalues of ``X^T X``; the other ``p - m`` are 0. Ascending.
    """
    from scipy.linalg import eigvalsh_tridiagonal

    m, big = min(n, p), max(n, p)
    d = np.sqrt(rng.chisquare(big - np.arange(m)))
    if m > 1:
        e = np.sqrt(rng.chisquare(np.arange(m - 1, 0, -1)))
        diag = d**2
        diag[1:] += e**2
        nonzero = eigvalsh_tridiagonal(diag, d[:-1] * e)
    else:
        nonzero = d**2
    out = np.concatenate([np.zeros(p - m), np.clip(nonzero, 0, None)])
    return np.sort(out) * (scale / n)
