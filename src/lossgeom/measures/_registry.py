"""Measures by name, for training callbacks and studies.

Each entry is ``fn(obj, *, seed, **options) -> Result``. A training config lists
them under ``metrics.measures`` as ``{name, options, every}``; each measurement
writes the result's :meth:`~lossgeom.Result.scalars` into the metrics row under
its key: ``<key>`` for ``value``, ``<key>_stderr`` and ``<key>_bound`` for the
error bars, ``<key>_<name>`` for other headline numbers, and ``<key>_seconds``.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import Any

from lossgeom._results import Result
from lossgeom.curvature import condition_number, effective_rank, logdet
from lossgeom.objective import Objective

__all__ = [
    "CALLBACKS",
    "check_options",
    "default_key",
    "register",
    "row_entries",
    "run_measure",
]

CALLBACKS: dict[str, Callable[..., Any]] = {}


def register(name: str, fn: Callable[..., Any]) -> None:
    """Make ``fn(objective, **options)`` available as measure ``name``."""
    CALLBACKS[name] = fn


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
    obj: Objective,
    options: dict[str, Any],
    seed: int,
    key: str | None = None,
) -> dict[str, float]:
    """Run measure ``name``; its row entries (headline numbers, seconds) under ``key``."""
    if name not in CALLBACKS:
        raise ValueError(f"unknown measure {name!r}; known: {sorted(CALLBACKS)}.")
    fn = CALLBACKS[name]
    kwargs = dict(options)
    if "seed" in inspect.signature(fn).parameters and "seed" not in kwargs:
        kwargs["seed"] = seed
    key = key or default_key(name, options)
    start = time.perf_counter()
    result = fn(obj, **kwargs)
    if not isinstance(result, Result):
        raise TypeError(
            f"measure {name!r} returned a {type(result).__name__}; a measure must "
            "return a lossgeom Result (see lossgeom.Result)."
        )
    return row_entries(result, key, seconds=time.perf_counter() - start)


def row_entries(
    result: Result, key: str, seconds: float | None = None
) -> dict[str, float]:
    """A result's headline numbers as metrics-row columns under ``key``.

    ``value`` goes to ``key``, every other name ``n`` to ``key_n``; a ``nan``
    standard error or bound (no error bar) is left out.

    Example:
        >>> from lossgeom.linalg import TraceResult
        >>> row_entries(TraceResult(2.0, 0.1, "hutchinson", 4), "trace")
        {'trace': 2.0, 'trace_stderr': 0.1}
    """
    row: dict[str, float] = {}
    for name, x in result.scalars().items():
        if name in ("stderr", "bound") and math.isnan(x):
            continue
        row[key if name == "value" else f"{key}_{name}"] = x
    if seconds is not None:
        row[f"{key}_seconds"] = seconds
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
