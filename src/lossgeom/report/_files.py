"""Files next to the figures: strict JSON written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from lossgeom._io import atomic_write_json
from lossgeom._results import jsonable

__all__ = ["write_json"]


def write_json(path: str | os.PathLike, data: object) -> Path:
    """Write ``data`` as indented strict JSON at ``path``, atomically.

    Tensors become lists, results dicts, and non-finite floats the strings
    ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (the package's one JSON rule).
    Readers see the old file or the new one, never half of one.

    Args:
        path: the file to write (its folder is created).
        data: numbers, strings, tensors, lists, dicts or lossgeom results.

    Returns:
        ``path``.
    """
    return atomic_write_json(path, jsonable(data))
