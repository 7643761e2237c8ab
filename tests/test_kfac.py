"""K-FAC: factors against their definition and the exact GGN, the update against a
dense damped inverse, training, resuming, preconditioned sharpness, bad input."""

import copy
import json
import math
import os
import shutil

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import lossgeom as lg
from lossgeom.optim import KFAC
from lossgeom.train import ConfigError, load_config

DT = torch.float64


class HalfSquaredError(nn.Module):
    """lossgeom's ``mse``: ``0.5 * ||f - y||^2`` summed over outputs, mean over samples."""

    def forward(self, out, y):
        return 0.5 * ((out - y) ** 2).sum(-1).mean()


LOSSES = {  # K-FAC's loss argument, the loss module, whether targets are classes
    "ce": ("cross_entropy", nn.CrossEntropyLoss(), True),
    "ce_sum": (nn.CrossEntropyLoss(reduction="sum"),) * 2 + (True,),
    "mse": ("mse", HalfSquaredError(), False),
    "mse_mean": (nn.MSELoss(),) * 2 + (False,),
    "mse_sum": (nn.MSELoss(reduction="sum"),) * 2 + (False,),
}


def targets(kind: str, n: int, classes: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if LOSSES[kind][2]:
        return torch.randint(0, classes, (n,), generator=gen)
    return torch.randn(n, classes, generator=gen, dtype=DT)


def one_step(model, X, y, kind, lr=1e-30, **options):
    """One K-FAC step (negligible by default) whose factors are the batch's."""
    opt = KFAC(model, lr=lr, loss=LOSSES[kind][0], **options)
    opt.zero_grad()
    LOSSES[kind][1](model(X), y).backward()
    opt.step()
    return opt


def block_index(model: nn.Module, layer) -> torch.Tensor:
    """Positions in ``theta`` of the layer's ``[W, b]`` in row-major order."""
    offsets, start = {}, 0
    for p in model.parameters():
        offsets[p] = start
        start += p.numel()
    w = layer.weight.reshape(layer.weight.shape[0], -1)
    out, fan_in = w.shape
    idx = offsets[layer.weight] + torch.arange(out * fan_in).reshape(out, fan_in)
    if layer.bias is not None:
        idx = torch.cat([idx, offsets[layer.bias] + torch.arange(out)[:, None]], 1)
    return idx.reshape(-1)


def kfac_matrix(model, opt, blocks=None) -> torch.Tensor:
    """The dense K-FAC curvature (no damping) in ``theta`` order; zero elsewhere."""
    d = sum(p.numel() for p in model.parameters())
    K = torch.zeros(d, d, dtype=DT)
    factors = opt.factors()
    for name in blocks or factors:
        A, G = factors[name]
        idx = block_index(model, model.get_submodule(name))
        K[idx[:, None], idx[None, :]] = torch.kron(G, A)
    return K


# ------------------------------------------------------------ factors: exactness
@pytest.mark.parametrize("kind", list(LOSSES))
def test_one_sample_linear_block_is_the_exact_ggn(kind):
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(DT)
    X = torch.randn(1, 5, dtype=DT)
    y = targets(kind, 1, 3)
    ggn = lg.testing.exact_ggn(lg.Objective(model, LOSSES[kind][1], (X, y)))
    opt = one_step(model, X, y, kind, fisher="ggn")
    K = kfac_matrix(model, opt, [""])
    assert (K - ggn).abs().max() <= 1e-10 * max(1.0, ggn.abs().max())


def _by_hand(layers, X, y, kind, fisher):
    """A and G of a Linear-tanh-Linear net from activations and per-sample
    output gradients, by per-sample Jacobians (independent of the hooks)."""
    (W1, b1), (W2, b2) = layers
    loss_fn = LOSSES[kind][1]
    n = X.shape[0]
    s1 = X @ W1.T + b1
    a2 = torch.tanh(s1)
    a_bar = [torch.cat([X, torch.ones(n, 1, dtype=DT)], 1)]
    a_bar.append(torch.cat([a2, torch.ones(n, 1, dtype=DT)], 1))
    A = [a.T @ a / n for a in a_bar]
    scale = n if getattr(loss_fn, "reduction", "mean") == "sum" else 1.0
    G = [0, 0]
    for i in range(n):

        def from_s1(s, i=i):
            return torch.tanh(s) @ W2.T + b2

        def loss_i(f, i=i):  # the sample's own loss l_n
            return loss_fn(f[None], y[i : i + 1])

        f = from_s1(s1[i])
        J = [jacrev(from_s1)(s1[i]), torch.eye(3, dtype=DT)]  # df/ds1, df/ds2
        if fisher == "ggn":
            H = torch.func.hessian(loss_i)(f)
            for j in range(2):
                G[j] = G[j] + scale * J[j].T @ H @ J[j] / n
        else:
            g = torch.func.grad(loss_i)(f)
            for j in range(2):
                gj = J[j].T @ g
                G[j] = G[j] + scale * torch.outer(gj, gj) / n
    return A, G


@pytest.mark.parametrize("kind", ["ce", "mse_mean", "ce_sum"])
@pytest.mark.parametrize("fisher", ["ggn", "empirical"])
def test_factors_match_their_definition_on_a_two_layer_net(kind, fisher):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X = torch.randn(7, 4, dtype=DT)
    y = targets(kind, 7, 3)
    weights = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in model[::2]]
    opt = one_step(model, X, y, kind, fisher=fisher)
    A, G = _by_hand(weights, X, y, kind, fisher)
    for j, name in enumerate(["0", "2"]):
        a, g = opt.factors()[name]
        torch.testing.assert_close(a, A[j], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(g, G[j], rtol=1e-10, atol=1e-13)


def test_conv_factors_match_their_definition():
    """Grosse & Martens (2016): A = E[sum_t a_t a_t^T], G = E[sum_t g_t g_t^T] / T,
    here from patches cut out by hand and per-sample, per-position gradients."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).to(DT)
    n = 3
    X = torch.randn(n, 2, 5, 5, dtype=DT)
    y = targets("ce", n, 4)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = one_step(model, X, y, "ce", fisher="ggn")
    padded = nn.functional.pad(X, (1, 1, 1, 1))
    A = torch.zeros(2 * 9 + 1, 2 * 9 + 1, dtype=DT)
    for i in range(n):
        for r in range(3):
            for c in range(3):
                patch = padded[i, :, 2 * r : 2 * r + 3, 2 * c : 2 * c + 3].reshape(-1)
                a = torch.cat([patch, torch.ones(1, dtype=DT)])
                A += torch.outer(a, a) / n
    G = torch.zeros(3, 3, dtype=DT)
    for i in range(n):
        s = nn.functional.conv2d(
            X[i : i + 1], params["0.weight"], params["0.bias"], stride=2, padding=1
        )[0]

        def f_of_s(s):
            head = {k: v for k, v in params.items() if k.startswith("3.")}
            return functional_call(model[1:], head, (s[None],))[0]

        f = f_of_s(s)
        J = jacrev(f_of_s)(s).reshape(4, 3, 9)  # (outputs, channels, positions)
        H = torch.func.hessian(
            lambda o, i=i: nn.functional.cross_entropy(o[None], y[i : i + 1])
        )(f)
        for t in range(9):
            G += J[:, :, t].T @ H @ J[:, :, t] / (n * 9)
    a, g = opt.factors()["0"]
    torch.testing.assert_close(a, A, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(g, G, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_mc_fisher_converges_to_the_ggn_factor(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = torch.randn(6, 4, dtype=DT), targets(kind, 6, 3)
    exact = one_step(copy.deepcopy(model), X, y, kind, fisher="ggn").factors()["0"][1]
    errors = []
    for samples in (4, 64, 1024):
        opt = one_step(
            copy.deepcopy(model), X, y, kind, fisher="mc", mc_samples=samples
        )
        G = opt.factors()["0"][1]
        errors.append(float((G - exact).norm() / exact.norm()))
    assert errors[2] < 0.1 and errors[2] < errors[0] / 3, errors


# ------------------------------------------------------------------- the update
def _damped(model, opt, rule, damping):
    """The dense damped K-FAC matrix P in theta order (identity off the blocks)."""
    d = sum(p.numel() for p in model.parameters())
    P = torch.eye(d, dtype=DT)
    for name, (A, G) in opt.factors().items():
        idx = block_index(model, model.get_submodule(name))
        if rule == "exact":
            block = torch.kron(G, A) + damping * torch.eye(idx.numel(), dtype=DT)
        else:  # Martens & Grosse (2015), Sec. 6.3
            pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
            root = math.sqrt(damping)
            block = torch.kron(
                G + root / pi * torch.eye(G.shape[0], dtype=DT),
                A + root * pi * torch.eye(A.shape[0], dtype=DT),
            )
        P[idx[:, None], idx[None, :]] = block
    return P


@pytest.mark.parametrize("rule", ["pi", "exact"])
def test_update_is_the_damped_inverse_applied_to_the_gradient(rule):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)
    ).to(DT)
    X, y = torch.randn(10, 4, dtype=DT), targets("ce", 10, 3)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = KFAC(model, lr=0.1, damping=0.05, damping_rule=rule, fisher="mc", seed=3)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    P = _damped(model, opt, rule, 0.05)
    expected = -0.1 * torch.linalg.solve(P, grad)
    torch.testing.assert_close(after - before, expected, rtol=1e-10, atol=1e-13)
    # P^-1/2 from precondition(power=-0.5) against the dense square root
    vals, vecs = torch.linalg.eigh(P)
    root = vecs @ torch.diag(vals.rsqrt()) @ vecs.T
    V = torch.randn(3, grad.numel(), dtype=DT)
    pieces = [
        t.reshape(3, *p.shape)
        for t, p in zip(
            V.split([p.numel() for p in model.parameters()], 1),
            model.parameters(),
            strict=True,
        )
    ]  # noqa: E501
    got = torch.cat([t.reshape(3, -1) for t in opt.precondition(pieces, -0.5)], 1)
    torch.testing.assert_close(got, V @ root, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(9)]
    options = dict(lr=0.1, momentum=0.9, nesterov=True, inv_every=3, weight_decay=1e-3)
    opt = KFAC(model, **options)

    def train(m, o, part):
        for X, y in part:
            o.zero_grad()
            nn.functional.cross_entropy(m(X), y).backward()
            o.step()

    train(model, opt, batches[:4])
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = KFAC(twin, **{**options, "lr": 1.0})  # lr comes from the state dict
    twin_opt.load_state_dict(saved)
    assert twin_opt.steps_done == 4 and twin_opt.param_groups[0]["lr"] == 0.1
    train(model, opt, batches[4:])
    train(twin, twin_opt, batches[4:])
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_hooks_ignore_copies_functional_calls_and_eval_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = KFAC(model, lr=0.1)
    loss = nn.functional.cross_entropy
    params = {
        k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()
    }
    loss(functional_call(model, params, (X,)), y).backward()
    loss(copy.deepcopy(model)(X), y).backward()
    model.eval()
    loss(model(X), y).backward()
    with pytest.raises(RuntimeError, match="no curvature statistics"):
        opt.step()
    model.train()
    opt.zero_grad()
    loss(model(X), y).backward()
    opt.step()
    assert opt.has_curvature and opt.layer_names == ["0", "2"]


# ------------------------------------------------------------------ in training
def config(**over) -> dict:
    cfg = {
        "name": "kfac",
        "model": {"name": "mlp", "options": {"width": 8, "depth": 1}},
        "data": {"name": "digits", "subset": 256, "test_subset": 128},
        "optim": {
            "name": "kfac",
            "lr": 0.1,
            "momentum": 0.5,
            "kfac": {"damping": 0.03, "inv_every": 3},
        },
        "steps": 40,
        "batch_size": 32,
        "metrics": {"every": 20, "probe_samples": 128},
        "checkpoint": {"every": 20},
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def kfac_run(tmp_path_factory):
    return lg.train(config(), tmp_path_factory.mktemp("kfac") / "run")


def numbers(rows):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def test_kfac_trains_and_reports_preconditioned_sharpness(kfac_run):
    rows = kfac_run.metrics
    assert kfac_run.status == "finished"
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"]
    assert "preconditioned_sharpness" not in rows[0]  # no curvature before a step
    for r in rows[1:]:
        assert r["eos_formula"] == "(2 + 2 beta) / eta"
        assert math.isclose(r["eos_threshold"], 3.0 / 0.1)
        assert math.isclose(
            r["eos_ratio"], r["preconditioned_sharpness"] / r["eos_threshold"]
        )


def test_a_resumed_kfac_run_continues_bit_identically(kfac_run, tmp_path):
    crashed = tmp_path / "crashed"
    shutil.copytree(kfac_run.run_dir, crashed)
    for suffix in (".json", ".safetensors"):
        (crashed / "checkpoints" / f"step_0000040{suffix}").unlink()
    (crashed / "status.json").write_text(json.dumps({"status": "running", "step": 31}))
    res = lg.train(config(), crashed)
    assert res.resumed_from == 20  # 20 % inv_every != 0: the eigenbases come back too
    assert numbers(res.metrics) == numbers(kfac_run.metrics)
    for k, v in kfac_run.model.state_dict().items():
        assert torch.equal(v, res.model.state_dict()[k]), k


def test_preconditioned_sharpness_against_dense(kfac_run):
    from lossgeom.train import latest_checkpoint, load_checkpoint

    model = kfac_run.model
    opt = KFAC(model, lr=0.1)
    load_checkpoint(
        latest_checkpoint(kfac_run.run_dir / "checkpoints"),
        model,
        opt,
        restore_rng=False,
    )
    X, y = lg.zoo.dataset("digits", subset=256, seed=0)
    idx = torch.randperm(256, generator=torch.Generator().manual_seed(2))[:128]
    obj = lg.Objective(
        model, nn.CrossEntropyLoss(), (X[idx].flatten(1), y[idx]), dtype=DT
    )
    H = lg.testing.exact_hessian(obj)
    damped = _damped(model.double(), _as_double(opt), "pi", 0.03)
    vals, vecs = torch.linalg.eigh(damped)
    root = vecs @ torch.diag(vals.rsqrt()) @ vecs.T
    top = torch.linalg.eigvalsh(root @ H @ root)[-1].item()
    last = kfac_run.metrics[-1]
    assert abs(last["preconditioned_sharpness"] - top) <= 2e-3 * top


class _as_double:
    """The factors of an optimizer, in float64."""

    def __init__(self, opt):
        self.opt = opt

    def factors(self):
        return {k: (a.double(), g.double()) for k, (a, g) in self.opt.factors().items()}


# ------------------------------------------------------------------- bad input
def test_bad_input_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"no nn.Linear or nn.Conv2d layer.*SGD or Adam"
    ):
        KFAC(nn.Sequential(nn.Tanh(), nn.LayerNorm(3)))
    model = nn.Linear(3, 2)
    for option, value in [
        ("damping", 0.0),
        ("damping", -1.0),
        ("lr", 0.0),
        ("lr", -0.1),
    ]:
        with pytest.raises(
            ValueError, match=f"option {option} must be a finite number > 0"
        ):
            KFAC(model, **{option: value})
    with pytest.raises(ValueError, match="fisher must be one of"):
        KFAC(model, fisher="type-3")
    with pytest.raises(TypeError, match="nn.Module"):
        KFAC(model.parameters())
    with pytest.raises(TypeError, match="nn.CrossEntropyLoss"):
        KFAC(model, loss=nn.L1Loss())
    with pytest.raises(ValueError, match="exclude names"):
        KFAC(model, exclude=["nope"])
    base = config()
    for optim, where in [
        ({**base["optim"], "kfac": {"damping": 0}}, "optim.kfac.damping"),
        ({**base["optim"], "lr": -1}, "optim.lr"),
        ({"name": "sgd", "kfac": {"damping": 0.1}}, "optim"),
        ({**base["optim"], "kfac": {"fisher": "exact"}}, "optim.kfac.fisher"),
        ({**base["optim"], "adaptive": {"c": 1}}, "optim"),
    ]:
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            load_config(config(optim=optim))
    assert load_config(config(optim={"name": "kfac"})).optim.kfac is None


# ------------------------------------------------------------------- curvlinops
@pytest.mark.parametrize("kind", ["ce", "ce_sum", "mse_mean"])
def test_matches_curvlinops_kfac(kind):
    if os.environ.get("LOSSGEOM_REQUIRE_PEERS") == "1":  # make test installs it
        import curvlinops
    else:
        curvlinops = pytest.importorskip(
            "curvlinops",
            reason="curvlinops is optional (make test installs it: pip install "
            "--no-deps curvlinops-for-pytorch and its pure-Python dependencies)",
        )
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3)
    ).to(DT)
    X, y = torch.randn(5, 1, 4, 4, dtype=DT), targets(kind, 5, 3)
    d = sum(p.numel() for p in model.parameters())
    for fisher, theirs in [("ggn", "type-2"), ("empirical", "empirical")]:
        ours = one_step(copy.deepcopy(model), X, y, kind, fisher=fisher)
        op = curvlinops.KFACLinearOperator(
            model,
            LOSSES[kind][1],
            list(model.parameters()),
            [(X, y)],
            fisher_type=theirs,
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        dense = op @ torch.eye(d, dtype=DT)
        if kind == "mse_mean" and fisher == "empirical":
            # curvlinops scales MSELoss's (mean over the C = 3 outputs) gradients
            # by sqrt(C) for its empirical Fisher; ours takes the loss as it is
            # (its type-2 factors agree with ours and the exact GGN)
            dense = dense / 3
        torch.testing.assert_close(
            kfac_matrix(model, ours), dense, rtol=1e-9, atol=1e-12
        )
