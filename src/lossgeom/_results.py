"""The one result base: every public result of lossgeom is a :class:`Result`.

A result is a frozen dataclass that subclasses :class:`Result`. Whatever it
measures, it speaks one vocabulary:

* ``value`` -- the headline number (where there is one);
* ``stderr`` -- a *statistical* standard error of a stochastic estimate;
* ``bound`` -- a *deterministic* error bound (e.g. from residuals);
  sub-quantities follow the same rule as ``<name>_stderr`` / ``<name>_bound``;
* ``residuals`` / ``converged`` -- the certificates of eigenpairs;
* ``definition`` -- the formula in words, with its citation;
* ``parameters`` -- the settings it ran with (inputs);
* ``details`` -- further outputs worth keeping (diagnostics, decisions taken);
* ``cost`` -- a :class:`Cost`: matrix-vector products, data passes, seconds.

**One rule for non-finite numbers.** Strict JSON has no NaN or infinity, so a
float that is not finite is written as the *string* ``"NaN"``, ``"Infinity"`` or
``"-Infinity"`` -- the spellings Python's ``float()`` (and ``pandas.to_numeric``)
read back. :func:`jsonable` applies the rule everywhere the package writes JSON
(results, metrics rows, checkpoints' sidecars), so every file it writes parses
with any strict JSON reader.

**Saving.** :meth:`Result.save` writes a folder with ``arrays-<generation>.safetensors`` (every
tensor, at any depth) and ``result.json`` (everything else, with the class name).
Both files carry one generation id; ``result.json`` records the SHA-256 of the
arrays file and of its own content, so :func:`load_result` refuses a damaged file
or a folder that mixes two saves, naming the file. Each file is written
atomically (temp file + rename), the arrays first, so a reader never sees half a
file. :func:`load_result` rebuilds the result exactly -- tensors bit for bit with
their dtypes, floats exactly (``repr`` round-trips), tuples as tuples -- without
the caller knowing its class.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from lossgeom._io import atomic_path, atomic_write_text, record_sha256, sha256

__all__ = [
    "Cost",
    "CostMeter",
    "Result",
    "jsonable",
    "load_result",
    "register",
    "save_result",
    "timed",
]

FORMAT = 2
ARRAYS = "arrays-{}.safetensors"  # one file per generation
META = "result.json"
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_REGISTRY: dict[str, type] = {}
# Packages imported on first use (``lg.study``, ``lg.analysis``) define result
# types too; the top-level package names them here so that loading a result
# imports them when needed.
LAZY_MODULES: list[str] = []


# --------------------------------------------------------------------- JSON rule
def _float(x: float) -> float | str:
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON values: the package's one conversion.

    Tensors become numbers or nested lists, numpy values plain Python, results and
    other dataclasses dicts, tuples lists, paths strings, and every non-finite
    float the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``.

    Example:
        >>> jsonable({"a": torch.tensor([1.0, float("inf")]), "b": float("nan")})
        {'a': [1.0, 'Infinity'], 'b': 'NaN'}
    """
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, Result):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
        }
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar or array
        return jsonable(value.tolist())
    raise TypeError(
        f"cannot write a {type(value).__name__} as JSON; expected numbers, strings, "
        "tensors, lists, dicts or lossgeom results."
    )


# -------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class Cost:
    """What a result cost to compute.

    Attributes:
        matvecs: products of a curvature operator with a vector (a block of ``m``
            vectors counts ``m``): Hessian, Gauss-Newton, covariance or any
            :class:`~lossgeom.linalg.SymmetricOperator`.
        data_passes: passes over the objective's data (losses, gradients and
            products each read the data once per pass).
        seconds: wall time.
        counters: the objective's counters spent, by kind (``loss``, ``grad``,
            ``hvp``, ``ggn``, ``per_sample_grad``, ``passes``), when an objective
            was involved.
    """

    matvecs: int = 0
    data_passes: int = 0
    seconds: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)

    def add(
        self,
        matvecs: int = 0,
        data_passes: int = 0,
        seconds: float = 0.0,
        **counts: int,
    ) -> Cost:
        """A copy with more work: totals raised, ``counts`` added to ``counters``."""
        counters = dict(self.counters)
        for k, v in counts.items():
            counters[k] = counters.get(k, 0) + v
        return Cost(
            matvecs=self.matvecs + int(matvecs),
            data_passes=self.data_passes + int(data_passes),
            seconds=self.seconds + float(seconds),
            counters=counters,
        )

    def __add__(self, other: Cost) -> Cost:
        return self.add(
            other.matvecs, other.data_passes, other.seconds, **other.counters
        )


class CostMeter:
    """Counts work inside a ``with timed(...)`` block; ``.cost`` is the :class:`Cost`.

    The objective's counters (if any) are read at the start and at the end: its
    Hessian and Gauss-Newton products count as ``matvecs``, its passes as
    ``data_passes``. Products the objective does not see (e.g. with a
    covariance operator) are added to the result's cost with :meth:`Cost.add`.
    """

    def __init__(self, objective: Any = None):
        self._objective = objective
        self._start = time.perf_counter()
        self._before = self._counters()
        self._final: Cost | None = None

    def _counters(self) -> dict[str, int]:
        if self._objective is None:
            return {}
        return dict(self._objective.counters.to_dict())

    def _measure(self) -> Cost:
        after = self._counters()
        spent = {k: after[k] - self._before.get(k, 0) for k in after}
        return Cost(
            matvecs=spent.get("hvp", 0) + spent.get("ggn", 0),
            data_passes=spent.get("passes", 0),
            seconds=time.perf_counter() - self._start,
            counters=spent,
        )

    def stop(self) -> Cost:
        """Freeze the cost (called when the block ends)."""
        if self._final is None:
            self._final = self._measure()
        return self._final

    @property
    def cost(self) -> Cost:
        """The cost so far, or the frozen one once the block has ended."""
        return self._final if self._final is not None else self._measure()


@contextmanager
def timed(objective: Any = None) -> Iterator[CostMeter]:
    """Measure the work done inside the block as a :class:`Cost`.

    Example:
        >>> with timed() as meter:
        ...     pass
        >>> meter.cost.matvecs, meter.cost.seconds >= 0
        (0, True)
    """
    meter = CostMeter(objective)
    try:
        yield meter
    finally:
        meter.stop()


# ------------------------------------------------------------------------ result
def register(cls: type) -> type:
    """Make a dataclass loadable by name (results register themselves)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass to be registered.")
    known = _REGISTRY.get(cls.__name__)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise TypeError(f"two result types are named {cls.__name__}.")
    _REGISTRY[cls.__name__] = cls
    return cls


register(Cost)


@dataclass(frozen=True, kw_only=True, eq=False)
class Result:
    """The base of every public result (see the module docstring for the rules).

    Subclasses are frozen dataclasses; these fields come last and by keyword.

    Attributes:
        definition: what was computed: the formula in words, with its citation.
        parameters: the settings it ran with.
        details: further outputs (diagnostics, decisions the method took).
        cost: the work it took (:class:`Cost`).
    """

    definition: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)

    #: fields left out of :meth:`to_dict` (bulky arrays such as eigenvectors);
    #: :meth:`save` keeps them.
    bulky: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls  # the dataclass decorator keeps the class

    def to_dict(self) -> dict[str, Any]:
        """The result as strict JSON values, with its type; bulky arrays left out."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            if f.name not in self.bulky:
                out[f.name] = jsonable(getattr(self, f.name))
        return out

    def scalars(self) -> dict[str, float]:
        """The headline numbers: ``value``, ``stderr`` and ``bound`` where they exist.

        A study stores these per checkpoint; subclasses without a ``value`` field
        name their own headline numbers.
        """
        out: dict[str, float] = {}
        for name in ("value", "stderr", "bound"):
            x = getattr(self, name, None)
            if isinstance(x, Tensor) and x.numel() == 1:
                x = x.item()
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                out[name] = float(x)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result to the folder ``path`` (see :func:`save_result`)."""
        return save_result(self, path)

    def _fields_to_save(self) -> dict[str, Any]:
        """The field values :meth:`save` writes; a subclass may swap in savable forms."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def _from_saved(cls, values: dict[str, Any]) -> Result:
        """Rebuild from the values of :meth:`_fields_to_save`, as loaded."""
        return cls(**values)


# ------------------------------------------------------------------- save / load
_TAGS = (
    "__tensor__",
    "__type__",
    "__tuple__",
    "__str__",
    "__path__",
    "__dtype__",
    "__items__",
    "__dict__",
)


def _encode(value: Any, arrays: dict[str, Tensor], where: str) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        return {"__str__": value} if value in _NONFINITE else value
    if isinstance(value, Tensor):
        key = f"{len(arrays)}:{where}"
        arrays[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if _REGISTRY.get(name) is not type(value):
            raise TypeError(
                f"cannot save {where}: {name} is not a lossgeom result type."
            )
        if isinstance(value, Result):
            values = value._fields_to_save()
        else:
            values = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {
            "__type__": name,
            "fields": {
                k: _encode(v, arrays, f"{where}.{k}") for k, v in values.items()
            },
        }
    if isinstance(value, tuple):
        return {
            "__tuple__": [
                _encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)
            ]
        }
    if isinstance(value, list):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            body = {k: _encode(v, arrays, f"{where}.{k}") for k, v in value.items()}
            if len(body) == 1 and next(iter(body)) in _TAGS:
                return {"__dict__": body}
            return body
        return {
            "__items__": [
                [
                    _encode(k, arrays, f"{where}.key"),
                    _encode(v, arrays, f"{where}[{k!r}]"),
                ]
                for k, v in value.items()
            ]
        }
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if hasattr(value, "item") and hasattr(value, "dtype") and hasattr(value, "shape"):
        if getattr(value, "shape", ()) == ():
            return _encode(value.item(), arrays, where)
        return _encode(torch.from_numpy(value), arrays, where)
    raise TypeError(
        f"cannot save {where}: a {type(value).__name__} is neither a tensor, a "
        "number, a string, a list, a dict nor a lossgeom result."
    )


def _decode(value: Any, arrays: dict[str, Tensor]) -> Any:
    if isinstance(value, str):
        return _NONFINITE.get(value, value)
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, body),) = value.items()
        if tag == "__tensor__":
            return arrays[body]
        if tag == "__tuple__":
            return tuple(_decode(v, arrays) for v in body)
        if tag == "__str__":
            return body
        if tag == "__path__":
            return Path(body)
        if tag == "__dtype__":
            return getattr(torch, body)
        if tag == "__items__":
            return {_decode(k, arrays): _decode(v, arrays) for k, v in body}
        if tag == "__dict__":
            return {k: _decode(v, arrays) for k, v in body.items()}
    if set(value) == {"__type__", "fields"}:
        cls = _REGISTRY.get(value["__type__"])
        if cls is None:
            for module in LAZY_MODULES:
                importlib.import_module(module)
            cls = _REGISTRY.get(value["__type__"])
        if cls is None:
            raise ValueError(
                f"a saved result holds a {value['__type__']!r}, which this version "
                f"of lossgeom does not know; known: {sorted(_REGISTRY)}."
            )
        kwargs = {k: _decode(v, arrays) for k, v in value["fields"].items()}
        if issubclass(cls, Result):
            return cls._from_saved(kwargs)
        return cls(**kwargs)
    return {k: _decode(v, arrays) for k, v in value.items()}


def save_result(result: Any, path: str | os.PathLike) -> Path:
    """Write ``result`` to the folder ``path`` (created); returns the folder.

    The folder holds ``arrays-<generation>.safetensors`` and ``result.json``
    (see the module docstring); an earlier save in the same folder is replaced.
    The arrays go to a file of their own generation first, then ``result.json``,
    which names it, replaces the old one in one rename, and only then are older
    arrays files removed: a process killed at any moment leaves the folder
    holding the old save or the new one, complete.

    Raises:
        TypeError: ``result`` is not a lossgeom result, or a field holds something
            that cannot be saved (the message names the field).
    """
    from safetensors.torch import save_file

    if not isinstance(result, Result) and _REGISTRY.get(
        type(result).__name__
    ) is not type(result):
        raise TypeError(
            "expected a lossgeom result (from lg.eigenvalues, lg.slice_2d, "
            f"lg.sharpness, ...); got {type(result).__name__}."
        )
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"cannot save a result to {folder}: it is a file, and a result is a "
            "folder; pass a folder path."
        )
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Tensor] = {}
    body = _encode(result, arrays, type(result).__name__)
    generation = uuid.uuid4().hex
    arrays_name = ARRAYS.format(generation)
    with atomic_path(folder / arrays_name, suffix=".safetensors") as tmp:
        save_file(arrays, str(tmp), metadata={"generation": generation})
        arrays_sha = sha256(tmp.read_bytes())
    meta = {
        "format": FORMAT,
        "type": type(result).__name__,
        "generation": generation,
        "arrays": arrays_name,
        "arrays_sha256": arrays_sha,
        "result": body,
    }
    meta["sha256"] = record_sha256(meta)
    atomic_write_text(folder / META, json.dumps(meta, indent=1, allow_nan=False) + "\n")
    for old in folder.glob(ARRAYS.format("*")):
        if old.name != arrays_name:  # earlier generations, now unreferenced
            old.unlink(missing_ok=True)
    for tmp in (*folder.glob(".arrays-*"), *folder.glob(f".{META}.*")):
        tmp.unlink(missing_ok=True)  # temp files of a save killed mid-write
    return folder


def _damaged(file: Path, what: str) -> ValueError:
    return ValueError(
        f"{file} is damaged ({what}); it cannot be loaded. Save the result again, "
        "or restore the folder from a copy."
    )


def load_result(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Any:
    """Rebuild a result saved by :meth:`Result.save` (tensors on ``device``).

    Raises:
        FileNotFoundError: the folder holds no saved result.
        ValueError: a file is damaged, truncated, or from a different save than
            its partner (the message names the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = Path(path)
    meta_file = folder / META
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{folder} holds no saved result (no {META}); expected a folder "
            "written by result.save(path) or lg.save_result."
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(meta_file, f"not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(
            f"{meta_file} is not a saved result of format {FORMAT} (found format "
            f"{found!r}); save it again with this version of lossgeom."
        )
    if meta.get("sha256") != record_sha256(meta):
        raise _damaged(meta_file, "its checksum does not match its content")
    name = meta.get("arrays")
    if not isinstance(name, str) or Path(name).name != name:
        raise _damaged(meta_file, f"it names no arrays file of this folder ({name!r})")
    arrays_file = folder / name
    try:
        raw = arrays_file.read_bytes()
    except FileNotFoundError:
        raise _damaged(arrays_file, "missing") from None
    if sha256(raw) != meta["arrays_sha256"]:
        raise ValueError(
            f"{arrays_file} does not belong to {meta_file} (its checksum differs: "
            "the file is damaged, or the folder mixes two saves). Save the result "
            "again."
        )
    try:
        arrays = load(raw)
    except SafetensorError as err:
        raise _damaged(arrays_file, str(err)) from None
    arrays = {k: v.to(device) for k, v in arrays.items()}
    return _decode(meta["result"], arrays)
