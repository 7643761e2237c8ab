"""The study index: one SQLite file, one writer, rebuilt from run directories.

The coordinator is the only writer (the study lock guarantees one); it opens
the file in WAL mode, so readers (:func:`lossgeom.study.load`, ``lossgeom study
status``) never block it. Workers never touch the index: each writes its own run
directory, and :meth:`Store.ingest_run` copies a run directory into the index in
one transaction that first deletes what the index held for that run. Ingesting
twice therefore gives the same rows, a coordinator killed mid-way leaves the
previous state (SQLite's atomic commit), and the primary keys make a duplicate
row impossible.

Long form: ``metrics(run_id, source, step, key, value, stderr, text)`` holds
every metrics row (``source = 'metrics'``) and every probe result's headline
numbers (``source = 'probe'``); a column ``<key>_stderr`` goes into the
``stderr`` of ``<key>``; strings, lists and mappings go to ``text``.
``results`` lists every stored probe result (loadable with
:func:`lossgeom.load_result`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lossgeom.study._config import RunSpec

__all__ = ["INDEX", "Store", "long_form"]

INDEX = "index.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    ordinal INTEGER NOT NULL,
    setting_id TEXT NOT NULL,
    seed INTEGER NOT NULL,
    overrides TEXT NOT NULL,
    config TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    step INTEGER,
    stopped TEXT,
    submitted REAL,
    started REAL,
    ended REAL,
    seconds REAL,
    host TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    source TEXT NOT NULL,
    step INTEGER NOT NULL,
    key TEXT NOT NULL,
    value REAL,
    stderr REAL,
    text TEXT,
    PRIMARY KEY (run_id, source, step, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    owner TEXT NOT NULL,
    step INTEGER NOT NULL,
    key TEXT NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (owner, step, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pairs (
    pair_id TEXT PRIMARY KEY,
    setting_id TEXT NOT NULL,
    run_a TEXT NOT NULL,
    run_b TEXT NOT NULL,
    seed_a INTEGER NOT NULL,
    seed_b INTEGER NOT NULL,
    pair_dir TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    error TEXT
);
CREATE TABLE IF NOT EXISTS pair_metrics (
    pair_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value REAL,
    stderr REAL,
    text TEXT,
    PRIMARY KEY (pair_id, key)
) WITHOUT ROWID;
"""


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection to the index (read-only: fails if the file is missing)."""
    if readonly:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{path} does not exist: not a study directory (run `lossgeom study "
                "run STUDY.yaml --out DIR` first)"
            )
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    else:
        con = sqlite3.connect(path, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
    con.row_factory = sqlite3.Row
    return con


def _number(v: Any) -> float | None:
    """A float from a number or the non-finite strings of the JSON files."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if v in ("NaN", "Infinity", "-Infinity"):
        return float(v.replace("Infinity", "inf"))
    return None


def long_form(row: dict) -> list[tuple[str, float | None, float | None, str | None]]:
    """``(key, value, stderr, text)`` of each column of a metrics or probe row.

    ``step`` is left out; ``<key>_stderr`` folds into the ``stderr`` of
    ``<key>`` when that column exists.

    Example:
        >>> long_form({"step": 3, "trace": 2.0, "trace_stderr": 0.1, "m": "x"})
        [('trace', 2.0, 0.1, None), ('m', None, None, 'x')]
    """
    out = []
    for key, v in row.items():
        if key == "step" or (key.endswith("_stderr") and key[:-7] in row):
            continue
        value = _number(v)
        text = None
        if value is None and v is not None:
            text = v if isinstance(v, str) else json.dumps(v)
        stderr = _number(row.get(f"{key}_stderr")) if value is not None else None
        out.append((key, value, stderr, text))
    return out


def _status_error(status: dict | None) -> str | None:
    """``"Type: message"`` of the error a ``status.json`` records, if any."""
    e = (status or {}).get("error")
    return f"{e.get('type')}: {e.get('message')}" if e else None


class Store:
    """The index of one study directory (see the module docstring).

    Args:
        root: the study directory.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.con = connect(self.root / INDEX)
        self.con.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        self.con.close()

    def meta(self, key: str) -> str | None:
        """A value of the ``meta`` table."""
        row = self.con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, **values: str) -> None:
        """Set values of the ``meta`` table."""
        with self.con:
            self.con.execute("BEGIN")
            self.con.executemany(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                list(values.items()),
            )

    def register(self, runs: list[RunSpec], run_dir: dict[str, str]) -> None:
        """Add the study's runs that the index does not hold yet (as ``pending``)."""
        with self.con:
            self.con.execute("BEGIN")
            self.con.executemany(
                "INSERT OR IGNORE INTO runs(run_id, ordinal, setting_id, seed, "
                "overrides, config, run_dir) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.run_id,
                        i,
                        r.setting_id,
                        r.seed,
                        json.dumps(r.overrides),
                        json.dumps(r.config),
                        run_dir[r.run_id],
                    )
                    for i, r in enumerate(runs)
                ],
            )

    def statuses(self) -> dict[str, sqlite3.Row]:
        """Each run's row of the ``runs`` table."""
        return {r["run_id"]: r for r in self.con.execute("SELECT * FROM runs")}

    def mark(self, run_id: str, status: str, **values: Any) -> None:
        """Set a run's status (and other columns of ``runs``)."""
        values["status"] = status
        names = ", ".join(f"{k}=?" for k in values)
        with self.con:
            self.con.execute("BEGIN")
            self.con.execute(
                f"UPDATE runs SET {names} WHERE run_id=?", [*values.values(), run_id]
            )

    def submitted(self, run_ids: Iterable[str], when: float) -> None:
        """Record runs as handed to the executor (one more attempt each)."""
        with self.con:
            self.con.execute("BEGIN")
            self.con.executemany(
                "UPDATE runs SET status='running', submitted=?, error=NULL, "
                "attempts=attempts+1 WHERE run_id=?",
                [(when, r) for r in run_ids],
            )

    def ingest_run(
        self,
        run_id: str,
        status: dict | None,
        metrics: list[dict],
        probes: list[dict],
        worker: dict | None,
        error: str | None = None,
    ) -> int:
        """Replace what the index holds for a run by its directory's content.

        Args:
            run_id: the run.
            status: its ``status.json`` (``None``: none written).
            metrics: its metrics rows.
            probes: its probe rows (``probes.jsonl``).
            worker: its ``worker.json``.
            error: the index's error for the run (e.g. the worker was killed);
                by default the one in ``status.json``.

        Returns:
            The number of long-form rows written.
        """
        rows = [
            (run_id, "metrics", r["step"], *cols)
            for r in metrics
            for cols in long_form(r)
        ]
        results = []
        for r in probes:
            body = {
                k: v
                for k, v in r.items()
                if k not in ("key", "name", "path", "trigger")
            }
            rows += [(run_id, "probe", r["step"], *cols) for cols in long_form(body)]
            results.append((run_id, r["step"], r["key"], r["name"], r["path"]))
        state = (status or {}).get("status")
        error = error or _status_error(status)
        if error and state not in ("finished", "diverged"):
            state = "failed"
        worker = worker or {}
        with self.con:
            self.con.execute("BEGIN")
            self.con.execute("DELETE FROM metrics WHERE run_id=?", (run_id,))
            self.con.execute("DELETE FROM results WHERE owner=?", (run_id,))
            self.con.executemany(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?)", rows
            )
            self.con.executemany(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)", results
            )
            self.con.execute(
                "UPDATE runs SET status=?, step=?, stopped=?, started=?, ended=?, "
                "seconds=?, host=?, error=? WHERE run_id=?",
                (
                    state or "pending",
                    (status or {}).get("step"),
                    (status or {}).get("stopped") or (status or {}).get("reason"),
                    worker.get("started"),
                    worker.get("ended"),
                    worker.get("seconds"),
                    worker.get("host"),
                    error,
                    run_id,
                ),
            )
        return len(rows)

    def register_pairs(self, pairs: list[dict]) -> None:
        """Add pairs the index does not hold yet (as ``pending``)."""
        with self.con:
            self.con.execute("BEGIN")
            self.con.executemany(
                "INSERT OR IGNORE INTO pairs(pair_id, setting_id, run_a, run_b, "
                "seed_a, seed_b, pair_dir) VALUES (:pair_id, :setting_id, :run_a, "
                ":run_b, :seed_a, :seed_b, :pair_dir)",
                pairs,
            )

    def pair_statuses(self) -> dict[str, sqlite3.Row]:
        """Each pair's row of the ``pairs`` table."""
        return {r["pair_id"]: r for r in self.con.execute("SELECT * FROM pairs")}

    def ingest_pair(
        self, pair_id: str, status: dict | None, rows: list[dict], error: str | None
    ) -> None:
        """Replace what the index holds for a pair by its directory's content."""
        values, results = [], []
        for r in rows:
            body = {
                k: v for k, v in r.items() if k not in ("key", "name", "path", "step")
            }
            values += [(pair_id, *cols) for cols in long_form({"step": 0, **body})]
            results.append((pair_id, 0, r["key"], r["name"], r["path"]))
        state = (status or {}).get("status")
        error = error or _status_error(status)
        with self.con:
            self.con.execute("BEGIN")
            self.con.execute("DELETE FROM pair_metrics WHERE pair_id=?", (pair_id,))
            self.con.execute("DELETE FROM results WHERE owner=?", (pair_id,))
            self.con.executemany(
                "INSERT OR REPLACE INTO pair_metrics VALUES (?, ?, ?, ?, ?)", values
            )
            self.con.executemany(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)", results
            )
            self.con.execute(
                "UPDATE pairs SET status=?, error=? WHERE pair_id=?",
                (
                    "failed" if error and state != "finished" else state or "pending",
                    error,
                    pair_id,
                ),
            )
