"""Curvature numbers that must not be silently wrong, and memory that must not leak.

Numbers are checked in float64 against the exact dense spectrum.
"""

import copy
import gc
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import lossgeom as lg
from lossgeom.linalg import DenseOperator
from lossgeom.testing import exact_hessian
from lossgeom.zoo import digits, mlp

DTYPE = torch.float64


@pytest.fixture
def one_thread():
    """Timing-sensitive loops run on one thread (small products do not scale)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_objective(activation: str, width: int, seed: int, n: int = 200, steps=100):
    """A small MLP on the first ``n`` digits, trained briefly with full-batch GD."""
    X, y = digits(dtype=DTYPE)
    X, y = X[:n], y[:n]
    model = mlp(width=width, activation=activation, seed=seed).to(DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return lg.Objective(model, torch.nn.CrossEntropyLoss(), (X, y))


NETWORKS = [("tanh", 8, 0), ("relu", 8, 1), ("tanh", 6, 2)]


@pytest.fixture(scope="module")
def spectra():
    """``(objective, dense Hessian, its eigenvalues)`` of each network."""
    out = []
    for act, width, seed in NETWORKS:
        obj = trained_objective(act, width, seed)
        H = exact_hessian(obj)
        H = (H + H.T) / 2
        out.append((obj, H, torch.linalg.eigvalsh(H)))
    return out


# ------------------------------------------------------------------ 1. no leaks
def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _flat(call, n: int) -> tuple[int, int]:
    """Growth of live tensors and RSS from call 20 to call ``n``."""
    for _ in range(20):
        call()
    tensors, rss = _live_tensors(), _rss()
    for _ in range(n - 20):
        call()
    return _live_tensors() - tensors, _rss() - rss


def test_cached_hessian_frees_its_graph(one_thread):
    X, y = digits(dtype=DTYPE)
    obj = lg.Objective(
        mlp(width=8, seed=0).to(DTYPE), torch.nn.CrossEntropyLoss(), (X[:256], y[:256])
    )
    v = torch.randn(obj.dim, dtype=DTYPE)

    def product_and_release():
        H = lg.hessian(obj)
        H @ v
        H.release()
        del H

    def product_and_drop():
        H = lg.hessian(obj)
        H @ v
        del H

    for call in (product_and_release, product_and_drop):
        tensors, rss = _flat(call, 200)
        assert tensors <= 2, (call.__name__, tensors)
        assert rss <= 4 << 20, (call.__name__, rss)
    tensors, rss = _flat(lambda: lg.eigenvalues(obj, 2), 80)
    assert tensors <= 2 and rss <= 4 << 20, (tensors, rss)


def test_cached_hessian_products_are_unchanged():
    obj = trained_objective("tanh", 6, 0, steps=5)
    H = exact_hessian(obj)
    V = torch.randn(obj.dim, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    op = lg.hessian(obj)
    assert torch.allclose(op @ V, H @ V, rtol=1e-10, atol=1e-12)
    assert op.cached
    op.release()
    assert torch.allclose(op @ V, H @ V, rtol=1e-10, atol=1e-12)


class _Counter(lg.train.Callback):
    def __init__(self, at):
        self.at, self.counts = at, {}

    def on_step(self, state):
        if state.step in self.at:
            self.counts[state.step] = (_live_tensors(), _rss())


def test_training_with_probes_every_step_does_not_leak(tmp_path, one_thread):
    counter = _Counter({8, 40})
    config = {
        "model": {"name": "mlp", "options": {"width": 8}},
        "data": {"name": "digits", "subset": 64, "test_subset": 32},
        "steps": 40,
        "batch_size": 32,
        "metrics": {"every": 1, "eval_samples": 32, "sharpness_max_matvecs": 20},
        "checkpoint": {"every": 40},
    }
    lg.train(config, tmp_path / "run", callbacks=[counter])
    (t0, r0), (t1, r1) = counter.counts[8], counter.counts[40]
    assert t1 - t0 <= 4, (t0, t1)
    assert r1 - r0 <= 8 << 20, (r0, r1)


# ------------------------------------------- 2. condition number, positive part
def _exact_positive_condition(ev: torch.Tensor, threshold: float) -> float:
    hi = float(ev[-1])
    return hi / float(ev[ev >= threshold * hi][0])


@pytest.mark.parametrize("threshold", [1e-3, 0.05])
def test_positive_condition_number_matches_the_dense_spectrum(
    spectra, threshold, one_thread
):
    for i, (obj, H, ev) in enumerate(spectra):
        exact = _exact_positive_condition(ev, threshold)
        kappa = lg.condition_number(obj, positive_part=True, threshold=threshold)
        assert kappa.converged
        assert abs(kappa.value - exact) <= kappa.bound + 1e-9 * exact
        assert kappa.bound <= 1e-4 * exact
        if i:
            continue
        # a budget below the dimension: the folded search, certified or not,
        # never claims more than it knows
        short = lg.condition_number(
            DenseOperator(H), positive_part=True, threshold=threshold, max_matvecs=200
        )
        assert abs(short.value - exact) <= short.bound + 1e-9 * exact
        if short.converged:
            assert short.bound <= 1e-3 * exact


# ------------------------------------------------------ 3. negative mass near 0
def test_negative_mass_error_bar_covers_the_quadrature(spectra, one_thread):
    for _obj, H, ev in spectra:
        op = DenseOperator(H)
        for threshold in (0.0, 0.01 * float(ev[-1])):
            exact = float((ev < -threshold).double().mean())
            for seed in range(3):
                neg = lg.negative_mass(op, threshold, seed=seed)
                err = abs(neg.value - exact)
                assert err <= 4 * neg.stderr + neg.bound, (threshold, seed, neg)


def test_negative_mass_bound_vanishes_across_a_gap(one_thread):
    d = 400
    eigs = torch.cat(
        [
            torch.linspace(-2.0, -0.5, 60, dtype=DTYPE),
            torch.linspace(0.5, 3.0, d - 60, dtype=DTYPE),
        ]
    )
    Q, _ = torch.linalg.qr(
        torch.randn(d, d, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    )
    op = DenseOperator(Q @ torch.diag(eigs) @ Q.T, check_symmetric=False)
    for seed in range(3):
        neg = lg.negative_mass(op, 0.0, seed=seed, n_probes=20)
        assert neg.bound <= 0.02, neg.bound
        assert abs(neg.value - 60 / d) <= 4 * neg.stderr + neg.bound


# ------------------------------------------------ 4. a density needs 2+ steps
def test_density_refuses_a_single_lanczos_step():
    op = DenseOperator(torch.diag(torch.linspace(-1, 1, 50, dtype=DTYPE)))
    with pytest.raises(ValueError, match="lanczos_steps must be at least 2"):
        lg.density(op, lanczos_steps=1)
    assert lg.density(op, 2, 2).values.numel() > 0


# -------------------------------------------------------- 5. bfloat16 probes
def test_bfloat16_objective_agrees_with_float64(one_thread):
    obj64 = trained_objective("tanh", 8, 0, n=128, steps=50)
    model = copy.deepcopy(obj64.model).to(torch.bfloat16)
    X, y = digits(dtype=DTYPE)
    obj16 = lg.Objective(
        model, torch.nn.CrossEntropyLoss(), (X[:128].to(torch.bfloat16), y[:128])
    )
    top64 = lg.eigenvalues(obj64, 2).values.double()
    top16 = lg.eigenvalues(obj16, 2).values
    assert top16.dtype == torch.bfloat16
    assert torch.allclose(top16.double(), top64, rtol=3e-2)
    budget = obj64.dim  # the exact trace, d products
    assert lg.trace(obj16, budget).value == pytest.approx(
        lg.trace(obj64, budget).value, rel=3e-2
    )
    d64 = lg.density(obj64, 4, 30)
    d16 = lg.density(obj16, 4, 30, grid=d64.grid, sigma=d64.sigma)
    l1 = float(torch.trapezoid((d64.values - d16.values).abs(), d64.grid))
    assert l1 < 0.1, l1


# ---------------------------------------------------- 6. save under SIGKILL
_WRITER = """
import sys, torch, lossgeom as lg
from lossgeom.curvature import SpectralEstimate
folder = sys.argv[1]
i = 0
while True:
    i += 1
    big = torch.full((2_000_000,), float(i))
    lg.save_result(SpectralEstimate(value=float(i), details={"big": big}), folder)
    print(i, flush=True)
"""


def test_save_result_survives_sigkill(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_WRITER))
    folder = tmp_path / "result"
    rng = random.Random(0)
    loaded = 0
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(folder)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip()  # at least one save is complete
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        try:
            res = lg.load_result(folder)
        except ValueError as err:
            raise AssertionError(
                f"a killed save left a folder that fails: {err}"
            ) from err
        big = res.details["big"]
        assert big.shape == (2_000_000,)
        assert bool((big == res.value).all()), "a mix of two generations"
        assert res.value == math.floor(res.value) >= 1
        loaded += 1
        # one arrays file: the one result.json names (older ones were removed)
        assert len(list(Path(folder).glob("arrays-*.safetensors"))) in (1, 2)
    assert loaded == 6


# ------------------------------------------------- strict JSON of real results
def test_a_finite_distance_is_not_written_as_infinity(tmp_path):
    # |b - a| = 4e20 * sqrt(d) is finite, but its square overflows float32
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    obj = lg.Objective(model, torch.nn.CrossEntropyLoss(), (X, y))
    far = obj.theta + 4e20
    path = lg.interpolate(obj, obj.theta, far, n_points=3)
    assert math.isfinite(path.details["distance"])
    assert path.details["distance"] == pytest.approx(4e20 * math.sqrt(obj.dim))
    text = (path.save(tmp_path / "p") / "result.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict token {c}"))
    assert lg.load_result(tmp_path / "p").details == path.details


# -------------------------------------------- the trace stops once it is exact
@pytest.mark.parametrize("budget", [60, 10**9])
def test_trace_spends_no_more_than_the_dimension(budget):
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    op = lg.DenseOperator(B + B.T)
    res = lg.trace(op, max_matvecs=budget)
    assert res.method == "exact" and res.stderr == 0.0
    assert res.cost.matvecs == 40 and op.n_matvecs == 40
    assert res.value == pytest.approx(float((B + B.T).trace()), rel=1e-12)
