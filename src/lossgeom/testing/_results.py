"""Exact comparison of results, for round-trip tests of saving and loading."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["assert_results_equal"]


def assert_results_equal(a: Any, b: Any, where: str = "result") -> None:
    """Raise ``AssertionError`` unless ``a`` and ``b`` are the same, exactly.

    Tensors must agree in dtype, shape and every bit (NaN equal to NaN); floats
    exactly (NaN equal to NaN); dataclasses (results) field by field and of the
    same class; tuples stay tuples and lists lists; modules by their state dicts.
    The message names the first field that differs.

    Example:
        >>> from lossgeom.linalg import TraceResult
        >>> r = TraceResult(1.0, float("nan"), "hutchinson", 3)
        >>> assert_results_equal(r, TraceResult(1.0, float("nan"), "hutchinson", 3))
    """
    if type(a) is not type(b):
        raise AssertionError(f"{where}: {type(a).__name__} is not {type(b).__name__}")
    if isinstance(a, Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            raise AssertionError(
                f"{where}: tensor {a.dtype} {tuple(a.shape)} vs {b.dtype} "
                f"{tuple(b.shape)}"
            )
        a_, b_ = a.detach().cpu(), b.detach().cpu()
        same = torch.equal(a_, b_)
        if not same and a_.is_floating_point():
            same = bool(((a_ == b_) | (a_.isnan() & b_.isnan())).all())
        if not same:
            raise AssertionError(f"{where}: tensors differ")
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_results_equal(
                getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}"
            )
    elif isinstance(a, torch.nn.Module):
        assert_results_equal(a.state_dict(), b.state_dict(), f"{where}.state_dict()")
    elif isinstance(a, dict):
        if list(a) != list(b):
            raise AssertionError(f"{where}: keys {list(a)} vs {list(b)}")
        for k in a:
            assert_results_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise AssertionError(f"{where}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_results_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        if not (a == b or (math.isnan(a) and math.isnan(b))):
            raise AssertionError(f"{where}: {a!r} vs {b!r}")
    elif isinstance(a, (int, str, bool, type(None), Path, torch.dtype)):
        if a != b:
            raise AssertionError(f"{where}: {a!r} vs {b!r}")
    else:
        raise AssertionError(f"{where}: cannot compare a {type(a).__name__}")
