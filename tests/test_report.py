"""Figures: what is drawn is the result's data, PNGs are written atomically."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import lossgeom as lg
from lossgeom.report import metrics_rows, write_json

pytest.importorskip("matplotlib")

DTYPE = torch.float64
PNG = b"\x89PNG\r\n\x1a\n"


def _data(n=40, d=6, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DTYPE)
    y = torch.randint(0, k, (n,), generator=gen)
    return X, y


def _mlp(d=6, h=5, k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, k)).to(DTYPE)


def _by_gid(ax):
    return {line.get_gid(): line for line in ax.lines if line.get_gid()}


# ------------------------------------------------------------------ landscape
def test_figures_are_written(tmp_path):
    from PIL import Image

    model = _mlp()
    obj = lg.Objective(model, nn.CrossEntropyLoss(), _data())
    grid = torch.linspace(-1, 1, 7)
    s = lg.slice_1d(obj, "filter", grid, n_directions=3, quadratic=True)
    traj = obj.theta + torch.randn(5, obj.dim, dtype=DTYPE) * 0.1
    pca = lg.pca_directions(obj, traj)
    surf = lg.slice_2d(obj, pca, alphas=grid, betas=grid)
    assert surf.directions["source"] == "pca"
    torch.testing.assert_close(surf.trajectory, pca.coords)
    p = lg.interpolate(obj, obj.theta, traj[0], n_points=5)
    files = {
        "slice.png": lambda f: lg.plot_slice(s, path=f),
        "contour.png": lambda f: lg.plot_surface(surf, path=f),
        "surface3d.png": lambda f: lg.plot_surface(surf, kind="surface", path=f),
        "paths.png": lambda f: lg.plot_paths([p, p], labels=["a", "b"], path=f),
    }
    for name, draw in files.items():
        fig = draw(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100
        fig.clf()
    fig = lg.plot_surface(surf)
    assert "off-plane" in fig.axes[0].get_title()
    assert fig.axes[0].get_xlabel().startswith("PC1")
    with pytest.raises(ValueError, match="kind"):
        lg.plot_surface(surf, kind="heatmap")
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_landscape_figures_draw_the_results_arrays():
    obj = lg.Objective(_mlp(), nn.CrossEntropyLoss(), _data())
    grid = torch.linspace(-1, 1, 7)
    s = lg.slice_1d(obj, "filter", grid, n_directions=3, quadratic=True)
    ax = lg.plot_slice(s).axes[0]
    mean = next(line for line in ax.lines if line.get_label().startswith("train"))
    np.testing.assert_allclose(mean.get_xdata(), grid.double().numpy())
    np.testing.assert_allclose(mean.get_ydata(), s.loss.double().mean(0).numpy())
    quad = next(line for line in ax.lines if line.get_label().startswith("quadratic"))
    np.testing.assert_allclose(quad.get_ydata(), s.quadratic.double().mean(0).numpy())
    assert "filter-normalized" in ax.get_xlabel()

    traj = obj.theta + torch.randn(5, obj.dim, dtype=DTYPE) * 0.1
    surf = lg.slice_2d(obj, lg.pca_directions(obj, traj), alphas=grid, betas=grid)
    ax = lg.plot_surface(surf).axes[0]
    path = next(line for line in ax.lines if "trajectory" in line.get_label())
    np.testing.assert_allclose(path.get_xdata(), surf.trajectory[:, 0].numpy())
    np.testing.assert_allclose(path.get_ydata(), surf.trajectory[:, 1].numpy())

    p = lg.interpolate(obj, obj.theta, traj[0], n_points=5, eval_data=_data(seed=1))
    ax = lg.plot_paths(p, labels=["init -> end"]).axes[0]
    train, held_out = ax.lines
    np.testing.assert_allclose(train.get_xdata(), p.ts.double().numpy())
    np.testing.assert_allclose(train.get_ydata(), p.loss.double().numpy())
    np.testing.assert_allclose(held_out.get_ydata(), p.eval_loss.double().numpy())
    assert f"barrier {float(p.barrier):.3g}" in train.get_label()
    with pytest.raises(ValueError, match="labels"):
        lg.plot_paths([p, p], labels=["one"])


def test_a_surface_needs_a_3d_axes_and_a_given_axes_is_used():
    from matplotlib.figure import Figure

    obj = lg.Objective(_mlp(), nn.CrossEntropyLoss(), _data())
    grid = torch.linspace(-1, 1, 5)
    surf = lg.slice_2d(obj, "filter", alphas=grid, betas=grid)
    fig = Figure()
    flat = fig.add_subplot(121)
    with pytest.raises(ValueError, match="projection='3d'"):
        lg.plot_surface(surf, kind="surface", ax=flat)
    assert lg.plot_surface(surf, ax=flat) is fig
    assert (
        lg.plot_surface(surf, kind="surface", ax=fig.add_subplot(122, projection="3d"))
        is fig
    )


# -------------------------------------------------------------------- spectra
def test_plot_density_draws_the_density_and_marks_the_eigenvalues(tmp_path):
    spectrum = torch.tensor([-0.5, 0.1, 0.2, 0.3, 1.0, 2.0, 5.0, 9.0], dtype=DTYPE)
    Q, _ = torch.linalg.qr(
        torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    )
    A = lg.DenseOperator(Q @ torch.diag(spectrum) @ Q.T)
    dens = lg.density(A, 4, 8, seed=0)
    top = lg.eigenvalues(A, 3, tol=1e-10, seed=0)
    fig = lg.plot_density(dens, top, path=tmp_path / "density.png")
    ax = fig.axes[0]
    curve, *marks = ax.lines
    np.testing.assert_array_equal(curve.get_xdata(), dens.grid.double().numpy())
    np.testing.assert_array_equal(curve.get_ydata(), dens.values.double().numpy())
    assert [m.get_xdata()[0] for m in marks] == pytest.approx([9.0, 5.0, 2.0], abs=1e-8)
    assert [m.get_xdata()[0] for m in marks] == top.values.tolist()
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "eigenvalue of the Hessian"
    assert "4 probes x 8 Lanczos steps" in ax.get_title() and "SLQ" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "3 largest eigenvalues (lanczos)" in legend
    assert (tmp_path / "density.png").read_bytes()[:8] == PNG
    assert not list(tmp_path.glob(".*"))


def test_plot_density_shows_unconverged_eigenvalues_apart():
    A = lg.DenseOperator(torch.diag(torch.arange(1.0, 9.0, dtype=DTYPE)))
    dens = lg.density(A, 2, 8, seed=0)
    eig = SimpleNamespace(
        values=torch.tensor([8.0, 7.5]),
        converged=torch.tensor([True, False]),
        method="lanczos",
        which="largest",
    )
    ax = lg.plot_density(dens, eig, operator="GGN", log=False).axes[0]
    _, good, bad = ax.lines
    assert good.get_xdata()[0] == 8.0 and good.get_linestyle() == "--"
    assert bad.get_xdata()[0] == 7.5 and bad.get_linestyle() == ":"
    assert "not converged" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_yscale() == "linear" and ax.get_xlabel().endswith("GGN")
    # plain numbers mark the same way; none marks nothing
    ax = lg.plot_density(dens, [3.0, 4.0]).axes[0]
    assert [line.get_xdata()[0] for line in ax.lines[1:]] == [3.0, 4.0]
    assert len(lg.plot_density(dens).axes[0].lines) == 1
    kpm = lg.density(A, 2, 16, method="kpm")
    ax = lg.plot_density(kpm, log=False).axes[0]
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), kpm.values.numpy())
    assert "KPM, 2 probes x 16 moments" in ax.get_title()


# ------------------------------------------------------------------- training
def _rows():
    return [
        {"step": 0, "lr": 0.1, "train_loss": 2.3, "test_loss": 2.31,
         "train_accuracy": 0.1, "test_accuracy": 0.12, "sharpness": 4.0,
         "sharpness_converged": True, "eos_threshold": 20.0, "eos_formula": "2 / eta",
         "trace": 30.0, "trace_stderr": 2.0},
        {"step": 10, "lr": 0.1, "train_loss": 1.2, "test_loss": 1.4,
         "train_accuracy": 0.6, "test_accuracy": 0.5, "sharpness": 15.0,
         "sharpness_converged": False, "eos_threshold": 20.0, "eos_formula": "2 / eta",
         "trace": 50.0, "trace_stderr": 3.0},
        {"step": 20, "lr": 0.05, "train_loss": "NaN", "test_loss": None,
         "train_accuracy": 0.7, "test_accuracy": 0.6, "sharpness": 19.0,
         "sharpness_converged": True, "eos_threshold": 40.0, "eos_formula": "2 / eta",
         "trace": 60.0, "trace_stderr": 1.0},
        {"step": 23, "batch_loss": "Infinity", "diverged": True},
    ]  # fmt: skip


def test_plot_training_draws_each_column_as_recorded(tmp_path):
    rows = _rows()
    fig = lg.plot_training(rows, path=tmp_path / "training.png")
    loss, acc, sharp = fig.axes
    assert [a.get_ylabel() for a in fig.axes] == ["loss", "accuracy", "sharpness"]
    lines = _by_gid(loss)
    np.testing.assert_array_equal(lines["train_loss"].get_xdata(), [0, 10, 20])
    np.testing.assert_array_equal(lines["train_loss"].get_ydata(), [2.3, 1.2, np.nan])
    # a None is left out
    np.testing.assert_array_equal(lines["test_loss"].get_xdata(), [0, 10])
    np.testing.assert_array_equal(lines["test_loss"].get_ydata(), [2.31, 1.4])
    lines = _by_gid(acc)
    np.testing.assert_array_equal(lines["train_accuracy"].get_ydata(), [0.1, 0.6, 0.7])
    np.testing.assert_array_equal(lines["test_accuracy"].get_ydata(), [0.12, 0.5, 0.6])
    lines = _by_gid(sharp)
    np.testing.assert_array_equal(lines["sharpness"].get_ydata(), [4.0, 15.0, 19.0])
    # the threshold is the recorded column (it follows the learning rate), not 2/lr
    # recomputed from a constant
    np.testing.assert_array_equal(lines["eos_threshold"].get_xdata(), [0, 10, 20])
    np.testing.assert_array_equal(
        lines["eos_threshold"].get_ydata(), [20.0, 20.0, 40.0]
    )
    assert lines["eos_threshold"].get_label() == "edge of stability 2 / eta"
    np.testing.assert_array_equal(lines["sharpness_not_converged"].get_xdata(), [10])
    np.testing.assert_array_equal(lines["sharpness_not_converged"].get_ydata(), [15.0])
    for ax in fig.axes:  # the divergence is marked on every panel
        marks = [line for line in ax.lines if line.get_label().startswith("diverged")]
        assert len(marks) == 1 and marks[0].get_xdata()[0] == 23
    assert (tmp_path / "training.png").read_bytes()[:8] == PNG
    assert not list(tmp_path.glob(".*"))


def test_plot_training_any_column_with_its_stderr_band_into_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    assert lg.plot_training(_rows(), panels=["trace", "loss"], ax=axes) is fig
    trace = _by_gid(axes[0])["trace"]
    np.testing.assert_array_equal(trace.get_ydata(), [30.0, 50.0, 60.0])
    (band,) = axes[0].collections
    xy = band.get_paths()[0].vertices
    assert xy[:, 1].min() == pytest.approx(30.0 - 2.0)
    assert xy[:, 1].max() == pytest.approx(60.0 + 1.0)
    assert axes[1].get_ylabel() == "loss"
    ax = lg.plot_training(_rows(), panels=["sharpness"], ax=axes[0]).axes[0]
    assert ax is axes[0]


def test_plot_training_reads_a_run_directory_and_a_train_result(tmp_path):
    cfg = {
        "name": "curves",
        "seed": 0,
        "model": {"name": "mlp", "options": {"width": 8, "depth": 1}},
        "data": {"name": "digits", "subset": 128, "test_subset": 64},
        "optim": {"name": "gd", "lr": 0.1},
        "steps": 10,
        "metrics": {"every": 5, "probe_samples": 64, "trace_max_matvecs": 0},
    }
    result = lg.train(cfg, tmp_path / "run", progress=False)
    assert result.status == "finished"
    from_dir = lg.plot_training(tmp_path / "run")
    from_file = lg.plot_training(tmp_path / "run" / "metrics.jsonl")
    from_result = lg.plot_training(result)
    rows = metrics_rows(tmp_path / "run")
    assert rows == json.loads(json.dumps(result.metrics))
    steps = [r["step"] for r in rows]
    for fig in (from_dir, from_file, from_result):
        assert [a.get_ylabel() for a in fig.axes] == ["loss", "accuracy", "sharpness"]
        sharp = _by_gid(fig.axes[2])
        np.testing.assert_array_equal(sharp["eos_threshold"].get_xdata(), steps)
        # gradient descent at lr 0.1: the threshold is 2 / eta = 20
        np.testing.assert_allclose(sharp["eos_threshold"].get_ydata(), 20.0)
        np.testing.assert_allclose(
            sharp["sharpness"].get_ydata(), [r["sharpness"] for r in rows]
        )
        np.testing.assert_allclose(
            _by_gid(fig.axes[0])["test_loss"].get_ydata(),
            [r["test_loss"] for r in rows],
        )


def test_plot_training_refuses_what_it_cannot_draw(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        lg.plot_training(tmp_path)
    with pytest.raises(TypeError, match="TrainResult"):
        lg.plot_training(3.0)
    with pytest.raises(ValueError, match="no metrics rows"):
        lg.plot_training([])
    with pytest.raises(ValueError, match="'grad_norm'"):
        lg.plot_training(_rows(), panels=["grad_norm"])
    with pytest.raises(ValueError, match="none of"):
        lg.plot_training([{"step": 0, "batch_loss": 1.0}])
    with pytest.raises(ValueError, match="one axes per panel"):
        lg.plot_training(_rows(), ax=[None])


# ---------------------------------------------------------------------- files
def test_write_json_is_strict_and_atomic(tmp_path):
    path = write_json(
        tmp_path / "out" / "r.json", {"a": torch.tensor([1.0, 2.0]), "b": float("nan")}
    )
    assert json.loads(path.read_text()) == {"a": [1.0, 2.0], "b": "NaN"}
    assert not list((tmp_path / "out").glob(".*"))


def test_figures_leave_pyplot_alone():
    import matplotlib
    import matplotlib.pyplot as plt

    backend, before = matplotlib.get_backend(), plt.get_fignums()
    lg.plot_training(_rows())
    assert plt.get_fignums() == before and matplotlib.get_backend() == backend
