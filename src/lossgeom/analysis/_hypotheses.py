"""The research program's hypotheses as analyses of a study, each with a verdict.

Each analysis reads a study directory (:func:`lossgeom.study.load`,
:func:`lossgeom.study.pairs`), pairs runs that differ only in the factor under
test (same seed, same other settings), runs one test per link or measure with
:mod:`lossgeom.analysis` and returns a :class:`HypothesisResult`: the tests, a
verdict and the caveats. An analysis refuses a study that lacks what it needs,
saying what is missing and which study file provides it. H1 and H2 live here;
H3 (escape), H5 (early probes) and H4 (bounds) in their own modules.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from lossgeom.analysis._bounds import h4
from lossgeom.analysis._early import h5
from lossgeom.analysis._escape import h3
from lossgeom.analysis._regression import regression
from lossgeom.analysis._stats import holm, paired_test
from lossgeom.analysis._verdicts import (
    HypothesisResult,
    _column,
    _final,
    _need,
    _overall,
    _overrides,
    _pairs_by,
)

__all__ = ["HYPOTHESES", "HypothesisResult", "analyze", "h1", "h2", "h3", "h4", "h5"]

H1_FILE = "examples/studies/h1.yaml"


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


H2_FILE = "examples/studies/h2.yaml"
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


HYPOTHESES = {"h1": h1, "h2": h2, "h3": h3, "h4": h4, "h5": h5}
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
