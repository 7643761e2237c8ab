"""What every measure's result shares: its definition, parameters and cost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

from torch import Tensor

from lossgeom.objective import Objective

__all__ = ["Cost", "as_plain", "measure_cost"]


def as_plain(value: Any) -> Any:
    """Tensors to lists and numbers, recursively, for JSON."""
    if isinstance(value, Tensor):
        return value.item() if value.ndim == 0 else value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    return value


def dataclass_to_dict(result: Any, *, skip: tuple[str, ...] = ()) -> dict:
    """A frozen result dataclass as plain JSON values, without the ``skip`` fields."""
    return {
        f.name: as_plain(getattr(result, f.name))
        for f in fields(result)
        if f.name not in skip
    }


class Cost(dict):
    """Work done: the objective's counters spent, and seconds (a plain dict)."""


@contextmanager
def measure_cost(obj: Objective | None) -> Iterator[Cost]:
    """Record the objective counters and wall time spent inside the block.

    Example:
        >>> with measure_cost(None) as cost:
        ...     pass
        >>> sorted(cost)
        ['seconds']
    """
    cost = Cost()
    before = obj.counters.to_dict() if obj is not None else {}
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost["seconds"] = time.perf_counter() - start
        if obj is not None:
            after = obj.counters.to_dict()
            cost.update({k: after[k] - before.get(k, 0) for k in after})
