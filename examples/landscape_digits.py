"""Landscape figures of two small networks trained on sklearn digits.

Trains two ReLU MLPs (64-64-64-10) from different seeds with `lg.train` (SGD with
momentum, checkpoints every 50 steps), then draws what a paper would show:

1. the filter-normalized loss plane spanned by the PCA directions of run A's
   trajectory, with the trajectory on top and its off-plane distance in the title;
2. 1-D filter-normalized slices along 16 random directions (mean, 10-90% band,
   local quadratic model) on the training and the test split;
3. the loss along the straight line from A to B, after permutation alignment
   (weight matching), and along a trained Bezier curve, with their barriers.

Writes docs/landscape_*.png and docs/landscape_digits.json (all numbers). Runs in
about a minute on 2 CPU cores:  .venv/bin/python examples/landscape_digits.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import lossgeom as lg
from lossgeom._io import atomic_write_json

DOCS = Path(__file__).resolve().parent.parent / "docs"
MODEL = {"name": "mlp", "options": {"width": 64, "depth": 2, "activation": "relu"}}


def train(seed: int, run_dir: Path) -> nn.Module:
    """Train one network with ``lg.train``; return it with its final weights."""
    cfg = {
        "name": f"digits_mlp_seed{seed}",
        "seed": seed,
        "model": MODEL,
        "data": {"name": "digits"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "batch_size": 64,
        "steps": 600,
        "metrics": {"every": 200, "sharpness": False},
        "checkpoint": {"every": 50},
    }
    res = lg.train(cfg, run_dir)
    model = lg.zoo.model("mlp", **MODEL["options"], seed=seed)
    _, state = lg.train.checkpoint_states(run_dir)[-1]
    model.load_state_dict(state)
    print(f"seed {seed}: {res.status}, last metrics {res.metrics[-1]}")
    return model.eval()


def main() -> None:
    """Train both networks, draw the figures, write the numbers."""
    started = time.perf_counter()
    X, y = lg.zoo.digits("train")
    Xt, yt = lg.zoo.digits("test")
    with tempfile.TemporaryDirectory() as tmp:
        run_a, run_b = Path(tmp) / "a", Path(tmp) / "b"
        model_a, model_b = train(0, run_a), train(1, run_b)
        states = [s for _, s in lg.train.checkpoint_states(run_a)]
    loss_fn = nn.CrossEntropyLoss()
    obj = lg.Objective(model_a, loss_fn, (X, y))
    numbers: dict = {"train_loss_a": obj.loss()}

    # 1. PCA plane of the trajectory.
    pca = lg.pca_directions(obj, states, 2)
    span = float(pca.coords.abs().max()) * 1.3
    grid = torch.linspace(-span, span, 31)
    plane = lg.slice_2d(obj, pca, alphas=grid, betas=grid, eval_data=(Xt, yt))
    lg.plot_surface(plane, path=DOCS / "landscape_pca_plane.png", log=True)
    numbers["pca"] = {
        "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
        "max_off_plane_distance": float(pca.residuals.max()),
        "path_length_scale": float(pca.coords.norm(dim=1).max()),
        "plane_seconds": plane.cost.seconds,
        "n_points": plane.parameters["n_points"],
    }

    # 2. 1-D filter-normalized slices with bands and the quadratic model.
    s1 = lg.slice_1d(
        obj,
        "filter",
        torch.linspace(-1, 1, 41),
        n_directions=16,
        quadratic=True,
        eval_data=(Xt, yt),
    )
    lg.plot_slice(s1, path=DOCS / "landscape_slices.png")
    numbers["slices"] = {**s1.statistics(), "seconds": s1.cost.seconds}
    rays = lg.ray_curvature(obj, 64)
    numbers["ray_curvature"] = {
        "mean": rays.mean,
        "stderr": rays.stderr,
        "negative_fraction": rays.negative_fraction,
        "relative_difference_fd_vs_exact": rays.relative_difference,
    }

    # 3. Paths between the two solutions.
    theta_b = obj.flatten(dict(model_b.named_parameters()))
    line = lg.interpolate(obj, obj.theta, theta_b, n_points=21, eval_data=(Xt, yt))
    aligned = lg.align(model_a, model_b, obj=obj, n_points=21)
    aligned_path = lg.interpolate(obj, obj.theta, aligned.theta, n_points=21)
    curve = lg.connect(obj, obj.theta, theta_b, "bezier", steps=400, seed=0)
    lg.plot_paths(
        [line, aligned_path, curve],
        labels=["linear", "linear after weight matching", "trained Bezier curve"],
        path=DOCS / "landscape_paths.png",
    )
    numbers["paths"] = {
        "linear_barrier": line.barrier,
        "linear_eval_barrier": line.eval_barrier,
        "aligned_barrier": aligned_path.barrier,
        "bezier_barrier": curve.barrier,
        "alignment_sweeps": aligned.n_sweeps,
    }
    numbers["seconds"] = time.perf_counter() - started
    atomic_write_json(DOCS / "landscape_digits.json", numbers)
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
