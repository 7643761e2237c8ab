"""Checks of the inputs of :func:`~lossgeom.theory.pac_bayes_bounds`.

Every bad input gets a ``TypeError`` or ``ValueError`` that says what was
expected, what came and how to fix it, before any work is done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lossgeom.objective import Objective

__all__ = ["Options", "check_options", "classification_objective", "prior_mean"]


@dataclass(frozen=True)
class Options:
    """The checked settings of one call."""

    delta: float
    mc_delta: float
    mc_samples: int
    selection_samples: int
    prior_sigmas: tuple[float, ...]
    hessian_rank: int | None
    curvature: str
    eps_grid: tuple[float, ...]
    scale_grid: tuple[float, ...]
    bits: tuple[int, ...]
    diagonal_matvecs: int
    seed: int
    chunk_size: int | None


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _grid(name: str, values: object, example: str) -> tuple[float, ...]:
    if isinstance(values, Tensor):
        values = values.tolist()
    if (
        isinstance(values, (str, bytes))
        or not isinstance(values, Sequence)
        or len(values) == 0
    ):
        raise ValueError(
            f"{name} must be a non-empty sequence of positive numbers, e.g. "
            f"{example}; got {values!r}."
        )
    bad = [v for v in values if not (_is_number(v) and math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(
            f"{name} must hold finite numbers > 0, e.g. {example}; got {list(values)!r} "
            f"(bad: {bad!r})."
        )
    if len(set(values)) != len(values):
        raise ValueError(
            f"{name} holds repeated values {list(values)!r}; each value costs a share "
            "of delta in the union bound, so list each once."
        )
    return tuple(float(v) for v in values)


def _integer(name: str, value: object, least: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}{hint}; got {value!r}.")
    return value


def _confidence(delta: object, mc_delta: object) -> tuple[float, float]:
    for name, value in (("delta", delta), ("mc_delta", mc_delta)):
        if not (_is_number(value) and 0 < value < 1):
            raise ValueError(
                f"{name} must be a probability in (0, 1) (the share of the failure "
                f"probability it is given, e.g. 0.025); got {value!r}."
            )
    if delta + mc_delta >= 1:
        raise ValueError(
            f"delta + mc_delta must be < 1: the bounds hold with probability "
            f"1 - delta - mc_delta; got {delta} + {mc_delta} = {delta + mc_delta}. "
            "Use small values such as delta=0.025, mc_delta=0.01."
        )
    return float(delta), float(mc_delta)


def check_options(**kw: object) -> Options:
    """Validate the settings of :func:`pac_bayes_bounds` (keyword names as there)."""
    delta, mc_delta = _confidence(kw["delta"], kw["mc_delta"])
    curvature = kw["curvature"]
    if curvature not in ("hessian", "ggn"):
        raise ValueError(
            f"curvature must be 'hessian' or 'ggn' (the operator whose top eigenpairs "
            f"and diagonal shape the posterior); got {curvature!r}."
        )
    bits = kw["bits"]
    if (
        isinstance(bits, (str, bytes))
        or not isinstance(bits, Sequence)
        or not bits
        or any(isinstance(b, bool) or not isinstance(b, int) for b in bits)
        or any(not 2 <= b <= 32 for b in bits)
        or len(set(bits)) != len(bits)
    ):
        raise ValueError(
            "bits must be a non-empty sequence of distinct integers in [2, 32] (the "
            f"quantizer's bits per parameter), e.g. (4, 8, 16); got {bits!r}."
        )
    chunk = kw["chunk_size"]
    if chunk is not None:
        _integer("chunk_size", chunk, 1, " or None")
    return Options(
        delta=delta,
        mc_delta=mc_delta,
        mc_samples=_integer("mc_samples", kw["mc_samples"], 1),
        selection_samples=_integer("selection_samples", kw["selection_samples"], 1),
        prior_sigmas=_grid("prior_sigmas", kw["prior_sigmas"], "(0.01, 0.03, 0.1)"),
        hessian_rank=None
        if kw["hessian_rank"] is None
        else _integer("hessian_rank", kw["hessian_rank"], 1, " or None"),
        curvature=str(curvature),
        eps_grid=_grid("eps_grid", kw["eps_grid"], "(1.0,)"),
        scale_grid=_grid("scale_grid", kw["scale_grid"], "(1.0, 10.0, 100.0)"),
        bits=tuple(int(b) for b in bits),
        diagonal_matvecs=_integer("diagonal_matvecs", kw["diagonal_matvecs"], 2),
        seed=_integer("seed", kw["seed"], 0),
        chunk_size=chunk,
    )


def classification_objective(
    model: object,
    loss_fn: object,
    data: object,
    what: str,
    batch_size: int | None,
) -> Objective:
    """An eval-mode :class:`Objective` on ``data``, refusing non-classification data."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a trained torch.nn.Module; got {type(model).__name__}."
        )
    if isinstance(data, (tuple, list)) and len(data) != 2:
        raise ValueError(
            f"{what} must be the pair (inputs, targets); got a {type(data).__name__} "
            f"of length {len(data)}."
        )
    obj = Objective(model, loss_fn, data, batch_size=batch_size, mode="eval")
    if not obj.knows_accuracy:
        raise ValueError(
            f"the bounds are on the 0-1 classification error, so {what} needs integer "
            "class labels of shape (n,) and a model with one output per class "
            "(n, C > 1); these targets or outputs are not (regression targets?). "
            "Pass labels as y.long() and a classifier."
        )
    return obj


def _differences(obj: Objective, init: nn.Module) -> list[str]:
    """What differs between the model's layout and ``init``'s (empty: none)."""
    named = dict(init.named_parameters())
    problems = []
    for name, piece in obj.unflatten(obj.theta).items():
        shape = piece.shape
        if name not in named:
            problems.append(f"init has no parameter {name!r}")
        elif named[name].shape != shape:
            problems.append(
                f"{name!r} has shape {tuple(named[name].shape)} in init, "
                f"{tuple(shape)} in the model"
            )
    return problems


def _fixed_parts_differ(model: nn.Module, init: nn.Module | None) -> list[str]:
    """Frozen parameters and floating buffers of ``model`` that ``init`` lacks."""
    fixed = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    fixed += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    if not fixed:
        return []
    if init is None:
        return [n for n, _ in fixed]
    theirs = {**dict(init.named_parameters()), **dict(init.named_buffers())}
    return [
        n
        for n, t in fixed
        if n not in theirs
        or theirs[n].shape != t.shape
        or not torch.equal(theirs[n].detach().to(t.device, t.dtype), t.detach())
    ]


def prior_mean(obj: Objective, model: nn.Module, init: object) -> Tensor:
    """The flat prior mean from ``init`` (a module of the same layout, or a vector)."""
    if isinstance(init, nn.Module):
        problems = _differences(obj, init)
        if problems:
            raise ValueError(
                "init must be the network at initialization, of the model's "
                "architecture (same parameter names and shapes); "
                + "; ".join(problems[:3])
                + ". Build it as the model was built, before training (e.g. "
                "lg.train.build_model(config))."
            )
        named = dict(init.named_parameters())
        theta0 = obj.flatten([named[n].detach() for n in obj.names])
    elif isinstance(init, Tensor):
        if init.ndim != 1 or init.shape[0] != obj.dim:
            raise ValueError(
                f"init as a tensor must be the flat parameter vector at "
                f"initialization, shape ({obj.dim},) like Objective(init_model, ...)."
                f"theta; got shape {tuple(init.shape)}."
            )
        theta0 = init.detach()
    else:
        raise TypeError(
            "init must be the network at initialization (an nn.Module of the "
            f"model's architecture) or its flat parameter vector; got "
            f"{type(init).__name__}."
        )
    theta0 = theta0.to(device=obj.device, dtype=torch.float64)
    if not bool(torch.isfinite(theta0).all()):
        raise ValueError("init holds non-finite parameters (NaN or inf).")
    differ = _fixed_parts_differ(model, init if isinstance(init, nn.Module) else None)
    if differ:
        raise ValueError(
            "the bounds treat everything but the trainable parameters as fixed before "
            "seeing the data, but the model's frozen parameters or floating buffers "
            f"{differ[:3]} are not the same in init (BatchNorm running statistics are "
            "learned from the data). Pass init as a module whose frozen parameters and "
            "buffers equal the model's, or use a model without such buffers (e.g. "
            "LayerNorm instead of BatchNorm)."
        )
    return theta0
