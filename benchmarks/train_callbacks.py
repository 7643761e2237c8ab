"""Cost of the sharpness callback during training, as a ratio to plain training.

Trains the zoo's small CNN on sklearn digits (1x8x8 images, batch 128) with SGD in
one process: with no callbacks (the baseline), and with the callbacks every 50
steps (train/test loss and accuracy, gradient norm and the warm-started top Hessian
eigenvalue on the probe set) at two settings: "cheap" (probe set of one batch, 128
samples; losses on 512 samples) and the defaults of ``MetricsConfig`` (probe set of
1,024 samples, losses on up to 2,048). Reports seconds per step and the ratio to
the baseline; the target is at most 1.3x. The cost of a measurement grows with the
probe set: each Hessian-vector product is about 2.5 gradients of the probe set.
Training runs on ``--device`` (the config's ``device``: CUDA when present). Results
go to ``benchmarks/results/train_callbacks_<device>.json`` with the machine facts.

Usage: python benchmarks/train_callbacks.py [--steps 1000] [--repeats 3]
[--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import lossgeom as lg  # noqa: E402
from _machine import DEFAULT_DEVICE, machine_facts  # noqa: E402
from lossgeom._io import atomic_write_json  # noqa: E402

DEVICE = "cpu"  # set by main()


def config(steps: int, metrics: dict | None) -> dict:
    return {
        "name": "bench",
        "model": {"name": "cnn", "options": {"width": 16, "depth": 4}},
        "data": {"name": "digits", "options": {"flatten": False}},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "steps": steps,
        "batch_size": 128,
        "metrics": metrics,
        "device": DEVICE,
    }


def timed(cfg: dict) -> tuple[float, list[dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        res = lg.train(cfg, Path(tmp) / "run")
        return time.perf_counter() - start, res.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=DEFAULT_DEVICE)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    device = torch.device(DEVICE)
    args.out = args.out or str(
        Path(__file__).parent / "results" / f"train_callbacks_{device.type}.json"
    )
    settings = {
        "cheap": {
            "every": args.every,
            "trace_max_matvecs": 0,
            "probe_samples": 128,
            "eval_samples": 512,
        },
        "cheap_tol_1e-2": {
            "every": args.every,
            "trace_max_matvecs": 0,
            "probe_samples": 128,
            "eval_samples": 512,
            "sharpness_tol": 1e-2,
        },
        "default": {"every": args.every, "trace_max_matvecs": 0},
    }
    plain: list[float] = []
    probed: dict[str, list[float]] = {k: [] for k in settings}
    rows: dict[str, list[dict]] = {}
    timed(config(20, None))  # warm-up
    for _ in range(args.repeats):  # interleaved, so drift hits all alike
        plain.append(timed(config(args.steps, None))[0])
        for key, metrics in settings.items():
            t, rows[key] = timed(config(args.steps, metrics))
            probed[key].append(t)
    p = min(plain)
    summary = {}
    print(
        f"small CNN, {args.steps} SGD steps: plain {1e3 * p / args.steps:.2f} ms/step"
    )
    for key in settings:
        q = min(probed[key])
        mv = [r["sharpness_matvecs"] for r in rows[key]]
        summary[key] = {
            "metrics": settings[key],
            "seconds_with_callbacks": probed[key],
            "ratio_best_of": q / p,
            "sharpness_matvecs": mv,
            "sharpness": [r["sharpness"] for r in rows[key]],
            "sharpness_converged": [r["sharpness_converged"] for r in rows[key]],
        }
        print(
            f"  callbacks every {args.every} ({key}: {settings[key]}): "
            f"{1e3 * q / args.steps:.2f} ms/step, ratio {q / p:.2f} (target <= 1.3); "
            f"sharpness matvecs per measurement: mean {sum(mv) / len(mv):.1f}, "
            f"max {max(mv)}"
        )
    atomic_write_json(
        args.out,
        {
            "benchmark": "train_callbacks",
            "machine": machine_facts(device),
            "steps": args.steps,
            "every": args.every,
            "seconds_plain": plain,
            "target_ratio": 1.3,
            "settings": summary,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
