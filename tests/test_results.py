"""The one result base: strict JSON, exact save/load of every public result type."""

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import lossgeom as lg
from lossgeom._results import _REGISTRY, Cost, Result, jsonable, timed
from lossgeom.linalg import DenseOperator, slq
from lossgeom.testing import assert_results_equal

DTYPE = torch.float64


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(24, 4, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (24,), generator=gen)
    model = _mlp(0)
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    return model, obj, X, y


def _factories(problem, run_dir=None):
    """One way to make each public result type, on a 51-parameter MLP."""
    model, obj, X, y = problem
    other = _mlp(1)
    theta_b = lg.Objective(other, nn.CrossEntropyLoss(), (X, y)).theta
    thetas = [obj.theta + 0.1 * i * torch.ones_like(obj.theta) ** i for i in range(4)]
    A = torch.diag(torch.arange(1.0, 9.0, dtype=DTYPE))
    return {
        "EigenResult": lambda: lg.eigenvalues(obj, 2),
        "TraceResult": lambda: lg.trace(obj, 10),
        "DiagonalResult": lambda: lg.diagonal(obj, 10),
        "DensityResult": lambda: lg.density(obj, n_probes=2, lanczos_steps=6, grid=16),
        "Quadrature": lambda: slq(DenseOperator(A), n_probes=2, lanczos_steps=4),
        "SpectralEstimate": lambda: lg.condition_number(DenseOperator(A)),
        "OutlierResult": lambda: lg.outliers(obj, max_k=4),
        "SliceResult": lambda: lg.slice_1d(obj, n_directions=2, quadratic=True),
        "Surface": lambda: lg.slice_2d(obj, alphas=torch.linspace(-1, 1, 3)),
        "RayCurvature": lambda: lg.ray_curvature(obj, n_rays=3),
        "PCADirections": lambda: lg.pca_directions(obj, thetas),
        "PathResult": lambda: lg.interpolate(obj, obj.theta, theta_b),
        "ConnectResult": lambda: lg.connect(obj, obj.theta, theta_b, steps=3),
        "NEBResult": lambda: lg.connect(
            obj, obj.theta, theta_b, curve="neb", images=2, steps=3
        ),
        "AlignmentResult": lambda: lg.align(
            model, other, loss_fn=nn.CrossEntropyLoss(), data=(X, y)
        ),
        "SharpnessResult": lambda: lg.sharpness(obj, 0.05, steps=2, restarts=1),
        "NoiseScaleResult": lambda: lg.noise_scale(obj),
        "GradientNoiseResult": lambda: lg.gradient_noise(obj, k=2),
        "NoiseAlignmentResult": lambda: lg.noise_alignment(obj, k=2),
        "NoiseCurvatureResult": lambda: lg.noise_curvature(
            obj, samples=8, batch_size=4, trace_probes=10
        ),
        "GradientFractionResult": lambda: lg.gradient_fraction(obj, k=2),
        "DifficultyIndexResult": lambda: lg.difficulty_index(obj, k=2),
        "QuadraticPredictionResult": lambda: lg.quadratic_prediction(
            obj, eta=[0.1, 0.2]
        ),
        "EffectiveDimensionResult": lambda: lg.effective_dimension(torch.stack(thetas)),
        "IntrinsicDimensionResult": lambda: lg.intrinsic_dimension(
            model, nn.CrossEntropyLoss(), (X, y), (X, y), dims=[2, 4], steps=3
        ),
        "TrainResult": lambda: lg.train(
            {
                "name": "tiny",
                "model": {"name": "mlp", "options": {"width": 8, "depth": 1}},
                "data": {"name": "digits", "subset": 64, "test_subset": 32},
                "optim": {"name": "sgd", "lr": 0.1},
                "steps": 4,
                "batch_size": 16,
                "metrics": {"every": 2, "probe_samples": 32},
            },
            run_dir / "run",
        ),
        "Cost": lambda: Cost(3, 2, 0.5, {"hvp": 3}),
        "StudyStatus": lambda: lg.study.StudyStatus(
            directory="out",
            name="s",
            counts={"finished": 3, "failed": 1},
            failures=[{"run_id": "a", "error": "ValueError: x", "run_dir": "out/a"}],
        ),
        "TestResult": lambda: _paired(),
        "BootstrapCI": lambda: lg.analysis.bootstrap_ci(
            np.arange(10.0), n_resamples=99
        ),
        "GranulatedKendall": lambda: lg.analysis.granulated_kendall(
            pd.DataFrame(
                {
                    "a": [0, 0, 1, 1],
                    "b": [0, 1, 0, 1],
                    "m": [1, 2, 3, 4],
                    "t": [1, 2, 4, 3],
                }
            ),
            "m",
            "t",
            ["a", "b"],
        ),
        "Score": lambda: lg.analysis.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]),
        "PowerLawFit": lambda: lg.analysis.fit_power_law(
            [1, 2, 4, 8, 16], [3.0, 2.1, 1.6, 1.0, 0.8], n_resamples=200
        ),
        "MarchenkoPasturFit": lambda: lg.theory.fit_marchenko_pastur(
            torch.linspace(0.2, 3.0, 60, dtype=DTYPE), n_bootstrap=3
        ),
        "MarchenkoPasturOutliers": lambda: lg.theory.count_outliers(
            torch.cat(
                [torch.linspace(0.2, 3.0, 60, dtype=DTYPE), torch.tensor([30.0, 40.0])]
            )
        ),
        "PacBayesResult": lambda: lg.theory.pac_bayes_bounds(
            model,
            nn.CrossEntropyLoss(),
            other,
            (X, y),
            mc_samples=20,
            selection_samples=2,
            prior_sigmas=(0.01, 0.1),
            scale_grid=(1.0, 10.0),
            bits=(8,),
            hessian_rank=2,
            diagonal_matvecs=4,
        ),
        "SDEPath": lambda: lg.theory.simulate_sde(
            _double_well,
            torch.tensor([1.0, 0.0], dtype=DTYPE),
            temperature=0.2,
            dt=0.01,
            steps=20,
            chains=4,
            record_every=5,
        ),
        "BasinOccupancy": lambda: lg.theory.basin_occupancy(
            _double_well,
            [[-1.0, 0.0], [1.0, 0.0]],
            0.5,
            bounds=[[-2.0, 2.0], [-2.0, 2.0]],
            dt=0.01,
            steps=20,
            chains=8,
            grid=40,
        ),
        "KramersRate": lambda: lg.theory.kramers_rate(
            1.0,
            torch.diag(torch.tensor([8.0, 1.0], dtype=DTYPE)),
            torch.diag(torch.tensor([-4.0, 1.0], dtype=DTYPE)),
            0.2,
        ),
        "EscapeRate": lambda: lg.theory.escape_rate(
            _double_well,
            torch.tensor([1.0, 0.0], dtype=DTYPE),
            torch.tensor([-1.0, 0.0], dtype=DTYPE),
            0.5,
            dt=0.01,
            max_time=0.5,
            chains=8,
        ),
        "AdviceResult": lambda: lg.train.recommend(
            [{"step": 0, "lr": 1.0, "train_loss": 2.3, "sharpness": 5.0}],
            {
                "model": {"name": "mlp"},
                "data": {"name": "digits"},
                "optim": {"name": "gd", "lr": 1.0},
            },
        ),
        "HypothesisResult": lambda: lg.analysis.HypothesisResult(
            hypothesis="H1",
            claim="c",
            study="out",
            tests=[_paired()],
            verdict="inconclusive",
            data={"pairs": [["a", "b"]]},
        ),
    }


def _double_well(theta):
    """The zoo's double well on a batch of points ``(chains, 2)``."""
    return (theta[:, 0] ** 2 - 1) ** 2 + 0.5 * theta[:, 1] ** 2


def _paired():
    a = np.array([1.0, 2.0, 3.5, 4.0])
    return lg.analysis.paired_test(
        a, a + [0.1, -0.3, 0.2, 0.5], claim="a < b", expect="less"
    )


def _public_result_types() -> set[str]:
    """Every Result subclass a user can reach from ``lossgeom``'s public modules."""
    names = set()
    modules = (lg, lg.measures, lg.geometry, lg.linalg, lg.curvature, lg.train)
    for module in (*modules, lg.theory, lg.study, lg.analysis):
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, Result) and obj is not Result:
                names.add(name)
    return names


def test_every_public_result_type_has_a_round_trip_case(problem):
    missing = _public_result_types() - set(_factories(problem))
    assert not missing, missing


@pytest.mark.parametrize(
    "name",
    [
        "EigenResult",
        "TraceResult",
        "DiagonalResult",
        "DensityResult",
        "Quadrature",
        "SpectralEstimate",
        "OutlierResult",
        "SliceResult",
        "Surface",
        "RayCurvature",
        "PCADirections",
        "PathResult",
        "ConnectResult",
        "NEBResult",
        "AlignmentResult",
        "SharpnessResult",
        "NoiseScaleResult",
        "GradientNoiseResult",
        "NoiseAlignmentResult",
        "NoiseCurvatureResult",
        "GradientFractionResult",
        "DifficultyIndexResult",
        "QuadraticPredictionResult",
        "EffectiveDimensionResult",
        "IntrinsicDimensionResult",
        "TrainResult",
        "Cost",
        "StudyStatus",
        "TestResult",
        "BootstrapCI",
        "GranulatedKendall",
        "Score",
        "PowerLawFit",
        "MarchenkoPasturFit",
        "MarchenkoPasturOutliers",
        "PacBayesResult",
        "SDEPath",
        "BasinOccupancy",
        "KramersRate",
        "EscapeRate",
        "AdviceResult",
        "HypothesisResult",
    ],
)
def test_save_and_load_round_trip_exactly(problem, name, tmp_path):
    result = _factories(problem, tmp_path)[name]()
    assert type(result).__name__ == name
    folder = lg.save_result(result, tmp_path / name)
    back = lg.load_result(folder)
    assert_results_equal(result, back)
    if isinstance(result, Result):
        # the JSON view is strict (no NaN/Infinity tokens) and typed
        text = json.dumps(result.to_dict(), allow_nan=False)
        assert json.loads(text)["type"] == name
        assert isinstance(result.cost, Cost) and result.cost.seconds >= 0
        assert result.definition, f"{name} states no definition"
        for key, value in result.scalars().items():
            assert isinstance(value, float), (name, key)
        # save() is the same as save_result
        again = lg.load_result(result.save(tmp_path / f"{name}-method"))
        assert_results_equal(result, again)


def test_round_trip_keeps_nonfinite_numbers_tuples_dtypes_and_odd_strings(tmp_path):
    res = lg.linalg.TraceResult(
        math.inf,
        math.nan,
        "hutchinson",
        3,
        parameters={
            "tuple": (1, 2.5, "x"),
            "ints": {1: "one"},
            "neg": -math.inf,
            "word": "NaN",  # a string that spells a non-finite number stays a string
            "tag": {"__tensor__": "not a tensor"},
            "half": torch.tensor([1.5, math.nan], dtype=torch.float16),
            "mask": torch.tensor([True, False]),
            "dtype": torch.float32,
            "path": Path("a/b"),
        },
    )
    back = lg.load_result(res.save(tmp_path / "r"))
    assert_results_equal(res, back)
    assert back.parameters["word"] == "NaN" and isinstance(
        back.parameters["tuple"], tuple
    )
    text = (tmp_path / "r" / "result.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict token {c}"))


def test_one_nonfinite_rule_reads_back_with_float():
    out = jsonable(
        {"a": [math.nan, math.inf, -math.inf, 1.0], "t": torch.tensor(math.nan)}
    )
    assert out == {"a": ["NaN", "Infinity", "-Infinity", 1.0], "t": "NaN"}
    assert [float(x) for x in out["a"][1:]] == [math.inf, -math.inf, 1.0]
    assert math.isnan(float(out["t"]))


def _arrays_file(folder: Path) -> Path:
    (only,) = folder.glob("arrays-*.safetensors")
    return only


def test_saving_again_replaces_the_old_generation(tmp_path):
    A = torch.diag(torch.arange(1.0, 7.0, dtype=DTYPE))
    first = lg.eigenvalues(DenseOperator(A), 2).save(tmp_path / "r")
    old = _arrays_file(first)
    second = lg.eigenvalues(DenseOperator(3 * A), 2)
    second.save(tmp_path / "r")
    assert not old.exists() and _arrays_file(tmp_path / "r") != old
    assert_results_equal(lg.load_result(tmp_path / "r"), second)


def test_damaged_or_mixed_folders_are_refused_naming_the_file(tmp_path):
    A = torch.diag(torch.arange(1.0, 7.0, dtype=DTYPE))
    first = lg.eigenvalues(DenseOperator(A), 2)
    second = lg.eigenvalues(DenseOperator(2 * A), 2)
    a, b = first.save(tmp_path / "a"), second.save(tmp_path / "b")
    # a folder mixing two saves: arrays of one, JSON of the other
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "result.json").write_bytes((a / "result.json").read_bytes())
    a_arrays, b_arrays = _arrays_file(a), _arrays_file(b)
    (mixed / a_arrays.name).write_bytes(b_arrays.read_bytes())
    with pytest.raises(ValueError, match=r"arrays-\w+\.safetensors does not belong"):
        lg.load_result(mixed)
    # a flipped byte in the arrays
    raw = bytearray(a_arrays.read_bytes())
    raw[-3] ^= 0xFF
    a_arrays.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=a_arrays.name):
        lg.load_result(a)
    # an edited number in the JSON that still parses
    text = (b / "result.json").read_text()
    (b / "result.json").write_text(text.replace('"tol": 1e-06', '"tol": 1e-05'))
    with pytest.raises(ValueError, match="result.json is damaged"):
        lg.load_result(b)
    # a truncated JSON
    (b / "result.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="result.json is damaged"):
        lg.load_result(b)
    with pytest.raises(FileNotFoundError, match="no saved result"):
        lg.load_result(tmp_path / "nothing")


def test_saving_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="expected a lossgeom result"):
        lg.save_result({"value": 1.0}, tmp_path / "x")
    (tmp_path / "file").write_text("")
    res = lg.linalg.TraceResult(1.0, 0.1, "hutchinson", 3)
    with pytest.raises(ValueError, match="is a file"):
        res.save(tmp_path / "file")
    bad = dataclasses.replace(res, parameters={"model": nn.Linear(1, 1)})
    with pytest.raises(TypeError, match=r"TraceResult\.parameters\.model"):
        bad.save(tmp_path / "bad")


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        folder = lg.linalg.TraceResult(1.0, 0.1, "hutchinson", 3).save(tmp_path / "r")
    finally:
        os.umask(old)
    for f in (folder / "result.json", _arrays_file(folder)):
        assert f.stat().st_mode & 0o777 == 0o644


def test_cost_adds_and_meters_the_objective(problem):
    _, obj, _, _ = problem
    with timed(obj) as meter:
        obj.hvp(torch.ones(obj.dim, 3, dtype=DTYPE))
    cost = meter.cost.add(matvecs=2)
    assert cost.matvecs == 3 + 2 and cost.counters["hvp"] == 3
    assert cost.data_passes >= 1 and cost.seconds > 0
    total = cost + Cost(1, 1, 1.0, {"hvp": 1, "grad": 2})
    assert (total.matvecs, total.counters["hvp"], total.counters["grad"]) == (6, 4, 2)
    assert cost.add(matvecs=1, runs=2).counters["runs"] == 2


def test_registry_holds_each_class_once():
    assert _REGISTRY["EigenResult"] is lg.EigenResult
    assert _REGISTRY["Cost"] is Cost
