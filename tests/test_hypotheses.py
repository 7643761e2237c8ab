"""H1 and H2 on small real studies: the numbers behind each verdict, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st

import lossgeom as lg

MLP = {
    "model": {"name": "mlp", "options": {"width": 16}},
    "data": {"name": "digits", "subset": 256},
    "optim": {"name": "sgd", "lr": 0.2},
    "steps": 400,
    "metrics": {"every": 20, "sharpness": False, "eval_samples": None},
}


@pytest.fixture(scope="module")
def h1_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("h1") / "study"
    spec = {
        "name": "h1",
        "base": MLP,
        "grid": {"batch_size": [8, 128]},
        "seeds": [0, 1, 2],
        "stop": {"train_loss": 0.5},
        "probes": [{"name": "eigenvalues", "options": {"k": 1, "tol": 1e-4}}],
    }
    assert lg.study.run(spec, out, progress=False).counts == {"finished": 6}
    return out


def test_h1_tests_each_link_on_the_paired_runs(h1_study):
    result = lg.analysis.analyze(h1_study, "h1")
    frame = lg.study.load(h1_study)
    final = frame.sort_values("step").groupby("run_id").last()
    small = final[final["batch_size"] == 8].set_index("seed").sort_index()
    large = final[final["batch_size"] == 128].set_index("seed").sort_index()
    link1, link2, total = result.tests
    # batch -> lambda_max: the paired t-test of scipy on the same numbers
    ref = st.ttest_rel(small["eigenvalues"], large["eigenvalues"])
    assert link1.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    diff = (small["eigenvalues"] - large["eigenvalues"]).mean()
    assert link1.effect == pytest.approx(diff, rel=1e-12)
    # lambda_max -> test error, batch size a covariate: least squares
    X = np.column_stack(
        [np.ones(6), final["eigenvalues"], np.log2(final["batch_size"].astype(float))]
    )
    coef = np.linalg.lstsq(X, final["test_error"].to_numpy(float), rcond=None)[0]
    assert link2.effect == pytest.approx(coef[1], rel=1e-9)
    assert total.n == 3 and link2.n == 6
    # one Holm family of three
    ps = sorted([t.p_value for t in result.tests])
    assert min(t.p_adjusted for t in result.tests) == pytest.approx(min(1, 3 * ps[0]))
    assert result.verdict in ("supported", "contradicted", "inconclusive")
    assert not any("did not stop at a train loss" in c for c in result.caveats)
    again = lg.load_result(h1_study / "analysis" / "h1")
    lg.testing.assert_results_equal(again, result)


def test_h1_says_what_a_study_lacks(h1_study, tmp_path):
    spec = {"name": "one", "base": {**MLP, "steps": 20}, "seeds": [0, 1]}
    lg.study.run(spec, tmp_path / "one", progress=False)
    with pytest.raises(
        ValueError, match="two or more batch sizes.*examples/studies/h1.yaml"
    ):
        lg.analysis.h1(tmp_path / "one")
    spec = {
        "name": "few",
        "base": {**MLP, "steps": 20},
        "grid": {"batch_size": [8, 128]},
        "seeds": [0],
        "probes": [{"name": "eigenvalues", "options": {"k": 1}}],
    }
    lg.study.run(spec, tmp_path / "few", progress=False)
    with pytest.raises(ValueError, match="found 1 pair.*at least 2"):
        lg.analysis.h1(tmp_path / "few")
    with pytest.raises(ValueError, match="H2 needs runs with and without skip"):
        lg.analysis.h2(h1_study)
    with pytest.raises(ValueError, match="unknown hypothesis 'h9'"):
        lg.analysis.analyze(h1_study, "h9")


def test_h2_pairs_architectures_by_seed_and_corrects_for_several_measures(tmp_path):
    spec = {
        "name": "h2",
        "base": {
            "model": {"name": "resnet20", "options": {"width": 4, "in_channels": 1}},
            "data": {"name": "digits", "subset": 128, "options": {"flatten": False}},
            "optim": {"name": "sgd", "lr": 0.05},
            "steps": 10,
            "batch_size": 32,
            "metrics": {"every": 10, "sharpness": False, "probe_samples": 64},
        },
        "grid": {"model.options.skip": [True, False]},
        "seeds": [0, 1, 2],
        "probes": [
            {"name": "outliers", "options": {"max_k": 3, "tol": 1e-2}},
            {"name": "slice_1d", "options": {"n_directions": 2}},
        ],
        "pairs": {
            "between": "consecutive",
            "probes": [{"name": "interpolate", "options": {"n_points": 3}}],
        },
    }
    out = tmp_path / "study"
    status = lg.study.run(spec, out, progress=False)
    assert status.counts == {"finished": 6}, status.summary()
    result = lg.analysis.analyze(out, "h2")
    claims = [t.claim for t in result.tests]
    assert len(claims) == 4  # outlier count, largest outlier, slice variance, barrier
    final = lg.study.load(out).sort_values("step").groupby("run_id").last()
    with_ = final[final["model.options.skip"] == True].set_index("seed").sort_index()  # noqa: E712
    without = final[final["model.options.skip"] == False].set_index("seed").sort_index()  # noqa: E712
    ref = st.ttest_rel(with_["outliers_largest"], without["outliers_largest"])
    largest = next(t for t in result.tests if "largest" in t.claim)
    assert largest.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    pairs = lg.study.pairs(out)
    skip = pairs["model.options.skip"] == True  # noqa: E712
    assert sorted(result.data["interpolate"]["with"]) == sorted(
        pairs[skip]["interpolate"]
    )
    assert sorted(result.data["interpolate"]["without"]) == sorted(
        pairs[~skip]["interpolate"]
    )
    assert all(
        t.p_adjusted is not None and t.p_adjusted >= t.p_value for t in result.tests
    )


def test_h5_compares_early_probes_with_the_trace_and_the_loss(tmp_path):
    spec = {
        "name": "h5",
        "base": {
            **MLP,
            "steps": 40,
            "batch_size": 32,
            "metrics": {
                "every": 2,
                "sharpness": True,
                "sharpness_max_matvecs": 10,
                "trace_max_matvecs": 6,
                "eval_samples": 128,
                "probe_samples": 64,
            },
        },
        "grid": {"optim.lr": [0.05, 0.2, 1.0, 4.0]},
        "seeds": [0, 1, 2],
    }
    out = tmp_path / "study"
    lg.study.run(spec, out, progress=False)
    result = lg.analysis.analyze(out, "h5")
    assert len(result.tests) == 4
    assert result.data["features"] == ["eos_ratio", "trace_per_param"]
    assert {t.claim.split(" better than ")[1] for t in result.tests} == {
        "the trace per parameter alone",
        "the early train loss alone",
    }
    assert all(t.p_adjusted is not None for t in result.tests)
    lg.testing.assert_results_equal(lg.load_result(out / "analysis" / "h5"), result)
    with pytest.raises(ValueError, match="H5 needs trace"):
        spec["base"]["metrics"]["trace_max_matvecs"] = 0
        lg.study.run(spec, tmp_path / "no_trace", progress=False)
        lg.analysis.h5(tmp_path / "no_trace")


def test_a_stored_analysis_loads_in_a_fresh_process(h1_study):
    import subprocess
    import sys

    lg.analysis.analyze(h1_study, "h1")
    code = (
        "import lossgeom as lg; "
        f"r = lg.load_result({str(h1_study / 'analysis' / 'h1')!r}); "
        "print(type(r).__name__, type(r.tests[0]).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["HypothesisResult", "TestResult"], out.stderr
