"""`stella bench url`: a bounded load run against a live stella, and its token count."""

from __future__ import annotations

import json
import subprocess
import sys

from stella.bench.echo import Row, _body, measure, table
from stella.bench.loadgen import text_lines
from tests.live import LiveServer


def test_text_lines_count_text_in_every_dialect() -> None:
    native = b'{"type":"start","id":"r"}\n{"type":"delta","text":"a"}\n{"type":"delta","text":" b"}\n{"type":"done"}\n'
    openai = (
        b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    ollama = b'{"message":{"role":"assistant","content":"a"},"done":false}\n{"message":{"role":"assistant","content":""},"done":true}\n'
    generate = b'{"response":"a","done":false}\n{"response":"","done":true}\n'
    anthropic = b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta","text":"a"}}\n\n'
    assert [text_lines(x) for x in (native, openai, ollama, generate, anthropic)] == [2, 1, 1, 1, 1]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stella", "bench", "url", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bench_url_reports_a_bounded_run(stella: LiveServer) -> None:
    out = _bench(
        stella.url + "/api/v1/chat", "--stream", "-c", "1,4", "-n", "60", "-d", "5", "--json"
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["concurrency"] for r in rows] == [1, 4]
    for r in rows:
        assert 0 < r["requests"] <= 60 and r["errors"] == 0
        assert r["rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["tokens_per_s"] > 0 and r["ttfb_p50_ms"] <= r["p50_ms"]


def test_bench_url_refuses_a_remote_target() -> None:
    out = _bench("http://192.0.2.1:8000/api/v1/chat", "-n", "1")
    assert out.returncode == 2 and "loopback" in out.stderr


def test_bench_url_says_when_nothing_listens() -> None:
    from tests.live import free_port

    r = _bench(f"http://127.0.0.1:{free_port()}/api/v1/chat", "-c", "1", "-d", "0.2")
    assert r.returncode == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr


def test_bench_upstream_serves_openai_chat_completions() -> None:
    from tests.live import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stella", "bench", "upstream", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import time

        import httpx

        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"model": "bench", "messages": [{"role": "user", "content": "hi"}]},
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the fake upstream did not start"
                time.sleep(0.1)
        body = r.json()
        assert r.status_code == 200 and body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] == 20
    finally:
        proc.terminate()
        proc.wait(10)


def test_bench_asgi_measures_both_apps_in_process() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stella", "bench", "asgi", "-n", "300", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = {r["mode"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"non-stream", "stream"}
    for r in rows.values():
        assert r["stella_us"] > 0 and r["bare_us"] > 0
        assert r["ratio"] == round(r["bare_us"] / r["stella_us"], 3)


def test_a_measurement_reports_the_servers_cpu_time_per_request(stella: LiveServer) -> None:
    r = measure(stella.url, _body(False), "stella", 2, 0.5, False, None, pid=stella.proc.pid)
    assert r.requests > 10 and r.errors == 0
    # Each request costs the server some CPU, and far less than a whole second.
    assert r.cpu_us is not None and 0 < r.cpu_us < 1e6
    line = table([Row("non-stream", 2, r, r, 1.0)]).splitlines()[-1]
    assert line.endswith(f"| {r.cpu_us:.1f} / {r.cpu_us:.1f} |")
