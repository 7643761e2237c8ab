"""The main job, first version: train a small model on digits, then probe its curvature.

Everything here goes through the public API, so the demo doubles as an example.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lossgeom as lg
from lossgeom.report import write_json
from lossgeom.zoo import digits, mlp

__all__ = ["format_table", "run_demo"]


def _evaluate(
    model: nn.Module, loss_fn: nn.Module, data: tuple[torch.Tensor, torch.Tensor]
) -> tuple[float, float]:
    """``(loss, accuracy)`` of the model on ``data``, in eval mode."""
    X, y = data
    flag = model.training
    model.eval()
    with torch.no_grad():
        out = model(X)
        loss, acc = loss_fn(out, y).item(), (out.argmax(1) == y).double().mean().item()
    model.train(flag)
    return loss, acc


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_demo(
    out: str | Path,
    *,
    steps: int = 300,
    width: int = 32,
    seed: int = 0,
    n_directions: int = 32,
    dense: bool = True,
) -> dict:
    """Train an MLP on sklearn digits with SGD, probe its curvature, write ``results.json``.

    Args:
        out: output folder (created).
        steps: SGD steps (batch 128, momentum 0.9, learning rate 0.05).
        width: hidden width of the one-hidden-layer tanh MLP.
        seed: seed of the initialisation, the batches and the random directions.
        n_directions: random directions for the mean-curvature estimate.
        dense: also build the dense Hessian (``d`` HVPs) for its exact spectrum.

    Returns:
        The results dictionary written to ``out/results.json``.
    """
    _check_settings(steps, n_directions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    X, y = digits("train", seed=seed)
    Xt, yt = digits("test", seed=seed)
    model = mlp(64, 10, width=width, depth=1, activation="tanh")
    loss_fn = nn.CrossEntropyLoss()

    theta_init = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    curves, train_seconds = _train(model, loss_fn, (X, y), (Xt, yt), steps, seed)

    # Probe in float64: the copy leaves the float32 model as trained.
    obj = lg.Objective(model, loss_fn, (X, y), dtype=torch.float64)
    test_obj = lg.Objective(model, loss_fn, (Xt, yt), dtype=torch.float64)
    probe_start = time.perf_counter()
    probes = _probe(obj, n_directions, seed)

    results: dict = {
        "model": f"MLP 64-{width}-10 tanh",
        "data": "sklearn digits (train split for probes)",
        "training": {
            "optimizer": "SGD(lr=0.05, momentum=0.9), batch 128",
            "steps": steps,
            "seconds": round(train_seconds, 3),
            "seed": seed,
            "curves": curves,
            "curves_figure": _figure(
                lambda f: lg.plot_training(curves, path=f), out / "training.png"
            ),
        },
        "objective": obj.info(),
        "metrics": _metrics(probes, curves, test_obj, n_directions),
        "definitions": {
            "curvature_along_gradient": "u.H u with u = g/|g|",
            "mean_curvature_random": "mean of v.Hv over unit Gaussian directions v; "
            "an unbiased estimate of tr(H)/d",
            "gradient_noise_trace": "tr(Sigma), Sigma = (1/N) sum_i (g_i - g)(g_i - g)^T, exact",
            "noise_scale_simple": "B_simple = tr(Sigma) / |g|^2 (McCandlish et al. 2018)",
        },
        "cost": probes.cost,
    }
    if dense:
        results["dense_spectrum"], results["checks"] = _dense(probes, obj.dim)
    results["density"] = _density(probes.H, probes.top, seed, out)
    results["landscape"] = _landscape(obj, theta_init, (Xt, yt), out, seed)
    results["measures"] = _measures(obj, seed)
    results["work"] = obj.counters.to_dict()
    results["probe_seconds"] = round(time.perf_counter() - probe_start, 3)
    results["machine"] = _machine()
    write_json(out / "results.json", results)
    return results


def _check_settings(steps: int, n_directions: int) -> None:
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}.")
    if n_directions < 2:
        raise ValueError(
            f"n_directions must be >= 2 for an error bar; got {n_directions}."
        )


def _train(
    model: nn.Module,
    loss_fn: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    seed: int,
) -> tuple[list[dict], float]:
    """SGD on ``train``; the training curves and the seconds spent training.

    Loss and accuracy on both sets are recorded every few steps and at the end;
    the time spent recording them does not count as training.
    """
    X, y = train
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    every = max(1, steps // 30)
    curves: list[dict] = []
    eval_seconds = 0.0

    def record(step: int) -> None:
        nonlocal eval_seconds
        tick = time.perf_counter()
        train_loss, train_acc = _evaluate(model, loss_fn, train)
        test_loss, test_acc = _evaluate(model, loss_fn, test)
        curves.append(
            {
                "step": step,
                "lr": lr,
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "test_loss": test_loss,
                "test_accuracy": test_acc,
            }
        )
        eval_seconds += time.perf_counter() - tick

    start = time.perf_counter()
    model.train()
    for step in range(steps):
        if step % every == 0:
            record(step)
        idx = torch.randint(0, X.shape[0], (128,), generator=gen)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    record(steps)
    return curves, time.perf_counter() - start - eval_seconds


@dataclass
class _Probes:
    """Curvature at the trained parameters, and what the products cost."""

    loss: float
    g_norm: float
    H: lg.HessianOperator
    curv_grad: float
    ggn_grad: float
    mean_curv: float
    mean_curv_se: float
    top: lg.EigenResult
    tr: lg.TraceResult
    trace_sigma: float
    cost: dict


def _probe(obj: lg.Objective, n_directions: int, seed: int) -> _Probes:
    """Gradient, curvature along it and at random, top eigenvalues, trace, noise."""
    loss, g = obj.loss_and_grad()
    g_norm = g.norm().item()
    H = lg.hessian(obj)
    G = lg.ggn(obj)
    u = g / g_norm
    curv_grad = torch.dot(u, H @ u).item()
    ggn_grad = torch.dot(u, G @ u).item()

    vgen = torch.Generator(device=obj.device).manual_seed(seed)
    V = torch.randn(
        obj.dim, n_directions, generator=vgen, dtype=obj.dtype, device=obj.device
    )
    V = V / V.norm(dim=0)
    rayleigh = (V * (H @ V)).sum(0)
    mean_curv = rayleigh.mean().item()
    mean_curv_se = (rayleigh.std() / n_directions**0.5).item()

    top = lg.eigenvalues(H, 5, tol=1e-8, seed=seed)
    tr = lg.trace(H, 120, seed=seed)

    sigma = lg.gradient_covariance(obj)
    trace_sigma = sigma.trace()

    v1 = V[:, 0].contiguous()
    grad_s = _median_seconds(lambda: obj.grad())
    hvp_s = _median_seconds(lambda: obj.hvp(v1))
    hvp8_s = _median_seconds(lambda: obj.hvp(V[:, :8].contiguous()))
    cost = {
        "grad_seconds": grad_s,
        "hvp_seconds": hvp_s,
        "hvp_over_grad": hvp_s / grad_s,
        "hvp_block8_seconds": hvp8_s,
        "block8_speedup_over_8_single": 8 * hvp_s / hvp8_s,
    }
    return _Probes(
        loss=loss,
        g_norm=g_norm,
        H=H,
        curv_grad=curv_grad,
        ggn_grad=ggn_grad,
        mean_curv=mean_curv,
        mean_curv_se=mean_curv_se,
        top=top,
        tr=tr,
        trace_sigma=trace_sigma,
        cost=cost,
    )


def _metrics(
    p: _Probes, curves: list[dict], test_obj: lg.Objective, n_directions: int
) -> dict:
    """The numbers of the trained model (``results["metrics"]``)."""
    return {
        "train_loss": p.loss,
        "train_accuracy": curves[-1]["train_accuracy"],
        "test_loss": test_obj.loss(),
        "test_accuracy": curves[-1]["test_accuracy"],
        "grad_norm": p.g_norm,
        "curvature_along_gradient": p.curv_grad,
        "ggn_curvature_along_gradient": p.ggn_grad,
        "mean_curvature_random": p.mean_curv,
        "mean_curvature_random_stderr": p.mean_curv_se,
        "n_random_directions": n_directions,
        "top_eigenvalues": p.top.values.tolist(),
        "top_eigenvalue_residuals": p.top.residuals.tolist(),
        "top_eigenvalues_converged": p.top.all_converged,
        "top_eigenvalues_matvecs": p.top.cost.matvecs,
        "hessian_trace": p.tr.value,
        "hessian_trace_stderr": p.tr.stderr,
        "hessian_trace_method": p.tr.method,
        "hessian_trace_matvecs": p.tr.cost.matvecs,
        "gradient_noise_trace": p.trace_sigma,
        "noise_scale_simple": p.trace_sigma / p.g_norm**2,
    }


def _dense(p: _Probes, dim: int) -> tuple[dict, dict]:
    """The exact spectrum of the dense Hessian, and the estimates compared with it.

    Building the dense Hessian takes ``dim`` products.
    """
    dense_start = time.perf_counter()
    evals = torch.linalg.eigvalsh(p.H.to_dense(chunk_size=128))
    lam_max = evals[-1].item()
    spectrum = {
        "lambda_max": lam_max,
        "lambda_min": evals[0].item(),
        "trace": evals.sum().item(),
        "trace_over_d": evals.sum().item() / dim,
        "n_negative": int((evals < -1e-8 * abs(lam_max)).sum()),
        "n_below_1pct_of_lambda_max": int((evals < -0.01 * lam_max).sum()),
        "d": dim,
        "seconds": round(time.perf_counter() - dense_start, 3),
    }
    exact = spectrum["trace_over_d"]
    checks = {
        "mean_curvature_vs_exact_in_stderrs": (p.mean_curv - exact) / p.mean_curv_se,
        "trace_vs_exact_in_stderrs": (p.tr.value - float(evals.sum())) / p.tr.stderr,
        "top_eigenvalues_max_relative_error": float(
            ((p.top.values - evals.flip(0)[:5]).abs() / evals.flip(0)[:5].abs()).max()
        ),
    }
    return spectrum, checks


def _density(H: lg.HessianOperator, top: lg.EigenResult, seed: int, out: Path) -> dict:
    """The SLQ spectral density and the fraction of clearly negative eigenvalues."""
    dens = lg.density(H, 10, 80, seed=seed)
    neg_threshold = 0.01 * float(top.values[0])
    neg = lg.negative_mass(H, neg_threshold, seed=seed)
    return {
        "method": "slq",
        "n_probes": 10,
        "n_steps": 80,
        "n_matvecs": dens.cost.matvecs,
        "negative_fraction": neg.value,
        "negative_fraction_stderr": neg.stderr,
        "negative_threshold": neg_threshold,
        "negative_definition": neg.definition + " (threshold = 1% of lambda_max)",
        "plot": _figure(
            lambda f: lg.plot_density(dens, top, path=f), out / "spectral_density.png"
        ),
    }


def _machine() -> dict:
    """The versions and the platform the demo ran on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lossgeom": lg.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }


def _landscape(obj, theta_init, test, out: Path, seed: int) -> dict:
    """Filter-normalized slices and the path from the initialisation."""
    grid = torch.linspace(-1.0, 1.0, 21)
    band = lg.slice_1d(
        obj, "filter", grid, n_directions=8, seed=seed, quadratic=True, eval_data=test
    )
    plane = lg.slice_2d(obj, "filter", alphas=grid, betas=grid, seed=seed)
    init = theta_init.to(dtype=obj.dtype, device=obj.device)
    path = lg.interpolate(obj, init, obj.theta, n_points=21, eval_data=test)
    drawn = {
        "slices": _figure(
            lambda f: lg.plot_slice(band, path=f), out / "loss_slices.png"
        ),
        "plane": _figure(
            lambda f: lg.plot_surface(plane, path=f, log=True), out / "loss_plane.png"
        ),
        "path": _figure(
            lambda f: lg.plot_paths(path, labels=["initialisation -> trained"], path=f),
            out / "path.png",
        ),
    }
    figures = {k: str(out / name) for k, name in drawn.items() if name is not None}
    stats = band.statistics()
    return {
        "directions": band.directions,
        "slice_total_variation": stats["total_variation"],
        "slice_excess_variation": stats["excess_variation"],
        "slice_variance": stats["slice_variance"],
        "plane_min_max_loss": [float(plane.loss.min()), float(plane.loss.max())],
        "init_to_trained_barrier": path.barrier,
        "init_to_trained_test_barrier": path.eval_barrier,
        "barrier_definition": path.definition,
        "figures": figures,
    }


def _measures(obj, seed: int) -> dict:
    """Sharpness of several kinds and the gradient's share of the top curvature."""
    worst = lg.sharpness(obj, 0.05, kind="worst", steps=10, restarts=2, seed=seed)
    average = lg.sharpness(obj, 0.01, kind="average", samples=64, seed=seed)
    adaptive = lg.sharpness(
        obj, 0.05, kind="average", adaptive=True, samples=64, seed=seed
    )
    fraction = lg.gradient_fraction(obj, k=10, seed=seed)
    return {
        "worst_sharpness_r0.05": worst.value,
        "average_sharpness_sigma0.01": average.value,
        "average_sharpness_stderr": average.stderr,
        "adaptive_average_sharpness_r0.05": adaptive.value,
        "adaptive_average_sharpness_stderr": adaptive.stderr,
        "gradient_fraction_top10": fraction.value,
        "gradient_fraction_bound": fraction.bound,
        "definitions": {
            "worst": worst.definition,
            "average": average.definition,
            "adaptive": adaptive.definition,
            "gradient_fraction": fraction.definition,
        },
    }


def _figure(draw, path: Path) -> str | None:
    """Draw a figure to ``path``; its file name, or None without matplotlib."""
    try:
        draw(path)
    except ImportError:
        return None  # matplotlib is optional
    return path.name


def format_table(results: dict) -> str:
    """A plain-text table of the demo's numbers."""
    rows = [
        *_metric_rows(results),
        *_dense_rows(results),
        *_density_rows(results),
        *_landscape_rows(results),
        *_cost_rows(results),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _metric_rows(results: dict) -> list[tuple[str, str]]:
    """The trained model and the curvature probes."""
    m = results["metrics"]
    return [
        ("model", results["model"]),
        ("parameters d", str(results["objective"]["dim"])),
        (
            "train steps / seconds",
            f"{results['training']['steps']} / {results['training']['seconds']:.2f}",
        ),
        ("train loss / accuracy", f"{m['train_loss']:.4f} / {m['train_accuracy']:.3f}"),
        ("test loss / accuracy", f"{m['test_loss']:.4f} / {m['test_accuracy']:.3f}"),
        ("|grad|", f"{m['grad_norm']:.4e}"),
        ("curvature along gradient u.Hu", f"{m['curvature_along_gradient']:.4e}"),
        ("GGN curvature along gradient", f"{m['ggn_curvature_along_gradient']:.4e}"),
        (
            f"tr(H)/d from {m['n_random_directions']} random directions",
            f"{m['mean_curvature_random']:.4e} +- {m['mean_curvature_random_stderr']:.1e}",
        ),
        (
            f"top-5 eigenvalues (Lanczos, {m['top_eigenvalues_matvecs']} HVPs)",
            ", ".join(f"{v:.4e}" for v in m["top_eigenvalues"]),
        ),
        ("  max residual |Hu - lambda u|", f"{max(m['top_eigenvalue_residuals']):.1e}"),
        (
            f"tr(H) ({m['hessian_trace_method']}, {m['hessian_trace_matvecs']} HVPs)",
            f"{m['hessian_trace']:.4e} +- {m['hessian_trace_stderr']:.1e}",
        ),
        ("tr(Sigma) gradient noise (exact)", f"{m['gradient_noise_trace']:.4e}"),
        ("noise scale B_simple", f"{m['noise_scale_simple']:.1f}"),
    ]


def _dense_rows(results: dict) -> list[tuple[str, str]]:
    """The exact spectrum and the estimates compared with it (with ``dense``)."""
    if "dense_spectrum" not in results:
        return []
    s = results["dense_spectrum"]
    return [
        (
            "exact lambda_max / lambda_min",
            f"{s['lambda_max']:.4e} / {s['lambda_min']:.4e}",
        ),
        ("exact tr(H)/d", f"{s['trace_over_d']:.4e}"),
        ("negative eigenvalues", f"{s['n_negative']} of {s['d']}"),
        (
            "random-direction tr(H)/d - exact, in stderrs",
            f"{results['checks']['mean_curvature_vs_exact_in_stderrs']:+.2f}",
        ),
        (
            "trace estimate - exact, in stderrs",
            f"{results['checks']['trace_vs_exact_in_stderrs']:+.2f}",
        ),
        (
            "top-5 max relative error vs exact",
            f"{results['checks']['top_eigenvalues_max_relative_error']:.1e}",
        ),
    ]


def _density_rows(results: dict) -> list[tuple[str, str]]:
    """The negative part of the spectral density, and the figures drawn."""
    dn = results["density"]
    return [
        (
            f"eigenvalues < -1% lambda_max (SLQ, {dn['n_probes']}x{dn['n_steps']})",
            f"{dn['negative_fraction']:.3f} +- {dn['negative_fraction_stderr']:.3f} of d",
        ),
        ("spectral density plot", str(dn["plot"])),
        ("training curves", str(results["training"]["curves_figure"])),
    ]


def _landscape_rows(results: dict) -> list[tuple[str, str]]:
    """Slices, the path from the initialisation, sharpness."""
    ls, ms = results["landscape"], results["measures"]
    return [
        (
            "filter-normalized slices (8): excess variation",
            f"{ls['slice_excess_variation']:.3f} (0 = one basin per slice)",
        ),
        ("barrier initialisation -> trained", f"{ls['init_to_trained_barrier']:.4g}"),
        ("worst-case sharpness, l2 radius 0.05", f"{ms['worst_sharpness_r0.05']:.4e}"),
        (
            "adaptive average sharpness, 0.05",
            f"{ms['adaptive_average_sharpness_r0.05']:.4e}"
            f" +- {ms['adaptive_average_sharpness_stderr']:.1e}",
        ),
        (
            "gradient share in top-10 Hessian space",
            f"{ms['gradient_fraction_top10']:.3f}",
        ),
        ("landscape figures", ", ".join(Path(f).name for f in ls["figures"].values())),
    ]


def _cost_rows(results: dict) -> list[tuple[str, str]]:
    """What the products cost, and how they were computed."""
    c = results["cost"]
    return [
        ("HVP time / gradient time", f"{c['hvp_over_grad']:.2f}"),
        ("8 vectors batched vs 8 single", f"{c['block8_speedup_over_8_single']:.2f}x"),
        (
            "backend / mode / dtype",
            f"{results['objective']['hvp_backend']} / {results['objective']['mode']} / {results['objective']['dtype']}",
        ),
    ]
