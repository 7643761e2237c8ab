"""Permutation alignment (weight matching): structure, equivalence, recovery, errors."""

import copy
import itertools

import pytest
import torch
from torch import nn

from lossgeom import load_result, save_result
from lossgeom.geometry import (
    AlignmentResult,
    PermutationGroup,
    align,
    permutation_groups,
    permute_model,
)
from lossgeom.zoo import cifar_resnet, cnn, mlp, model

DTYPE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: a second intra-op thread only adds synchronisation.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ConvFlatten(nn.Module):
    """Conv -> BN -> ReLU -> flatten (spatial 3x3) -> Linear -> Tanh -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 3 * 3, 5)
        self.ln = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.tanh(self.ln(self.fc1(h))))


class InputResidual(nn.Module):
    """``out(x + f(x))``: the residual stream is the input space, never permuted."""

    def __init__(self):
        super().__init__()
        self.f1 = nn.Linear(4, 6)
        self.f2 = nn.Linear(6, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(x + self.f2(torch.relu(self.f1(x))))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h)[0]).mean(1)


class MatMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.mix = nn.Parameter(torch.randn(6, 6))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.inp(x) @ self.mix)


# name -> (factory(seed), input shape)
CASES = {
    "mlp": (
        lambda s: model("mlp", in_features=6, width=7, depth=2, num_classes=3, seed=s),
        (6,),
    ),
    "mlp_batchnorm": (
        lambda s: mlp(6, 3, width=7, depth=2, norm="batch", seed=s),
        (6,),
    ),
    "mlp_layernorm": (
        lambda s: mlp(6, 3, width=7, depth=2, norm="layer", activation="gelu", seed=s),
        (6,),
    ),
    "cnn_batchnorm": (
        lambda s: cnn(in_channels=1, num_classes=3, width=3, depth=4, seed=s),
        (1, 8, 8),
    ),
    "resnet_skip_bn": (
        lambda s: cifar_resnet(8, width=3, in_channels=1, num_classes=3, seed=s),
        (1, 8, 8),
    ),
    "resnet_noskip": (
        lambda s: cifar_resnet(
            8, width=3, in_channels=1, num_classes=3, skip=False, seed=s
        ),
        (1, 8, 8),
    ),
    "resnet_nonorm": (
        lambda s: cifar_resnet(
            8, width=3, in_channels=1, num_classes=3, norm=False, seed=s
        ),
        (1, 8, 8),
    ),
    "conv_flatten": (lambda s: _seeded(ConvFlatten, s), (2, 7, 7)),
}


def _seeded(cls, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls()


def _randomise_norms(net, seed):
    """Non-trivial BatchNorm/LayerNorm parameters and statistics, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                n = m.weight.numel()
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=gen, dtype=DTYPE))
                m.bias.copy_(0.3 * torch.randn(n, generator=gen, dtype=DTYPE))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=gen, dtype=DTYPE))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen, dtype=DTYPE))
    return net


def make(name, seed):
    factory, shape = CASES[name]
    net = _randomise_norms(factory(seed).to(DTYPE), seed)
    x = torch.randn(
        5, *shape, generator=torch.Generator().manual_seed(100 + seed), dtype=DTYPE
    )
    return net, x


def random_permutations(groups, seed):
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.randperm(g.size, generator=gen) for g in groups}


def state(net):
    """Everything a call must leave bit-identical."""
    return (
        {n: p.detach().clone() for n, p in net.named_parameters()},
        {n: b.clone() for n, b in net.named_buffers()},
        {n: p.requires_grad for n, p in net.named_parameters()},
        {n: m.training for n, m in net.named_modules()},
    )


def same_state(s, t):
    tensors = all(
        s[i].keys() == t[i].keys() and all(torch.equal(s[i][k], t[i][k]) for k in s[i])
        for i in (0, 1)
    )
    return tensors and s[2] == t[2] and s[3] == t[3]


def outputs(net, x):
    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        return net(x)


# ----------------------------------------------------------- functional equivalence
@pytest.mark.parametrize("name", list(CASES))
def test_permuted_b_computes_the_same_function(name):
    a, x = make(name, 0)
    b, _ = make(name, 1)
    res = align(a, b, example_input=x)
    permuted = res.permuted_model(b)
    assert (outputs(permuted, x) - outputs(b, x)).abs().max() < 1e-10
    # the alignment did something: b moved towards a (coordinate descent never
    # increases the distance) and theta is the permuted model's parameter vector
    assert res.distance_after < res.distance_before
    assert res.objective_after > res.objective_before
    assert torch.equal(
        res.theta, torch.cat([p.reshape(-1) for p in permuted.parameters()])
    )
    assert res.converged and 1 <= res.n_sweeps <= 100
    for group in res.groups:
        perm = res.permutations[group["name"]]
        assert perm.dtype == torch.int64
        assert torch.equal(perm.sort().values, torch.arange(group["size"]))


@pytest.mark.parametrize("name", list(CASES))
def test_random_permutation_preserves_the_function(name):
    # permute_model is the ground truth the other tests rely on: check it alone,
    # with every group permuted (BatchNorm statistics included, eval mode).
    a, x = make(name, 0)
    groups = permutation_groups(a, x)
    perms = random_permutations(groups, 3)
    b = permute_model(a, perms, groups)
    assert (outputs(a, x) - outputs(b, x)).abs().max() < 1e-10
    moved = [
        g.name for g in groups if not torch.equal(perms[g.name], torch.arange(g.size))
    ]
    assert moved  # the check is not vacuous
    assert not torch.equal(
        torch.cat([p.reshape(-1) for p in a.parameters()]),
        torch.cat([p.reshape(-1) for p in b.parameters()]),
    )


# ---------------------------------------------------------------------- recovery
@pytest.mark.parametrize("name", list(CASES))
def test_align_recovers_a_hidden_permutation(name):
    a, x = make(name, 0)
    groups = permutation_groups(a, x)
    perms = random_permutations(groups, 7)
    b = permute_model(a, perms, groups)
    res = align(a, b, example_input=x, seed=1)
    recovered = res.permuted_model(b)
    for (n, p), (_, q) in zip(
        a.named_parameters(), recovered.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), n
    for (n, p), (_, q) in zip(
        a.named_buffers(), recovered.named_buffers(), strict=True
    ):
        assert torch.equal(p, q), n
    assert res.distance_after == 0.0
    for g in groups:  # permuted b's unit i is b's unit perm[i] = a's unit i
        assert torch.equal(
            perms[g.name][res.permutations[g.name]], torch.arange(g.size)
        )


def test_align_recovers_an_mlp_permuted_by_hand():
    # b built without lossgeom's permutation code
    a = mlp(5, 3, width=6, depth=2, seed=0).to(DTYPE)
    p1, p2 = (
        torch.randperm(6, generator=torch.Generator().manual_seed(1)),
        torch.tensor([5, 3, 1, 0, 2, 4]),
    )
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight.copy_(a[0].weight[p1])
        b[0].bias.copy_(a[0].bias[p1])
        b[2].weight.copy_(a[2].weight[p2][:, p1])
        b[2].bias.copy_(a[2].bias[p2])
        b[4].weight.copy_(a[4].weight[:, p2])
    x = torch.randn(4, 5, dtype=DTYPE)
    assert torch.allclose(a(x), b(x), atol=1e-12)
    res = align(a, b)
    assert torch.equal(res.theta, torch.cat([p.reshape(-1) for p in a.parameters()]))
    # p1[inverse] = identity: the recovered permutation is the inverse of p1
    assert torch.equal(p1[res.permutations["0"]], torch.arange(6))
    assert torch.equal(p2[res.permutations["2"]], torch.arange(6))


def test_one_group_is_the_exact_optimum():
    # With a single group, one linear assignment is the global optimum: compare with
    # brute force over all 5! permutations of the hidden units.
    a = mlp(4, 3, width=5, depth=1, seed=0).to(DTYPE)
    b = mlp(4, 3, width=5, depth=1, seed=1).to(DTYPE)
    res = align(a, b)
    theta_a = torch.cat([p.detach().reshape(-1) for p in a.parameters()])
    best = max(
        float(
            theta_a
            @ torch.cat(
                [
                    t.detach().reshape(-1)
                    for t in permute_model(b, {"0": torch.tensor(p)}).parameters()
                ]
            )
        )
        for p in itertools.permutations(range(5))
    )
    assert res.objective_after == pytest.approx(best, rel=1e-12)
    assert res.n_sweeps <= 2


# ------------------------------------------------------------------------ groups
@pytest.mark.parametrize("n", [1, 2])
def test_resnet_residual_stream_is_one_group_per_stage(n):
    w = 2
    net = cifar_resnet(6 * n + 2, width=w, in_channels=1)
    groups = {g.name: g for g in permutation_groups(net, torch.randn(2, 1, 8, 8))}
    # 3 residual streams (stem, and the projection stages) + one inner group per block
    assert len(groups) == 3 + 3 * n
    streams = [g for g in groups.values() if not g.name.endswith("conv1")]
    assert [g.size for g in streams] == [w, 2 * w, 4 * w]
    stage1 = {(m[0], m[1]) for m in groups["stem"].members}
    for i in range(n):  # every block of stage 1 writes into the stem's channels
        assert (f"blocks.{i}.conv2.weight", 0) in stage1
        assert (f"blocks.{i}.bn2.running_mean", 0) in stage1
        assert (f"blocks.{i}.conv1.weight", 1) in stage1
    last = {(m[0], m[1]) for m in streams[-1].members}
    assert ("fc.weight", 1) in last and (f"blocks.{3 * n - 1}.conv2.weight", 0) in last
    assert (f"blocks.{2 * n}.shortcut.0.weight", 0) in last
    for i in range(3 * n):
        inner = groups[f"blocks.{i}.conv1"]
        assert inner.size == w * 2 ** (i // n)


def test_resnet_without_skip_has_one_group_per_convolution():
    net = cifar_resnet(14, width=2, skip=False, in_channels=1)
    convs = {f"{n}.weight" for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    groups = permutation_groups(net)
    assert len(groups) == len(convs) == 1 + 12
    for g in groups:  # each produced by one convolution, read by the next layer
        assert len([m for m in g.members if m[1] == 0 and m[0] in convs]) == 1
        assert len([m for m in g.members if m[1] == 1]) == 1


def test_flatten_after_conv_permutes_blocks_of_features():
    net, x = make("conv_flatten", 0)
    groups = {g.name: g for g in permutation_groups(net, x)}
    assert set(groups) == {"conv", "fc1"}
    assert ("fc1.weight", 1, 1, 9) in groups["conv"].members  # 4 channels x 3x3
    assert ("ln.weight", 0, 1, 1) in groups["fc1"].members


def test_input_and_output_spaces_are_never_permuted():
    net = InputResidual()
    groups = permutation_groups(net, torch.randn(3, 4))
    # f2's output is added to the input: tied to the (fixed) input space
    assert [g.name for g in groups] == ["f1"]
    assert {(m[0], m[1]) for m in groups[0].members} == {
        ("f1.weight", 0),
        ("f1.bias", 0),
        ("f2.weight", 1),
    }
    assert [g.name for g in permutation_groups(mlp(4, 3, width=5, depth=0))] == []


def test_groups_round_trip_through_dicts():
    for g in permutation_groups(cifar_resnet(8, width=2, in_channels=1)):
        assert PermutationGroup.from_dict(g.to_dict()) == g


# ------------------------------------------------------------- models unchanged
@pytest.mark.parametrize("name", ["mlp_batchnorm", "resnet_skip_bn"])
def test_user_models_are_not_changed(name):
    a, x = make(name, 0)
    b, _ = make(name, 1)
    a.train()
    b.eval()
    for net in (a, b):  # a frozen parameter, same in both
        last = net.fc if hasattr(net, "fc") else net[-1]
        last.weight.requires_grad_(False)
    before_a, before_b = state(a), state(b)
    y = torch.randint(0, 3, (5,))
    res = align(a, b, loss_fn=nn.CrossEntropyLoss(), data=(x, y), n_points=3)
    permuted = res.permuted_model(b)
    assert same_state(before_a, state(a)) and same_state(before_b, state(b))
    # the copy keeps b's flags
    assert {n: m.training for n, m in permuted.named_modules()} == before_b[3]
    assert {n: p.requires_grad for n, p in permuted.named_parameters()} == before_b[2]


# -------------------------------------------------------------------- bad input
def test_different_architectures_are_rejected():
    a = mlp(6, 3, width=7, depth=2)
    with pytest.raises(ValueError, match=r"shape \(7, 6\) in model_a but \(8, 6\)"):
        align(a, mlp(6, 3, width=8, depth=2))
    with pytest.raises(ValueError, match="only in model_b"):
        align(a, mlp(6, 3, width=7, depth=3))
    with pytest.raises(ValueError, match="dtype"):
        align(a, mlp(6, 3, width=7, depth=2).double())
    with pytest.raises(ValueError, match="module structure"):
        align(a, mlp(6, 3, width=7, depth=2, activation="relu"))
    with pytest.raises(TypeError, match="nn.Module"):
        align(a, "mlp")


def test_unsupported_operations_name_the_module():
    with pytest.raises(NotImplementedError, match=r"'attn' \(MultiheadAttention\)"):
        permutation_groups(Attention(), torch.randn(2, 3, 4))
    with pytest.raises(NotImplementedError, match="matmul"):
        permutation_groups(MatMul(), torch.randn(2, 4))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(3, 3)

        def forward(self, x):
            h = self.f(x)
            return h if h.sum() > 0 else -h

    with pytest.raises(ValueError, match="could not trace"):
        permutation_groups(Branchy(), torch.randn(2, 3))


def test_bad_settings_are_rejected():
    a, b = mlp(4, 2, width=3), mlp(4, 2, width=3)
    X, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="both loss_fn= and data="):
        align(a, b, loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="n_points must be"):
        align(a, b, loss_fn=nn.CrossEntropyLoss(), data=(X, y), n_points=1)
    with pytest.raises(ValueError, match="not model_a's"):
        from lossgeom import Objective

        align(a, b, obj=Objective(b, nn.CrossEntropyLoss(), (X, y)))
    with pytest.raises(ValueError, match="example input"):
        align(a, b, example_input=torch.randn(2, 5))
    groups = permutation_groups(a)
    with pytest.raises(ValueError, match="not a permutation"):
        permute_model(a, {"0": torch.tensor([0, 0, 1])}, groups)
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        permute_model(a, {"0": torch.tensor([0, 1])}, groups)
    with pytest.raises(ValueError, match="does not have"):
        permute_model(a, {"nope": torch.tensor([0, 1, 2])}, groups)


# ---------------------------------------------------------------- barriers, I/O
def test_barrier_vanishes_for_a_recovered_permutation():
    a, x = make("mlp_batchnorm", 0)
    b = permute_model(a, random_permutations(permutation_groups(a, x), 2))
    X = torch.randn(40, 6, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(6))
    res = align(a, b, loss_fn=nn.CrossEntropyLoss(), data=(X, y), n_points=5)
    assert res.parameters["recompute_norm"] is True
    assert res.barrier_after == pytest.approx(0.0, abs=1e-10)
    assert res.barrier_before > res.barrier_after
    assert res.ts.shape == res.loss_before.shape == res.loss_after.shape == (5,)
    # the ends of both paths: a, then b and the permuted b, which compute alike
    assert res.loss_before[0] == pytest.approx(float(res.loss_after[0]), abs=1e-12)
    assert res.loss_before[-1] == pytest.approx(float(res.loss_after[-1]), abs=1e-10)


def test_result_saves_and_loads(tmp_path):
    a, x = make("resnet_skip_bn", 0)
    b, _ = make("resnet_skip_bn", 1)
    y = torch.randint(0, 3, (5,))
    res = align(a, b, loss_fn=nn.CrossEntropyLoss(), data=(x, y), n_points=3)
    back = load_result(save_result(res, tmp_path / "aligned"))
    assert isinstance(back, AlignmentResult)
    assert torch.equal(back.theta, res.theta)
    assert back.permutations.keys() == res.permutations.keys()
    assert all(
        torch.equal(back.permutations[k], v) for k, v in res.permutations.items()
    )
    assert back.groups == res.groups and back.parameters == res.parameters
    assert back.barrier_before == res.barrier_before and torch.equal(
        back.loss_after, res.loss_after
    )
    assert back.to_dict() == res.to_dict()
    # the loaded result still permutes the model
    assert torch.equal(
        torch.cat([p.reshape(-1) for p in back.permuted_model(b).parameters()]),
        res.theta,
    )
    plain = align(a, b, example_input=x)  # no data: no barrier fields
    back = load_result(save_result(plain, tmp_path / "plain"))
    assert back.barrier_before is None and back.ts is None
