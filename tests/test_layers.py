"""The layer contract of DESIGN.md holds, and the check refuses imports that break it.

The contracts live in pyproject.toml (``[tool.importlinter]``); import-linter reads
them and the import graph of the package that ``lossgeom`` resolves to on
``PYTHONPATH``, so a copy of the sources with a bad import added can be checked
with the same contracts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = 6


def _lint(root: Path) -> tuple[int, str]:
    """Run ``lint-imports --no-cache`` on ``root``'s config and ``root/src/lossgeom``."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
            "--config",
            str(root / "pyproject.toml"),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_the_package_keeps_its_layers():
    code, out = _lint(ROOT)
    assert code == 0, out
    assert f"Contracts: {CONTRACTS} kept, 0 broken." in out, out


# A module added to the package and the line the check must report for it.
VIOLATIONS = {
    # upward: layer 0 reaching layer 3
    "linalg/_upward.py": (
        "from lossgeom.train import TrainConfig\n",
        "lossgeom.linalg._upward -> lossgeom.train",
    ),
    # sideways: layer-2 siblings
    "geometry/_sideways.py": (
        "from lossgeom.curvature import hessian\n",
        "lossgeom.geometry._sideways -> lossgeom.curvature",
    ),
    "curvature/_sideways.py": (
        "import lossgeom.measures\n",
        "lossgeom.curvature._sideways -> lossgeom.measures",
    ),
    "measures/_sideways.py": (
        "from lossgeom.geometry import slice_1d\n",
        "lossgeom.measures._sideways -> lossgeom.geometry",
    ),
    # the zoo knows PyTorch only
    "zoo/_helper.py": (
        "from lossgeom.objective import Objective\n",
        "lossgeom.zoo._helper -> lossgeom.objective",
    ),
    # the command uses the public API
    "cli/_private.py": (
        "from lossgeom._io import atomic_write_json\n",
        "lossgeom.cli._private -> lossgeom._io",
    ),
    # the library does not run on its test references
    "train/_reference.py": (
        "from lossgeom.testing import exact_hessian\n",
        "lossgeom.train._reference -> lossgeom.testing",
    ),
}


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package's sources and contracts, copied to ``tmp_path``."""
    shutil.copytree(
        ROOT / "src" / "lossgeom",
        tmp_path / "src" / "lossgeom",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_check_names_each_import_that_breaks_the_layers(copy: Path):
    for module, (source, _) in VIOLATIONS.items():
        (copy / "src" / "lossgeom" / module).write_text(source)
    code, out = _lint(copy)
    assert code != 0, out
    for _, expected in VIOLATIONS.values():
        assert expected in out, f"{expected!r} not reported:\n{out}"
    assert "BROKEN" in out


def test_a_new_top_level_module_must_be_placed_in_the_layers(copy: Path):
    (copy / "src" / "lossgeom" / "_unplaced.py").write_text("X = 1\n")
    code, out = _lint(copy)
    assert code != 0, out
    assert "lossgeom._unplaced" in out, out


def test_an_allowed_import_passes_the_copy(copy: Path):
    # measures -> curvature is the one edge between layer-2 siblings DESIGN.md allows
    (copy / "src" / "lossgeom" / "measures" / "_allowed.py").write_text(
        "from lossgeom.curvature import hessian\nfrom lossgeom.linalg import fwht\n"
    )
    code, out = _lint(copy)
    assert code == 0, out
