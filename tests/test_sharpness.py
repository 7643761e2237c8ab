"""Sharpness measures: exact references on quadratics, invariance, PAC-Bayes sigma."""

import copy
import json
import math
from statistics import NormalDist

import pytest
import torch
from torch import nn

import lossgeom as lg
from lossgeom.measures._sharpness import SharpnessResult, sharpness
from lossgeom.measures._sharpness_base import _filter_scale

DTYPE = torch.float64


# ------------------------------------------------------------------ problems
class Quadratic(nn.Module):
    """L(x) = 0.5 x.A x as a model whose only parameter is x (loss = mean output)."""

    def __init__(self, A, x0):
        super().__init__()
        self.register_buffer("A", A)
        self.x = nn.Parameter(x0.clone())

    def forward(self, inp):
        q = 0.5 * self.x @ (self.A @ self.x)
        return q.expand(inp.shape[0]).unsqueeze(1)


def mean_output(out, _y):
    return out.mean()


def quadratic(A, x0=None):
    d = A.shape[0]
    x0 = torch.zeros(d, dtype=DTYPE) if x0 is None else x0
    data = (torch.zeros(4, 1, dtype=DTYPE), torch.zeros(4, 1, dtype=DTYPE))
    return lg.Objective(Quadratic(A, x0), mean_output, data)


def spd(d, seed, low=0.5, high=4.0):
    """A random symmetric positive definite matrix with spectrum in [low, high]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    lam = torch.linspace(low, high, d, dtype=DTYPE)
    return Q @ torch.diag(lam) @ Q.T


def positive_psd(d, seed):
    """PSD with positive entries: the box maximiser of x.A x is a corner +-1."""
    g = torch.Generator().manual_seed(seed)
    M = torch.rand(d, d, generator=g, dtype=DTYPE)
    return M @ M.T / d + 0.1 * torch.eye(d, dtype=DTYPE)


def relu_mlp(seed=0, train_steps=100):
    """A small float64 ReLU MLP trained near a minimum of random 3-class labels."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 5, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared CPU: much faster
    try:
        for _ in range(train_steps):
            loss = nn.functional.cross_entropy(model(X), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), X, y


def rescaled(model, alpha):
    """Dinh et al. 2017: layer 1 (weight and bias) times alpha, layer 2 / alpha."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(alpha)
        other[0].bias.mul_(alpha)
        other[2].weight.div_(alpha)
    return other


@pytest.fixture(scope="module")
def mlp():
    model, X, y = relu_mlp()
    return model, X, y


# ----------------------------------------------------------- exact references
@pytest.mark.parametrize("seed", [0, 1])
def test_worst_case_of_a_quadratic_is_half_lambda_max_r_squared(seed):
    A = spd(8, seed)
    obj = quadratic(A)
    r = 0.3
    res = sharpness(obj, r, "worst", steps=30, restarts=2, seed=seed)
    truth = 0.5 * torch.linalg.eigvalsh(A)[-1].item() * r**2
    assert res.value == pytest.approx(truth, rel=0.01)
    assert res.value <= truth * (1 + 1e-10)  # a lower bound, never above
    assert res.details["max_loss"] == pytest.approx(res.value)  # L(0) = 0
    assert res.perturbation.norm().item() <= r * (1 + 1e-12)
    assert math.isnan(res.stderr)  # deterministic: no standard error
    # the maximiser is the top eigenvector (up to sign)
    v = torch.linalg.eigh(A).eigenvectors[:, -1]
    cos = abs(res.perturbation @ v) / res.perturbation.norm()
    assert cos > 0.95


def test_worst_case_linf_of_a_quadratic_reaches_the_known_corner():
    A = positive_psd(6, 0)
    obj = quadratic(A)
    r = 0.2
    res = sharpness(obj, r, "worst", norm="linf", steps=10, restarts=3)
    corner = torch.full((6,), r, dtype=DTYPE)
    truth = 0.5 * corner @ A @ corner
    assert res.value == pytest.approx(truth.item(), rel=1e-10)
    assert torch.allclose(res.perturbation.abs(), corner)
    assert len(set(torch.sign(res.perturbation).tolist())) == 1  # +r 1 or -r 1
    # brute force over all 2^6 corners (a convex function peaks at a corner)
    corners = torch.cartesian_prod(*[torch.tensor([-r, r], dtype=DTYPE)] * 6)
    assert res.value == pytest.approx(
        (0.5 * ((corners @ A) * corners).sum(1)).max().item(), rel=1e-10
    )


def test_interior_maximum_is_found_by_halving_the_step_size():
    """A concave bowl L = -0.5 x.B x seen from x0 with ||x0|| < r: the maximum of
    L(x0 + delta) is inside the ball, at delta = -x0, worth 0.5 x0.B x0. Steps of
    fixed size 2r would jump over it; Auto-PGD halves them on stalls."""
    B = spd(6, 7)
    x0 = torch.linspace(-0.2, 0.3, 6, dtype=DTYPE)
    obj = quadratic(-B, x0)
    r = 1.0
    res = sharpness(obj, r, "worst", steps=20, restarts=1)
    assert res.value == pytest.approx((0.5 * x0 @ B @ x0).item(), rel=1e-3)
    assert (res.perturbation + x0).norm() < 0.02
    assert res.details["halvings"][0] >= 3  # (fixed steps: 45% short of the top)


def test_keskar_box_maximiser_of_a_quadratic_with_positive_gradient():
    A = positive_psd(5, 1)
    x0 = torch.linspace(-0.3, 0.8, 5, dtype=DTYPE).abs() + 0.1
    obj = quadratic(A, x0)
    eps = 0.05
    res = sharpness(obj, eps, "keskar", steps=10, restarts=2)
    # gradient A x0 > 0 and A >= 0 entrywise: the top corner of the box wins
    delta = eps * (x0.abs() + 1)
    L0 = 0.5 * x0 @ A @ x0
    L1 = 0.5 * (x0 + delta) @ A @ (x0 + delta)
    assert res.value == pytest.approx((100 * (L1 - L0) / (1 + L0)).item(), rel=1e-10)
    assert torch.allclose(res.perturbation, delta)
    assert res.details["loss_increase"] == pytest.approx((L1 - L0).item())
    assert res.parameters["norm"] == "linf"


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_estimate_matches_its_closed_form(norm, adaptive):
    A = spd(7, 3)
    x0 = torch.linspace(-1, 1.5, 7, dtype=DTYPE)
    obj = quadratic(A, x0)
    rho, eta = 0.1, 0.01
    res = sharpness(obj, rho, "sam", norm=norm, adaptive=adaptive, eta=eta)
    g = A @ x0
    T = x0.abs() + eta if adaptive else torch.ones(7, dtype=DTYPE)
    Tg = T * g
    z = rho * (Tg / Tg.norm() if norm == "l2" else Tg.sign())
    delta = T * z
    truth = g @ delta + 0.5 * delta @ A @ delta
    assert res.value == pytest.approx(truth.item(), rel=1e-10)
    assert torch.allclose(res.perturbation, delta)
    dual = Tg.norm() if norm == "l2" else Tg.abs().sum()
    assert res.details["first_order"] == pytest.approx(rho * dual.item())
    # the worst case starts at SAM's point, so it can only be larger
    worst = sharpness(
        obj, rho, "worst", norm=norm, adaptive=adaptive, eta=eta, steps=5, restarts=1
    )
    assert worst.value >= res.value - 1e-12


def test_average_case_of_a_quadratic_is_half_sigma_squared_trace():
    A = spd(10, 2)
    obj = quadratic(A)
    sigma = 0.2
    truth = 0.5 * sigma**2 * torch.trace(A).item()
    big = sharpness(obj, sigma, "average", samples=800, seed=0)
    assert abs(big.value - truth) < 4 * big.stderr
    # the standard deviation of 0.5 z.A z is sigma^2 ||A||_F / sqrt(2)
    std = sigma**2 * torch.linalg.matrix_norm(A).item() / math.sqrt(2)
    assert big.details["std"] == pytest.approx(std, rel=0.15)
    assert big.stderr == pytest.approx(std / math.sqrt(800), rel=0.15)
    # calibration: z-scores over seeds behave like standard normals (loosely)
    zs = [
        (sharpness(obj, sigma, "average", samples=100, seed=s).value - truth)
        / sharpness(obj, sigma, "average", samples=100, seed=s).stderr
        for s in range(1, 9)
    ]
    assert max(abs(z) for z in zs) < 4.5
    assert sum(abs(z) < 2 for z in zs) >= 6
    assert sum(z * z for z in zs) / len(zs) < 3


def test_average_case_standard_error_shrinks_as_one_over_root_n():
    obj = quadratic(spd(6, 4))
    small = sharpness(obj, 0.1, "average", samples=50, seed=3)
    large = sharpness(obj, 0.1, "average", samples=800, seed=3)
    assert large.stderr / small.stderr == pytest.approx(0.25, rel=0.4)


def test_logdet_kind_matches_the_dense_log_determinant():
    A = spd(8, 5, low=0.1, high=3.0)
    obj = quadratic(A)
    eps = 0.05
    res = sharpness(obj, eps, "logdet", samples=30)
    truth = torch.logdet(A + eps * torch.eye(8, dtype=DTYPE)).item()
    assert abs(res.value - truth) < 4 * res.stderr + 1e-8
    assert res.stderr > 0
    assert "log det(H + 0.05 I)" in res.definition


# ----------------------------------------------------------------- invariance
def test_filter_scale_equals_the_filter_normalized_all_ones_direction(mlp):
    model, X, y = mlp
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    # Each entry of a weight filter gets that filter's root-mean-square; 1-D
    # parameters their own magnitude.
    pieces = []
    for w in obj.unflatten(obj.theta).values():
        if w.ndim <= 1:
            pieces.append(w.abs().reshape(-1))
        else:
            rows = w.reshape(w.shape[0], -1)
            rms = rows.pow(2).mean(1, keepdim=True).sqrt()
            pieces.append(rms.expand_as(rows).reshape(-1))
    ref = torch.cat(pieces)
    assert torch.allclose(_filter_scale(obj, obj.theta), ref)


def test_adaptive_sharpness_is_invariant_where_plain_sharpness_is_not(mlp):
    """Dinh et al. 2017: the same function, rescaled layer-wise by (10, 1/10)."""
    model, X, y = mlp
    other = rescaled(model, 10.0)
    assert torch.allclose(model(X), other(X), atol=1e-10)
    loss = nn.CrossEntropyLoss()
    a = lg.Objective(model, loss, (X, y))
    b = lg.Objective(other, loss, (X, y))

    def both(**kw):
        return [sharpness(o, seed=0, **kw).value for o in (a, b)]

    invariant = {
        "adaptive worst": both(radius=0.05, kind="worst", adaptive=True, eta=0.0),
        "filter worst": both(
            radius=0.05, kind="worst", adaptive=True, normalization="filter", eta=0.0
        ),
        "adaptive average": both(
            radius=0.05, kind="average", adaptive=True, eta=0.0, samples=16
        ),
        "filter average": both(
            radius=0.05,
            kind="average",
            adaptive=True,
            normalization="filter",
            eta=0.0,
            samples=16,
        ),
    }
    for name, (va, vb) in invariant.items():
        assert va > 0, name
        assert vb == pytest.approx(va, rel=0.05), name
    lam = [lg.eigenvalues(o, 1).values[0].item() for o in (a, b)]
    plain = both(radius=0.01, kind="worst", steps=10, restarts=2)
    for va, vb in (lam, plain):
        assert max(va / vb, vb / va) > 10


# ----------------------------------------------------------------- PAC-Bayes
class SignModel(nn.Module):
    """Two logits [w x, 0]: class 0 wins exactly when the perturbed w is > 0."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.full((1,), w, dtype=DTYPE))

    def forward(self, x):
        return torch.cat([self.w * x, torch.zeros_like(x)], 1)


def test_pac_bayes_sigma_matches_the_gaussian_crossing():
    """Accuracy at w + u, u ~ N(0, sigma^2 w^2 + eps^2), is P(u > -w) =
    Phi(w / sqrt(sigma^2 w^2 + eps^2)); it drops by 0.1 at
    sigma = sqrt(1/z^2 - eps^2/w^2), z = Phi^-1(0.9). w = 3, not 1, so that
    sigma scaling the standard deviation (not the variance) by |w| matters."""
    w = 3.0
    X = torch.linspace(0.5, 2, 8, dtype=DTYPE).unsqueeze(1)
    y = torch.zeros(8, dtype=torch.long)
    obj = lg.Objective(SignModel(w), nn.CrossEntropyLoss(), (X, y))
    n = 1000
    res = sharpness(
        obj, 0.1, "pac_bayes", samples=n, tol=0.002, chunk_size=None, seed=0
    )
    z = NormalDist().inv_cdf(0.9)
    truth = math.sqrt(1 / z**2 - 1e-6 / w**2)
    # the sampling error of the empirical 10% quantile of N(0, 1), mapped to sigma
    se = math.sqrt(0.09 / n) / NormalDist().pdf(z) / z**2
    assert abs(res.value - truth) < 4 * se
    lo, hi = res.details["bracket"]
    assert lo == res.value and hi - lo <= 0.002 * hi
    assert res.details["base_accuracy"] == 1.0
    assert res.details["accuracy_drop"] <= 0.1
    assert res.details["accuracy_drop"] > 0.1 - 3 / n  # the crossing, not below it
    assert res.details["flatness"] == pytest.approx(1 / res.value**2)


def test_pac_bayes_bisection_brackets_the_crossing_on_an_mlp(mlp):
    model, X, y = mlp
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    res = sharpness(obj, 0.05, "pac_bayes", samples=24, tol=0.02, seed=1)
    lo, hi = res.details["bracket"]
    history = dict((s, d) for s, d in res.details["history"])
    assert res.details["bracketed"]
    assert history[lo] <= 0.1 < history[hi]
    assert hi - lo <= 0.02 * hi
    assert lo > 0 and res.value == lo
    # every probed sigma left of the bracket stayed within the target, and every
    # one right of it exceeded it (the search moved monotonically)
    assert all(d <= 0.1 for s, d in history.items() if s <= lo)
    assert all(d > 0.1 for s, d in history.items() if s >= hi)
    # an independent check with fresh noise: clearly below / above the crossing
    base = obj.evaluate_metrics(obj.theta.unsqueeze(0))["accuracy"][0].item()
    g = torch.Generator().manual_seed(123)
    w = obj.theta

    def drop(sigma, m=64):
        u = torch.randn(m, obj.dim, generator=g, dtype=DTYPE)
        u = u * (sigma**2 * w**2 + 1e-6).sqrt()
        return base - obj.evaluate_metrics(w + u)["accuracy"].mean().item()

    assert drop(0.5 * res.value) < 0.1 < drop(2.0 * res.value)


# ------------------------------------------------------- results and contract
def test_result_is_reproducible_serialisable_and_documents_itself(mlp):
    model, X, y = mlp
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    one = sharpness(obj, 0.02, "average", samples=8, seed=5)
    two = sharpness(obj, 0.02, "average", samples=8, seed=5)
    other = sharpness(obj, 0.02, "average", samples=8, seed=6)
    assert one.value == two.value and one.stderr == two.stderr
    assert one.value != other.value
    assert isinstance(one, SharpnessResult)
    worst = sharpness(obj, 0.02, "worst", steps=4, restarts=2, seed=5)
    assert (
        worst.value == sharpness(obj, 0.02, "worst", steps=4, restarts=2, seed=5).value
    )
    for res in (one, worst):
        d = res.to_dict()
        json.dumps(d)
        assert "perturbation" not in d
        assert d["cost"]["seconds"] > 0 and d["cost"]["counters"]["loss"] > 0
        assert res.parameters["seed"] == 5 and res.parameters["mode"] == "eval"
    assert worst.cost.counters["grad"] == 1 + 2 * 4  # base gradient + steps per restart
    assert worst.details["restarts"] == 2 and worst.details["steps"] == 4
    assert len(worst.details["per_restart"]) == 2
    assert worst.details["max_loss"] == pytest.approx(
        worst.details["base_loss"] + worst.value
    )
    assert "Auto-PGD" in worst.definition and "N(0, 0.02^2 I)" in one.definition
    with pytest.raises(AttributeError):
        one.value = 0.0  # frozen


@pytest.mark.parametrize(
    "kind, options",
    [
        ("worst", {"steps": 3, "restarts": 2}),
        ("worst", {"steps": 3, "restarts": 1, "adaptive": True}),
        ("average", {"samples": 4}),
        ("sam", {"norm": "linf"}),
        ("keskar", {"steps": 3, "restarts": 1}),
        ("logdet", {"samples": 2, "lanczos_steps": 10, "radius": 10.0}),
        ("pac_bayes", {"samples": 4, "tol": 0.2}),
    ],
)
def test_user_model_is_unchanged(mlp, kind, options):
    model, X, y = mlp
    model = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    theta = obj.theta
    options = dict(options)
    sharpness(obj, options.pop("radius", 0.02), kind, **options)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(obj.theta, theta)


def test_worst_case_respects_the_ball_the_box_and_the_scaled_ball(mlp):
    model, X, y = mlp
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    w = obj.theta
    r = 0.03
    l2 = sharpness(obj, r, "worst", steps=5, restarts=1)
    box = sharpness(obj, r, "worst", norm="linf", steps=5, restarts=1)
    ada = sharpness(obj, r, "worst", adaptive=True, eta=0.01, steps=5, restarts=1)
    assert l2.perturbation.norm() <= r * (1 + 1e-12)
    assert box.perturbation.abs().max() <= r * (1 + 1e-12)
    assert (ada.perturbation / (w.abs() + 0.01)).norm() <= r * (1 + 1e-12)
    assert min(l2.value, box.value, ada.value) > 0
    assert box.value > l2.value  # the box holds the ball


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0.0,), {}, "radius must be a finite number > 0; got 0.0"),
        ((-1.0,), {}, "radius must be"),
        ((float("nan"),), {}, "radius must be"),
        (("big",), {}, "radius must be"),
        ((0.1, "max"), {}, "kind must be one of .*got 'max'"),
        ((0.1,), {"norm": "l1"}, "norm must be 'l2' or 'linf'; got 'l1'"),
        ((0.1, "average"), {"norm": "linf"}, "does not apply to kind='average'"),
        ((0.1, "keskar"), {"norm": "l2"}, "'linf' only"),
        ((0.1, "logdet"), {"norm": "l2"}, "takes no norm; leave norm=None"),
        ((0.1, "keskar"), {"adaptive": True}, "adaptive=True applies to kinds"),
        ((0.1, "pac_bayes"), {"adaptive": True}, "magnitude-aware"),
        ((0.1, "logdet"), {"adaptive": True}, "Use adaptive=False"),
        ((0.1,), {"normalization": "filter"}, "needs adaptive=True"),
        ((0.1,), {"adaptive": True, "normalization": "layer"}, "normalization must"),
        ((0.1,), {"steps": 0}, "steps must be an int >= 1; got 0"),
        ((0.1,), {"restarts": 1.5}, "restarts must be"),
        ((0.1, "average"), {"samples": 1}, "samples must be an int >= 2"),
        ((0.1,), {"adaptive": True, "eta": -1.0}, "eta must be"),
        ((0.1, "pac_bayes"), {"target_drop": 1.5}, "target_drop must be"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(mlp, args, kwargs, match):
    model, X, y = mlp
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match=match):
        sharpness(obj, *args, **kwargs)


def test_bad_objects_and_regression_pac_bayes_are_refused():
    with pytest.raises(TypeError, match="expected obj to be a lossgeom.Objective"):
        sharpness(nn.Linear(2, 1), 0.1)
    obj = quadratic(spd(3, 0))
    with pytest.raises(ValueError, match="needs training accuracy"):
        sharpness(obj, 0.1, "pac_bayes")
    with pytest.raises(ValueError, match="expected"):
        sharpness(obj, 0.1, theta=torch.zeros(5, dtype=DTYPE))


def test_pac_bayes_without_a_bracket_reports_infinity():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    obj = lg.Objective(m, nn.CrossEntropyLoss(), (X, y))
    base = float(obj.evaluate_metrics(obj.theta[None])["accuracy"][0])
    # An accuracy drop above the base accuracy can never happen: no bracket.
    res = sharpness(obj, 0.1, kind="pac_bayes", target_drop=base + 0.01, samples=4)
    assert not res.details["bracketed"]
    assert math.isinf(res.value) and res.details["sigma_tested_up_to"] > 1e6
