"""The package type-checks under mypy --strict, the tree passes ruff, the docs build cleanly.

All three tools are in the test extra, so CI runs them on every change.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "mypy", "zproc"],
        [sys.executable, "-m", "ruff", "check", "zproc", "tests", "benchmarks", "examples"],
    ],
    ids=["mypy-strict", "ruff"],
)
def test_static_checks(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_docs_build_without_warnings(tmp_path: Path) -> None:
    """sphinx-build -W: a broken reference, a bad docstring or a missing page fails."""
    command = [
        sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
        "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(tmp_path / "html"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "html" / "index.html").is_file()
