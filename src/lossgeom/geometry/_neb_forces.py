"""The forces on a nudged elastic band, the FIRE step, and the band's gradients.

A band is the stack ``R`` of ``n + 2`` images, ``R[0]`` and ``R[-1]`` the fixed
ends. :func:`band_forces` turns the losses ``E`` and gradients ``G`` of the
``n`` movable images into the NEB force (Henkelman, Uberuaga & Jonsson 2000,
with the improved tangent of Henkelman & Jonsson 2000); :class:`Fire` moves the
images by the FIRE rule (Bitzek et al. 2006); :func:`band_loss_and_grads`
evaluates the loss and gradient at many images in one pass over the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from lossgeom.objective import Objective

__all__ = [
    "BandForces",
    "Fire",
    "band_forces",
    "band_loss_and_grads",
    "cap_moves",
    "interior_maximum",
    "tangents",
]

_TINY = 1e-300


def _norms(x: Tensor) -> Tensor:
    """Row norms ``(m, 1)``, kept above zero (the dtype's smallest normal number)."""
    return x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def tangents(R: Tensor, E: Tensor) -> Tensor:
    """Unit tangents at the movable images by the improved tangent rule.

    Henkelman & Jonsson 2000 (J. Chem. Phys. 113, 9978): the tangent
    points to the higher of the two neighbours, ``R[i+1] - R[i]`` when the loss
    rises through image ``i`` and ``R[i] - R[i-1]`` when it falls; at a local
    extremum of the loss along the band it is the two segments weighted by the
    larger and smaller loss differences (the larger toward the higher
    neighbour), so that the tangent turns smoothly. Where both differences are
    zero it is the bisector of the two unit segments.

    Args:
        R: the band, ``(n + 2, d)``, ends included.
        E: the loss at every image, ``(n + 2,)``.

    Returns:
        ``(n, d)``: one unit tangent per movable image.

    Example:
        >>> R = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
        >>> tangents(R, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)).tolist()
        [[0.0, 1.0]]
        >>> tangents(R, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)).tolist()
        [[1.0, 0.0]]
    """
    plus, minus = R[2:] - R[1:-1], R[1:-1] - R[:-2]
    before, here, after = E[:-2], E[1:-1], E[2:]
    rising = (after > here) & (here > before)
    falling = (after < here) & (here < before)
    d_after, d_before = (after - here).abs(), (before - here).abs()
    big, small = torch.maximum(d_after, d_before), torch.minimum(d_after, d_before)
    toward_after = after > before
    w_plus = torch.where(toward_after, big, small)[:, None]
    w_minus = torch.where(toward_after, small, big)[:, None]
    tau = torch.where(
        rising[:, None],
        plus,
        torch.where(falling[:, None], minus, w_plus * plus + w_minus * minus),
    )
    bisector = plus / _norms(plus) + minus / _norms(minus)
    tau = torch.where(tau.norm(dim=1, keepdim=True) > 0, tau, bisector)
    return tau / _norms(tau)


@dataclass
class BandForces:
    """The NEB force on the movable images, and what the convergence test reads.

    Attributes:
        force: ``(n, d)``, the force on each movable image.
        residual: ``(n,)``, the norm of the gradient's part that the band must
            remove: perpendicular to the tangent for an ordinary image, the whole
            gradient for the climbing image.
        climber: index (among the movable images) of the climbing image, or
            ``None`` when no image climbs.
        tangent: ``(n, d)`` unit tangents.
    """

    force: Tensor
    residual: Tensor
    climber: int | None
    tangent: Tensor

    @property
    def max_residual(self) -> float:
        """The largest residual: the band is converged when it is below ``tol``."""
        return float(self.residual.max())


def band_forces(
    R: Tensor, E: Tensor, G: Tensor, *, spring: float, climbing: bool
) -> BandForces:
    """The nudged-elastic-band force on every movable image.

    An ordinary image feels the gradient's component perpendicular to the
    tangent ``tau`` and a spring along it,
    ``F_i = -(g_i - (g_i . tau) tau) + k (|R[i+1] - R[i]| - |R[i] - R[i-1]|) tau``
    (Henkelman & Jonsson 2000); the springs only space the images
    and do not pull the band off the minimum-energy path. With ``climbing`` the
    highest movable image feels no spring and the gradient with its parallel
    component inverted, ``F = -g + 2 (g . tau) tau`` (Henkelman, Uberuaga &
    Jonsson 2000): it climbs along the band and descends across it, to a
    first-order saddle point. The climbing image is the highest movable image
    that is higher than both its neighbours (:func:`interior_maximum`); a band
    whose loss has no interior maximum has no saddle to climb to.

    Args:
        R: the band, ``(n + 2, d)``, ends included.
        E: the loss at every image, ``(n + 2,)``.
        G: the gradients at the movable images, ``(n, d)``.
        spring: the spring constant ``k`` (loss per squared distance).
        climbing: whether the highest movable image climbs.

    Returns:
        A :class:`BandForces`.

    Example:
        >>> R = torch.tensor([[-1.0, 0.0], [0.0, 0.5], [1.0, 0.0]], dtype=torch.float64)
        >>> E = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
        >>> G = torch.tensor([[0.0, 0.5]], dtype=torch.float64)
        >>> f = band_forces(R, E, G, spring=1.0, climbing=True)
        >>> f.force.tolist(), f.climber
        ([[0.0, -0.5]], 0)
    """
    tau = tangents(R, E)
    along = (G * tau).sum(1, keepdim=True)
    perp = G - along * tau
    gaps = (R[1:] - R[:-1]).norm(dim=1)
    stretch = (gaps[1:] - gaps[:-1])[:, None]
    force = -perp + spring * stretch * tau
    residual = perp.norm(dim=1)
    top = interior_maximum(E) if climbing else None
    climber = None if top is None else top - 1
    if climber is not None:
        force[climber] = -G[climber] + 2 * along[climber] * tau[climber]
        residual[climber] = G[climber].norm()
    return BandForces(force, residual, climber, tau)


def interior_maximum(E: Tensor) -> int | None:
    """Index in the band of the highest movable image that is a local maximum.

    A local maximum is higher than both its neighbours. Usually this is the
    highest movable image (the one Henkelman et al. let climb); where that one
    is next to a higher end, the highest bump inside the band is taken.

    Args:
        E: the loss at every image, ``(n + 2,)``, ends included.

    Returns:
        The index (between 1 and ``n``), or ``None`` when no movable image is
        higher than both its neighbours (e.g. the loss falls monotonically from
        one end to the other).

    Example:
        >>> interior_maximum(torch.tensor([0.0, 2.0, 3.0, 1.0]))
        2
        >>> interior_maximum(torch.tensor([5.0, 1.0, 2.0, 1.5, 4.0]))
        2
        >>> interior_maximum(torch.tensor([5.0, 2.0, 1.0, 0.0])) is None
        True
    """
    here = E[1:-1]
    peak = (here > E[:-2]) & (here > E[2:])
    if not bool(peak.any()):
        return None
    masked = torch.where(peak, here, torch.full_like(here, -math.inf))
    return int(torch.argmax(masked)) + 1


def cap_moves(dr: Tensor, max_move: float) -> Tensor:
    """Shorten each image's displacement (a row of ``dr``) to at most ``max_move``."""
    return dr * (max_move / _norms(dr)).clamp(max=1.0)


@dataclass
class Fire:
    """The FIRE minimiser (Bitzek et al. 2006, Phys. Rev. Lett. 97, 170201).

    Velocity Euler steps with time step ``dt`` on all images stacked as one
    vector, mixed toward the force while the motion goes downhill: when
    ``P = F . v > 0`` the velocity turns toward ``F`` by ``alpha`` and, after
    ``N_min = 5`` such steps, ``dt`` grows by 1.1 (up to ``dt_max``) and
    ``alpha`` shrinks by 0.99; when ``P <= 0`` the velocity is set to zero, ``dt``
    halves and ``alpha`` returns to 0.1. The paper's constants throughout.

    Attributes:
        dt: the current time step.
        dt_max: the largest time step.
        alpha: the current mixing weight.
        downhill: steps since the last uphill one.
        velocity: the stacked velocities (``None`` before the first step).
    """

    dt: float
    dt_max: float
    alpha: float = 0.1
    downhill: int = 0
    velocity: Tensor | None = None

    N_MIN = 5
    F_INC = 1.1
    F_DEC = 0.5
    ALPHA_START = 0.1
    F_ALPHA = 0.99

    def move(self, force: Tensor) -> Tensor:
        """The displacement of this step for ``force`` (the stacked image forces).

        Example:
            >>> fire = Fire(dt=0.5, dt_max=1.0)
            >>> fire.move(torch.tensor([[1.0, 0.0]])).tolist()  # dt^2 F from rest
            [[0.25, 0.0]]
            >>> fire.move(torch.tensor([[-1.0, 0.0]])).tolist()  # uphill: halve dt
            [[-0.0625, 0.0]]
        """
        v = self.velocity
        if v is None or v.shape != force.shape:
            v = torch.zeros_like(force)
        elif float((force * v).sum()) > 0:
            scale = float(v.norm()) / max(float(force.norm()), _TINY)
            v = (1 - self.alpha) * v + self.alpha * scale * force
            if self.downhill > self.N_MIN:
                self.dt = min(self.dt * self.F_INC, self.dt_max)
                self.alpha *= self.F_ALPHA
            self.downhill += 1
        else:
            v = torch.zeros_like(force)
            self.dt *= self.F_DEC
            self.alpha = self.ALPHA_START
            self.downhill = 0
        v = v + self.dt * force
        self.velocity = v
        return self.dt * v


def band_loss_and_grads(
    obj: Objective,
    P: Tensor,
    *,
    chunk_size: int | None,
    batch: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Loss and gradient at every row of ``P`` ``(m, d)``, in one pass over the data.

    Without ``batch`` the loss is the objective's over all its data (and ranks):
    per batch, the gradients of all ``m`` points come from one ``vmap`` of
    :func:`torch.func.grad_and_value` (``chunk_size`` points at a time;
    ``chunk_size=1``: one reverse pass per point). With ``batch = (x, y)`` the
    loss is the loss function's own value on that minibatch. Counts ``m`` losses
    and gradients (and one pass) on ``obj`` for the full data; nothing for a
    minibatch.

    Returns:
        ``(losses (m,), gradients (m, d))``; non-finite values are returned.
    """
    if batch is None:
        out = obj.accumulate(
            lambda x, y: _stacked(obj.batch_term, P, x, y, chunk_size),
            what="loss and gradient along the band",
            higher_order=False,
            check_finite=False,
            count_pass=False,
        )
        obj.counters.passes += 1
        obj.counters.loss += P.shape[0]
        obj.counters.grad += P.shape[0]
    else:
        with obj.probe_mode(higher_order=False):
            out = _stacked(obj.batch_loss, P, *batch, chunk_size)
    return out[:, -1], out[:, :-1]


def _stacked(term, P: Tensor, x: Tensor, y: Tensor, chunk: int | None) -> Tensor:
    """Rows ``[grad, value]`` of ``term(theta, x, y)`` at each row of ``P``."""
    with torch.enable_grad():
        if chunk == 1:
            rows = []
            for p in P:
                t = p.detach().requires_grad_(True)
                value = term(t, x, y)
                (g,) = torch.autograd.grad(value, t, allow_unused=True)
                g = torch.zeros_like(p) if g is None else g
                rows.append(torch.cat([g, value.detach().reshape(1)]))
            return torch.stack(rows)
        g, value = vmap(grad_and_value(lambda t: term(t, x, y)), chunk_size=chunk)(
            P.detach()
        )
    return torch.cat([g, value[:, None]], 1)
