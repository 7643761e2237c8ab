"""The research program's hypotheses as analyses of a study, each with a verdict.

Each analysis reads a study directory (:func:`lossgeom.study.load`,
:func:`lossgeom.study.pairs`), pairs runs that differ only in the factor under
test (same seed, same other settings), runs one test per link or measure with
:mod:`lossgeom.analysis` and returns a :class:`HypothesisResult`: the tests, a
verdict and the caveats. An analysis refuses a study that lacks what it needs,
saying what is missing and which study file provides it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from lossgeom._results import Result
from lossgeom.analysis._base import TestResult
from lossgeom.analysis._regression import regression
from lossgeom.analysis._stats import holm, paired_test

__all__ = ["HYPOTHESES", "HypothesisResult", "analyze", "h1", "h2", "h5"]


@dataclass(frozen=True, kw_only=True, eq=False)
class HypothesisResult(Result):
    """A hypothesis tested on a study: its tests, verdict and caveats.

    Attributes:
        hypothesis: its label (``H1`` ... ``H5``).
        claim: the hypothesis in words.
        study: the study directory analysed.
        tests: one test per link or measure (Holm-adjusted as a family).
        verdict: ``supported`` when every test is, ``contradicted`` when any
            test is, ``inconclusive`` otherwise.
        held_fixed: what the compared runs share.
        caveats: what to keep in mind reading the verdict.
        data: the paired values each test used, by test claim.
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`.
    """

    hypothesis: str
    claim: str
    study: str
    tests: list[TestResult]
    verdict: str
    held_fixed: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    definition: str = field(
        default="a hypothesis of the research program tested on paired runs of a "
        "study; see docs/hypotheses.md",
        kw_only=True,
    )
    bulky: ClassVar[tuple[str, ...]] = ()

    def scalars(self) -> dict[str, float]:
        """Each test's effect and p-value, by its position."""
        out: dict[str, float] = {}
        for i, t in enumerate(self.tests):
            out[f"test{i}_effect"] = float(t.effect)
            out[f"test{i}_p"] = float(t.p)
        return out

    def summary(self) -> str:
        """The verdict, each test on a line, then the caveats."""
        lines = [f"{self.hypothesis}: {self.claim}", f"  verdict: {self.verdict}"]
        lines += [f"  - {t.summary()}" for t in self.tests]
        if self.held_fixed:
            lines.append("  held fixed: " + "; ".join(self.held_fixed))
        lines += [f"  caveat: {c}" for c in self.caveats]
        return "\n".join(lines)


def _overall(tests: list[TestResult]) -> str:
    verdicts = {t.verdict for t in tests}
    if verdicts == {"supported"}:
        return "supported"
    if "contradicted" in verdicts:
        return "contradicted"
    return "inconclusive"


def _final(path: str | os.PathLike) -> pd.DataFrame:
    """One row per finished or diverged run: its last measured value of each column."""
    from lossgeom import study

    frame = study.load(path)
    frame = frame[frame["status"].isin(["finished", "diverged"])]
    runs = study.runs(path).set_index("run_id")
    final = frame.sort_values("step", kind="stable").groupby("run_id").last()
    final["stopped"] = runs.loc[final.index, "stopped"]
    return final


def _overrides(path: str | os.PathLike) -> dict[str, dict]:
    from lossgeom.study._store import INDEX, connect

    con = connect(Path(path) / INDEX, readonly=True)
    try:
        rows = con.execute("SELECT run_id, overrides FROM runs").fetchall()
    finally:
        con.close()
    return {r[0]: json.loads(r[1]) for r in rows}


def _pairs_by(
    final: pd.DataFrame, overrides: dict[str, dict], axis: str, low, high
) -> list[tuple[str, str]]:
    """``(run at low, run at high)`` of the runs equal but for ``axis``, same seed."""
    keyed: dict[str, dict] = {}
    for run_id, row in final.iterrows():
        other = {k: v for k, v in overrides[run_id].items() if k != axis}
        key = json.dumps([other, int(row["seed"])], sort_keys=True)
        keyed.setdefault(key, {})[row[axis]] = run_id
    return [(d[low], d[high]) for d in keyed.values() if low in d and high in d]


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _column(final: pd.DataFrame, names: tuple[str, ...], what: str, fix: str) -> str:
    for name in names:
        if name in final.columns and final[name].notna().any():
            return name
    raise ValueError(
        f"the study has no {what} (looked for columns {list(names)}); {fix}"
    )


H1_FILE = "examples/studies/batch_size.yaml"


def h1(
    path: str | os.PathLike,
    *,
    alpha: float = 0.05,
    lambda_max: str | None = None,
) -> HypothesisResult:
    """H1: a smaller batch gives a lower ``lambda_max`` and a lower test error.

    Runs that differ only in ``batch_size`` (same seed, same other settings) are
    paired, smallest against largest batch. Three tests, Holm-adjusted as one
    family, each reported on its own:

    1. batch -> curvature: ``lambda_max`` of the small-batch minimum minus the
       large-batch one (paired t-test, expected negative);
    2. curvature -> generalization: OLS of ``test_error`` on ``lambda_max`` with
       ``log2(batch_size)`` as a covariate (the slope of ``lambda_max``,
       expected positive);
    3. the total effect: test error small minus large batch (paired t-test,
       expected negative).

    Minima are compared "at the same train loss" when the runs stopped at one
    (``stop.train_loss``); otherwise at their last step, with a caveat.

    Args:
        path: the study directory.
        alpha: the significance level.
        lambda_max: the column of the top Hessian eigenvalue (default: the
            ``eigenvalues`` probe, else the ``sharpness`` metric).

    Raises:
        ValueError: the study lacks two batch sizes, paired seeds, a curvature
            or a test error column (the message names the study file to run).
    """
    final = _final(path)
    overrides = _overrides(path)
    fix = f"run a study like {H1_FILE}"
    _need(
        "batch_size" in final.columns and final["batch_size"].nunique() >= 2,
        "H1 needs runs at two or more batch sizes (grid: {batch_size: [16, 512]}); "
        f"this study has batch_size {sorted(final.get('batch_size', pd.Series()).dropna().unique().tolist())}; {fix}",
    )
    lam = lambda_max or _column(
        final,
        ("eigenvalues", "sharpness"),
        "top Hessian eigenvalue",
        f"add the probe {{name: eigenvalues, options: {{k: 1}}}} or metrics.sharpness; {fix}",
    )
    err = _column(final, ("test_error",), "test error", f"keep data.test true; {fix}")
    small, large = (
        sorted(final["batch_size"].unique())[0],
        sorted(final["batch_size"].unique())[-1],
    )
    pairs = _pairs_by(final, overrides, "batch_size", small, large)
    _need(
        len(pairs) >= 2,
        f"H1 pairs runs by seed at batch sizes {small} and {large}; found "
        f"{len(pairs)} pair(s), a paired test needs at least 2 (seeds: [0, 1, 2, 3, 4]); {fix}",
    )
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    link1 = paired_test(
        final.loc[a, lam].to_numpy(float),
        final.loc[b, lam].to_numpy(float),
        claim=f"lambda_max ({lam}) is lower at batch {small} than at {large}",
        expect="less",
        alpha=alpha,
    )
    frame = final[[err, lam, "batch_size"]].astype(float).dropna()
    frame["log2_batch_size"] = np.log2(frame["batch_size"])
    link2 = regression(
        frame.rename(columns={lam: "lambda_max", err: "test_error"}),
        "test_error",
        ["lambda_max", "log2_batch_size"],
        term="lambda_max",
        claim="test error grows with lambda_max at a given batch size",
        expect="greater",
        alpha=alpha,
    )
    total = paired_test(
        final.loc[a, err].to_numpy(float),
        final.loc[b, err].to_numpy(float),
        claim=f"test error is lower at batch {small} than at {large}",
        expect="less",
        alpha=alpha,
    )
    tests = holm([link1, link2, total])
    caveats = [
        "correlation is not causation: the regression links lambda_max and test "
        "error across runs, it does not show that one causes the other",
    ]
    stopped = final["stopped"].notna()
    if not stopped.all():
        caveats.append(
            f"{int((~stopped).sum())} of {len(final)} runs did not stop at a train "
            "loss: they are compared at their last step, not at equal train loss"
        )
    if "train_loss" in final:
        spread = final.loc[a + b, "train_loss"].astype(float)
        caveats.append(
            f"final train loss of the paired runs: {spread.min():.4g} to {spread.max():.4g}"
        )
    return HypothesisResult(
        hypothesis="H1",
        claim="smaller batch (more gradient noise) -> lower lambda_max at the "
        "minimum -> better test error at the same train loss",
        study=str(path),
        tests=tests,
        verdict=_overall(tests),
        held_fixed=["seed", "every swept setting but batch_size", "the learning rate"],
        caveats=caveats,
        data={
            "pairs": [[x, y] for x, y in pairs],
            "batch_sizes": [float(small), float(large)],
            "lambda_max": lam,
        },
        parameters={"alpha": alpha, "lambda_max": lam},
    )


H2_FILE = "examples/studies/skip_ablation.yaml"
_SKIP = "model.options.skip"


def h2(path: str | os.PathLike, *, alpha: float = 0.05) -> HypothesisResult:
    """H2: skip connections flatten the landscape.

    Runs that differ only in ``model.options.skip`` are paired by seed. One
    paired t-test per measure present in the study, Holm-adjusted together,
    each expecting smaller values with skips:

    * the number of spectral outliers and the largest one (the ``outliers``
      probe: ``outliers``, ``outliers_largest``);
    * the barrier between seeds (the ``interpolate`` pairwise probe), pairs of
      seeds matched between the two architectures;
    * the slice variance (the ``slice_1d`` probe: ``slice_1d_slice_variance``).

    Raises:
        ValueError: no skip axis, fewer than 2 paired seeds, or none of the
            measures (the message names the study file that has them).
    """
    from lossgeom import study

    final = _final(path)
    overrides = _overrides(path)
    fix = f"run a study like {H2_FILE}"
    _need(
        _SKIP in final.columns and set(final[_SKIP].dropna()) >= {True, False},
        f"H2 needs runs with and without skip connections (grid: {{{_SKIP}: "
        f"[true, false]}}); this study has no such axis; {fix}",
    )
    pairs = _pairs_by(final, overrides, _SKIP, True, False)
    _need(
        len(pairs) >= 2,
        f"H2 pairs runs by seed with and without skips; found {len(pairs)} pair(s), "
        f"a paired test needs at least 2 seeds; {fix}",
    )
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    tests, data = [], {}
    caveats = [
        "one architecture family and data set; the effect of skips may depend on "
        "depth, normalization and the learning rate",
    ]
    measures = {
        "outliers": "the number of spectral outliers",
        "outliers_largest": "the largest Hessian eigenvalue (outlier size)",
        "slice_1d_slice_variance": "the variance of the loss along random slices",
    }
    for column, what in measures.items():
        if column not in final.columns or final.loc[a + b, column].isna().any():
            continue
        x, y = (
            final.loc[a, column].to_numpy(float),
            final.loc[b, column].to_numpy(float),
        )
        tests.append(
            paired_test(
                x, y, claim=f"{what} is smaller with skips", expect="less", alpha=alpha
            )
        )
        data[column] = {"with": x.tolist(), "without": y.tolist()}
    barrier = _barriers(study.pairs(path), overrides)
    if barrier is not None:
        x, y = barrier
        tests.append(
            paired_test(
                x,
                y,
                claim="the barrier between seeds is lower with skips",
                expect="less",
                alpha=alpha,
            )
        )
        data["interpolate"] = {"with": x.tolist(), "without": y.tolist()}
        seeds = len(set(final.loc[a, "seed"]))
        if len(x) > seeds // 2:
            caveats.append(
                f"the {len(x)} barriers come from pairs of {seeds} seeds that share "
                "seeds, so they are not independent: the barrier test's p-value "
                "and interval are optimistic (disjoint pairs of seeds would be "
                "independent)"
            )
    _need(
        bool(tests),
        "H2 found none of its measures (probes outliers, slice_1d; pairwise "
        f"probe interpolate); {fix}",
    )
    tests = holm(tests)
    return HypothesisResult(
        hypothesis="H2",
        claim="skip connections flatten the landscape: smaller spectral outliers, "
        "lower barriers and lower slice variance",
        study=str(path),
        tests=tests,
        verdict=_overall(tests),
        held_fixed=["seed", "every swept setting but model.options.skip"],
        caveats=caveats,
        data=data,
        parameters={"alpha": alpha},
    )


def _barriers(pairs: pd.DataFrame, overrides: dict):
    """Barriers with and without skips, pairs of seeds matched, or ``None``."""
    if "interpolate" not in pairs.columns or _SKIP not in pairs.columns:
        return None
    done = pairs[pairs["status"] == "finished"]
    keyed: dict[str, dict] = {}
    for _, row in done.iterrows():
        other = {k: v for k, v in overrides[row["run_a"]].items() if k != _SKIP}
        key = json.dumps(
            [other, int(row["seed_a"]), int(row["seed_b"])], sort_keys=True
        )
        keyed.setdefault(key, {})[bool(row[_SKIP])] = float(row["interpolate"])
    matched = [(d[True], d[False]) for d in keyed.values() if True in d and False in d]
    if len(matched) < 2 or any(math.isnan(v) for m in matched for v in m):
        return None
    return np.array([m[0] for m in matched]), np.array([m[1] for m in matched])


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
    trace per parameter, in ``data``. The barrier between early seeds is not
    used (pairwise probes run on final weights only).

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
    done = table[~table["diverged"]].dropna(
        subset=["final_loss", "early_loss", *features]
    )
    # the features span orders of magnitude (eos_ratio from 0.01 to 100s):
    # the linear models see their logarithms
    done = done.assign(
        **{c: np.log10(done[c].clip(lower=1e-12)) for c in [*features, "early_loss"]}
    )
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
    labels = table["diverged"].to_numpy()
    if labels.any() and not labels.all():
        data["auroc_divergence"] = {
            "eos_ratio": auroc(table["eos_ratio"], labels).value,
            "trace_per_param": auroc(table["trace_per_param"], labels).value,
        }
    return HypothesisResult(
        hypothesis="H5",
        claim="early landscape probes (lambda_max against 2/lr, trace/D, slice "
        "variance) predict optimization difficulty better than the trace alone",
        study=str(path),
        tests=tests,
        verdict=_overall(tests),
        held_fixed=[
            f"features from the first {early_fraction:.0%} of each run's steps"
        ],
        caveats=[
            "linear models of a few features; a non-linear model might rank the features differently",
            "the barrier between early seeds is not among the features (pairwise probes run on final weights)",
        ],
        data=data,
        parameters={"alpha": alpha, "early_fraction": early_fraction},
    )


HYPOTHESES = {"h1": h1, "h2": h2, "h5": h5}
"""The analyses by name."""


def analyze(
    path: str | os.PathLike, hypothesis: str, *, alpha: float = 0.05, save: bool = True
) -> HypothesisResult:
    """Run one analysis on a study and store its result in the study directory.

    The result goes to ``<study>/analysis/<hypothesis>/`` (reload it with
    :func:`lossgeom.load_result`).

    Raises:
        ValueError: an unknown hypothesis, or a study that lacks what it needs.
    """
    from lossgeom._results import save_result

    name = hypothesis.lower()
    if name not in HYPOTHESES:
        raise ValueError(
            f"unknown hypothesis {hypothesis!r}; the analyses are {sorted(HYPOTHESES)}"
        )
    result = HYPOTHESES[name](path, alpha=alpha)
    if save:
        save_result(result, Path(path) / "analysis" / name)
    return result
