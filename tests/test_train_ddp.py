"""Data-parallel training: 2 real torchrun ranks (gloo, CPU) train like one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lossgeom as lg
from lossgeom.train import load_config
from lossgeom.train._batches import training_batch
from lossgeom.train._distributed import check_global_batch

HERE = Path(__file__).parent

# float64 for a tight comparison; sharpness on; a checkpoint every 10 steps
CONFIG = {
    "name": "ddp",
    "seed": 0,
    "dtype": "float64",
    "device": "cpu",
    "model": {"name": "mlp", "options": {"width": 16, "depth": 1}},
    "data": {"name": "digits", "subset": 256, "test_subset": 128},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "steps": 30,
    "batch_size": 32,
    "metrics": {"every": 10, "probe_samples": 128, "eval_samples": 200},
    "checkpoint": {"every": 10},
}
COLUMNS = [
    "lr",
    "batch_loss",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "grad_norm",
    "sharpness",
    "eos_ratio",
]


def _why(proc) -> str:
    """The ranks' own error lines (the command's ``kind: message``), then the tail."""
    text = proc.stdout + proc.stderr
    said = [
        line
        for line in text.splitlines()
        if not line.lstrip().startswith(
            ("[rank", "File ", "Traceback", "W1", "E1", "I1")
        )
        and ("Error" in line or ": " in line and not line.startswith(" "))
    ]
    return "\n".join(said[-30:]) + "\n...\n" + text[-3000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks of tests/_ddp_train_worker.py saw, and its folder."""
    base = tmp_path_factory.mktemp("ddp")
    (base / "config.json").write_text(json.dumps(CONFIG))
    out = base / "out"
    out.mkdir()
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "_ddp_train_worker.py"),
        str(base / "config.json"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, _why(proc)
    seen = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return seen, out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return lg.train(CONFIG, tmp_path_factory.mktemp("single") / "run")


def assert_same_weights(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=atol), key


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 10, 20, 30]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in COLUMNS:
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-9, abs=1e-12), key
        assert g["sharpness_converged"] == w["sharpness_converged"]


def test_two_ranks_train_like_one_process(ranks, single):
    (rank0, rank1), _ = ranks
    assert rank0["fresh"]["status"] == "finished" and rank0["fresh"]["step"] == 30
    want = {k: v.detach() for k, v in single.model.state_dict().items()}
    assert_same_weights(rank0["fresh"]["weights"], want, atol=1e-10)
    assert_same_weights(rank1["fresh"]["weights"], rank0["fresh"]["weights"], 0.0)
    assert_same_rows(rank0["fresh"]["metrics"], single.metrics)


def test_only_rank_zero_writes(ranks):
    (rank0, rank1), out = ranks
    # each rank trained into "run" relative to its own working directory
    assert list((out / "cwd1").iterdir()) == []
    run = out / "cwd0" / "run"
    assert {p.name for p in run.iterdir()} == {
        "config.yaml",
        "metrics.jsonl",
        "status.json",
        "run.lock",
        "checkpoints",
    }
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"step_{s:07d}.{ext}" for s in (10, 20, 30) for ext in ("json", "safetensors")
    ]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert rank1["fresh"]["metrics"] == []  # its run directory does not exist


def test_cli_prints_on_rank_zero_only(ranks):
    (rank0, rank1), _ = ranks
    lines = rank0["cli_stdout"].splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["step", "0"], ["step", "10"]]
    assert lines[2].startswith("finished at step 10")
    assert rank1["cli_stdout"] == ""


def test_batch_size_not_divisible_by_the_ranks_is_refused(ranks):
    (rank0, rank1), out = ranks
    for seen in (rank0, rank1):
        assert (
            "batch_size 31 (the global batch) is not divisible by the 2 ranks"
            in (seen["indivisible"])
        )
        assert "e.g. 30 or 32" in seen["indivisible"]
    assert not (out / "indivisible").exists()  # refused before any work


def test_full_batch_not_divisible_by_the_ranks_is_refused():
    cfg = load_config({**CONFIG, "batch_size": None})
    check_global_batch(cfg, 2)  # the data's size is not known yet
    check_global_batch(cfg, 2, n=256)
    with pytest.raises(ValueError, match="whole training set, 255 samples"):
        check_global_batch(cfg, 2, n=255)
    check_global_batch(load_config({**CONFIG, "batch_size": 31}), 1)


def test_failed_run_resumes_on_two_ranks_like_one_uninterrupted(ranks, single):
    (rank0, rank1), _ = ranks
    assert rank0["resumed_failure"] == "planned failure on rank 0"
    assert rank1["resumed_failure"] == "planned failure on rank 1"
    assert rank0["resumed_from"] == rank1["resumed_from"] == 10
    assert rank0["resumed"]["status"] == "finished"
    assert_same_weights(rank0["resumed"]["weights"], rank0["fresh"]["weights"], 0.0)
    assert_same_weights(rank1["resumed"]["weights"], rank0["fresh"]["weights"], 0.0)
    assert_same_rows(rank0["resumed"]["metrics"], single.metrics)
    assert_same_rows(rank1["resumed"]["metrics"], single.metrics)  # read, not written


def test_a_failure_on_one_rank_does_not_hang_the_other(ranks):
    (rank0, rank1), out = ranks
    assert rank1["peer_failure"] == "RuntimeError: planned failure on rank 1"
    assert rank0["peer_failure"].startswith("RuntimeError")  # its peer went away
    assert rank0["peer_seconds"] < 60
    status = json.loads((out / "peer" / "status.json").read_text())
    assert status["status"] == "failed" and status["step"] == 5


@pytest.mark.parametrize("augment", [None, {"crop_padding": 1, "flip": True}])
@pytest.mark.parametrize("batch_size", [8, None])
def test_shards_of_a_step_make_its_one_process_batch(augment, batch_size):
    cfg = load_config({**CONFIG, "batch_size": batch_size, "augment": augment})
    X = torch.randn(24, 1, 4, 4, dtype=torch.float64)
    y = torch.arange(24)
    whole = training_batch(cfg, (X, y), 5)
    for world in (2, 4):
        shards = [training_batch(cfg, (X, y), 5, (r, world)) for r in range(world)]
        assert torch.equal(torch.cat([s[0] for s in shards]), whole[0])
        assert torch.equal(torch.cat([s[1] for s in shards]), whole[1])
