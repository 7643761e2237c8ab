"""Atomic file writes (a temp file in the same folder, then a rename) and checksums."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "LockHeldError",
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "record_sha256",
    "is_locked",
    "lock_file",
    "sha256",
]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is synced and renamed onto it.

    Readers see the old file or the new one, never half of one; on an error the
    temp file is removed and ``path`` is untouched. The file's permissions follow
    the umask, as for ``open``. ``suffix`` lets writers that
    pick a format by extension (e.g. matplotlib) see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; follow the umask
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: object) -> Path:
    """Write ``data`` as indented strict JSON (no NaN or infinity), atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def sha256(data: bytes) -> str:
    """The SHA-256 of ``data``, in hex."""
    return hashlib.sha256(data).hexdigest()


def record_sha256(record: dict) -> str:
    """The SHA-256 of a JSON record's content, its own ``"sha256"`` entry left out.

    A file stores it under ``"sha256"``; recomputing it on load detects any edit.
    """
    check = {k: v for k, v in record.items() if k != "sha256"}
    return sha256(json.dumps(check, sort_keys=True, allow_nan=False).encode())


class LockHeldError(BlockingIOError):
    """Another process holds the lock; ``holder`` is its pid as it wrote it."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by pid {holder}")
        self.holder = holder


def lock_file(path: str | os.PathLike) -> int:
    """Take an exclusive OS lock (``fcntl.flock``) on ``path``, created if needed.

    The lock holds until the returned descriptor is closed, and the kernel
    releases it when the process ends however it ends: a killed process leaves
    no stale lock. The file gets this process's pid.

    Raises:
        LockHeldError: another process holds it (with that process's pid).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise LockHeldError(Path(path), holder) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def is_locked(path: str | os.PathLike) -> bool:
    """Whether a live process holds the lock of :func:`lock_file` on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's own lock
    return False
