"""The report of a run or study directory, read without a browser.

A tiny real study (2 batch sizes x 2 seeds, probes and a pair probe, H1
analysed) and a single training run are built once; the HTML page is checked
for being one offline file (plotly embedded once, no URL a browser would
fetch), for one figure per expected figure, and for the numbers it shows
against the study's own tables and stored results. Bad input (neither kind of
directory, no finished run, no metrics, damaged results) is said in the page.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lossgeom as lg
from lossgeom.cli import app
from lossgeom.report import write_report
from lossgeom.report._document import fmt, short_json
from lossgeom.report._report import build_document

pytest.importorskip("plotly")
pytest.importorskip("matplotlib")

BASE = {
    "model": {"name": "mlp", "options": {"width": 16}},
    "data": {"name": "digits", "subset": 256},
    "optim": {"name": "sgd", "lr": 0.2},
    "steps": 40,
    "metrics": {
        "every": 10,
        "eval_samples": None,
        "probe_samples": 128,
        "sharpness": True,
        "trace_max_matvecs": 12,
    },
}
STUDY = {
    "name": "report_example",
    "base": BASE,
    "grid": {"batch_size": [8, 64]},
    "seeds": [0, 1],
    "probes": [
        {"name": "eigenvalues", "options": {"k": 3}},
        {"name": "density", "options": {"n_probes": 3, "lanczos_steps": 30}},
        {"name": "slice_1d", "options": {"n_directions": 3}},
    ],
    "pairs": {"probes": [{"name": "interpolate", "options": {"n_points": 11}}]},
    "executor": {"jobs": 2},
}
#: The figures the study's page draws: 4 training panels, per setting (2) one
#: density, one slice figure and one path figure.
STUDY_FIGURES = {"curves": 4, "density": 2, "slice": 2, "paths": 2}
RUN_FIGURES = {"curves": 4}


def make_example(base: Path) -> tuple[Path, Path]:
    """The example study (H1 analysed) and single run under ``base``; idempotent.

    Running it again finds both finished (the study resumes, training returns),
    so test modules of one session share them.
    """
    study, run = base / "study", base / "run"
    status = lg.study.run(STUDY, study, progress=False)
    assert status.counts == {"finished": 4}, status.summary()
    if not (study / "analysis" / "h1").is_dir():
        lg.analysis.analyze(study, "h1")
    lg.train({**BASE, "name": "single", "batch_size": 32}, run)
    return study, run


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return make_example(tmp_path_factory.getbasetemp() / "report-example")


@pytest.fixture(scope="module")
def study_page(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("pages") / "study.html"
    assert write_report(example[0], out, progress=False) == out
    return out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def run_page(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("pages") / "run.html"
    write_report(example[1], out, progress=False)
    return out.read_text(encoding="utf-8")


# ------------------------------------------------------------------ helpers
def section(page: str, sid: str) -> str:
    """The HTML of the section with id ``sid`` ('' when absent)."""
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    return m.group(1) if m else ""


def rows(part: str) -> list[list[str]]:
    """The cells (text, unescaped) of every table row in ``part``."""
    out = []
    for tr in re.findall(r"<tr>(.*?)</tr>", part, re.S):
        cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr, re.S)
        out.append([html.unescape(re.sub(r"<[^>]+>", "", c)) for c in cells])
    return out


def figure_kinds(page: str) -> dict[str, int]:
    kinds = re.findall(r'<figure class="lg-figure" data-kind="(\w+)"', page)
    return {k: kinds.count(k) for k in sorted(set(kinds))}


def without_library(page: str) -> str:
    start = page.index('<script id="plotly-library"')
    end = page.index("</script>", start)
    return page[:start] + page[end:]


# ------------------------------------------------------------- offline page
def test_the_page_embeds_plotly_once_and_names_no_url(study_page):
    from plotly.offline import get_plotlyjs

    library = get_plotlyjs()
    assert study_page.count(library) == 1
    assert study_page.count('<script id="plotly-library"') == 1
    assert study_page.count("plotly.js v") == 1  # the library's header, once
    rest = without_library(study_page)
    # the page outside the vendored library names no remote place at all
    assert "http://" not in rest and "https://" not in rest and "//cdn" not in rest
    # nothing that a browser fetches: src=, href=, @import, url(, srcset
    fetched = re.findall(
        r"""(?:\bsrc|\bhref|\bsrcset|\baction|\bposter)\s*=\s*["']?([^"'\s>]+)"""
        r"""|@import\s+["']?([^"';\s]+)|url\(\s*["']?([^"')]+)""",
        rest,
    )
    for target in (t for group in fetched for t in group if t):
        assert target.startswith("#") or target.startswith("data:"), target
    # the vendored library loads nothing by itself: no src=, @import or url(http
    assert not re.search(r"""src\s*=\s*["']?https?:""", library)
    assert not re.search(r"@import", library)
    assert not re.search(r"""url\(\s*["']?https?:""", library)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', rest)
    assert csp and "default-src 'none'" in csp.group(1)
    assert "connect-src 'none'" in csp.group(1)


def test_one_container_per_figure(study_page, run_page):
    assert figure_kinds(study_page) == STUDY_FIGURES
    n = sum(STUDY_FIGURES.values())
    assert study_page.count('class="plotly-graph-div"') == n
    assert study_page.count("Plotly.newPlot(") == n
    assert figure_kinds(run_page) == RUN_FIGURES
    for sid in ("config", "runs", "training", "spectra", "landscape", "paths"):
        assert section(study_page, sid), sid
    assert section(study_page, "tables") and section(study_page, "hypotheses")
    # each section only where the data exist: the single run has no probes
    for sid in ("spectra", "landscape", "paths", "advice", "hypotheses"):
        assert not section(run_page, sid), sid


# --------------------------------------------------------------- the numbers
def test_tables_match_the_study_table(example, study_page):
    study = example[0]
    metrics = ["test_error", "sharpness", "trace", "eigenvalues", "interpolate"]
    table = lg.study.table(study, by=["batch_size"], metrics=metrics)
    shown = rows(section(study_page, "tables"))
    assert shown[0] == ["quantity", "batch_size", "mean", "se", "n"]
    for metric in metrics:
        for batch, row in table[metric].iterrows():
            expect = [
                metric,
                str(batch),
                fmt(row["mean"]),
                fmt(row["se"]),
                fmt(row["n"]),
            ]
            assert expect in shown, (expect, shown)
    assert any(r[0].startswith("slice_1d_total_variation") for r in shown)


def test_hypothesis_result_is_shown_as_stored(example, study_page):
    h1 = lg.load_result(example[0] / "analysis" / "h1")
    part = section(study_page, "hypotheses")
    assert html.escape(h1.claim) in part
    assert f'<span class="verdict verdict-{h1.verdict}">{h1.verdict}</span>' in part
    shown = rows(part)[1:]
    assert len(shown) == len(h1.tests)
    for row, t in zip(shown, h1.tests, strict=True):
        assert row[1] == t.claim and row[2] == t.test and row[3] == str(t.n)
        assert row[4] == f"{t.effect_name} = {fmt(t.effect)}"
        assert row[5].startswith(f"[{fmt(t.ci_low)}, {fmt(t.ci_high)}]")
        assert row[6] == fmt(t.p_value, 3) and row[7] == fmt(t.p_adjusted, 3)
        assert row[8] == t.verdict
        for caveat in t.caveats:
            assert html.escape(caveat) in part
    for caveat in h1.caveats:
        assert html.escape(caveat) in part


def test_densities_mark_the_stored_top_eigenvalues(example, study_page):
    found = lg.study.results(example[0])
    part = section(study_page, "spectra")
    for path in found[found.key == "eigenvalues"].path:
        values = lg.load_result(path).values.tolist()
        assert len(values) == 3
        assert "top eigenvalues " + ", ".join(fmt(v) for v in values) in part


def test_methods_list_every_stored_definition(example, study_page):
    study = example[0]
    part = section(study_page, "methods")
    stored = [*lg.study.results(study).path, study / "analysis" / "h1"]
    for path in stored:
        result = lg.load_result(path)
        assert result.definition and html.escape(result.definition) in part, path
    for t in lg.load_result(study / "analysis" / "h1").tests:
        assert html.escape(t.definition) in part
    assert "operator products (matvecs)" in part  # the cost, as stored
    for path in stored:  # the parameters, as stored
        params = short_json(lg.load_result(path).parameters, 600)
        assert html.escape(params if params != "{}" else "none recorded") in part
    assert "2 / lr" in part  # the training columns drawn


def test_run_page_shows_config_and_curves(example, run_page):
    config = (example[1] / "config.yaml").read_text()
    assert html.escape(config) in section(run_page, "config")
    training = section(run_page, "training")
    for title in ("Loss", "Accuracy", "Sharpness and the edge of stability"):
        assert f'<div class="fig-title">{title}</div>' in training
    assert "standard error of the estimate" in training  # the trace's band
    doc = build_document(example[1])
    (sharp,) = [f for f in doc.figures() if f.title.startswith("Sharpness")]
    labels = [s.label for s in sharp.data.series]
    assert labels == ["lambda_max(H)", "edge of stability (2 / eta)"]
    rows_ = lg.report.metrics_rows(example[1])
    assert sharp.data.series[1].y.tolist() == [r["eos_threshold"] for r in rows_]
    (trace,) = [f for f in doc.figures() if f.title == "Hessian trace"]
    band = trace.data.series[0]
    se = [r["trace_stderr"] for r in rows_]
    assert (band.hi - band.y).tolist() == pytest.approx(se)


# ------------------------------------------------------------------ advice
@dataclass(frozen=True, kw_only=True, eq=False)
class AdviceForReport(lg.Result):
    """A stand-in for the advisor's stored result (same contract)."""

    recommendations: list = field(default_factory=list)


def test_advice_is_rendered_when_stored(example, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(example[1], run)
    rec = {
        "rule": "edge_of_stability",
        "message": "sharpness sits at 2/lr: lower the step size",
        "evidence": {"eos_ratio": 0.98, "steps_at_edge": 12},
        "expected_effect": "smoother loss, slower progress",
        "change": {"optim.lr": 0.05},
    }
    skipped = {"noise": {"reason": "no noise_scale column", "enable": ["a measure"]}}
    AdviceForReport(
        recommendations=[rec],
        definition="advice rules",
        details={"not_evaluated": skipped},
    ).save(run / "advice")
    page = write_report(run, tmp_path / "r.html").read_text()
    part = section(page, "advice")
    row = rows(part)[1]
    assert row[0] == "edge_of_stability" and row[1] == rec["message"]
    assert row[2] == "eos_ratio = 0.98; steps_at_edge = 12"
    assert row[3] == rec["expected_effect"] and row[4] == "optim.lr: 0.05"
    assert "noise: no noise_scale column; turn on: a measure" in part
    assert "advice rules" in section(page, "methods")


# ---------------------------------------------------------------- markdown
def test_markdown_writes_pngs_beside_the_file(example, tmp_path):
    out = write_report(example[0], tmp_path / "paper" / "study.md", format="md")
    text = out.read_text()
    pngs = sorted((tmp_path / "paper" / "study_files").glob("*.png"))
    assert len(pngs) == sum(STUDY_FIGURES.values())
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](study_files/{png.name})" in text
    h1 = lg.load_result(example[0] / "analysis" / "h1")
    assert h1.claim in text and f"| {h1.verdict} |" in text
    assert "| quantity | batch_size | mean | se | n |" in text
    assert not list((tmp_path / "paper").glob(".*"))  # atomic: no temp files


# --------------------------------------------------------------- bad input
def test_neither_a_run_nor_a_study_says_what_they_hold(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for bad, error in ((tmp_path, ValueError), (tmp_path / "nope", FileNotFoundError)):
        with pytest.raises(error) as info:
            write_report(bad, tmp_path / "r.html")
        for name in ("config.yaml", "metrics.jsonl", "study.yaml", "index.sqlite"):
            assert name in str(info.value)
    with pytest.raises(ValueError, match="format"):
        write_report(tmp_path, tmp_path / "r.pdf", format="pdf")
    assert not (tmp_path / "r.html").exists()


def test_study_without_a_finished_run(example, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(example[0], study)
    shutil.rmtree(study / "analysis")
    con = sqlite3.connect(study / "index.sqlite")
    con.execute("UPDATE runs SET status = 'pending'")
    con.commit()
    con.close()
    page = write_report(study, tmp_path / "r.html").read_text()
    assert "no run of the study has finished yet (4 pending)" in page
    assert "lossgeom study run STUDY.yaml --out" in page
    assert section(page, "config") and not figure_kinds(page)


def test_run_without_metrics(example, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(example[1], run)
    (run / "metrics.jsonl").unlink()
    (run / "status.json").write_text(json.dumps({"status": "running", "step": 0}))
    page = write_report(run, tmp_path / "r.html").read_text()
    assert "the run has no metrics yet" in page
    assert "The run is still running (step 0)" in page
    assert html.escape("lossgeom train CONFIG.yaml --out DIR") in page
    assert section(page, "config") and not figure_kinds(page)


def test_damaged_pieces_are_named_and_the_rest_is_drawn(example, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(example[0], study)
    found = lg.study.results(study)
    density = Path(found[found.key == "density"].path.iloc[0])
    (density / "result.json").write_text("{ not json")
    sliced = Path(found[found.key == "slice_1d"].path.iloc[0])
    shutil.rmtree(sliced)
    (study / "analysis" / "h1" / "result.json").write_text("[]")
    page = write_report(study, tmp_path / "r.html").read_text()
    spectra, landscape = section(page, "spectra"), section(page, "landscape")
    assert "note-damaged" in spectra and html.escape(str(density)) in spectra
    assert "note-missing" in landscape and html.escape(str(sliced)) in landscape
    assert "note-damaged" in section(page, "hypotheses")
    assert figure_kinds(page) == STUDY_FIGURES  # each setting keeps its other seed
    # a damaged metrics line and a damaged index
    run = tmp_path / "run"
    shutil.copytree(example[1], run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, '{"step": oops')
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    page = write_report(run, tmp_path / "run.html").read_text()
    assert "line 2" in section(page, "training") and figure_kinds(page) == RUN_FIGURES
    (study / "index.sqlite").write_bytes(b"not a database" * 100)
    for extra in study.glob("index.sqlite-*"):
        extra.unlink()
    page = write_report(study, tmp_path / "r2.html").read_text()
    assert "index.sqlite" in section(page, "problems") and section(page, "config")


def test_progress_bar_on_request(example, tmp_path, capsys):
    write_report(example[0], tmp_path / "r.html", progress=True)
    assert "report: reading results" in capsys.readouterr().err


# ---------------------------------------------------------------------- CLI
def test_cli_writes_the_report_and_exits_2_on_bad_input(example, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.md"
    res = runner.invoke(app, ["report", str(example[1]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and (tmp_path / "r_files").is_dir()  # md from the suffix
    res = runner.invoke(app, ["report", str(tmp_path / "r_files")])
    assert res.exit_code == 2
    assert "neither a run directory nor a study directory" in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["report", str(example[1]), "--format", "pdf"])
    assert res.exit_code == 2 and "--format" in res.output


def test_a_part_that_fails_becomes_a_note(example, tmp_path, monkeypatch):
    from lossgeom.report import _collect
    from lossgeom.report._document import Curves, Document, Figure, Section, Series
    from lossgeom.report._html import render_html

    def broken(rows):
        raise RuntimeError("cannot draw these rows")

    monkeypatch.setattr(_collect, "run_curves", broken)
    page = write_report(example[1], tmp_path / "r.html").read_text()
    assert "cannot draw these rows" in section(page, "training")
    assert section(page, "config") and section(page, "methods")
    # a figure whose data cannot be drawn: a note in its place, the others drawn
    good = Figure("curves", "fine", Curves("y", [Series("a", [0.0, 1.0], [1.0, 2.0])]))
    bad = Figure("slice", "broken", [("seed 0", object())])
    page = render_html(
        Document("t", "run", tmp_path, [], [Section("s", "S", [bad, good])])
    )
    assert "could not be drawn" in page and figure_kinds(page) == {"curves": 1}


def test_planes_and_curves_stored_in_a_run_are_drawn(example, tmp_path):
    import torch
    from torch import nn

    run = tmp_path / "run"
    shutil.copytree(example[1], run)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    obj = lg.Objective(model, nn.CrossEntropyLoss(), data)
    grid = torch.linspace(-1, 1, 5)
    lg.slice_2d(obj, alphas=grid, betas=grid).save(run / "probes/plane/step_0000040")
    other = obj.theta + 0.5 * torch.randn_like(obj.theta)
    curve = lg.connect(obj, obj.theta, other, steps=10, batch_size=None, n_points=7)
    curve.save(run / "probes/curve/step_0000040")
    page = write_report(run, tmp_path / "r.html").read_text()
    assert figure_kinds(page) == {**RUN_FIGURES, "surface": 1, "paths": 1}
    assert f"barrier {fmt(float(curve.barrier))}" in section(page, "paths")
    write_report(run, tmp_path / "r.md", format="md")
    assert len(list((tmp_path / "r_files").glob("*.png"))) == 6
