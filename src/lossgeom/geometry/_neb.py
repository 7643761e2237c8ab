"""Minimum-energy paths by the nudged elastic band, with a climbing image.

A band of images between two fixed parameter vectors relaxes under the NEB
force (Henkelman, Uberuaga & Jonsson 2000, J. Chem. Phys. 113, 9901; improved
tangent: Henkelman & Jonsson 2000, J. Chem. Phys. 113, 9978): the gradient's
component perpendicular to the band plus springs along it. At convergence the
band lies on a minimum-energy path, and the climbing image (the highest one,
which climbs along the band instead of feeling springs) sits on the path's
highest first-order saddle point, certified by its gradient norm. Draxler et
al. 2018 ("Essentially no barriers in neural network energy landscapes", ICML)
used the method, refined in cycles that insert images (AutoNEB), to join
independently trained networks; ``cycles > 1`` does that refinement here.

:func:`neb` is reached through :func:`lossgeom.connect` with ``curve="neb"``;
the forces and the optimiser are in :mod:`lossgeom.geometry._neb_forces`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lossgeom._results import CostMeter
from lossgeom.geometry._curve_basis import _check_int
from lossgeom.geometry._curve_training import _minibatches, _objective_in_mode
from lossgeom.geometry._curves import _check_end, _modes, connect
from lossgeom.geometry._evaluation import default_chunk_size
from lossgeom.geometry._neb_forces import (
    BandForces,
    Fire,
    band_forces,
    band_loss_and_grads,
    cap_moves,
)
from lossgeom.geometry._neb_result import NEBResult, neb_result
from lossgeom.linalg._operator import NonFiniteError
from lossgeom.objective import Objective

__all__ = ["NEBResult", "connect_neb", "neb"]

_OPTIMIZERS = ("fire", "descent")
Batches = Iterator[tuple[Tensor, Tensor]]


def neb(
    obj: Objective,
    theta_a: Tensor,
    theta_b: Tensor,
    *,
    images: int = 8,
    steps: int = 1000,
    spring: float = 1.0,
    climbing: bool = True,
    step: float = 1.0,
    optimizer: Literal["fire", "descent"] = "fire",
    tol: float = 1e-3,
    max_move: float = 0.2,
    cycles: int = 1,
    insert: int = 1,
    init: Tensor | Callable[[Tensor], Tensor] | None = None,
    minibatch: int | None = None,
    per_segment: int = 4,
    train_mode: Literal["auto", "train", "eval"] = "auto",
    recompute_norm: bool | None = None,
    log_every: int | None = None,
    chunk_size: int | None | str = "auto",
    seed: int = 0,
    eval_data: object | None = None,
) -> NEBResult:
    """Relax a nudged elastic band with a climbing image from ``theta_a`` to ``theta_b``.

    Called as ``lg.connect(obj, theta_a, theta_b, curve="neb", ...)``.

    **Band.** ``images`` movable images start on the straight line at
    ``a + i/(images+1) (b - a)`` (or at ``init``); the ends stay fixed. Each
    iteration evaluates the loss and gradient of all movable images in one pass
    over the data (a ``vmap`` over images per batch), forms the NEB force (see
    :func:`~lossgeom.geometry._neb_forces.band_forces`: perpendicular gradient
    plus springs of constant ``spring`` along the improved tangent; with
    ``climbing`` the highest image that is a local maximum along the band
    climbs) and moves the images: by FIRE (Bitzek et al. 2006) with time steps
    from ``step / 10`` up to ``step`` (the default 1.0: from 0.1 to 1), or by
    ``optimizer="descent"``, ``R += step * F``. No image moves more than
    ``max_move`` times the initial spacing ``|b - a| / (images + 1)`` in one
    iteration. The band stops early when the largest residual (perpendicular
    gradient norm; the climbing image's whole gradient norm) is below ``tol``.
    The saddle estimate is the climbing image; its gradient norm certifies it.

    **Refinement (AutoNEB-style, Draxler et al. 2018).** With ``cycles > 1``,
    after each cycle of up to ``steps`` iterations the loss is evaluated at the
    midpoint of every segment, and ``insert`` new images are placed at the
    midpoints of the segments whose loss varies most (largest range of the loss
    at the two images and the midpoint), before the next cycle.

    **Minibatches.** By default every force uses the full data (exact, and the
    early stop is exact). With ``minibatch=n`` each iteration draws ``n``
    samples (seeded by ``seed``), shared by all images; there is then no early
    stop. The final band is always checked on the full data.

    **BatchNorm** and **evaluation** as in :func:`~lossgeom.connect`: forces in
    ``train_mode`` (``"auto"``: batch statistics for BatchNorm models); the
    final path and the straight line (same number of points) are evaluated in
    the objective's mode, with statistics recomputed per point
    (``recompute_norm``). The model is never changed.

    Cost: ``cycles * steps`` iterations at most, each one pass over the data
    with ``n`` gradients (``n`` the movable images), plus the final check, the
    midpoints of each refinement and the evaluation of the path and the line.

    Args:
        obj: the objective (model, loss, data).
        theta_a: the first end, a flat parameter vector like ``obj.theta``.
        theta_b: the second end.
        images: movable images at the start (``>= 1``).
        steps: iterations per cycle, at most (``>= 1``).
        spring: spring constant (loss per squared distance, ``> 0``).
        climbing: let the highest image that is a local maximum along the band
            climb to the saddle point.
        step: FIRE's largest time step, or the step of ``"descent"`` (``> 0``).
            FIRE is stable for ``step`` below about ``2 / sqrt(lambda_max)``
            (``lambda_max`` the largest Hessian eigenvalue along the band),
            descent for ``step < 2 / lambda_max``; too large a step stalls
            convergence rather than diverging (FIRE halves it after each
            uphill move, and ``max_move`` bounds every move).
        optimizer: ``"fire"`` or ``"descent"``.
        tol: convergence threshold of the largest residual (``> 0``).
        max_move: largest move of an image per iteration, as a fraction of the
            initial spacing (``> 0``).
        cycles: refinement cycles (1: a plain climbing-image NEB).
        insert: images inserted after each cycle but the last.
        init: the starting movable images, ``(images, d)``, or a curve
            ``init(t)`` (e.g. a :class:`~lossgeom.geometry.ConnectResult`)
            sampled at ``t = i / (images + 1)``; default the straight line.
        minibatch: samples per force evaluation (``None``: the full data).
        per_segment: evaluation points per segment of the final path (``>= 1``).
        train_mode: ``"auto"``, ``"train"`` or ``"eval"`` mode for the forces.
        recompute_norm: recompute BatchNorm statistics at each evaluated point.
        log_every: iterations between history entries (default
            ``max(1, steps // 100)``).
        chunk_size: images (and points) per vectorised evaluation (see
            :meth:`Objective.evaluate`; ``"auto"``: 1 for convolutions on the
            CPU, else 64).
        seed: seed of the minibatches.
        eval_data: a second evaluation set for the final path and the line.

    Returns:
        An :class:`NEBResult`.

    Raises:
        ValueError: bad ends or settings (the message names the argument).
        NonFiniteError: an image's loss or gradient became non-finite.

    Example:
        >>> import lossgeom as lg
        >>> from lossgeom.zoo import surface
        >>> obj = lg.Objective(*surface("double_well"))
        >>> a = torch.tensor([-1.0, 0.0], dtype=torch.float64)
        >>> bent = lambda t: torch.stack([2 * t - 1, torch.sin(torch.pi * t)], 1)
        >>> res = lg.connect(obj, a, -a, curve="neb", images=6, init=bent, tol=1e-8)
        >>> res.converged, round(res.saddle_loss, 8), res.saddle.abs().max().item() < 1e-6
        (True, 1.0, True)
    """
    cfg = _Settings(
        images=images,
        steps=steps,
        spring=spring,
        climbing=climbing,
        step=step,
        optimizer=optimizer,
        tol=tol,
        max_move=max_move,
        cycles=cycles,
        insert=insert,
        minibatch=minibatch,
        per_segment=per_segment,
        log_every=_default_log_every(log_every, steps),
    )
    a = _check_end(obj, "theta_a", theta_a)
    b = _check_end(obj, "theta_b", theta_b)
    if torch.equal(a, b):
        raise ValueError(
            "theta_a and theta_b are the same point; a band needs two distinct ends."
        )
    recompute_norm, mode_used = _modes(obj, recompute_norm, train_mode)
    chunk = _chunk(obj, chunk_size)
    meter = CostMeter(obj)
    force_obj = _objective_in_mode(obj, mode_used)
    force_meter = CostMeter(force_obj) if force_obj is not obj else None
    band = _initial_band(obj, a, b, images, init)
    log = _Log(cfg.log_every)
    gen = torch.Generator(device=obj.device).manual_seed(seed)
    batches = _minibatches(obj, minibatch, gen) if minibatch is not None else None
    relax = _Relax(obj, force_obj, cfg, chunk, max_move * _spacing(band), batches)
    with closing(batches) if batches is not None else nullcontext():
        for cycle in range(cycles):
            if cycle > 0:
                band = _refine(force_obj, band, insert, chunk)
            band = relax.run(band, log)
        E, G = band_loss_and_grads(force_obj, band, chunk_size=chunk)
        _check_finite(E, G, None)
    forces = band_forces(band, E, G[1:-1], spring=spring, climbing=climbing)
    return neb_result(
        obj,
        band,
        E,
        G,
        forces,
        history=(log.steps, log.top, log.force),
        iterations=log.iteration,
        cycles=cycles,
        tol=tol,
        per_segment=per_segment,
        recompute_norm=recompute_norm,
        chunk_size=chunk_size,
        eval_data=eval_data,
        parameters={
            "curve": "neb",
            **dataclasses.asdict(cfg),
            "init": "straight line" if init is None else "given",
            "train_mode": mode_used,
            "recompute_norm": recompute_norm,
            "seed": seed,
            "objective_info": obj.info(),
        },
        details={"minibatch_gradients": relax.minibatch_gradients},
        meters=(meter, force_meter),
    )


def connect_neb(
    obj: Objective, theta_a: Tensor, theta_b: Tensor, curve_settings: dict, **kw: Any
) -> NEBResult:
    """:func:`~lossgeom.connect` with ``curve="neb"``: refuse curve-only settings.

    ``curve_settings`` holds connect's arguments that apply to trained curves
    only; any that differs from connect's default is an error that names the
    NEB setting to use instead.
    """
    instead = {
        "bends": "images (movable images of the band)",
        "lr": "step (FIRE's largest time step)",
        "batch_size": "minibatch (samples per force; default None, the full data)",
        "criterion": "nothing: the band follows the minimum-energy path",
        "t_samples": "nothing: every image is evaluated at every iteration",
        "init_noise": "init (the starting images, or a curve to sample them from)",
        "n_points": "per_segment (evaluation points per segment of the band)",
    }
    defaults = inspect.signature(connect).parameters
    for name, value in curve_settings.items():
        if value != defaults[name].default:
            raise ValueError(
                f"{name}={value!r} applies to curve='bezier' or 'polychain'; for "
                f"curve='neb' use {instead[name]}."
            )
    return neb(obj, theta_a, theta_b, **kw)


# ------------------------------------------------------------------- internals
def _positive(name: str, value: object, what: str) -> None:
    if not (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        raise ValueError(
            f"{name} must be a positive finite number ({what}); got {value!r}."
        )


@dataclass(frozen=True)
class _Settings:
    """The band's settings, checked on construction (errors name the argument)."""

    images: int
    steps: int
    spring: float
    climbing: bool
    step: float
    optimizer: str
    tol: float
    max_move: float
    cycles: int
    insert: int
    minibatch: int | None
    per_segment: int
    log_every: int

    def __post_init__(self) -> None:
        _check_int("images", self.images, 1, "movable images between the ends")
        _check_int("steps", self.steps, 1, "iterations per cycle")
        _check_int("cycles", self.cycles, 1, "refinement cycles; 1 for a plain NEB")
        _check_int("insert", self.insert, 1, "images inserted per refinement cycle")
        _check_int("per_segment", self.per_segment, 1, "points per segment")
        _check_int("log_every", self.log_every, 1, "iterations between log entries")
        if self.minibatch is not None:
            _check_int("minibatch", self.minibatch, 1, "samples per force, or None")
        _positive("spring", self.spring, "the spring constant")
        _positive("step", self.step, "FIRE's largest time step, or the descent step")
        _positive("tol", self.tol, "the threshold of the largest residual")
        _positive("max_move", self.max_move, "the largest move, in initial spacings")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {_OPTIMIZERS}; got {self.optimizer!r}. "
                "'fire' adapts its time step; 'descent' moves by step * force."
            )
        if not isinstance(self.climbing, bool):
            raise ValueError(f"climbing must be True or False; got {self.climbing!r}.")


@dataclass
class _Log:
    every: int
    iteration: int = 0
    steps: list[int] = field(default_factory=list)
    top: list[float] = field(default_factory=list)
    force: list[float] = field(default_factory=list)

    def record(self, E: Tensor, forces: BandForces, last: bool) -> None:
        if self.iteration % self.every == 0 or last:
            self.steps.append(self.iteration)
            self.top.append(float(E[1:-1].max()))
            self.force.append(forces.max_residual)


@dataclass
class _Relax:
    """One cycle of the band: at most ``cfg.steps`` iterations."""

    obj: Objective
    force_obj: Objective
    cfg: _Settings
    chunk: int | None
    max_move: float
    batches: Batches | None
    minibatch_gradients: int = 0

    def run(self, band: Tensor, log: _Log) -> Tensor:
        """Move the images until converged or out of steps; the new band."""
        cfg = self.cfg
        band = band.clone()
        mover = Fire(cfg.step / 10, cfg.step) if cfg.optimizer == "fire" else None
        ends = None
        for i in range(1, cfg.steps + 1):
            if self.batches is None:
                if ends is None:  # the ends never move: their loss once a cycle
                    ends = self.force_obj.evaluate(band[[0, -1]], chunk_size=self.chunk)
                inner, G = band_loss_and_grads(
                    self.force_obj, band[1:-1], chunk_size=self.chunk
                )
                E = torch.cat([ends[:1], inner, ends[1:]])
            else:
                E, G = self._minibatch(band, next(self.batches))
            _check_finite(E, G, log.iteration + 1)
            forces = band_forces(band, E, G, spring=cfg.spring, climbing=cfg.climbing)
            done = self.batches is None and forces.max_residual < cfg.tol
            log.iteration += 1
            log.record(E, forces, last=done or i == cfg.steps)
            if done:
                break
            if mover is not None:
                move = mover.move(forces.force)
            else:
                move = cfg.step * forces.force
            band[1:-1] += cap_moves(move, self.max_move)
        return band

    def _minibatch(
        self, band: Tensor, batch: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Minibatch losses of the whole band, gradients of its movable images."""
        E, G = band_loss_and_grads(
            self.force_obj, band, chunk_size=self.chunk, batch=batch
        )
        self.minibatch_gradients += band.shape[0]
        if self.obj.data_parallel:
            both = torch.cat([G, E[:, None]], 1)
            both = self.obj.all_reduce(both) / self.obj.world_size
            E, G = both[:, -1], both[:, :-1]
        return E, G[1:-1]


def _default_log_every(log_every: object, steps: object) -> Any:
    if log_every is not None or not isinstance(steps, int):
        return log_every
    return max(1, steps // 100)


def _spacing(band: Tensor) -> float:
    """The mean distance between neighbouring images of the straight band."""
    return float((band[-1] - band[0]).norm()) / (band.shape[0] - 1)


def _refine(obj: Objective, band: Tensor, insert: int, chunk: int | None) -> Tensor:
    """Insert ``insert`` images at the midpoints of the segments whose loss varies most.

    A segment's variation is the range of the loss at its two images and its
    midpoint, so that both a steep segment and a bump hidden between two
    images of equal loss call for an image.
    """
    mids = 0.5 * (band[1:] + band[:-1])
    here = obj.evaluate(torch.cat([band, mids]), chunk_size=chunk)
    E, M = here[: band.shape[0]], here[band.shape[0] :]
    trio = torch.stack([E[:-1], M, E[1:]])
    spread = trio.max(0).values - trio.min(0).values
    spread = torch.nan_to_num(spread, nan=math.inf)
    chosen = set(torch.argsort(spread, descending=True)[:insert].tolist())
    rows = []
    for i in range(band.shape[0] - 1):
        rows.append(band[i])
        if i in chosen:
            rows.append(mids[i])
    rows.append(band[-1])
    return torch.stack(rows)


def _check_finite(E: Tensor, G: Tensor, iteration: int | None) -> None:
    """Raise NonFiniteError naming the images whose loss or gradient is not finite.

    ``E`` holds the whole band's losses; ``G`` the gradients of the whole band or
    of its movable images only.
    """
    bad = ~torch.isfinite(E)
    rows = slice(None) if G.shape[0] == E.shape[0] else slice(1, -1)
    bad[rows] |= ~torch.isfinite(G).all(1)
    if bool(bad.any()):
        where = (
            "at the final band" if iteration is None else f"at iteration {iteration}"
        )
        raise NonFiniteError(
            f"the loss or gradient became non-finite {where}, at images "
            f"{bad.nonzero().flatten().tolist()} of the band (0 is theta_a). Lower "
            "step or max_move, or check the ends' losses."
        )


def _initial_band(
    obj: Objective, a: Tensor, b: Tensor, images: int, init: object
) -> Tensor:
    """The band ``(images + 2, d)``: the ends and the starting movable images."""
    frac = torch.arange(1, images + 1, dtype=a.dtype, device=a.device) / (images + 1)
    if init is None:
        inner = a + frac[:, None] * (b - a)
    else:
        if callable(init) and not isinstance(init, Tensor):
            with torch.no_grad():
                inner = init(frac)
        else:
            inner = init
        if (
            not isinstance(inner, Tensor)
            or inner.shape != (images, obj.dim)
            or not inner.is_floating_point()
        ):
            got = tuple(inner.shape) if isinstance(inner, Tensor) else type(inner)
            raise ValueError(
                f"init must give the movable images as a floating tensor of shape "
                f"({images}, {obj.dim}) (images x parameters), or be a curve "
                f"init(t) returning one for t = i / (images + 1); got {got}."
            )
        inner = inner.detach().to(device=obj.device, dtype=obj.dtype)
        if not bool(torch.isfinite(inner).all()):
            raise ValueError("init holds non-finite values (NaN or inf).")
    return torch.cat([a[None], inner, b[None]])


def _chunk(obj: Objective, chunk_size: int | None | str) -> int | None:
    if chunk_size == "auto":
        return default_chunk_size(obj)
    if chunk_size is not None:
        _check_int("chunk_size", chunk_size, 1, "images per vectorised call")
    return chunk_size  # type: ignore[return-value]
