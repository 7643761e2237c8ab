"""Data sets by name: generated sets, MNIST IDX files written here, every error path."""

import gzip
import struct

import numpy as np
import pytest
import torch

import lossgeom as lg
from lossgeom.zoo import dataset, datasets


def write_idx(path, array: np.ndarray, gz: bool = False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        struct.pack(">I", s) for s in array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


@pytest.fixture
def mnist_root(tmp_path):
    rng = np.random.default_rng(0)
    data = {}
    for split, (img, lab), n, gz in (
        ("train", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), 12, False),
        ("test", ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), 5, True),
    ):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(tmp_path / img, images, gz)
        write_idx(tmp_path / lab, labels, gz)
        data[split] = (images, labels)
    return tmp_path, data


@pytest.mark.parametrize("kind", ["mnist", "fashion_mnist"])
def test_idx_files_load_exactly(mnist_root, kind):
    root, data = mnist_root
    for split in ("train", "test"):  # test files are gzipped
        X, y = dataset(kind, root=root, split=split)
        images, labels = data[split]
        assert X.shape == (len(labels), 1, 28, 28) and X.dtype == torch.float32
        assert torch.equal(X[:, 0], torch.from_numpy(images).float() / 255)
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_idx_errors(mnist_root, tmp_path_factory):
    root, _ = mnist_root
    with pytest.raises(ValueError, match="pass root="):
        dataset("mnist")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(
        FileNotFoundError, match="train-images-idx3-ubyte.*never downloads"
    ):
        dataset("mnist", root=empty)
    bad = root / "train-images-idx3-ubyte"
    good = bad.read_bytes()
    bad.write_bytes(good[:-10])
    with pytest.raises(ValueError, match="declares shape .* truncated"):
        dataset("mnist", root=root)
    bad.write_bytes(b"\x00\x00\x0d\x03" + good[4:])
    with pytest.raises(ValueError, match="magic"):
        dataset("mnist", root=root)
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        dataset("mnist", root=root)
    write_idx(bad, np.zeros((11, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="11 images but .* 12 labels"):
        dataset("mnist", root=root)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a valid gzip"):
        dataset("mnist", root=root, split="test")


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown data set 'cifar5'.*digits"):
        dataset("cifar5")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['dims'\].*'dim': 20"):
        dataset("gaussian_mixture", dims=3)
    with pytest.raises(ValueError, match="split must be"):
        dataset("digits", split="val")
    with pytest.raises(ValueError, match=r"subset must be an integer in \[1, 1438\]"):
        dataset("digits", subset=5000)
    with pytest.raises(ValueError, match="takes no root"):
        dataset("digits", root="/tmp")
    with pytest.raises(ValueError, match="classes <= dim"):
        dataset("gaussian_mixture", dim=2, classes=3)
    assert set(datasets()) >= {"digits", "mnist1d", "mnist", "teacher_student"}


@pytest.mark.parametrize(
    "name, options",
    [
        ("gaussian_mixture", {"n": 300, "dim": 6, "classes": 3}),
        ("teacher_student", {"n": 300, "dim": 6, "outputs": 3}),
        ("teacher_student", {"n": 300, "task": "regression", "noise": 0.1}),
        ("digits", {}),
    ],
)
def test_seeded_and_deterministic(name, options):
    a = dataset(name, seed=3, subset=50, **options)
    b = dataset(name, seed=3, subset=50, **options)
    c = dataset(name, seed=4, subset=50, **options)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    train, test = (
        dataset(name, seed=3, **options),
        dataset(name, split="test", seed=3, **options),
    )
    assert train[0].shape[0] > 3 * test[0].shape[0] > 0


def test_synthetic_data_has_the_stated_structure():
    X, y = dataset("gaussian_mixture", n=4000, dim=10, classes=4, margin=3.0)
    means = torch.stack([X[y == c].mean(0) for c in range(4)])
    dist = torch.cdist(means, means)[~torch.eye(4, dtype=torch.bool)]
    assert torch.allclose(dist, torch.full_like(dist, 3.0), atol=0.15)
    _, clean = dataset("teacher_student", n=2000)
    _, noisy = dataset("teacher_student", n=2000, noise=0.5)
    changed = (clean != noisy).float().mean().item()
    assert 0.3 < changed < 0.45  # half relabelled uniformly: 3/4 of those change


def test_mnist1d_is_generated_offline():
    X, y = dataset("mnist1d", num_samples=1000)
    Xt, yt = dataset("mnist1d", split="test", num_samples=1000)
    assert X.shape == (800, 40) and Xt.shape == (200, 40)
    assert set(y.tolist()) == set(range(10))
    model = lg.zoo.model(
        "transformer", seq_len=40, dim=16, depth=1, heads=2, mlp_dim=16
    )
    assert model(X[:4]).shape == (4, 10)
    state = np.random.get_state()[1].copy()
    dataset("mnist1d", num_samples=200)
    assert np.array_equal(np.random.get_state()[1], state)  # global state untouched


def write_cifar(folder, name, n, key, seed):
    import pickle

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(pickle.dumps({b"data": data, key: labels}, protocol=2))
    return data, labels


def test_cifar_batches_load_exactly(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    parts = [write_cifar(sub, f"data_batch_{i}", 3, b"labels", i) for i in range(1, 6)]
    write_cifar(sub, "test_batch", 2, b"labels", 9)
    for root in (tmp_path, sub):  # the folder or its parent
        X, y = dataset("cifar10", root=root)
        assert X.shape == (15, 3, 32, 32)
        data = np.concatenate([d for d, _ in parts])
        assert torch.equal(X, torch.from_numpy(data).float().view(15, 3, 32, 32) / 255)
        assert y.tolist() == sum((lab for _, lab in parts), [])
    assert dataset("cifar10", root=tmp_path, split="test")[0].shape == (2, 3, 32, 32)
    sub100 = tmp_path / "cifar-100-python"
    write_cifar(sub100, "train", 4, b"fine_labels", 0)
    with pytest.raises(ValueError, match="b'coarse_labels'"):
        dataset("cifar100", root=tmp_path, coarse=True)
    assert dataset("cifar100", root=tmp_path)[0].shape == (4, 3, 32, 32)


def test_cifar_errors(tmp_path):
    with pytest.raises(ValueError, match="pass root="):
        dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="data_batch_1.*cs.toronto.edu"):
        dataset("cifar10", root=tmp_path)
    sub = tmp_path / "cifar-10-batches-py"
    write_cifar(sub, "test_batch", 2, b"labels", 0)
    (sub / "test_batch").write_bytes(b"PK\x03\x04 a zip, not a pickle")
    with pytest.raises(ValueError, match="not a python pickle"):
        dataset("cifar10", root=tmp_path, split="test")
    write_cifar(sub, "test_batch", 2, b"fine_labels", 0)
    with pytest.raises(ValueError, match=r"keys b'data' and b'labels'"):
        dataset("cifar10", root=tmp_path, split="test")
    import pickle

    (sub / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(ValueError, match=r"\(n, 3072\)"):
        dataset("cifar10", root=tmp_path, split="test")
    (sub / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    )
    with pytest.raises(ValueError, match="2 images but"):
        dataset("cifar10", root=tmp_path, split="test")
    with pytest.raises(ValueError, match="cifar100 only"):
        dataset("cifar10", root=tmp_path, coarse=True)


# ------------------------------------------------------------------ surfaces
def closed_form_hessian(name, w):
    w1, w2 = w
    if name == "double_well":
        return torch.tensor([[12 * w1**2 - 4, 0.0], [0.0, 1.0]], dtype=torch.float64)
    if name == "rosenbrock":
        return torch.tensor(
            [[2 + 1200 * w1**2 - 400 * w2, -400 * w1], [-400 * w1, 200.0]],
            dtype=torch.float64,
        )
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["double_well", "rosenbrock"])
@pytest.mark.parametrize("w", [(0.3, -0.7), (1.0, 1.0), (-1.2, 0.4)])
def test_surfaces_match_their_closed_forms(name, w):
    obj = lg.Objective(*lg.zoo.surface(name, start=w), dtype=torch.float64)
    H = lg.hessian(obj).to_dense()
    assert torch.allclose(H, closed_form_hessian(name, w), rtol=1e-12, atol=1e-10)
    assert torch.allclose(H, lg.testing.exact_hessian(obj), rtol=1e-12, atol=1e-12)
    w1, w2 = w
    value = (
        (w1**2 - 1) ** 2 + w2**2 / 2
        if name == "double_well"
        else (1 - w1) ** 2 + 100 * (w2 - w1**2) ** 2
    )
    assert obj.loss() == pytest.approx(value, rel=1e-12)


def test_sharp_and_flat_basins():
    tops, losses = [], []
    for centre in ((-3.0, 0.0), (3.0, 0.0)):
        obj = lg.Objective(
            *lg.zoo.surface("sharp_flat", start=centre), dtype=torch.float64
        )
        tops.append(lg.eigenvalues(obj, 1, tol=1e-10).values[0].item())
        losses.append(obj.loss())
        assert obj.grad().norm() < 1e-3  # (nearly) a minimum: the other tail is tiny
    assert tops[0] / tops[1] == pytest.approx(20.0, rel=1e-3)  # sharp / flat
    assert losses[0] == pytest.approx(losses[1], abs=1e-3)
    with pytest.raises(ValueError, match="unknown surface"):
        lg.zoo.surface("saddle")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['c'\]"):
        lg.zoo.surface("rosenbrock", c=1.0)


# ------------------------------------------------------------------ shift
def test_shifts():
    from lossgeom.zoo import shift

    gen = torch.Generator().manual_seed(0)
    X = torch.rand(6, 1, 8, 8, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.equal(shift(X, y, "rotate", 0)[0], X)
    assert torch.equal(shift(X, y, "noise", 0)[0], X)
    r90 = shift(shift(X, y, "rotate", 90)[0], y, "rotate", 90)[0]
    assert torch.allclose(r90, X.flip(-1).flip(-2), atol=1e-5)  # two quarter turns
    once = shift(X, y, "rotate", 90)[0]
    assert torch.allclose(
        once, torch.rot90(X, 1, dims=(-2, -1)), atol=1e-5
    ) or torch.allclose(once, torch.rot90(X, -1, dims=(-2, -1)), atol=1e-5)
    noisy = shift(X, y, "noise", 0.5, seed=1)[0]
    assert torch.equal(noisy, shift(X, y, "noise", 0.5, seed=1)[0])
    assert 0.4 < (noisy - X).std().item() < 0.6
    Xd, yd = dataset("digits")
    Xr, yr = shift(Xd, yd, "rebalance", 10.0, seed=0)
    counts = torch.bincount(yr, minlength=10).float()
    head = torch.bincount(yd, minlength=10).min().item()
    expected = torch.tensor([round(head * 10 ** (-i / 9)) for i in range(10)]).float()
    assert torch.equal(counts, expected)
    with pytest.raises(ValueError, match="kind must be"):
        shift(X, y, "blur", 1)
    with pytest.raises(ValueError, match=r"\(n, C, H, W\)"):
        shift(torch.zeros(3, 4), y[:3], "rotate", 10)
    with pytest.raises(ValueError, match="ratio >= 1"):
        shift(X, y, "rebalance", 0.5)


def write_tiny_imagenet(root, per_class=3):
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    (folder).mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    for w in wnids:
        d = folder / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{w}_{i}.JPEG", format="JPEG")
    (folder / "val" / "images").mkdir(parents=True)
    lines = []
    for i, w in enumerate([wnids[1], wnids[0]]):
        arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(
            folder / "val" / "images" / f"val_{i}.JPEG", format="JPEG"
        )
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_tiny_imagenet_folder(tmp_path):
    from PIL import Image

    folder = write_tiny_imagenet(tmp_path)
    X, y = dataset("tiny_imagenet", root=tmp_path)
    assert X.shape == (6, 3, 64, 64) and y.tolist() == [0, 0, 0, 1, 1, 1]
    first = np.asarray(
        Image.open(folder / "train" / "n01443537" / "images" / "n01443537_0.JPEG")
    )
    assert torch.equal(
        X[0], torch.from_numpy(first.copy()).permute(2, 0, 1).float() / 255
    )
    Xv, yv = dataset("tiny_imagenet", root=folder, split="test")
    assert Xv.shape == (2, 3, 64, 64) and yv.tolist() == [1, 0]
    Xs, ys = dataset("tiny_imagenet", root=tmp_path, subset=4, seed=1)
    assert Xs.shape[0] == 4 and all(any(torch.equal(a, b) for b in X) for a in Xs)
    with pytest.raises(ValueError, match=r"subset must be an integer in \[1, 6\]"):
        dataset("tiny_imagenet", root=tmp_path, subset=7)
    with pytest.raises(ValueError, match="positive integer"):
        dataset("tiny_imagenet", root=tmp_path, subset=0)
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\n")
    with pytest.raises(ValueError, match="line 1.*wnid of wnids.txt"):
        dataset("tiny_imagenet", root=tmp_path, split="test")
    bad = folder / "train" / "n01443537" / "images" / "n01443537_1.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="not a readable image"):
        dataset("tiny_imagenet", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="wnids.txt.*tiny-imagenet-200.zip"):
        dataset("tiny_imagenet", root=tmp_path / "nothing")
