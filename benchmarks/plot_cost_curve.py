"""Draw docs/cost_curve.png from the results of benchmarks/cost_curve.py.

Three panels against the number of parameters d (log axes): the time of one HVP
over one gradient; the products the top-5 (and top-1) eigenvalues take to
tol 1e-6; the peak memory of one HVP and of the eigenvalue run over one training
step. MLPs on digits and ResNets at CIFAR size are separate series of float32
rows; rows measured in float64 (``cost_curve.py --dtype float64``) are drawn as
separate points on the products panel.

Usage: python benchmarks/plot_cost_curve.py [--results PATH] [--out docs/cost_curve.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {"mlp": ("MLP, digits", "C0", "o"), "resnet": ("ResNet, 3x32x32", "C3", "s")}


def device_label(machine):
    if machine.get("gpu"):
        return machine["gpu"]
    threads = machine.get("torch_threads", "?")
    return (
        f"{machine.get('cpu_count', '?')}-core CPU, {threads} "
        f"thread{'' if threads == 1 else 's'}"
    )


def series(ax, rows, key, style, label_suffix, filled=True, converged=None):
    """One line per family; with ``converged``, runs that stopped short get an x."""
    for family, (label, color, marker) in FAMILIES.items():
        pts = sorted(
            (r["d"], r[key], r.get(converged, True) if converged else True)
            for r in rows
            if r["family"] == family and r.get(key) is not None
        )
        if not pts:
            continue
        d, y, ok = zip(*pts, strict=True)
        short = [(di, yi) for di, yi, oki in zip(d, y, ok, strict=True) if not oki]
        if short:
            ax.plot(*zip(*short, strict=True), "kx", ms=9, zorder=5)
        ax.plot(
            d,
            y,
            style,
            color=color,
            marker=marker,
            markerfacecolor=color if filled else "white",
            label=f"{label}: {label_suffix}",
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results", default=str(ROOT / "benchmarks/results/cost_curve_cpu.json")
    )
    parser.add_argument("--out", default=str(ROOT / "docs/cost_curve.png"))
    args = parser.parse_args()
    data = json.loads(Path(args.results).read_text())
    # the lines are float32; float64 rows (--dtype float64) are extra points
    rows = [r for r in data["results"] if r.get("dtype", "float32") == "float32"]
    wide = [r for r in data["results"] if r.get("dtype", "float32") == "float64"]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharex=True)
    ax = axes[0]
    series(ax, rows, "hvp_over_grad", "-", "H @ v (kept graph)")
    series(ax, rows, "hvp_objective_over_grad", "--", "obj.hvp(v)", filled=False)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("time of one HVP / one gradient")
    ax.set_title("HVP against gradient")

    ax = axes[1]
    series(ax, rows, "top5_matvecs", "-", "top 5", converged="top5_converged")
    series(ax, rows, "top1_matvecs", "--", "top 1", False, "top1_converged")
    for k, marker in (("top5", "D"), ("top1", "v")):
        pts = [(r["d"], r[f"{k}_matvecs"]) for r in wide if r.get(f"{k}_matvecs")]
        if pts:
            ax.plot(
                *zip(*pts, strict=True),
                marker,
                color="black",
                markerfacecolor="white",
                ls="none",
                label=f"{k.replace('top', 'top ')}, float64",
            )
    ax.plot([], [], "kx", label="stopped short of tol (converged false)")
    ax.set_ylabel("Hessian-vector products to tol 1e-6")
    ax.set_title("Products for the top eigenvalues")
    ax.set_ylim(bottom=0)

    ax = axes[2]
    series(ax, rows, "hvp_memory_over_train_step", "-", "one HVP")
    series(ax, rows, "eigen_memory_over_train_step", "--", "eigenvalues", False)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_ylabel("peak memory / peak of one training step")
    ax.set_title("Memory against a training step")

    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("parameters d")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"What curvature costs against model size ({device_label(data['machine'])}, "
        f"batch 32, float32{', float64 points' if wide else ''})"
    )
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
