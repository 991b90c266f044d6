"""The code style CI enforces: ``ruff check`` (pyflakes, pycodestyle, import order) and ``ruff format --check``
with the repository's ``ruff.toml`` (120 columns). ruff is in the ``dev`` extra."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    executable = shutil.which("ruff")
    command = [executable] if executable else [sys.executable, "-m", "ruff"]
    return subprocess.run([*command, *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [("check", "."), ("format", "--check", ".")], ids=["lint", "format"])
def test_ruff_is_clean(args):
    result = _ruff(*args)
    assert result.returncode == 0, f"ruff {' '.join(args)} found problems:\n{result.stdout}\n{result.stderr}"
