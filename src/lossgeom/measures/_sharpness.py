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

The kinds live in :mod:`lossgeom.measures._sharpness_worst` (worst, keskar, sam)
and :mod:`lossgeom.measures._sharpness_gaussian` (average, pac_bayes), on the
shared :mod:`lossgeom.measures._sharpness_base`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import Tensor

from lossgeom._results import Result, timed
from lossgeom.curvature import hessian, logdet
from lossgeom.measures._sharpness_base import _Outcome, _scale
from lossgeom.measures._sharpness_gaussian import _average, _pac_bayes
from lossgeom.measures._sharpness_worst import _sam, _worst
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


@dataclass(frozen=True)
class SharpnessResult(Result):
    """A sharpness measurement: its number, what it means, and what it cost.

    Attributes:
        value: the sharpness (for ``"pac_bayes"``: the sigma found).
        stderr: Monte Carlo (or probe) standard error of ``value``; ``nan`` where
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
    stderr: float
    kind: str
    perturbation: Tensor | None = field(default=None, repr=False, compare=False)
    bulky: ClassVar[tuple[str, ...]] = ("perturbation",)


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
    norm, normalization, samples = _check_arguments(
        obj,
        radius,
        kind,
        norm,
        adaptive,
        normalization,
        eta,
        steps,
        restarts,
        samples,
        lanczos_steps,
        target_drop,
        magnitude_eps,
        tol,
    )
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

    with timed(obj) as meter:
        out = _measure(
            obj,
            theta,
            kind,
            radius,
            parameters,
            norm=norm,
            normalization=normalization,
            eta=eta,
            steps=steps,
            restarts=restarts,
            samples=samples,
            lanczos_steps=lanczos_steps,
            target_drop=target_drop,
            magnitude_eps=magnitude_eps,
            tol=tol,
            chunk_size=chunk_size,
            seed=seed,
        )
    value = out.value
    if kind == "keskar":
        base = out.details["base_loss"]
        out.details["loss_increase"] = value
        value = 100.0 * value / (1.0 + base)
    return SharpnessResult(
        value=float(value),
        stderr=math.nan if out.stderr is None else float(out.stderr),
        kind=kind,
        definition=_definition(kind, parameters),
        parameters=parameters,
        cost=meter.cost,
        details=out.details,
        perturbation=None if out.delta is None else out.delta.detach().cpu(),
    )


def _measure(
    obj: Objective,
    theta: Tensor,
    kind: str,
    radius: float,
    parameters: dict[str, Any],
    *,
    norm: str | None,
    normalization: str | None,
    eta: float,
    steps: int,
    restarts: int,
    samples: int,
    lanczos_steps: int,
    target_drop: float,
    magnitude_eps: float,
    tol: float,
    chunk_size: int | None,
    seed: int,
) -> _Outcome:
    """Measure ``kind``; the settings it used are added to ``parameters``."""
    if kind in ("worst", "keskar"):
        if kind == "keskar":
            scale = theta.abs() + 1.0
        else:
            scale = _scale(obj, theta, normalization, eta)
        parameters.update(steps=steps, restarts=restarts)
        return _worst(obj, theta, scale, radius, norm, steps, restarts, seed)
    if kind == "average":
        parameters.update(samples=samples, chunk_size=chunk_size)
        scale = _scale(obj, theta, normalization, eta)
        return _average(obj, theta, scale, radius, samples, chunk_size, seed)
    if kind == "sam":
        return _sam(obj, theta, _scale(obj, theta, normalization, eta), radius, norm)
    if kind == "logdet":
        parameters.update(samples=samples, lanczos_steps=lanczos_steps)
        est = logdet(
            hessian(obj, theta),
            shift=radius,
            n_probes=samples,
            lanczos_steps=lanczos_steps,
            seed=seed,
        )
        return _Outcome(
            est.value,
            est.stderr,
            dict(est.details, n_matvecs=est.cost.matvecs),
        )
    parameters.update(
        samples=samples,
        target_drop=target_drop,
        magnitude_eps=magnitude_eps,
        tol=tol,
        chunk_size=chunk_size,
    )
    return _pac_bayes(
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


# ---------------------------------------------------------------- validation
def _check_arguments(
    obj: object,
    radius: object,
    kind: object,
    norm: str | None,
    adaptive: object,
    normalization: str | None,
    eta: object,
    steps: object,
    restarts: object,
    samples: int | None,
    lanczos_steps: object,
    target_drop: object,
    magnitude_eps: object,
    tol: object,
) -> tuple[str | None, str | None, int]:
    """Refuse bad arguments of :func:`sharpness`.

    Returns:
        The resolved ``(norm, normalization, samples)``.
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
    return norm, normalization, samples


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
