"""Cost against model size: what curvature costs relative to training, per model.

Models (float32, or ``--dtype float64``; eval mode, cross-entropy, one batch of 32
samples, 10 classes):
  * ``mlp-w32`` ... ``mlp-w2048``: ``zoo.mlp(64, 10, width=W)`` on the first 32
    sklearn digits (d = 2,410 to 153,610);
  * ``resnet20``, ``resnet56``: ``zoo.cifar_resnet(depth, width=16)`` and
    ``resnet18``: ``zoo.resnet(18)`` (d = 11,173,962), on a fixed random batch of
    3x32x32 inputs and labels from a seeded ``torch.Generator``.

Per model, with ``obj = lg.Objective(model, loss_fn, (X, y))`` and
``H = lg.hessian(obj)``:
  * time of one gradient ``obj.grad()`` (the baseline; a plain ``loss.backward()``
    for reference) and of one HVP, ``H @ v`` (the operator keeps the gradient's
    graph) and ``obj.hvp(v)`` (recomputes it): medians of interleaved repeats after
    a warm-up (at most 3 repeats above a million parameters); ratio HVP / gradient;
  * ``lg.eigenvalues(H, 5, tol=1e-6, criterion="value")`` (up to ``--top5-max-d``
    parameters) and the same for ``k=1`` (up to ``--top1-max-d``): the top
    eigenvalues with certified error bounds below 1e-6 of the scale; products
    (``res.cost.matvecs``), seconds (one run on a fresh operator, so building the
    kept graph is included) and ``res.all_converged``;
  * peak memory of one training step (forward, backward, SGD step, all in eval
    mode), of one HVP ``H @ v`` (with building the kept graph) and of each
    eigenvalue run, and the ratios of the latter two to the training step.

Memory: every measurement runs in its own freshly spawned process that builds the
model, data and operator, then does the one operation. Before that, the process
runs one training step and one HVP on a second copy of the model and data (and
drops it) and a top-5 eigenvalue run on a small dense matrix, so one-time set-up
(thread pools, kernels, the autograd engine, BLAS buffers) is not counted. On CUDA
the peak is ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()`` less ``memory_allocated()`` before. On CPU it is the
process's peak resident set size (``VmHWM`` in ``/proc/self/status``, reset by
writing 5 to ``/proc/self/clear_refs`` just before the operation) less its
resident size then (after ``gc.collect()`` and ``malloc_trim``); where
``clear_refs`` is not writable, ``ru_maxrss`` after less the resident size before.
Either way it is the memory the operation needs on top of the model and the data
(on CPU including allocator slack, about 2 MiB for an eigenvalue run, which
dominates on the smallest models). ``peak_bytes_eigen`` is the top-5 run's, or
the top-1 run's where top-5 is skipped. The eigenvalue runs are timed in those
same processes.

``--threads`` sets torch's threads here and in every child (default: torch's).

Usage: python benchmarks/cost_curve.py [--sizes mlp-w32,...,resnet18] [--repeats 10]
[--top5-max-d 1e6] [--top1-max-d inf] [--threads N] [--device cuda] [--out PATH]
[--dtype float64] (rows of other sizes and dtypes are kept from the existing
results file; each row records its dtype)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import multiprocessing as mp
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn

import lossgeom as lg
from _machine import DEFAULT_DEVICE, machine_facts, sync, timed
from lossgeom._io import atomic_write_json
from lossgeom.linalg import DenseOperator
from lossgeom.zoo import cifar_resnet, digits, mlp, resnet

SIZES = {  # name: (family, factory)
    "mlp-w32": ("mlp", lambda: mlp(64, 10, width=32, seed=0)),
    "mlp-w128": ("mlp", lambda: mlp(64, 10, width=128, seed=0)),
    "mlp-w512": ("mlp", lambda: mlp(64, 10, width=512, seed=0)),
    "mlp-w2048": ("mlp", lambda: mlp(64, 10, width=2048, seed=0)),
    "resnet20": ("resnet", lambda: cifar_resnet(20, width=16, seed=0)),
    "resnet56": ("resnet", lambda: cifar_resnet(56, width=16, seed=0)),
    "resnet18": ("resnet", lambda: resnet(18, seed=0)),
}
BATCH = 32
TOL = 1e-6


def build(name, device, dtype):
    """Model (eval mode), loss, data, objective, Hessian operator and a vector.

    ``dtype``: "float32" or "float64", for the model, the inputs and the vector.
    """
    family, factory = SIZES[name]
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    model = factory().to(device, dtype).eval()
    if family == "mlp":
        X, y = digits("train")
        X, y = X[:BATCH], y[:BATCH]
    else:
        gen = torch.Generator().manual_seed(0)
        X = torch.randn(BATCH, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
    X, y = X.to(device, dtype), y.to(device)
    loss_fn = nn.CrossEntropyLoss()
    obj = lg.Objective(model, loss_fn, (X, y))
    gen = torch.Generator(device=device).manual_seed(1)
    v = torch.randn(obj.dim, generator=gen, device=device, dtype=dtype)
    return model, loss_fn, X, y, obj, lg.hessian(obj), v


def _status_kb(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


class PeakMeter:
    """Peak memory of what runs between ``start()`` and ``stop()``, in bytes."""

    def __init__(self, device):
        self.device = device

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = _status_kb("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets the peak resident size (VmHWM)
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"

    def stop(self):
        sync(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.method == "VmHWM":
            peak = _status_kb("VmHWM") * 1024
        else:  # Linux reports ru_maxrss in KiB
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(peak - self.base, 0)


def measure_child(name, device, what, threads, dtype):
    """In a fresh process: peak memory (and for eigenvalues, cost) of ``what``."""
    torch.set_num_threads(threads)
    device = torch.device(device)

    def operations(model, loss_fn, X, y, obj, H, v):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def train_step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(X), y).backward()
            opt.step()

        return {
            "train_step": train_step,
            "hvp": lambda: H @ v,
            "top5": lambda: lg.eigenvalues(H, 5, tol=TOL, criterion="value"),
            "top1": lambda: lg.eigenvalues(H, 1, tol=TOL, criterion="value"),
        }

    warm = operations(*build(name, device, dtype))  # one-time set-up: threads, kernels
    warm["train_step"]()
    warm["hvp"]()
    del warm
    gen = torch.Generator(device=device).manual_seed(2)
    A = torch.randn(300, 300, generator=gen, device=device, dtype=getattr(torch, dtype))
    lg.eigenvalues(DenseOperator(A + A.T), 5, tol=TOL, criterion="value")  # warm-up
    ops = operations(*build(name, device, dtype))
    meter = PeakMeter(device)
    meter.start()
    t = time.perf_counter()
    res = ops[what]()
    sync(device)
    out = {"seconds": time.perf_counter() - t, "peak_bytes": int(meter.stop())}
    out["memory_method"] = getattr(meter, "method", "cuda max_memory_allocated")
    if what.startswith("top"):
        out.update(
            matvecs=int(res.cost.matvecs),
            converged=bool(res.all_converged),
            stopped=str(res.details.get("stopped")),
            values=[float(x) for x in res.values],
        )
    return out


def in_child(name, device, what, dtype):
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        args = (name, str(device), what, torch.get_num_threads(), dtype)
        return pool.submit(measure_child, *args).result()


def time_products(name, device, repeats, dtype):
    """Medians of interleaved gradients and HVPs, in this process."""
    model, loss_fn, X, y, obj, H, v = build(name, device, dtype)

    def plain_backward():
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    tasks = {
        "grad": lambda: obj.grad(),
        "grad_plain": plain_backward,
        "hvp": lambda: H @ v,
        "hvp_objective": lambda: obj.hvp(v),
    }
    for fn in tasks.values():  # warm-up; the first H @ v builds the kept graph
        fn()
    samples = {k: [] for k in tasks}
    for _ in range(repeats):  # interleaved, so load changes hit all alike
        for key, fn in tasks.items():
            samples[key].append(timed(fn, device)[0])
    model.zero_grad(set_to_none=True)
    t = {k: statistics.median(s) for k, s in samples.items()}
    return obj.dim, t, bool(H.cached), int(H.cache_nbytes)


def measure(name, device, args):
    start = time.perf_counter()
    d = sum(p.numel() for p in SIZES[name][1]().parameters())
    repeats = args.repeats if d <= 1e6 else min(args.repeats, 3)
    d, t, cached, graph_bytes = time_products(name, device, repeats, args.dtype)
    train = in_child(name, device, "train_step", args.dtype)
    hvp = in_child(name, device, "hvp", args.dtype)
    row = {
        "model": name,
        "family": SIZES[name][0],
        "dtype": args.dtype,
        "d": d,
        "batch": BATCH,
        "grad_seconds": t["grad"],
        "grad_plain_seconds": t["grad_plain"],
        "hvp_seconds": t["hvp"],
        "hvp_objective_seconds": t["hvp_objective"],
        "hvp_over_grad": t["hvp"] / t["grad"],
        "hvp_objective_over_grad": t["hvp_objective"] / t["grad"],
        "hessian_kept_graph": cached,
        "kept_graph_bytes": graph_bytes,
    }
    eig = {}
    for k, limit in ((5, args.top5_max_d), (1, args.top1_max_d)):
        e = in_child(name, device, f"top{k}", args.dtype) if d <= limit else None
        eig[k] = e
        row[f"top{k}_matvecs"] = e and e["matvecs"]
        row[f"top{k}_seconds"] = e and e["seconds"]
        row[f"top{k}_converged"] = e and e["converged"]
        row[f"top{k}_stopped"] = e and e["stopped"]
        row[f"top{k}_values"] = e and e["values"]
        row[f"peak_bytes_top{k}"] = e and e["peak_bytes"]
    main = eig[5] or eig[1]
    row.update(
        peak_bytes_train_step=train["peak_bytes"],
        peak_bytes_hvp=hvp["peak_bytes"],
        peak_bytes_eigen=main and main["peak_bytes"],
        eigen_memory_run=("top5" if eig[5] else "top1") if main else None,
        hvp_memory_over_train_step=hvp["peak_bytes"] / train["peak_bytes"],
        eigen_memory_over_train_step=main and main["peak_bytes"] / train["peak_bytes"],
        memory_method=train["memory_method"],
        repeats=repeats,
        wall_seconds=time.perf_counter() - start,
    )
    return row


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_row(r):
    mib = 2.0**20
    print(
        f"{r['model']:10} {r['dtype']:7} {r['d']:>10,} | grad {r['grad_seconds'] * 1e3:8.1f} ms "
        f"HVP/grad {r['hvp_over_grad']:5.2f} (obj.hvp {r['hvp_objective_over_grad']:5.2f})"
        f" | top5 {fmt(r['top5_matvecs'], '>4')} HVP {fmt(r['top5_seconds'], '7.1f')} s"
        f" | top1 {fmt(r['top1_matvecs'], '>4')} HVP {fmt(r['top1_seconds'], '7.1f')} s"
        f" | MiB train {r['peak_bytes_train_step'] / mib:7.1f} "
        f"HVP x{r['hvp_memory_over_train_step']:.2f} "
        f"eig x{fmt(r['eigen_memory_over_train_step'], '.2f')}"
        f" | {r['wall_seconds']:.0f} s",
        flush=True,
    )


def write(out, rows, device):
    done = {(r["model"], r["dtype"]) for r in rows}
    kept = []
    if out.is_file():  # keep the other rows (each row has its own date)
        old = json.loads(out.read_text())["results"]
        for r in old:  # rows without a dtype were all measured in float32
            r.setdefault("dtype", "float32")
        kept = [r for r in old if (r["model"], r["dtype"]) not in done]
    order = list(SIZES)
    rows = sorted(
        kept + rows,
        key=lambda r: (
            order.index(r["model"]) if r["model"] in order else len(order),
            r["dtype"] != "float32",
        ),
    )
    machine = machine_facts(device, dtype="per row (each row's dtype)")
    for r in rows:
        r.setdefault("date", machine["date"])
    atomic_write_json(
        out, {"benchmark": "cost_curve", "machine": machine, "results": rows}
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top5-max-d", type=float, default=1e6)
    parser.add_argument("--top1-max-d", type=float, default=math.inf)
    parser.add_argument("--device", default=DEFAULT_DEVICE)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    out = Path(
        args.out or Path(__file__).parent / "results" / f"cost_curve_{device.type}.json"
    )
    rows = []
    for name in names:
        rows.append(measure(name, device, args))
        print_row(rows[-1])
        write(out, rows, device)  # after every size, so a stopped run keeps its rows
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
