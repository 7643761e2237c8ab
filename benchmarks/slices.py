"""A 21 x 21 filter-normalized loss plane: lossgeom vs `loss-landscapes` vs a plain loop.

Cases (float32, on ``--device``: CUDA when present, else the CPU):
  (a) tiny MLP 64-32-10 (tanh) on the first 512 sklearn digits;
  (b) small CNN with BatchNorm (eval mode, running statistics from one pass) on the
      first 1,024 digits;
  (c) CIFAR-style ResNet-20 (width 16, BatchNorm after every convolution, eval
      mode, running statistics from one pass) on a fixed random batch of 128
      3x32x32 images, a 7 x 7 grid (its points cost 0.1-0.2 s each on a CPU) and 3
      rounds; (a) and (b) use 21 x 21 and 9 rounds.

Measured in the same run, seconds per grid point:
  - bare forward: one forward pass of the model over the same data (no_grad), the
    floor for exact evaluation of a point that shares nothing with other points;
    the best single pass of 5, and 441 passes back to back (one pass per point,
    timed over as long as a plane takes, like the methods);
  - activations alone: every ``tanh``/``relu`` the model calls (modules or
    functions) on tensors of the shapes they see, as many points at once as
    lossgeom evaluates together: a floor for any exact evaluation, whatever it
    shares;
  - lossgeom: ``lg.slice_2d``, which shares the first layer's work across the
    plane's points when the model allows (``lossgeom.geometry._shared_layer``);
    the path it took is recorded;
  - lossgeom per point: the same points through ``obj.evaluate_metrics`` (vmap
    over points for (a), one point at a time for (b), there with BatchNorm folded
    into the convolutions, ``lossgeom.objective._fold_norm``; which evaluations
    folded is recorded): the path every slice took before the first layer was
    shared;
  - lossgeom, first layer shared: the shared path called directly (split and
    evaluation), also where ``slice_2d``'s cost rule declines it (on (b): a 3 x 3
    convolution with one input channel), to check that rule;
  - plain loop: load each grid point into one copy of the model and evaluate, the
    directions being lossgeom's (so the loss values must agree);
  - loss-landscapes (PyPI ``loss-landscapes``): ``random_plane(..., steps=21,
    normalization="filter", deepcopy_model=True)``; its own random directions, so
    only its time compares. It computes the loss only; lossgeom also computes
    accuracy. On (b) its filter normalization divides by a zero norm and raises;
    the error is recorded.

Targets: on the CNNs (b) and (c) lossgeom <= 1.2x one bare forward pass and below
both comparators; on (a) at least 3x fewer seconds per point than both. Results
with the machine facts go to ``benchmarks/results/slices_<device>.json``.

Run: ``pip install --no-deps loss-landscapes`` into the venv, then
``.venv/bin/python benchmarks/slices.py [--threads N] [--device cpu|cuda]``
(default: 1 thread, as the other CPU benchmarks). Timings synchronise the device;
results go to ``benchmarks/results/slices_<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).parent))

import lossgeom as lg  # noqa: E402
from _machine import DEFAULT_DEVICE, machine_facts, sync  # noqa: E402
from lossgeom._io import atomic_write_json  # noqa: E402
from lossgeom.geometry._evaluation import (  # noqa: E402
    EVALUATION_PATHS,
    default_chunk_size,
)
from lossgeom.geometry._shared_layer import (  # noqa: E402
    evaluate_shared,
    split_first_layer,
)
from lossgeom.objective._fold_norm import FOLDED  # noqa: E402
from lossgeom.zoo import cifar_resnet, digits  # noqa: E402

from _models import DigitsCNN  # noqa: E402

# Grid steps per axis and interleaved rounds, per case: (c) costs 0.1-0.2 s a point.
STEPS = {"a": 21, "b": 21, "c": 7}
REPEATS = {"a": 9, "b": 9, "c": 3}
RESULTS = Path(__file__).parent / "results"


def make_case(name: str):
    torch.manual_seed(0)
    X, y = digits("train")
    if name == "a":
        X, y = X[:512], y[:512]
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        return "a_tiny_mlp_digits512", model.eval(), X, y
    if name == "c":
        gen = torch.Generator().manual_seed(0)
        X = torch.randn(128, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (128,), generator=gen)
        model = cifar_resnet(20, width=16)
        label = "c_resnet20_random128"
    else:
        X, y = X[:1024].view(-1, 1, 8, 8), y[:1024]
        model = DigitsCNN()
        label = "b_cnn_bn_digits1024"
    with torch.no_grad():
        model.train()
        model(X)  # running statistics as after training: not the defaults
    return label, model.eval(), X, y


DEVICE = torch.device("cpu")  # set by main()


def best_of(fn, repeats=1):
    times, out = [], None
    for _ in range(repeats):
        sync(DEVICE)
        t0 = time.perf_counter()
        out = fn()
        sync(DEVICE)
        times.append(time.perf_counter() - t0)
    return min(times), out


def bare_forward(model, X, y, loss_fn):
    def run():
        with torch.no_grad():
            return float(loss_fn(model(X), y))

    run()
    t, _ = best_of(run, repeats=5)
    return t


def bare_forward_sustained(model, X, y, loss_fn, n):
    """Seconds per pass of ``n`` forward passes back to back."""

    def run():
        with torch.no_grad():
            for _ in range(n):
                loss_fn(model(X), y)

    t, _ = best_of(run)
    return t / n


# the elementwise activations a model may call, as modules or functions
ACTIVATIONS = {
    torch.tanh: torch.tanh,
    torch.nn.functional.tanh: torch.tanh,
    torch.Tensor.tanh: torch.tanh,
    torch.relu: torch.relu,
    torch.relu_: torch.relu,
    torch.nn.functional.relu: torch.relu,
    torch.Tensor.relu: torch.relu,
    torch.Tensor.relu_: torch.relu,
}


class RecordActivations(TorchFunctionMode):
    """Record the input shape of every activation call (module or function)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in ACTIVATIONS and args and isinstance(args[0], torch.Tensor):
            self.calls.append((ACTIVATIONS[func], args[0].shape))
        return func(*args, **(kwargs or {}))


def activations_alone(model, X, chunk):
    """Seconds per point of the model's activations alone.

    Every ``tanh``/``relu`` the forward pass calls (``nn.Tanh``/``nn.ReLU``
    modules and the functions alike), applied out of place to a tensor of the
    shape it sees, for ``chunk`` points at once as lossgeom evaluates them: a
    floor below which no exact evaluation of a point goes, whatever it shares.
    """
    recorder = RecordActivations()
    with torch.no_grad(), recorder:
        model(X)
    inputs = [
        (f, torch.randn(chunk, *shape, device=X.device)) for f, shape in recorder.calls
    ]

    def run():
        with torch.no_grad():
            for f, x in inputs:
                f(x)

    run()
    t, _ = best_of(run, repeats=5)
    return t / chunk


def plain_loop(model, X, y, loss_fn, theta, u, v, grid):
    def run():
        m = copy.deepcopy(model)
        out = torch.empty(len(grid), len(grid), device=X.device)
        with torch.no_grad():
            for i, a in enumerate(grid):
                for j, b in enumerate(grid):
                    torch.nn.utils.vector_to_parameters(
                        theta + a * u + b * v, m.parameters()
                    )
                    out[i, j] = loss_fn(m(X), y)
        return out

    t, out = best_of(run)
    return t, out.cpu()


def loss_landscapes_plane(model, X, y, loss_fn, steps):
    try:
        import loss_landscapes
        import loss_landscapes.metrics
    except ImportError:
        return None, "not installed (pip install --no-deps loss-landscapes)"
    metric = loss_landscapes.metrics.Loss(loss_fn, X, y)

    def run():
        torch.manual_seed(0)
        return loss_landscapes.random_plane(
            model,
            metric,
            distance=1,
            steps=steps,
            normalization="filter",
            deepcopy_model=True,
        )

    try:
        t, out = best_of(run)
    except Exception as err:  # noqa: BLE001 - recorded, not hidden
        return None, f"raised {type(err).__name__}: {err}"
    out = torch.as_tensor(out)
    n_nan = int((~torch.isfinite(out)).sum())
    return t, f"{n_nan} of {out.numel()} values non-finite"


def run_case(name: str) -> dict:
    steps = STEPS[name]
    label, model, X, y = make_case(name)
    model, X, y = model.to(DEVICE), X.to(DEVICE), y.to(DEVICE)
    loss_fn = nn.CrossEntropyLoss()
    obj = lg.Objective(model, loss_fn, (X, y))
    grid = torch.linspace(-1.0, 1.0, steps)
    n_points = steps * steps
    chunk = default_chunk_size(obj)
    u = lg.random_direction(obj, seed=0)
    v = lg.orthogonalize(obj, u, lg.random_direction(obj, seed=1))
    coefs = torch.cartesian_prod(grid, grid).to(DEVICE)
    dirs = torch.stack([u, v])
    points = obj.theta + coefs @ dirs

    def shared_forced():
        # The first layer shared even where slice_2d's cost rule declines it.
        split, _ = split_first_layer(obj)
        return evaluate_shared(obj, split, obj.theta, coefs, dirs, chunk)

    # Interleaved rounds, the best round of each: this machine's speed drifts by
    # 2-3x within minutes, so back-to-back blocks per method would compare drifts.
    times: dict[str, list[float]] = {
        k: []
        for k in (
            "fwd",
            "fwd_sustained",
            "lg",
            "lg_per_point",
            "lg_shared_forced",
            "loop",
            "ll",
            "activations",
        )
    }
    surf = ref = per_point = None
    ll_note = ""
    EVALUATION_PATHS.clear()
    FOLDED.clear()
    for _ in range(REPEATS[name]):
        times["fwd"].append(bare_forward(model, X, y, loss_fn))
        times["fwd_sustained"].append(
            bare_forward_sustained(model, X, y, loss_fn, n_points)
        )
        t, surf = best_of(
            lambda: lg.slice_2d(obj, "filter", alphas=grid, betas=grid), repeats=1
        )
        times["lg"].append(t)
        t, per_point = best_of(
            lambda: obj.evaluate_metrics(points, chunk_size=chunk), repeats=1
        )
        times["lg_per_point"].append(t)
        t, _ = best_of(shared_forced, repeats=1)
        times["lg_shared_forced"].append(t)
        t, ref = plain_loop(model, X, y, loss_fn, obj.theta, u, v, grid)
        times["loop"].append(t)
        t, ll_note = loss_landscapes_plane(model, X, y, loss_fn, steps)
        if t is not None:
            times["ll"].append(t)
        times["activations"].append(activations_alone(model, X, chunk or n_points))
    paths = dict(EVALUATION_PATHS)
    folded = dict(FOLDED)
    best = {k: min(v) if v else None for k, v in times.items()}
    per = {
        "bare_forward": best["fwd"],
        "bare_forward_sustained": best["fwd_sustained"],
        "activations_alone": best["activations"],
        "lossgeom": best["lg"] / n_points,
        "lossgeom_per_point_path": best["lg_per_point"] / n_points,
        "lossgeom_first_layer_shared": best["lg_shared_forced"] / n_points,
        "plain_loop": best["loop"] / n_points,
        "loss_landscapes": None if best["ll"] is None else best["ll"] / n_points,
    }
    lg_t = per["lossgeom"]
    row = {
        "case": label,
        "n_params": obj.dim,
        "n_samples": int(X.shape[0]),
        "grid": [steps, steps],
        "chunk_size": chunk,
        "lossgeom_paths": paths,
        "batch_norm_folding": folded,
        "seconds_per_point": per,
        "lossgeom_over_bare_forward": lg_t / per["bare_forward"],
        "lossgeom_over_bare_forward_sustained": lg_t / per["bare_forward_sustained"],
        "per_point_path_over_lossgeom": per["lossgeom_per_point_path"] / lg_t,
        "first_layer_shared_over_per_point_path": (
            per["lossgeom_first_layer_shared"] / per["lossgeom_per_point_path"]
        ),
        "plain_loop_over_lossgeom": per["plain_loop"] / lg_t,
        "loss_landscapes_over_lossgeom": (
            None if best["ll"] is None else per["loss_landscapes"] / lg_t
        ),
        "rounds_seconds": times,
        "max_abs_diff_vs_plain_loop": float((surf.loss - ref).abs().max()),
        "max_abs_diff_vs_per_point_path": float(
            (surf.loss.flatten() - per_point["loss"].cpu()).abs().max()
        ),
        "loss_range": [float(surf.loss.min()), float(surf.loss.max())],
        "loss_landscapes_note": ll_note,
    }
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=DEFAULT_DEVICE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    out = RESULTS / f"slices_{DEVICE.type}.json"
    rows = [run_case(c) for c in ("a", "b", "c")]
    try:
        from importlib.metadata import version

        ll_version = version("loss-landscapes")
    except Exception:  # noqa: BLE001 - not installed
        ll_version = None
    targets = {
        "b_lossgeom_over_bare_forward_le_1.2": rows[1]["lossgeom_over_bare_forward"]
        <= 1.2,
        "b_lossgeom_over_sustained_bare_forward_le_1.2": rows[1][
            "lossgeom_over_bare_forward_sustained"
        ]
        <= 1.2,
        "b_below_both": rows[1]["plain_loop_over_lossgeom"] > 1
        and (rows[1]["loss_landscapes_over_lossgeom"] or math.inf) > 1,
        "a_3x_fewer_than_both": rows[0]["plain_loop_over_lossgeom"] >= 3
        and (rows[0]["loss_landscapes_over_lossgeom"] or math.inf) >= 3,
        "c_lossgeom_over_bare_forward_le_1.2": rows[2]["lossgeom_over_bare_forward"]
        <= 1.2,
        "c_below_both": rows[2]["plain_loop_over_lossgeom"] > 1
        and (rows[2]["loss_landscapes_over_lossgeom"] or math.inf) > 1,
    }
    atomic_write_json(
        out,
        {
            "machine": machine_facts(
                DEVICE, dtype="float32", loss_landscapes=ll_version
            ),
            "cases": rows,
            "targets": targets,
        },
    )
    print(targets)


if __name__ == "__main__":
    main()
