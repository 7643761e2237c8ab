"""Run-directory state: checkpoints (safetensors + JSON sidecar), metrics, status.

Every file is written atomically (a temp file in the same folder, then a rename),
so a killed run leaves either the previous version of a file or the new one. A
checkpoint is complete when its JSON sidecar exists: the sidecar is written after
its weights file, and resuming only considers checkpoints with a sidecar.

A checkpoint verifies itself: the weights file and its sidecar carry one
generation id and the step (in the safetensors metadata and in the sidecar); the
sidecar records the SHA-256 of the weights file and of its own content. Loading
refuses a damaged or truncated file, a sidecar edited by hand, a file renamed to
another step, and a pair that mixes two saves, naming the file
(:class:`DamagedFileError`).
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import Tensor

from lossgeom._io import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    record_sha256,
    sha256,
)
from lossgeom._results import jsonable
from lossgeom.train._rundir import STATUS, DamagedFileError, read_json

__all__ = [
    "Checkpoint",
    "MetricsLog",
    "apply_checkpoint",
    "checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "read_status",
    "save_checkpoint",
    "write_status",
]

FORMAT = 2
_NAME = re.compile(r"^step_(\d+)\.json$")
_RESTORE = "Resume from an earlier checkpoint (delete this one), or start again."


def save_checkpoint(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    config: dict,
    extra_tensors: dict[str, Tensor] | None = None,
    extra: dict | None = None,
) -> Path:
    """Save weights, buffers, optimizer and RNG state after ``step`` updates.

    Tensors go to ``step_NNNNNNN.safetensors`` (``model/...``, ``optim/<i>/...``,
    ``extra/...``); the step, the config, the optimizer's other state, the RNG
    states and the checksums go to the sidecar ``step_NNNNNNN.json``, written last.

    Returns:
        The sidecar's path.
    """
    stem = folder / f"step_{step:07d}"
    tensors = {
        f"model/{k}": v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
    }
    opt = optimizer.state_dict()
    plain_state: dict[str, dict] = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{idx}/{key}"] = value.detach().clone().contiguous()
            else:
                plain_state.setdefault(str(idx), {})[key] = value
    for key, value in (extra_tensors or {}).items():
        tensors[f"extra/{key}"] = value.detach().clone().contiguous()
    generation = uuid.uuid4().hex
    with atomic_path(stem.with_suffix(".safetensors"), suffix=".safetensors") as tmp:
        try:
            save_file(
                tensors,
                str(tmp),
                metadata={"generation": generation, "step": str(step)},
            )
        except SafetensorError as err:  # an I/O error (disk full, ...) inside
            raise _os_error(err, stem.with_suffix(".safetensors")) from err
        weights_sha = sha256(tmp.read_bytes())
    rng = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode()
            for s in torch.cuda.get_rng_state_all()
        ]
    sidecar = jsonable(
        {
            "format": FORMAT,
            "step": step,
            "generation": generation,
            "weights": stem.with_suffix(".safetensors").name,
            "weights_sha256": weights_sha,
            "config": config,
            "rng": rng,
            "optimizer": {"param_groups": opt["param_groups"], "state": plain_state},
            "extra": extra or {},
        }
    )
    sidecar["sha256"] = record_sha256(sidecar)
    atomic_write_json(stem.with_suffix(".json"), sidecar)
    return stem.with_suffix(".json")


def _os_error(err: Exception, path: Path) -> OSError:
    """The ``OSError`` a safetensors write error stands for (``errno`` kept)."""
    found = re.search(r"os error (\d+)", str(err))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, f"{os.strerror(code)} (writing a checkpoint)", str(path))


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The checkpoints (their sidecars) in ``folder``, by step.

    A weights file without its sidecar is a save that was cut short and is not
    listed; a sidecar is listed whatever state its weights file is in.
    """
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        m = _NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    """The sidecar of the last checkpoint, or ``None`` (not verified)."""
    found = checkpoints(folder)
    return found[-1][1] if found else None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read and verified, not yet applied to a model.

    Attributes:
        path: its sidecar.
        meta: the sidecar's content.
        tensors: every tensor of its weights file.
        rng: the decoded RNG states (``torch``, and ``cuda`` where saved).
    """

    path: Path
    meta: dict
    tensors: dict[str, Tensor]
    rng: dict

    @property
    def step(self) -> int:
        """Updates done when it was saved."""
        return int(self.meta["step"])


def _damaged(path: Path, what: str, fix: str = _RESTORE) -> DamagedFileError:
    return DamagedFileError(f"checkpoint {path} {what}. {fix}")


def _header_metadata(raw: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's header."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    return header.get("__metadata__") or {}


def _decode_rng(path: Path, meta: dict) -> dict:
    rng = meta.get("rng")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), str):
        raise _damaged(path, "holds no torch RNG state")
    size = torch.get_rng_state().numel()
    try:
        out = {"torch": base64.b64decode(rng["torch"], validate=True)}
        if "cuda" in rng:
            out["cuda"] = [base64.b64decode(s, validate=True) for s in rng["cuda"]]
    except (binascii.Error, TypeError, ValueError) as err:
        raise _damaged(path, f"holds a damaged RNG state ({err})") from None
    if len(out["torch"]) != size:
        raise _damaged(
            path, f"holds a torch RNG state of {len(out['torch'])} bytes, not {size}"
        )
    return out


def read_checkpoint(sidecar: Path, model: torch.nn.Module | None = None) -> Checkpoint:
    """Read a checkpoint and verify it (checksums, generation, step, RNG state).

    With ``model``, its tensors are also checked against the model's state dict
    (names and shapes). Nothing is changed.

    Raises:
        DamagedFileError: the sidecar or the weights file is damaged, truncated,
            edited, renamed, or from another save (the message names the file).
    """
    path = Path(sidecar)
    m = _NAME.match(path.name)
    meta = read_json(path, "a checkpoint's sidecar", _RESTORE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _damaged(
            path,
            "is not a checkpoint of this version of lossgeom (no format "
            f"{FORMAT} sidecar)",
        )
    if meta.get("sha256") != record_sha256(meta):
        raise _damaged(path, "was changed after it was written (checksum differs)")
    if m is None or meta.get("step") != int(m.group(1)):
        raise _damaged(
            path, f"says step {meta.get('step')!r}, which its file name does not"
        )
    weights = path.with_suffix(".safetensors")
    if meta.get("weights") != weights.name:
        raise _damaged(
            path, f"names weights {meta.get('weights')!r}, not {weights.name}"
        )
    try:
        raw = weights.read_bytes()
    except FileNotFoundError:
        raise _damaged(weights, "is missing (its sidecar exists)") from None
    if sha256(raw) != meta.get("weights_sha256"):
        raise _damaged(
            weights,
            f"does not match its sidecar {path.name} (checksum differs: the file "
            "is damaged or truncated, or the pair mixes two saves)",
        )
    try:
        tensors = load(raw)
        stored = _header_metadata(raw)
    except (SafetensorError, ValueError) as err:
        raise _damaged(weights, f"cannot be read ({err})") from None
    if stored.get("generation") != meta.get("generation") or stored.get("step") != str(
        meta["step"]
    ):
        raise _damaged(weights, f"is from another save than its sidecar {path.name}")
    rng = _decode_rng(path, meta)
    if model is not None:
        _check_model(weights, tensors, model)
    return Checkpoint(path=path, meta=meta, tensors=tensors, rng=rng)


def _check_model(weights: Path, tensors: dict[str, Tensor], model) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in _model_state(tensors).items()}
    if want != have:
        raise _damaged(
            weights,
            "does not hold the weights of this run's model (names or shapes differ)",
        )


def checkpoint_states(run_dir: str | Path) -> list[tuple[int, dict[str, Tensor]]]:
    """Every complete checkpoint of a run as ``(step, model state dict)``, by step.

    For a trajectory of a training run, e.g.
    ``lg.pca_directions(obj, [s for _, s in checkpoint_states(run_dir)])``.
    ``run_dir`` is the run directory (its ``checkpoints/`` folder is read) or the
    checkpoint folder itself. Each checkpoint is verified.

    Raises:
        FileNotFoundError: the run has no checkpoints.
        DamagedFileError: a checkpoint is damaged (the message names the file).
    """
    folder = Path(run_dir)
    if (folder / "checkpoints").is_dir():
        folder = folder / "checkpoints"
    found = checkpoints(folder)
    if not found:
        raise FileNotFoundError(
            f"no complete checkpoints in {folder}; expected step_*.json sidecars "
            "with their .safetensors files, written by lg.train with "
            "checkpoint.every or checkpoint.steps set."
        )
    return [
        (step, _model_state(read_checkpoint(sidecar).tensors))
        for step, sidecar in found
    ]


def _model_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's state dict among a checkpoint's tensors."""
    return {
        k.removeprefix("model/"): v
        for k, v in tensors.items()
        if k.startswith("model/")
    }


def _rng_tensor(raw: bytes) -> Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def apply_checkpoint(
    ckpt: Checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> tuple[dict, dict[str, Tensor]]:
    """Load a verified checkpoint into ``model`` (and ``optimizer``) and the RNG.

    Returns:
        ``(sidecar, extra_tensors)``.
    """
    meta, tensors = ckpt.meta, ckpt.tensors
    device = next((t.device for t in model.state_dict().values()), None)
    model.load_state_dict(_model_state(tensors))
    if optimizer is not None:
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, idx, name = key.split("/", 2)
                opt_state.setdefault(int(idx), {})[name] = value.to(device)
        for idx, plain in meta["optimizer"]["state"].items():
            opt_state.setdefault(int(idx), {}).update(plain)
        optimizer.load_state_dict(
            {"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]}
        )
    if restore_rng:
        try:
            torch.set_rng_state(_rng_tensor(ckpt.rng["torch"]))
            if "cuda" in ckpt.rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([_rng_tensor(s) for s in ckpt.rng["cuda"]])
        except RuntimeError as err:
            raise _damaged(
                ckpt.path, f"holds an RNG state torch refuses ({err})"
            ) from None
    extra = {
        k.removeprefix("extra/"): v.to(device)
        for k, v in tensors.items()
        if k.startswith("extra/")
    }
    return meta, extra


def load_checkpoint(
    sidecar: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> tuple[dict, dict[str, Tensor]]:
    """Verify a checkpoint, load it into ``model`` (and ``optimizer``) and the RNG.

    Returns:
        ``(sidecar, extra_tensors)``.

    Raises:
        DamagedFileError: the checkpoint is damaged (see :func:`read_checkpoint`).
    """
    return apply_checkpoint(
        read_checkpoint(sidecar, model), model, optimizer, restore_rng=restore_rng
    )


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed per line.

    A damaged line (not a JSON object with an integer ``step``) is skipped with a
    warning naming the file and the line; the rows around it are kept. A last
    line cut short by a killed process is dropped quietly.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def _scan(self) -> tuple[list[dict], list[tuple[int, str, str]]]:
        """``(rows, damaged)``: the valid rows and ``(line, text, why)`` of the rest."""
        if not self.path.is_file():
            return [], []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        torn = lines.pop() if lines else b""  # b"" when the file ends with "\n"
        rows: list[dict] = []
        damaged: list[tuple[int, str, str]] = []
        for number, raw in enumerate([*lines, torn], start=1):
            if not raw.strip():
                continue
            text = raw.decode("utf-8", "replace")
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                why = f"not valid JSON: {err}"
            else:
                step = row.get("step") if isinstance(row, dict) else None
                if isinstance(step, int) and not isinstance(step, bool):
                    rows.append(row)
                    continue
                why = "not a metrics row (a JSON object with an integer step)"
            if raw is not torn:
                damaged.append((number, text, why))
        return rows, damaged

    def read(self) -> list[dict]:
        """The valid rows, in file order (see the class docstring)."""
        rows, damaged = self._scan()
        for number, _, why in damaged:
            warnings.warn(
                f"{self.path} line {number} is damaged ({why}); it is skipped.",
                RuntimeWarning,
                stacklevel=2,
            )
        return rows

    def truncate(self, before_step: int) -> list[int]:
        """Keep only the rows of steps before ``before_step`` (when resuming).

        Damaged lines move to ``<name>.damaged`` (each with its line number) so
        that nothing is lost; a torn last line is dropped.

        Returns:
            The line numbers of the damaged lines moved.
        """
        if not self.path.is_file():
            return []
        rows, damaged = self._scan()
        kept = [r for r in rows if r["step"] < before_step]
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept)
        if damaged:
            with open(self.path.with_name(self.path.name + ".damaged"), "a") as fh:
                fh.writelines(f"{n}\t{line}\n" for n, line, _ in damaged)
            for number, _, why in damaged:
                warnings.warn(
                    f"{self.path} line {number} is damaged ({why}); it is skipped "
                    f"and kept in {self.path.name}.damaged.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if self.path.read_bytes() != text.encode():
            atomic_write_text(self.path, text)
        return [n for n, _, _ in damaged]

    def append(self, row: dict) -> None:
        """Append one row."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(jsonable(row), allow_nan=False) + "\n")
            fh.flush()


def write_status(run_dir: Path, status: str, step: int, **info: object) -> None:
    """Write ``status.json`` (``running``, ``finished``, ``diverged``, ``failed``)."""
    atomic_write_json(
        run_dir / STATUS, jsonable({"status": status, "step": step, **info})
    )


def read_status(run_dir: Path) -> dict | None:
    """The run's ``status.json``, or ``None``.

    Raises:
        DamagedFileError: the file is damaged (the message names it).
    """
    path = Path(run_dir) / STATUS
    if not path.is_file():
        return None
    fix = f"Delete {path} to resume the run from its last checkpoint."
    data = read_json(path, "the run's status", fix)
    if not (
        isinstance(data, dict)
        and isinstance(data.get("status"), str)
        and isinstance(data.get("step"), int)
    ):
        raise DamagedFileError(
            f"{path} (the run's status) is damaged: expected an object with a "
            f"status and a step. {fix}"
        )
    return data
