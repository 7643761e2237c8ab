"""H4: PAC-Bayes bounds with a Hessian-informed posterior against the naive ones.

Every finished run of the study carries the ``pac_bayes`` probe at its final
weights (:func:`lossgeom.theory.pac_bayes_bounds`): three bounds on the 0-1
test error of the same trained network, valid together at one confidence. This
module compares them over the runs, paired by run.
"""

from __future__ import annotations

import os

import numpy as np

from lossgeom.analysis._stats import holm, paired_test
from lossgeom.analysis._verdicts import HypothesisResult, _final, _need, _overall

__all__ = ["H4_FILE", "h4"]

H4_FILE = "examples/studies/h4.yaml"
_BOUNDS = ("parameter_count", "isotropic", "hessian")


def h4(
    path: str | os.PathLike, *, alpha: float = 0.05, key: str = "pac_bayes"
) -> HypothesisResult:
    """H4: a Hessian-informed PAC-Bayes posterior gives tighter bounds.

    On each finished run's final ``pac_bayes`` probe, two paired t-tests of the
    bound differences over the runs (each run one unit), Holm-adjusted as one
    family, both expecting the Hessian-informed bound to be lower:

    1. Hessian-informed posterior minus the parameter-count (Occam) bound;
    2. Hessian-informed posterior minus the isotropic posterior.

    The effects say by how much (mean difference with its interval); ``data``
    holds every run's three bounds with its train and test error, and how many
    of each bound are vacuous (1 to within 1e-6: no better than saying nothing).

    Args:
        path: the study directory.
        alpha: the significance level.
        key: the probe's key in the study file.

    Raises:
        ValueError: no finished run has the probe, or fewer than 2 runs do.
    """
    fix = f"run a study like {H4_FILE}"
    final = _final(path)
    final = final[final["status"] == "finished"]
    columns = [f"{key}_{b}" for b in _BOUNDS]
    _need(
        all(c in final.columns for c in columns),
        f"H4 needs the probe {{name: pac_bayes, at: final}} (columns {columns}); "
        f"this study has none; {fix}",
    )
    runs = final.dropna(subset=columns)
    _need(
        len(runs) >= 2,
        f"H4 compares bounds over trained networks; {len(runs)} finished run(s) "
        f"have the pac_bayes probe, a paired test needs at least 2; {fix}",
    )
    bounds = {b: runs[f"{key}_{b}"].to_numpy(float) for b in _BOUNDS}
    tests = holm(
        [
            paired_test(
                bounds["hessian"],
                bounds[other],
                claim=f"the Hessian-informed PAC-Bayes bound is lower than the {what}",
                expect="less",
                alpha=alpha,
            )
            for other, what in (
                ("parameter_count", "parameter-count bound"),
                ("isotropic", "isotropic-posterior bound"),
            )
        ]
    )
    data = {
        "runs": list(runs.index),
        **{b: v.tolist() for b, v in bounds.items()},
        "vacuous": {b: int((v >= 1 - 1e-6).sum()) for b, v in bounds.items()},
        "tightest": {
            b: int((np.argmin(np.stack(list(bounds.values())), 0) == i).sum())
            for i, b in enumerate(_BOUNDS)
        },
    }
    for extra in ("train_error", "test_error"):
        column = f"{key}_{extra}"
        if column in runs:
            data[extra] = runs[column].to_numpy(float).tolist()
    return HypothesisResult(
        hypothesis="H4",
        claim="PAC-Bayes bounds with a Hessian-informed posterior covariance beat "
        "naive parameter-count bounds (and the isotropic posterior)",
        study=str(path),
        tests=tests,
        verdict=_overall(tests),
        held_fixed=[
            "the trained network, its training sample and the confidence: the "
            "three bounds of a run hold together at 1 - (delta + mc_delta)",
        ],
        caveats=[
            "the posteriors are chosen from small grids, not optimized on the "
            "bound as Dziugaite & Roy (2017) did; tighter bounds may exist for "
            "every family",
            "a bound is about the 0-1 error of the posterior (or of the quantized "
            "network), not of the trained network itself",
            "the runs of a study share architecture and data, so the comparison "
            "holds for them, not for networks in general",
        ],
        data=data,
        parameters={"alpha": alpha, "key": key},
    )
