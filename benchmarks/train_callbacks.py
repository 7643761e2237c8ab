"""Cost of the sharpness callback during training, as a ratio to plain training.

Trains the zoo's small CNN on sklearn digits (1x8x8 images) with SGD twice in the
same process: once with no callbacks (the baseline) and once with the callbacks
every 50 steps (train/test loss and accuracy, gradient norm and the warm-started
top Hessian eigenvalue on the probe set). Reports seconds per step of each and the
ratio; the target is at most 1.3x. Results go to
``benchmarks/results/train_callbacks_cpu.json`` with the machine facts.

Usage: python benchmarks/train_callbacks.py [--steps 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import lossgeom as lg
from lossgeom._io import atomic_write_json


def config(steps: int, metrics: dict | None) -> dict:
    return {
        "name": "bench",
        "model": {"name": "cnn", "options": {"width": 16, "depth": 4}},
        "data": {"name": "digits", "options": {"flatten": False}},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "steps": steps,
        "batch_size": 128,
        "metrics": metrics,
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
    parser.add_argument(
        "--out",
        default=str(Path(__file__).parent / "results" / "train_callbacks_cpu.json"),
    )
    args = parser.parse_args()
    metrics = {"every": args.every, "trace_matvecs": 0}
    plain, probed, rows = [], [], []
    timed(config(20, None))  # warm-up
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        plain.append(timed(config(args.steps, None))[0])
        t, rows = timed(config(args.steps, metrics))
        probed.append(t)
    p, q = min(plain), min(probed)
    ratio = q / p
    matvecs = [r["sharpness_matvecs"] for r in rows]
    print(
        f"small CNN, {args.steps} SGD steps, callbacks every {args.every}: plain "
        f"{1e3 * p / args.steps:.2f} ms/step, with callbacks {1e3 * q / args.steps:.2f} "
        f"ms/step, ratio {ratio:.2f} (target <= 1.3); sharpness matvecs per "
        f"measurement: mean {sum(matvecs) / len(matvecs):.1f}, max {max(matvecs)}"
    )
    atomic_write_json(
        args.out,
        {
            "benchmark": "train_callbacks",
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            "steps": args.steps,
            "every": args.every,
            "seconds_plain": plain,
            "seconds_with_callbacks": probed,
            "ratio_best_of": ratio,
            "target_ratio": 1.3,
            "sharpness_matvecs": matvecs,
            "sharpness": [r["sharpness"] for r in rows],
            "sharpness_converged": [r["sharpness_converged"] for r in rows],
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
