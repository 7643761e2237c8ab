"""HVP cost: one HVP relative to one gradient, two backends, and batching 8 vectors.

Cases: (a) tiny MLP on sklearn digits, (b) small CNN with BatchNorm on digits
(8x8 images), (c) CIFAR-style ResNet-20 (width 16) on a fixed random 3x32x32 batch
of 128. All in float32, eval mode. Targets: the Hessian operator's HVP (the graph
kept) <= 2x a gradient on every case; 8 vectors in one batched call >= 1.5x the
throughput of 8 single calls.

Every ratio compares two timings taken in the same run, interleaved, as the median
of several repeats. Results with the machine facts go to benchmarks/results/.

With ``--profile`` (CPU), each case also records where one operator HVP and one
gradient spend their time (``torch.profiler``, self CPU time): in convolutions
(every ``aten`` operator whose name holds "convolution", including the transposed
ones inside ``aten::_convolution``) and in everything else. The ratio of the
convolution times is the floor of HVP / gradient that no change outside the
convolution kernels can go below.

Usage: python benchmarks/hvp.py [--repeats N] [--profile] [--device cpu|cuda]
[--out benchmarks/results/hvp_<device>.json]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn

import lossgeom as lg
from _machine import DEFAULT_DEVICE, machine_facts, timed
from lossgeom._io import atomic_write_json
from lossgeom.zoo import cifar_resnet, digits, mlp

from _models import DigitsCNN


def make_cases(device):
    torch.manual_seed(0)
    X, y = digits("train")
    Xi = X.view(-1, 1, 8, 8)
    gen = torch.Generator().manual_seed(0)
    Xc = torch.randn(128, 3, 32, 32, generator=gen)
    yc = torch.randint(0, 10, (128,), generator=gen)
    return {
        "a_mlp_digits": (mlp(64, 10, width=32), X, y),
        "b_cnn_bn_digits": (DigitsCNN(), Xi, y),
        "c_resnet20_random128": (cifar_resnet(20, width=16), Xc, yc),
    }


def profile_split(fn):
    """Self CPU seconds of ``fn()``: in convolution operators, and in all."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / 1e6
    return {"convolution_seconds": conv, "total_seconds": total}


def measure(name, model, X, y, device, repeats, profile=False):
    model = model.to(device).eval()
    X, y = X.to(device), y.to(device)
    loss_fn = nn.CrossEntropyLoss()
    objs = {
        b: lg.Objective(model, loss_fn, (X, y), hvp_backend=b)
        for b in ("forward-over-reverse", "double-backward")
    }
    fr, db = objs["forward-over-reverse"], objs["double-backward"]
    gen = torch.Generator(device=device).manual_seed(1)
    V = torch.randn(fr.dim, 8, generator=gen, device=device)
    v = V[:, 0].contiguous()

    def plain_backward():
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    H = lg.hessian(db)  # fixed parameters: keeps the gradient's graph
    tasks = {
        "grad_plain_torch": plain_backward,
        "grad": lambda: fr.grad(),
        "hvp_forward_over_reverse": lambda: fr.hvp(v),
        "hvp_double_backward": lambda: db.hvp(v),
        "hvp_operator_kept_graph": lambda: H @ v,
        "hvp8_block_forward_over_reverse": lambda: fr.hvp(V),
        "hvp8_block_double_backward": lambda: db.hvp(V),
        "hvp8_operator_kept_graph": lambda: H @ V,
    }
    for fn in tasks.values():  # warm-up
        fn()
    samples = {k: [] for k in tasks}
    for _ in range(repeats):  # interleaved, so load changes hit all alike
        for key, fn in tasks.items():
            samples[key].append(timed(fn, device)[0])
    model.zero_grad(set_to_none=True)
    t = {k: statistics.median(s) for k, s in samples.items()}
    assert H.cached, "the benchmark expects the Hessian operator to keep its graph"
    best_single = min(t["hvp_forward_over_reverse"], t["hvp_double_backward"])
    extra = {}
    if profile and device.type == "cpu":
        split = {"hvp": profile_split(lambda: H @ v), "grad": profile_split(fr.grad)}
        conv = [split[k]["convolution_seconds"] for k in ("hvp", "grad")]
        extra["profile"] = dict(
            split,
            convolution_hvp_over_grad=conv[0] / conv[1] if conv[1] else None,
        )
    return {
        "case": name,
        "d": fr.dim,
        "n_samples": X.shape[0],
        "seconds": t,
        "hvp_over_grad_forward_over_reverse": t["hvp_forward_over_reverse"] / t["grad"],
        "hvp_over_grad_double_backward": t["hvp_double_backward"] / t["grad"],
        "hvp_over_grad_operator_kept_graph": t["hvp_operator_kept_graph"] / t["grad"],
        "hvp_over_plain_torch_grad_double_backward": t["hvp_double_backward"]
        / t["grad_plain_torch"],
        "hvp_cache_bytes": H.cache_nbytes,
        "block8_throughput_vs_8_single_forward_over_reverse": 8
        * t["hvp_forward_over_reverse"]
        / t["hvp8_block_forward_over_reverse"],
        "block8_throughput_vs_8_single_double_backward": 8
        * t["hvp_double_backward"]
        / t["hvp8_block_double_backward"],
        "block8_throughput_vs_8_best_single": 8
        * best_single
        / min(t["hvp8_block_forward_over_reverse"], t["hvp8_block_double_backward"]),
        "block8_operator_vs_8_single_double_backward": 8
        * t["hvp_double_backward"]
        / t["hvp8_operator_kept_graph"],
        "repeats": repeats,
        **extra,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=DEFAULT_DEVICE)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [
        measure(n, m, X, y, device, args.repeats, args.profile)
        for n, (m, X, y) in make_cases(device).items()
    ]
    print(
        "HVP time / gradient time, and throughput of one block of 8 vectors / 8 single calls"
    )
    print(
        f"{'case':22} {'d':>7} | {'fwd-rev':>7} {'dbl-bwd':>7} {'H kept':>7} | "
        f"{'blk fwd-rev':>11} {'blk dbl-bwd':>11} {'blk H kept':>10}"
    )
    for r in rows:
        print(
            f"{r['case']:22} {r['d']:>7} | {r['hvp_over_grad_forward_over_reverse']:>7.2f} "
            f"{r['hvp_over_grad_double_backward']:>7.2f} {r['hvp_over_grad_operator_kept_graph']:>7.2f} | "
            f"{r['block8_throughput_vs_8_single_forward_over_reverse']:>10.2f}x "
            f"{r['block8_throughput_vs_8_single_double_backward']:>10.2f}x "
            f"{r['block8_operator_vs_8_single_double_backward']:>9.2f}x"
        )
    for r in rows:
        if "profile" in r:
            pr = r["profile"]
            print(
                f"{r['case']:22} convolutions: HVP {pr['hvp']['convolution_seconds']:.3f}"
                f" of {pr['hvp']['total_seconds']:.3f} s, gradient "
                f"{pr['grad']['convolution_seconds']:.3f} of "
                f"{pr['grad']['total_seconds']:.3f} s (profiled)"
            )
    out = Path(
        args.out or Path(__file__).parent / "results" / f"hvp_{device.type}.json"
    )
    targets = {
        "hvp_le_2x_grad": all(
            r["hvp_over_grad_operator_kept_graph"] <= 2 for r in rows
        ),
        "block8_ge_1.5x": all(
            r["block8_operator_vs_8_single_double_backward"] >= 1.5 for r in rows
        ),
    }
    atomic_write_json(
        out,
        {
            "benchmark": "hvp",
            "machine": machine_facts(device, dtype="float32"),
            "results": rows,
            "targets": targets,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
