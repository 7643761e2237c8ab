"""Untrusted inputs: data files never run code, bad files and labels get clear errors."""

import gzip
import os
import pathlib
import pickle
import struct

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lossgeom as lg
from lossgeom.zoo import dataset


# ------------------------------------------------------------------ CIFAR pickles
def write_cifar10(folder, n=3, protocol=pickle.DEFAULT_PROTOCOL, seed=0):
    """The layout of the official python version: five training batches, a test
    batch and ``batches.meta``; each batch a dict of bytes keys."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[name] = (data, labels)
    meta = {
        b"num_cases_per_batch": n,
        b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
        + [b"dog", b"frog", b"horse", b"ship", b"truck"],
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return written


class _Touch:
    """Unpickling this object touches a file (a stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("payload", ["touch", "system"])
def test_cifar_pickle_payload_is_refused_and_never_runs(tmp_path, payload):
    sub = tmp_path / "cifar-10-batches-py"
    write_cifar10(sub)
    marker = tmp_path / "PWNED"
    evil = _Touch(marker) if payload == "touch" else _System(f"touch '{marker}'")
    (sub / "data_batch_3").write_bytes(
        pickle.dumps({b"data": evil, b"labels": [0, 1, 2]})
    )
    with pytest.raises(ValueError, match="data_batch_3") as info:
        dataset("cifar10", root=tmp_path)
    assert not marker.exists()
    message = str(info.value)
    assert "data_batch_3" in message
    global_name = "Path.touch" if payload == "touch" else "system"
    assert global_name in message  # names the global it tried to load


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_genuine_cifar_batches_still_load(tmp_path, protocol):
    sub = tmp_path / "cifar-10-batches-py"
    written = write_cifar10(sub, protocol=protocol)
    X, y = dataset("cifar10", root=tmp_path)
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(X, torch.from_numpy(data).float().view(15, 3, 32, 32) / 255)
    assert y.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    Xt, yt = dataset("cifar10", root=sub, split="test")
    assert Xt.shape == (3, 3, 32, 32) and yt.tolist() == written["test_batch"][1]


def test_genuine_cifar100_still_loads(tmp_path):
    sub = tmp_path / "cifar-100-python"
    sub.mkdir()
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    fine, coarse = [3, 99, 0, 42], [1, 19, 0, 7]
    batch = {
        b"filenames": [b"a.png"] * 4,
        b"batch_label": b"training batch 1 of 1",
        b"fine_labels": fine,
        b"coarse_labels": coarse,
        b"data": data,
    }
    (sub / "train").write_bytes(pickle.dumps(batch, protocol=2))
    (sub / "meta").write_bytes(
        pickle.dumps({b"fine_label_names": [b"x"] * 100}, protocol=2)
    )
    X, y = dataset("cifar100", root=tmp_path)
    assert torch.equal(X, torch.from_numpy(data).float().view(4, 3, 32, 32) / 255)
    assert y.tolist() == fine
    assert dataset("cifar100", root=tmp_path, coarse=True)[1].tolist() == coarse


# ------------------------------------------------------------------ damaged files
def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        struct.pack(">I", s) for s in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_damaged_idx_and_cifar_files_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 6, dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    assert dataset("mnist", root=tmp_path)[0].shape == (6, 1, 28, 28)
    # a truncated IDX file
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        dataset("mnist", root=tmp_path)
    # a garbled gzipped IDX file (the compressed stream is corrupt)
    bad.unlink()
    raw = gzip.compress(
        b"\x00\x00\x08\x03" + struct.pack(">III", 6, 28, 28) + images.tobytes()
    )
    garbled = raw[:12] + bytes(b ^ 0x5A for b in raw[12:-8]) + raw[-8:]
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(garbled)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        dataset("mnist", root=tmp_path)

    sub = tmp_path / "cifar-10-batches-py"
    write_cifar10(sub)
    batch = sub / "data_batch_2"
    good = batch.read_bytes()
    batch.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="data_batch_2"):
        dataset("cifar10", root=tmp_path)
    batch.write_bytes(  # a pickle of the right shape with garbled labels
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"x", 1]})
    )
    with pytest.raises(ValueError, match="data_batch_2.*labels"):
        dataset("cifar10", root=tmp_path)
    batch.write_bytes(
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    )
    with pytest.raises(ValueError, match=r"data_batch_2.*10.*\[0, 10\)"):
        dataset("cifar10", root=tmp_path)


def test_tiny_imagenet_reads_jpeg_only_and_stays_in_its_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("n01443537\n")
    arr = np.zeros((64, 64, 3), np.uint8)
    Image.fromarray(arr).save(folder / "val" / "images" / "val_0.JPEG", format="PNG")
    notes = folder / "val" / "val_annotations.txt"
    notes.write_text("val_0.JPEG\tn01443537\t0\t0\t63\t63\n")
    with pytest.raises(ValueError, match=r"val_0.JPEG.*JPEG"):
        dataset("tiny_imagenet", root=tmp_path, split="test")
    notes.write_text("../../secret.JPEG\tn01443537\t0\t0\t63\t63\n")
    with pytest.raises(ValueError, match="line 1.*file name"):
        dataset("tiny_imagenet", root=tmp_path, split="test")
    notes.write_bytes(b"\xff\xfe\x00garbage\x81")
    with pytest.raises(ValueError, match="val_annotations.txt"):
        dataset("tiny_imagenet", root=tmp_path, split="test")


# ------------------------------------------------------------------ labels
def _classification(n=200, classes=4, bad_at=150, bad_label=7):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, 5, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    y[bad_at] = bad_label
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, classes))
    return model, X, y


@pytest.mark.parametrize("call", ["loss", "grad", "hvp", "loss_and_grad"])
def test_label_out_of_range_in_a_later_batch(call):
    model, X, y = _classification()
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y), batch_size=50)
    run = {
        "loss": obj.loss,
        "grad": obj.grad,
        "hvp": lambda: obj.hvp(torch.randn(obj.dim)),
        "loss_and_grad": obj.loss_and_grad,
    }[call]
    with pytest.raises(ValueError, match=r"batch 3\b.*label 7.*4 outputs") as info:
        run()
    assert not isinstance(info.value, IndexError)
    assert "[0, 4)" in str(info.value)


def test_label_out_of_range_from_a_dataloader():
    model, X, y = _classification(bad_at=130, bad_label=-3)
    loader = DataLoader(TensorDataset(X, y), batch_size=64)
    obj = lg.Objective(model, nn.CrossEntropyLoss(), loader)
    with pytest.raises(ValueError, match=r"batch 2\b.*label -3.*4 outputs"):
        obj.loss()
    with pytest.raises(ValueError, match=r"batch 2\b.*label -3"):
        obj.grad()


def test_label_out_of_range_in_the_first_batch_is_explained_at_construction():
    model, X, y = _classification(bad_at=3, bad_label=4)
    with pytest.raises(ValueError, match=r"batch 0\b.*label 4.*4 outputs"):
        lg.Objective(model, nn.CrossEntropyLoss(), (X, y), batch_size=50)


def test_ignored_labels_and_other_errors_are_left_alone():
    model, X, y = _classification(bad_at=150, bad_label=-100)  # ignore_index
    obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y), batch_size=50)
    assert np.isfinite(obj.loss())

    def picky(out, target):
        if out.shape[0] == 20:
            raise RuntimeError("a loss that fails for its own reasons")
        return nn.functional.cross_entropy(out, target.clamp(0, 3))

    model, X, y = _classification(n=120, bad_at=0, bad_label=0)
    obj = lg.Objective(model, picky, (X, y), batch_size=50)
    with pytest.raises(RuntimeError, match="its own reasons"):
        obj.loss()  # the last batch has 20 samples; its labels are fine
