"""The README's speed table is generated from benchmarks/results and kept current."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "speed_table", ROOT / "benchmarks" / "speed_table.py"
)
st = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(st)

MACHINE = {
    "torch": "9.9.9+cpu",
    "cpu_count": 4,
    "torch_threads": 3,
    "date": "2031-02-03 04:05:06",
    "cpu_model": "Synthetic CPU",
}
README_TEXT = (
    "# x\n\n## Speed (`make bench`)\n\nProse.\n\n"
    f"{st.START}\nold table\n{st.END}\n\n## After\n\nkept\n"
)


def write(directory: Path, name: str, data: object) -> None:
    (directory / name).write_text(json.dumps(data), encoding="utf-8")


def row(table: str, *parts: str) -> str:
    """The one table line holding every one of ``parts``."""
    lines = [ln for ln in table.splitlines() if all(p in ln for p in parts)]
    assert len(lines) == 1, (parts, lines)
    return lines[0]


@pytest.fixture
def results(tmp_path: Path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    write(
        d,
        "hvp_cpu.json",
        {
            "benchmark": "hvp",
            "machine": MACHINE,
            "results": [
                {
                    "case": "a_tiny",
                    "hvp_over_grad_operator_kept_graph": 1.234,
                    "block8_operator_vs_8_single_double_backward": 2.5,
                },
                {"case": "b_big", "hvp_over_grad_operator_kept_graph": 3.456},
            ],
        },
    )
    write(
        d,
        "train_callbacks_cpu.json",
        {
            "machine": {"torch": "9.9.9+cpu", "cpu_count": 4},
            "every": 50,
            "target_ratio": 1.3,
            "settings": {
                "cheap": {"ratio_best_of": 1.25},
                "default": {"ratio_best_of": 2.75},
            },
        },
    )
    write(
        d,
        "gradient_noise_cpu.json",
        {
            "machine": MACHINE,
            "cases": [
                {"case": "a_cnn", "over_grad": {"top5": 4.444, "per_sample": 2.0}}
            ],
            "targets": {"top5_le_3x_grad": False},
        },
    )
    write(
        d,
        "cost_curve_cuda.json",
        {
            "benchmark": "cost_curve",
            "machine": {**MACHINE, "gpu": "Synthetic GPU"},
            "results": [
                {
                    "model": "mlp_small",
                    "family": "mlp",
                    "d": 12345,
                    "batch": 64,
                    "grad_seconds": 0.5,
                    "hvp_seconds": 1.0,
                    "hvp_over_grad": 2.0,
                    "top5_matvecs": 77,
                    "top5_seconds": 10.0,
                    "top5_converged": False,
                    "top1_matvecs": 11,
                    "top1_seconds": 1.5,
                    "top1_converged": True,
                    "peak_bytes_train_step": 100,
                    "peak_bytes_hvp": 250,
                    "peak_bytes_eigen": None,
                    "hvp_memory_over_train_step": 2.5,
                    "eigen_memory_over_train_step": None,
                    "repeats": 3,
                },
                {"model": "vit", "family": "vit", "d": 999, "hvp_over_grad": 3.5},
                {
                    "model": "mlp_small",
                    "family": "mlp",
                    "dtype": "float64",
                    "d": 12345,
                    "hvp_over_grad": 2.25,
                    "top5_matvecs": 90,
                    "top5_converged": True,
                },
            ],
        },
    )
    return d


def test_readme_table_is_current():
    stale = st.check(st.README, st.RESULTS)
    assert stale is None, stale


def test_synthetic_results_give_their_numbers(results):
    table = st.render(results)
    assert row(table, "`hvp_cpu.json`", "one gradient").count("x;") == 1
    assert "tiny 1.23x; big 3.46x" in row(table, "`hvp_cpu.json`", "one gradient")
    assert "tiny 2.50x" in row(table, "8 single HVPs")
    callbacks = row(table, "`train_callbacks_cpu.json`", "plain training")
    assert "`cheap` 1.25x; `default` 2.75x" in callbacks
    assert "every 50 steps" in callbacks
    assert "≤ 1.3x: met by `cheap`" in callbacks
    noise = row(table, "`gradient_noise_cpu.json`", "one full-data gradient")
    assert "cnn 4.44x (2.00x)" in noise and "≤ 3x: not met" in noise
    assert "2.00x to 3.50x over 2 float32 models" in row(
        table, "`cost_curve_cuda.json`", "across model sizes"
    )
    model = row(table, "| mlp_small (mlp) |")
    assert "| 12,345 | 64 | 2.00x |" in model
    assert "77, 20.0x (not converged)" in model  # 10 s / 0.5 s
    assert "11, 3.0x |" in model
    assert "2.50x, n/a" in model  # eigen memory is null
    wide = row(table, "| mlp_small (mlp, float64) |")
    assert "| 2.25x | 90, n/a |" in wide
    machine = row(table, "`hvp_cpu.json`", "Synthetic CPU")
    assert "| 4 (3) | 9.9.9+cpu | 2031-02-03 |" in machine
    assert "Synthetic CPU; Synthetic GPU" in row(table, "Synthetic GPU")
    # files that do not exist give no rows
    assert "spectra_cpu.json" not in table and "kfac_cpu.json" not in table


def test_missing_keys_render_na(results):
    write(results, "spectra_cpu.json", {"benchmark": "spectra"})
    write(results, "slices_cpu.json", {"cases": [{"case": "a_mlp"}], "targets": 3})
    write(results, "study_cpu.json", {"overhead": {}, "parallel": {"steps": 10}})
    write(results, "kfac_cpu.json", {"problems": {"a": {"best": {"kfac": {}}}}})
    table = st.render(results)
    assert "| n/a | — |" in row(table, "`spectra_cpu.json`", "products")
    assert "| mlp n/a |" in row(table, "`slices_cpu.json`", "bare forward")
    assert "10 steps n/a" in row(table, "--jobs 2")
    assert "a: K-FAC n/a" in row(table, "`kfac_cpu.json`", "steps")
    # no block-of-8 ratio for the second case, no machine at all
    assert "big n/a" in row(table, "8 single HVPs")
    assert row(table, "| `spectra_cpu.json` | n/a |") == (
        "| `spectra_cpu.json` | n/a | n/a | n/a | n/a |"
    )
    assert "| vit (vit) | 999 | n/a | 3.50x | n/a, n/a |" in table


def test_invalid_json_is_an_error_naming_the_file(results):
    (results / "slices_cpu.json").write_text('{"cases": [', encoding="utf-8")
    with pytest.raises(st.SpeedTableError, match=r"slices_cpu\.json: not valid JSON"):
        st.render(results)
    write(results, "slices_cpu.json", [1, 2])
    with pytest.raises(st.SpeedTableError, match=r"slices_cpu\.json: expected"):
        st.render(results)


def test_missing_markers_are_a_clear_error(tmp_path, results):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Speed\n\nno markers\n", encoding="utf-8")
    with pytest.raises(st.SpeedTableError, match="speed-table:start"):
        st.write(readme, results)
    assert readme.read_text(encoding="utf-8") == "# x\n\n## Speed\n\nno markers\n"
    readme.write_text(f"{st.END}\n{st.START}\n", encoding="utf-8")  # wrong order
    with pytest.raises(st.SpeedTableError, match="1 start and 1 end"):
        st.check(readme, results)


def test_write_then_check_and_the_command(tmp_path, results, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT, encoding="utf-8")
    args = ["--readme", str(readme), "--results", str(results)]
    assert st.main(["--check", *args]) == 1
    assert "Run `python benchmarks/speed_table.py`" in capsys.readouterr().err
    assert st.main(args) == 0
    text = readme.read_text(encoding="utf-8")
    assert "old table" not in text and "tiny 1.23x" in text
    assert text.startswith("# x\n\n## Speed") and text.endswith("## After\n\nkept\n")
    assert st.check(readme, results) is None
    assert st.main(["--check", *args]) == 0
    assert st.write(readme, results) is False  # nothing to rewrite
    # a changed result makes the README stale again
    write(results, "gradient_noise_cpu.json", {"cases": [{"case": "a_cnn"}]})
    stale = st.check(readme, results)
    assert stale is not None and "speed table is stale" in stale
    assert "-| `gradient_noise_cpu.json`" in stale  # the diff says what changed
    (results / "kfac_cpu.json").write_text("not json", encoding="utf-8")
    assert st.main(args) == 2
    assert "kfac_cpu.json" in capsys.readouterr().err
