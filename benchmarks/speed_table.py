"""The README's speed table, generated from the results files in ``benchmarks/results``.

Reads the results files the speed benchmarks wrote (those that exist, one per
device: ``hvp_*.json``, ``spectra_*.json``, ``slices_*.json``,
``gradient_noise_*.json``, ``train_callbacks_*.json``, ``study_cpu.json``,
``kfac_*.json`` and ``cost_curve_*.json``), renders their headline ratios (what is compared, against
which baseline measured in the same run, the ratio, the target where the results
file records one) and the machine each file was measured on, and writes them into
README.md between the lines ``<!-- speed-table:start -->`` and
``<!-- speed-table:end -->``. A key missing from a results file renders as "n/a";
a results file that is not valid JSON is an error naming it.

Usage: python benchmarks/speed_table.py [--check] [--readme README.md]
[--results benchmarks/results]

``--check`` rewrites nothing and exits 1 when the README's table differs from what
the results files give.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from lossgeom._io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START = "<!-- speed-table:start -->"
END = "<!-- speed-table:end -->"
COMMAND = "python benchmarks/speed_table.py"
NA = "n/a"
NONE = "—"

Row = tuple[str, str, str, str]  # compared, baseline, measured, target

# What a boolean the benchmarks record under "targets" stands for.
TARGET_TEXT = {
    "top5_le_3x_grad": "≤ 3x",
    "b_lossgeom_over_bare_forward_le_1.2": "CNN ≤ 1.2x",
    "b_below_both": "CNN below both",
    "c_lossgeom_over_bare_forward_le_1.2": "ResNet-20 ≤ 1.2x",
    "c_below_both": "ResNet-20 below both",
    "a_3x_fewer_than_both": "MLP 3x below both",
    "hvp_le_2x_grad": "≤ 2x",
    "block8_ge_1.5x": "≥ 1.5x",
    "products_le_eigsh": "≤ eigsh",
    "products_le_eigsh_unverified": "≤ eigsh",
    "seconds_le_third_of_pyhessian": "≤ 1/3",
    "density_1.5x_pyhessian": "≥ 1.5x",
}
OPTIMIZERS = {"kfac": "K-FAC", "adam": "Adam", "sgd": "SGD"}


class SpeedTableError(ValueError):
    """A results file or the README cannot give the speed table."""


# -- reading -----------------------------------------------------------------------


def load(path: Path) -> dict:
    """One results file as a dict; an error naming the file if it is not JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpeedTableError(
            f"{path}: not valid JSON ({exc}); rerun the benchmark that writes it "
            "or restore the file"
        ) from exc
    if not isinstance(data, dict):
        raise SpeedTableError(
            f"{path}: expected a JSON object at the top, got {type(data).__name__}"
        )
    return data


def get(data: object, *keys: str) -> object:
    """``data[k1][k2]...``, or None where a key is missing or a level not a dict."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def cases(data: dict, key: str) -> list[dict]:
    """The list of per-case dicts under ``key`` (empty if absent or malformed)."""
    rows = get(data, key)
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


# -- formatting --------------------------------------------------------------------


def num(x: object) -> float | None:
    """A finite number, or None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def div(a: object, b: object) -> float | None:
    a, b = num(a), num(b)
    return None if a is None or b is None or b == 0 else a / b


def first(*values: object) -> object:
    """The first value that is a finite number (else None)."""
    return next((v for v in values if num(v) is not None), None)


def ratio(x: object, digits: int = 2) -> str:
    v = num(x)
    return NA if v is None else f"{v:.{digits}f}x"


def count(x: object) -> str:
    v = num(x)
    return NA if v is None else f"{v:,.0f}"


def sci(x: object) -> str:
    v = num(x)
    return NA if v is None else f"{v:.2g}"


def met(flag: object) -> str:
    if flag is True:
        return "met"
    return "not met" if flag is False else NA


def label(case: dict, key: str = "case") -> str:
    """A case's name without its ``a_``/``b_`` ordering prefix."""
    name = case.get(key)
    return re.sub(r"^[a-z]_", "", name) if isinstance(name, str) else NA


def per_case(rows: list[dict], cell: Callable[[dict], str]) -> str:
    return "; ".join(f"{label(c)} {cell(c)}" for c in rows) or NA


def targets(data: dict, *keys: str) -> str:
    """The recorded targets ``keys`` (all when none given) as "what: met"."""
    recorded = get(data, "targets")
    if not isinstance(recorded, dict):
        return NONE
    keys = keys or tuple(recorded)
    cells = [
        f"{TARGET_TEXT.get(k, k)}: {met(recorded[k])}" for k in keys if k in recorded
    ]
    return "; ".join(cells) or NONE


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


# -- one function per benchmark: its rows -------------------------------------------


def hvp_rows(data: dict) -> list[Row]:
    rows = cases(data, "results")
    return [
        (
            "one HVP, Hessian operator (graph kept)",
            "one gradient",
            per_case(rows, lambda c: ratio(c.get("hvp_over_grad_operator_kept_graph"))),
            targets(data, "hvp_le_2x_grad"),
        ),
        (
            "throughput of 8 HVPs in one block (operator)",
            "8 single HVPs (double backward)",
            per_case(
                rows,
                lambda c: ratio(c.get("block8_operator_vs_8_single_double_backward")),
            ),
            targets(data, "block8_ge_1.5x"),
        ),
    ]


def spectra_rows(data: dict) -> list[Row]:
    rows = cases(data, "results")

    def products(c: dict, who: str) -> str:
        cells = []
        for k in ("top1", "top5"):
            mine, eigsh = get(c, k, who, "matvecs"), get(c, k, "eigsh", "matvecs")
            r = div(mine, eigsh)
            cells.append(
                f"{k} {NA if r is None else ratio(r)} ({count(mine)} vs {count(eigsh)})"
            )
        return ", ".join(cells)

    def seconds(c: dict) -> str:
        cells = []
        for k in ("top1", "top5"):
            r = get(c, k, "seconds_over_pyhessian")
            err = get(c, k, "pyhessian", "rel_err")
            if num(r) is not None:
                cells.append(f"{k} {ratio(r)} (PyHessian off by {sci(err)})")
        five = get(c, "top5_certified_over_pyhessian_top1_seconds")
        if num(five) is not None:
            cells.append(f"certified top5 / its top1 {ratio(five)}")
        return ", ".join(cells) or NA

    def density(c: dict) -> str:
        return ratio(get(c, "density_speedup_over_pyhessian"))

    return [
        (
            "eigenvalues to 1e-6 of the scale, certified, verification search on: "
            "products",
            "curvlinops + `eigsh` (tol lowered to the same accuracy)",
            per_case(rows, lambda c: products(c, "lossgeom")),
            targets(data, "products_le_eigsh"),
        ),
        (
            "the same without the verification search: products",
            "curvlinops + `eigsh`",
            per_case(rows, lambda c: products(c, "lossgeom_unverified")),
            targets(data, "products_le_eigsh_unverified"),
        ),
        (
            "eigenvalues to 1e-6, certified: seconds",
            "PyHessian at its defaults",
            per_case(rows, seconds),
            targets(data, "seconds_le_third_of_pyhessian"),
        ),
        (
            "spectral density (same probes and steps): speed-up",
            "PyHessian's SLQ",
            per_case(rows, density),
            targets(data, "density_1.5x_pyhessian"),
        ),
    ]


def slices_rows(data: dict) -> list[Row]:
    rows = cases(data, "cases")

    def per_point(c: dict, baseline: str) -> object:
        return div(
            get(c, "seconds_per_point", "lossgeom"),
            get(c, "seconds_per_point", baseline),
        )

    def peers(c: dict) -> str:
        ll = ratio(per_point(c, "loss_landscapes"))
        note = c.get("loss_landscapes_note")
        if ll == NA and isinstance(note, str) and note.startswith("raised"):
            ll = f"{NA} ({note.split(':')[0]})"
        return f"{ratio(per_point(c, 'plain_loop'))}, {ll}"

    return [
        (
            "seconds per point of a filter-normalized plane",
            "one bare forward pass",
            per_case(
                rows,
                lambda c: ratio(
                    first(
                        c.get("lossgeom_over_bare_forward"),
                        per_point(c, "bare_forward"),
                    )
                ),
            ),
            targets(
                data,
                "b_lossgeom_over_bare_forward_le_1.2",
                "c_lossgeom_over_bare_forward_le_1.2",
            ),
        ),
        (
            "seconds per point of a filter-normalized plane",
            "a plain copy-and-evaluate loop, `loss-landscapes`",
            per_case(rows, peers),
            targets(data, "b_below_both", "c_below_both", "a_3x_fewer_than_both"),
        ),
    ]


def gradient_noise_rows(data: dict) -> list[Row]:
    rows = cases(data, "cases")
    return [
        (
            "top-5 eigenvalues of the gradient covariance (per-sample gradients alone)",
            "one full-data gradient",
            per_case(
                rows,
                lambda c: (
                    f"{ratio(get(c, 'over_grad', 'top5'))} "
                    f"({ratio(get(c, 'over_grad', 'per_sample'))})"
                ),
            ),
            targets(data),
        )
    ]


def train_callbacks_rows(data: dict) -> list[Row]:
    settings = get(data, "settings")
    settings = settings if isinstance(settings, dict) else {}
    measured = "; ".join(
        f"`{k}` {ratio(get(v, 'ratio_best_of'))}" for k, v in settings.items()
    )
    goal = num(get(data, "target_ratio"))
    if goal is None:
        target = NONE
    else:
        hit = [
            f"`{k}`"
            for k, v in settings.items()
            if (r := num(get(v, "ratio_best_of"))) is not None and r <= goal
        ]
        target = f"≤ {goal:g}x: " + (f"met by {', '.join(hit)}" if hit else "not met")
    every = get(data, "every")
    return [
        (
            "training with the curvature callbacks"
            + (f" every {every} steps" if num(every) is not None else ""),
            "plain training",
            measured or NA,
            target,
        )
    ]


def study_rows(data: dict) -> list[Row]:
    over = get(data, "overhead")
    per_run = num(get(over, "overhead_per_run_seconds"))
    allowed = num(get(over, "allowed_per_run_seconds"))
    overhead = (
        NA
        if per_run is None
        else f"{per_run:.2f} s per run ({ratio(get(over, 'ratio'))} in all)"
    )
    overhead_target = (
        f"≤ {allowed:.2f} s per run: {met(get(over, 'target_met'))}"
        if allowed is not None
        else NONE
    )
    rate = get(data, "ingestion", "long_form_rows_per_second")
    parallel = [
        p for p in (get(data, "parallel"), get(data, "parallel_long")) if p is not None
    ]
    jobs = "; ".join(
        f"{count(get(p, 'steps'))} steps {ratio(get(p, 'ratio'))}" for p in parallel
    )
    jobs_target = "; ".join(
        f"{met(get(p, 'target_met'))} at {count(get(p, 'steps'))} steps"
        for p in parallel
    )
    return [
        (
            "a study, `--jobs 1`: time",
            "bare `lg.train` of the same configs",
            overhead,
            overhead_target,
        ),
        (
            "index ingestion: rows per second",
            NONE,
            NA if num(rate) is None else f"{count(rate)} rows/s",
            # the threshold is study.py's; the file records whether it was met
            f"≥ 20,000 rows/s: {met(get(data, 'ingestion', 'target_met'))}",
        ),
        (
            "8 runs with `--jobs 2`: time",
            "`--jobs 1`",
            jobs or NA,
            f"≤ 0.65x: {jobs_target}" if jobs_target else NONE,
        ),
    ]


def kfac_rows(data: dict) -> list[Row]:
    problems = get(data, "problems")
    problems = problems if isinstance(problems, dict) else {}
    legend = "; ".join(
        f"{k}: {get(p, 'problem') or NA}, loss ≤ {sci(get(p, 'target_train_loss'))}"
        for k, p in problems.items()
    )

    def order(name: str) -> int:
        return list(OPTIMIZERS).index(name) if name in OPTIMIZERS else len(OPTIMIZERS)

    def measured(what: str) -> str:
        parts = []
        for key, problem in problems.items():
            best = get(problem, "best")
            best = best if isinstance(best, dict) else {}
            ratios = ", ".join(
                f"{OPTIMIZERS.get(name, name)} {ratio(get(b, what))}"
                for name, b in sorted(best.items(), key=lambda nb: order(nb[0]))
                if name != "sgd"
            )
            parts.append(f"{key}: {ratios or NA}")
        return "; ".join(parts) or NA

    baseline = "SGD (momentum 0.9); each at its best step size"
    return [
        (
            f"median steps to the target train loss ({legend or NA})",
            baseline,
            measured("steps_ratio_to_sgd"),
            targets(data),
        ),
        (
            "median seconds to the target train loss",
            baseline,
            measured("seconds_ratio_to_sgd"),
            NONE,
        ),
    ]


def _hvp_over_grad(r: dict) -> float | None:
    return num(
        first(r.get("hvp_over_grad"), div(r.get("hvp_seconds"), r.get("grad_seconds")))
    )


def cost_curve_rows(data: dict) -> list[Row]:
    # float32 rows only: a float64 row's ratio also depends on whether its
    # larger graph fits the operator's cache (it is in the table below)
    rows = [r for r in cases(data, "results") if get(r, "dtype") in (None, "float32")]
    values = [v for r in rows if (v := _hvp_over_grad(r)) is not None]
    measured = (
        f"{min(values):.2f}x to {max(values):.2f}x over {len(values)} float32 models "
        "(table below)"
        if values
        else NA
    )
    return [("one HVP, across model sizes", "one gradient", measured, targets(data))]


def cost_curve_table(name: str, data: dict) -> list[str]:
    """One row per model: costs relative to a gradient and to a training step."""
    lines = [
        f"`{name}`: seconds relative to one gradient, peak memory relative to one "
        "training step.",
        "",
        "| model | d | batch | HVP | top-5 eigenvalues: products, seconds | "
        "top-1: products, seconds | peak memory: HVP, eigenvalues |",
        "|---|---|---|---|---|---|---|",
    ]

    def eig(r: dict, k: str) -> str:
        text = (
            f"{count(r.get(f'{k}_matvecs'))}, "
            f"{ratio(div(r.get(f'{k}_seconds'), r.get('grad_seconds')), 1)}"
        )
        return text + (" (not converged)" if r.get(f"{k}_converged") is False else "")

    def memory(r: dict, k: str) -> str:
        return ratio(
            first(
                r.get(f"{k}_memory_over_train_step"),
                div(r.get(f"peak_bytes_{k}"), r.get("peak_bytes_train_step")),
            )
        )

    for r in cases(data, "results"):
        model = get(r, "model") or NA
        family = get(r, "family")
        dtype = get(r, "dtype")
        kind = ", ".join(
            str(x) for x in (family, dtype if dtype != "float32" else None) if x
        )
        cells = [
            f"{model} ({kind})" if kind else str(model),
            count(r.get("d")),
            count(r.get("batch")),
            ratio(_hvp_over_grad(r)),
            eig(r, "top5"),
            eig(r, "top1"),
            f"{memory(r, 'hvp')}, {memory(r, 'eigen')}",
        ]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return lines


# The results files, in table order: a glob in benchmarks/results and its rows.
BENCHMARKS: list[tuple[str, Callable[[dict], list[Row]]]] = [
    ("hvp_*.json", hvp_rows),
    ("spectra_*.json", spectra_rows),
    ("slices_*.json", slices_rows),
    ("gradient_noise_*.json", gradient_noise_rows),
    ("train_callbacks_*.json", train_callbacks_rows),
    ("study_cpu.json", study_rows),
    ("kfac_*.json", kfac_rows),
    ("cost_curve_*.json", cost_curve_rows),
]


def machine_row(name: str, data: dict) -> str:
    m = get(data, "machine")
    cpu = get(m, "cpu_model") or NA
    if get(m, "gpu"):
        cpu = f"{cpu}; {get(m, 'gpu')}"
    cores = count(get(m, "cpu_count"))
    threads = get(m, "torch_threads")
    if num(threads) is not None:
        cores += f" ({count(threads)})"
    torch_version = get(m, "torch") or get(m, "versions", "torch") or NA
    date = get(m, "date")
    date = date[:10] if isinstance(date, str) else NA
    cells = [f"`{name}`", cpu, cores, torch_version, date]
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def render(results: Path = RESULTS) -> str:
    """The Markdown that goes between the README's markers."""
    files = [
        (path, rows)
        for pattern, rows in BENCHMARKS
        for path in sorted(Path(results).glob(pattern))
    ]
    lines = [
        f"<!-- Generated by `{COMMAND}` from benchmarks/results/*.json; "
        "edit those, not this table. -->",
        "",
        "Each ratio is the cost of what is compared over the baseline's, both measured "
        "in the same run (below 1x: cheaper than the baseline), except throughput "
        "(above 1x: faster).",
        "",
    ]
    if not files:
        return "\n".join([*lines, "No results yet: run `make bench`."])
    loaded = [(path.name, load(path), rows) for path, rows in files]
    lines += [
        "| results | compared | baseline (same run) | measured | target |",
        "|---|---|---|---|---|",
    ]
    for name, data, rows in loaded:
        for i, row in enumerate(rows(data)):
            cells = [f"`{name}`" if i == 0 else "", *row]
            lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    for name, data, _ in loaded:
        if name.startswith("cost_curve_"):
            lines += ["", *cost_curve_table(name, data)]
    lines += [
        "",
        "Measured on:",
        "",
        "| results | CPU | cores (torch threads) | torch | date |",
        "|---|---|---|---|---|",
        *(machine_row(name, data) for name, data, _ in loaded),
    ]
    return "\n".join(lines)


# -- the README ----------------------------------------------------------------------


def splice(text: str, table: str, where: object = README) -> str:
    """``text`` with ``table`` between its markers."""
    starts, ends = text.count(START), text.count(END)
    if starts != 1 or ends != 1 or text.index(START) > text.index(END):
        raise SpeedTableError(
            f"{where}: expected one line {START} followed by one line {END} "
            f"(where the speed table goes), found {starts} start and {ends} end "
            "markers; put them in the README's Speed section"
        )
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}\n{END}{tail}"


def check(readme: Path = README, results: Path = RESULTS) -> str | None:
    """None if the README's table is current; else what differs and the fix."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    new = splice(text, render(results), readme)
    if new == text:
        return None
    diff = difflib.unified_diff(
        text.splitlines(),
        new.splitlines(),
        "README (now)",
        "README (generated)",
        lineterm="",
    )
    return (
        f"{readme}: the speed table is stale (the results in {results} changed, or "
        f"the table was edited by hand). Run `{COMMAND}` to regenerate it.\n"
        + "\n".join(list(diff)[:60])
    )


def write(readme: Path = README, results: Path = RESULTS) -> bool:
    """Rewrite the README's table (atomically); True if it changed."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    new = splice(text, render(results), readme)
    if new != text:
        atomic_write_text(readme, new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the README is stale"
    )
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = check(args.readme, args.results)
            if stale:
                print(stale, file=sys.stderr)
                return 1
            print(f"{args.readme}: speed table up to date")
            return 0
        changed = write(args.readme, args.results)
    except SpeedTableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.readme}: speed table {'rewritten' if changed else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
