"""Reading a study directory into a report.

The study file and its swept axes, where the runs stand, training curves per
setting (mean over seeds with a band), the stored probe results of each
setting's runs and pairs, the per-setting tables of ``lg.study.table``, the
stored hypothesis tests, any advice and the methods. The index is read with
the public readers of :mod:`lossgeom.study`; what cannot be read becomes a
note and the rest is still shown.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from lossgeom.report._collect import PANELS, read_yaml_text
from lossgeom.report._document import (
    Code,
    Curves,
    Document,
    Figure,
    Note,
    Section,
    Series,
    Table,
    Text,
    attempt,
    fmt,
    guarded,
)
from lossgeom.report._sections import Methods, Stored, load_stored, probe_sections
from lossgeom.report._verdicts import advice_section, hypotheses_section

__all__ = ["study_document"]

_RUN = "lossgeom study run STUDY.yaml --out {dir}"
_DONE = ("finished", "diverged")
_TABLE_METRICS = ("train_loss", "test_loss", "test_error", "sharpness", "trace")
_NOT_HEADLINE = ("_seconds", "_stderr", "_bound", "_n_directions", "_converged")


def _value(v: Any) -> str:
    """A config value or table cell as text: numbers by :func:`fmt`."""
    return fmt(v) if isinstance(v, (int, float, np.number, np.bool_)) else str(v)


def _text(v: Any) -> str:
    """A text column's value, ``""`` for none (``None`` or NaN)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _axes(spec: dict) -> list[str]:
    """The swept config paths of a study file: its grid's, then its zip groups'."""
    grid = spec.get("grid") if isinstance(spec.get("grid"), dict) else {}
    axes = list(grid)
    for group in spec.get("zip") or []:
        axes += [k for k in group if k not in axes] if isinstance(group, dict) else []
    return axes


def _config_section(study_dir: Path) -> tuple[Section, dict]:
    blocks: list = []
    path = study_dir / "study.yaml"
    read = attempt(
        blocks,
        f"the study file {path}",
        "run the study again to write it: " + _RUN.format(dir=study_dir),
        lambda: read_yaml_text(path),
    )
    spec = read[1] if read is not None and isinstance(read[1], dict) else {}
    rows = []
    grid = spec.get("grid") if isinstance(spec.get("grid"), dict) else {}
    for a in grid:
        rows.append([a, "grid", ", ".join(_value(v) for v in grid[a])])
    for i, group in enumerate(spec.get("zip") or [], start=1):
        for a, values in group.items() if isinstance(group, dict) else []:
            rows.append([a, f"zip group {i}", ", ".join(_value(v) for v in values)])
    if spec.get("seeds") is not None:
        rows.append(["seed", "seeds", ", ".join(_value(v) for v in spec["seeds"])])
    if rows:
        blocks.append(
            Table(["config path", "swept by", "values"], rows, "The swept axes.")
        )
    if read is not None:
        blocks.append(Text("The study file as validated (every default written out):"))
        blocks.append(Code(read[0]))
    return Section("config", "Configuration", blocks), spec


def _labels(runs: Any, axes: list[str]) -> dict[str, tuple[int, str]]:
    """Each setting's colour index and label (``batch_size=8, optim.lr=0.1``)."""
    out: dict[str, tuple[int, str]] = {}
    columns = [a for a in axes if a in runs.columns]
    for _, row in runs.drop_duplicates("setting_id").iterrows():
        shown = ", ".join(f"{a}={_value(row[a])}" for a in columns)
        out[row["setting_id"]] = (len(out), shown or "all runs")
    return out


def _runs_table(runs: Any, labels: dict) -> Table:
    rows = []
    for r in runs.itertuples(index=False):
        rows.append(
            [
                str(r.run_id),
                labels.get(r.setting_id, (0, str(r.setting_id)))[1],
                str(r.seed),
                str(r.status),
                fmt(r.step),
                _text(r.stopped),
                fmt(r.seconds, 3),
                _text(r.error)[:200],
            ]
        )
    header = ["run", "setting", "seed", "status", "step", "stopped", "seconds", "error"]
    return Table(header, rows, "Every run of the study, in the study's order.")


def _curves(frame: Any, labels: dict, seeds: dict[str, int]) -> list[Figure]:
    """One figure per training panel: each setting's mean over seeds, with a band."""
    import pandas as pd

    figures = []
    for _, title, ylabel, lines, caption in PANELS:
        series = []
        for column, label, dash in lines:
            if column not in frame.columns:
                continue
            sub = frame[["setting_id", "step", column]].copy()
            sub[column] = pd.to_numeric(sub[column], errors="coerce")
            sub = sub.dropna()
            if sub.empty:
                continue
            stats = sub.groupby(["setting_id", "step"])[column].agg(
                ["mean", "sem", "count"]
            )
            for sid, (i, setting) in labels.items():
                if sid not in stats.index.get_level_values(0):
                    continue
                s = stats.loc[sid]
                x, y = s.index.to_numpy(float), s["mean"].to_numpy(float)
                se = s["sem"].fillna(0.0).to_numpy(float)
                band = dash != "dash" and bool((s["count"] > 1).any())
                lo, hi = (y - se, y + se) if band else (None, None)
                series.append(Series(f"{setting}: {label}", x, y, lo, hi, i, dash))
        if any(s.dash != "dash" for s in series):
            n = ", ".join(sorted({str(v) for v in seeds.values()}))
            text = (
                f"{caption} Each colour is a setting: the mean over its seeds (n = "
                f"{n}), with a band of one standard error over seeds."
            )
            figures.append(Figure("curves", title, Curves(ylabel, series), text))
    return figures


def _stored(
    study_dir: Path, runs: Any, labels: dict, notes: list
) -> dict[str, list[Stored]]:
    """The last stored result of each probe of each run and pair, by owner."""
    import lossgeom.study as study

    results = attempt(
        notes, "the study's stored results", "", lambda: study.results(study_dir)
    )
    pairs = attempt(notes, "the study's pairs", "", lambda: study.pairs(study_dir))
    if results is None or results.empty:
        return {}
    who: dict[str, tuple[str, str]] = {}
    for r in runs.itertuples(index=False):
        who[r.run_id] = (labels.get(r.setting_id, (0, ""))[1], f"seed {r.seed}")
    for p in [] if pairs is None else pairs.itertuples(index=False):
        label = f"seeds {p.seed_a}-{p.seed_b}"
        who[p.pair_id] = (labels.get(p.setting_id, (0, ""))[1], label)
    last = results.sort_values("step").groupby(["owner", "key"]).last().reset_index()
    out: dict[str, list[Stored]] = defaultdict(list)
    for r in last.itertuples(index=False):
        if r.owner in who:
            group, label = who[r.owner]
            out[r.owner].append(
                Stored(r.key, r.name, int(r.step), r.owner, label, group, Path(r.path))
            )
    return out


def _metrics(frame: Any, pairs: Any, keys: set[str]) -> list[str]:
    """The columns tabulated: training metrics, probe headline numbers, pair probes."""
    import pandas as pd

    def numeric(table: Any, c: str) -> bool:
        return pd.to_numeric(table[c], errors="coerce").notna().any()

    out = [c for c in _TABLE_METRICS if c in frame.columns and numeric(frame, c)]
    for key in sorted(keys):
        if key in frame.columns and numeric(frame, key):
            out.append(key)
        elif pairs is not None and key in pairs.columns and numeric(pairs, key):
            out.append(key)
        else:
            out += [
                c
                for c in frame.columns
                if c.startswith(f"{key}_")
                and not c.endswith(_NOT_HEADLINE)
                and numeric(frame, c)
            ]
    return list(dict.fromkeys(out))


def _tables(study_dir: Path, frame: Any, axes: list[str], keys: set[str]) -> Section:
    import lossgeom.study as study

    blocks: list = []
    pairs = attempt([], "", "", lambda: study.pairs(study_dir))
    by = [a for a in axes if a in frame.columns] or ["setting_id"]
    metrics = _metrics(frame, pairs, keys)
    table = attempt(
        blocks,
        "the per-setting table",
        "",
        lambda: study.table(study_dir, by=by, metrics=metrics) if metrics else None,
    )
    if table is not None:
        rows = []
        for metric in metrics:
            for index, row in table[metric].iterrows():
                index = index if isinstance(index, tuple) else (index,)
                rows.append(
                    [
                        metric,
                        *map(_value, index),
                        fmt(row["mean"]),
                        fmt(row["se"]),
                        fmt(row["n"]),
                    ]
                )
        blocks.append(
            Table(
                ["quantity", *by, "mean", "se", "n"],
                rows,
                "Each run's final value, averaged over the seeds of its setting "
                "(lg.study.table): mean, standard error (sd / sqrt(n)) and n; "
                "pairwise probes over the pairs of seeds.",
            )
        )
    return Section("tables", "Per-setting tables", blocks)


def _progress(items: list, enabled: bool) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="report: reading results", unit="run")


def _results_sections(
    study_dir: Path, runs: Any, labels: dict, methods: Methods, progress: bool
) -> tuple[list[Section], set[str], list[tuple[str, Path]]]:
    """The probe sections, the probe keys, and the runs' advice folders."""
    notes: list = []
    by_owner = _stored(study_dir, runs, labels, notes)
    info = {r["run_id"]: r for _, r in runs.iterrows()}
    loaded, damaged, advice = [], defaultdict(list), []
    for owner in _progress(list(dict.fromkeys([*info, *by_owner])), progress):
        got, bad = load_stored(by_owner.get(owner, []), methods)
        loaded += got
        for sid, found in bad.items():
            damaged[sid] += found
        run = info.get(owner)
        if run is not None and (Path(run["run_dir"]) / "advice").is_dir():
            setting = labels.get(run["setting_id"], (0, ""))[1]
            label = f"run {owner} ({setting}, seed {run['seed']})"
            advice.append((label, Path(run["run_dir"]) / "advice"))
    order = {label: i for i, label in labels.values()}
    loaded.sort(key=lambda s: order.get(s.group, len(order)))  # settings in order
    sections = probe_sections(loaded, dict(damaged))
    if notes:
        sections.insert(0, Section("results-index", "Stored results", notes))
    keys = {s.key for owner in by_owner.values() for s in owner}
    return sections, keys, advice


def _overview(study_dir: Path, notes: list) -> list[tuple[str, str]]:
    import lossgeom.study as study

    facts = [("study directory", str(study_dir))]
    path = study_dir / "study.json"
    meta = attempt(
        notes, f"the study's record {path}", "", lambda: json.loads(path.read_text())
    )
    if isinstance(meta, dict) and meta.get("name"):
        facts.insert(0, ("study", str(meta["name"])))
    status = attempt(notes, "the study's status", "", lambda: study.status(study_dir))
    if status is not None:
        order = ["finished", "diverged", "failed", "running", "pending"]
        counts = ", ".join(
            f"{status.counts[k]} {k}" for k in order if status.counts.get(k)
        )
        facts.append(("runs", f"{status.total}: {counts}" if counts else "none"))
        if status.pair_counts:
            shown = ", ".join(f"{v} {k}" for k, v in sorted(status.pair_counts.items()))
            facts.append(("pairs of seeds", shown))
    if not (study_dir / "analysis").is_dir():
        facts.append(("analyses", f"none stored (lossgeom analyze {study_dir})"))
    return facts


def study_document(study_dir: Path, *, progress: bool = False) -> Document:
    """The report of a study directory."""
    import lossgeom.study as study

    notes: list = []
    facts = _overview(study_dir, notes)
    config, spec = _config_section(study_dir)
    axes = _axes(spec)
    sections = [config]
    methods = Methods()
    fix = "run the study again, which rebuilds its index: " + _RUN.format(dir=study_dir)
    runs = attempt(
        notes,
        f"the study's index {study_dir / 'index.sqlite'}",
        fix,
        lambda: study.runs(study_dir),
    )
    if runs is not None:
        sections += _study_body(study_dir, runs, axes, methods, progress)
    hypotheses = hypotheses_section(study_dir, methods)
    if hypotheses is not None:  # after the tables, before the advice
        ids = [s.id for s in sections]
        at = ids.index("advice") if "advice" in ids else len(sections)
        sections.insert(at, hypotheses)
    sections.append(methods.section(_columns_drawn(sections)))
    if notes:
        sections.insert(0, Section("problems", "Problems", notes))
    title = dict(facts).get("study", study_dir.name)
    return Document(f"Study {title}", "study", study_dir, facts, sections)


def _columns_drawn(sections: list[Section]) -> list[str]:
    drawn = [c for _, _, _, lines, _ in PANELS for c, _, _ in lines]
    curves = [b for s in sections if s.id == "training" for b in s.blocks]
    return drawn if any(isinstance(b, Figure) for b in curves) else []


def _training(study_dir: Path, done: Any, labels: dict) -> tuple[Section, Any]:
    """The training curves per setting, and the metrics frame of the ended runs."""
    import lossgeom.study as study

    blocks: list = []
    frame = attempt(blocks, "the study's metrics", "", lambda: study.load(study_dir))
    if frame is not None:
        frame = frame[frame["status"].isin(_DONE)]
        seeds = done.groupby("setting_id")["seed"].nunique().to_dict()
        blocks += _curves(frame, labels, seeds)
    return Section("training", "Training curves", blocks), frame


def _not_finished(study_dir: Path, runs: Any) -> Note:
    counts = runs["status"].value_counts().to_dict()
    shown = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no runs"
    return Note(
        f"no run of the study has finished yet ({shown}): training curves, stored "
        "results, tables and analyses appear once runs finish.",
        "run the study; it resumes where it stopped: " + _RUN.format(dir=study_dir),
    )


def _study_body(
    study_dir: Path, runs: Any, axes: list[str], methods: Methods, progress: bool
) -> list[Section]:
    """Runs, training curves, results, tables and advice of an indexed study.

    Each part is made on its own: one that fails becomes a note in its section.
    """
    labels = attempt([], "", "", lambda: _labels(runs, axes)) or {}
    table, failed = guarded(
        "the table of runs", lambda: _runs_table(runs, labels), "runs", "Runs"
    )
    sections = [failed or Section("runs", "Runs", [table])]
    done = runs[runs["status"].isin(_DONE)]
    if done.empty:
        sections[0].blocks.insert(0, _not_finished(study_dir, runs))
        return sections
    made, failed = guarded(
        "the training curves",
        lambda: _training(study_dir, done, labels),
        "training",
        "Training curves",
    )
    sections.append(failed or made[0])
    found, failed = guarded(
        "the sections of stored results",
        lambda: _results_sections(study_dir, runs, labels, methods, progress),
        "results",
        "Stored results",
    )
    sections += [failed] if failed else found[0]
    keys, advice = (found[1], found[2]) if found else (set(), [])
    if made is not None and made[1] is not None:
        tables, failed = guarded(
            "the per-setting tables",
            lambda: _tables(study_dir, made[1], axes, keys),
            "tables",
            "Per-setting tables",
        )
        sections.append(failed or tables)
    advice_found, failed = guarded(
        "the advice", lambda: advice_section(advice, methods), "advice", "Advice"
    )
    if failed or advice_found:
        sections.append(failed or advice_found)
    return sections
