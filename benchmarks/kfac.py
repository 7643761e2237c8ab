"""K-FAC against SGD and Adam: steps and seconds to a target training loss.

Two problems, each trained from the same seeded initialisations and batch orders by
every optimizer in a plain PyTorch loop (``lossgeom.optim.KFAC`` used outside the
trainer, as a ``torch.optim.Optimizer``):

* (a) an MLP 40-100-100-10 (ReLU) on MNIST-1D (4,000 training samples), batch 128;
* (b) the zoo's small CNN (``cnn``, width 16, depth 4, BatchNorm) on sklearn
  digits (1,438 training images of 1x8x8), batch 128.

Each optimizer's step size is tuned on a small grid (3 values, below), with 3
seeds per value; the step size with the smallest median number of steps to the
target wins (ties: seconds). The full training loss (eval mode) is measured every
``--every`` steps (outside the timing); "steps to target" is the first such step
at or below the target, "seconds" the wall time of the training steps up to it.
Reported: medians over the seeds at the best step size, and their ratios to SGD
measured in the same run. SGD uses momentum 0.9, Adam its defaults; K-FAC no
momentum, the MC Fisher, damping 0.03 (pi-corrected), factor decay 0.95, factors
every step, eigendecompositions every 10 steps. One thread by default; models and
data on ``--device`` (CUDA when present; timings synchronise it). Results go to
``benchmarks/results/kfac_<device>.json`` with the machine facts.

Usage: python benchmarks/kfac.py [--seeds 3] [--every 10] [--problems a,b] [--threads 1]
[--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from _machine import DEFAULT_DEVICE, machine_facts, sync
from lossgeom._io import atomic_write_json
from lossgeom._results import jsonable
from lossgeom.optim import KFAC
from lossgeom.zoo import dataset
from lossgeom.zoo import model as zoo_model

PROBLEMS = {
    "a": {
        "name": "MLP 40-100-100-10 on MNIST-1D",
        "model": ("mlp", {"in_features": 40, "num_classes": 10, "width": 100,
                          "depth": 2, "activation": "relu"}),
        "data": ("mnist1d", {}),
        "target": 0.3,
        "max_steps": 2000,
    },
    "b": {
        "name": "small CNN (BatchNorm) on digits",
        "model": ("cnn", {"in_channels": 1, "num_classes": 10, "width": 16,
                          "depth": 4}),
        "data": ("digits", {"flatten": False}),
        "target": 0.02,
        "max_steps": 500,
    },
}  # fmt: skip
GRIDS = {
    "sgd": [0.03, 0.1, 0.3],
    "adam": [0.001, 0.003, 0.01],
    "kfac": [0.03, 0.1, 0.3],
}
BATCH = 128
KFAC_OPTIONS = {
    "momentum": 0.0,
    "fisher": "mc",
    "damping": 0.03,
    "damping_rule": "pi",
    "factor_decay": 0.95,
    "cov_every": 1,
    "inv_every": 10,
}


def make_optimizer(kind: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return KFAC(model, lr=lr, **KFAC_OPTIONS)


@torch.no_grad()
def full_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    try:
        return float(nn.functional.cross_entropy(model(X), y))
    finally:
        model.train()


def run(problem: dict, data, kind: str, lr: float, seed: int, every: int) -> dict:
    name, options = problem["model"]
    X, y = data
    model = zoo_model(name, seed=seed, **options).to(X.device)
    opt = make_optimizer(kind, model, lr)
    gen = torch.Generator().manual_seed(seed)
    seconds, losses = 0.0, [full_loss(model, X, y)]
    reached = None
    for step in range(1, problem["max_steps"] + 1):
        idx = torch.randint(0, X.shape[0], (BATCH,), generator=gen)
        start = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        try:
            loss.backward()  # K-FAC raises on non-finite outputs
        except FloatingPointError:
            break
        if not math.isfinite(loss.item()):
            break
        opt.step()
        sync(X.device)
        seconds += time.perf_counter() - start
        if step % every == 0:
            losses.append(full_loss(model, X, y))
            if losses[-1] <= problem["target"]:
                reached = {"steps": step, "seconds": seconds}
                break
    return {
        "reached": reached is not None,
        "steps": reached["steps"] if reached else math.inf,
        "seconds": reached["seconds"] if reached else math.inf,
        "seconds_per_step": seconds / step,
        "final_loss": losses[-1],
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--problems", default="a,b")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=DEFAULT_DEVICE)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out = args.out or str(
        Path(__file__).parent / "results" / f"kfac_{device.type}.json"
    )
    began = time.perf_counter()
    results: dict = {}
    for key in args.problems.split(","):
        problem = PROBLEMS[key]
        X, y = dataset(problem["data"][0], split="train", **problem["data"][1])
        data = X.to(device), y.to(device)
        runs: dict = {}
        for seed in range(args.seeds):  # seeds outermost: drift hits all alike
            for kind, grid in GRIDS.items():
                for lr in grid:
                    r = run(problem, data, kind, lr, seed, args.every)
                    runs.setdefault(kind, {}).setdefault(str(lr), []).append(r)
        best = {}
        for kind, by_lr in runs.items():
            summary = {
                lr: {
                    "median_steps": median([r["steps"] for r in rs]),
                    "median_seconds": median([r["seconds"] for r in rs]),
                    "median_seconds_per_step": median(
                        [r["seconds_per_step"] for r in rs]
                    ),
                    "reached": sum(r["reached"] for r in rs),
                }
                for lr, rs in by_lr.items()
            }
            lr = min(
                summary,
                key=lambda k: (
                    summary[k]["median_steps"],
                    summary[k]["median_seconds"],
                ),
            )
            best[kind] = {"lr": float(lr), **summary[lr], "grid": summary}
        base = best["sgd"]
        for b in best.values():
            b["steps_ratio_to_sgd"] = b["median_steps"] / base["median_steps"]
            b["seconds_ratio_to_sgd"] = b["median_seconds"] / base["median_seconds"]
            b["seconds_per_step_ratio_to_sgd"] = (
                b["median_seconds_per_step"] / base["median_seconds_per_step"]
            )
        results[key] = {
            "problem": problem["name"],
            "target_train_loss": problem["target"],
            "max_steps": problem["max_steps"],
            "best": best,
            "runs": runs,
        }
        print(f"({key}) {problem['name']}: train loss <= {problem['target']}")
        print(
            "  optimizer  lr      reached  steps  seconds  s/step(ms)  "
            "steps/SGD  seconds/SGD"
        )
        for kind, b in best.items():
            print(
                f"  {kind:<9}  {b['lr']:<6g}  {b['reached']}/{args.seeds}      "
                f"{b['median_steps']:<5g}  {b['median_seconds']:<7.3f}  "
                f"{1e3 * b['median_seconds_per_step']:<10.2f}  "
                f"{b['steps_ratio_to_sgd']:<9.2f}  {b['seconds_ratio_to_sgd']:.2f}"
            )
    atomic_write_json(
        args.out,
        jsonable(
            {
                "benchmark": "kfac",
                "benchmark_seconds": time.perf_counter() - began,
                "machine": machine_facts(device),
                "seeds": args.seeds,
                "every": args.every,
                "batch_size": BATCH,
                "grids": GRIDS,
                "kfac": KFAC_OPTIONS,
                "sgd_momentum": 0.9,
                "problems": results,
            }
        ),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
