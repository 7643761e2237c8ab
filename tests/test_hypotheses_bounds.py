"""H4 on a small real study: the bounds per run, the paired tests, bad input."""

from __future__ import annotations

import pytest
import scipy.stats as st

import lossgeom as lg

BASE = {
    "model": {"name": "mlp", "options": {"width": 16}},
    "data": {"name": "digits", "subset": 256},
    "optim": {"name": "sgd", "lr": 0.2},
    "steps": 300,
    "batch_size": 32,
    "metrics": {"every": 100, "sharpness": False},
}
PROBE = {
    "name": "pac_bayes",
    "at": "final",
    "options": {"mc_samples": 200, "selection_samples": 8, "hessian_rank": 5},
}


@pytest.fixture(scope="module")
def bounds_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("h4") / "study"
    spec = {"name": "h4", "base": BASE, "seeds": [0, 1, 2], "probes": [PROBE]}
    assert lg.study.run(spec, out, progress=False).counts == {"finished": 3}
    return out


def test_h4_pairs_the_three_bounds_of_each_run(bounds_study):
    result = lg.analysis.analyze(bounds_study, "h4")
    stored = lg.study.results(bounds_study)
    runs = result.data["runs"]
    probes = {
        row.owner: lg.load_result(row.path)
        for row in stored[stored["key"] == "pac_bayes"].itertuples()
    }
    assert sorted(probes) == sorted(runs)
    hess = [probes[r].hessian.bound for r in runs]
    count = [probes[r].parameter_count.bound for r in runs]
    iso = [probes[r].isotropic.bound for r in runs]
    assert result.data["hessian"] == hess and result.data["isotropic"] == iso
    first, second = result.tests
    assert first.p_value == pytest.approx(st.ttest_rel(hess, count).pvalue, rel=1e-12)
    assert second.p_value == pytest.approx(st.ttest_rel(hess, iso).pvalue, rel=1e-12)
    assert first.effect == pytest.approx(sum(hess) / 3 - sum(count) / 3, rel=1e-12)
    for r in runs:  # each bound bounds the error it is about, within [0, 1]
        p = probes[r]
        assert 0 <= p.train_error <= p.hessian.bound <= 1
        assert p.parameter_count.train_error <= p.parameter_count.bound <= 1
        assert p.isotropic.mc_error <= p.isotropic.bound
    again = lg.load_result(bounds_study / "analysis" / "h4")
    lg.testing.assert_results_equal(again, result)


def test_h4_says_what_a_study_lacks(bounds_study, tmp_path):
    spec = {"name": "bare", "base": {**BASE, "steps": 20}, "seeds": [0, 1]}
    lg.study.run(spec, tmp_path / "bare", progress=False)
    with pytest.raises(ValueError, match="pac_bayes.*examples/studies/h4.yaml"):
        lg.analysis.h4(tmp_path / "bare")
    spec = {**spec, "name": "one", "seeds": [0], "probes": [PROBE]}
    lg.study.run(spec, tmp_path / "one", progress=False)
    with pytest.raises(ValueError, match="1 finished run.*at least 2"):
        lg.analysis.h4(tmp_path / "one")
