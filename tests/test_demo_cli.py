"""The main job: `lossgeom demo` runs a small study, tests H1 and writes the report;
`lossgeom demo --quick` trains one model, probes it and writes results.json."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lossgeom as lg
from lossgeom.cli import app
from lossgeom.cli._demo import run_demo


def test_demo_writes_consistent_results(tmp_path):
    res = run_demo(tmp_path, steps=150, width=8, seed=0)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    m, s = res["metrics"], res["dense_spectrum"]
    assert m["train_accuracy"] > 0.85 and m["test_accuracy"] > 0.8
    assert s["d"] == 64 * 8 + 8 + 8 * 10 + 10
    # the random-direction estimate of tr(H)/d agrees with the exact dense trace
    assert (
        abs(m["mean_curvature_random"] - s["trace_over_d"])
        <= 5 * m["mean_curvature_random_stderr"]
    )
    # Rayleigh quotients lie inside the spectrum; the GGN is PSD
    assert (
        s["lambda_min"] - 1e-12
        <= m["curvature_along_gradient"]
        <= s["lambda_max"] + 1e-12
    )
    assert m["ggn_curvature_along_gradient"] >= 0
    # Lanczos top-5 and the trace estimate against the dense spectrum
    assert m["top_eigenvalues_converged"]
    assert res["checks"]["top_eigenvalues_max_relative_error"] <= 1e-6
    assert abs(res["checks"]["trace_vs_exact_in_stderrs"]) <= 4
    assert m["top_eigenvalues"][0] == pytest.approx(s["lambda_max"], rel=1e-8)
    assert m["noise_scale_simple"] == pytest.approx(
        m["gradient_noise_trace"] / m["grad_norm"] ** 2
    )
    assert res["objective"]["mode"] == "eval" and res["objective"]["dtype"] == "float64"
    assert res["work"]["hvp"] > 0 and res["cost"]["hvp_seconds"] > 0
    assert not list(tmp_path.glob(".*.tmp*"))  # no temp files left behind
    png = tmp_path / "spectral_density.png"
    assert (
        res["density"]["plot"] == png.name
        and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    )
    # training curves: recorded every few steps, the last row is the trained model
    curves = res["training"]["curves"]
    assert curves[0]["step"] == 0 and curves[-1]["step"] == 150
    assert curves[-1]["train_accuracy"] == m["train_accuracy"]
    assert curves[-1]["test_accuracy"] == m["test_accuracy"]
    assert curves[-1]["train_loss"] < curves[0]["train_loss"]
    png = tmp_path / "training.png"
    assert res["training"]["curves_figure"] == png.name
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the SLQ negative fraction agrees with the exact count
    exact_neg = s["n_below_1pct_of_lambda_max"] / s["d"]
    dn = res["density"]
    assert (
        abs(dn["negative_fraction"] - exact_neg)
        <= 4 * dn["negative_fraction_stderr"] + 0.02
    )
    # landscape figures and measures, each with what it means
    ls, ms = res["landscape"], res["measures"]
    assert set(ls["figures"]) == {"slices", "plane", "path"}
    for f in ls["figures"].values():
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ls["directions"]["normalization"] == "filter"
    assert ls["plane_min_max_loss"][0] <= m["train_loss"] + 1e-9  # the centre is on it
    assert ls["init_to_trained_barrier"] >= 0 and "Frankle" in ls["barrier_definition"]
    # the worst case includes the centre, so it is a rise >= 0; a share is a fraction
    assert ms["worst_sharpness_r0.05"] >= 0
    assert 0.0 <= ms["gradient_fraction_top10"] <= 1.0
    assert set(ms["definitions"]) == {
        "worst",
        "average",
        "adaptive",
        "gradient_fraction",
    }


def test_demo_gradient_noise_trace_is_exact(tmp_path):
    from lossgeom.zoo import digits, mlp

    torch.manual_seed(0)
    X, y = digits("train")
    model = mlp(64, 10, width=4)
    obj = lg.Objective(
        model, torch.nn.CrossEntropyLoss(), (X[:50], y[:50]), dtype=torch.float64
    )
    from lossgeom.testing import exact_gradient_covariance

    assert lg.gradient_covariance(obj).trace() == pytest.approx(
        exact_gradient_covariance(obj).trace().item(), rel=1e-10
    )
    assert lg.gradient_covariance(obj, cache_bytes=None).trace() == pytest.approx(
        exact_gradient_covariance(obj).trace().item(), rel=1e-10
    )


def test_cli_demo_prints_a_table(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--quick",
            "--out",
            str(tmp_path),
            "--steps",
            "20",
            "--width",
            "4",
            "--no-dense",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "curvature along gradient" in result.output
    assert (tmp_path / "results.json").exists()


def test_cli_demo_rejects_bad_input(tmp_path):
    result = CliRunner().invoke(
        app, ["demo", "--quick", "--out", str(tmp_path), "--steps", "-3"]
    )
    assert result.exit_code == 2
    assert "steps must be >= 0" in result.output


def test_public_api_is_importable_and_documented():
    for name in lg.__all__:
        obj = getattr(lg, name)
        assert obj.__doc__, name


def test_demo_runs_the_study_tests_h1_and_writes_the_report(tmp_path):
    args = ["demo", "--out", str(tmp_path), "--seeds", "2", "--jobs", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = tmp_path / "report.html"
    assert report.exists() and f"open {report}" in result.output
    html = report.read_text()
    assert "H1" in html and "plotly" in html
    study = tmp_path / "study"
    runs = lg.study.runs(study)
    assert list(runs["status"]) == ["finished"] * 4
    h1 = lg.load_result(study / "analysis" / "h1")
    assert f"H1 ({h1.claim}): {h1.verdict}" in result.output
    table = lg.study.table(study, by=["batch_size"], metrics=["test_error"])
    for batch, row in table.iterrows():
        line = next(
            x for x in result.output.splitlines() if x.strip().startswith(f"{batch}:")
        )
        assert f"test_error {row[('test_error', 'mean')]:.4g}" in line
    # a second call resumes: nothing is trained again
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (lg.study.runs(study)["attempts"] == 1).all()


def test_demo_needs_two_seeds(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--seeds", "1"])
    assert result.exit_code == 2
    assert "at least 2 seeds" in result.output
