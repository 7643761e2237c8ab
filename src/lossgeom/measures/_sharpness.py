r"""Sharpness: how much the loss rises in a neighbourhood of a point.

One entry point, :func:`sharpness`, with the definitions of the literature as
``kind``:

- ``"worst"``: :math:`\max_{\|\delta\|\le\rho} L(\theta+\delta)-L(\theta)`, by
  projected gradient ascent with restarts (Auto-PGD, Croce & Hein 2020); a lower
  bound of the true maximum.
- ``"average"``: :math:`E_{\delta\sim N(0,\sigma^2 I)} L(\theta+\delta)-L(\theta)`,
  Monte Carlo with a standard error.
- ``"sam"``: the first-order worst case of SAM (Foret et al. 2021),
  :math:`L(\theta+\rho\, g/\|g\|)-L(\theta)`.
- ``"keskar"``: Keskar et al. (2017), the worst case over the box
  :math:`|\delta_i|\le\epsilon(|\theta_i|+1)`, as
  :math:`100\,(\max L - L)/(1+L)`.
- ``"logdet"``: :math:`\log\det(H+\epsilon I)` by stochastic Lanczos quadrature.
- ``"pac_bayes"``: the magnitude-aware PAC-Bayes :math:`\sigma'` of Jiang et al.
  (2020): the largest :math:`\sigma'` whose Gaussian perturbations
  :math:`u_i\sim N(0,\sigma'^2 w_i^2+\epsilon^2)` cost at most 0.1 of training
  accuracy on average, by bisection.

``adaptive=True`` (ASAM, Kwon et al. 2021) measures ``"worst"``, ``"average"``
and ``"sam"`` in scaled coordinates :math:`\delta = T_\theta z`,
:math:`\|z\|\le\rho`, with :math:`T_\theta=\mathrm{diag}(|\theta|)+\eta`
(``normalization="elementwise"``) or the filter-wise scale of Li et al. 2018
(``normalization="filter"``). With ``eta=0`` both are exactly invariant to the
layer-wise rescalings that leave a ReLU network's function unchanged (Dinh et al.
2017), which change plain sharpness arbitrarily.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lossgeom.curvature import hessian, logdet
from lossgeom.geometry import normalize_direction
from lossgeom.measures._common import dataclass_to_dict, measure_cost
from lossgeom.objective import Objective

__all__ = ["SharpnessResult", "sharpness"]

Kind = Literal["worst", "average", "sam", "keskar", "logdet", "pac_bayes"]
Norm = Literal["l2", "linf"]
Normalization = Literal["elementwise", "filter"]

KINDS: tuple[str, ...] = ("worst", "average", "sam", "keskar", "logdet", "pac_bayes")
_NORMS_OF_KIND: dict[str, tuple[str, ...]] = {
    "worst": ("l2", "linf"),
    "sam": ("l2", "linf"),
    "keskar": ("linf",),
    "average": ("l2",),
    "logdet": (),
    "pac_bayes": (),
}
_ADAPTIVE_KINDS = ("worst", "average", "sam")
_NORMALIZATIONS = ("elementwise", "filter")
_DEFAULT_SAMPLES = {"average": 64, "pac_bayes": 32, "logdet": 10}
# Auto-PGD constants (Croce & Hein 2020): momentum, the fraction of increasing
# steps below which the step size is halved, checkpoint spacing (fractions of N).
_MOMENTUM = 0.75
_RHO = 0.75
_FIRST_CHECK, _CHECK_DECREASE, _MIN_CHECK = 0.22, 0.03, 0.06
# Points sent to Objective.evaluate at once are bounded to about this many bytes.
_POINT_BYTES = 2**28


@dataclass(frozen=True)
class SharpnessResult:
    """A sharpness measurement: its number, what it means, and what it cost.

    Attributes:
        value: the sharpness (for ``"pac_bayes"``: the sigma found).
        stderr: Monte Carlo (or probe) standard error of ``value``; ``None`` where
            the measure is not stochastic (``"worst"``, ``"sam"``, ``"keskar"``,
            ``"pac_bayes"``, whose bracket is in ``details``).
        kind: the measure (see :func:`sharpness`).
        definition: what ``value`` is, in symbols, with the parameters filled in.
        parameters: the resolved settings (radius, norm, adaptive, steps, seed...).
        cost: objective counters spent (loss, grad, hvp, passes) and seconds.
        details: by-products: base loss, the maximiser's loss, per-restart values,
            step-size halvings, accuracies, the bisection history...
        perturbation: the perturbation ``delta`` (in parameter space, on the CPU)
            that reached ``value`` for ``"worst"``, ``"keskar"`` and ``"sam"``;
            ``None`` otherwise. Left out of :meth:`to_dict`.
    """

    value: float
    stderr: float | None
    kind: str
    definition: str
    parameters: dict[str, Any]
    cost: dict[str, float]
    details: dict[str, Any]
    perturbation: Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """Plain JSON values (without the ``perturbation`` vector)."""
        return dataclass_to_dict(self, skip=("perturbation",))


def sharpness(
    obj: Objective,
    radius: float,
    kind: Kind = "worst",
    *,
    norm: Norm | None = None,
    adaptive: bool = False,
    normalization: Normalization | None = None,
    eta: float = 0.01,
    steps: int = 20,
    restarts: int = 3,
    samples: int | None = None,
    lanczos_steps: int = 80,
    target_drop: float = 0.1,
    magnitude_eps: float = 1e-3,
    tol: float = 0.01,
    theta: Tensor | None = None,
    chunk_size: int | None = 16,
    seed: int = 0,
) -> SharpnessResult:
    r"""Sharpness of the loss at ``theta`` (default: the model's parameters).

    ``kind`` (``L`` is the mean loss, ``rho`` = ``radius``):

    - ``"worst"``: :math:`\max_{\|z\|\le\rho} L(\theta+Tz)-L(\theta)` with
      :math:`T=I` (or the adaptive scale), ``norm`` ``"l2"`` (ball) or
      ``"linf"`` (box). Auto-PGD: ``steps`` ascent steps per restart (one
      gradient each), normalized-gradient (l2) or sign (linf) steps of initial
      size ``2 rho`` with momentum 0.75, projection onto the ball or box, and the
      step size halved at checkpoints where the ascent stalls (fewer than 75% of
      steps increased the loss, or the best value did not move), restarting from
      the best point. Restart 0 starts at the first-order maximiser (SAM's point);
      the others at seeded random points. ``value`` is the largest increase found
      (the centre counts, so it is ``>= 0``): a lower bound of the maximum.
    - ``"average"``: :math:`E_z L(\theta+Tz)-L(\theta)`,
      :math:`z\sim N(0,\rho^2 I)` (so ``radius`` is the standard deviation
      ``sigma`` per coordinate, not a norm), ``samples`` Monte Carlo samples
      (default 64) evaluated in batches by :meth:`Objective.evaluate`;
      ``stderr`` is the standard error of the mean.
    - ``"sam"``: :math:`L(\theta+\delta)-L(\theta)` with the first-order
      maximiser :math:`\delta=\rho\,T^2 g/\|Tg\|_2` (l2; plain SAM for
      :math:`T=I`, ASAM otherwise) or :math:`\rho\,T\,\mathrm{sign}(Tg)` (linf),
      :math:`g=\nabla L(\theta)`. ``details["first_order"]`` is the linear
      prediction :math:`\rho\|Tg\|_*`. A zero gradient gives a zero
      perturbation.
    - ``"keskar"``: Keskar et al. 2017, the box
      :math:`|\delta_i|\le\rho(|\theta_i|+1)` (full space, no random subspace),
      maximised by the linf Auto-PGD above, reported as
      :math:`100\,(\max L-L(\theta))/(1+L(\theta))`.
    - ``"logdet"``: :math:`\log\det(H+\rho I)` of the Hessian at ``theta`` by
      stochastic Lanczos quadrature (:func:`lossgeom.logdet`, ``samples`` probes,
      default 10, of ``lanczos_steps`` steps), with its standard error.
    - ``"pac_bayes"``: Jiang et al. 2020, magnitude-aware: the largest
      :math:`\sigma'` with :math:`A(\theta)-E_u A(\theta+u)\le` ``target_drop``
      for :math:`u_i\sim N(0,\sigma'^2\theta_i^2+\epsilon^2)`,
      :math:`\epsilon` = ``magnitude_eps``, :math:`A` the training accuracy.
      The expectation is a Monte Carlo mean over ``samples`` draws (default 32),
      the same draws for every :math:`\sigma'` (common random numbers, so the
      bisection sees a smooth function). ``radius`` is the first upper end of the
      bracket, doubled until the drop exceeds the target; bisection stops when
      the bracket is narrower than ``tol`` times its upper end. ``value`` is the
      bracket's lower end (the largest sigma seen within the target);
      ``details`` has the accuracy there, its standard error, the bracket and
      :math:`1/\sigma'^2` (Jiang et al.'s "pacbayes.mag.flatness").

    Adaptive sharpness (``adaptive=True``; kinds ``"worst"``, ``"average"``,
    ``"sam"``): ``normalization="elementwise"`` (default) is ASAM's
    :math:`T=\mathrm{diag}(|\theta_i|)+\eta`; ``"filter"`` gives every entry of
    a filter (a row along the first dimension of a weight tensor) the filter's
    root-mean-square :math:`\|w_f\|/\sqrt{n_f}`, plus :math:`\eta` (so a
    standard normal ``z`` has filter norms about :math:`\|w_f\|`, as in Li et
    al.'s filter-normalized directions), and 1-D parameters (biases, norm
    scales) :math:`|\theta_i|+\eta`. With ``eta=0`` both are exactly invariant to
    rescaling a layer by ``alpha`` and the next by ``1/alpha``; ``eta>0`` (ASAM
    uses 0.01) lets parameters at zero move, at the price of exact invariance.

    Args:
        obj: the objective (model, loss, data).
        radius: ``rho`` (worst, sam, keskar: the constraint; average: sigma;
            logdet: the shift; pac_bayes: the first upper end of the bracket).
        kind: one of ``"worst"``, ``"average"``, ``"sam"``, ``"keskar"``,
            ``"logdet"``, ``"pac_bayes"``.
        norm: ``"l2"`` or ``"linf"`` (worst, sam; default ``"l2"``); keskar is
            ``"linf"`` and average ``"l2"`` by definition; others take none.
        adaptive: measure in scaled coordinates ``delta = T z`` (ASAM).
        normalization: the scale of ``adaptive``: ``"elementwise"`` (default)
            or ``"filter"``.
        eta: added to the adaptive scale.
        steps: ascent steps per restart (worst, keskar).
        restarts: ascent restarts (worst, keskar).
        samples: Monte Carlo samples (average, pac_bayes) or probes (logdet).
        lanczos_steps: Lanczos steps per probe (logdet).
        target_drop: allowed accuracy drop (pac_bayes; Jiang et al. use 0.1).
        magnitude_eps: the additive noise floor ``epsilon`` (pac_bayes; 1e-3 as
            Jiang et al.).
        tol: relative width of the final bracket (pac_bayes).
        theta: where to measure (default ``obj.theta``); never changed.
        chunk_size: points per vectorised call of :meth:`Objective.evaluate`.
        seed: seed of every random draw (starts, samples, probes).

    Returns:
        A :class:`SharpnessResult`.

    Raises:
        ValueError: on a bad radius, an unknown kind, norm or normalization, a
            norm or ``adaptive`` the kind does not take, or bad budgets.

    Example:
        At the minimum of a least-squares fit the loss is the quadratic
        ``0.5 delta.H delta``, whose worst case over the l2 ball is
        ``0.5 lambda_max r^2``:

        >>> import torch, lossgeom as lg
        >>> from lossgeom.measures._sharpness import sharpness
        >>> X = torch.randn(64, 3, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> _ = torch.nn.init.ones_(model.weight)  # the minimum: y = X @ 1
        >>> obj = lg.Objective(model, torch.nn.MSELoss(), (X, X.sum(1, keepdim=True)))
        >>> lam = lg.eigenvalues(obj, 1).values[0].item()
        >>> res = sharpness(obj, 0.1, "worst", steps=30)
        >>> abs(res.value / (0.5 * lam * 0.1**2) - 1) < 1e-3
        True
    """
    if not isinstance(obj, Objective):
        raise TypeError(
            "expected obj to be a lossgeom.Objective (lg.Objective(model, loss_fn, "
            f"data)); got {type(obj).__name__}."
        )
    _check_positive("radius", radius)
    if kind not in KINDS:
        raise ValueError(
            f"kind must be one of {KINDS}; got {kind!r}. See the sharpness "
            "docstring for each definition."
        )
    norm = _resolve_norm(kind, norm)
    normalization = _resolve_normalization(kind, adaptive, normalization)
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0; got {eta!r}.")
    if samples is None:
        samples = _DEFAULT_SAMPLES.get(kind, 0)
    _check_int("steps", steps, 1)
    _check_int("restarts", restarts, 1)
    _check_int("samples", samples, 2 if kind in ("average", "pac_bayes") else 0)
    _check_int("lanczos_steps", lanczos_steps, 1)
    if not 0 < target_drop < 1:
        raise ValueError(
            f"target_drop must be an accuracy drop in (0, 1); got {target_drop!r}."
        )
    _check_positive("magnitude_eps", magnitude_eps, allow_zero=True)
    _check_positive("tol", tol)
    theta = obj.check_theta(theta).detach().clone()
    radius = float(radius)
    parameters: dict[str, Any] = {
        "radius": radius,
        "norm": norm,
        "adaptive": bool(adaptive),
        "normalization": normalization,
        "eta": float(eta) if adaptive else None,
        "seed": int(seed),
        "mode": obj.mode,
    }

    with measure_cost(obj) as cost:
        if kind in ("worst", "keskar"):
            if kind == "keskar":
                scale = theta.abs() + 1.0
            else:
                scale = _scale(obj, theta, normalization, eta)
            parameters.update(steps=steps, restarts=restarts)
            out = _worst(obj, theta, scale, radius, norm, steps, restarts, seed)
        elif kind == "average":
            parameters.update(samples=samples, chunk_size=chunk_size)
            scale = _scale(obj, theta, normalization, eta)
            out = _average(obj, theta, scale, radius, samples, chunk_size, seed)
        elif kind == "sam":
            out = _sam(obj, theta, _scale(obj, theta, normalization, eta), radius, norm)
        elif kind == "logdet":
            parameters.update(samples=samples, lanczos_steps=lanczos_steps)
            est = logdet(
                hessian(obj, theta),
                shift=radius,
                n_probes=samples,
                n_steps=lanczos_steps,
                seed=seed,
            )
            out = _Outcome(
                est.value, est.stderr, dict(est.info, n_matvecs=est.n_matvecs)
            )
        else:
            parameters.update(
                samples=samples,
                target_drop=target_drop,
                magnitude_eps=magnitude_eps,
                tol=tol,
                chunk_size=chunk_size,
            )
            out = _pac_bayes(
                obj,
                theta,
                radius,
                samples,
                target_drop,
                magnitude_eps,
                tol,
                chunk_size,
                seed,
            )
    value = out.value
    if kind == "keskar":
        base = out.details["base_loss"]
        out.details["loss_increase"] = value
        value = 100.0 * value / (1.0 + base)
    return SharpnessResult(
        value=float(value),
        stderr=None if out.stderr is None else float(out.stderr),
        kind=kind,
        definition=_definition(kind, parameters),
        parameters=parameters,
        cost=dict(cost),
        details=out.details,
        perturbation=None if out.delta is None else out.delta.detach().cpu(),
    )


# ---------------------------------------------------------------- validation
def _check_positive(name: str, value: object, *, allow_zero: bool = False) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}.")


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")


def _resolve_norm(kind: str, norm: str | None) -> str | None:
    allowed = _NORMS_OF_KIND[kind]
    if norm is None:
        return allowed[0] if allowed else None
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf'; got {norm!r}.")
    if norm not in allowed:
        if not allowed:
            fix = f"kind={kind!r} takes no norm; leave norm=None"
        else:
            fix = f"kind={kind!r} is defined with norm={allowed[0]!r} only"
        raise ValueError(
            f"norm={norm!r} does not apply to kind={kind!r}: {fix}. Norms apply to "
            "'worst' and 'sam' (l2 or linf), 'keskar' (linf box) and 'average' "
            "(isotropic Gaussian, l2)."
        )
    return norm


def _resolve_normalization(
    kind: str, adaptive: bool, normalization: str | None
) -> str | None:
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False; got {adaptive!r}.")
    if normalization is not None and normalization not in _NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {_NORMALIZATIONS}; got {normalization!r}."
        )
    if not adaptive:
        if normalization is not None:
            raise ValueError(
                f"normalization={normalization!r} scales the adaptive perturbation; "
                "it needs adaptive=True (pass adaptive=True, or drop normalization)."
            )
        return None
    if kind not in _ADAPTIVE_KINDS:
        why = {
            "keskar": "its box is already scaled by |theta_i| + 1",
            "pac_bayes": "its noise is already scaled by |w_i| (magnitude-aware)",
            "logdet": "it is a spectral quantity of H, not a perturbation",
        }[kind]
        raise ValueError(
            f"adaptive=True applies to kinds {_ADAPTIVE_KINDS}; got kind={kind!r} "
            f"({why}). Use adaptive=False with this kind."
        )
    return normalization or "elementwise"


# --------------------------------------------------------------- the scale T
def _filter_scale(obj: Objective, theta: Tensor) -> Tensor:
    """Per-entry filter scale: each filter's root-mean-square, ``|theta_i|`` for 1-D.

    The all-ones direction normalized filter by filter (Li et al. 2018, as
    :func:`lossgeom.normalize_direction` does it, 1-D parameters entry by entry).
    """
    ones = torch.ones_like(theta)
    return normalize_direction(obj, ones, "filter", one_dim="filter", theta=theta)


def _scale(
    obj: Objective, theta: Tensor, normalization: str | None, eta: float
) -> Tensor | None:
    if normalization is None:
        return None
    base = theta.abs() if normalization == "elementwise" else _filter_scale(obj, theta)
    return base + eta


# ------------------------------------------------------------------- kinds
@dataclass
class _Outcome:
    value: float
    stderr: float | None
    details: dict[str, Any]
    delta: Tensor | None = None


def _project(norm: str, radius: float) -> Callable[[Tensor], Tensor]:
    if norm == "l2":

        def project(z: Tensor) -> Tensor:
            n = float(z.norm())
            return z * (radius / n) if n > radius else z

        return project
    return lambda z: z.clamp(-radius, radius)


def _ascent_direction(norm: str, g: Tensor) -> Tensor:
    if norm == "linf":
        return g.sign()
    n = g.norm()
    return g / n if float(n) > 0 else torch.zeros_like(g)


def _random_start(
    norm: str, radius: float, d: int, gen: torch.Generator, like: Tensor
) -> Tensor:
    if norm == "linf":
        z = (2 * torch.rand(d, generator=gen, dtype=torch.float64) - 1) * radius
    else:
        z = torch.randn(d, generator=gen, dtype=torch.float64)
        z = z * (0.5 * radius / z.norm().clamp_min(1e-300))
    return z.to(device=like.device, dtype=like.dtype)


def _worst(
    obj: Objective,
    theta: Tensor,
    scale: Tensor | None,
    radius: float,
    norm: str,
    steps: int,
    restarts: int,
    seed: int,
) -> _Outcome:
    """Auto-PGD ascent of ``f(z) = L(theta + T z)`` over ``||z||_norm <= radius``."""
    project = _project(norm, radius)

    def point(z: Tensor) -> Tensor:
        return theta + (z if scale is None else scale * z)

    def f_and_g(z: Tensor) -> tuple[float, Tensor]:
        f, g = obj.loss_and_grad(point(z))
        return f, (g if scale is None else scale * g)

    base, g0 = obj.loss_and_grad(theta)
    gz0 = g0 if scale is None else scale * g0
    gen = torch.Generator().manual_seed(int(seed))
    best_f, best_z = base, torch.zeros_like(theta)
    per_restart, halvings, starts = [], [], []
    for r in range(restarts):
        if r == 0 and float(gz0.abs().max()) > 0:
            z0, start = radius * _ascent_direction(norm, gz0), "first-order"
        else:
            z0, start = _random_start(norm, radius, theta.numel(), gen, theta), "random"
        f_r, z_r, n_halved = _apgd(
            f_and_g, lambda z: obj.loss(point(z)), z0, project, norm, radius, steps
        )
        per_restart.append(f_r - base)
        halvings.append(n_halved)
        starts.append(start)
        if f_r > best_f:
            best_f, best_z = f_r, z_r
    delta = best_z if scale is None else scale * best_z
    details = {
        "base_loss": base,
        "max_loss": best_f,
        "per_restart": per_restart,
        "best_restart": int(max(range(restarts), key=per_restart.__getitem__)),
        "starts": starts,
        "halvings": halvings,
        "steps": steps,
        "restarts": restarts,
        "delta_l2": float(delta.norm()),
        "delta_linf": float(delta.abs().max()),
        "z_norm": float(best_z.norm() if norm == "l2" else best_z.abs().max()),
    }
    return _Outcome(best_f - base, None, details, delta)


def _apgd(
    f_and_g: Callable[[Tensor], tuple[float, Tensor]],
    f_only: Callable[[Tensor], float],
    z: Tensor,
    project: Callable[[Tensor], Tensor],
    norm: str,
    radius: float,
    steps: int,
) -> tuple[float, Tensor, int]:
    """One Auto-PGD run of ``steps`` moves; returns the best value, point, halvings."""
    z = project(z)
    f, g = f_and_g(z)
    best_f, best_z, best_g = f, z, g
    z_prev = z
    step = 2.0 * radius
    interval = max(int(_FIRST_CHECK * steps), 1)
    decrease = max(int(_CHECK_DECREASE * steps), 1)
    min_interval = max(int(_MIN_CHECK * steps), 1)
    since_check, increases, halved = 0, 0, 0
    halved_last_check, best_at_last_check = False, best_f
    for k in range(steps):
        u = project(z + step * _ascent_direction(norm, g))
        a = 1.0 if k == 0 else _MOMENTUM
        z_prev, z = z, project(z + a * (u - z) + (1 - a) * (z - z_prev))
        if k == steps - 1:
            f_new, g = f_only(z), g
        else:
            f_new, g = f_and_g(z)
        increases += f_new > f
        f = f_new
        if f > best_f:
            best_f, best_z, best_g = f, z, g
        since_check += 1
        if since_check == interval and k < steps - 1:
            stalled = increases <= _RHO * interval
            flat = not halved_last_check and best_f <= best_at_last_check
            halved_last_check = stalled or flat
            best_at_last_check = best_f
            if halved_last_check:
                step /= 2
                halved += 1
                z, z_prev, f, g = best_z, best_z, best_f, best_g
            since_check, increases = 0, 0
            interval = max(interval - decrease, min_interval)
    return best_f, best_z, halved


def _average(
    obj: Objective,
    theta: Tensor,
    scale: Tensor | None,
    sigma: float,
    samples: int,
    chunk_size: int | None,
    seed: int,
) -> _Outcome:
    base = obj.loss(theta)
    gen = torch.Generator().manual_seed(int(seed))
    rises = []
    block = _block_size(theta, samples)
    for start in range(0, samples, block):
        m = min(block, samples - start)
        Z = torch.randn(m, theta.numel(), generator=gen, dtype=torch.float64)
        Z = Z.to(device=theta.device, dtype=theta.dtype) * sigma
        D = Z if scale is None else Z * scale
        rises.append(obj.evaluate(theta + D, chunk_size=chunk_size).double() - base)
    rise = torch.cat(rises).cpu()
    bad = ~torch.isfinite(rise)
    if bool(bad.any()):
        raise ValueError(
            f"the loss was not finite at {int(bad.sum())} of {samples} Gaussian "
            f"perturbations of sigma={sigma:g} (first at sample "
            f"{int(bad.nonzero()[0])}); use a smaller radius."
        )
    mean = float(rise.mean())
    stderr = float(rise.std(unbiased=True)) / math.sqrt(samples)
    details = {
        "base_loss": base,
        "mean_loss": base + mean,
        "std": float(rise.std(unbiased=True)),
        "max_increase": float(rise.max()),
        "samples": samples,
    }
    return _Outcome(mean, stderr, details)


def _sam(
    obj: Objective, theta: Tensor, scale: Tensor | None, rho: float, norm: str
) -> _Outcome:
    base, g = obj.loss_and_grad(theta)
    gz = g if scale is None else scale * g
    z = rho * _ascent_direction(norm, gz)
    delta = z if scale is None else scale * z
    loss = obj.loss(theta + delta)
    dual = gz.norm() if norm == "l2" else gz.abs().sum()
    details = {
        "base_loss": base,
        "perturbed_loss": loss,
        "first_order": rho * float(dual),
        "grad_norm": float(g.norm()),
        "delta_l2": float(delta.norm()),
    }
    return _Outcome(loss - base, None, details, delta)


def _block_size(theta: Tensor, samples: int) -> int:
    """Points per :meth:`Objective.evaluate` call (one data pass each)."""
    per_point = theta.numel() * 8  # drawn in float64
    return max(1, min(samples, _POINT_BYTES // max(per_point, 1)))


def _pac_bayes(
    obj: Objective,
    theta: Tensor,
    sigma_hi: float,
    samples: int,
    target: float,
    eps: float,
    tol: float,
    chunk_size: int | None,
    seed: int,
) -> _Outcome:
    if not obj.knows_accuracy:
        raise ValueError(
            "kind='pac_bayes' needs training accuracy: outputs (n, C>1) and integer "
            "class targets (n,); this objective has none. Use a classification "
            "model and loss, or another kind."
        )
    base = float(obj.evaluate_metrics(theta.unsqueeze(0))["accuracy"][0])
    block = _block_size(theta, samples)
    history: dict[float, tuple[float, float]] = {}

    def accuracy(sigma: float) -> tuple[float, float]:
        if sigma not in history:
            std = (sigma**2 * theta.square() + eps**2).sqrt()
            gen = torch.Generator().manual_seed(int(seed))  # same draws every sigma
            accs = []
            for start in range(0, samples, block):
                m = min(block, samples - start)
                Z = torch.randn(m, theta.numel(), generator=gen, dtype=torch.float64)
                Z = Z.to(device=theta.device, dtype=theta.dtype)
                metrics = obj.evaluate_metrics(theta + Z * std, chunk_size=chunk_size)
                accs.append(metrics["accuracy"].double().cpu())
            a = torch.cat(accs)
            history[sigma] = (float(a.mean()), float(a.std()) / math.sqrt(samples))
        return history[sigma]

    def drop(sigma: float) -> float:
        return base - accuracy(sigma)[0]

    lo, hi = 0.0, sigma_hi
    doublings = 0
    while drop(hi) <= target and doublings < 30:
        lo, hi, doublings = hi, 2 * hi, doublings + 1
    bracketed = drop(hi) > target
    if bracketed:
        for _ in range(60):
            if hi - lo <= tol * hi:
                break
            if lo == 0.0 and hi < 1e-6 * sigma_hi:
                break  # the floor noise eps alone already drops accuracy too much
            mid = 0.5 * (lo + hi)
            if drop(mid) > target:
                hi = mid
            else:
                lo = mid
    # Not bracketed: no sigma up to hi drops the accuracy by the target, so the
    # answer is "larger than hi"; report inf (hi is in details), not hi itself.
    sigma = lo if bracketed else math.inf
    acc, acc_err = accuracy(lo if bracketed else hi)
    details = {
        "base_accuracy": base,
        "accuracy": acc,
        "accuracy_stderr": acc_err,
        "accuracy_drop": base - acc,
        "bracket": [lo, hi],
        "bracketed": bracketed,
        "flatness": 1.0 / sigma**2 if sigma > 0 else math.inf,
        "sigma_tested_up_to": hi,
        "history": [[s, base - a] for s, (a, _) in sorted(history.items())],
    }
    return _Outcome(sigma, None, details)


# ---------------------------------------------------------------- definition
def _definition(kind: str, p: dict[str, Any]) -> str:
    r = p["radius"]
    if p["adaptive"]:
        what = "|theta_i|" if p["normalization"] == "elementwise" else "filter RMS"
        t = f"T = diag({what}) + {p['eta']:g} (adaptive)"
    else:
        t = "T = I"
    norm = {"l2": "||z||_2", "linf": "||z||_inf"}.get(p["norm"] or "", "")
    if kind == "worst":
        return (
            f"max_{{{norm} <= {r:g}}} L(theta + T z) - L(theta), {t}; Auto-PGD "
            f"ascent, {p['steps']} steps x {p['restarts']} restarts: a lower bound "
            "of the maximum"
        )
    if kind == "average":
        return (
            f"E[L(theta + T z)] - L(theta), z ~ N(0, {r:g}^2 I), {t}; Monte Carlo "
            f"mean of {p['samples']} samples"
        )
    if kind == "sam":
        step = "rho T^2 g / ||T g||_2" if p["norm"] == "l2" else "rho T sign(T g)"
        return (
            f"L(theta + delta) - L(theta), delta = {step}, rho = {r:g}, "
            f"g = grad L(theta), {t} (first-order worst case, SAM)"
        )
    if kind == "keskar":
        return (
            f"100 (max_{{|delta_i| <= {r:g} (|theta_i| + 1)}} L(theta + delta) - "
            f"L(theta)) / (1 + L(theta)) (Keskar et al. 2017); Auto-PGD ascent, "
            f"{p['steps']} steps x {p['restarts']} restarts: a lower bound"
        )
    if kind == "logdet":
        return (
            f"log det(H + {r:g} I) = sum_i log(lambda_i + {r:g}), H the Hessian at "
            "theta; stochastic Lanczos quadrature"
        )
    return (
        f"largest sigma' with train accuracy drop E_u[A(theta) - A(theta + u)] <= "
        f"{p['target_drop']:g}, u_i ~ N(0, sigma'^2 theta_i^2 + "
        f"{p['magnitude_eps']:g}^2) (magnitude-aware PAC-Bayes, Jiang et al. 2020); "
        f"bisection to relative width {p['tol']:g}, {p['samples']} samples"
    )
