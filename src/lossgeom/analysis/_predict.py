"""Prediction scores: cross-validated R^2 and the area under the ROC curve."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats as st

from lossgeom._results import timed
from lossgeom.analysis._base import (
    Score,
    TestResult,
    _low_n,
    _vector,
    decide_verdict,
)

__all__ = [
    "auroc",
    "compare_cv_r2",
    "cv_r2",
]


# ------------------------------------------------------- prediction scores
def _design(X: Any, n: int) -> np.ndarray:
    arr = np.asarray(X, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(
            f"X must have one row per value of y ({n}); got shape {arr.shape}. "
            "Pass an (n, p) array or one column."
        )
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise ValueError(
            f"X has {bad} non-finite values; drop those rows (and their y)."
        )
    return np.column_stack([np.ones(n), arr])


def cv_r2(
    X: Any,
    y: Sequence[float] | np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
) -> Score:
    """Out-of-fold R^2 of least squares (with an intercept) of ``y`` on ``X``.

    The rows are shuffled (``seed``) and split into ``folds`` parts; each part
    is predicted by least squares (``numpy.linalg.lstsq``) fitted on the
    others, and ``R^2 = 1 - sum (y - yhat_oof)^2 / sum (y - mean y)^2`` (can be
    negative: worse than the mean). ``stderr`` is the standard deviation of the
    per-fold values over ``sqrt(folds)`` -- rough, folds are not independent.

    Args:
        X: regressors, shape ``(n, p)`` or ``(n,)``.
        y: the response, shape ``(n,)``.
        folds: the number of folds (at least 2).
        seed: seed of the shuffle.

    Returns:
        A :class:`Score` named ``"out-of-fold R^2"``; per-fold values in
        ``details``.

    Raises:
        ValueError: shapes that disagree, non-finite values, or folds too small
            to fit.

    Example:
        >>> x = np.arange(20.0)
        >>> round(cv_r2(x, 2 * x + 1).value, 6)
        1.0
    """
    yv = _vector(y, "y")
    n = yv.size
    A = _design(X, n)
    p = A.shape[1]
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer of at least 2; got {folds!r}.")
    if n - math.ceil(n / folds) < p + 1 or n < folds:
        raise ValueError(
            f"{n} rows are too few for {folds} folds with {p - 1} regressor(s): "
            f"each training part needs more than {p} rows. Use fewer folds or "
            "more data."
        )
    if not np.ptp(yv) > 0:
        raise ValueError("y is constant; R^2 is undefined.")
    with timed() as meter:
        order = np.random.default_rng(seed).permutation(n)
        pred = np.empty(n)
        for part in np.array_split(order, folds):
            train = np.setdiff1d(order, part)
            coef = np.linalg.lstsq(A[train], yv[train], rcond=None)[0]
            pred[part] = A[part] @ coef
        resid = (yv - pred) ** 2
        total = (yv - yv.mean()) ** 2
        per_fold = [
            float(1.0 - resid[part].sum() / total[part].sum())
            for part in np.array_split(order, folds)
        ]
        value = float(1.0 - resid.sum() / total.sum())
    return Score(
        name="out-of-fold R^2",
        value=value,
        stderr=float(np.std(per_fold, ddof=1) / math.sqrt(folds)),
        n=n,
        definition=(
            "out-of-fold R^2 = 1 - sum (y - yhat)^2 / sum (y - mean y)^2, yhat "
            "from least squares with an intercept fitted on the other folds; "
            "stderr: sd of the per-fold values / sqrt(folds) (rough)"
        ),
        parameters={"folds": folds, "seed": seed},
        details={"per_fold": per_fold},
        cost=meter.cost,
    )


def auroc(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[Any] | np.ndarray,
) -> Score:
    """Area under the ROC curve of ``scores`` for binary ``labels``.

    ``AUC = U / (n1 n0)`` with ``U`` the Mann-Whitney statistic of the positive
    scores against the negative ones (``scipy.stats.mannwhitneyu``): the
    probability that a random positive scores above a random negative, ties
    counting half. ``stderr`` follows Hanley and McNeil (1982); the two-sided
    p-value of ``AUC = 0.5`` is in ``details``.

    Args:
        scores: one score per unit (higher: predicted positive).
        labels: one label per unit, ``0``/``1`` or booleans.

    Returns:
        A :class:`Score` named ``"AUROC"``.

    Raises:
        ValueError: unequal lengths, non-finite scores, labels that are not
            binary, or a class without members.

    Example:
        >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]).value
        0.75
    """
    s = _vector(scores, "scores")
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size != s.size:
        raise ValueError(
            f"labels must be one per score ({s.size}); got shape {lab.shape}."
        )
    values = set(np.unique(lab).tolist())
    if not values <= {0, 1}:
        raise ValueError(
            f"labels must be 0/1 or booleans; got values {sorted(values, key=str)}. "
            "Map them first, e.g. labels = (y == positive)."
        )
    pos, neg = s[lab == 1], s[lab == 0]
    n1, n0 = pos.size, neg.size
    if n1 == 0 or n0 == 0:
        raise ValueError(
            f"AUROC needs both classes; got {n1} positives and {n0} negatives."
        )
    with timed() as meter:
        res = st.mannwhitneyu(pos, neg, alternative="two-sided")
        auc = float(res.statistic) / (n1 * n0)
        q1, q2 = auc / (2.0 - auc), 2.0 * auc**2 / (1.0 + auc)
        var = (
            auc * (1.0 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)
        ) / (n1 * n0)
    return Score(
        name="AUROC",
        value=auc,
        stderr=float(math.sqrt(max(var, 0.0))),
        n=int(s.size),
        definition=(
            "area under the ROC curve = U / (n1 n0), U the Mann-Whitney statistic "
            "of positives against negatives (ties count half); stderr by Hanley "
            "and McNeil (1982)"
        ),
        details={
            "positives": int(n1),
            "negatives": int(n0),
            "p_value": float(res.pvalue),
        },
        cost=meter.cost,
    )


def compare_cv_r2(
    X: Any,
    X_baseline: Any,
    y: Sequence[float] | np.ndarray,
    *,
    claim: str,
    folds: int = 5,
    repeats: int = 10,
    alpha: float = 0.05,
    seed: int = 0,
) -> TestResult:
    """Whether regressors ``X`` predict ``y`` better out of fold than a baseline.

    Both least-squares models are fitted and scored on the same ``folds`` x
    ``repeats`` train/test splits; the effect is the mean of the per-split
    differences of R^2 (``X`` minus ``X_baseline``). Splits share data, so a
    plain t-test over them would be far too confident; the test is the
    corrected resampled t-test of Nadeau and Bengio (2003, "Inference for the
    generalization error", Machine Learning 52), which inflates the variance
    by ``1 / J + n_test / n_train`` (``J`` splits) and uses ``scipy.stats.t``
    with ``J - 1`` degrees of freedom. scipy and statsmodels have no such test,
    hence this function.

    Args:
        X: the candidate regressors, ``(n, p)`` or ``(n,)``.
        X_baseline: the baseline regressors, same rows.
        y: the response.
        claim: the claim, in words.
        folds: folds per repeat.
        repeats: shuffles.
        alpha: the significance level (expected direction: greater).
        seed: seed of the shuffles.

    Raises:
        ValueError: shapes that disagree, too few rows for the folds, a
            constant ``y``.
    """
    yv = _vector(y, "y")
    n = yv.size
    A, B = _design(X, n), _design(X_baseline, n)
    if n < 2 * folds or n - math.ceil(n / folds) <= max(A.shape[1], B.shape[1]):
        raise ValueError(
            f"{n} rows are too few for {folds} folds with {A.shape[1] - 1} "
            "regressors; use fewer folds or more runs."
        )
    if not np.ptp(yv) > 0:
        raise ValueError("y is constant; R^2 is undefined.")
    rng = np.random.default_rng(seed)
    diffs, n_test = [], []
    with timed() as meter:
        for _ in range(repeats):
            order = rng.permutation(n)
            for part in np.array_split(order, folds):
                train = np.setdiff1d(order, part)
                total = ((yv[part] - yv[train].mean()) ** 2).sum()
                scores = []
                for D in (A, B):
                    coef = np.linalg.lstsq(D[train], yv[train], rcond=None)[0]
                    scores.append(
                        1.0 - ((yv[part] - D[part] @ coef) ** 2).sum() / total
                    )
                diffs.append(scores[0] - scores[1])
                n_test.append(part.size)
        d = np.asarray(diffs)
        J = d.size
        ratio = float(np.mean(n_test)) / (n - float(np.mean(n_test)))
        var = float(d.var(ddof=1)) * (1.0 / J + ratio)
        se = math.sqrt(var) if var > 0 else math.nan
        mean = float(d.mean())
        t = mean / se if se > 0 else math.nan
        p = float(2 * st.t.sf(abs(t), J - 1)) if math.isfinite(t) else math.nan
        half = float(st.t.ppf(1 - alpha / 2, J - 1)) * se if se > 0 else math.nan
    caveats = _low_n(n, "runs")
    return TestResult(
        claim=claim,
        test="corrected resampled t-test (Nadeau and Bengio 2003) over "
        f"{repeats} x {folds}-fold splits, two-sided",
        n=n,
        effect=mean,
        effect_name="mean out-of-fold R^2 gain over the baseline",
        ci_low=mean - half,
        ci_high=mean + half,
        confidence=1.0 - alpha,
        p_value=p,
        alpha=alpha,
        expect="greater",
        verdict=decide_verdict(mean, p, alpha=alpha, expect="greater"),
        stderr=se,
        caveats=caveats,
        definition=(
            "difference of out-of-fold R^2 of two least-squares models on the "
            "same splits; variance corrected for overlapping training sets"
        ),
        parameters={"folds": folds, "repeats": repeats, "seed": seed, "alpha": alpha},
        details={"t": t, "df": J - 1, "splits": J},
        cost=meter.cost,
    )
