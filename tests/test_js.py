"""stella.js's parser and client tests, run with node's own test runner."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.live import ROOT, in_ci


def test_stella_js_with_node() -> None:
    node = shutil.which("node")
    if node is None:
        if in_ci():
            pytest.fail("node is missing")
        pytest.skip("node is not installed")
    proc = subprocess.run(
        [node, "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout
    # node passes a folder where it found no test file: the suite must have run.
    ran = re.search(r"^# tests (\d+)$", proc.stdout, re.M)
    assert ran and int(ran.group(1)) > 0, proc.stdout[-500:]
