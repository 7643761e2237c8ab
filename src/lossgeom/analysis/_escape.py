"""H3: escape from a sharp minimum, with the real gradient noise and isotropic noise.

The study (``examples/studies/h3.yaml``) starts every run of a seed at the same
minimum reached by full-batch gradient descent (``start``), then continues with
SGD at several batch sizes, with the minibatch noise as it is
(``optim.noise: sgd``) or replaced by isotropic noise of the same norm, step by
step (``optim.noise: isotropic``). Probes at step 0 measure the noise's
alignment with the Hessian (``noise_alignment``: kappa) and the escape indicator
tr(H Sigma) (``noise_curvature``), of the per-sample noise; this module scales
them to each run's minibatch and noise shape and relates them to the step at
which the run escapes.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import numpy as np
import pandas as pd

from lossgeom.analysis._stats import holm, paired_test
from lossgeom.analysis._survival import hazard_regression

__all__ = ["H3_FILE", "escape_times", "h3"]

H3_FILE = "examples/studies/h3.yaml"
_NOISE = "optim.noise"


def _first_crossing(
    group: pd.DataFrame, column: str, threshold: float, criterion: str
) -> tuple[float, bool]:
    """The first step after 0 past ``threshold`` (below it for sharpness), or the last."""
    rows = group[group[column].notna()].sort_values("step")
    later = rows[rows["step"] > 0]
    values = later[column].to_numpy(float)
    hits = later[
        values <= threshold if criterion == "sharpness" else values >= threshold
    ]
    if len(hits):
        return float(hits["step"].iloc[0]), True
    return float(rows["step"].iloc[-1]), False


def _probe_results(path: str | os.PathLike, key: str) -> dict[str, object]:
    """The step-0 result of probe ``key`` of each run, by run id."""
    from lossgeom import study
    from lossgeom._results import load_result

    stored = study.results(path)
    stored = stored[(stored["key"] == key) & (stored["step"] == 0)]
    return {row.owner: load_result(row.path) for row in stored.itertuples()}


def escape_times(
    path: str | os.PathLike,
    *,
    criterion: Literal["sharpness", "loss"] = "sharpness",
    fraction: float = 0.8,
    rise: float = 2.0,
) -> pd.DataFrame:
    """One row per run of an escape study: when it escaped, and the noise at the start.

    **Escape criterion.** ``sharpness`` (default): the first metrics step after
    0 at which the top Hessian eigenvalue is at most ``fraction`` times its value
    at step 0 -- the run has left the sharp minimum for a flatter region.
    ``loss``: the first metrics step at which the train loss is at least
    ``rise`` times its value at step 0. A run that never meets it within its
    steps is censored at its last metrics step (``escaped`` false). The
    resolution is ``metrics.every`` steps.

    **The noise at the start**, for a minibatch of ``B`` of the ``N`` training
    samples drawn without replacement (covariance factor
    ``f = (N - B) / (B (N - 1))`` times the per-sample covariance Sigma):

    * ``trace_sigma``: ``f tr(Sigma)``, the same for both noise shapes;
    * ``trace_h_sigma``: ``f tr(H Sigma)`` for the real noise,
      ``f tr(H) tr(Sigma) / D`` for isotropic noise of the same total variance;
    * ``kappa``: the alignment of the top-``k`` eigenspaces of Sigma and H for
      the real noise; ``k / D`` (a random subspace's) for isotropic noise.

    Args:
        path: the study directory.
        criterion: ``sharpness`` or ``loss``.
        fraction: the sharpness criterion's fraction, in (0, 1).
        rise: the loss criterion's factor, > 1.

    Returns:
        A DataFrame indexed by run id: ``seed``, ``batch_size``, ``noise``,
        ``step`` (escape or censoring step), ``escaped``, ``sharpness0``,
        ``train_loss0``, ``trace_sigma``, ``trace_h_sigma``, ``kappa``,
        ``ratio`` (``trace_h_sigma`` over its isotropic value).

    Raises:
        ValueError: a bad criterion, or a study without the columns and probes
            it needs (the message names the study file that has them).
    """
    from lossgeom import study

    if criterion not in ("sharpness", "loss"):
        raise ValueError(f"criterion must be 'sharpness' or 'loss'; got {criterion!r}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), e.g. 0.8; got {fraction!r}")
    if not rise > 1:
        raise ValueError(f"rise must be > 1, e.g. 2.0; got {rise!r}")
    fix = f"run a study like {H3_FILE}"
    frame = study.load(path)
    frame = frame[frame["status"].isin(["finished", "diverged"])]
    column = "sharpness" if criterion == "sharpness" else "train_loss"
    for needed, how in (
        (column, "metrics.sharpness: true" if column == "sharpness" else "metrics"),
        ("batch_size", "grid: {batch_size: [4, 8, 16]}"),
    ):
        if needed not in frame.columns or frame[needed].isna().all():
            raise ValueError(f"H3 needs {needed} in the study ({how}); {fix}")
    curvature = _probe_results(path, "noise_curvature")
    alignment = _probe_results(path, "noise_alignment")
    if not curvature or not alignment:
        missing = [
            k
            for k, v in (("noise_curvature", curvature), ("noise_alignment", alignment))
            if not v
        ]
        raise ValueError(
            f"H3 needs the probes {missing} at step 0 (probes: [{{name: "
            f"noise_curvature, at: {{steps: [0]}}}}, ...]); {fix}"
        )
    rows = []
    for run_id, group in frame.groupby("run_id"):
        if run_id not in curvature or run_id not in alignment:
            continue
        start = group[group["step"] == 0]
        if start.empty or start[column].isna().all():
            continue
        first = float(start[column].iloc[0])
        threshold = (fraction if criterion == "sharpness" else rise) * first
        step, escaped = _first_crossing(group, column, threshold, criterion)
        rows.append(
            {
                "run_id": run_id,
                "seed": int(group["seed"].iloc[0]),
                "batch_size": int(group["batch_size"].iloc[0]),
                "noise": str(group[_NOISE].iloc[0]) if _NOISE in group else "sgd",
                "step": step,
                "escaped": escaped,
                "sharpness0": float(start["sharpness"].iloc[0])
                if "sharpness" in start
                else math.nan,
                "train_loss0": float(start["train_loss"].iloc[0]),
                **_noise_at_start(curvature[run_id], alignment[run_id], group),
            }
        )
    if not rows:
        raise ValueError(
            f"no run of the study has {column} at step 0 and both probes; {fix}"
        )
    return pd.DataFrame(rows).set_index("run_id")


def _noise_at_start(curv, align, group: pd.DataFrame) -> dict[str, float]:
    """The minibatch noise's trace, tr(H Sigma) and kappa of one run (see above)."""
    n, d = int(curv.n_samples), int(curv.dim)
    b = int(group["batch_size"].iloc[0])
    isotropic = _NOISE in group and group[_NOISE].iloc[0] == "isotropic"
    factor = (n - b) / (b * (n - 1)) if b < n else 0.0
    k = len(align.cosines)
    trace_h_sigma = factor * (curv.isotropic if isotropic else curv.value)
    return {
        "trace_sigma": factor * curv.trace_sigma,
        "trace_h_sigma": trace_h_sigma,
        "kappa": k / d if isotropic else float(align.kappa),
        "ratio": 1.0 if isotropic else float(curv.ratio),
    }


def h3(
    path: str | os.PathLike,
    *,
    alpha: float = 0.05,
    criterion: Literal["sharpness", "loss"] = "sharpness",
    fraction: float = 0.8,
    rise: float = 2.0,
):
    """H3: noise aligned with the Hessian escapes a sharp minimum faster.

    On the runs of :func:`escape_times` (its criterion and covariates), three
    tests, Holm-adjusted as one family:

    1. the anchor ordering (Zhu et al. 2019): at the same seed and batch size,
       the real gradient noise escapes earlier than isotropic noise of the same
       norm (Wilcoxon signed-rank on the escape steps, censored runs at their
       last step; pairs where neither escaped drop out as ties);
    2. alignment predicts escape with the noise's size held fixed: Cox
       regression of the escape time on kappa and log tr(Sigma_B), stratified
       by seed (the start point), testing kappa (expected: a higher hazard);
    3. Zhu et al.'s indicator: Cox regression on log tr(H Sigma_B) alone,
       stratified by seed (expected: a higher hazard).

    Args:
        path: the study directory.
        alpha: the significance level.
        criterion: the escape criterion (see :func:`escape_times`).
        fraction: the sharpness criterion's fraction.
        rise: the loss criterion's factor.

    Returns:
        A :class:`~lossgeom.analysis.HypothesisResult`; ``data["runs"]`` holds
        the table the tests used.

    Raises:
        ValueError: the study lacks what H3 needs (named, with the study file).
    """
    from lossgeom.analysis._verdicts import HypothesisResult, _overall

    table = escape_times(path, criterion=criterion, fraction=fraction, rise=rise)
    fix = f"run a study like {H3_FILE}"
    if set(table["noise"]) < {"sgd", "isotropic"}:
        raise ValueError(
            f"H3 compares the real and isotropic noise (grid: {{{_NOISE}: [sgd, "
            f"isotropic]}}); this study has noise {sorted(set(table['noise']))}; {fix}"
        )
    if table["seed"].nunique() < 2 or table["batch_size"].nunique() < 2:
        raise ValueError(
            f"H3 needs at least 2 seeds and 2 batch sizes; found seeds "
            f"{sorted(table['seed'].unique())} and batch sizes "
            f"{sorted(table['batch_size'].unique())}; {fix}"
        )
    if not table["escaped"].any():
        raise ValueError(
            f"no run escaped by the {criterion} criterion (fraction {fraction}, rise "
            f"{rise}): nothing to compare. Train longer, use a larger learning rate "
            f"or smaller batches, or loosen the criterion; {fix}"
        )
    pairs = table.reset_index().pivot_table(
        index=["seed", "batch_size"], columns="noise", values="step", aggfunc="first"
    )
    pairs = pairs.dropna(subset=["sgd", "isotropic"])
    ordering = paired_test(
        pairs["sgd"].to_numpy(float),
        pairs["isotropic"].to_numpy(float),
        claim="the real gradient noise escapes earlier than isotropic noise of "
        "the same norm",
        expect="less",
        alpha=alpha,
        method="wilcoxon",
    )
    frame = table.assign(
        log_trace_sigma=np.log(table["trace_sigma"]),
        log_trace_h_sigma=np.log(table["trace_h_sigma"].clip(lower=1e-300)),
        event=table["escaped"].astype(float),
    )
    alignment = hazard_regression(
        frame,
        "step",
        "event",
        ["kappa", "log_trace_sigma"],
        claim="higher alignment kappa of the noise with the Hessian escapes "
        "earlier, at the same noise variance",
        expect="greater",
        strata="seed",
        alpha=alpha,
    )
    indicator = hazard_regression(
        frame,
        "step",
        "event",
        ["log_trace_h_sigma"],
        claim="a larger tr(H Sigma) of the noise escapes earlier",
        expect="greater",
        strata="seed",
        alpha=alpha,
    )
    tests = holm([ordering, alignment, indicator])
    escaped = table.groupby(["noise", "batch_size"])["escaped"].mean()
    return HypothesisResult(
        hypothesis="H3",
        claim="alignment between the top eigendirections of the Hessian and of "
        "the gradient-noise covariance predicts faster escape from sharp minima",
        study=str(path),
        tests=tests,
        verdict=_overall(tests),
        held_fixed=[
            "the start: each seed's minimum reached by full-batch descent",
            "the learning rate",
            "within a pair: seed, batch size and the noise's norm at every step",
        ],
        caveats=[
            "kappa of the real noise varies only across seeds (it does not depend "
            "on the batch size); isotropic noise has kappa = k/D by construction, "
            "so the alignment test mostly contrasts the two noise shapes",
            f"escape is measured every metrics row (criterion {criterion}); "
            "runs that did not escape are censored at their last step",
            "one network, one data set and one learning rate; the ordering is the "
            "anchor's (Zhu et al. 2019), not a general law",
        ],
        data={
            "runs": table.reset_index().to_dict(orient="list"),
            "escaped_fraction": {
                f"{noise} batch {b}": float(v) for (noise, b), v in escaped.items()
            },
        },
        parameters={
            "alpha": alpha,
            "criterion": criterion,
            "fraction": fraction,
            "rise": rise,
        },
    )
