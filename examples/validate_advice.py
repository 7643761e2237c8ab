"""Validate the training advisor: does its advice help, and does it cry wolf?

    python examples/validate_advice.py --out studies/advice --jobs 2

1. Runs the study ``examples/studies/advice.yaml`` (``lg.study.run``; running
   the script again resumes it and skips what is done).
2. Advises every run from its first 10% of steps
   (``lg.train.advise(run, early_fraction=0.1, others=[the other seeds of its
   setting])``).
3. Reruns every *flagged* run (one whose advice changes the config) with the
   change of its primary recommendation (the first rule that fired, in the
   rules' priority order), same seed, as studies of their own (one per seed,
   under ``OUT/reruns/``).
4. Writes the rates with their counts and Wilson intervals to
   ``docs/advice_validation.json`` (atomically).

Definitions (docs/advice.md):

- *final loss*: the train loss of a run's last metrics row; a diverged run's
  is infinite (worst).
- *improved*, for the rules that promise a better run (``lr_too_high``,
  ``diverged``, ``lr_too_low``, ``rugged_slices``): the rerun finished, and the
  original diverged or the rerun's final loss is at most ``1 - MARGIN`` times
  the original's; for the efficiency rules (``batch_too_small``,
  ``batch_too_large``), which promise about the same loss at a lower cost: the
  rerun finished with a final loss at most ``1 + MARGIN`` times the original's
  (or the original diverged), in fewer steps (``batch_too_small``) or on fewer
  samples (``batch_too_large``), as the change sets them.
- *healthy*: finished, with a final loss at most ``HEALTHY_FACTOR`` times the
  best final loss among the runs that share its model, data, loss and batch
  size (every step size and seed: its *group*).
- *false alarm*: a healthy run that is flagged.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import lossgeom as lg

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "examples" / "studies" / "advice.yaml"
RESULTS = ROOT / "docs" / "advice_validation.json"
EARLY_FRACTION = 0.1
MARGIN = 0.1
HEALTHY_FACTOR = 2.0
LOSS_RULES = ("lr_too_high", "diverged", "lr_too_low", "rugged_slices")
EFFICIENCY_RULES = ("batch_too_small", "batch_too_large")


def wilson(count: int, n: int) -> dict:
    """``count / n`` with its 95% Wilson interval (``None`` for ``n = 0``)."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return {"count": 0, "n": 0, "rate": None, "ci95": None}
    lo, hi = proportion_confint(count, n, alpha=0.05, method="wilson")
    return {"count": count, "n": n, "rate": count / n, "ci95": [float(lo), float(hi)]}


def final_loss(run_dir: Path, status: str) -> float:
    """The train loss of the last metrics row (``inf`` for a diverged run)."""
    if status != "finished":
        return math.inf
    rows = lg.train.MetricsLog(Path(run_dir) / "metrics.jsonl").read()
    losses = [r["train_loss"] for r in rows if isinstance(r.get("train_loss"), float)]
    return losses[-1] if losses else math.inf


def final_value(run_dir: Path, key: str) -> float | None:
    """The last numeric ``key`` of a run's metrics rows."""
    rows = lg.train.MetricsLog(Path(run_dir) / "metrics.jsonl").read()
    found = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return float(found[-1]) if found else None


def _set(config: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def changed_config(config: dict, change: dict) -> dict:
    """``config`` with the advised overrides (checkpoints past the end dropped)."""
    new = copy.deepcopy(config)
    for path, value in change.items():
        _set(new, path, value)
    ckpt = new.get("checkpoint") or {}
    ckpt["steps"] = [s for s in ckpt.get("steps", []) if s <= new["steps"]]
    return new


def group_key(config: dict) -> str:
    """The run's group: its config without the step size, seed and name."""
    plain = copy.deepcopy(config)
    for key in ("seed", "name"):
        plain.pop(key, None)
    plain["optim"].pop("lr", None)
    return json.dumps(plain, sort_keys=True)


def _flat(config: dict, prefix: str = "") -> dict:
    """A nested config as ``{path: value}`` (lists are values)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _resolved(config: dict) -> str:
    """A config's identity: resolved, without its name."""
    plain = lg.load_config(config).model_dump(mode="json")
    plain.pop("name", None)
    return json.dumps(plain, sort_keys=True)


def rerun(flagged: list[dict], out: Path, jobs: int | None) -> dict[str, tuple]:
    """Run each flagged run's changed config; ``{run_id: (status, run_dir)}``.

    One study per seed (a study sweeps seeds as a product, so the changed
    configs of one seed are a ``zip`` over every path they differ in); two
    runs advised to the same config share its rerun.
    """
    by_seed: dict[int, list[dict]] = defaultdict(list)
    for item in flagged:
        by_seed[item["config"]["seed"]].append(item)
    done = {}
    for seed, items in sorted(by_seed.items()):
        unique = {_resolved(item["new_config"]): item["new_config"] for item in items}
        flats = [_flat(config) for config in unique.values()]
        paths = sorted(
            p
            for p in set().union(*flats)
            if p not in ("seed", "name")
            and len({json.dumps(f.get(p), sort_keys=True) for f in flats}) > 1
        )
        base = copy.deepcopy(next(iter(unique.values())))
        base.pop("seed", None)
        base.pop("name", None)
        study = {"name": "advice_reruns", "base": base, "seeds": [seed]}
        if paths:
            study["zip"] = [{p: [f.get(p) for f in flats] for p in paths}]
        where = out / "reruns" / f"seed_{seed}"
        lg.study.run(study, where, jobs=jobs, progress=False, force=True)
        found = {
            _resolved(
                lg.train.load_config(Path(r.run_dir) / "config.yaml").model_dump(
                    mode="json"
                )
            ): (r.status, Path(r.run_dir))
            for r in lg.study.runs(where).itertuples()
        }
        for item in items:
            done[item["run_id"]] = found[_resolved(item["new_config"])]
    return done


def validate(
    study: str | os.PathLike | dict = STUDY,
    out: str | os.PathLike = "studies/advice",
    *,
    early_fraction: float = EARLY_FRACTION,
    jobs: int | None = None,
    json_path: str | os.PathLike | None = RESULTS,
) -> dict:
    """Run the validation; return (and write to ``json_path``) its numbers."""
    start = time.perf_counter()
    out = Path(out)
    status = lg.study.run(study, out / "study", jobs=jobs, progress=False)
    study_seconds = time.perf_counter() - start
    runs = lg.study.runs(out / "study")
    runs = runs[runs["status"].isin(["finished", "diverged"])]
    seeds_of = runs.groupby("setting_id")["run_dir"].apply(list).to_dict()
    items = []
    for row in runs.itertuples():
        run_dir = Path(row.run_dir)
        config = lg.load_config(run_dir / "config.yaml").model_dump(mode="json")
        others = [d for d in seeds_of[row.setting_id] if d != row.run_dir]
        advice = lg.train.advise(
            run_dir, early_fraction=early_fraction, others=others, save=False
        )
        primary = advice.primary
        items.append(
            {
                "run_id": row.run_id,
                "run_dir": run_dir,
                "status": row.status,
                "config": config,
                "group": group_key(config),
                "final": final_loss(run_dir, row.status),
                "test_accuracy": final_value(run_dir, "test_accuracy"),
                "advice": advice,
                "rules": advice.rules,
                "primary": None if primary is None else primary["rule"],
                "new_config": None
                if primary is None
                else changed_config(config, primary["change"]),
            }
        )
    best: dict[str, float] = {}
    for it in items:
        if it["status"] == "finished":
            best[it["group"]] = min(best.get(it["group"], math.inf), it["final"])
    for it in items:
        it["healthy"] = (
            it["status"] == "finished"
            and it["final"] <= HEALTHY_FACTOR * best[it["group"]]
        )
    flagged = [it for it in items if it["primary"] is not None]
    rerun_start = time.perf_counter()
    reruns = rerun(flagged, out, jobs)
    rerun_seconds = time.perf_counter() - rerun_start
    for it in items:
        it["new_status"] = it["new_final"] = it["improved"] = None
    for it in flagged:
        new_status, new_dir = reruns[it["run_id"]]
        it["new_status"] = new_status
        it["new_final"] = final_loss(new_dir, new_status)
        it["improved"] = improved(it)
    records = _records(items)
    numbers = summarize(records)
    numbers.update(
        study=_label(study),
        early_fraction=early_fraction,
        margin=MARGIN,
        healthy_factor=HEALTHY_FACTOR,
        status_counts=dict(status.counts),
        seed_sensitive=_seed_sensitivity(items),
        seconds={"study": study_seconds, "reruns": rerun_seconds},
        machine=_machine(),
        records=records,
    )
    if json_path is not None:
        _write_json(Path(json_path), numbers)
    return numbers


def improved(it: dict) -> bool:
    """Whether the rerun with the advised change is better (see the module doc)."""
    if it["new_status"] != "finished":
        return False
    if it["status"] != "finished":
        return True
    old, new = it["final"], it["new_final"]
    if it["primary"] in EFFICIENCY_RULES:
        cfg, changed = it["config"], it["new_config"]
        if it["primary"] == "batch_too_small":
            cheaper = changed["steps"] < cfg["steps"]
        else:
            cheaper = (
                changed["steps"] * changed["batch_size"]
                < cfg["steps"] * cfg["batch_size"]
            )
        return cheaper and new <= (1 + MARGIN) * old
    return new <= (1 - MARGIN) * old


def _records(items: list[dict]) -> list[dict]:
    """One plain record per run: its swept settings, outcome, advice and rerun."""
    flats = [_flat(it["config"]) for it in items]
    swept = sorted(
        p
        for p in set().union(*flats)
        if p not in ("name",)
        and len({json.dumps(f.get(p), sort_keys=True) for f in flats}) > 1
    )
    out = []
    for it, flat in zip(items, flats, strict=True):
        primary = it["advice"].primary
        out.append(
            {
                "run_id": it["run_id"],
                "settings": {p: flat.get(p) for p in swept},
                "status": it["status"],
                "final_loss": _finite(it["final"]),
                "healthy": it["healthy"],
                "rules": it["rules"],
                "primary": it["primary"],
                "change": None if primary is None else primary["change"],
                "rerun_status": it["new_status"],
                "rerun_final_loss": _finite(it["new_final"]),
                "improved": it["improved"],
            }
        )
    return out


def _label(study: str | os.PathLike | dict) -> str:
    if isinstance(study, dict):
        return "dict"
    path = Path(study).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def summarize(records: list[dict]) -> dict:
    """The rates of the validation from its per-run records."""
    flagged = [r for r in records if r["primary"] is not None]
    healthy = [r for r in records if r["healthy"]]
    unhealthy = [r for r in records if not r["healthy"]]

    def improved(rs: list[dict]) -> dict:
        return wilson(sum(bool(r["improved"]) for r in rs), len(rs))

    per_rule = {}
    for rule in (*LOSS_RULES, *EFFICIENCY_RULES):
        mine = [r for r in flagged if r["primary"] == rule]
        per_rule[rule] = {
            "fired": sum(rule in r["rules"] for r in records),
            "fired_on_healthy": sum(rule in r["rules"] for r in healthy),
            "primary": len(mine),
            "improved": improved(mine),
            "false_alarms": sum(r["healthy"] for r in mine),
            "diverged_before": sum(r["status"] == "diverged" for r in mine),
            "diverged_after": sum(r["rerun_status"] == "diverged" for r in mine),
        }
    by_loss_rule = [r for r in flagged if r["primary"] in LOSS_RULES]
    by_efficiency_rule = [r for r in flagged if r["primary"] in EFFICIENCY_RULES]
    return {
        "runs": len(records),
        "diverged": sum(r["status"] == "diverged" for r in records),
        "healthy": len(healthy),
        "flagged": len(flagged),
        "improved": improved(flagged),
        "improved_loss_rules": improved(by_loss_rule),
        "improved_efficiency_rules": improved(by_efficiency_rule),
        "false_alarms": wilson(
            sum(r["primary"] is not None for r in healthy), len(healthy)
        ),
        "false_alarms_loss_rules": wilson(
            sum(r["primary"] in LOSS_RULES for r in healthy), len(healthy)
        ),
        "unhealthy_flagged": wilson(
            sum(r["primary"] is not None for r in unhealthy), len(unhealthy)
        ),
        "per_rule": per_rule,
    }


def _seed_sensitivity(items: list[dict]) -> dict:
    """How often ``seed_sensitive`` fired, and the seeds' spread in test accuracy.

    The spread of a run: the largest difference between its final test
    accuracy and another finished seed's of the same setting.
    """
    evaluated = [
        it for it in items if "seed_sensitive" in it["advice"].details["evaluated"]
    ]
    fired = [it for it in evaluated if "seed_sensitive" in it["rules"]]
    acc: dict[str, dict] = defaultdict(dict)
    for it in items:
        if it["status"] == "finished" and it["test_accuracy"] is not None:
            key = json.dumps(
                {k: v for k, v in it["config"].items() if k != "seed"}, sort_keys=True
            )
            acc[key][it["run_id"]] = it["test_accuracy"]

    def spread(it: dict) -> float | None:
        key = json.dumps(
            {k: v for k, v in it["config"].items() if k != "seed"}, sort_keys=True
        )
        mine = acc[key].get(it["run_id"])
        rest = [v for r, v in acc[key].items() if r != it["run_id"]]
        return None if mine is None or not rest else max(abs(mine - v) for v in rest)

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    return {
        "evaluated": len(evaluated),
        "fired": wilson(len(fired), len(evaluated)),
        "test_accuracy_spread_fired": mean([spread(it) for it in fired]),
        "test_accuracy_spread_not_fired": mean(
            [spread(it) for it in evaluated if it not in fired]
        ),
    }


def _machine() -> dict:
    import platform

    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` atomically (a temp file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, allow_nan=False, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    """Command line: run the validation and print its headline numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="studies/advice", help="working folder")
    parser.add_argument("--jobs", type=int, default=None, help="runs at once")
    parser.add_argument("--study", default=str(STUDY), help="the study file")
    parser.add_argument("--json", default=str(RESULTS), help="where the numbers go")
    args = parser.parse_args()
    numbers = validate(args.study, args.out, jobs=args.jobs, json_path=args.json)
    imp, fa = numbers["improved"], numbers["false_alarms"]
    print(
        f"{numbers['runs']} runs ({numbers['diverged']} diverged, "
        f"{numbers['healthy']} healthy), {numbers['flagged']} flagged"
    )
    print(f"improved: {imp['count']}/{imp['n']} = {imp['rate']}, 95% CI {imp['ci95']}")
    print(f"false alarms: {fa['count']}/{fa['n']} = {fa['rate']}, 95% CI {fa['ci95']}")
    fl = numbers["false_alarms_loss_rules"]
    print(f"  of them by the loss rules: {fl['count']}/{fl['n']}, 95% CI {fl['ci95']}")
    for rule, r in numbers["per_rule"].items():
        print(
            f"  {rule:16s} fired {r['fired']:3d}, primary {r['primary']:3d}, "
            f"improved {r['improved']['count']}/{r['improved']['n']}, "
            f"false alarms {r['false_alarms']}"
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
