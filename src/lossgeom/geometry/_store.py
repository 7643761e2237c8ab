"""Save geometry results to a folder and load them back: safetensors + JSON.

A result is a dataclass registered with :func:`saveable`. Its tensor fields (and
tensors inside dict fields, one level deep) go to ``arrays.safetensors``; every
other field goes to ``result.json`` with the class name, so :func:`load_result`
rebuilds the same object. Both files are written atomically (temp file + rename),
the JSON last, so a folder with a ``result.json`` is always complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lossgeom._io import atomic_path, atomic_write_json

__all__ = ["load_result", "save_result", "saveable"]

_REGISTRY: dict[str, type] = {}
_FORMAT = 1
T = TypeVar("T")


def saveable(cls: type[T]) -> type[T]:
    """Register a result dataclass so that :func:`load_result` can rebuild it."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass to be saveable.")
    _REGISTRY[cls.__name__] = cls
    return cls


def save_result(result: Any, path: str | os.PathLike) -> Path:
    """Write ``result`` to the folder ``path`` (created); returns the folder.

    Raises:
        TypeError: ``result`` is not a registered result, or a field holds
            something that is neither a tensor nor JSON-serialisable.
    """
    cls = type(result)
    if _REGISTRY.get(cls.__name__) is not cls:
        raise TypeError(
            f"expected a lossgeom geometry result (e.g. from lg.slice_2d or "
            f"lg.interpolate); got {cls.__name__}."
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Tensor] = {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, Tensor):
            arrays[f.name] = value.detach().cpu().contiguous()
            fields[f.name] = {"__tensor__": f.name}
        elif isinstance(value, dict) and any(
            isinstance(v, Tensor) for v in value.values()
        ):
            keys = {}
            for k, v in value.items():
                if isinstance(v, Tensor):
                    arrays[f"{f.name}/{k}"] = v.detach().cpu().contiguous()
                    keys[k] = {"__tensor__": f"{f.name}/{k}"}
                else:
                    keys[k] = v
            fields[f.name] = {"__dict__": keys}
        else:
            fields[f.name] = value
    meta = {"format": _FORMAT, "type": cls.__name__, "fields": fields}
    try:
        text = json.dumps(meta, indent=2)
    except TypeError as err:
        raise TypeError(
            f"cannot save {cls.__name__}: a field is neither a tensor nor JSON ({err})."
        ) from err
    with atomic_path(folder / "arrays.safetensors", suffix=".safetensors") as tmp:
        save_file(arrays, str(tmp))
    atomic_write_json(folder / "result.json", json.loads(text))
    return folder


def load_result(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Any:
    """Rebuild a result saved by :func:`save_result` (tensors on ``device``)."""
    folder = Path(path)
    meta_file = folder / "result.json"
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{folder} holds no saved result (no result.json); expected a folder "
            "written by result.save(path) or lg.save_result."
        )
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    cls = _REGISTRY.get(meta.get("type", ""))
    if cls is None:
        raise ValueError(
            f"{meta_file} holds a {meta.get('type')!r}, which this version of "
            f"lossgeom does not know; known: {sorted(_REGISTRY)}."
        )
    arrays = load_file(str(folder / "arrays.safetensors"), device=str(device))

    def restore(v: Any) -> Any:
        if isinstance(v, dict) and set(v) == {"__tensor__"}:
            return arrays[v["__tensor__"]]
        if isinstance(v, dict) and set(v) == {"__dict__"}:
            return {k: restore(x) for k, x in v["__dict__"].items()}
        return v

    kwargs = {k: restore(v) for k, v in meta["fields"].items()}
    return cls(**kwargs)
