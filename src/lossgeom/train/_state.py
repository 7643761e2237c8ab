"""Run-directory state: checkpoints (safetensors + JSON sidecar), metrics, status.

Every file is written atomically (a temp file in the same folder, then a rename),
so a killed run leaves either the previous version of a file or the new one. A
checkpoint is complete when its JSON sidecar exists: the sidecar is written after
its weights file, and resuming only considers checkpoints with a sidecar.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lossgeom._io import atomic_path, atomic_write_json, atomic_write_text
from lossgeom._results import jsonable

__all__ = [
    "MetricsLog",
    "latest_checkpoint",
    "load_checkpoint",
    "read_status",
    "save_checkpoint",
    "write_status",
]

_NAME = re.compile(r"^step_(\d+)\.json$")


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
    ``extra/...``); the step, the config, the optimizer's other state and the RNG
    states go to the sidecar ``step_NNNNNNN.json``, written last.

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
    with atomic_path(stem.with_suffix(".safetensors")) as tmp:
        save_file(tensors, str(tmp))
    rng = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode()
            for s in torch.cuda.get_rng_state_all()
        ]
    sidecar = {
        "step": step,
        "weights": stem.with_suffix(".safetensors").name,
        "config": config,
        "rng": rng,
        "optimizer": {"param_groups": opt["param_groups"], "state": plain_state},
        "extra": jsonable(extra or {}),
    }
    atomic_write_json(stem.with_suffix(".json"), sidecar)
    return stem.with_suffix(".json")


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a sidecar) in ``folder``, by step."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        m = _NAME.match(path.name)
        if m and path.with_suffix(".safetensors").is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    """The sidecar of the last complete checkpoint, or ``None``."""
    found = checkpoints(folder)
    return found[-1][1] if found else None


def checkpoint_states(run_dir: str | Path) -> list[tuple[int, dict[str, Tensor]]]:
    """Every complete checkpoint of a run as ``(step, model state dict)``, by step.

    For a trajectory of a training run, e.g.
    ``lg.pca_directions(obj, [s for _, s in checkpoint_states(run_dir)])``.
    ``run_dir`` is the run directory (its ``checkpoints/`` folder is read) or the
    checkpoint folder itself.
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
    return [(step, _model_state(_read(sidecar)[1])) for step, sidecar in found]


def _read(sidecar: Path) -> tuple[dict, dict[str, Tensor]]:
    """A checkpoint's sidecar and its tensors."""
    meta = json.loads(Path(sidecar).read_text(encoding="utf-8"))
    return meta, load_file(str(Path(sidecar).with_name(meta["weights"])))


def _model_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's state dict among a checkpoint's tensors."""
    return {
        k.removeprefix("model/"): v
        for k, v in tensors.items()
        if k.startswith("model/")
    }


def load_checkpoint(
    sidecar: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> tuple[dict, dict[str, Tensor]]:
    """Load a checkpoint into ``model`` (and ``optimizer``); restore the RNG states.

    Returns:
        ``(sidecar, extra_tensors)``.
    """
    meta, tensors = _read(sidecar)
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
        raw = base64.b64decode(meta["rng"]["torch"])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        if "cuda" in meta["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(
                [
                    torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                    for s in meta["rng"]["cuda"]
                ]
            )
    extra = {
        k.removeprefix("extra/"): v.to(device)
        for k, v in tensors.items()
        if k.startswith("extra/")
    }
    return meta, extra


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed per line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """Complete lines (a line cut short by a kill is ignored)."""
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line
        return rows

    def truncate(self, before_step: int) -> None:
        """Keep only the rows of steps before ``before_step`` (when resuming)."""
        rows = [r for r in self.read() if r.get("step", -1) < before_step]
        atomic_write_text(
            self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows)
        )

    def append(self, row: dict) -> None:
        """Append one row."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(jsonable(row), allow_nan=False) + "\n")
            fh.flush()


def write_status(run_dir: Path, status: str, step: int, **info: object) -> None:
    """Write ``status.json`` (``running``, ``finished`` or ``diverged``)."""
    atomic_write_json(
        run_dir / "status.json", jsonable({"status": status, "step": step, **info})
    )


def read_status(run_dir: Path) -> dict | None:
    """The run's ``status.json``, or ``None``."""
    path = Path(run_dir) / "status.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
