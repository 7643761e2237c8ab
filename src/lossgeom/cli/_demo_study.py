"""The main job: `lossgeom demo` runs the batch-size study end to end.

Two batch sizes x three seeds of an MLP on sklearn digits, every run stopped at
the same train loss, probed at the end (top eigenvalues, trace, density, a
slice), the barrier between each pair of seeds, the H1 analysis, and one
self-contained HTML report. Everything goes through the public API, so this
module doubles as an example of a study in code.
"""

from __future__ import annotations

import time
from pathlib import Path

import lossgeom as lg

__all__ = ["demo_study", "format_summary", "run_demo_study"]

SUMMARY_METRICS = ["eigenvalues", "trace", "test_error", "train_loss", "interpolate"]


def demo_study(seeds: int = 3) -> dict:
    """The demo's study file, as a dict (``lossgeom study run`` takes the same in YAML).

    Args:
        seeds: seeds per batch size (at least 2, for the paired H1 tests).
    """
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 2:
        raise ValueError(
            f"the demo pairs runs by seed and needs at least 2 seeds; got {seeds!r}"
        )
    return {
        "name": "demo",
        "base": {
            "model": {"name": "mlp", "options": {"width": 64}},
            "data": {"name": "digits"},
            "optim": {"name": "sgd", "lr": 0.5},
            "steps": 4000,
            "metrics": {
                "every": 25,
                "eval_samples": None,
                "probe_samples": 512,
                "sharpness_max_matvecs": 40,
                "trace_max_matvecs": 20,
            },
            "checkpoint": {"every": 1000, "keep_last": 1},
        },
        "grid": {"batch_size": [16, 512]},
        "seeds": list(range(seeds)),
        "stop": {"train_loss": 0.02},
        "probes": [
            {"name": "eigenvalues", "options": {"k": 5, "tol": 1e-4}},
            {"name": "density", "options": {"n_probes": 4, "lanczos_steps": 40}},
            {"name": "slice_1d", "options": {"n_directions": 2}},
        ],
        "pairs": {"probes": [{"name": "interpolate", "options": {"n_points": 21}}]},
    }


def run_demo_study(
    out: str | Path, *, seeds: int = 3, jobs: int | None = None, progress: bool = True
) -> dict:
    """Run the demo study into ``out/study``, analyse H1, write ``out/report.html``.

    A second call resumes: finished runs are not trained again.

    Returns:
        ``{"study": path, "report": path, "table": DataFrame, "h1": HypothesisResult,
        "seconds": float}``.
    """
    start = time.perf_counter()
    out = Path(out)
    folder = out / "study"
    status = lg.study.run(demo_study(seeds), folder, jobs=jobs, progress=progress)
    h1 = lg.analysis.analyze(folder, "h1")
    table = lg.study.table(folder, by=["batch_size"], metrics=SUMMARY_METRICS)
    report = lg.report.write_report(folder, out / "report.html", progress=progress)
    return {
        "study": folder,
        "report": Path(report),
        "table": table,
        "h1": h1,
        "status": status,
        "seconds": time.perf_counter() - start,
    }


def format_summary(results: dict) -> str:
    """The per-batch table, the H1 verdict and the report's path, for a terminal."""
    table = results["table"]
    lines = ["batch size: mean +- standard error over seeds (n)"]
    for batch, row in table.iterrows():
        cells = []
        for metric in SUMMARY_METRICS:
            mean, se, n = (row[(metric, k)] for k in ("mean", "se", "n"))
            cells.append(f"{metric} {mean:.4g} +- {se:.2g} ({int(n)})")
        lines.append(f"  {batch:>4}: " + ", ".join(cells))
    h1 = results["h1"]
    lines.append("")
    lines.append(f"H1 ({h1.claim}): {h1.verdict}")
    for test in h1.tests:
        lines.append(f"  - {test.claim}: {test.verdict} (Holm p = {test.p:.3g})")
    lines.append("")
    lines.append(f"study: {results['study']} ({results['seconds']:.0f} s)")
    lines.append(f"open {results['report']}")
    return "\n".join(lines)
