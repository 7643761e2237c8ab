"""Cost of running training as a study, against bare ``lg.train`` in one process.

Three measurements, each a ratio to its baseline measured in the same run:

1. Overhead per run: ``N`` short runs (an MLP on digits, ``--steps`` steps,
   metrics every 25 steps) as a study with the local executor and ``--jobs 1``
   (each run a process forked from a fork server that imported lossgeom, its directory
   indexed into SQLite), against the same configs trained one after another by
   ``lg.train`` in this process. Target: at most 5% or 0.5 s per run, whichever
   is larger.
2. Ingestion: a run directory whose ``metrics.jsonl`` has ``--rows`` rows of 20
   numeric columns (and a standard error each for 5 of them), copied into the
   index by the coordinator's ingestion (reading the file included). Reported
   as long-form rows (the index's metric rows: one per run, step and column)
   per second, and as JSON lines (20 columns each) per second. Target: at
   least 20,000 metric rows per second.
3. Parallelism: 8 short runs with ``--jobs 2`` against ``--jobs 1`` (each run
   with ``cores // jobs`` torch threads). Target: at most 0.65x the time.
   Measured at ``--steps`` and at ``--long-steps``: a study pays a fixed
   start-up (the fork server imports torch, ``torch._dynamo`` and scikit-learn
   once, about 3-4 s on a 2-core CPU) that dominates runs of a fraction of a
   second.

Results go to ``benchmarks/results/study_cpu.json`` with the machine facts.

Usage: python benchmarks/study.py [--runs 20] [--steps 150] [--rows 20000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lossgeom as lg
from _machine import machine_facts
from lossgeom._io import atomic_write_json


def base(steps: int) -> dict:
    return {
        "model": {"name": "mlp", "options": {"width": 32}},
        "data": {"name": "digits"},
        "optim": {"name": "sgd", "lr": 0.1},
        "steps": steps,
        "batch_size": 64,
        "metrics": {
            "every": 25,
            "sharpness": True,
            "sharpness_max_matvecs": 20,
            "eval_samples": 512,
            "probe_samples": 256,
        },
    }


def study(steps: int, seeds: int) -> dict:
    return {"name": "bench", "base": base(steps), "seeds": list(range(seeds))}


def overhead(runs: int, steps: int) -> dict:
    spec = study(steps, runs)
    configs = [r.config for r in lg.study.load_study(spec).runs]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for i, cfg in enumerate(configs):
            lg.train(cfg, Path(tmp) / f"bare{i}")
        bare = time.perf_counter() - start
        start = time.perf_counter()
        status = lg.study.run(spec, Path(tmp) / "study", jobs=1, progress=False)
        studied = time.perf_counter() - start
    assert status.counts == {"finished": runs}, status.summary()
    per_run = (studied - bare) / runs
    allowed = max(0.05 * bare / runs, 0.5)
    return {
        "runs": runs,
        "steps": steps,
        "bare_seconds": bare,
        "study_seconds": studied,
        "ratio": studied / bare,
        "overhead_per_run_seconds": per_run,
        "allowed_per_run_seconds": allowed,
        "target_met": per_run <= allowed,
    }


def ingestion(rows: int) -> dict:
    from lossgeom.study._coordinator import _Coordinator
    from lossgeom.study._store import Store

    spec = lg.study.load_study(study(10, 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = spec.runs[0]
        d = root / "runs" / run.run_id
        d.mkdir(parents=True)
        with open(d / "metrics.jsonl", "w") as fh:
            for step in range(rows):
                row = {"step": step}
                row.update({f"m{j}": step * 1e-3 + j for j in range(20)})
                row.update({f"m{j}_stderr": 1e-4 * j for j in range(5)})
                fh.write(json.dumps(row) + "\n")
        (d / "status.json").write_text(json.dumps({"status": "finished", "step": rows}))
        store = Store(root)
        coordinator = _Coordinator.__new__(_Coordinator)
        coordinator.root, coordinator.store = root, store
        coordinator.dirs = {run.run_id: f"runs/{run.run_id}"}
        store.register(spec.runs, coordinator.dirs)
        start = time.perf_counter()
        coordinator._ingest(run.run_id)
        seconds = time.perf_counter() - start
        long_rows = store.con.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
        store.close()
    return {
        "metrics_rows": rows,
        "long_form_rows": long_rows,
        "seconds": seconds,
        "metrics_rows_per_second": rows / seconds,
        "long_form_rows_per_second": long_rows / seconds,
        # a metric row of the index is one (run, step, key, value, stderr)
        "target_met": long_rows / seconds >= 20_000,
    }


def parallel(steps: int) -> dict:
    spec = study(steps, 8)
    times = {}
    for jobs in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            status = lg.study.run(spec, Path(tmp) / "s", jobs=jobs, progress=False)
            times[jobs] = time.perf_counter() - start
            assert status.counts == {"finished": 8}, status.summary()
    return {
        "runs": 8,
        "steps": steps,
        "jobs_1_seconds": times[1],
        "jobs_2_seconds": times[2],
        "ratio": times[2] / times[1],
        "target_met": times[2] / times[1] <= 0.65,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--long-steps", type=int, default=1000)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "study_cpu.json")
    )
    args = parser.parse_args()
    results = {
        "overhead": overhead(args.runs, args.steps),
        "ingestion": ingestion(args.rows),
        "parallel": parallel(args.steps),
        "parallel_long": parallel(args.long_steps),
    }
    results["machine"] = machine_facts("cpu")
    for name, r in results.items():
        if name != "machine":
            print(name, json.dumps(r, indent=1))
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
