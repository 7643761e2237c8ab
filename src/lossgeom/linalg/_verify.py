"""The verification search: a wanted eigenvalue that Lanczos missed, found or ruled out.

A Krylov space of block size ``b`` cannot see more than ``b`` copies of a repeated
eigenvalue. After :func:`~lossgeom.linalg.lanczos` converges, the operator with
the found eigenvectors moved out of the way (:class:`_Deflated`) is searched once
more from a fresh random start; an eigenvalue that belongs among the wanted ones
is added and the search repeats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lossgeom.linalg._eigen import EigenResult, _key
from lossgeom.linalg._krylov import Stop, _lanczos_core, _lanczos_result
from lossgeom.linalg._operator import SymmetricOperator, apply_checked, product_eps

__all__ = ["verify"]

# Where the found eigenvectors go in the deflated operator, in units of the
# spectral scale: on the side of the spectrum the search does not want.
_SHIFT_SIDE = {"largest": -2.0, "smallest": 2.0, "magnitude": 0.0}


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


class _Search:
    """Short Lanczos runs for the wanted end of deflated operators, on one budget."""

    def __init__(self, res: EigenResult, k: int, which: str, tol: float, seed: int):
        self.k, self.which, self.tol, self.seed = k, which, tol, seed
        self.criterion = res.criterion
        self.ritz_range = tuple(res.details.get("ritz_range", (math.inf, -math.inf)))
        self.budget = res.details["budget"]
        self.used = res.cost.matvecs
        self.scale = res.spectral_scale
        self.rounds = 0

    def __call__(
        self,
        deflated: SymmetricOperator,
        v0: Tensor | None = None,
        stop: Stop | None = None,
    ) -> EigenResult:
        """One Lanczos run for the wanted end of the deflated operator."""
        out = _lanczos_core(
            deflated,
            1,
            which=self.which,
            tol=self.tol,
            max_matvecs=min(self.budget - self.used, max(80, 4 * self.k)),
            seed=self.seed + 7919 * self.rounds,
            block_size=1,
            v0=v0,
            check_symmetry=False,
            stop=stop,
            criterion=self.criterion,
        )
        self.used += out.cost.matvecs
        # the deflated operator's own scale includes the artificial shift; the
        # scale of ``A`` grows only by the wanted Ritz values it shows
        self.scale = max(self.scale, float(out.values.abs().max()))
        return out


def _shift(search: _Search, which: str, worst: float) -> float:
    """Where the found eigenvectors go: the far end of the Ritz values seen.

    Any place well away from the wanted end works, but a shift outside the
    spectrum widens it, and Lanczos converges on the wanted end at a rate set by
    the gap relative to the spectrum's width: at the far end the search needs
    fewer products. Without a usable range (or a range that reaches the wanted
    end) the shift goes a spectral scale beyond it.
    """
    if which == "magnitude":
        return 0.0
    lo, hi = search.ritz_range
    far = lo if which == "largest" else -hi
    margin = 0.1 * max(search.scale, 1e-300)
    if math.isfinite(far) and far < worst - margin:  # worst is a key (-value)
        return lo if which == "largest" else hi
    return _SHIFT_SIDE[which] * (search.scale + 1.0)


def _missed(
    op: SymmetricOperator, search: _Search, values: Tensor, vectors: Tensor
) -> tuple[tuple[Tensor, Tensor] | None, EigenResult]:
    """A converged wanted eigenpair outside ``vectors`` (``None`` if none is seen).

    Also returns the search's last run: its top Ritz pair is the nearest
    eigenvalue outside the found ones on the wanted side, a gap for the bounds.
    """
    k, which, tol = search.k, search.which, search.tol
    worst = float(_key(values[:k], which).min())
    deflated = _Deflated(op, vectors, _shift(search, which, worst))
    slack = tol * max(search.scale, 1e-300)
    loose = max(tol, 1e-3) * max(search.scale, 1e-300)

    def decided(theta: Tensor, r: Tensor) -> bool:
        # theta is a Ritz value of the deflated operator: it proves a wanted
        # eigenvalue was missed once it reaches the worst found one; the search
        # gives up once theta has (loosely) converged clearly below it
        key_t, r0 = float(_key(theta, which)[0]), float(r[0])
        return key_t >= worst - slack or (r0 <= loose and key_t + r0 < worst - slack)

    probe = search(deflated, stop=decided)
    if float(_key(probe.values[:1], which)[0]) < worst - slack:
        return None, probe  # nothing missed (as far as a Krylov search can tell)
    if not probe.all_converged:  # a missed one: converge it
        probe = search(deflated, v0=probe.vectors)
    theta, u = probe.values[:1], probe.vectors[:, :1]
    if (
        not probe.all_converged
        or float(_key(theta, which)[0]) < worst - tol * search.scale
    ):
        return None, probe
    return (theta, u), probe


def verify(
    op: SymmetricOperator,
    res: EigenResult,
    k: int,
    *,
    which: str,
    tol: float,
    seed: int,
    start: float,
) -> EigenResult:
    """``res`` with every missed wanted eigenpair the deflated searches find added.

    Args:
        op: the operator ``res`` belongs to.
        res: a Lanczos result for ``which`` (not ``"both"``).
        k: eigenpairs wanted.
        which: the end of the spectrum.
        tol: relative residual tolerance.
        seed: seed of the Lanczos run behind ``res`` (the searches use others).
        start: ``time.perf_counter()`` when the Lanczos run began.

    Returns:
        The best ``k`` pairs, with ``details`` of ``res`` plus ``verify_rounds``
        and ``missed_found``.
    """
    search = _Search(res, k, which, tol, seed)
    found = 0
    values, vectors, residuals = res.values, res.vectors, res.residuals
    others = torch.tensor(res.details.get("other_ritz_values", []), dtype=torch.float64)
    other_res = torch.tensor(
        res.details.get("other_ritz_residuals", []), dtype=torch.float64
    )
    probe: EigenResult | None = None  # the last search, when it found nothing
    while (
        res.all_converged
        and search.used < search.budget
        and vectors.shape[1] < op.shape[0]
    ):
        search.rounds += 1
        missed, last = _missed(op, search, values, vectors)
        if missed is None:
            probe = last
            break
        # a missed eigenvalue (e.g. another copy of a repeated one): add it,
        # orthogonal to the found vectors (the deflated search keeps it so only
        # to rounding, which the shift would amplify), with its Rayleigh quotient
        _, u = missed
        for _ in range(2):
            u = u - vectors @ (vectors.T @ u)
        u = u / u.norm()
        Au = apply_checked(op, u)
        theta = (u.T @ Au).reshape(1)
        r = (Au - u * theta).norm(dim=0)
        search.used += 1
        found += 1
        values = torch.cat([values, theta])
        vectors = torch.cat([vectors, u], 1)
        residuals = torch.cat([residuals, r.to(residuals.dtype)])
        order = torch.argsort(_key(values, which), descending=True)
        values, vectors, residuals = values[order], vectors[:, order], residuals[order]
    # already in the order of ``which``; the k best are the answer
    values, vectors, residuals = values[:k], vectors[:, :k], residuals[:k]
    if probe is not None and probe.values.numel():  # the nearest one outside
        others = torch.cat([others, probe.values[:1].double().cpu()])
        other_res = torch.cat([other_res, probe.residuals[:1].double().cpu()])
    out = _lanczos_result(
        values,
        vectors,
        residuals,
        which=which,
        tol=tol,
        scale=search.scale,
        matvecs=search.used,
        start=start,
        n_restarts=res.n_restarts,
        criterion=res.criterion,
        others=(others, other_res),
        eps=product_eps(op),
        details=dict(res.details, verify_rounds=search.rounds, missed_found=found),
    )
    if res.all_converged and not out.all_converged:
        # the search saw an eigenvalue closer to the k-th than the first run did:
        # the gap shrank, and with it the certified error bound
        out.details["stopped"] = (
            "the verification search found the next eigenvalue closer than the "
            "first run showed, so the error bounds grew past tol; ask for a "
            "smaller tol or criterion='residual'"
        )
    return out
