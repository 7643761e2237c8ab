"""Extreme eigenvalues of a symmetric operator: restarted block Lanczos, certified.

The method builds an orthonormal basis ``Q`` of a block Krylov space with full
reorthogonalisation (every new block is projected against all of ``Q`` twice), so
the projected matrix ``T = Q^T A Q`` is formed explicitly and no "ghost" copies of
converged eigenvalues appear. When the basis reaches its maximum size it is
restarted thickly: the wanted Ritz vectors (and a few more on the same side) are
kept and the Krylov expansion goes on from the last residual block, as in the
thick-restart Lanczos of Wu & Simon (2000) and the Krylov-Schur method of
Stewart (2001). A block of ``b`` start vectors finds eigenvalues of multiplicity up
to ``b``; a single vector finds one copy of a repeated eigenvalue only.

Stopping uses the Ritz residual ``||A u - theta u||``, known without extra
products from the relation ``A Q = Q T + Q_next B E^T``; the returned residuals
are recomputed explicitly at the end (``k`` more products), so they certify the
result rather than the algorithm's belief about it.

Written here rather than taken from ``scipy.sparse.linalg.eigsh`` because we need
blocks of vectors per product (one batched pass over the data), warm starts from
previous eigenvectors, tensors on the operator's device, and explicit residuals.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lossgeom.linalg._operator import SymmetricOperator, apply_checked

__all__ = ["EigenResult", "lanczos", "power_iteration"]

Which = Literal["largest", "smallest", "both", "magnitude"]
_WHICH = ("largest", "smallest", "both", "magnitude")


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs with their certificates.

    Attributes:
        values: eigenvalue estimates; descending for ``"largest"``, ``"both"`` and
            ``"magnitude"`` (by absolute value), ascending for ``"smallest"``.
        vectors: unit eigenvector estimates, shape ``(d, k)``.
        residuals: ``||A u_i - lambda_i u_i||`` for each pair, computed explicitly
            (or, with ``explicit_residuals=False``, from the Lanczos relation).
        converged: ``residuals <= tol * spectral_scale`` per pair.
        n_matvecs: products with the operator, the final residual check included.
        seconds: wall time.
        method: ``"lanczos"`` or ``"power"``.
        which: which end of the spectrum.
        tol: the relative residual tolerance.
        spectral_scale: the largest absolute Ritz value seen (an estimate of
            ``||A||``); residuals are judged relative to it.
        n_restarts: thick restarts (Lanczos) or total iterations (power).
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    converged: Tensor
    n_matvecs: int
    seconds: float
    method: str
    which: str
    tol: float
    spectral_scale: float
    n_restarts: int = 0
    info: dict = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        """Whether every pair met the tolerance."""
        return bool(self.converged.all())

    def to_dict(self) -> dict:
        """Plain numbers for JSON (vectors left out)."""
        return {
            "values": self.values.tolist(),
            "residuals": self.residuals.tolist(),
            "converged": self.converged.tolist(),
            "n_matvecs": self.n_matvecs,
            "seconds": self.seconds,
            "method": self.method,
            "which": self.which,
            "tol": self.tol,
            "spectral_scale": self.spectral_scale,
            "n_restarts": self.n_restarts,
            **self.info,
        }


def _check_args(op: SymmetricOperator, k: int, which: str, tol: float) -> int:
    if not hasattr(op, "shape") or not hasattr(op, "__matmul__"):
        raise TypeError(
            "expected a symmetric operator with .shape and @ (e.g. lg.hessian(obj)); "
            f"got {type(op).__name__}."
        )
    d = op.shape[0]
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}; got {which!r}.")
    wanted = 2 * k if which == "both" else k
    if not isinstance(k, int) or k < 1 or wanted > d:
        raise ValueError(
            f"k must be an integer with 1 <= k <= d = {d}"
            + (" (and 2k <= d for which='both')" if which == "both" else "")
            + f"; got k={k!r}."
        )
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(
            f"tol must be a positive number (a relative residual, e.g. 1e-6); got {tol!r}."
        )
    return wanted


def _key(values: Tensor, which: str) -> Tensor:
    """Sort key of ``which``: larger means more wanted (``"both"`` is not a key)."""
    if which == "largest":
        return values
    if which == "smallest":
        return -values
    return values.abs()


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
    upper: Tensor, lower: Tensor, size: float, d: int, dtype: torch.dtype
) -> None:
    """Refuse an operator whose Krylov coupling is not symmetric.

    After two expansions, ``Q_0^T A Q_1`` (``upper``, computed from ``A Q_1``) must
    equal ``(Q_1^T A Q_0)^T`` (``lower^T``, the coupling ``B`` found when ``A Q_0``
    was orthogonalised): a free test on the first Krylov vectors, which are as
    random as any probe pair.
    """
    eps = torch.finfo(dtype).eps  # of the operator (upper and lower are float64)
    gap = float((upper - lower.T).abs().max())
    if gap > 1e3 * math.sqrt(d) * eps * max(size, 1e-300):
        i, j = divmod(int((upper - lower.T).abs().argmax()), upper.shape[1])
        raise ValueError(
            "the operator is not symmetric: on its first Krylov vectors u, v, "
            f"u.(A v) = {float(upper[i, j]):.6e} but v.(A u) = "
            f"{float(lower[j, i]):.6e}. Eigenvalue methods here need a "
            "symmetric operator (a Hessian, GGN or covariance)."
        )


def lanczos(
    op: SymmetricOperator,
    k: int = 5,
    *,
    verify: bool = True,
    which: Which = "largest",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    seed: int = 0,
    block_size: int | None = None,
    ncv: int | None = None,
    v0: Tensor | None = None,
    check_symmetry: bool = True,
    explicit_residuals: bool = True,
) -> EigenResult:
    """Extreme eigenpairs by restarted block Lanczos with full reorthogonalisation.

    Args:
        op: symmetric operator (``op @ V`` for ``V`` of shape ``(d, b)``).
        k: eigenpairs wanted (from each end for ``which="both"``).
        which: ``"largest"``, ``"smallest"``, ``"both"`` or ``"magnitude"``.
        tol: stop when every wanted Ritz residual is at most ``tol`` times the
            spectral scale (the largest absolute Ritz value).
        max_matvecs: budget of products (default ``max(600, 40 * k * b)``, at
            most enough to span the whole space a few times).
        seed: seed of the random start block.
        block_size: vectors per product; eigenvalues of multiplicity up to
            ``block_size`` are certain to be found (a single vector finds repeats
            through rounding only; reliably in our tests). Default 1.
        ncv: largest basis size before a restart (default ``max(2 k + 4 b, 40)``
            rounded to a multiple of ``b``, at most ``d``).
        v0: warm start, e.g. the ``vectors`` of a previous result, shape
            ``(d, j)``; random columns fill the block.
        check_symmetry: compare ``u . A v`` with ``v . A u`` on the first Krylov
            vectors (no extra products) and refuse a non-symmetric operator.
        verify: after convergence, search the operator deflated of the found
            eigenvectors from a fresh random start; an eigenvalue that belongs
            among the wanted ones (a missed copy of a repeated eigenvalue, which
            a Krylov space of block size ``b`` cannot see beyond multiplicity
            ``b``) is added and the search repeats. Costs one more short run.
        explicit_residuals: recompute ``||A u - lambda u||`` with ``k`` more
            products (the certificate). ``False`` reports the residuals the
            Lanczos relation gives, exact in exact arithmetic and reliable with
            full reorthogonalisation; for cheap tracking during training.

    Returns:
        An :class:`EigenResult`.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> from lossgeom.linalg import DenseOperator
        >>> res = lanczos(DenseOperator(A), k=3, tol=1e-10)
        >>> [round(v, 8) for v in res.values.tolist()], res.all_converged
        ([100.0, 99.0, 98.0], True)
    """
    start = time.perf_counter()
    res = _lanczos_core(
        op,
        k,
        which=which,
        tol=tol,
        max_matvecs=max_matvecs,
        seed=seed,
        block_size=block_size,
        ncv=ncv,
        v0=v0,
        check_symmetry=check_symmetry,
        explicit=explicit_residuals,
    )
    if not verify or which == "both":
        return res
    budget = res.info["budget"]
    used, rounds, found = res.n_matvecs, 0, 0
    values, vectors, residuals = res.values, res.vectors, res.residuals
    scale = res.spectral_scale
    shift_side = {"largest": -2.0, "smallest": 2.0, "magnitude": 0.0}[which]

    def search(
        deflated: SymmetricOperator, v0: Tensor | None = None, stop=None
    ) -> EigenResult:
        """One Lanczos run for the wanted end of the deflated operator."""
        nonlocal used, scale
        out = _lanczos_core(
            deflated,
            1,
            which=which,
            tol=tol,
            max_matvecs=min(budget - used, max(80, 4 * k)),
            seed=seed + 7919 * rounds,
            block_size=1,
            v0=v0,
            check_symmetry=False,
            stop=stop,
        )
        used += out.n_matvecs
        scale = max(scale, out.spectral_scale)
        return out

    while res.all_converged and used < budget and vectors.shape[1] < op.shape[0]:
        rounds += 1
        deflated = _Deflated(op, vectors, shift_side * (scale + 1.0))
        worst = float(_key(values[:k], which).min())
        slack = tol * max(scale, 1e-300)
        loose = max(tol, 1e-3) * max(scale, 1e-300)

        def decided(
            theta: Tensor, r: Tensor, worst=worst, slack=slack, loose=loose
        ) -> bool:
            # theta is a Ritz value of the deflated operator: it proves a wanted
            # eigenvalue was missed once it reaches the worst found one; the search
            # gives up once theta has (loosely) converged clearly below it
            key_t, r0 = float(_key(theta, which)[0]), float(r[0])
            return key_t >= worst - slack or (
                r0 <= loose and key_t + r0 < worst - slack
            )

        probe = search(deflated, stop=decided)
        if float(_key(probe.values[:1], which)[0]) < worst - slack:
            break  # nothing missed (as far as a Krylov search can tell)
        if not probe.all_converged:  # a missed one: converge it
            probe = search(deflated, v0=probe.vectors)
        theta, u = probe.values[:1], probe.vectors[:, :1]
        if (
            not probe.all_converged
            or float(_key(theta, which)[0]) < worst - tol * scale
        ):
            break
        # a missed eigenvalue (e.g. another copy of a repeated one): add it
        found += 1
        r = (apply_checked(op, u) - u * theta).norm(dim=0)
        used += 1
        values = torch.cat([values, theta])
        vectors = torch.cat([vectors, u], 1)
        residuals = torch.cat([residuals, r.to(residuals.dtype)])
        order = torch.argsort(_key(values, which), descending=True)
        values, vectors, residuals = values[order], vectors[:, order], residuals[order]
    # already in the order of ``which``; the k best are the answer
    values, vectors, residuals = values[:k], vectors[:, :k], residuals[:k]
    return EigenResult(
        values=values,
        vectors=vectors,
        residuals=residuals,
        converged=residuals <= tol * max(scale, 1e-300),
        n_matvecs=used,
        seconds=time.perf_counter() - start,
        method="lanczos",
        which=which,
        tol=float(tol),
        spectral_scale=scale,
        n_restarts=res.n_restarts,
        info=dict(res.info, verify_rounds=rounds, missed_found=found),
    )


class _Deflated(SymmetricOperator):
    """``P A P + shift U U^T`` with ``P = I - U U^T``: A with found eigenvectors moved.

    The found directions get the eigenvalue ``shift``, chosen on the unwanted side
    of the spectrum, so a search for the wanted end cannot return them.
    """

    def __init__(self, op: SymmetricOperator, U: Tensor, shift: float):
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op, self.U, self.shift = op, U, shift

    def _matmat(self, V: Tensor) -> Tensor:
        C = self.U.T @ V
        W = self.op @ (V - self.U @ C)
        return W - self.U @ (self.U.T @ W) + self.shift * (self.U @ C)


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
    stop=None,
    explicit: bool = True,
) -> EigenResult:
    start = time.perf_counter()
    wanted = _check_args(op, k, which, tol)
    d = op.shape[0]
    dtype, device = op.dtype, op.device
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
    gen = torch.Generator(device=device).manual_seed(seed)
    eps = torch.finfo(dtype).eps

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
    Q = X.new_zeros(d, 0)
    Qn, _ = _orth_refill(X, Q, gen, 1e3 * eps)
    n_mv = 0
    first: tuple[Tensor, float] | None = None  # coupling of the first expansion
    T = torch.zeros(0, 0, dtype=torch.float64, device=device)
    B_last = torch.zeros(0, 0, dtype=torch.float64, device=device)
    restarts = 0
    scale = 0.0

    while True:
        # expand the basis by one block
        if Qn.shape[1] > 0 and Q.shape[1] + Qn.shape[1] <= m_max and n_mv < budget:
            W = apply_checked(op, Qn)
            n_mv += Qn.shape[1]
            size = float(W.norm(dim=0).max())  # ||A q||, for the symmetry test
            Q = torch.cat([Q, Qn], 1)
            H = Q.T @ W
            W = W - Q @ H
            H2 = Q.T @ W
            W = W - Q @ H2
            H = (H + H2).double()
            n, nb = Q.shape[1], Qn.shape[1]
            if check_symmetry and first is not None and restarts == 0:
                B0, size0 = first
                _check_symmetric(H[: n - nb], B0.double(), max(size, size0), d, dtype)
                first = None
            T_new = torch.zeros(n, n, dtype=torch.float64, device=device)
            T_new[: n - nb, : n - nb] = T
            T_new[:, n - nb :] = H
            T_new[n - nb :, :] = H.T
            T_new[n - nb :, n - nb :] = (H[n - nb :] + H[n - nb :].T) / 2
            T = T_new
            Qn, B = _orth_refill(W, Q, gen, 1e3 * eps)
            B_last = B.double()
            if check_symmetry and n == nb and B.shape == (nb, nb):
                first = (B, size)
            if Q.shape[1] >= d:
                Qn = Q.new_zeros(d, 0)
                B_last = torch.zeros(0, nb, dtype=torch.float64, device=device)

        # Rayleigh-Ritz on the projected matrix (small: at most ncv x ncv)
        theta, S = torch.linalg.eigh(T)
        scale = max(scale, float(theta.abs().max()))
        nb = B_last.shape[1]
        if B_last.numel():
            res = (B_last @ S[-nb:, :]).norm(dim=0)
        else:
            res = torch.zeros_like(theta)
        if theta.numel() >= wanted:
            idx = _select(theta, wanted, which)
            done = bool((res[idx] <= tol * max(scale, 1e-300)).all())
            if stop is not None and stop(theta[idx], res[idx]):
                break
            if done or n_mv >= budget or Qn.shape[1] == 0:
                break
        elif n_mv >= budget or Qn.shape[1] == 0:
            idx = _select(theta, theta.numel(), "largest")
            break
        if Q.shape[1] + Qn.shape[1] > m_max:
            # thick restart: keep the wanted Ritz vectors and some more on their
            # side; A Q_keep = Q_keep Theta + Qn (B_last S_last), and that coupling
            # enters T when Qn's products are projected in the next expansion.
            room = m_max - Qn.shape[1]
            extra = max(0, min(room - wanted, max(wanted, 2 * b)))
            keep = _select(theta, wanted, which, extra=extra)[: max(room, 1)]
            Q = Q @ S[:, keep].to(dtype)
            T = torch.diag(theta[keep])
            restarts += 1

    values = theta[idx]
    vectors = Q @ S[:, idx].to(dtype)
    vectors = vectors / vectors.norm(dim=0)
    if explicit:
        AV = op @ vectors
        n_mv += vectors.shape[1]
        residuals = (AV - vectors * values.to(dtype)).norm(dim=0).double()
    else:  # from the Lanczos relation A Q = Q T + Q_next B E^T
        residuals = res[idx].double()
    values = values.to(dtype)
    order = torch.argsort(
        _key(values, "largest" if which == "both" else which), descending=True
    )
    values, vectors, residuals = values[order], vectors[:, order], residuals[order]
    converged = residuals <= tol * max(scale, 1e-300)
    return EigenResult(
        values=values,
        vectors=vectors,
        residuals=residuals.to(dtype),
        converged=converged,
        n_matvecs=n_mv,
        seconds=time.perf_counter() - start,
        method="lanczos",
        which=which,
        tol=float(tol),
        spectral_scale=scale,
        n_restarts=restarts,
        info={
            "block_size": b,
            "ncv": m_max,
            "budget": budget,
            "residuals": "explicit" if explicit else "from the Lanczos relation",
        },
    )


def power_iteration(
    op: SymmetricOperator,
    k: int = 5,
    *,
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    seed: int = 0,
    max_iter: int = 100,
) -> EigenResult:
    """Top-``k`` eigenvalues by magnitude with deflated power iteration.

    Kept to compare with the literature (PyHessian's method): each eigenvector is
    iterated against the previous ones (Gram-Schmidt deflation) until the Rayleigh
    quotient changes by less than ``tol`` relatively, or ``max_iter`` products.
    It converges slowly when eigenvalues are close and finds eigenvalues of
    largest magnitude, not largest value. The returned residuals are explicit.

    Args:
        op: symmetric operator.
        k: eigenpairs.
        tol: relative change of the Rayleigh quotient that stops an eigenvector.
        max_matvecs: overall budget (default ``k * max_iter``).
        seed: seed of the start vectors.
        max_iter: products per eigenvector at most.

    Returns:
        An :class:`EigenResult` with values sorted by magnitude (descending).
    """
    start = time.perf_counter()
    _check_args(op, k, "magnitude", tol)
    d = op.shape[0]
    gen = torch.Generator(device=op.device).manual_seed(seed)
    budget = max_matvecs if max_matvecs is not None else k * max_iter
    vecs: list[Tensor] = []
    vals: list[float] = []
    n_mv = 0
    for _ in range(k):
        v = torch.randn(d, generator=gen, dtype=op.dtype, device=op.device)
        lam = None
        for _ in range(max_iter):
            for u in vecs:
                v = v - torch.dot(u, v) * u
            v = v / v.norm()
            if n_mv >= budget:
                break
            w = op @ v
            n_mv += 1
            new = float(torch.dot(v, w))
            v = w
            if lam is not None and abs(new - lam) <= tol * (abs(lam) + 1e-300):
                lam = new
                break
            lam = new
        for u in vecs:
            v = v - torch.dot(u, v) * u
        v = v / v.norm()
        vecs.append(v)
        vals.append(lam if lam is not None else float("nan"))
    V = torch.stack(vecs, 1)
    values = torch.tensor(vals, dtype=op.dtype, device=op.device)
    AV = op @ V
    n_mv += k
    residuals = (AV - V * values).norm(dim=0)
    scale = float(values.abs().max())
    order = torch.argsort(values.abs(), descending=True)
    return EigenResult(
        values=values[order],
        vectors=V[:, order],
        residuals=residuals[order],
        converged=residuals[order] <= tol * scale,
        n_matvecs=n_mv,
        seconds=time.perf_counter() - start,
        method="power",
        which="magnitude",
        tol=float(tol),
        spectral_scale=scale,
        n_restarts=0,
    )
