"""Run under torchrun: lg.train data-parallel on 2 gloo ranks (tests/test_train_ddp.py).

``python -m torch.distributed.run --nproc_per_node 2 _ddp_train_worker.py CONFIG OUT``
trains CONFIG (a JSON file) in several ways; each rank saves what it saw to
``OUT/rank<r>.pt`` (the test's own files, outside every run directory):

- ``fresh``: a fresh run into the relative run directory ``run``, from the
  working directory ``OUT/cwd<r>``: rank 1's stays empty when it writes nothing;
- ``indivisible``: the same config with batch size 31, refused on every rank;
- ``resumed``: a run in ``OUT/resumed`` that fails on every rank after 15
  updates, then resumes from its checkpoint at step 10;
- ``peer_failure``: a run in ``OUT/peer`` that fails on rank 1 only after 5
  updates: rank 0 must not wait for it forever;
- ``cli``: ``lossgeom train`` on the config (10 steps) in ``OUT/cli``, its
  standard output captured.
"""

import contextlib
import faulthandler
import io
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

import lossgeom as lg


class FailAt(lg.train.Callback):
    """Raise after ``step`` updates on the ranks named."""

    def __init__(self, step, ranks):
        self.step, self.ranks = step, ranks

    def on_step(self, state):
        rank = dist.get_rank() if dist.is_initialized() else 0
        if state.step == self.step and rank in self.ranks:
            raise RuntimeError(f"planned failure on rank {rank}")


def weights(res):
    return {k: v.clone() for k, v in res.model.state_dict().items()}


def summary(res):
    return {"status": res.status, "step": res.step, "metrics": res.metrics}


def main(config_file: str, out: str) -> None:
    faulthandler.dump_traceback_later(120, exit=True)  # never hang a test run
    rank = int(os.environ["RANK"])
    out = Path(out)
    cfg = json.loads(Path(config_file).read_text())
    seen = {}

    cwd = out / f"cwd{rank}"
    cwd.mkdir()
    os.chdir(cwd)
    res = lg.train(cfg, "run")
    os.chdir(out)
    seen["fresh"] = {**summary(res), "weights": weights(res)}
    assert not dist.is_initialized()  # the group lg.train made is gone

    try:
        lg.train({**cfg, "batch_size": 31}, out / "indivisible")
    except ValueError as err:
        seen["indivisible"] = str(err)

    try:
        lg.train(cfg, out / "resumed", callbacks=[FailAt(15, {0, 1})])
    except RuntimeError as err:
        seen["resumed_failure"] = str(err)
    res = lg.train(cfg, out / "resumed")
    seen["resumed"] = {**summary(res), "weights": weights(res)}
    seen["resumed_from"] = res.resumed_from

    start = time.perf_counter()
    try:
        lg.train(cfg, out / "peer", callbacks=[FailAt(5, {1})])
    except Exception as err:  # rank 1: planned; rank 0: its peer went away
        seen["peer_failure"] = f"{type(err).__name__}: {err}"
    seen["peer_seconds"] = time.perf_counter() - start

    from lossgeom._io import atomic_write_text
    from lossgeom.cli import train_cmd

    # both ranks write the same file: atomically, so neither reads the other's
    # half-written (truncated) copy
    atomic_write_text(out / "cli.yaml", yaml.safe_dump({**cfg, "steps": 10}))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_cmd(out / "cli.yaml", out / "cli", True, False, False)
    seen["cli_stdout"] = printed.getvalue()

    torch.save(seen, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
