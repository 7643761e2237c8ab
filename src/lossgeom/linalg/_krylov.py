"""One run of restarted block Lanczos: the Krylov basis, Rayleigh-Ritz, restarts.

:func:`~lossgeom.linalg.lanczos` calls :func:`_lanczos_core` once, and the
verification search (:mod:`lossgeom.linalg._verify`) calls it again on deflated
operators.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from lossgeom._results import Cost
from lossgeom.linalg._eigen import (
    _CRITERIA,
    Criterion,
    EigenResult,
    Which,
    _check_args,
    _key,
    gap_bounds,
)
from lossgeom.linalg._operator import SymmetricOperator, apply_checked, product_eps

__all__ = ["_lanczos_core", "_lanczos_result"]

# Explicit residuals come from the products already made, ``(A Q) s``, when
# keeping ``A Q`` beside ``Q`` costs at most this many bytes; larger bases
# recompute ``A u`` for the k returned vectors instead (k more products).
_KEEP_PRODUCTS_BYTES = 2**28

# ``stop(theta, residuals)`` of the wanted Ritz pairs ends a run early when true.
Stop = Callable[[Tensor, Tensor], bool]


def _select(theta: Tensor, k: int, which: str, extra: int = 0) -> Tensor:
    """Indices (into ascending ``theta``) of the wanted Ritz values, plus ``extra``."""
    n = theta.numel()
    if which == "largest":
        return torch.arange(n - 1, max(n - 1 - k - extra, -1), -1, device=theta.device)
    if which == "smallest":
        return torch.arange(0, min(k + extra, n), device=theta.device)
    if which == "magnitude":
        return torch.argsort(theta.abs(), descending=True)[: k + extra]
    half = k // 2
    top = torch.arange(
        n - 1, max(n - 1 - half - extra // 2, -1), -1, device=theta.device
    )
    bottom = torch.arange(0, min(k - half + extra - extra // 2, n), device=theta.device)
    bottom = bottom[~torch.isin(bottom, top)]
    return torch.cat([top, bottom.flip(0)])


def _orth_refill(
    W: Tensor, Q: Tensor, gen: torch.Generator, drop_tol: float
) -> tuple[Tensor, Tensor]:
    """Orthonormalise ``W`` against ``Q`` and itself: ``W = Qn @ B``.

    Columns of ``W`` that are (numerically) dependent are replaced by random
    vectors orthogonal to everything so far, with zero rows in ``B``: the Krylov
    space found an invariant subspace and the search continues elsewhere. Returns
    fewer columns when ``Q`` already spans the whole space.
    """
    d, b = W.shape
    Qn, B = torch.linalg.qr(W)
    diag = B.diagonal().abs()
    scale = W.norm(dim=0).max().clamp_min(torch.finfo(W.dtype).tiny)
    bad = diag <= drop_tol * scale
    if bad.any():
        B = B.clone()
        B[bad] = 0
        good = Qn[:, ~bad]
        basis = torch.cat([Q, good], 1)
        fills = []
        for _ in range(int(bad.sum())):
            if basis.shape[1] + len(fills) >= d:
                break
            z = torch.randn(d, 1, generator=gen, dtype=W.dtype, device=W.device)
            allq = torch.cat([basis, *fills], 1)
            for _ in range(2):
                z = z - allq @ (allq.T @ z)
            z = z / z.norm()
            fills.append(z)
        cols, f = [], iter(fills)
        keep_rows = []
        for j in range(b):
            if not bad[j]:
                cols.append(Qn[:, j : j + 1])
                keep_rows.append(j)
            else:
                nxt = next(f, None)
                if nxt is not None:
                    cols.append(nxt)
                    keep_rows.append(j)
        Qn = torch.cat(cols, 1) if cols else W.new_zeros(d, 0)
        B = B[keep_rows]
    return Qn, B


def _check_symmetric(
    upper: Tensor,
    lower: Tensor,
    size: float,
    d: int,
    dtype: torch.dtype,
    eps_products: float = 0.0,
) -> None:
    """Refuse an operator whose Krylov coupling is not symmetric.

    After two expansions, ``Q_0^T A Q_1`` (``upper``, computed from ``A Q_1``) must
    equal ``(Q_1^T A Q_0)^T`` (``lower^T``, the coupling ``B`` found when ``A Q_0``
    was orthogonalised): a free test on the first Krylov vectors, which are as
    random as any probe pair.
    """
    eps = max(torch.finfo(dtype).eps, eps_products)  # upper, lower are float64
    gap = float((upper - lower.T).abs().max())
    if gap > 1e3 * math.sqrt(d) * eps * max(size, 1e-300):
        i, j = divmod(int((upper - lower.T).abs().argmax()), upper.shape[1])
        raise ValueError(
            "the operator is not symmetric: on its first Krylov vectors u, v, "
            f"u.(A v) = {float(upper[i, j]):.6e} but v.(A u) = "
            f"{float(lower[j, i]):.6e}. Eigenvalue methods here need a "
            "symmetric operator (a Hessian, GGN or covariance)."
        )


def _sizes(
    op: SymmetricOperator,
    k: int,
    which: str,
    tol: float,
    block_size: int | None,
    ncv: int | None,
    max_matvecs: int | None,
) -> tuple[int, int, int, int]:
    """Checked ``(wanted, block size, largest basis size, budget)`` of one run."""
    wanted = _check_args(op, k, which, tol)
    d = op.shape[0]
    b = 1 if block_size is None else int(block_size)
    if b < 1 or b > d:
        raise ValueError(
            f"block_size must be between 1 and d = {d}; got {block_size!r}."
        )
    m_max = ncv if ncv is not None else max(2 * wanted + 4 * b, 40)
    m_max = min(d, max(b * math.ceil(m_max / b), wanted + 2 * b))
    budget = max_matvecs if max_matvecs is not None else max(600, 40 * wanted * b)
    if budget < b:
        raise ValueError(
            f"max_matvecs must be at least block_size = {b}; got {budget}."
        )
    return wanted, b, m_max, budget


def _start_block(
    op: SymmetricOperator, b: int, v0: Tensor | None, gen: torch.Generator
) -> Tensor:
    """``b`` random start vectors, warm-started from ``v0`` when given."""
    d = op.shape[0]
    dtype, device = op.dtype, op.device
    X = torch.randn(d, b, generator=gen, dtype=dtype, device=device)
    if v0 is not None:
        if not isinstance(v0, Tensor) or v0.shape[0] != d:
            raise ValueError(
                f"v0 must be a tensor of shape ({d},) or ({d}, j); got "
                f"{tuple(v0.shape) if isinstance(v0, Tensor) else type(v0).__name__}."
            )
        V0 = v0.reshape(d, -1).to(device=device, dtype=dtype)
        V0 = V0 / V0.norm(dim=0).clamp_min(torch.finfo(dtype).tiny)
        # fold extra columns into the block round-robin: a start vector that mixes
        # previous eigenvectors puts all of them into the Krylov space early
        start_block = torch.zeros(d, min(b, V0.shape[1]), dtype=dtype, device=device)
        for j in range(V0.shape[1]):
            start_block[:, j % b] += V0[:, j]
        j0 = start_block.shape[1]
        X[:, :j0] = (
            start_block + 1e-3 * start_block.norm(dim=0) / math.sqrt(d) * X[:, :j0]
        )
    return X


class _Krylov:
    """The basis ``Q`` of a block Krylov space, its next block ``Qn``, ``T = Q^T A Q``.

    ``A Q = Q T + Qn B_last E^T``: ``B_last`` couples the last block of ``Q`` (or,
    after a thick restart, all of it) to ``Qn``.
    """

    def __init__(
        self,
        op: SymmetricOperator,
        X: Tensor,
        gen: torch.Generator,
        check_symmetry: bool,
        keep_products: bool = False,
    ):
        d, device = op.shape[0], op.device
        self.op, self.gen, self.check_symmetry = op, gen, check_symmetry
        self.eps = torch.finfo(op.dtype).eps
        self.Q = X.new_zeros(d, 0)
        # A Q as multiplied (None: not kept), for explicit residuals without
        # further products; see _KEEP_PRODUCTS_BYTES
        self.AQ: Tensor | None = X.new_zeros(d, 0) if keep_products else None
        self.Qn, _ = _orth_refill(X, self.Q, gen, 1e3 * self.eps)
        self.n_mv = 0
        # the coupling of the first expansion, for the symmetry test
        self.first: tuple[Tensor, float] | None = None
        self.T = torch.zeros(0, 0, dtype=torch.float64, device=device)
        self.B_last = torch.zeros(0, 0, dtype=torch.float64, device=device)
        self.restarts = 0

    def can_expand(self, m_max: int, budget: int) -> bool:
        """Whether a next block exists and fits in the basis and the budget."""
        Q, Qn = self.Q, self.Qn
        return (
            Qn.shape[1] > 0 and Q.shape[1] + Qn.shape[1] <= m_max and self.n_mv < budget
        )

    def expand(self) -> None:
        """Expand the basis by one block: ``Qn`` joins ``Q``, ``T`` grows."""
        op, d, dtype, device = self.op, self.op.shape[0], self.op.dtype, self.op.device
        Qn = self.Qn
        W = apply_checked(op, Qn)
        if self.AQ is not None:
            self.AQ = torch.cat([self.AQ, W], 1)
        self.n_mv += Qn.shape[1]
        size = float(W.norm(dim=0).max())  # ||A q||, for the symmetry test
        Q = torch.cat([self.Q, Qn], 1)
        H = Q.T @ W
        W = W - Q @ H
        H2 = Q.T @ W
        W = W - Q @ H2
        H = (H + H2).double()
        n, nb = Q.shape[1], Qn.shape[1]
        if self.check_symmetry and self.first is not None and self.restarts == 0:
            B0, size0 = self.first
            _check_symmetric(
                H[: n - nb], B0.double(), max(size, size0), d, dtype, product_eps(op)
            )
            self.first = None
        T_new = torch.zeros(n, n, dtype=torch.float64, device=device)
        T_new[: n - nb, : n - nb] = self.T
        T_new[:, n - nb :] = H
        T_new[n - nb :, :] = H.T
        T_new[n - nb :, n - nb :] = (H[n - nb :] + H[n - nb :].T) / 2
        self.T = T_new
        self.Q = Q
        self.Qn, B = _orth_refill(W, Q, self.gen, 1e3 * self.eps)
        self.B_last = B.double()
        if self.check_symmetry and n == nb and B.shape == (nb, nb):
            self.first = (B, size)
        if Q.shape[1] >= d:
            self.Qn = Q.new_zeros(d, 0)
            self.B_last = torch.zeros(0, nb, dtype=torch.float64, device=device)

    def ritz_residuals(self, theta: Tensor, S: Tensor) -> Tensor:
        """Residual norms of the Ritz pairs ``(theta, Q S)`` from the Lanczos relation."""
        nb = self.B_last.shape[1]
        if self.B_last.numel():
            return (self.B_last @ S[-nb:, :]).norm(dim=0)
        return torch.zeros_like(theta)

    def restart(
        self, theta: Tensor, S: Tensor, wanted: int, which: str, b: int, m_max: int
    ) -> None:
        """Thick restart: keep the wanted Ritz vectors and some more on their side.

        ``A Q_keep = Q_keep Theta + Qn (B_last S_last)``, and that coupling enters
        ``T`` when ``Qn``'s products are projected in the next expansion.
        """
        room = m_max - self.Qn.shape[1]
        extra = max(0, min(room - wanted, max(wanted, 2 * b)))
        keep = _select(theta, wanted, which, extra=extra)[: max(room, 1)]
        self.Q = self.Q @ S[:, keep].to(self.op.dtype)
        if self.AQ is not None:
            self.AQ = self.AQ @ S[:, keep].to(self.op.dtype)
        self.T = torch.diag(theta[keep])
        self.restarts += 1


def _lanczos_core(
    op: SymmetricOperator,
    k: int,
    *,
    which: Which,
    tol: float,
    max_matvecs: int | None,
    seed: int,
    block_size: int | None,
    ncv: int | None = None,
    v0: Tensor | None = None,
    check_symmetry: bool = True,
    stop: Stop | None = None,
    explicit: bool = True,
    criterion: Criterion = "residual",
) -> EigenResult:
    start = time.perf_counter()
    wanted, b, m_max, budget = _sizes(op, k, which, tol, block_size, ncv, max_matvecs)
    if criterion not in _CRITERIA:
        raise ValueError(
            f"criterion must be one of {_CRITERIA} (what tol bounds: the residual "
            f"or the eigenvalue's error); got {criterion!r}."
        )
    gen = torch.Generator(device=op.device).manual_seed(seed)
    keep = explicit and op.shape[0] * m_max * op.dtype.itemsize <= _KEEP_PRODUCTS_BYTES
    krylov = _Krylov(op, _start_block(op, b, v0, gen), gen, check_symmetry, keep)
    scale = 0.0
    lo, hi = math.inf, -math.inf  # the range of Ritz values seen
    best = (math.inf, 0)  # the smallest relative error measure, and when
    eps, stopped = product_eps(op), ""

    while True:
        if krylov.can_expand(m_max, budget):
            krylov.expand()

        # Rayleigh-Ritz on the projected matrix (small: at most ncv x ncv)
        theta, S = torch.linalg.eigh(krylov.T)
        scale = max(scale, float(theta.abs().max()))
        lo, hi = min(lo, float(theta.min())), max(hi, float(theta.max()))
        res = krylov.ritz_residuals(theta, S)
        if theta.numel() >= wanted:
            idx = _select(theta, wanted, which)
            err = (
                res[idx]
                if criterion == "residual"
                else _bounds(theta, res, idx, 2 * product_eps(op) * scale)
            )
            done = bool((err <= tol * max(scale, 1e-300)).all())
            worst_err = float(err.max()) / max(scale, 1e-300)
            if worst_err <= 0.5 * best[0]:
                best = (worst_err, krylov.n_mv)
            stopped = _why_stop(
                krylov, done, budget, best, m_max, eps, worst_err, criterion
            )
            if stop is not None and stop(theta[idx], res[idx]):
                stopped = "the caller's stop rule"
            if stopped:
                break
        elif krylov.n_mv >= budget or krylov.Qn.shape[1] == 0:
            idx = _select(theta, theta.numel(), "largest")
            stopped = "budget spent" if krylov.n_mv >= budget else "space exhausted"
            break
        if krylov.Q.shape[1] + krylov.Qn.shape[1] > m_max:
            krylov.restart(theta, S, wanted, which, b, m_max)

    values = theta[idx]
    if explicit:
        vectors, residuals = _explicit_residuals(krylov, theta, S, idx)
    else:  # from the Lanczos relation A Q = Q T + Q_next B E^T
        vectors = krylov.Q @ S[:, idx].to(op.dtype)
        vectors = vectors / vectors.norm(dim=0)
        residuals = res[idx].double()
    rest = torch.ones(theta.numel(), dtype=torch.bool, device=theta.device)
    rest[idx] = False
    others, other_res = theta[rest], res[rest]
    values = values.to(op.dtype)
    order = torch.argsort(
        _key(values, "largest" if which == "both" else which), descending=True
    )
    values, vectors, residuals = values[order], vectors[:, order], residuals[order]
    if explicit and stopped == "tolerance met":
        judged = (
            residuals
            if criterion == "residual"
            else gap_bounds(values, residuals, others, other_res, 2 * eps * scale)
        )
        worst = float(judged.max()) / max(scale, 1e-300)
        if worst > tol:  # the relation said yes, the explicit products say no
            stopped = (
                "rounding floor: the Lanczos relation met tol but the explicit "
                f"residuals give {worst:.1e} of the spectral scale, near the "
                f"products' precision (eps = {eps:.1e}); ask for a larger tol, "
                f"{_REMEDY[criterion]}or compute in float64"
            )
    return _lanczos_result(
        values,
        vectors,
        residuals,
        which=which,
        tol=tol,
        scale=scale,
        matvecs=krylov.n_mv,
        start=start,
        n_restarts=krylov.restarts,
        criterion=criterion,
        others=(others, other_res),
        eps=product_eps(op),
        details={
            "block_size": b,
            "ncv": m_max,
            "budget": budget,
            "residuals": "explicit" if explicit else "from the Lanczos relation",
            "ritz_range": [lo, hi],
            "stopped": stopped,
            "value_floor": 2 * product_eps(op),  # of error_bounds / scale
            # the last Krylov space's other Ritz pairs: the gaps of error_bounds
            "other_ritz_values": others.tolist(),
            "other_ritz_residuals": other_res.tolist(),
        },
    )


def _explicit_residuals(
    krylov: _Krylov, theta: Tensor, S: Tensor, idx: Tensor
) -> tuple[Tensor, Tensor]:
    """The Ritz vectors ``idx`` and their residuals ``||A u - theta u||``, explicitly.

    From the kept products when there are (``A (Q s) = (A Q) s``), else with
    one more product per vector (counted in ``krylov.n_mv``).
    """
    op, values = krylov.op, theta[idx].to(krylov.op.dtype)
    vectors = krylov.Q @ S[:, idx].to(op.dtype)
    norms = vectors.norm(dim=0)
    vectors = vectors / norms
    if krylov.AQ is not None and krylov.AQ.shape[1] == S.shape[0]:
        AV = (krylov.AQ @ S[:, idx].to(op.dtype)) / norms
    else:
        AV = op @ vectors
        krylov.n_mv += vectors.shape[1]
    return vectors, (AV - vectors * values).norm(dim=0).double()


# What a run stopped at the rounding floor suggests, besides tol and float64.
_REMEDY = {
    "residual": "criterion='value' (eigenvalue error bounds), ",
    "value": "",
}


# Residuals (relative to the scale) below this many rounding units of the
# products are at the floor float arithmetic allows: measured 5-20 for float32
# Hessians of small networks, where a further product no longer lowers them.
_FLOOR_UNITS = 100.0


def _why_stop(
    krylov: _Krylov,
    done: bool,
    budget: int,
    best: tuple[float, int],
    m_max: int,
    eps: float,
    worst: float,
    criterion: Criterion = "residual",
) -> str:
    """Why the run ends now (``""``: it goes on).

    Besides the tolerance, the budget and an exhausted space, a run stops at the
    rounding floor: its worst error measure has not halved for two basis lengths
    of products and lies within ``_FLOOR_UNITS`` rounding units of the products,
    where more products cannot help (the result then says so rather than
    spending the whole budget).
    """
    if done:
        return "tolerance met"
    if krylov.n_mv >= budget:
        return "budget spent"
    if krylov.Qn.shape[1] == 0:
        return "space exhausted"
    if krylov.n_mv - best[1] > 2 * m_max and worst <= _FLOOR_UNITS * eps:
        return (
            f"rounding floor: the worst error measure stalled at {worst:.1e} of "
            f"the spectral scale, near the products' precision (eps = {eps:.1e}); "
            f"ask for a larger tol, {_REMEDY[criterion]}or compute in float64"
        )
    return ""


def _bounds(theta: Tensor, res: Tensor, idx: Tensor, floor: float) -> Tensor:
    """:func:`gap_bounds` of the Ritz pairs ``idx`` against all other Ritz pairs."""
    rest = torch.ones(theta.numel(), dtype=torch.bool, device=theta.device)
    rest[idx] = False
    return gap_bounds(theta[idx], res[idx], theta[rest], res[rest], floor)


def _lanczos_result(
    values: Tensor,
    vectors: Tensor,
    residuals: Tensor,
    *,
    which: str,
    tol: float,
    scale: float,
    matvecs: int,
    start: float,
    n_restarts: int,
    details: dict,
    criterion: Criterion = "residual",
    others: tuple[Tensor, Tensor] | None = None,
    eps: float = 0.0,
) -> EigenResult:
    """An :class:`EigenResult` of Lanczos, judged converged on ``residuals`` as given.

    ``residuals`` are reported in the dtype of ``values``; ``start`` is when the
    run began (``time.perf_counter()``). ``others`` are the Ritz values and
    residuals outside ``values`` that :func:`gap_bounds` measures gaps to;
    ``eps`` is the products' rounding unit (the bounds' floor is ``2 eps`` times
    the scale).
    """
    if others is None:
        others = (values.new_zeros(0), values.new_zeros(0))
    bounds = gap_bounds(values, residuals, *others, floor=2 * eps * scale)
    judged = residuals.double() if criterion == "residual" else bounds
    return EigenResult(
        values=values,
        vectors=vectors,
        residuals=residuals.to(values.dtype),
        error_bounds=bounds.to(values.dtype),
        criterion=criterion,
        converged=judged.to(residuals.device) <= tol * max(scale, 1e-300),
        cost=Cost(matvecs=matvecs, seconds=time.perf_counter() - start),
        method="lanczos",
        which=which,
        tol=float(tol),
        spectral_scale=scale,
        n_restarts=n_restarts,
        details=details,
    )
