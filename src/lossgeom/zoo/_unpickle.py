"""Read pickled data files without running code: a restricted unpickler.

A pickle names the callables that rebuild its objects, and a plain
:func:`pickle.loads` imports and calls whatever it names, so a crafted data file
can run any code. :func:`load_arrays` admits only what data-set pickles such as
CIFAR's python batches hold: builtin containers, strings, bytes and numbers (which
come through opcodes, not names) and NumPy arrays. Any other global is refused
before it is imported.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

__all__ = ["UnsafePickleError", "load_arrays"]

try:  # NumPy 2
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer


class UnsafePickleError(ValueError):
    """A pickled data file names a global outside the admitted NumPy names."""


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            "_codecs.encode is admitted only as encode(str, 'latin1'), the form "
            f"pickles of bytes take; got encode({type(text).__name__}, {encoding!r})."
        )
    return text.encode("latin1")


# (module, name) -> the object itself: nothing is imported by name from the file.
_ADMITTED: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_bytes,
}


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, raw: bytes, path: Path):
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> object:
        admitted = _ADMITTED.get((module, name))
        if admitted is None:
            raise UnsafePickleError(
                f"{self._path} tries to load the global {module}.{name}; refused: "
                "data files may hold only containers, strings, numbers and NumPy "
                "arrays, and loading anything else could run code. Original data "
                "files hold no such global: replace this one with the file from "
                "the data set's official archive."
            )
        return admitted

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are not part of data files")


def load_arrays(path: Path) -> object:
    """Unpickle a data file whose objects are containers, scalars and NumPy arrays.

    Strings of Python 2 pickles come back as ``bytes`` (as CIFAR's keys are).

    Args:
        path: the pickle file.

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: the file names any other global (nothing of it is
            imported or called).
        ValueError: the file is damaged or not a pickle.

    Example:
        >>> import pickle, tempfile
        >>> f = Path(tempfile.mkdtemp()) / "batch"
        >>> _ = f.write_bytes(pickle.dumps({b"data": np.arange(3, dtype=np.uint8)}))
        >>> load_arrays(f)[b"data"].tolist()
        [0, 1, 2]
        >>> _ = f.write_bytes(pickle.dumps(print))
        >>> try:
        ...     load_arrays(f)
        ... except UnsafePickleError as err:
        ...     print("builtins.print; refused" in str(err))
        True
    """
    raw = path.read_bytes()
    try:
        return _ArrayUnpickler(raw, path).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged pickle raises many kinds
        raise ValueError(
            f"{path} could not be unpickled ({type(err).__name__}: {err}); the file "
            "is damaged or truncated."
        ) from None
