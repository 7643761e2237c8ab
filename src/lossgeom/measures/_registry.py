"""Measures by name, for training callbacks and studies.

Each entry is ``fn(objective, *, seed, **options) -> result`` where the result has a
scalar ``value`` (and, when stochastic, ``stderr``). A training config lists them
under ``metrics.measures`` as ``{name, options, every}``; each measurement writes
``<name>``, ``<name>_stderr`` (when there is one) and ``<name>_seconds`` into the
metrics row.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import Any

from lossgeom.curvature import condition_number, effective_rank, logdet
from lossgeom.objective import Objective

__all__ = ["CALLBACKS", "check_options", "default_key", "register", "run_measure"]

CALLBACKS: dict[str, Callable[..., Any]] = {}


def register(name: str, fn: Callable[..., Any]) -> None:
    """Make ``fn(objective, **options)`` available as measure ``name``."""
    CALLBACKS[name] = fn


def _scalar(x: Any) -> float | None:
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def default_key(name: str, options: dict[str, Any]) -> str:
    """The column a measure writes: its name, plus ``_<kind>`` if it has kinds.

    ``sharpness`` with ``kind="average"`` writes ``sharpness_average``; without a
    kind option it writes ``sharpness_worst`` (its default kind).
    """
    if name not in CALLBACKS:
        return name
    params = inspect.signature(CALLBACKS[name]).parameters
    if "kind" not in params:
        return name
    kind = options.get("kind", params["kind"].default)
    return name if kind is inspect.Parameter.empty else f"{name}_{kind}"


def run_measure(
    name: str,
    objective: Objective,
    options: dict[str, Any],
    seed: int,
    key: str | None = None,
) -> dict[str, float | None]:
    """Run measure ``name``; its row entries (value, stderr, seconds) under ``key``."""
    if name not in CALLBACKS:
        raise ValueError(f"unknown measure {name!r}; known: {sorted(CALLBACKS)}.")
    fn = CALLBACKS[name]
    kwargs = dict(options)
    if "seed" in inspect.signature(fn).parameters and "seed" not in kwargs:
        kwargs["seed"] = seed
    key = key or default_key(name, options)
    start = time.perf_counter()
    result = fn(objective, **kwargs)
    row: dict[str, float | None] = {key: _scalar(getattr(result, "value", None))}
    stderr = _scalar(getattr(result, "stderr", None))
    if stderr is not None and not math.isnan(stderr):
        row[f"{key}_stderr"] = stderr
    bound = _scalar(getattr(result, "error", None))  # a bound, not a stderr
    if bound is not None:
        row[f"{key}_error"] = bound
    row[f"{key}_seconds"] = time.perf_counter() - start
    return row


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` if ``name`` is unknown or ``options`` do not fit it."""
    if name not in CALLBACKS:
        raise ValueError(f"unknown measure {name!r}; known: {sorted(CALLBACKS)}.")
    signature = inspect.signature(CALLBACKS[name])
    params = signature.parameters
    allowed = list(params)[1:]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params) - {"seed"})
        if unknown:
            raise ValueError(
                f"measure {name!r} has no options {unknown}; it takes {allowed}."
            )
    try:
        signature.bind(None, **options)
    except TypeError as err:
        raise ValueError(
            f"measure {name!r} cannot be called with options {options}: {err}. "
            f"It takes {allowed}."
        ) from err


register("effective_rank", effective_rank)
register("logdet", logdet)
register("condition_number", condition_number)
