"""Data-parallel training under ``torchrun``: the process group, shards, reductions.

:func:`data_parallel` gives the run its :class:`Ranks`. Started by ``torchrun``
(``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ...) with no
process group yet, it creates one (NCCL when the model's device is CUDA, each
rank on ``cuda:LOCAL_RANK``; gloo otherwise) and destroys it at the end; a
group that already exists is used and left alone. One process is the plain,
unchanged single-process run.

Every rank computes the same global batch of each step and trains on its
contiguous, equal shard; DistributedDataParallel averages the gradients in
buckets while the backward pass runs, which with equal shards and losses that
are means over samples is exactly the gradient of the global batch's mean.
Everything that decides what the run does next (the batch loss, the metrics)
is reduced so that all ranks hold the same numbers; only rank 0 writes files.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lossgeom.train._config import TrainConfig

__all__ = ["PeerFailedError", "Ranks", "check_global_batch", "data_parallel"]

T = TypeVar("T")


class PeerFailedError(RuntimeError):
    """Rank 0 failed in a step the other ranks waited for; the message says how."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in data-parallel training (the defaults: one process).

    Attributes:
        rank: this process's rank.
        world_size: the number of ranks.
        device: this rank's device (``cuda:LOCAL_RANK`` on CUDA under torchrun).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def current(cls, device: torch.device | str = "cpu") -> Ranks:
        """The ranks of the initialised process group (one process without one)."""
        device = torch.device(device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls(device=device)

    @property
    def parallel(self) -> bool:
        """Whether there is more than one rank."""
        return self.world_size > 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes the run directory (rank 0 only)."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items, as an Objective shards data."""
        w, r = self.world_size, self.rank
        return slice(r * n // w, (r + 1) * n // w)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (in float64)."""
        if not self.parallel:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def mean(self, value: Tensor) -> float:
        """The mean over the ranks of a scalar (of equal shards: the global one)."""
        if not self.parallel:
            return float(value)
        return self.sum([float(value)])[0] / self.world_size

    def barrier(self) -> None:
        """Wait until every rank is here."""
        self.sum([0.0])

    def from_writer(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give its result to every rank.

        ``fn``'s result must pickle. When it fails, rank 0 raises its error and
        the other ranks a :class:`PeerFailedError` naming it, so that no rank is
        left waiting.
        """
        if not self.parallel:
            return fn()
        result, failure = None, None
        if self.writer:
            try:
                result = fn()
            except BaseException as err:
                failure = err
        message = None if failure is None else f"{type(failure).__name__}: {failure}"
        box = [(result, message)]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        if failure is not None:
            raise failure
        result, message = box[0]
        if message is not None:
            raise PeerFailedError(
                f"rank 0 failed, so rank {self.rank} stops: {message}"
            )
        return result

    def wrap(self, model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """The module to train through: DistributedDataParallel over ``model``.

        Its construction broadcasts rank 0's parameters and buffers (after
        checking that every rank has the same shapes); its backward pass
        averages the gradients over the ranks. One process: ``model`` itself.
        """
        if not self.parallel:
            return model
        return DistributedDataParallel(
            model,
            device_ids=[self.device] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )

    def _comm_device(self) -> torch.device:
        # NCCL reduces on the GPU; gloo (and the others) on the CPU.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


@contextmanager
def data_parallel(cfg: TrainConfig, device: torch.device) -> Iterator[Ranks]:
    """The ranks of this run, with a process group while the block runs.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) with no process group yet, one is
    created (NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo otherwise)
    and destroyed on leaving; an existing group is used and kept. The config's
    batch size is checked against the world size before the group is made.

    Args:
        cfg: the run's config.
        device: the run's device (:func:`~lossgeom.train._build.resolve_device`).

    Yields:
        The :class:`Ranks` of this process.

    Raises:
        ValueError: the batch size does not split into equal shards.
    """
    existing = dist.is_available() and dist.is_initialized()
    if existing:
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    check_global_batch(cfg, world)
    if world > 1 and device.type == "cuda":
        local = os.environ.get("LOCAL_RANK")
        device = torch.device(
            "cuda", int(local) if local is not None else torch.cuda.current_device()
        )
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not existing:
        if not dist.is_available():
            raise RuntimeError(
                f"WORLD_SIZE is {world} (torchrun?) but this PyTorch build has no "
                "torch.distributed; run one process, or install a build with it."
            )
        _init_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        yield Ranks.current(device)
    finally:
        if created:
            dist.destroy_process_group()


_groups_made = itertools.count()


def _init_group(backend: str) -> None:
    """Initialise the default process group from torchrun's environment.

    Each group this process makes gets its own key prefix in the rendezvous
    store: a second run in the same torchrun process (after the first one's
    group was destroyed) would otherwise meet the first group's keys and hang.
    """
    store, rank, world = next(dist.rendezvous("env://"))
    prefix = f"lossgeom/train/{next(_groups_made)}"
    dist.init_process_group(
        backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world
    )


def check_global_batch(cfg: TrainConfig, world_size: int, n: int | None = None) -> None:
    """Refuse a global batch that does not split into ``world_size`` equal shards.

    Args:
        cfg: the run's config (``batch_size`` is the global batch).
        world_size: the number of ranks.
        n: the training set's size, once loaded (``None``: the batch size
            alone is checked).

    Raises:
        ValueError: the global batch is not a multiple of ``world_size``.
    """
    if world_size <= 1:
        return
    if cfg.full_batch or (n is not None and cfg.batch_size >= n):
        if n is None:
            return
        size, what = n, f"the global batch (the whole training set, {n} samples)"
        fix = (
            "Choose data.subset (a multiple of the ranks), or run with a number of "
            "processes that divides it."
        )
    else:
        size, what = cfg.batch_size, f"batch_size {cfg.batch_size} (the global batch)"
        low = max(world_size, size - size % world_size)
        fix = (
            f"Choose a batch_size that is a multiple of {world_size} (e.g. {low} or "
            f"{low + world_size}), or run with a number of processes that divides it."
        )
    if size % world_size:
        raise ValueError(
            f"data-parallel training splits each step's global batch into equal "
            f"shards, one per rank; {what} is not divisible by the {world_size} "
            f"ranks. {fix}"
        )
