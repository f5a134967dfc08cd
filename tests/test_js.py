"""stella.js's parser and client tests, run with node's own test runner."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.live import ROOT


def test_stella_js_with_node() -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is missing")
        pytest.skip("node is not installed")
    proc = subprocess.run(
        [node, "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout
