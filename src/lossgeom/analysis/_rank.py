"""Rank correlation: Kendall's tau and the granulated Kendall coefficient."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import scipy.stats as st

from lossgeom._results import timed
from lossgeom.analysis._base import (
    _BATCH_ELEMENTS,
    Expect,
    GranulatedKendall,
    TestResult,
    _check_alpha,
    _check_expect,
    _low_n,
    _result,
    _same_length,
    _vector,
)
from lossgeom.analysis._regression import _columns, _numeric
from lossgeom.analysis._stats import _bootstrap

__all__ = [
    "granulated_kendall",
    "kendall",
]


# ------------------------------------------------------------------ kendall
def _tau_b_weighted(x: np.ndarray, y: np.ndarray) -> Callable[..., np.ndarray]:
    """Kendall's tau-b of resamples given as index arrays, computed at once.

    A resample with counts ``w`` (how often each unit is drawn) has
    ``tau_b = w'Sw / sqrt(w'Xw w'Yw)`` with ``S_ij = sign(x_i - x_j) sign(y_i -
    y_j)``, ``X_ij = sign(x_i - x_j)^2`` and ``Y_ij`` alike: ``w'Sw`` counts twice
    the concordant minus discordant pairs and ``w'Xw`` twice the pairs untied in
    ``x``; copies of one unit are tied in both and drop out, as in tau-b. A
    resample with all values tied (tau undefined) counts as 0.
    """
    n = x.size
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    mats = np.concatenate([sx * sy, sx * sx, sy * sy], axis=1)  # (n, 3n)

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.moveaxis(np.asarray(idx), axis, -1)
        flat = idx.reshape(-1, idx.shape[-1]).astype(np.int64)
        rows = flat.shape[0]
        offsets = (n * np.arange(rows, dtype=np.int64))[:, None]
        w = np.bincount((flat + offsets).ravel(), minlength=rows * n)
        w = w.reshape(rows, n).astype(float)
        prod = w @ mats
        num, vx, vy = (
            np.einsum("ri,ri->r", prod[:, s * n : (s + 1) * n], w) for s in range(3)
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            tau = num / np.sqrt(vx * vy)
        return np.nan_to_num(tau, nan=0.0).reshape(idx.shape[:-1])

    return statistic


def kendall(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    claim: str,
    expect: Expect = "two-sided",
    alpha: float = 0.05,
    n_resamples: int = 9999,
    seed: int = 0,
) -> TestResult:
    """Kendall's rank correlation tau-b of ``x`` and ``y``, with a bootstrap interval.

    The test is ``scipy.stats.kendalltau`` (exact p-value for small samples
    without ties, normal approximation otherwise); the interval is a bootstrap
    over units (BCa, else percentile), computed for all resamples at once
    (memory ``O(n^2)``).

    Args:
        x: one value per unit (e.g. a measure).
        y: the paired values (e.g. the generalization gap).
        claim: the claim in words.
        expect: the expected sign of tau.
        alpha: the significance level (the interval has level ``1 - alpha``).
        n_resamples: bootstrap resamples.
        seed: seed of the bootstrap.

    Returns:
        A :class:`TestResult` with effect tau-b.

    Raises:
        ValueError: fewer than 3 units, unequal lengths or non-finite values.

    Example:
        >>> r = kendall([1, 2, 3, 4, 5, 6, 7, 8], [1, 3, 2, 4, 6, 5, 8, 7],
        ...             claim="x ranks y", expect="greater", n_resamples=999)
        >>> r.verdict, round(r.effect, 3)
        ('supported', 0.786)
    """
    _check_expect(expect)
    _check_alpha(alpha)
    u, v = _vector(x, "x"), _vector(y, "y")
    _same_length(u, v, "x and y")
    n = u.size
    if n < 3:
        raise ValueError(
            f"Kendall's tau needs at least 3 units (more than 5 for a p-value "
            f"that can fall below 0.05); got {n}."
        )
    caveats = _low_n(n, "units")
    caveats.append("correlation is not causation")
    with timed() as meter:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = st.kendalltau(u, v)
        tau, p = float(res.statistic), float(res.pvalue)
        if math.isnan(tau):
            caveats.append("x or y is constant: tau is undefined")
            low = high = se = math.nan
            ci_method = "none"
        else:
            low, high, se, ci_method = _bootstrap(
                (np.arange(n),),
                _tau_b_weighted(u, v),
                confidence=1.0 - alpha,
                n_resamples=n_resamples,
                seed=seed,
                batch=max(1, _BATCH_ELEMENTS // (3 * n)),
            )
    ties = n - len(np.unique(u)), n - len(np.unique(v))
    if any(ties):
        caveats.append(f"ties (x: {ties[0]}, y: {ties[1]}) handled by tau-b")
    return _result(
        claim=claim,
        test="Kendall's tau-b (scipy.stats.kendalltau), two-sided",
        n=n,
        effect=tau,
        effect_name="Kendall tau-b",
        ci=(low, high),
        p_value=p,
        alpha=alpha,
        expect=expect,
        stderr=se,
        caveats=caveats,
        definition=(
            "Kendall's (1938, 1945) rank correlation tau-b of x and y; interval: "
            f"bootstrap over units ({ci_method})"
        ),
        parameters={
            "expect": expect,
            "alpha": alpha,
            "n_resamples": n_resamples,
            "seed": seed,
        },
        details={"ci_method": ci_method, "ties_x": ties[0], "ties_y": ties[1]},
        cost=meter.cost,
    )


def granulated_kendall(
    frame: pd.DataFrame,
    measure: str,
    target: str,
    axes: list[str],
) -> GranulatedKendall:
    """The granulated Kendall coefficient Psi of Jiang et al. (2020).

    Jiang, Neyshabur, Mobahi, Krishnan and Bengio, "Fantastic generalization
    measures and where to find them", ICLR 2020, Section 4: for each
    hyper-parameter axis ``i``,
    ``psi_i = mean over the groups in which every other axis is held fixed of
    tau(measure, target within the group)``, and ``Psi = mean_i psi_i``. It
    asks whether the measure ranks the target correctly when *only* axis ``i``
    changes.

    Rows with the same value on every axis (replicates, e.g. seeds) are
    averaged first, so each hyper-parameter setting is one point. Within a
    group: fewer than 2 settings along axis ``i`` -- skipped; a constant target
    -- skipped (nothing to rank); a constant measure while the target varies --
    tau 0 (no credit). An axis without any group is NaN and left out of Psi.
    Kendall's tau is tau-b (``scipy.stats.kendalltau``).

    Args:
        frame: one row per run (e.g. final values of a study).
        measure: the measure column (e.g. ``"sharpness"``).
        target: the target column (e.g. ``"generalization_gap"``).
        axes: the hyper-parameter columns (e.g. ``["optim.lr", "batch_size"]``).

    Returns:
        A :class:`GranulatedKendall`: ``value`` (Psi), ``per_axis``,
        ``n_groups``; ``details`` holds the skipped groups per axis and the
        overall tau over all settings.

    Raises:
        TypeError: ``frame`` is not a DataFrame.
        ValueError: unknown or non-numeric columns, missing values, no axes.

    Example:
        >>> df = pd.DataFrame({"a": [0, 1, 0, 1], "b": [0, 0, 1, 1],
        ...                    "gap": [0, 1, 1, 2], "m": [0, 1, -1, 0]})
        >>> g = granulated_kendall(df, "m", "gap", ["a", "b"])
        >>> g.per_axis, g.value
        ({'a': 1.0, 'b': -1.0}, 0.0)
    """
    if isinstance(axes, str):
        axes = [axes]
    axes = list(axes)
    if not axes:
        raise ValueError("axes must name at least one hyper-parameter column.")
    _columns(frame, [measure, target, *axes])
    if measure == target or {measure, target} & set(axes):
        raise ValueError(
            f"measure {measure!r}, target {target!r} and axes {axes} must be "
            "different columns."
        )
    values = _numeric(frame, [measure, target])
    keys = frame[axes]
    if keys.isna().any().any():
        counts = {k: int(v) for k, v in keys.isna().sum().items() if v}
        raise ValueError(
            f"missing hyper-parameter values in {counts}; fill or drop those rows."
        )
    with timed() as meter:
        cells = (
            pd.concat([keys, values], axis=1)
            .groupby(axes, sort=True)[[measure, target]]
            .mean()
            .reset_index()
        )
        per_axis: dict[str, float] = {}
        n_groups: dict[str, int] = {}
        skipped: dict[str, dict[str, int]] = {}
        for axis in axes:
            others = [a for a in axes if a != axis]
            groups = cells.groupby(others, sort=True) if others else [((), cells)]
            taus: list[float] = []
            skip = {"one_setting": 0, "constant_target": 0, "constant_measure": 0}
            for _, g in groups:
                if len(g) < 2:
                    skip["one_setting"] += 1
                elif g[target].nunique() < 2:
                    skip["constant_target"] += 1
                elif g[measure].nunique() < 2:
                    skip["constant_measure"] += 1  # counted as tau 0
                    taus.append(0.0)
                else:
                    taus.append(float(st.kendalltau(g[measure], g[target]).statistic))
            per_axis[axis] = float(np.mean(taus)) if taus else math.nan
            n_groups[axis] = len(taus)
            skipped[axis] = skip
        defined = [v for v in per_axis.values() if not math.isnan(v)]
        psi = float(np.mean(defined)) if defined else math.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            overall = float(st.kendalltau(cells[measure], cells[target]).statistic)
    return GranulatedKendall(
        value=psi,
        per_axis=per_axis,
        n_groups=n_groups,
        n=len(cells),
        parameters={"measure": measure, "target": target, "axes": axes},
        details={
            "skipped_groups": skipped,
            "undefined_axes": [a for a, v in per_axis.items() if math.isnan(v)],
            "tau_overall": overall,
            "replicates_averaged": int(len(frame) - len(cells)),
        },
        cost=meter.cost,
    )
