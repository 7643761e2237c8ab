"""Data parallelism for an Objective: shard the data, sum over ranks.

Each rank of a ``torch.distributed`` process group holds a shard of the data;
every average over the data is a sum of per-rank sums reduced with
``all_reduce``. NCCL reduces on the GPU, gloo (and the others) on the CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lossgeom.objective._data import DataSource

__all__ = ["DistributedMixin"]


class DistributedMixin:
    """Reduction over the ranks of a process group (a no-op on one rank).

    Attributes:
        data_parallel: whether results are summed over ranks.
        world_size: number of ranks (1 unless data-parallel).
        rank: this process's rank (0 unless data-parallel).
    """

    data_parallel: bool
    world_size: int
    rank: int
    _device: torch.device
    _source: DataSource

    def _setup_data_parallel(self, data_parallel: bool | None) -> None:
        """Decide whether to sum over ranks and, if so, take this rank's shard.

        ``None`` means "when a process group with more than one rank is
        initialised". Sets :attr:`data_parallel`, :attr:`world_size` and
        :attr:`rank`.
        """
        self.world_size = 1
        self.rank = 0
        if data_parallel is None:
            data_parallel = (
                dist.is_available()
                and dist.is_initialized()
                and (dist.get_world_size() > 1)
            )
        if data_parallel:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "data_parallel=True needs an initialised torch.distributed process "
                    "group; call torch.distributed.init_process_group first (torchrun "
                    "sets up the environment)."
                )
            self.world_size = dist.get_world_size()
            self.rank = dist.get_rank()
            self._source.shard(self.rank, self.world_size)
        self.data_parallel = bool(data_parallel)

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks (a no-op unless data-parallel); returns the sum."""
        if not self.data_parallel:
            return t
        home = t.device
        comm = self._comm_device()
        t = t.to(comm).contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(home)

    def _reduce_cpu(self, t: Tensor) -> Tensor:
        return self.all_reduce(t).cpu()

    def _comm_device(self) -> torch.device:
        # NCCL reduces on the GPU; gloo (and others) on the CPU.
        if dist.get_backend() == "nccl":
            return self._device
        return torch.device("cpu")

    def _check_same_theta(self, theta: Tensor) -> None:
        """Refuse parameters that differ between ranks."""
        theta = theta.double().to(self._comm_device())
        local = torch.stack([theta.sum(), (theta * theta).sum(), theta.abs().max()])
        high = local.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        differs = (high != local).any().double().reshape(1)
        dist.all_reduce(differs, op=dist.ReduceOp.MAX)
        if differs.item() > 0:
            raise ValueError(
                "the model's parameters differ between ranks; data-parallel probes "
                "need the same theta on every rank. Seed the model identically or "
                "broadcast the parameters from rank 0 first."
            )
