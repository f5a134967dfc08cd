"""stella.js's parser and client tests, run with node's own test runner."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.live import ROOT, in_ci


def test_stella_js_with_node() -> None:
    node = shutil.which("node")
    version = "" if node is None else _version(node)
    # node's test runner (`node --test`, `node:test`) came in 18: older ones (Ubuntu
    # 22.04's nodejs is 12) would fail for want of it, not for stella.js.
    if node is None or not version.startswith("v") or int(version[1:].split(".")[0]) < 18:
        why = "node is not installed" if node is None else f"node {version} is older than 18"
        if in_ci():
            pytest.fail(why)
        pytest.skip(why)
    # The files by name: node 22 and later read `--test`'s arguments as globs, and a
    # folder as a file to run.
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "js").glob("*.test.mjs"))
    assert files
    proc = subprocess.run(
        [node, "--test", *files], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    # The summary as TAP writes it ("# fail 0") or the spec reporter, node 23's default
    # (an information sign, U+2139, for the "#").
    assert re.search(r"^(?:#|ℹ) fail 0$", proc.stdout, re.M), proc.stdout[-500:]
    # node passes a folder where it found no test file: the suite must have run.
    ran = re.search(r"^(?:#|ℹ) tests (\d+)$", proc.stdout, re.M)
    assert ran and int(ran.group(1)) > 0, proc.stdout[-500:]


def _version(node: str) -> str:
    """`node --version`'s answer ("v20.1.0"), or "" when it gives none."""
    proc = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    return proc.stdout.strip()
