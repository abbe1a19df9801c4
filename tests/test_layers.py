"""The package's layering (`[tool.importlinter]` in pyproject.toml) holds, and the contract would
catch a regression: an upward import or an import cycle added to a copy of the package breaks it.
Function-level imports count (grimp reads every import statement)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    """Run `lint-imports` on the package under ``tree`` (its pyproject.toml, its lens_rl)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT), str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def copy_of_package(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("layers")
    shutil.copytree(
        ROOT / "lens_rl", tree / "lens_rl", symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _append(path: Path, text: str) -> str:
    old = path.read_text()
    path.write_text(old + text)
    return old


def test_the_package_keeps_its_layers(copy_of_package):
    res = _lint(copy_of_package)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 2 kept, 0 broken." in res.stdout, res.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # ops is below training: an upward import, inside a function as the old code had them
        (
            "ops/sampling.py",
            "\n\ndef _upward():\n    from lens_rl.training import guards  # noqa\n",
            "layers",
        ),
        # families <-> hooks: the cycle this redesign removed
        (
            "models/families.py",
            "\n\ndef _cycle():\n    from lens_rl.models.hooks import StopForward  # noqa\n",
            "cycles",
        ),
    ],
)
def test_an_upward_import_or_a_cycle_breaks_the_contract(copy_of_package, module, line, broken):
    path = copy_of_package / "lens_rl" / module
    old = _append(path, line)
    try:
        res = _lint(copy_of_package)
    finally:
        path.write_text(old)
    assert res.returncode != 0, res.stdout
    name = "lens_rl layers point down" if broken == "layers" else "no import cycles among sibling modules"
    assert f"{name}" in res.stdout and "BROKEN" in res.stdout.split(name)[1].splitlines()[0], res.stdout
