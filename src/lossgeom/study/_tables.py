"""Reading a study: pandas tables from its index, and its status.

Readers open the index read-only; they never block the coordinator (WAL mode).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

try:
    import pandas as pd
except ImportError as err:  # pragma: no cover - the study extra is missing
    raise ImportError(
        "lossgeom.study needs pandas; install it with pip install 'lossgeom[study]'"
    ) from err

from lossgeom._results import Result
from lossgeom.study._store import INDEX, connect

__all__ = ["StudyStatus", "load", "pairs", "results", "runs", "status", "table"]

_DERIVED = {"test_error": "test_accuracy", "train_error": "train_accuracy"}


@contextmanager
def _index(path: str | os.PathLike):
    """A read-only connection to the study's index, closed afterwards."""
    con = connect(Path(path) / INDEX, readonly=True)
    try:
        yield con
    finally:
        con.close()


def _config_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs' resolved configs, flattened: one column per path (``optim.lr``)."""
    configs = [json.loads(c) for c in frame["config"]]
    flat = pd.json_normalize(configs, sep=".")
    flat.index = frame.index
    return flat


def runs(path: str | os.PathLike) -> pd.DataFrame:
    """One row per run: status, timings, host, error and the flattened config.

    Columns: ``run_id``, ``setting_id``, ``seed``, ``status``, ``step``
    (updates done), ``stopped`` (why it stopped early), ``attempts``,
    ``started``/``ended`` (Unix times), ``seconds``, ``host``, ``error``,
    ``run_dir`` (absolute), then every config path (``optim.lr``, ...).
    """
    with _index(path) as con:
        frame = pd.read_sql_query("SELECT * FROM runs ORDER BY ordinal", con)
    frame["run_dir"] = [str(Path(path).resolve() / d) for d in frame["run_dir"]]
    config = _config_columns(frame).drop(columns=["seed"], errors="ignore")
    base = frame.drop(columns=["config", "overrides", "ordinal", "submitted"])
    return pd.concat([base, config], axis=1)


def _wide(long: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """Long ``(index, key, value, stderr, text)`` rows as one column per key.

    A key's standard errors go to ``<key>_stderr``; keys with text values
    (e.g. ``trace_method``) hold the text.
    """
    if long.empty:
        return pd.DataFrame(columns=index).set_index(index)
    values = long.pivot_table(
        index=index, columns="key", values="value", aggfunc="first", dropna=False
    )
    parts = [values]
    se = long.dropna(subset=["stderr"])
    if not se.empty:
        err = se.pivot_table(
            index=index, columns="key", values="stderr", aggfunc="first"
        )
        parts.append(err.add_suffix("_stderr"))
    text = long.dropna(subset=["text"])
    if not text.empty:
        words = text.pivot_table(
            index=index, columns="key", values="text", aggfunc="first"
        )
        values = values.drop(columns=[c for c in words.columns if c in values.columns])
        parts[0] = values
        parts.append(words)
    wide = pd.concat(parts, axis=1)
    wide.columns.name = None
    return wide


def load(path: str | os.PathLike) -> pd.DataFrame:
    """The study as one table: one row per run and measured step.

    A row holds the run's ``run_id``, ``setting_id``, ``seed``, ``status``,
    the ``step``, every config path as a column (``optim.lr``, ``batch_size``,
    ...), the training metrics of that step (``train_loss``,
    ``test_accuracy``, ``sharpness``, ... and ``<key>_stderr``) and the probe
    results of that step (their keys). ``test_error`` and ``train_error`` are
    one minus the accuracies. A probe's stored result reloads with
    :func:`lossgeom.load_result` from the path :func:`results` gives.

    Args:
        path: the study directory.
    """
    with _index(path) as con:
        long = pd.read_sql_query(
            "SELECT run_id, step, key, value, stderr, text FROM metrics", con
        )
    table = _wide(long, ["run_id", "step"]).reset_index()
    for name, source in _DERIVED.items():
        if source in table.columns:
            table[name] = 1.0 - pd.to_numeric(table[source])
    info = runs(path)
    keep = ["run_id", "setting_id", "seed", "status"] + [
        c
        for c in info.columns
        if "." in c or c in ("batch_size", "steps", "loss", "dtype")
    ]
    return info[keep].merge(table, on="run_id", how="left")  # in the study's order


def pairs(path: str | os.PathLike) -> pd.DataFrame:
    """One row per pair of seeds: the pairwise probes' numbers and the setting.

    Columns: ``pair_id``, ``setting_id``, ``run_a``, ``run_b``, ``seed_a``,
    ``seed_b``, ``status``, ``error``, the probe columns (e.g. ``interpolate``:
    the barrier) and the setting's config paths.
    """
    with _index(path) as con:
        frame = pd.read_sql_query("SELECT * FROM pairs", con)
        long = pd.read_sql_query(
            "SELECT pair_id, key, value, stderr, text FROM pair_metrics", con
        )
    wide = _wide(long, ["pair_id"]).reset_index()
    out = frame.merge(wide, on="pair_id", how="left") if not wide.empty else frame
    info = runs(path)
    config = info.drop_duplicates("setting_id")
    keep = ["setting_id"] + [c for c in info.columns if "." in c or c == "batch_size"]
    return out.merge(config[keep], on="setting_id", how="left")


def results(path: str | os.PathLike) -> pd.DataFrame:
    """Every stored probe result, one row each.

    Columns: ``owner`` (a run or pair id), ``step``, ``key``, ``name`` and
    ``path`` (absolute; load it with :func:`lossgeom.load_result`).
    """
    with _index(path) as con:
        frame = pd.read_sql_query("SELECT * FROM results", con)
        owners = dict(con.execute("SELECT run_id, run_dir FROM runs").fetchall())
        pair_dirs = dict(con.execute("SELECT pair_id, pair_dir FROM pairs").fetchall())
    root = Path(path).resolve()

    def where(row) -> str:
        if row.owner in owners:
            return str(root / owners[row.owner] / "probes" / row.path)
        return str(root / pair_dirs[row.owner] / "results" / row.path)

    frame["path"] = [where(r) for r in frame.itertuples()]
    return frame


def table(
    path: str | os.PathLike,
    by: list[str],
    metrics: list[str],
) -> pd.DataFrame:
    """Mean, standard error and count over seeds of each run's final values.

    A run's final value of a metric is its last measured one (its last step
    where the metric was measured); the statistics are over the runs of each
    group of ``by`` (finished and diverged runs, failed ones left out). A
    pairwise probe's statistics are over the pairs of seeds of each group.

    Args:
        path: the study directory.
        by: config paths to group by (e.g. ``["optim.lr", "batch_size"]``).
        metrics: metric or probe columns (e.g. ``["sharpness", "test_error"]``).

    Returns:
        A DataFrame indexed by ``by`` with columns ``(metric, mean|se|n)``.

    Raises:
        ValueError: an unknown path or metric (the message lists the known ones).
    """
    frame = load(path)
    frame = frame[frame["status"].isin(["finished", "diverged"])]
    pair_frame = pairs(path)
    pair_frame = pair_frame[pair_frame["status"] == "finished"]
    known = set(frame.columns) | set(pair_frame.columns)
    missing = [
        c for c in [*by, *metrics] if c not in known or (c in by and c not in frame)
    ]
    if missing:
        shown = sorted(known - {"run_id", "step", "pair_id", "run_a", "run_b"})
        raise ValueError(f"unknown columns {missing}; the study has {shown}")
    run_metrics = [m for m in metrics if m in frame.columns]
    pair_metrics = [m for m in metrics if m not in frame.columns]
    final = frame.sort_values("step", kind="stable").groupby("run_id").last()
    parts = []
    if run_metrics:
        parts.append(_stats(final, by, run_metrics))
    if pair_metrics:  # over the pairs of seeds of each setting
        parts.append(_stats(pair_frame, by, pair_metrics))
    return pd.concat(parts, axis=1)[metrics]


def _stats(frame: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    """Mean, standard error and count of ``columns`` in each group of ``by``."""
    numbers = frame[columns].apply(pd.to_numeric, errors="coerce")
    grouped = pd.concat([frame[by], numbers], axis=1).groupby(by, dropna=False)
    stats = grouped[columns].agg(["mean", "sem", "count"])
    return stats.rename(columns={"sem": "se", "count": "n"}, level=1)


@dataclass(frozen=True, eq=False)
class StudyStatus(Result):
    """Where a study stands.

    Attributes:
        directory: the study directory.
        name: the study's name.
        counts: runs by status (``pending``, ``running``, ``finished``,
            ``diverged``, ``failed``).
        pair_counts: pairwise probes by status.
        failures: ``{run_id, error, run_dir}`` of each failed run.
    """

    directory: str
    name: str
    counts: dict[str, int]
    pair_counts: dict[str, int] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    definition: str = field(
        default="the runs of a study by status, from its index", kw_only=True
    )
    bulky: ClassVar[tuple[str, ...]] = ()

    @property
    def total(self) -> int:
        """Runs in the study."""
        return sum(self.counts.values())

    @property
    def done(self) -> bool:
        """Whether every run ended (finished, diverged or failed)."""
        return all(
            k in ("finished", "diverged", "failed") for k, v in self.counts.items() if v
        )

    def scalars(self) -> dict[str, float]:
        """The counts by status."""
        return {k: float(v) for k, v in self.counts.items()}

    def summary(self) -> str:
        """One line per status, then each failure."""
        order = ["finished", "diverged", "failed", "running", "pending"]
        lines = [f"study {self.name!r} in {self.directory}: {self.total} runs"]
        for k in order + sorted(set(self.counts) - set(order)):
            if self.counts.get(k):
                lines.append(f"  {k:9s} {self.counts[k]}")
        if self.pair_counts:
            shown = ", ".join(f"{v} {k}" for k, v in sorted(self.pair_counts.items()))
            lines.append(f"  pairs     {shown}")
        for f in self.failures:
            lines.append(f"  failed {f['run_id']}: {f['error']}  ({f['run_dir']})")
        return "\n".join(lines)


def status(path: str | os.PathLike) -> StudyStatus:
    """The study's runs by status, and the failures with their errors."""
    root = Path(path)
    meta = (
        json.loads((root / "study.json").read_text())
        if (root / "study.json").is_file()
        else {}
    )
    with _index(root) as con:
        counts = dict(
            con.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        )
        pair_counts = dict(
            con.execute("SELECT status, COUNT(*) FROM pairs GROUP BY status").fetchall()
        )
        failed = con.execute(
            "SELECT run_id, error, run_dir FROM runs WHERE status='failed' ORDER BY ordinal"
        ).fetchall()
    return StudyStatus(
        directory=str(root),
        name=meta.get("name", root.name),
        counts=counts,
        pair_counts=pair_counts,
        failures=[
            {"run_id": r[0], "error": r[1], "run_dir": str(root / r[2])} for r in failed
        ],
    )
