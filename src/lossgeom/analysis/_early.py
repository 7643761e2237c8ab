"""H5: early landscape probes against optimization difficulty."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from lossgeom.analysis._stats import holm
from lossgeom.analysis._verdicts import HypothesisResult, _need, _overall

__all__ = ["H5_FILE", "h5"]

H5_FILE = "examples/studies/h5.yaml"


def _n_params(config: dict, cache: dict) -> int:
    """Trainable parameters of the model a run config trains."""
    from lossgeom.train import build_model

    key = json.dumps([config["model"], config["data"]], sort_keys=True)
    if key not in cache:
        model = build_model(config, device="cpu")
        cache[key] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return cache[key]


def _early_features(
    frame: pd.DataFrame, configs: dict, early_fraction: float
) -> pd.DataFrame:
    """One row per run: its early probes, early loss, final loss and test error."""
    cache: dict = {}
    rows = []
    for run_id, group in frame.groupby("run_id"):
        steps = configs[run_id]["steps"]
        early = group[
            (group["step"] <= early_fraction * steps)
            & group["eos_ratio"].notna()
            & group["trace"].notna()
        ]
        if early.empty:
            continue
        first = early.sort_values("step").iloc[-1]
        last = group.sort_values("step")
        row = {
            "run_id": run_id,
            "eos_ratio": float(first["eos_ratio"]),
            "trace_per_param": float(first["trace"])
            / _n_params(configs[run_id], cache),
            "early_loss": float(first["train_loss"]),
            "diverged": bool(group["status"].iloc[0] == "diverged"),
            "final_loss": float(last["train_loss"].dropna().iloc[-1])
            if last["train_loss"].notna().any()
            else math.nan,
            "test_error": float(last["test_error"].dropna().iloc[-1])
            if "test_error" in last and last["test_error"].notna().any()
            else math.nan,
        }
        if "slice_1d_slice_variance" in early:
            row["slice_variance"] = float(
                first.get("slice_1d_slice_variance", math.nan)
            )
        rows.append(row)
    return pd.DataFrame(rows)


_EARLY_BARRIER = re.compile(r"^interpolate_step(\d+)$")


def _early_barriers(
    table: pd.DataFrame, pairs: pd.DataFrame, configs: dict, early_fraction: float
) -> int | None:
    """Add each run's mean early barrier to ``table`` (column ``barrier``).

    The barrier is the ``interpolate`` pairwise probe at the latest step within
    the early window of every run (a column ``interpolate_step<N>``); a run's
    value is the mean over the pairs it is part of. Returns the step, or
    ``None`` (and a column of NaN) when the study has no such probe.
    """
    table["barrier"] = math.nan
    horizon = early_fraction * min(configs[r]["steps"] for r in table["run_id"])
    steps = [
        int(m.group(1))
        for c in pairs.columns
        if (m := _EARLY_BARRIER.match(c)) and int(m.group(1)) <= horizon
    ]
    if not steps:
        return None
    column = f"interpolate_step{max(steps)}"
    done = pairs[pairs["status"] == "finished"]
    values: dict[str, list[float]] = {}
    for row in done.itertuples():
        for run in (row.run_a, row.run_b):
            values.setdefault(run, []).append(float(getattr(row, column)))
    table["barrier"] = [
        float(np.mean(values[r])) if r in values else math.nan for r in table["run_id"]
    ]
    return max(steps)


def h5(
    path: str | os.PathLike, *, alpha: float = 0.05, early_fraction: float = 0.05
) -> HypothesisResult:
    """H5: early landscape probes predict optimization difficulty beyond the trace.

    Features of each run at its last metrics row within the first
    ``early_fraction`` of its steps: ``lambda_max`` relative to the stability
    threshold (``eos_ratio`` = sharpness / (2 / lr)), the Hessian trace per
    parameter (``trace / D``), and the slice variance where the study probes
    it early (``slice_1d`` at such a step). Targets: the final train loss
    (log10) and the test error of the finished runs; and divergence.

    Four comparisons of out-of-fold R^2 (least squares on the features'
    logarithms, which span orders of magnitude; repeated 5-fold,
    :func:`~lossgeom.analysis.compare_cv_r2`), Holm-adjusted together: the
    probe features against the trace alone and against the early train loss
    alone, for each target. Divergence: the AUROC of ``eos_ratio`` and of the
    trace per parameter, in ``data`` (the barrier exists for finished runs only).

    Raises:
        ValueError: no sharpness or trace in the metrics, or too few runs.
    """
    from lossgeom import study
    from lossgeom.analysis._predict import auroc, compare_cv_r2

    fix = f"run a study like {H5_FILE}"
    frame = study.load(path)
    frame = frame[frame["status"].isin(["finished", "diverged"])]
    for column, what in (
        ("eos_ratio", "metrics.sharpness: true"),
        ("trace", "metrics.trace_max_matvecs > 0"),
    ):
        _need(
            column in frame.columns and frame[column].notna().any(),
            f"H5 needs {column} in the early metrics ({what}); {fix}",
        )
    configs = {
        r.run_id: r.config for r in study.load_study(Path(path) / "study.yaml").runs
    }
    table = _early_features(frame, configs, early_fraction)
    _need(
        len(table) >= 10,
        f"H5 needs at least 10 runs with early probes; found {len(table)}; {fix}",
    )
    features = ["eos_ratio", "trace_per_param"]
    if "slice_variance" in table and table["slice_variance"].notna().all():
        features.append("slice_variance")
    barrier_at = _early_barriers(table, study.pairs(path), configs, early_fraction)
    done = table[~table["diverged"]]
    if barrier_at is not None and done["barrier"].notna().all():
        features.append("barrier")
    done = done.dropna(subset=["final_loss", "early_loss", *features])
    # the features span orders of magnitude (eos_ratio from 0.01 to 100s):
    # the linear models see their logarithms (the barrier, which may be zero or
    # negative, as it is)
    logged = [c for c in [*features, "early_loss"] if c != "barrier"]
    done = done.assign(**{c: np.log10(done[c].clip(lower=1e-12)) for c in logged})
    tests = []
    for target, label in (
        ("final_loss", "log10 final train loss"),
        ("test_error", "test error"),
    ):
        y = (
            np.log10(done[target].to_numpy(float))
            if target == "final_loss"
            else done[target].to_numpy(float)
        )
        X = done[features].to_numpy(float)
        for base, name in (
            ("trace_per_param", "the trace per parameter alone"),
            ("early_loss", "the early train loss alone"),
        ):
            tests.append(
                compare_cv_r2(
                    X,
                    done[[base]].to_numpy(float),
                    y,
                    claim=f"early probes ({', '.join(features)}) predict the {label} better than {name}",
                    alpha=alpha,
                )
            )
    tests = holm(tests)
    data: dict = {"features": features, "runs": len(table), "finished": len(done)}
    if "barrier" in features:
        data["barrier_step"] = barrier_at
    labels = table["diverged"].to_numpy()
    if labels.any() and not labels.all():
        data["auroc_divergence"] = {
            "eos_ratio": auroc(table["eos_ratio"], labels).value,
            "trace_per_param": auroc(table["trace_per_param"], labels).value,
        }
    return HypothesisResult(
        hypothesis="H5",
        claim="early landscape probes (lambda_max against 2/lr, trace/D, slice "
        "variance, the barrier between seeds) predict optimization difficulty "
        "better than the trace alone",
        study=str(path),
        tests=tests,
        verdict=_overall(tests),
        held_fixed=[
            f"features from the first {early_fraction:.0%} of each run's steps"
        ],
        caveats=[
            "linear models of a few features; a non-linear model might rank the features differently",
            "the barrier between early seeds is among the features when the study "
            "probes it (pairs.probes: [{name: interpolate, step: N}] with N in the "
            "early window); it exists for finished runs only, so the divergence "
            "AUROC does not use it",
        ],
        data=data,
        parameters={"alpha": alpha, "early_fraction": early_fraction},
    )
