"""Deploy artefacts: the Procfile runs under honcho like a PaaS runs it; the Containerfile holds its promises."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.live import ROOT, free_port, ndjson, run_stella, to_toml


def test_procfile_starts_under_honcho(tmp_path: Path) -> None:
    honcho = shutil.which("honcho") or str(Path(sys.executable).parent / "honcho")
    if not Path(honcho).exists():
        if os.environ.get("CI"):
            pytest.fail("honcho is missing: install the test extras")
        pytest.skip("honcho not installed")
    port = free_port()
    conf = tmp_path / "stella.toml"
    conf.write_text(
        to_toml({"models": {"default": "echo"}, "backends": {"local": {"enabled": False}}})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    env.update(
        PORT=str(port),
        HOST="127.0.0.1",
        STELLA_CONFIG=str(conf),
        STELLA_API_KEYS="sk-procfile-test",
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
    )
    proc = subprocess.Popen(
        [honcho, "-f", str(ROOT / "Procfile"), "start", "web"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError("Procfile web process did not answer on $PORT")
        r = httpx.post(
            url + "/api/v1/chat",
            headers={"Authorization": "Bearer sk-procfile-test"},
            json={"model": "echo", "messages": [{"role": "user", "content": "hi there"}]},
        )
        assert [e["type"] for e in ndjson(r.text)] == ["start", "delta", "delta", "done"]
        # The platform's SIGTERM reaches stella itself (`exec`, no shell in between): it
        # drains and exits 0, and the process manager sees that.
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
        assert "web.1 stopped (rc=0)" in out, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)


def test_containerfile_promises() -> None:
    text = (ROOT / "Containerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2, "multi-stage build"
    assert "-slim" in stages[-1]
    assert "USER " in text and "USER root" not in text.split(stages[-1])[1]
    assert "HEALTHCHECK" in text and "/health" in text
    assert "import-gguf" in text, "the embedded model is baked into the image"
    # ...readable by the image's own user, who did not build it.
    assert "chmod -R a+rX /opt/models" in text
    # A runtime's 10 s stop timeout holds the drain and the shutdown.
    assert "STELLA_SERVER__DRAIN_TIMEOUT_S=7" in text


def test_workers_share_the_port_and_stop_cleanly() -> None:
    """server.workers = 2: two processes answer on one port; SIGTERM stops both, exit 0."""
    with run_stella({"server": {"workers": 2}}, args=("--model", "echo")) as server:
        started = [server.wait_event(lambda e: True, name="started")]
        deadline = time.monotonic() + 30
        while len(started) < 2 and time.monotonic() < deadline:
            started = server.events("started")
            time.sleep(0.05)
        pids = {e["pid"] for e in started}
        assert len(pids) == 2 and server.proc.pid not in pids
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
        assert pids <= {int(p) for p in children.split()}
        # The --model override reached the workers through the environment.
        for _ in range(10):
            r = httpx.post(
                server.url + "/api/v1/chat",
                json={"stream": False, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200 and r.json()["model"] == "echo"
        assert server.stop() == 0
        for pid in pids:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
        assert {e["pid"] for e in server.events("stopped")} == pids  # each worker says so


def test_draining_workers_refuse_new_connections_at_once() -> None:
    """With several workers, a draining server stops listening as one worker does: a new
    client is refused at once (and tries another replica), not queued and then reset."""
    config = {
        "server": {"workers": 2, "drain_timeout_s": 10},
        "backends": {"slow": {"kind": "echo", "delay_s": 0.2}},
        "models": {"routes": {"slow": {"backend": "slow"}}},
    }
    body = {"model": "slow", "messages": [{"role": "user", "content": "w " * 25}]}  # ~5 s
    with run_stella(config) as server, httpx.Client(timeout=30) as client:
        deadline = time.monotonic() + 30
        while len(server.events("started")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        with client.stream("POST", server.url + "/api/v1/chat", json=body) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines))["type"] == "start"
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)  # the workers begin to drain; the supervisor lets go too
            started = time.monotonic()
            with pytest.raises(httpx.ConnectError):
                httpx.get(server.url + "/health", timeout=5)
            assert time.monotonic() - started < 1
            rest = [json.loads(x) for x in lines]
        assert rest[-1]["type"] == "done"  # the running stream still ended whole
        assert server.stop() == 0
