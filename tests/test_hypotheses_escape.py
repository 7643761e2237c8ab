"""H3 on a small real escape study: escape times, covariates, tests, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
from statsmodels.duration.hazard_regression import PHReg

import lossgeom as lg

BASE = {
    "model": {"name": "mlp", "options": {"width": 32, "depth": 2}},
    "data": {"name": "digits", "subset": 128},
    "loss": "mse",
    "optim": {"name": "sgd", "lr": 0.25},
    "start": {"steps": 1000, "lr": 0.05},
    "steps": 200,
    "metrics": {
        "every": 20,
        "eval_samples": None,
        "probe_samples": None,
        "sharpness_max_matvecs": 40,
    },
}
PROBES = [
    {"name": "noise_alignment", "at": {"steps": [0]}, "options": {"k": 3, "tol": 1e-3}},
    {"name": "noise_curvature", "at": {"steps": [0]}, "options": {"trace_probes": 30}},
]


@pytest.fixture(scope="module")
def escape_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("h3") / "study"
    spec = {
        "name": "h3",
        "base": BASE,
        "grid": {"batch_size": [4, 32], "optim.noise": ["sgd", "isotropic"]},
        "seeds": [0, 1, 2],
        "probes": PROBES,
    }
    assert lg.study.run(spec, out, progress=False).counts == {"finished": 12}
    return out


def _probe(path, run_id, key):
    stored = lg.study.results(path)
    row = stored[(stored["owner"] == run_id) & (stored["key"] == key)].iloc[0]
    return lg.load_result(row["path"])


def test_escape_times_follow_the_documented_criterion(escape_study):
    table = lg.analysis.escape_times(escape_study, fraction=0.8)
    frame = lg.study.load(escape_study)
    assert len(table) == 12
    for run_id, row in table.iterrows():
        rows = frame[frame["run_id"] == run_id].sort_values("step")
        s0 = rows["sharpness"].iloc[0]
        below = rows[(rows["step"] > 0) & (rows["sharpness"] <= 0.8 * s0)]
        if len(below):
            assert row["escaped"] and row["step"] == below["step"].iloc[0]
        else:
            assert not row["escaped"] and row["step"] == rows["step"].iloc[-1]
        curv = _probe(escape_study, run_id, "noise_curvature")
        align = _probe(escape_study, run_id, "noise_alignment")
        n, b = curv.n_samples, row["batch_size"]
        factor = (n - b) / (b * (n - 1))
        assert row["trace_sigma"] == pytest.approx(factor * curv.trace_sigma, rel=1e-12)
        if row["noise"] == "sgd":
            assert row["trace_h_sigma"] == pytest.approx(factor * curv.value, rel=1e-12)
            assert row["kappa"] == pytest.approx(align.kappa, rel=1e-12)
        else:
            assert row["trace_h_sigma"] == pytest.approx(
                factor * curv.trace_h * curv.trace_sigma / curv.dim, rel=1e-9
            )
            assert row["kappa"] == pytest.approx(3 / curv.dim, rel=1e-12)
    # every run of a seed starts at the same point, whatever its batch or noise
    assert table.groupby("seed")["sharpness0"].nunique().eq(1).all()
    by_loss = lg.analysis.escape_times(escape_study, criterion="loss", rise=1.5)
    for run_id, row in by_loss.iterrows():
        rows = frame[frame["run_id"] == run_id].sort_values("step")
        above = rows[
            (rows["step"] > 0)
            & (rows["train_loss"] >= 1.5 * rows["train_loss"].iloc[0])
        ]
        assert row["escaped"] == bool(len(above))


@pytest.mark.filterwarnings(
    "ignore::statsmodels.tools.sm_exceptions.ConvergenceWarning"
)
def test_h3_runs_its_three_tests_on_the_table(escape_study):
    result = lg.analysis.analyze(escape_study, "h3")
    table = lg.analysis.escape_times(escape_study)
    ordering, alignment, indicator = result.tests
    pairs = table.pivot_table(
        index=["seed", "batch_size"], columns="noise", values="step"
    )
    diff = pairs["sgd"] - pairs["isotropic"]
    if (diff != 0).sum() >= 1:
        ref = st.wilcoxon(pairs["sgd"], pairs["isotropic"])
        assert ordering.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    # Zhu et al.'s indicator: the same Cox fit by hand, standardized covariate
    x = np.log(table["trace_h_sigma"].to_numpy())
    z = (x - x.mean()) / x.std(ddof=1)
    fit = PHReg(
        table["step"].to_numpy(float),
        z[:, None],
        status=table["escaped"].to_numpy(float),
        strata=table["seed"].to_numpy(),
        ties="efron",
    ).fit(disp=False)
    assert indicator.effect == pytest.approx(float(fit.params[0]), rel=1e-6)
    assert indicator.n == alignment.n == 12 and ordering.n == 6
    assert all(t.p_adjusted is not None for t in result.tests)
    assert result.verdict in ("supported", "contradicted", "inconclusive")
    again = lg.load_result(escape_study / "analysis" / "h3")
    lg.testing.assert_results_equal(again, result)


def test_h3_says_what_a_study_lacks(escape_study, tmp_path):
    spec = {
        "name": "bare",
        "base": {**BASE, "steps": 20},
        "grid": {"batch_size": [4, 32]},
        "seeds": [0, 1],
    }
    lg.study.run(spec, tmp_path / "bare", progress=False)
    with pytest.raises(ValueError, match="needs the probes.*examples/studies/h3.yaml"):
        lg.analysis.h3(tmp_path / "bare")
    spec = {**spec, "name": "one", "probes": PROBES}
    lg.study.run(spec, tmp_path / "one", progress=False)
    with pytest.raises(ValueError, match="compares the real and isotropic noise"):
        lg.analysis.h3(tmp_path / "one")
    with pytest.raises(ValueError, match="fraction must lie in"):
        lg.analysis.escape_times(escape_study, fraction=1.5)
    with pytest.raises(ValueError, match="no run escaped"):
        lg.analysis.h3(escape_study, fraction=0.01)
