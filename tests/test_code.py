"""The code holds to its own rules: ruff (lint and format) and mypy, as README's
development commands run them, so CI's one test command checks them too."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.live import ROOT, in_ci


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m module args` at the repository's root (its pyproject.toml settings)."""
    if importlib.util.find_spec(module) is None:
        if in_ci():
            pytest.fail(f"{module} is missing: install the test extras")
        pytest.skip(f"{module} not installed")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.parametrize(
    "args", [("check", "."), ("format", "--check", ".")], ids=["lint", "format"]
)
def test_ruff(args: tuple[str, ...]) -> None:
    done = _run("ruff", *args)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy() -> None:
    # Files and settings come from [tool.mypy]; a warm cache (.mypy_cache) takes ~1 s.
    done = _run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout, done.stdout
