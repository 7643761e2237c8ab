"""Top-1 and top-5 eigenvalues, trace and density: lossgeom against PyHessian and eigsh.

Cases (float32 models, eval mode):
  (a) tanh MLP 64-32-32-10 on the first 512 sklearn digits (d = 3,466); reference:
      the dense float64 Hessian's eigenvalues;
  (b) small CNN with BatchNorm on the first 512 digits (d = 10,026); reference:
      lossgeom in float64 with eigenvalue error bounds below 1e-11 of the scale;
  (c) CIFAR-style ResNet-20 (width 16) on a fixed random 3x32x32 batch of 128
      (d = 272,474); reference as for (b).

Eigenvalues, for k = 1 and k = 5, all judged by the same accuracy: the largest
error of the k values relative to the largest eigenvalue, against the reference
(``--goal``, default 1e-6). Counted in Hessian-vector products and seconds (median
of ``--repeats`` runs; one run on (c)):
  * PyHessian (PyPI ``pyhessian`` 0.1) at its defaults (deflated power iteration,
    ``maxIter=100, tol=1e-3``), whatever accuracy that gives; on (c) its top-5 runs
    only with ``--pyhessian-top5`` (it takes very long there);
  * curvlinops' ``HessianLinearOperator`` with ``scipy.sparse.linalg.eigsh(which=
    "LA")``, its ``tol`` lowered (1e-2, 1e-3, ...) until the goal is met;
  * lossgeom ``eigenvalues(k, tol=goal, criterion="value")`` with the verification
    search (the default) and without it: stops when every eigenvalue's certified
    error bound ``min(r, r^2/gap)`` is below ``goal`` times the scale, residuals
    recomputed explicitly; and ``method="lobpcg"`` (residual criterion) at
    ``tol = sqrt(goal)``, the residual that gives about ``goal`` in the values.
Trace: PyHessian's Hutchinson at its defaults against ``lg.trace(H, 100)``.
Density: PyHessian's SLQ against ``lg.density`` at the same probes and steps; its
SLQ needs ``torch.eig``, removed from torch, so we patch it to
``torch.linalg.eigh`` (the only change).

Install the two baselines without their torchvision dependency (it would replace
torch): ``pip install --no-deps pyhessian curvlinops-for-pytorch
backpack-for-pytorch einops einconv linear_operator opt-einsum jaxtyping``.

Every method runs on ``--device`` (default: CUDA when present), models, data and
the float64 references alike; PyHessian with ``cuda=True`` there, eigsh's vectors
moved between NumPy and the device by curvlinops. Timings synchronise the device.
Results go to ``benchmarks/results/spectra_<device>.json``.

Usage: python benchmarks/spectra.py [--cases a,b,c] [--goal 1e-6] [--repeats 3]
[--device cpu|cuda] (rows of cases not run are kept from the existing results file)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lossgeom as lg
from _machine import DEFAULT_DEVICE, machine_facts, sync, timed
from lossgeom._io import atomic_write_json
from lossgeom.zoo import cifar_resnet, digits

from _models import DigitsCNN


def make_case(name):
    torch.manual_seed(0)
    X, y = digits("train")
    X, y = X[:512], y[:512]
    if name == "a":
        model = nn.Sequential(
            nn.Linear(64, 32),
            nn.Tanh(),
            nn.Linear(32, 32),
            nn.Tanh(),
            nn.Linear(32, 10),
        )
        return "a_tanh_mlp_digits512", model, X, y
    if name == "b":
        with torch.no_grad():
            model = DigitsCNN()
            model(
                X.view(-1, 1, 8, 8)
            )  # BatchNorm buffers stay at their defaults in eval
        return "b_cnn_bn_digits512", model, X.view(-1, 1, 8, 8), y
    gen = torch.Generator().manual_seed(0)
    Xc = torch.randn(128, 3, 32, 32, generator=gen)
    yc = torch.randint(0, 10, (128,), generator=gen)
    return "c_resnet20_random128", cifar_resnet(20, width=16), Xc, yc


@contextlib.contextmanager
def count_pyhessian_hvps(counter):
    import importlib
    import sys

    importlib.import_module("pyhessian")
    ph = sys.modules[
        "pyhessian.hessian"
    ]  # the module (the package exports a class of that name)
    original = ph.hessian_vector_product

    def counted(gradsH, params, v):
        counter[0] += 1
        return original(gradsH, params, v)

    ph.hessian_vector_product = counted
    try:
        yield
    finally:
        ph.hessian_vector_product = original


@contextlib.contextmanager
def torch_eig_patched():
    """PyHessian's density calls torch.eig (removed in torch 2.x); map it to eigh."""

    def eig(T, eigenvectors=False):
        w, V = torch.linalg.eigh(T)
        return torch.stack([w, torch.zeros_like(w)], 1), V

    had = hasattr(torch, "eig")
    old = getattr(torch, "eig", None)
    torch.eig = eig
    try:
        yield
    finally:
        if had:
            torch.eig = old
        else:
            del torch.eig


def rel_err(values, truth):
    """Largest error of the sorted values, relative to the largest |eigenvalue|."""
    v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    t = np.sort(np.asarray(truth, dtype=np.float64))[::-1][: v.size]
    if v.size != t.size:
        return float("inf")
    return float(np.max(np.abs(v - t)) / np.max(np.abs(t)))


def reference(name, model, X, y, loss_fn, k=5):
    """Top-k eigenvalues in float64: dense on (a), certified Lanczos otherwise."""
    obj64 = lg.Objective(model, loss_fn, (X, y), dtype=torch.float64)
    if name.startswith("a_"):
        H = lg.hessian(obj64).to_dense(chunk_size=256)
        ev = torch.linalg.eigvalsh((H + H.T) / 2)
        return ev.flip(0)[:k].tolist(), float(ev.sum()), "dense float64"
    res = lg.eigenvalues(obj64, k, tol=1e-11, criterion="value", max_matvecs=3000)
    assert res.all_converged, res.details["stopped"]
    kind = "lossgeom Lanczos float64, eigenvalue error bounds <= 1e-11 of the scale"
    return res.values.tolist(), None, kind


def median_run(fn, repeats, device):
    """``fn()`` ``repeats`` times: its last output and the median seconds."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


def pyhessian_top(model, loss_fn, X, y, k, repeats):
    from pyhessian import hessian as PyHessian

    counter = [0]

    def run():
        counter[0] = 0
        with count_pyhessian_hvps(counter):
            ph = PyHessian(model, loss_fn, data=(X, y), cuda=X.is_cuda)
            return ph.eigenvalues(top_n=k)[0]

    vals, sec = median_run(run, repeats, X.device)
    return {"values": [float(v) for v in vals], "matvecs": counter[0], "seconds": sec}


def eigsh_ladder(model, loss_fn, X, y, k, truth, goal, repeats):
    """curvlinops + eigsh, its tol lowered until the values are within ``goal``."""
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(
        model, loss_fn, params, [(X, y)], check_deterministic=False
    ).to_scipy()
    calls = [0]

    def mv(v):
        calls[0] += 1
        return op @ v

    counted = LinearOperator(op.shape, matvec=mv, dtype=np.float32)
    v0 = np.random.default_rng(0).standard_normal(op.shape[0]).astype(np.float32)
    tried = []
    for tol in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 0):

        def run(tol=tol):
            calls[0] = 0
            return eigsh(
                counted, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False
            )

        ev, sec = median_run(run, repeats, X.device)
        tried.append(
            {
                "tol": tol,
                "matvecs": calls[0],
                "seconds": sec,
                "values": sorted(ev.tolist(), reverse=True),
                "rel_err": rel_err(ev, truth),
            }
        )
        if tried[-1]["rel_err"] <= goal:
            break
    return dict(tried[-1], tried=tried)


def lossgeom_top(H, k, tol, verify, truth, repeats, method="lanczos"):
    """Lanczos with the value criterion; LOBPCG (residual criterion) at ``tol``."""
    kw = {"criterion": "value"} if method == "lanczos" else {}
    res, sec = median_run(
        lambda: lg.eigenvalues(H, k, tol=tol, verify=verify, method=method, **kw),
        repeats,
        H.device,
    )
    return {
        "values": res.values.tolist(),
        "matvecs": res.cost.matvecs,
        "seconds": sec,
        "converged": res.all_converged,
        "max_error_bound_over_scale": float(
            res.error_bounds.max() / res.spectral_scale
        ),
        "rel_err": rel_err(res.values.tolist(), truth),
        "stopped": res.details.get("stopped"),
        "verify_rounds": res.details.get("verify_rounds"),
    }


def eigen_rows(model, loss_fn, X, y, H, truth5, args, big):
    """Top-1 and top-5 by all three at equal accuracy (``args.goal``)."""
    out = {}
    reps = 1 if big else args.repeats
    for k in (1, 5):
        truth = truth5[:k]
        row = {"reference": truth}
        if k == 1 or not big or args.pyhessian_top5:
            ph = pyhessian_top(model, loss_fn, X, y, k, reps)
            row["pyhessian"] = dict(ph, rel_err=rel_err(ph["values"], truth))
        row["eigsh"] = eigsh_ladder(model, loss_fn, X, y, k, truth, args.goal, reps)
        for verify in (True, False):
            key = "lossgeom" if verify else "lossgeom_unverified"
            row[key] = lossgeom_top(H, k, args.goal, verify, truth, reps)
        row["lossgeom_lobpcg"] = lossgeom_top(
            H, k, args.goal**0.5, True, truth, reps, method="lobpcg"
        )
        lgr, es = row["lossgeom"], row["eigsh"]
        row["products_over_eigsh"] = lgr["matvecs"] / es["matvecs"]
        row["products_over_eigsh_unverified"] = (
            row["lossgeom_unverified"]["matvecs"] / es["matvecs"]
        )
        if "pyhessian" in row:
            row["seconds_over_pyhessian"] = lgr["seconds"] / row["pyhessian"]["seconds"]
        out[f"top{k}"] = row
    if "pyhessian" in out["top1"]:  # five certified against PyHessian's one
        out["top5_certified_over_pyhessian_top1_seconds"] = (
            out["top5"]["lossgeom"]["seconds"] / out["top1"]["pyhessian"]["seconds"]
        )
    return out


def run_case(key, args):
    from pyhessian import hessian as PyHessian

    device = torch.device(args.device)
    name, model, X, y = make_case(key)
    model, X, y = model.to(device).eval(), X.to(device), y.to(device)
    cuda = device.type == "cuda"
    loss_fn = nn.CrossEntropyLoss()
    big = key == "c"
    truth5, trace_ref, ref_kind = reference(name, model, X, y, loss_fn)
    row = {
        "case": name,
        "d": sum(p.numel() for p in model.parameters()),
        "reference": ref_kind,
        "accuracy_goal": args.goal,
        "repeats": 1 if big else args.repeats,
    }
    obj = lg.Objective(model, loss_fn, (X, y))
    H = lg.hessian(obj)
    row.update(eigen_rows(model, loss_fn, X, y, H, truth5, args, big))

    # trace: PyHessian's Hutchinson at its defaults against lossgeom's
    counter = [0]
    with count_pyhessian_hvps(counter):
        # PyHessian's set-up (its gradient with create_graph) is part of the time
        sec, tr = timed(
            lambda: PyHessian(model, loss_fn, data=(X, y), cuda=cuda).trace(), device
        )
        row["pyhessian_trace"] = {
            "value": float(np.mean(tr)),
            "matvecs": counter[0],
            "seconds": sec,
            "abs_err": abs(float(np.mean(tr)) - trace_ref) if trace_ref else None,
        }
    sec, tres = timed(lambda: lg.trace(H, 100), device)
    row["lossgeom_trace"] = {
        "value": tres.value,
        "stderr": tres.stderr,
        "method": tres.method,
        "matvecs": tres.cost.matvecs,
        "seconds": sec,
        "abs_err": abs(tres.value - trace_ref) if trace_ref else None,
        "within_2_stderr": abs(tres.value - trace_ref) <= 2 * tres.stderr
        if trace_ref
        else None,
    }

    # density: same probes and steps
    counter[0] = 0
    with count_pyhessian_hvps(counter), torch_eig_patched():
        ph = PyHessian(model, loss_fn, data=(X, y), cuda=cuda)
        sec, _ = timed(
            lambda: ph.density(iter=args.density_steps, n_v=args.density_probes),
            device,
        )
        row["pyhessian_density"] = {"matvecs": counter[0], "seconds": sec}
    sec, dens = timed(
        lambda: lg.density(H, args.density_probes, args.density_steps), device
    )
    row["lossgeom_density"] = {"matvecs": dens.cost.matvecs, "seconds": sec}
    row["density_probes_steps"] = [args.density_probes, args.density_steps]
    row["density_speedup_over_pyhessian"] = (
        row["pyhessian_density"]["seconds"] / row["lossgeom_density"]["seconds"]
    )
    return row


def targets(rows):
    """Whether each target holds on every case and both k."""
    tops = [r[k] for r in rows for k in ("top1", "top5")]
    timed = [t for t in tops if "seconds_over_pyhessian" in t]
    return {
        "products_le_eigsh": all(t["products_over_eigsh"] <= 1 for t in tops),
        "products_le_eigsh_unverified": all(
            t["products_over_eigsh_unverified"] <= 1 for t in tops
        ),
        "seconds_le_third_of_pyhessian": all(
            t["seconds_over_pyhessian"] <= 1 / 3 for t in timed
        ),
        "density_1.5x_pyhessian": all(
            r["density_speedup_over_pyhessian"] >= 1.5 for r in rows
        ),
    }


def versions():
    out = {}
    for pkg in (
        "torch",
        "numpy",
        "scipy",
        "pyhessian",
        "curvlinops-for-pytorch",
        "lossgeom",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="a,b,c")
    parser.add_argument("--goal", type=float, default=1e-6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pyhessian-top5", action="store_true")
    parser.add_argument("--density-probes", type=int, default=2)
    parser.add_argument("--density-steps", type=int, default=20)
    parser.add_argument("--device", default=DEFAULT_DEVICE)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.out = args.out or str(
        Path(__file__).parent / "results" / f"spectra_{device.type}.json"
    )
    rows = []
    fmt = lambda e: "n/a" if e is None else f"{e:.1e}"  # noqa: E731
    for key in args.cases.split(","):
        row = run_case(key.strip(), args)
        rows.append(row)
        for k in ("top1", "top5"):
            r = row[k]
            parts = [f"{row['case']:22} {k}"]
            for who in (
                "pyhessian",
                "eigsh",
                "lossgeom",
                "lossgeom_unverified",
                "lossgeom_lobpcg",
            ):
                if who in r:
                    e = r[who]
                    parts.append(
                        f"{who} {e['matvecs']:>4} HVP {e['seconds']:6.2f}s "
                        f"err {fmt(e['rel_err'])}"
                    )
            print(" | ".join(parts), flush=True)
        pd, ld = row["pyhessian_density"], row["lossgeom_density"]
        print(
            f"{'':22} density {args.density_probes}x{args.density_steps}: PyHessian "
            f"{pd['seconds']:.1f}s | lossgeom {ld['seconds']:.1f}s",
            flush=True,
        )
    machine = machine_facts(
        device, versions=versions(), dtype="float32 (references float64)"
    )
    out = Path(args.out)
    if out.is_file():  # keep the other cases' rows (each row has its own date)
        done = {r["case"] for r in rows}
        kept = [
            r
            for r in json.loads(out.read_text())["results"]
            if r["case"] not in done and "top1" in r
        ]
        rows = sorted(kept + rows, key=lambda r: r["case"])
    for r in rows:
        r.setdefault("date", machine["date"])
    atomic_write_json(
        out,
        {
            "benchmark": "spectra",
            "machine": machine,
            "results": rows,
            "targets": targets(rows),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
