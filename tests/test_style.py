"""The house style: ``ruff check`` and ``ruff format --check`` are clean
(configuration in pyproject.toml: 100 columns)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).with_name("ruff")


@pytest.mark.parametrize("command", [["check", "--no-cache"], ["format", "--check", "--no-cache"]])
def test_ruff_is_clean(command):
    if not RUFF.exists():
        pytest.fail("ruff is not installed in the venv (scripts/setup.sh installs the test extra)")
    out = subprocess.run([str(RUFF), *command, str(ROOT)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]


def test_ruff_finds_a_violation(tmp_path):
    """Negative control: the same configuration fails on a file that breaks it."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx = 1\n" + "y = '" + "z" * 120 + "'\n")
    for command in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        out = subprocess.run(
            [str(RUFF), *command, "--config", str(ROOT / "pyproject.toml"), str(bad)],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 1, out.stdout + out.stderr
