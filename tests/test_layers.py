"""The import layers of pyproject.toml ([tool.importlinter]) hold: no module imports a layer above it."""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the `ranke` package and contracts under `root` (not the installed copy)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [shutil.which("lint-imports") or "lint-imports", "--config", "pyproject.toml", "--no-cache"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)


def test_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The check can fail: a copy of the package in which a model imports the config is refused."""
    shutil.copytree(ROOT / "ranke", tmp_path / "ranke", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    gpt = tmp_path / "ranke" / "models" / "gpt.py"
    gpt.write_text(gpt.read_text() + "\nfrom ranke.config import RunConfig  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "ranke.models.gpt -> ranke.config" in result.stdout
