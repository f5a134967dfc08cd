"""The code holds to its own rules: ruff (lint and format) and mypy, as README's
development commands run them, so CI's one test command checks them too."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.live import ROOT, in_ci


def _run(
    module: str, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m module args` at the repository's root (its pyproject.toml settings)."""
    if importlib.util.find_spec(module) is None:
        if in_ci():
            pytest.fail(f"{module} is missing: install the test extras")
        pytest.skip(f"{module} not installed")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
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


def test_the_client_is_typed_for_its_users(tmp_path: Path) -> None:
    # stella found on the path as an installed package is: without py.typed mypy skipped
    # it (every call Any), and chat()/generate() returned Any whatever `stream` was.
    (tmp_path / "use.py").write_text(
        textwrap.dedent(
            """\
            from stella.client import AsyncClient, Client

            def sync(c: Client, flag: bool) -> None:
                reveal_type(c.chat([]))
                reveal_type(c.generate("x", stream=True))
                reveal_type(c.chat([], stream=flag))
                with c.chat([], stream=True) as events:
                    for e in events:
                        reveal_type(e)
                c.chat([]).nonexistent

            async def asynchronous(c: AsyncClient) -> None:
                reveal_type(await c.chat([], "m", stream=False))
                async with await c.generate("x", stream=True) as events:
                    async for e in events:
                        reveal_type(e)

            Client(timeout=None).close()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = _run(
        "mypy",
        "--no-error-summary",
        "--cache-dir",
        str(tmp_path / "cache"),
        "use.py",
        cwd=tmp_path,
        env=env,
    )
    # The client's Done and ChatResponse: the protocol's, with a finish_reason it may not know.
    event = "stella.protocol.Start | stella.protocol.Delta | stella.protocol.ToolCall | stella.client.Done"
    assert done.stdout.splitlines() == [
        'use.py:4: note: Revealed type is "stella.client.ChatResponse"',
        'use.py:5: note: Revealed type is "stella.client.Stream"',
        'use.py:6: note: Revealed type is "stella.client.ChatResponse | stella.client.Stream"',
        f'use.py:9: note: Revealed type is "{event}"',
        'use.py:10: error: "ChatResponse" has no attribute "nonexistent"  [attr-defined]',
        'use.py:13: note: Revealed type is "stella.client.ChatResponse"',
        f'use.py:16: note: Revealed type is "{event}"',
    ], done.stdout + done.stderr
