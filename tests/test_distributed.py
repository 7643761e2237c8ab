"""Data parallel over 2 real torchrun processes (gloo, CPU) equals one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lossgeom as lg

from _dist_worker import probes, reduction_cases
from cases import CASES, rel_err

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=0",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=localhost:0",
        str(HERE / "_dist_worker.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("case", CASES[:3], ids=[c.name for c in CASES[:3]])
def test_two_ranks_equal_one_process(distributed_results, case):
    model, loss_fn, X, y = case.make()
    single = probes(lg.Objective(model, loss_fn, (X, y), batch_size=case.batch_size))
    for key, value in single.items():
        assert rel_err(distributed_results[case.name][key], value) <= 1e-10, key


@pytest.mark.parametrize("name", ["ce_weight_ignore", "ce_weight_smoothing", "ce_sum"])
def test_two_ranks_equal_one_process_for_weighted_and_summed_losses(
    distributed_results, name
):
    # the single-process values are checked against the whole-data loss in
    # tests/test_loss_conformance.py; here the ranks must reproduce them
    ((loss_fn, targets),) = [(f, t) for n, f, t in reduction_cases() if n == name]
    model, _, X, _ = CASES[0].make()
    single = probes(lg.Objective(model, loss_fn, (X, targets), batch_size=5))
    for key, value in single.items():
        assert rel_err(distributed_results[name][key], value) <= 1e-10, key


def test_sampler_sharded_loader_equals_one_process(distributed_results):
    model, loss_fn, X, y = CASES[0].make()
    single = probes(lg.Objective(model, loss_fn, (X[:22], y[:22])))
    assert int(distributed_results["loader"]["n_samples"]) == 22
    for key, value in single.items():
        assert rel_err(distributed_results["loader"][key], value) <= 1e-10, key


def test_parameters_that_differ_between_ranks_are_refused(distributed_results):
    assert bool(distributed_results["mismatch_refused"])
