"""The advisor's validation (examples/validate_advice.py) on a small study.

Checks the computation, not the numbers of docs/advice.md: which runs are
flagged, that reruns carry the advised change, and that the rates, counts and
Wilson intervals follow from the per-run records and the run directories.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from statsmodels.stats.proportion import proportion_confint

import lossgeom as lg

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "name": "advice_small",
    "base": {
        "model": {"name": "mlp", "options": {"width": 16}},
        "data": {"name": "digits", "subset": 256, "test_subset": 64},
        "loss": "mse",
        "optim": {"name": "sgd", "lr": 0.1},
        "steps": 60,
        "batch_size": 32,
        "metrics": {
            "every": 3,
            "eval_samples": 128,
            "probe_samples": 64,
            "sharpness_max_matvecs": 20,
            "trace_max_matvecs": 10,
            "measures": [{"name": "noise_scale"}],
        },
        "checkpoint": {"steps": [6]},
    },
    "grid": {"optim.lr": [0.001, 0.1, 3.0]},
    "seeds": [0, 1],
}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "validate_advice", ROOT / "examples" / "validate_advice.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def validation(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("validation")
    numbers = script.validate(SMALL, out, jobs=1, json_path=out / "numbers.json")
    return out, numbers


def test_numbers_file_is_strict_json_and_complete(validation):
    out, numbers = validation
    stored = json.loads(
        (out / "numbers.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"),
    )
    assert stored["runs"] == numbers["runs"] == 6
    assert stored["records"] == json.loads(json.dumps(numbers["records"]))
    assert not list(out.glob(".numbers.json.*"))  # the temp file was renamed


def test_flags_the_runs_the_rules_describe(validation):
    _, numbers = validation
    by_lr = {}
    for r in numbers["records"]:
        by_lr.setdefault(r["settings"]["optim.lr"], []).append(r)
    for r in by_lr[3.0]:  # 3.7x past 2/lr at step 0 on this model
        assert r["primary"] in ("lr_too_high", "diverged")
        assert r["change"]["optim.lr"] <= 1.5
    for r in by_lr[0.001]:  # the loss barely moves, the sharpness far below
        assert r["primary"] == "lr_too_low"
        assert r["change"]["optim.lr"] > 0.001


def test_rates_follow_from_the_records(script, validation):
    _, numbers = validation
    records = numbers["records"]
    assert script.summarize(records) == {
        k: numbers[k] for k in script.summarize(records)
    }
    flagged = [r for r in records if r["primary"] is not None]
    healthy = [r for r in records if r["healthy"]]
    imp = numbers["improved"]
    assert imp["n"] == len(flagged) == numbers["flagged"]
    assert imp["count"] == sum(bool(r["improved"]) for r in flagged)
    fa = numbers["false_alarms"]
    assert fa["n"] == len(healthy) and fa["count"] == sum(
        r["primary"] is not None for r in healthy
    )
    for rate in (imp, fa, numbers["unhealthy_flagged"]):
        if rate["n"]:
            lo, hi = proportion_confint(
                rate["count"], rate["n"], alpha=0.05, method="wilson"
            )
            assert rate["ci95"] == pytest.approx([lo, hi])
            assert lo <= rate["rate"] == rate["count"] / rate["n"] <= hi
    assert sum(p["primary"] for p in numbers["per_rule"].values()) == len(flagged)


def test_records_match_the_run_directories(script, validation):
    out, numbers = validation
    runs = lg.study.runs(out / "study").set_index("run_id")
    finals = {}
    for r in numbers["records"]:
        run_dir = Path(runs.loc[r["run_id"], "run_dir"])
        rows = lg.train.MetricsLog(run_dir / "metrics.jsonl").read()
        losses = [
            x["train_loss"] for x in rows if isinstance(x.get("train_loss"), float)
        ]
        expected = losses[-1] if r["status"] == "finished" else None
        assert r["final_loss"] == expected
        finals[r["run_id"]] = math.inf if expected is None else expected
    best = min(finals.values())  # one group: only the step size and seed vary
    for r in numbers["records"]:
        healthy = r["status"] == "finished" and finals[r["run_id"]] <= 2 * best
        assert r["healthy"] is healthy
    # every flagged run was rerun with its change applied
    reruns = [
        lg.load_config(Path(d) / "config.yaml")
        for where in (out / "reruns").iterdir()
        for d in lg.study.runs(where)["run_dir"]
    ]
    for r in numbers["records"]:
        if r["primary"] is None:
            assert r["rerun_status"] is None and r["improved"] is None
            continue
        cfg = lg.load_config(Path(runs.loc[r["run_id"], "run_dir"]) / "config.yaml")
        want = script.changed_config(cfg.model_dump(mode="json"), r["change"])
        want = lg.load_config(want).model_dump(mode="json")
        assert any(
            {**c.model_dump(mode="json"), "name": want["name"]} == want for c in reruns
        )
        assert r["improved"] == script.improved(
            {
                "status": r["status"],
                "final": finals[r["run_id"]],
                "new_status": r["rerun_status"],
                "new_final": math.inf
                if r["rerun_final_loss"] is None
                else r["rerun_final_loss"],
                "primary": r["primary"],
                "config": cfg.model_dump(mode="json"),
                "new_config": want,
            }
        )
