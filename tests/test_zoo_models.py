import inspect
import math

import pytest
import torch
from torch import nn

import lossgeom
from lossgeom.testing import exact_hessian
from lossgeom.zoo._cnn import cnn
from lossgeom.zoo._mlp import mlp
from lossgeom.zoo._models import _REGISTRY, model, models
from lossgeom.zoo._resnet import cifar_resnet, resnet
from lossgeom.zoo._transformer import transformer
from lossgeom.zoo._vit import vit

from cases import rel_err

# Tiny versions of every registered model (fast to build and run).
TINY = {
    "mlp": dict(width=4, depth=2),
    "cnn": dict(width=2, depth=3),
    "resnet20": dict(width=2),
    "resnet32": dict(width=2),
    "resnet44": dict(width=2),
    "resnet56": dict(width=2),
    "resnet110": dict(width=1),
    "resnet18": dict(width=2),
    "resnet34": dict(width=2),
    "vit": dict(dim=8, depth=2, heads=2, mlp_dim=8),
    "transformer": dict(dim=8, depth=2, heads=2, mlp_dim=8),
}
RESNETS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
RESNETS += ["resnet18", "resnet34"]

# Input shapes of the data sets (without the batch dimension).
SHAPES = {
    "digits": (64,),
    "digits_image": (1, 8, 8),
    "mnist1d": (40,),
    "mnist": (1, 28, 28),
    "cifar": (3, 32, 32),
    "tiny_imagenet": (3, 64, 64),
}
IMAGES = ["digits_image", "mnist", "cifar", "tiny_imagenet"]
PATCH = {8: 4, 28: 7, 32: 8, 64: 16}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The models here are tiny: a second intra-op thread only adds synchronisation,
    # which costs 10-50x when other processes load the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data_options(name, shape, num_classes):
    """The options that fit a model to inputs of ``shape``."""
    if name == "mlp":
        return dict(in_features=math.prod(shape), num_classes=num_classes)
    if name == "transformer":
        return dict(seq_len=shape[-1], patch_size=4, num_classes=num_classes)
    opts = dict(in_channels=shape[0], num_classes=num_classes)
    if name == "vit":
        opts.update(image_size=shape[-1], patch_size=PATCH[shape[-1]])
    return opts


def forward_cases():
    cases = []
    for name in TINY:
        if name == "mlp":
            data = list(SHAPES)
        elif name == "transformer":
            data = ["mnist1d", "digits"]
        elif name in ("resnet32", "resnet44", "resnet56", "resnet110", "resnet34"):
            data = ["digits_image"]  # the same code as resnet20 / resnet18
        else:
            data = IMAGES
        for d in data:
            cases.append(pytest.param(name, d, id=f"{name}-{d}"))
    return cases


def norm_modules(net):
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
    return [m for m in net.modules() if isinstance(m, kinds)]


def n_params(net):
    return sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------- parameter counts
# He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), Table 6:
# ResNet-20/32/44/56/110 on CIFAR-10 have 0.27M/0.46M/0.66M/0.85M/1.7M
# parameters with parameter-free (option A) shortcuts. Ours has 1x1 projection
# shortcuts with BatchNorm at the two stage transitions (2,752 parameters at
# width 16), so it is up to ~2% above; the tolerance is 3%.
# ResNet-18/34 in the common CIFAR adaptation (3x3 stride-1 stem, no max-pool,
# BasicBlocks of 64-128-256-512 channels, projection shortcuts, 10 classes) have
# exactly 11,173,962 and 21,282,122 parameters; the ImageNet versions with the
# 7x7 stem and 1000 classes have 11,689,512 and 21,797,672 (torchvision's
# resnet18/resnet34), which differ only in the stem (3*64*(49 - 9) = 7,680 more)
# and the head (513,000 - 5,130 = 507,870 more).
PAPER_COUNTS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
}
EXACT_COUNTS = {
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    # ours, pinned (option-B shortcuts, BatchNorm affine parameters included)
    "resnet20": 272_474,
    "resnet32": 466_906,
    "resnet56": 855_770,
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_cifar_resnet_counts_match_the_paper(name):
    with torch.device("meta"):
        net = model(name)
    count = n_params(net)
    assert PAPER_COUNTS[name] <= count <= 1.03 * PAPER_COUNTS[name]


@pytest.mark.parametrize("name", sorted(EXACT_COUNTS))
def test_exact_parameter_counts(name):
    with torch.device("meta"):
        net = model(name)
    assert n_params(net) == EXACT_COUNTS[name]


@pytest.mark.parametrize(
    ("name", "count"), [("resnet18", 11_689_512), ("resnet34", 21_797_672)]
)
def test_imagenet_resnet_counts_with_imagenet_stem_and_head(name, count):
    # Cross-check against the ImageNet counts: our 3x3 stem has 3*64*(49-9) fewer
    # weights than the 7x7 one; the head follows num_classes.
    with torch.device("meta"):
        net = model(name, num_classes=1000)
    assert n_params(net) + 3 * 64 * (49 - 9) == count


def test_noshort_has_no_shortcut_parameters():
    with torch.device("meta"):
        plain = model("resnet20", skip=False)
        res = model("resnet20")
    shortcut = [n for n, _ in plain.named_parameters() if "shortcut" in n]
    assert shortcut == []
    projections = sum(p.numel() for n, p in res.named_parameters() if "shortcut" in n)
    assert projections == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert n_params(plain) == n_params(res) - projections


# ---------------------------------------------------------------- forward passes
@pytest.mark.parametrize(("name", "data"), forward_cases())
def test_forward_shapes(name, data, device):
    shape = SHAPES[data]
    net = model(name, seed=0, **TINY[name], **data_options(name, shape, 7)).to(device)
    x = torch.randn(3, *shape, device=device)
    for train in (True, False):
        out = net.train(train)(x)
        assert out.shape == (3, 7)
        assert torch.isfinite(out).all()


def test_transformer_reads_channels():
    net = transformer(seq_len=40, in_channels=2, dim=8, heads=2, depth=1, seed=0)
    assert net(torch.randn(2, 2, 40)).shape == (2, 10)
    one = transformer(seq_len=40, dim=8, heads=2, depth=1, seed=0)
    x = torch.randn(2, 40)
    torch.testing.assert_close(one(x), one(x.unsqueeze(1)), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("build", "x", "match"),
    [
        (
            lambda: vit(image_size=8, patch_size=4, in_channels=1),
            (2, 1, 9, 9),
            "1, 8, 8",
        ),
        (lambda: vit(image_size=8, patch_size=4, in_channels=1), (2, 64), "1, 8, 8"),
        (lambda: transformer(seq_len=40), (2, 1, 64), r"\(n, 1, 40\) or \(n, 40\)"),
        (lambda: transformer(seq_len=40, in_channels=2), (2, 40), r"\(n, 2, 40\)"),
    ],
)
def test_wrong_input_shapes_are_explained(build, x, match):
    with pytest.raises(ValueError, match=match):
        build()(torch.randn(*x))


def test_mlp_keeps_its_positional_signature():
    net = mlp(64, 10, width=4)
    assert isinstance(net[0], nn.Linear) and net[0].in_features == 64
    assert net(torch.randn(2, 64)).shape == (2, 10)
    zoo = model("mlp", in_features=64, num_classes=3, width=4)
    assert isinstance(zoo[0], nn.Flatten) and zoo[-1].out_features == 3
    assert cifar_resnet(20, width=4)(torch.randn(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("depth", "sizes"), [(1, [1]), (3, [1, 1, 1]), (5, [1, 1, 1, 2]), (9, [2, 2, 2, 3])]
)
def test_cnn_stages(depth, sizes):
    net = cnn(depth=depth, width=2)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    pools = [m for m in net.features if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == depth and len(pools) == len(sizes) - 1
    widths = [2 * 2**s for s, n in enumerate(sizes) for _ in range(n)]
    assert [c.out_channels for c in convs] == widths


# ------------------------------------------------------------------- toggles
def zero_residual_branches(net):
    """Zero the last layer of every residual branch (so a branch outputs 0)."""
    with torch.no_grad():
        for block in net.blocks:
            last = [block.conv2] if hasattr(block, "conv2") else []
            last += [block.attn.proj, block.mlp[2]] if hasattr(block, "attn") else []
            for layer in last:
                layer.weight.zero_()
                if layer.bias is not None:
                    layer.bias.zero_()
    return net.eval()


@pytest.mark.parametrize(
    ("name", "opts", "shape"),
    [
        ("resnet20", dict(width=2), (1, 3, 8, 8)),
        ("resnet20", dict(width=2, norm=False), (1, 3, 8, 8)),
        ("resnet18", dict(width=2), (1, 3, 8, 8)),
        (
            "vit",
            dict(TINY["vit"], image_size=8, patch_size=4, pool="mean"),
            (1, 3, 8, 8),
        ),
        (
            "vit",
            dict(TINY["vit"], image_size=8, patch_size=4, pool="cls"),
            (1, 3, 8, 8),
        ),
        ("transformer", dict(TINY["transformer"], pool="mean"), (1, 40)),
    ],
)
def test_skip_false_removes_the_residual_additions(name, opts, shape):
    # With every residual branch outputting zero, a net with skip connections still
    # carries its input to the head (with mean pooling; a class token carries
    # only itself); a net without them feeds zeros to the head, which outputs its
    # bias.
    gen = torch.Generator().manual_seed(0)  # inputs independent of test order
    x1, x2 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    res = zero_residual_branches(model(name, seed=0, **opts))
    if opts.get("pool") != "cls":
        assert not torch.allclose(res(x1), res(x2))
    plain = zero_residual_branches(model(name, seed=0, skip=False, **opts))
    head = plain.fc if hasattr(plain, "fc") else plain.head
    for x in (x1, x2):
        assert torch.equal(plain(x), head.bias.expand(1, -1))
    assert not torch.allclose(res(x1), head.bias)
    assert all(not block.skip for block in plain.blocks)
    # and the untouched networks differ only through the residual additions
    a, b = model(name, seed=1, **opts).eval(), model(name, seed=1, skip=False, **opts)
    assert not torch.allclose(a(x1), b.eval()(x1))


@pytest.mark.parametrize(
    ("name", "on", "off", "kind"),
    [
        ("mlp", dict(norm="batch"), dict(norm="none"), nn.BatchNorm1d),
        ("mlp", dict(norm="layer"), dict(norm="none"), nn.LayerNorm),
        ("cnn", dict(norm=True), dict(norm=False), nn.BatchNorm2d),
        *[(r, dict(norm=True), dict(norm=False), nn.BatchNorm2d) for r in RESNETS],
        ("vit", dict(layer_norm=True), dict(layer_norm=False), nn.LayerNorm),
        ("transformer", dict(layer_norm=True), dict(layer_norm=False), nn.LayerNorm),
    ],
)
def test_norm_toggles(name, on, off, kind):
    with torch.device("meta"):
        with_norm = model(name, **TINY[name], **on)
        without = model(name, **TINY[name], **off)
    found = norm_modules(with_norm)
    assert found and all(isinstance(m, kind) for m in found)
    assert norm_modules(without) == []
    if kind is nn.BatchNorm2d:  # a bias only where no BatchNorm follows
        convs = [m for m in with_norm.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.bias is None for c in convs)
        convs = [m for m in without.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.bias is not None for c in convs)


# --------------------------------------------------------- init scale, seeds
def is_norm_parameter(net, param_name):
    owner = net.get_submodule(param_name.rpartition(".")[0])
    return isinstance(owner, nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_init_scale_multiplies_every_weight(name, scale):
    opts = dict(TINY[name])
    if name == "mlp":
        opts["norm"] = "batch"
    base = dict(model(name, seed=0, **opts).named_parameters())
    scaled = model(name, seed=0, init_scale=scale, **opts)
    n_scaled = 0
    for pname, p in scaled.named_parameters():
        if is_norm_parameter(scaled, pname):
            expected = 1.0 if pname.endswith("weight") else 0.0
            assert torch.equal(p, torch.full_like(p, expected)), pname
        else:
            assert torch.equal(p, base[pname] * scale), pname
            n_scaled += p.numel()
    assert n_scaled > 0.9 * n_params(scaled)
    # buffers (BatchNorm running statistics) are left alone
    base_buffers = dict(model(name, seed=0, **opts).named_buffers())
    for bname, b in scaled.named_buffers():
        assert torch.equal(b, base_buffers[bname])


def test_init_scale_scales_embeddings_and_attention():
    base = vit(**TINY["vit"], seed=3)
    scaled = vit(**TINY["vit"], seed=3, init_scale=2.0)
    for attr in ("cls_token", "pos_embedding"):
        assert torch.equal(getattr(scaled, attr), 2.0 * getattr(base, attr))
    for attr in ("qkv", "proj"):
        for p, q in zip(
            getattr(scaled.blocks[0].attn, attr).parameters(),
            getattr(base.blocks[0].attn, attr).parameters(),
            strict=True,
        ):
            assert torch.equal(p, 2.0 * q)


@pytest.mark.parametrize("name", sorted(TINY))
def test_construction_is_deterministic(name):
    def state(net):
        return [t.clone() for t in net.state_dict().values()]

    before = torch.random.get_rng_state()
    a, b = (
        state(model(name, seed=5, **TINY[name])),
        state(model(name, seed=5, **TINY[name])),
    )
    assert torch.equal(torch.random.get_rng_state(), before)  # seed= forks the RNG
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = state(model(name, seed=6, **TINY[name]))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    torch.manual_seed(5)
    d = state(model(name, **TINY[name]))  # the global RNG, seeded the same way
    assert all(torch.equal(x, y) for x, y in zip(a, d, strict=True))


def test_seed_on_the_default_device(device):
    cuda = device == "cuda"
    with torch.device(device):
        before = torch.cuda.get_rng_state() if cuda else torch.random.get_rng_state()
        a = model("vit", seed=2, **TINY["vit"])
        after = torch.cuda.get_rng_state() if cuda else torch.random.get_rng_state()
        torch.manual_seed(2)
        b = model("vit", **TINY["vit"])
    assert torch.equal(before, after)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert p.device.type == device and torch.equal(p, q)


# ------------------------------------------------------------------ registry
def test_registry_options_come_from_the_factories():
    assert set(models()) >= {"mlp", "cnn", "vit", "transformer", *RESNETS}
    for name, options in models().items():
        entry = _REGISTRY[name]
        params = inspect.signature(entry.factory).parameters
        for option, default in options.items():
            arg = entry.rename.get(option, option)
            assert params[arg].default is default
            assert default is not inspect.Parameter.empty, (name, option)
        assert {"init_scale", "seed"} <= set(options)
        assert options["init_scale"] == 1.0 and options["seed"] is None
    assert set(models()["mlp"]) >= {"in_features", "num_classes", "norm"}
    assert "depth" not in models()["resnet20"] and "flatten" not in models()["mlp"]
    m = models()
    m["vit"]["dim"] = -1
    assert models()["vit"]["dim"] == 128  # a copy


def test_every_default_builds():
    for name, options in models().items():
        with torch.device("meta"):
            net = model(name, **options)
        assert isinstance(net, nn.Module)


def test_unknown_name():
    with pytest.raises(
        ValueError, match=r"unknown model 'resnet'.*did you mean"
    ) as err:
        model("resnet")
    for name in models():
        assert name in str(err.value)


def test_unknown_option():
    with pytest.raises(ValueError) as err:
        model("resnet20", widht=4)
    msg = str(err.value)
    assert "'resnet20'" in msg and "'widht'" in msg and "did you mean 'width'" in msg
    assert "width=16" in msg and "skip=True" in msg and "init_scale=1.0" in msg
    with pytest.raises(ValueError, match=r"depth=20 fixed by its name"):
        model("resnet20", depth=32)


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        (
            "resnet20",
            dict(width=-1),
            r"resnet20: width must be an integer >= 1; got -1",
        ),
        ("resnet56", dict(width=2.5), r"width must be an integer >= 1; got 2\.5"),
        ("resnet18", dict(skip="no"), r"skip must be True or False; got 'no'"),
        (
            "vit",
            dict(dim=30, heads=4),
            r"divisible by heads.*dim=30, heads=4.*heads in",
        ),
        ("vit", dict(image_size=30), r"image_size=30, patch_size=4.*patch_size in"),
        ("vit", dict(pool="max"), r"pool must be one of 'cls', 'mean'; got 'max'"),
        ("transformer", dict(seq_len=42), r"seq_len=42, patch_size=4"),
        ("transformer", dict(dim=10, heads=4), r"dim=10, heads=4"),
        ("mlp", dict(norm="group"), r"norm must be one of 'none', 'batch', 'layer'"),
        ("mlp", dict(activation="swish"), r"activation must be one of"),
        ("mlp", dict(num_classes=0), r"num_classes"),
        ("cnn", dict(depth=0), r"cnn: depth must be an integer >= 1; got 0"),
        ("cnn", dict(init_scale=0), r"init_scale must be a finite number > 0"),
        ("cnn", dict(init_scale=float("nan")), r"init_scale .* got nan"),
        ("mlp", dict(seed=-1), r"seed must be an integer >= 0; got -1"),
    ],
)
def test_bad_values(name, opts, match):
    with pytest.raises(ValueError, match=match):
        model(name, **opts)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: cifar_resnet(21), r"6n \+ 2.*got 21"),
        (lambda: resnet(50), r"18 or 34 \(BasicBlock ResNets\); got 50"),
    ],
)
def test_bad_depths(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------- curvature through attention
HVP_CASES = {
    "vit": (
        dict(image_size=4, patch_size=2, in_channels=1, dim=4, depth=2, heads=2),
        (7, 1, 4, 4),
    ),
    "transformer": (dict(seq_len=6, patch_size=2, dim=4, depth=2, heads=2), (7, 6)),
}


@pytest.fixture(scope="module", params=sorted(HVP_CASES))
def attention_problem(request):
    opts, shape = HVP_CASES[request.param]
    net = model(request.param, seed=0, num_classes=3, mlp_dim=4, **opts)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(*shape, generator=gen)
    y = torch.randint(0, 3, (shape[0],), generator=gen)
    obj = lossgeom.Objective(net, nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
    return net, X, y, exact_hessian(obj)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", ["forward-over-reverse", "double-backward"])
def test_attention_hvp_matches_dense_hessian(attention_problem, mode, backend, device):
    net, X, y, H = attention_problem
    obj = lossgeom.Objective(
        net,
        nn.CrossEntropyLoss(),
        (X.to(device), y.to(device)),
        dtype=torch.float64,
        device=device,
        mode=mode,
        hvp_backend=backend,
        batch_size=4,  # an uneven last batch
    )
    # No BatchNorm or dropout: the dense Hessian (eval mode, CPU) holds for both
    # modes.
    V = torch.randn(
        obj.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    HV = obj.hvp(V.to(device)).cpu()
    assert rel_err(HV, H @ V) < 1e-10
    assert rel_err(obj.hvp(V[:, 0].to(device)).cpu(), H @ V[:, 0]) < 1e-10
