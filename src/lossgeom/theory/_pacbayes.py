r"""Generalization bounds for a trained classifier: Occam and PAC-Bayes.

:func:`pac_bayes_bounds` computes three upper bounds on the 0-1 error of one
trained network, all holding *together* with probability at least
:math:`1 - \delta_\text{total}`, :math:`\delta_\text{total} = \delta + \delta_{mc}`:

(a) ``parameter_count``: the network quantized to ``b`` bits per parameter is one
    of :math:`2^L` networks, :math:`L = bD + 32T` (``D`` parameters, ``T``
    tensors, one float32 scale each); the Occam bound
    :math:`\mathrm{kl}^{-1}(\hat e_S(h_b), (L\ln 2 + \ln(J/\delta))/n)`
    (Langford 2005), the best ``b`` of the grid.
(b) ``isotropic``: PAC-Bayes-kl (Seeger 2002; Maurer 2004) with posterior
    :math:`\mathcal N(\theta, \sigma^2 I)` and prior
    :math:`\mathcal N(\theta_0, \sigma^2 I)`, :math:`\theta_0` the network at
    initialization, :math:`\sigma` from the prior grid.
(c) ``hessian``: the same priors, posterior
    :math:`\mathcal N(\theta, c\,(H_+ + D_+ + \epsilon I)^{-1})`, :math:`H_+`
    the positive part of the top Lanczos pairs of the Hessian (or Gauss-Newton)
    and :math:`D_+` the clipped diagonal of the rest.

For (b) and (c) the posterior's empirical error is known through Monte Carlo
draws, bounded by Langford & Caruana (2002), so the bound is
:math:`\mathrm{kl}^{-1}(\mathrm{kl}^{-1}(\hat e_{mc}, \ln(2/\delta')/m),
(\mathrm{KL} + \ln(2\sqrt n\,J/\delta))/n)` (Dziugaite & Roy 2017).

**How delta is split.** One union bound runs over every prior used: the
``|bits|`` code-length priors of (a) and the ``K`` Gaussian priors of (b) and (c),
:math:`J = |\text{bits}| + K`, each with :math:`\delta/J`. (b) and (c) share the
Gaussian priors' events: PAC-Bayes holds for all posteriors at once. The two
Monte Carlo terms get :math:`\delta_{mc}/2` each. ``details["delta_budget"]``
lists every term; they add up to ``delta_total``.

**What is chosen, and with which draws.** The posterior parameters
(:math:`\sigma`; :math:`\sigma`, ``c``, :math:`\epsilon`) may depend on the
sample in any way, since the PAC-Bayes bound holds for every posterior at once.
They are chosen on a grid by the bound computed from ``selection_samples``
draws per candidate, and the reported Monte Carlo term then uses ``mc_samples``
*fresh* draws of the chosen posterior (a separate random stream), so the
Langford-Caruana term is about draws independent of the choice and stays valid.

**Why the curvature posterior's KL is exact.** The posterior is *defined* by the
computed pieces (Ritz pairs, estimated diagonal), whatever their errors; its KL
to the prior is then computed exactly (Woodbury and the determinant lemma,
:mod:`~lossgeom.theory._gaussian`) and its draws are exact. Errors of the
Hessian estimates make the posterior better or worse suited to the network,
never the bound invalid.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lossgeom._results import Cost, timed
from lossgeom.objective import Objective
from lossgeom.theory._curvature_posterior import (
    CurvaturePieces,
    curvature_candidates,
    curvature_pieces,
)
from lossgeom.theory._errors import Errors, Sampler, parameter_count_bound
from lossgeom.theory._gaussian import gaussian_kl
from lossgeom.theory._kl import kl_inverse, langford_caruana_bound, pac_bayes_kl_bound
from lossgeom.theory._pacbayes_inputs import (
    Options,
    check_options,
    classification_objective,
    prior_mean,
)
from lossgeom.theory._pacbayes_results import (
    DEFINITION,
    GaussianPosteriorBound,
    PacBayesResult,
)

__all__ = ["DEFAULT_PRIOR_SIGMAS", "pac_bayes_bounds"]

#: 25 values, geometric from 1e-3 to 1 (eight per decade).
DEFAULT_PRIOR_SIGMAS = tuple(float(f"{10 ** (i / 8):.3g}") for i in range(-24, 1))


# ----------------------------------------------------- (b), (c) Gaussian posteriors
@dataclass(frozen=True)
class _Candidate:
    prior_sigma: float
    kl: float
    sample: Sampler
    posterior: dict[str, float]


def _select(
    errors: Errors,
    candidates: Sequence[_Candidate],
    opts: Options,
    n: int,
    delta_each: float,
    gen: torch.Generator,
) -> tuple[int, list[dict[str, Any]]]:
    """The candidate with the smallest plug-in bound from selection draws.

    Candidates go in order of rising KL; one whose bound at zero error cannot
    beat the best so far is skipped (its ``selection_error`` is ``nan``).
    """
    rows: list[dict[str, Any]] = [{} for _ in candidates]
    best, best_bound = 0, math.inf
    for i in sorted(range(len(candidates)), key=lambda j: candidates[j].kl):
        c = candidates[i]
        row = {"prior_sigma": c.prior_sigma, **c.posterior, "kl": c.kl}
        if pac_bayes_kl_bound(0.0, c.kl, n, delta_each) >= best_bound:
            rows[i] = {**row, "selection_error": math.nan, "selection_bound": math.nan}
            continue
        e, _ = errors.posterior(c.sample, opts.selection_samples, gen, test=False)
        bound = pac_bayes_kl_bound(e, c.kl, n, delta_each)
        rows[i] = {**row, "selection_error": e, "selection_bound": bound}
        if bound < best_bound:
            best, best_bound = i, bound
    return best, rows


def _gaussian_bound(
    errors: Errors,
    candidates: Sequence[_Candidate],
    opts: Options,
    n: int,
    deltas: tuple[float, float],
    gens: tuple[torch.Generator, torch.Generator],
) -> GaussianPosteriorBound:
    """Select on ``gens[0]``'s draws; bound the chosen posterior with ``gens[1]``'s."""
    delta_each, mc_each = deltas
    best, rows = _select(errors, candidates, opts, n, delta_each, gens[0])
    c = candidates[best]
    e, t = errors.posterior(c.sample, opts.mc_samples, gens[1], test=True)
    upper = langford_caruana_bound(e, opts.mc_samples, mc_each)
    complexity = (c.kl + math.log(2 * math.sqrt(n) / delta_each)) / n
    return GaussianPosteriorBound(
        bound=kl_inverse(upper, complexity),
        kl=c.kl,
        prior_sigma=c.prior_sigma,
        posterior=dict(c.posterior),
        mc_error=e,
        mc_error_bound=upper,
        mc_samples=opts.mc_samples,
        mc_test_error=t,
        complexity=complexity,
        delta_prior=delta_each,
        delta_mc=mc_each,
        candidates=rows,
    )


def _isotropic_candidates(
    theta: Tensor, theta0: Tensor, opts: Options
) -> list[_Candidate]:
    d = theta.shape[0]
    out = []
    for s in opts.prior_sigmas:

        def sample(k: int, gen: torch.Generator, s: float = s) -> Tensor:
            dev = theta.device
            return s * torch.randn(k, d, generator=gen, device=dev, dtype=torch.float64)

        kl = gaussian_kl(theta, theta0, s, sigma_q=s)
        out.append(_Candidate(s, kl, sample, {"sigma": s}))
    return out


def _curvature_as_candidates(
    pieces: CurvaturePieces, theta: Tensor, theta0: Tensor, opts: Options
) -> list[_Candidate]:
    out = []
    for sigma, cov, posterior in curvature_candidates(pieces, opts):

        def sample(k: int, gen: torch.Generator, cov=cov) -> Tensor:
            return cov.sample(k, generator=gen)

        kl = gaussian_kl(theta, theta0, sigma, cov_q=cov)
        out.append(_Candidate(sigma, kl, sample, posterior))
    return out


# -------------------------------------------------------------------- the bounds
def _delta_budget(opts: Options) -> tuple[float, float, list[dict[str, Any]]]:
    """Each prior's and each Monte Carlo term's delta, and the table of all terms."""
    n_bits, n_sigmas = len(opts.bits), len(opts.prior_sigmas)
    each = opts.delta / (n_bits + n_sigmas)
    mc_each = opts.mc_delta / 2
    budget = [
        {"term": "parameter_count: Occam, one per bits value", "count": n_bits},
        {"term": "PAC-Bayes-kl, one per prior sigma", "count": n_sigmas},
    ]
    for row in budget:
        row.update(delta_each=each, delta=each * row["count"])
    for name in ("isotropic", "hessian"):
        budget.append(
            {
                "term": f"{name}: Langford-Caruana Monte Carlo",
                "count": 1,
                "delta_each": mc_each,
                "delta": mc_each,
            }
        )
    return each, mc_each, budget


def pac_bayes_bounds(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    init: nn.Module | Tensor,
    train_data: object,
    test_data: object | None = None,
    *,
    delta: float = 0.025,
    mc_delta: float = 0.01,
    mc_samples: int = 2000,
    selection_samples: int = 16,
    prior_sigmas: Sequence[float] = DEFAULT_PRIOR_SIGMAS,
    hessian_rank: int | None = None,
    curvature: str = "hessian",
    eps_grid: Sequence[float] = (1.0, 2.0),
    scale_grid: Sequence[float] = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0),
    bits: Sequence[int] = (4, 8, 16),
    diagonal_matvecs: int = 100,
    seed: int = 0,
    chunk_size: int | None = 64,
    batch_size: int | None = None,
) -> PacBayesResult:
    r"""Occam and PAC-Bayes bounds on the 0-1 error of a trained classifier.

    See the module docstring for the three bounds, how ``delta`` is split and why
    they are valid; ``docs/theory.md`` for a measured example. The model is
    never changed: everything runs on its flat parameter vector through an
    eval-mode :class:`~lossgeom.Objective` (dropout off, BatchNorm refused: its
    running statistics are learned from the data).

    The curvature posterior is :math:`\mathcal N(\theta, \Sigma)` with
    :math:`\Sigma^{-1} = (e I + s\,(H_+ + D_+)/\lambda_\text{ref})/\sigma^2`, i.e.
    ``c = sigma^2 lambda_ref / s`` and ``eps = e lambda_ref / s``, for ``sigma``
    in ``prior_sigmas``, ``s`` in ``scale_grid`` and ``e`` in ``eps_grid``
    (:math:`\lambda_\text{ref}` the largest of :math:`\lambda_+` and
    :math:`D_+`): ``s = 0`` would be the isotropic posterior, larger ``s``
    confines the sharp directions. :math:`H_+ = V\operatorname{diag}(\lambda_+)V^T`
    from ``hessian_rank`` Lanczos pairs of ``curvature`` (Hessian or Gauss-Newton)
    on the training data; :math:`D_+` from ``diagonal_matvecs`` Hutchinson
    products with the deflated operator, clipped at 0.

    Cost with the defaults, for an MLP of 2,410 parameters on the 1,438 digits
    training samples: about 5,300 forward passes over the data (``2 x 2000``
    final draws, about 1,000 selection draws: 16 for each candidate not
    skipped) and about 200 curvature products; 6 s on one CPU thread. The
    final draws dominate: the time grows with ``mc_samples``.

    Args:
        model: the trained classifier (outputs ``(n, C)``, ``C > 1``).
        loss_fn: its training loss, e.g. ``nn.CrossEntropyLoss()`` (used for the
            curvature only; the bounds are on the 0-1 error).
        init: the network at initialization (same architecture), or its flat
            parameter vector: the prior mean, fixed before seeing the data.
        train_data: the training sample ``(X, y)`` the bounds are about (all of
            it: ``n`` is its size), ``y`` integer class labels.
        test_data: optional ``(X, y)``; only reported beside the bounds.
        delta: failure probability over the sample, shared by all priors.
        mc_delta: failure probability of the two Monte Carlo terms together.
        mc_samples: fresh posterior draws for each Langford-Caruana term.
        selection_samples: draws per candidate when choosing the posteriors.
        prior_sigmas: the prior grid (standard deviations).
        hessian_rank: Lanczos pairs ``k`` of the curvature (default
            ``min(20, d)``).
        curvature: ``"hessian"`` or ``"ggn"``.
        eps_grid: the factors ``e`` on the prior precision (flat directions get
            variance ``sigma^2 / e``).
        scale_grid: the curvature weights ``s``.
        bits: bits per parameter of the quantizations, each in [2, 32].
        diagonal_matvecs: products for the diagonal estimate.
        seed: seeds Lanczos, the diagonal and the two streams of draws.
        chunk_size: parameter points per batched evaluation
            (:meth:`~lossgeom.Objective.evaluate_metrics`).
        batch_size: samples per forward pass (default: all at once).

    Returns:
        A :class:`PacBayesResult`.

    Raises:
        TypeError: ``model`` is not a module, ``init`` neither a module nor a tensor.
        ValueError: a probability outside (0, 1), ``delta + mc_delta >= 1``, an
            empty or non-positive grid, ``init`` of another architecture,
            regression targets, fewer than 8 samples, ...

    Example:
        >>> import copy, torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> X = torch.randn(200, 5); y = (X[:, 0] > 0).long()
        >>> init = torch.nn.Linear(5, 2); model = copy.deepcopy(init)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.5)
        >>> for _ in range(100):
        ...     opt.zero_grad(); torch.nn.functional.cross_entropy(model(X), y).backward(); opt.step()
        >>> res = pac_bayes_bounds(model, torch.nn.CrossEntropyLoss(), init, (X, y),
        ...                        mc_samples=200, hessian_rank=2)
        >>> res.isotropic.bound >= res.isotropic.mc_error, 0 < res.hessian.bound < 1
        (True, True)
    """
    opts = check_options(
        delta=delta,
        mc_delta=mc_delta,
        mc_samples=mc_samples,
        selection_samples=selection_samples,
        prior_sigmas=prior_sigmas,
        hessian_rank=hessian_rank,
        curvature=curvature,
        eps_grid=eps_grid,
        scale_grid=scale_grid,
        bits=bits,
        diagonal_matvecs=diagonal_matvecs,
        seed=seed,
        chunk_size=chunk_size,
    )
    obj = classification_objective(model, loss_fn, train_data, "train_data", batch_size)
    test = None
    if test_data is not None:
        test = classification_objective(
            model, loss_fn, test_data, "test_data", batch_size
        )
    _check_sizes(obj, opts)
    if opts.hessian_rank is None:
        opts = dataclasses.replace(opts, hessian_rank=min(20, obj.dim))
    theta0 = prior_mean(obj, model, init)
    with timed(obj) as meter:
        out = _compute(obj, test, theta0, opts)
    return _result(obj, test, opts, out, meter.cost)


def _check_sizes(obj: Objective, opts: Options) -> None:
    if obj.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"the model's dtype is {obj.dtype}; errors are counted in float32 or "
            "float64. Pass model.float() (and inputs to match)."
        )
    if obj.n_samples < 8:
        raise ValueError(
            f"the PAC-Bayes-kl bound needs n >= 8 training samples; got "
            f"{obj.n_samples}."
        )
    if opts.hessian_rank is not None and opts.hessian_rank > obj.dim:
        raise ValueError(
            f"hessian_rank must be at most the number of parameters d = {obj.dim}; "
            f"got {opts.hessian_rank}."
        )


def _compute(
    obj: Objective, test: Objective | None, theta0: Tensor, opts: Options
) -> dict[str, Any]:
    n = obj.n_samples
    each, mc_each, budget = _delta_budget(opts)
    errors = Errors(obj, test, opts.chunk_size)
    theta = errors.center
    gens = tuple(
        torch.Generator(device=obj.device).manual_seed(opts.seed + i) for i in (0, 1)
    )
    seconds = {}
    start = time.perf_counter()
    train, test_err = errors.at(obj.theta[None])
    occam = parameter_count_bound(errors, opts, n, each)
    seconds["parameter_count"] = time.perf_counter() - start
    start = time.perf_counter()
    iso = _isotropic_candidates(theta, theta0, opts)
    isotropic = _gaussian_bound(errors, iso, opts, n, (each, mc_each), gens)
    seconds["isotropic"] = time.perf_counter() - start
    start = time.perf_counter()
    pieces = curvature_pieces(obj, opts)
    seconds["curvature"] = time.perf_counter() - start
    start = time.perf_counter()
    cands = _curvature_as_candidates(pieces, theta, theta0, opts)
    hess = _gaussian_bound(errors, cands, opts, n, (each, mc_each), gens)
    seconds["hessian"] = time.perf_counter() - start
    return {
        "occam": occam,
        "isotropic": isotropic,
        "hessian": hess,
        "pieces": pieces,
        "train_error": float(train[0]),
        "test_error": math.nan if test_err is None else float(test_err[0]),
        "budget": budget,
        "seconds": seconds,
        "distance": float((theta - theta0).norm()),
    }


def _result(
    obj: Objective, test: Objective | None, opts: Options, out: dict, cost: Cost
) -> PacBayesResult:
    pieces: CurvaturePieces = out["pieces"]
    params = {k: getattr(opts, k) for k in opts.__dataclass_fields__}
    params["objective"] = obj.info()
    if test is not None:
        params["test_objective"] = test.info()
        cost = cost.add(
            data_passes=test.counters.passes, test_passes=test.counters.passes
        )
    return PacBayesResult(
        parameter_count=out["occam"],
        isotropic=out["isotropic"],
        hessian=out["hessian"],
        train_error=out["train_error"],
        test_error=out["test_error"],
        delta_total=opts.delta + opts.mc_delta,
        n=obj.n_samples,
        d=obj.dim,
        curvature_values=pieces.values,
        curvature_residuals=pieces.residuals,
        curvature_converged=pieces.converged,
        curvature_vectors=pieces.vectors,
        curvature_diagonal=pieces.diagonal,
        definition=DEFINITION,
        parameters=params,
        details={
            "delta_budget": out["budget"],
            "distance_to_init": out["distance"],
            "curvature": pieces.details,
            "seconds": out["seconds"],
        },
        cost=cost,
    )
