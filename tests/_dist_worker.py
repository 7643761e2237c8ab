"""Run under torchrun: data-parallel probes on 2 gloo ranks; rank 0 saves the results."""

import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lossgeom as lg

from cases import CASES, DTYPE


def probes(obj, seed=0):
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(obj.dim, 3, generator=gen, dtype=DTYPE)
    P = obj.theta + 0.1 * torch.randn(4, obj.dim, generator=gen, dtype=DTYPE)
    return {
        "n_samples": torch.tensor(obj.n_samples),
        "loss": torch.tensor(obj.loss()),
        "grad": obj.grad(),
        "hvp": obj.hvp(V),
        "hvp1": obj.hvp(V[:, 0]),
        "hessian_kept_graph": lg.hessian(obj) @ V,
        "hessian_recompute": lg.hessian(obj, cache_bytes=None) @ V,
        "evaluate": obj.evaluate(P),
        "ggn": lg.ggn(obj) @ V,
        "cov": lg.gradient_covariance(obj) @ V,
        "cov_streamed": lg.gradient_covariance(obj, cache_bytes=None) @ V,
    }


def reduction_cases():
    """Losses whose data-set value is not a mean of batch means, on CASES[0]'s data.

    Yields ``(name, loss_fn, targets)``: class weights with ignored labels, label
    smoothing with weights, and a sum.
    """
    _, _, _, y = CASES[0].make()
    ignored = y.clone()
    ignored[::4] = -100
    weight = torch.tensor([1.0, 3.0, 0.5], dtype=DTYPE)
    yield (
        "ce_weight_ignore",
        torch.nn.CrossEntropyLoss(weight=weight, ignore_index=-100),
        ignored,
    )
    yield (
        "ce_weight_smoothing",
        torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1),
        y,
    )
    yield "ce_sum", torch.nn.CrossEntropyLoss(reduction="sum"), y


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for case in CASES[:3]:
        model, loss_fn, X, y = case.make()
        obj = lg.Objective(model, loss_fn, (X, y), batch_size=case.batch_size)
        assert obj.data_parallel and obj.world_size == 2
        assert obj.local_n_samples < obj.n_samples  # this rank holds a shard only
        results[case.name] = probes(obj)
    # losses whose reduction is not a plain mean, sharded over the ranks
    for name, loss_fn, targets in reduction_cases():
        model, _, X, _ = CASES[0].make()
        obj = lg.Objective(model, loss_fn, (X, targets), batch_size=5)
        assert obj.data_parallel and obj.local_n_samples < obj.n_samples
        results[name] = probes(obj)
    # an iterable sharded by the user's sampler
    model, loss_fn, X, y = CASES[0].make()
    X, y = X[:22], y[:22]
    sampler = DistributedSampler(TensorDataset(X, y), shuffle=False)
    loader = DataLoader(TensorDataset(X, y), batch_size=4, sampler=sampler)
    results["loader"] = probes(lg.Objective(model, loss_fn, loader))
    # parameters that differ between ranks are refused on every rank
    model, loss_fn, X, y = CASES[0].make()
    if rank == 1:
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
    try:
        lg.Objective(model, loss_fn, (X, y))
        refused = False
    except ValueError as err:
        refused = "differ between ranks" in str(err)
    results["mismatch_refused"] = torch.tensor(refused)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
