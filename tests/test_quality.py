"""The package type-checks under mypy --strict and passes ruff (both in the test extra)."""

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
        [sys.executable, "-m", "ruff", "check", "zproc"],
    ],
    ids=["mypy-strict", "ruff"],
)
def test_static_checks(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
