"""The training advisor: each rule at its thresholds, the callback, advise, the CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml
from typer.testing import CliRunner

import lossgeom as lg
from lossgeom.cli import app
from lossgeom.train import RULES, AdviceResult, AdviceThresholds, advise, recommend

TH = AdviceThresholds()


def config(**over) -> dict:
    cfg = {
        "model": {"name": "mlp", "options": {"width": 16}},
        "data": {"name": "digits", "subset": 512},
        "optim": {"name": "sgd", "lr": 0.1},
        "steps": 300,
        "batch_size": 32,
    }
    cfg.update(over)
    return cfg


def eos_rows(ratios, lr=0.1, losses=None, scale=1.0, **extra) -> list[dict]:
    """Rows with ``sharpness`` and ``lr`` only: the ratio is derived (2 / lr).

    ``scale`` multiplies the step size and divides the sharpness.
    """
    losses = losses or [2.3 - 0.5 * i for i in range(len(ratios))]
    return [
        {
            "step": 10 * i,
            "lr": lr * scale,
            "sharpness": r * (2 / lr) / scale,
            "train_loss": loss,
            **extra,
        }
        for i, (r, loss) in enumerate(zip(ratios, losses, strict=True))
    ]


def fired(rows, cfg=None, **kw) -> list[str]:
    return recommend(rows, cfg or config(), **kw).rules


def rec(result: AdviceResult, rule: str) -> dict:
    return next(r for r in result.recommendations if r["rule"] == rule)


# ------------------------------------------------------------------ lr_too_high
@pytest.mark.parametrize("scale", [1.0, 1e-3, 40.0])
@pytest.mark.parametrize(
    "ratios, fires",
    [
        ([0.6, 0.9, 1.0], True),  # at the threshold and rising
        ([0.6, 0.9, 0.999], False),  # rising, just below it
        ([1.9, 1.5, 1.2], False),  # above it but falling (self-stabilising)
        ([0.5, 2.0, 1.2], True),  # overshoot, whatever the trend
        ([0.5, 1.999, 0.9], False),  # just below the overshoot, ends below 1
        ([2.5], True),  # one row: the overshoot alone decides
        ([1.5], False),  # one row, no trend
    ],
)
def test_lr_too_high_at_its_thresholds(ratios, fires, scale):
    """Decisions depend on sharpness x lr only: scaling lr by c, lambda by 1/c."""
    rows = eos_rows(ratios, scale=scale)
    assert ("lr_too_high" in fired(rows)) is fires


def test_lr_too_high_change_puts_the_first_ratio_at_the_target():
    res = recommend(eos_rows([0.8, 1.6, 2.4]), config())
    r = rec(res, "lr_too_high")
    assert r["evidence"]["eos_ratio_first"] == pytest.approx(0.8)
    assert r["evidence"]["lr_factor"] == pytest.approx(0.25 / 0.8)
    assert r["change"] == {"optim.lr": pytest.approx(0.1 * 0.25 / 0.8, rel=1e-2)}
    assert set(r) >= {"rule", "message", "evidence", "expected_effect", "change"}
    assert r["evidence"]["eos_high"] == 1.0 and r["evidence"]["eos_overshoot"] == 2.0
    # a first ratio below the target still reduces the step: at most halved
    r = rec(recommend(eos_rows([0.1, 3.0]), config()), "lr_too_high")
    assert r["evidence"]["lr_factor"] == TH.max_factor_down


def test_eos_ratio_column_is_read_for_any_optimizer():
    """With ``eos_ratio`` in the rows (Adam: the preconditioned one) it is used."""
    rows = [
        {"step": 0, "lr": 1e-3, "train_loss": 2.3},
        {"step": 10, "lr": 1e-3, "train_loss": 2.0, "eos_ratio": 2.5},
    ]
    cfg = config(optim={"name": "adam", "lr": 1e-3})
    assert fired(rows, cfg) == ["lr_too_high"]


# ------------------------------------------------------------------- lr_too_low
@pytest.mark.parametrize("loss_scale", [1.0, 1e3])
@pytest.mark.parametrize("scale", [1.0, 1e-2])
@pytest.mark.parametrize(
    "ratios, losses, fires",
    [
        ([0.05, 0.1], [2.0, 1.02], True),  # 49% drop, peak at eos_low
        ([0.05, 0.1], [2.0, 1.0], False),  # 50% drop: not a stall
        ([0.05, 0.1001], [2.0, 1.9], False),  # not far below the threshold
        ([0.01, 0.01, 0.01], [2.0, 1.99, 1.98], True),
    ],
)
def test_lr_too_low_at_its_thresholds(ratios, losses, fires, scale, loss_scale):
    rows = eos_rows(ratios, losses=[x * loss_scale for x in losses], scale=scale)
    assert ("lr_too_low" in fired(rows)) is fires


def test_lr_too_low_change_and_needs_two_rows():
    r = rec(recommend(eos_rows([0.02, 0.04], losses=[2, 1.9]), config()), "lr_too_low")
    assert r["evidence"]["lr_factor"] == pytest.approx(0.25 / 0.04)
    assert r["change"]["optim.lr"] == pytest.approx(0.625, rel=1e-2)
    res = recommend(eos_rows([0.02]), config())
    assert "lr_too_low" in res.details["not_evaluated"]


# --------------------------------------------------------------------- diverged
def test_diverged_row_fires_and_reduces_the_step():
    rows = eos_rows([0.5, 0.6]) + [{"step": 15, "batch_loss": "NaN", "diverged": True}]
    res = recommend(rows, config())
    r = rec(res, "diverged")
    assert r["evidence"]["diverged_at"] == 15
    assert r["change"]["optim.lr"] == pytest.approx(0.05)
    assert res.primary["rule"] == "diverged"
    assert "diverged" not in fired(eos_rows([0.5, 0.6]))


# ---------------------------------------------------------------- rugged_slices
@pytest.mark.parametrize(
    "excess, trace_ratio, fires",
    [(25.0, 0.5, True), (24.9, 0.5, False), (50.0, 1.0, False), (50.0, 0.99, True)],
)
def test_rugged_slices_at_its_thresholds(excess, trace_ratio, fires):
    lr = 0.1
    rows = [
        {**r, "trace": trace_ratio * 2 / lr}
        for r in eos_rows([0.2, 0.2], losses=[2, 1])
    ]
    probes = [
        {
            "step": 10,
            "key": "slice_1d",
            "slice_1d_excess_variation": excess,
            "slice_1d_total_variation": 100.0,
        }
    ]
    res = recommend(rows, config(), probe_rows=probes)
    assert ("rugged_slices" in res.rules) is fires
    if fires:
        assert rec(res, "rugged_slices")["change"]["optim.lr"] == pytest.approx(0.05)


def test_rugged_slices_says_what_it_needs():
    res = recommend(eos_rows([0.2, 0.2]), config())
    why = res.details["not_evaluated"]["rugged_slices"]
    assert any("slice_1d" in e for e in why["enable"])
    assert "metrics.trace_max_matvecs: 20" in why["enable"]


# ------------------------------------------------------------------ batch rules
@pytest.mark.parametrize(
    "b_noise, rule",
    [
        (32 * 4.01, "batch_too_small"),
        (32 * 4.0, None),
        (32 / 4.0, None),
        (32 / 4.01, "batch_too_large"),
    ],
)
def test_batch_rules_at_their_thresholds(b_noise, rule):
    rows = eos_rows([0.2, 0.2], losses=[2, 1], noise_scale=b_noise)
    cfg = config(metrics={"measures": [{"name": "noise_scale"}]})
    found = [r for r in fired(rows, cfg) if r.startswith("batch")]
    assert found == ([rule] if rule else [])


def test_batch_change_follows_mccandlish():
    b, bn = 8, 100.0
    rows = eos_rows([0.01, 0.01], losses=[2, 1], noise_scale=bn)
    cfg = config(batch_size=b, metrics={"measures": [{"name": "noise_scale"}]})
    r = rec(recommend(rows, cfg), "batch_too_small")
    assert r["change"]["batch_size"] == 100
    assert r["change"]["steps"] == math.ceil(300 * (1 + bn / 100) / (1 + bn / b))
    assert r["evidence"]["lr_factor"] == pytest.approx((1 + bn / b) / (1 + bn / 100))
    # lowering: fewer samples, more steps
    rows = eos_rows([0.2, 0.2], losses=[2, 1], noise_scale=10.0)
    cfg = config(batch_size=512, metrics={"measures": [{"name": "noise_scale"}]})
    r = rec(recommend(rows, cfg), "batch_too_large")
    assert r["change"]["batch_size"] == 10 and r["change"]["steps"] > 300
    assert r["evidence"]["samples_factor"] < 1


def test_batch_rules_say_what_they_need():
    res = recommend(eos_rows([0.2, 0.2]), config())
    for rule in ("batch_too_small", "batch_too_large"):
        assert res.details["not_evaluated"][rule]["enable"] == [
            "metrics.measures: [{name: noise_scale}]"
        ]
    res = recommend(eos_rows([0.2], noise_scale=1.0), config(optim={"name": "gd"}))
    assert "full-batch" in res.details["not_evaluated"]["batch_too_small"]["reason"]


# --------------------------------------------------------------- seed_sensitive
def pair(barrier, ratio=0.1, loss=0.5):
    return {
        "other": "b",
        "step": 30,
        "barrier": barrier,
        "loss_a": loss,
        "loss_b": loss,
        "distance": 3.0,
        "eos_ratio_a": ratio,
        "eos_ratio_b": ratio,
    }


@pytest.mark.parametrize(
    "barrier, ratio, fires",
    [(0.5, 0.1, True), (0.49, 0.1, False), (0.5, 0.5, False), (5.0, 0.49, True)],
)
def test_seed_sensitive_at_its_thresholds(barrier, ratio, fires):
    res = recommend(eos_rows([0.2, 0.2]), config(), pairs=[pair(barrier, ratio)])
    assert ("seed_sensitive" in res.rules) is fires
    if fires:
        assert rec(res, "seed_sensitive")["change"] == {}
        assert res.primary is None


def test_seed_sensitive_needs_a_second_run():
    res = recommend(eos_rows([0.2, 0.2]), config())
    why = res.details["not_evaluated"]["seed_sensitive"]
    assert "second run" in why["reason"] and "others=" in why["enable"][0]


# ------------------------------------------------------------------- the result
def test_missing_probes_are_named_and_thresholds_checked():
    rows = [{"step": 0, "lr": 0.1, "train_loss": 2.3}]
    res = recommend(rows, config())
    assert res.recommendations == []
    assert res.details["not_evaluated"]["lr_too_high"]["enable"] == [
        "metrics.sharpness: true"
    ]
    assert "metrics.sharpness: true" in res.details["enable"]
    assert set(res.details["evaluated"]) == {"diverged"}
    assert list(RULES) == [
        "lr_too_high",
        "diverged",
        "lr_too_low",
        "rugged_slices",
        "batch_too_small",
        "batch_too_large",
        "seed_sensitive",
    ]
    with pytest.raises(ValueError, match="eos_low < target_ratio"):
        AdviceThresholds(eos_low=0.5)
    with pytest.raises(ValueError, match="finite positive"):
        AdviceThresholds(stall_drop=-1)
    with pytest.raises(ValueError, match="unknown advice thresholds"):
        recommend(rows, config(), thresholds={"eos_hihg": 2})
    assert "lr_too_high" in fired(
        eos_rows([0.5, 0.8, 0.9]), thresholds={"eos_high": 0.85}
    )


def test_bad_rows_are_clear_errors():
    with pytest.raises(ValueError, match="no metrics rows"):
        recommend([], config())
    with pytest.raises(ValueError, match=r"rows\[0\] is not a metrics row"):
        recommend([{"lr": 0.1}], config())
    with pytest.raises(TypeError, match="list of metrics rows"):
        recommend({"step": 0}, config())


# ------------------------------------------------------- real runs: tiny digits MLP
EARLY = 0.2  # of 10 steps: the rows of steps 0 and 2


def tiny(lr: float, **over) -> dict:
    cfg = {
        "name": "tiny",
        "model": {"name": "mlp", "options": {"width": 16, "depth": 1}},
        "data": {"name": "digits", "subset": 256, "test_subset": 64},
        "loss": "mse",
        "optim": {"name": "sgd", "lr": lr},
        "steps": 10,
        "batch_size": 32,
        "metrics": {
            "every": 2,
            "eval_samples": 128,
            "probe_samples": 64,
            "sharpness_max_matvecs": 20,
        },
        "checkpoint": {"steps": [2]},
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run at 3.7x the stability threshold (advisor on), a healthy one, its seed."""
    root = tmp_path_factory.mktemp("advice")
    high = tiny(1.0)
    high["metrics"] = {**high["metrics"], "advice": True}
    high = lg.train(high, root / "high")
    saved = lg.load_result(root / "high" / "advice")  # by the callback
    lg.train(tiny(0.1), root / "fine")
    lg.train(tiny(0.1, seed=1), root / "fine1")
    return root, high, saved


def copy_run(src, dst, **config_over):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("run.lock", "advice"))
    if config_over:
        cfg = yaml.safe_load((dst / "config.yaml").read_text())
        for path, value in config_over.items():
            *parents, last = path.split(".")
            node = cfg
            for part in parents:
                node = node[part]
            node[last] = value
        (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def test_advise_flags_a_run_with_a_too_large_step(runs):
    root = runs[0]
    res = advise(root / "high", early_fraction=EARLY)
    assert res.rules[0] == "lr_too_high"
    assert res.window["end_step"] == pytest.approx(2.0)
    assert res.window["rows"] == 2 and res.window["complete"]
    assert res.primary["change"]["optim.lr"] <= 1.0 * TH.max_factor_down
    back = lg.load_result(root / "high" / "advice")
    assert isinstance(back, AdviceResult)
    assert back.to_dict() == res.to_dict()
    assert "lr_too_high" in res.summary()


def test_advise_on_a_healthy_run_and_between_seeds(runs):
    root = runs[0]
    res = advise(
        root / "fine", early_fraction=EARLY, others=[root / "fine1"], save=False
    )
    assert not (root / "fine" / "advice").exists()
    assert "lr_too_high" not in res.rules and "lr_too_low" not in res.rules
    assert "seed_sensitive" in res.details["evaluated"]
    assert res.parameters["others"] == [str(root / "fine1")]
    # the window reaches no common checkpoint: said, not raised
    res = advise(root / "fine", early_fraction=0.1, others=[root / "fine1"], save=False)
    assert (
        "no checkpoint step common"
        in (res.details["not_evaluated"]["seed_sensitive"]["reason"])
    )


def test_advise_refuses_bad_input(runs, tmp_path):
    root = runs[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        advise(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a run directory"):
        advise(tmp_path)
    with pytest.raises(
        ValueError, match=r"early_fraction must be a number in \(0, 1\]"
    ):
        advise(root / "fine", early_fraction=0)
    empty = copy_run(root / "fine", tmp_path / "empty")
    (empty / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match="no metrics rows in its first 1 steps"):
        advise(empty)
    other = copy_run(root / "fine1", tmp_path / "other", **{"model.options.width": 8})
    with pytest.raises(ValueError, match="trains a different model"):
        advise(root / "fine", others=[other], early_fraction=EARLY)


def test_advise_runs_no_factory_code_without_opt_in(runs, tmp_path):
    root = runs[0]
    factory = {"model.name": None, "model.factory": "json:loads"}
    a = copy_run(root / "fine", tmp_path / "a", **factory)
    b = copy_run(root / "fine1", tmp_path / "b", **factory)
    advise(a, early_fraction=EARLY, save=False)  # one run: nothing is built
    with pytest.raises(lg.train.ConfigError, match="allow_factory=True"):
        advise(a, early_fraction=EARLY, others=[b], save=False)


def test_callback_writes_columns_and_saves_the_advice(runs):
    _, high, saved = runs
    rows = [r for r in high.metrics if "train_loss" in r]
    assert all(isinstance(r["advice"], list) for r in rows)
    assert all(r["advice_count"] == len(r["advice"]) for r in rows)
    assert "lr_too_high" in rows[0]["advice"]  # 3.7x the threshold at step 0
    # each row's column is the advice on the rows up to it
    plain = [{k: v for k, v in r.items() if not k.startswith("advice")} for r in rows]
    for i, row in enumerate(rows):
        assert row["advice"] == recommend(plain[: i + 1], high.config).rules
    # at the end: the advice on all rows, with the run's status, round-tripped
    assert isinstance(saved, AdviceResult) and saved.status == high.status
    diverged_at = high.step if high.status == "diverged" else None
    end = recommend(plain, high.config, diverged_at=diverged_at)
    assert saved.rules == end.rules
    assert saved.recommendations == end.recommendations
    assert saved.window["rows"] == len(rows)


def test_advice_config_refuses_a_clashing_measure_key():
    bad = tiny(0.1)
    bad["metrics"] = {
        **bad["metrics"],
        "advice": True,
        "measures": [{"name": "noise_scale", "key": "advice"}],
    }
    with pytest.raises(lg.train.ConfigError, match="written by the advisor"):
        lg.load_config(bad)


# -------------------------------------------------------------------------- CLI
def test_cli_exit_codes(runs, tmp_path):
    root = runs[0]
    early = ["--early-fraction", str(EARLY), "--no-save"]
    out = CliRunner().invoke(app, ["advise", str(root / "high"), *early])
    assert out.exit_code == 3, out.output
    assert "[lr_too_high]" in out.output and "change:" in out.output
    out = CliRunner().invoke(app, ["advise", str(root / "fine"), "--json", *early])
    parsed = json.loads(out.output)
    assert parsed["type"] == "AdviceResult"
    assert out.exit_code == (3 if parsed["recommendations"] else 0)
    out = CliRunner().invoke(app, ["advise", str(tmp_path / "nope")])
    assert out.exit_code == 2 and "does not exist" in out.output
    out = CliRunner().invoke(
        app, ["advise", str(root / "fine"), "--early-fraction", "2"]
    )
    assert out.exit_code == 2 and "early_fraction" in out.output
    damaged = copy_run(root / "fine", tmp_path / "damaged")
    (damaged / "status.json").write_text("{not json")
    out = CliRunner().invoke(app, ["advise", str(damaged)])
    assert out.exit_code == 4 and "damaged" in out.output
    out = CliRunner().invoke(app, ["advise", str(root / "fine"), *early[:2]])
    assert (
        out.exit_code in (0, 3) and (root / "fine" / "advice" / "result.json").is_file()
    )
