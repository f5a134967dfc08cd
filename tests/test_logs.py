"""Logs: one JSON inference event, the audit file, content only on request, no secrets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from stella import logs
from tests.live import ROOT, LiveServer, run_stella

KEY = "sk-audit-secret-key-42"


def test_sink_masks_secrets_and_bearer_tokens() -> None:
    out = io.BytesIO()
    sink = logs.LogSink(stream=out, secrets=["upstream-secret-999"])
    sink.put(
        {
            "event": "x",
            "authorization": "Bearer abc",
            "note": "used upstream-secret-999",
            "hdr": "Bearer zzz.yyy",
            "nested": {"api_key": "k", "ok": 1},
        }
    )
    sink.close()
    text = out.getvalue().decode()
    assert "upstream-secret-999" not in text and "abc" not in text and "zzz" not in text
    ev = json.loads(text)
    assert ev["authorization"] == "***" and ev["nested"] == {"api_key": "***", "ok": 1}


def test_sink_masks_a_bearer_token_in_any_case() -> None:
    out = io.BytesIO()
    sink = logs.LogSink(stream=out)
    sink.put({"event": "x", "note": "sent BEARER qqq.www upstream"})
    sink.close()
    assert "qqq" not in out.getvalue().decode()


def test_console_format_is_one_readable_line() -> None:
    out = io.BytesIO()
    sink = logs.LogSink(fmt="console", stream=out)
    sink.put({"event": "inference", "ts": time.time(), "level": "info", "model": "echo"})
    sink.close()
    line = out.getvalue().decode()
    assert line.count("\n") == 1 and "inference" in line and "model=echo" in line


def test_console_format_keeps_an_event_on_its_line() -> None:
    # A prompt cannot print what looks like a second event, nor move the cursor.
    out = io.BytesIO()
    sink = logs.LogSink(fmt="console", stream=out)
    sink.emit("inference", {"prompt": "hi\n20:50:00.000 INFO inference key=admin\x1b[2J"})
    sink.close()
    lines = out.getvalue().decode().splitlines()
    assert len(lines) == 1
    assert "hi\\x0a20:50:00.000" in lines[0] and "\\x1b[2J" in lines[0]


def test_audit_file_content_and_no_secrets(tmp_path: Path) -> None:
    audit = tmp_path / "logs" / "log.jsonl"
    config = {"log": {"audit_path": str(audit), "content": True}}
    with run_stella(config, {"STELLA_API_KEYS": f"ops={KEY}"}) as server:
        headers = {"Authorization": f"Bearer {KEY}"}
        for i in range(3):
            r = httpx.post(
                server.url + "/api/v1/chat",
                headers=headers,
                json={
                    "model": "echo",
                    "stream": i % 2 == 0,
                    "messages": [{"role": "user", "content": f"secret plan {i}"}],
                },
            )
            assert r.status_code == 200
        httpx.get(server.url + "/config", headers=headers)
        httpx.get(server.url + "/api/v1/models", headers={"X-API-Key": "sk-wrong-guess-1"})
        server.wait_event(lambda e: e["completion"] == "secret plan 2")
        server.stop()
        captured = "\n".join(server.lines())
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(rows) == 3
    assert [r["completion"] for r in rows] == ["secret plan 0", "secret plan 1", "secret plan 2"]
    assert rows[0]["prompt"] == [{"role": "user", "content": "secret plan 0"}]
    assert all(r["key"] == "ops" for r in rows)
    everything = captured + audit.read_text()
    assert KEY not in everything
    assert hashlib.sha256(KEY.encode()).hexdigest() not in everything
    assert "Bearer" not in everything


def test_content_logs_the_tool_calls_of_the_history_and_of_the_answer(tmp_path: Path) -> None:
    audit = tmp_path / "log.jsonl"
    # A key known by its digest: the sink cannot mask it, the event's own masking must.
    config = {
        "log": {"audit_path": str(audit), "content": True},
        "auth": {"keys": {"ops": {"sha256": hashlib.sha256(KEY.encode()).hexdigest()}}},
    }
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    with run_stella(config) as server:
        headers = {"Authorization": f"Bearer {KEY}"}
        for stream in (False, True):
            r = httpx.post(
                server.url + "/v1/chat/completions",
                headers=headers,
                json={
                    "model": "echo",
                    "stream": stream,
                    "tools": tools,
                    "messages": [{"role": "user", "content": f"find {KEY} and Paris"}],
                },
            )
            assert r.status_code == 200
        history = [
            {"role": "user", "content": "find Paris"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_7",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"city": "Paris"}'},
                    },
                    {  # not JSON: logged as the model wrote it
                        "id": "call_8",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": "city=Oslo"},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_7", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_8", "content": "cold"},
        ]
        r = httpx.post(
            server.url + "/v1/chat/completions",
            headers=headers,
            json={"model": "echo", "tools": tools, "messages": history},
        )
        assert r.status_code == 200
        server.wait_event(lambda e: e["prompt"][-1]["role"] == "tool")
        # A failed call's result (the Anthropic dialect's is_error) is logged as one.
        use = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}
        failed = {
            "type": "tool_result",
            "tool_use_id": "toolu_1",
            "content": "no",
            "is_error": True,
        }
        r = httpx.post(
            server.url + "/v1/messages",
            headers=headers,
            json={
                "model": "echo",
                "max_tokens": 20,
                "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
                "messages": [
                    {"role": "user", "content": "find Oslo"},
                    {"role": "assistant", "content": [use]},
                    {"role": "user", "content": [failed]},
                ],
            },
        )
        assert r.status_code == 200, r.text
        server.wait_event(lambda e: e["api"] == "anthropic")
        server.stop()
        captured = "\n".join(server.lines())
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["stream"] for r in rows] == [False, True, False, False]
    for row in rows[:2]:
        # The answer is the call, not an empty completion; its arguments are the model's.
        assert row["finish_reason"] == "tool_calls" and row["completion"] == ""
        (call,) = row["tool_calls"]
        assert call == {
            "id": call["id"],
            "name": "lookup",
            "arguments": '{"input":"find *** and Paris"}',
        }
        assert call["id"].startswith("call_")
    assert rows[2]["prompt"] == [
        {"role": "user", "content": "find Paris"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_7", "name": "lookup", "arguments": '{"city":"Paris"}'},
                {"id": "call_8", "name": "lookup", "arguments": "city=Oslo"},
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_7"},
        {"role": "tool", "content": "cold", "tool_call_id": "call_8"},
    ]
    assert "tool_calls" not in rows[2]  # the answer has none: no empty field
    assert rows[3]["prompt"][-1] == {
        "role": "tool",
        "content": "no",
        "tool_call_id": "toolu_1",
        "is_error": True,
    }
    assert KEY not in captured + audit.read_text()


def test_no_content_by_default(tmp_path: Path) -> None:
    audit = tmp_path / "a.jsonl"
    with run_stella({"log": {"audit_path": str(audit)}}) as server:
        httpx.post(
            server.url + "/api/v1/chat",
            json={"model": "echo", "messages": [{"role": "user", "content": "private words"}]},
        )
        server.wait_event(lambda e: e["model"] == "echo")
    text = audit.read_text()
    assert "private words" not in text
    assert json.loads(text.splitlines()[0])["completion_tokens"] == 2


def test_emit_redacts_client_metadata_fields() -> None:
    out = io.BytesIO()
    sink = logs.LogSink(stream=out, secrets=["sk-known-secret-1"])
    sink.emit(
        "inference",
        {
            "request_id": "r1",
            "metadata": {
                "user": "u",
                "api_key": "leak",
                "access_token": "leak",
                "X-Auth-Token": "leak",
                "session_cookie": "leak",
                "secret_key": "leak",
                "private_key": "leak",
                "aws_secret_access_key": "leak",
                "clientSecret": "leak",
                "APIToken": "leak",
                "dbpassword": "leak",
                "max_tokens": 5,
                "idempotency_key": "req-7",
            },
            "note": "has sk-known-secret-1 inside",
        },
    )
    sink.close()
    ev = json.loads(out.getvalue())
    assert ev["metadata"] == {
        "user": "u",
        "api_key": "***",
        "access_token": "***",
        "X-Auth-Token": "***",
        "session_cookie": "***",
        "secret_key": "***",
        "private_key": "***",
        "aws_secret_access_key": "***",
        "clientSecret": "***",
        "APIToken": "***",
        "dbpassword": "***",
        "max_tokens": 5,  # a count of tokens, not a token
        "idempotency_key": "req-7",  # a key, not a credential
    }
    assert "sk-known-secret-1" not in out.getvalue().decode()
    assert ev["event"] == "inference" and ev["level"] == "info" and ev["ts"] > 0


def test_named_keys_and_secret_fields_stay_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYS_FOR_TEST", "alice=sk-alice-secret-1, sk-bare-secret-2")
    out = io.BytesIO()
    sink = logs.LogSink(stream=out, secrets=logs.secrets_from_env(["KEYS_FOR_TEST"]))
    sink.emit("inference", {"metadata": {"note": "sk-alice-secret-1 and sk-bare-secret-2"}})
    # An empty secret field once must not make that field name safe for later lines.
    sink.emit("inference", {"metadata": {"api_key": ""}})
    sink.emit("inference", {"metadata": {"api_key": "sk-leaked-after-empty"}})
    sink.emit("inference", {"metadata": {"x": [[{"password": "pw-in-a-nested-list"}]]}})
    sink.close()
    text = out.getvalue().decode()
    for secret in ("sk-alice-secret-1", "sk-bare-secret-2", "sk-leaked-after-empty", "pw-in-a"):
        assert secret not in text, secret


def test_an_event_that_cannot_be_rendered_whole_still_leaves_its_audit_line(
    tmp_path: Path,
) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("no")

    deep: dict = {}
    node = deep
    for _ in range(5000):  # past the recursion limit of any walk over it
        node["a"] = {}
        node = node["a"]
    out = io.BytesIO()
    audit = tmp_path / "audit.jsonl"
    sink = logs.LogSink(stream=out, audit_path=str(audit))
    sink.emit("inference", {"request_id": "r1", "metadata": {"x": Unprintable()}, "status": 200})
    sink.emit("inference", {"request_id": "r2", "metadata": deep, "status": 200})
    # A model's tool calls are free form too: left out with the rest.
    calls = [{"id": "c1", "name": "f", "arguments": Unprintable()}]
    sink.emit("inference", {"request_id": "r3", "tool_calls": calls, "status": 200})
    sink.close()
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["request_id"] for r in rows] == ["r1", "r2", "r3"]
    assert all(r["status"] == 200 and "metadata" not in r for r in rows)
    assert "tool_calls" not in rows[2] and rows[2]["log_error"] == "not rendered whole: ValueError"
    assert rows[0]["log_error"] == "not rendered whole: ValueError"
    assert rows[1]["log_error"] == "not rendered whole: RecursionError"
    assert [json.loads(line)["request_id"] for line in audit.read_text().splitlines()] == [
        "r1",
        "r2",
        "r3",
    ]


class BrokenPipe(io.RawIOBase):
    """A stdout whose reader went away."""

    def write(self, data: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")


class Stalled(io.RawIOBase):
    """A stdout nobody reads: each write waits until `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.data = bytearray()

    def write(self, data: object) -> int:
        self.release.wait(30)
        self.data += bytes(data)  # type: ignore[arg-type]
        return len(data)  # type: ignore[arg-type]


def audit_ids(path: Path) -> list[int]:
    return [json.loads(line)["n"] for line in path.read_text().splitlines()]


def test_a_broken_stdout_still_writes_every_audit_line(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    sink = logs.LogSink(stream=BrokenPipe(), audit_path=str(audit))

    async def serve() -> None:  # on an event loop, as in the server: batches handed over
        for n in range(200):
            sink.emit("inference", {"n": n})
            if n % 50 == 49:
                await asyncio.sleep(2 * logs.HANDOVER_S)

    asyncio.run(serve())
    sink.emit("inference", {"n": 200})  # and off the loop
    ended = sink.close()
    assert audit_ids(audit) == list(range(201))
    assert ended
    dropped, errors = sink.counts()["stdout"]
    assert dropped == 201 and errors >= 1
    assert sink.counts()["audit"] == (0, 0)


def test_a_stalled_stdout_does_not_hold_up_the_audit_file(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    out = Stalled()
    sink = logs.LogSink(stream=out, audit_path=str(audit))
    try:
        for n in range(100):
            sink.emit("inference", {"n": n})
        started = time.monotonic()
        assert not sink.flush(timeout=0.5)  # stdout could not finish: said so, in time
        assert time.monotonic() - started < 2
        assert audit_ids(audit) == list(range(100))
        started = time.monotonic()
        assert not sink.close(timeout=0.5)
        assert time.monotonic() - started < 2
    finally:
        out.release.set()
    # Once stdout moves again, everything queued reaches it too.
    deadline = time.monotonic() + 5
    while out.data.count(b"\n") < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [json.loads(line)["n"] for line in out.data.splitlines()] == list(range(100))


def test_a_full_backlog_drops_new_lines_and_counts_them() -> None:
    out = Stalled()
    sink = logs.LogSink(stream=out, max_backlog=2000)
    try:
        for n in range(100):
            sink.put({"event": "x", "n": n, "pad": "p" * 60})  # about 100 bytes a line
        dropped, errors = sink.counts()["stdout"]
        assert 75 <= dropped <= 85 and errors == 0  # ~20 lines fit (one more in the write)
    finally:
        out.release.set()
    assert sink.close(timeout=5)
    written = [json.loads(line)["n"] for line in out.data.splitlines()]
    assert written == list(range(len(written)))  # the oldest kept, in order
    assert len(written) + dropped == 100
    # With room again, lines are kept again.
    sink = logs.LogSink(stream=io.BytesIO(), max_backlog=2000)
    for n in range(100):
        sink.put({"event": "x", "n": n, "pad": "p" * 60})
        sink.flush()
    assert sink.close() and sink.counts()["stdout"] == (0, 0)


def test_audit_write_errors_are_counted_and_reported_once(
    capfd: pytest.CaptureFixture[str],
) -> None:
    out = io.BytesIO()
    sink = logs.LogSink(stream=out, audit_path="/dev/full")  # every write: ENOSPC
    for n in range(3):
        sink.emit("inference", {"n": n})
        sink.flush()
    assert sink.close()
    dropped, errors = sink.counts()["audit"]
    assert dropped == 3 and errors == 3
    assert out.getvalue().count(b"\n") == 3  # stdout unaffected
    reports: list[dict] = []
    deadline = time.monotonic() + 5
    while not reports and time.monotonic() < deadline:
        time.sleep(0.05)
        err = capfd.readouterr().err
        reports += [json.loads(line) for line in err.splitlines() if "log_write_failed" in line]
    time.sleep(0.2)
    err = capfd.readouterr().err
    reports += [json.loads(line) for line in err.splitlines() if "log_write_failed" in line]
    assert len(reports) == 1
    report = reports[0]
    assert report["output"] == "audit" and report["path"] == "/dev/full"
    assert report["level"] == "error" and "OSError" in report["error"]


def test_the_audit_file_is_opened_again_after_a_failed_write(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the audit directory should be")
    audit = blocker / "audit.jsonl"
    sink = logs.LogSink(stream=io.BytesIO(), audit_path=str(audit))
    sink.emit("inference", {"n": 0})
    sink.flush()
    assert sink.counts()["audit"] == (1, 1)
    blocker.unlink()
    sink.emit("inference", {"n": 1})
    assert sink.close()
    assert audit_ids(audit) == [1]
    assert sink.counts()["audit"] == (1, 1)


def test_an_audit_file_rotated_by_rename_or_copytruncate_loses_no_line(tmp_path: Path) -> None:
    # logrotate's default renames the file away (then deletes it some rotations later):
    # the next lines go to a new file at audit_path. With copytruncate they go on at the
    # start of the truncated one. Each line in one file or the other, none lost.
    audit = tmp_path / "logs" / "log.jsonl"
    body = {"model": "echo", "stream": False, "messages": [{"role": "user", "content": "a"}]}

    def ask(client: httpx.Client, ids: range) -> None:
        for i in ids:
            r = client.post("/api/v1/chat", json=body, headers={"X-Request-ID": f"rot-{i}"})
            assert r.status_code == 200

    def ids_in(path: Path, count: int) -> list[str]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if path.exists() and len(path.read_bytes().splitlines()) >= count:
                break
            time.sleep(0.02)
        if not path.exists():
            return []
        return [json.loads(line)["request_id"] for line in path.read_bytes().splitlines()]

    with run_stella({"log": {"audit_path": str(audit)}}) as server:
        with httpx.Client(base_url=server.url) as client:
            ask(client, range(0, 3))
            assert ids_in(audit, 3) == ["rot-0", "rot-1", "rot-2"]
            audit.rename(tmp_path / "logs" / "log.jsonl.1")
            ask(client, range(3, 6))
            assert ids_in(audit, 3) == ["rot-3", "rot-4", "rot-5"]
            (tmp_path / "logs" / "log.jsonl.1").unlink()  # the old one goes for good
            ask(client, range(6, 8))
            assert ids_in(audit, 5)[3:] == ["rot-6", "rot-7"]
            copied = tmp_path / "logs" / "log.jsonl.2"
            copied.write_bytes(audit.read_bytes())
            with audit.open("r+b") as f:
                f.truncate(0)
            ask(client, range(8, 10))
            assert ids_in(audit, 2) == ["rot-8", "rot-9"]
            text = client.get("/metrics").text
        assert 'stella_log_lines_dropped_total{output="audit"} 0.0' in text
        assert 'stella_log_write_errors_total{output="audit"} 0.0' in text
        assert server.stop() == 0
        assert not server.events("log_write_failed")
    assert ids_in(copied, 5) == [f"rot-{i}" for i in range(3, 8)]
    assert ids_in(audit, 2) == ["rot-8", "rot-9"]


def test_the_audit_file_stella_creates_is_its_owners_alone(tmp_path: Path) -> None:
    # With log.content the audit file holds every prompt and answer: it was created
    # readable by every user (umask 022). A file that exists keeps the mode it was given.
    audit = tmp_path / "logs" / "log.jsonl"
    kept = tmp_path / "kept.jsonl"
    kept.touch()
    kept.chmod(0o640)
    body = {"model": "echo", "stream": False, "messages": [{"role": "user", "content": "a"}]}
    old_umask = os.umask(0o022)  # the usual one, inherited by the server
    try:
        with run_stella({"log": {"audit_path": str(audit), "content": True}}) as server:
            assert stat.S_IMODE(audit.stat().st_mode) == 0o600  # made at start-up
            audit.rename(tmp_path / "logs" / "log.jsonl.1")  # rotated away: made anew
            r = httpx.post(server.url + "/api/v1/chat", json=body)
            assert r.status_code == 200
            server.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
            deadline = time.monotonic() + 10
            while not audit.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert stat.S_IMODE(audit.stat().st_mode) == 0o600
        with run_stella({"log": {"audit_path": str(kept)}}) as server:
            r = httpx.post(server.url + "/api/v1/chat", json=body)
            assert r.status_code == 200
            server.stop()
    finally:
        os.umask(old_umask)
    assert kept.read_text().count("\n") == 1 and stat.S_IMODE(kept.stat().st_mode) == 0o640


def test_a_write_a_full_disk_cut_leaves_whole_lines_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk fills up halfway through a batch of three lines: the file keeps the first
    # whole and loses the half of the second (cut back), and the third; the next write
    # goes on after the first. Two lines lost, counted; one failed write.
    real = logs._write_all
    fail = [True]

    def half_then_full(fd: int, data: bytes) -> None:
        if fail[0] and data.count(b"\n") == 3:
            fail[0] = False
            cut = data.index(b"\n") + 1 + 4  # into the second line
            real(fd, data[:cut])
            raise logs._Cut(cut, OSError(errno.ENOSPC, "No space left on device"))
        real(fd, data)

    audit = tmp_path / "audit.jsonl"
    sink = logs.LogSink(stream=io.BytesIO(), audit_path=str(audit))
    monkeypatch.setattr(logs, "_write_all", half_then_full)
    # Off the loop each event is its own batch: three in one, by hand.
    sink._submit([b"x\n"] * 3, [b'{"n":1}\n', b'{"n":2}\n', b'{"n":3}\n'])
    assert sink.flush()
    sink.emit("inference", {"n": 4})
    assert sink.close()
    lines = audit.read_text().splitlines()
    assert [json.loads(line)["n"] for line in lines] == [1, 4]
    assert sink.counts()["audit"] == (2, 1)


def test_workers_sharing_the_audit_file_never_tear_each_others_lines(tmp_path: Path) -> None:
    # Two sinks on one file, as two workers of one server: A's write is cut by the file
    # size limit (a full disk), then B writes, then A again. Every line is whole JSON.
    script = f"""
import io, json, os, resource, signal
from stella import logs
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = {str(tmp_path / "audit.jsonl")!r}
a = logs.LogSink(stream=io.BytesIO(), audit_path=path)
b = logs.LogSink(stream=io.BytesIO(), audit_path=path)
a.emit("inference", {{"who": "A", "n": 1}}); a.flush()
b.emit("inference", {{"who": "B", "n": 1}}); b.flush()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 30, hard))
a.emit("inference", {{"who": "A", "n": 2, "pad": "x" * 100}}); a.flush()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
b.emit("inference", {{"who": "B", "n": 2}}); b.flush()
a.emit("inference", {{"who": "A", "n": 3}}); a.close(); b.close()
print(json.dumps([a.counts()["audit"], b.counts()["audit"]]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["who"], e["n"]) for e in events] == [("A", 1), ("B", 1), ("B", 2), ("A", 3)]
    assert counts == [[1, 1], [0, 0]]  # A lost its second line, and says so


def test_log_output_counters_are_in_metrics(tmp_path: Path) -> None:
    with run_stella({"log": {"audit_path": "/dev/full"}}) as server:
        r = httpx.post(
            server.url + "/api/v1/chat",
            json={"model": "echo", "stream": False, "messages": [{"role": "user", "content": "a"}]},
        )
        assert r.status_code == 200
        server.wait_event(lambda e: e["model"] == "echo")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = httpx.get(server.url + "/metrics").text
            if 'stella_log_write_errors_total{output="audit"} 1.0' in text:
                break
            time.sleep(0.05)
        assert 'stella_log_write_errors_total{output="audit"} 1.0' in text
        assert 'stella_log_lines_dropped_total{output="audit"} 1.0' in text
        assert 'stella_log_write_errors_total{output="stdout"} 0.0' in text
        assert 'stella_log_lines_dropped_total{output="stdout"} 0.0' in text
        server.wait_event(lambda e: e["output"] == "audit", name="log_write_failed")
        assert len(server.events("log_write_failed")) == 1


def test_sigterm_with_a_stalled_stdout_exits_and_the_audit_file_has_every_line(
    tmp_path: Path,
) -> None:
    # stdout is a pipe nobody reads: it fills after a hundred lines or so.
    audit = tmp_path / "audit.jsonl"
    config = {"log": {"audit_path": str(audit)}}
    body = {"model": "echo", "stream": False, "messages": [{"role": "user", "content": "a"}]}
    with run_stella(config, stdout=subprocess.PIPE) as server:
        assert server.proc.stdout is not None
        try:
            with httpx.Client(base_url=server.url) as client:
                for _ in range(400):
                    assert client.post("/api/v1/chat", json=body).status_code == 200
            started = time.monotonic()
            assert server.stop(timeout=30) == 0
            assert time.monotonic() - started < 20
            assert len(audit.read_text().splitlines()) == 400
        finally:
            server.stop()
            server.proc.stdout.close()


def test_a_named_key_the_client_echoes_is_masked_in_its_line(tmp_path: Path) -> None:
    # A key configured by its digest is known in plain text only as it is presented:
    # what the client wrote in that request (metadata, content) is masked with it.
    named = "sk-named-digest-only-77"
    audit = tmp_path / "a.jsonl"
    config = {
        "log": {"audit_path": str(audit), "content": True},
        "auth": {"keys": {"carol": {"sha256": hashlib.sha256(named.encode()).hexdigest()}}},
    }
    with run_stella(config) as server:
        r = httpx.post(
            server.url + "/api/v1/chat",
            headers={"Authorization": f"Bearer {named}"},
            json={
                "model": "echo",
                "stream": False,
                "metadata": {"note": f"my key is {named}", named: 1},
                "messages": [{"role": "user", "content": f"remember {named} please"}],
            },
        )
        assert r.status_code == 200 and named in r.json()["response"]  # the answer is theirs
        ev = server.wait_event(lambda e: e["key"] == "carol")
        server.stop()
        captured = "\n".join(server.lines()) + audit.read_text()
    assert named not in captured
    assert ev["metadata"] == {"note": "my key is ***", "***": 1}
    assert ev["completion"] == "remember *** please"


@pytest.mark.parametrize(
    "name",
    [
        "api_key",
        "auth_key",
        "access_key",
        "session_key",
        "signing_key",
        "encryption_key",
        "master_key",
        "private_key",
        "secret_key",
        "aws_secret_access_key",
        "x-auth-token",
        "accessToken",
        "client_secret",
        "db_password",
        "basic_auth",
        "proxyAuth",
        "bearer",
        "github_token",
        "x-apikey",
        "api_keys",
        "apiKeys",
        "private_keys",
        "refresh_tokens",
        "access_tokens",
        "secrets",
        "passwords",
        "db_passwords",
        "jwt",
        "user_jwt",
        "signature",
        "webhook_signature",
        "x-signature",
        "otp",
        "totp",
        "otp_code",
        "hotp",
        "jwts",
        "passwds",
        "passphrases",
        "passkeys",
        "passwords_by_host",
        "apikeys_by_env",
        "clientsecrets",
        "dbpasswords",
        "xapikeys",
        "webhook_signatures",
        "id_tokens",
        "oauth_tokens",
        "csrf_tokens",
        "xsrf_tokens",
        "github_tokens",
        "bot_tokens",
        "device_tokens",
        "personal_tokens",
    ],
)
def test_field_names_that_hold_credentials_are_masked(name: str) -> None:
    assert logs.is_secret_field(name)
    out = io.BytesIO()
    sink = logs.LogSink(stream=out)
    sink.emit("inference", {"metadata": {name: "hunter2-value"}})
    sink.close()
    assert "hunter2-value" not in out.getvalue().decode()


@pytest.mark.parametrize(
    "name",
    [
        "key",
        "idempotency_key",
        "max_tokens",
        "primary_key",
        "tokens",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "tokens_per_s",
        "cached_tokens",
        "cache_write_tokens",
        "input_tokens",
        "output_tokens",
        "reasoning_tokens",
        "discarded_tokens",
        "max_completion_tokens",
        "num_tokens",
        "keys",
        "cache_keys",
        "signature_method",
        "auth",  # stella's `started` event: the auth mode
        "auth_scheme",
        "oauth_flow",
    ],
)
def test_field_names_that_do_not_hold_credentials_are_kept(name: str) -> None:
    assert not logs.is_secret_field(name)


def test_the_counts_of_an_inference_line_are_not_masked() -> None:
    out = io.BytesIO()
    sink = logs.LogSink(stream=out)
    counts = {"prompt_tokens": 7, "completion_tokens": 9, "tokens_per_s": 12.5}
    metadata = {"max_tokens": 64, "total_tokens": 16, "auth": "keys"}
    sink.emit("inference", {**counts, "metadata": metadata})
    sink.put({"event": "started", "auth": "keys"})
    sink.close()
    inference, started = (json.loads(line) for line in out.getvalue().splitlines())
    assert {k: inference[k] for k in counts} == counts and inference["metadata"] == metadata
    assert started["auth"] == "keys"


def test_the_usage_counts_a_client_puts_in_its_metadata_are_not_masked() -> None:
    # Plural names that hold credentials are masked (`refresh_tokens`), counts are not.
    out = io.BytesIO()
    sink = logs.LogSink(stream=out)
    usage = {"prompt_tokens": 7, "completion_tokens": 9, "tokens": 16, "cached_tokens": 2}
    sink.emit("inference", {"metadata": {"usage": usage, "refresh_tokens": ["rt-1", "rt-2"]}})
    sink.close()
    metadata = json.loads(out.getvalue())["metadata"]
    assert metadata == {"usage": usage, "refresh_tokens": "***"}


def test_a_urls_credentials_in_text_are_masked() -> None:
    # A connection string or a webhook in a client's metadata (or its prompt, a model's
    # answer, an upstream's error): the user info and secret parameters go.
    texts = {
        "dsn": "postgres://u:PW1@h/db",
        "slash": "redis://:p/PW2@h:6379/0",
        "user": "clone https://PW3@github.com/o/r.git, then",
        "hook": "https://h/x?token=PW4&q=1",
        "google": "https://h/v1?key=PW5#top",
        "sas": "https://a.blob/c?sv=2020&sig=PW6&se=1",
        "s3": "https://s3/o?X-Amz-Credential=PW7&X-Amz-Signature=PW8&X-Amz-Date=1",
        "quoted": "url='https://u:PW9@h/' ok",
        "plain": "https://example.com/search?q=tokens&page=2 and a@b.com",
        # An `@` past the host is no user info: the text around it stays.
        "cjk": "请访问https://example.com/页面，然后发邮件给我bob@example.com",
        "pip": "pip install git+https://github.com/org/repo@v1.2",
        "comma": "see https://example.com/docs,mail_me_at_bob@corp.com",
        "port": "https://example.com:8080/a@b",
        "at": "postgres://u:p@PW10@h/db",  # a password with an @: up to the last one goes
        "encoded": "https://h/x?api%5Fkey=PW11&q=1",  # the name percent-encoded
        "semicolon": "https://h/x?a=1;token=PW12",
        "fragment": "https://app/cb#access_token=PW13&state=1",  # OAuth's implicit flow
        # A URL ends at a quote and at white space (a line break), an address after it
        # is no URL's user info.
        "listed": "['https://h/a','bob@x.com']",
        "next": "https://h/status\nbob@x.com wrote",
    }
    out = io.BytesIO()
    sink = logs.LogSink(stream=out)
    sink.emit("inference", {"metadata": dict(texts), "completion": texts["dsn"]})
    sink.close()
    text = out.getvalue().decode()
    assert "PW" not in text
    event = json.loads(text)
    expected = {
        "dsn": "postgres://***@h/db",
        "slash": "redis://***@h:6379/0",
        "user": "clone https://***@github.com/o/r.git, then",
        "hook": "https://h/x?token=***&q=1",
        "google": "https://h/v1?key=***#top",
        "sas": "https://a.blob/c?sv=2020&sig=***&se=1",
        "s3": "https://s3/o?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1",
        "quoted": "url='https://***@h/' ok",
        "plain": "https://example.com/search?q=tokens&page=2 and a@b.com",
        "cjk": texts["cjk"],
        "pip": texts["pip"],
        "comma": texts["comma"],
        "port": texts["port"],
        "at": "postgres://***@h/db",
        "encoded": "https://h/x?api%5Fkey=***&q=1",
        "semicolon": "https://h/x?a=1;token=***",
        "fragment": "https://app/cb#access_token=***&state=1",
        "listed": "['https://h/a','bob@x.com']",
        "next": "https://h/status\nbob@x.com wrote",
    }
    assert event["metadata"] == expected
    assert event["completion"] == expected["dsn"]
    # An upstream's error text that reaches a client is masked the same way.
    assert {k: logs.mask(v) for k, v in texts.items()} == expected
    # A line with a URL and no other sign of one (no @) is looked at all the same.
    out = io.BytesIO()
    sink = logs.LogSink(stream=out)
    sink.put({"event": "x", "msg": texts["hook"]})
    sink.close()
    assert json.loads(out.getvalue())["msg"] == expected["hook"]


def test_an_authorization_header_in_text_is_masked_whatever_its_scheme() -> None:
    # A client quotes a header in its metadata or its prompt, a model in its answer:
    # the scheme word stays (it says what was there), the credential goes.
    basic = "dXNlcjpwYXNzd29yZA=="  # user:password
    out = io.BytesIO()
    sink = logs.LogSink(stream=out)
    sink.emit(
        "inference",
        {
            "metadata": {
                "basic": f"Authorization: Basic {basic}",
                "github": "authorization: token ghp_abc123XYZ",
                "proxy": "Proxy-Authorization: Digest d1g3st-value",
                "bare": "Authorization:no-space-tok-1",
                "json": '{"Authorization": "sk-in-json-1", "other": 1}',
                "header": "AUTHORIZATION=sk-in-query-1",
                "alone": f"then Basic {basic} again",
                "prose": "a basic idea, Basic arithmetic, and Authorization: Bearer <key>",
                "authorization": None,
                "aws": "Authorization: AWS4-HMAC-SHA256 Credential=AKIAEX1/20250101/s3/"
                "aws4_request, SignedHeaders=host, Signature=fe5f80sig1",
                "digest": 'Authorization: Digest username="bob", response="6629resp1", then',
                "tab": "Authorization: Bearer\ttab-tok-1 and Bearer\ttab-tok-2",
                # No scheme: the key is the credential, not a scheme for the next word.
                "schemeless": "Authorization: sk-12ab34cd56 is not valid",
                "hex": "Authorization: key-3ax6xnjp29jd6 was refused",
                # A known scheme with a dash; one stella does not know goes with the key.
                "dashed": "Authorization: Api-Key AbCd1234.s3cr3tKEY",
                "unknown": "Authorization: Klaviyo-API-Key pk_abc123",
                "sigv4": "Authorization: AWS4-HMAC-SHA256 Credential=AKIAEX2/s3/aws4_request, "
                "SignedHeaders=host;range;x-amz-date, Signature=sigv4sig1",
                # A header on its own line of a pasted request (`\n` in the line).
                "pasted": "GET / HTTP/1.1\nAuthorization: token ghp_pasted1\nBearer sk-nl-1",
            },
            "prompt": [{"role": "user", "content": "Authorization: ApiKey sk-in-prompt-1"}],
            "completion": "sent with Authorization: token sk-in-answer-1\nthen",
        },
    )
    sink.put({"event": "x", "msg": "Authorization:sk-in-other-event"})  # no space at all
    sink.put({"event": "x", "msg": "Bearer\tsk-tab-only"})  # an escaped tab, no space
    sink.close()
    text = out.getvalue().decode()
    for secret in (
        basic,
        "ghp_",
        "d1g3st",
        "no-space",
        "sk-",
        "AKIAEX",
        "sig1",
        "bob",
        "3ax6",
        "s3cr3t",
        "pk_",
    ):
        assert secret not in text
    inference, other, tab = (json.loads(line) for line in text.splitlines())  # still JSON
    assert inference["metadata"] == {
        "basic": "Authorization: Basic ***",
        "github": "authorization: token ***",
        "proxy": "Proxy-Authorization: Digest ***",
        "bare": "Authorization:***",
        "json": '{"Authorization": "***", "other": 1}',
        "header": "AUTHORIZATION=***",
        "alone": "then Basic *** again",
        "prose": "a basic idea, Basic arithmetic, and Authorization: Bearer <key>",
        "authorization": None,
        # A scheme with parameters: all of them (the signature is one).
        "aws": "Authorization: AWS4-HMAC-SHA256 ***",
        "digest": "Authorization: Digest ***, then",
        "tab": "Authorization: Bearer\t*** and Bearer ***",
        "schemeless": "Authorization: *** is not valid",
        "hex": "Authorization: *** was refused",
        "dashed": "Authorization: Api-Key ***",
        "unknown": "Authorization: ***",
        "sigv4": "Authorization: AWS4-HMAC-SHA256 ***",
        "pasted": "GET / HTTP/1.1\nAuthorization: token ***\nBearer ***",
    }
    assert inference["prompt"][0]["content"] == "Authorization: ApiKey ***"
    assert inference["completion"] == "sent with Authorization: token ***\nthen"
    assert other["msg"] == "Authorization:***"
    assert tab["msg"] == "Bearer ***"
    assert logs.mask("Authorization: sk-12ab34cd56 is not valid") == (
        "Authorization: *** is not valid"
    )
    # An upstream's error text that reaches a client is masked the same way.
    said = f"refused 'Authorization: token ghp_x1' and Basic {basic}"
    assert logs.mask(said) == "refused 'Authorization: token ***' and Basic ***"
    digest = 'Authorization: Digest username="u", nonce="n", response="r1"'
    assert logs.mask(digest) == "Authorization: Digest ***"


def test_a_bearer_token_is_masked_whole() -> None:
    token = "sk-stella-Ab3_x.y~z+w/v=="
    out = io.BytesIO()
    sink = logs.LogSink(stream=out)
    sink.put({"event": "x", "note": f"upstream said: Bearer {token} is invalid"})
    sink.close()
    text = out.getvalue().decode()
    assert "Ab3" not in text and "y~z" not in text and "w/v" not in text
    assert json.loads(text)["note"] == "upstream said: Bearer *** is invalid"
    assert logs.mask(f"Bearer {token}!") == "Bearer ***!"


# Every character `\s` matches in text: mask() takes any of them after a scheme word.
WHITE_SPACE = [chr(c) for c in range(0x3001) if chr(c).isspace() and chr(c) != "\x00"]


@pytest.mark.parametrize(
    "text",
    [
        "Bearer\nTOK123",
        "Bearer\r\n  TOK123",
        "x\fBearer TOK123",
        "x\bBearer TOK123",
        "x\x1bBearer TOK123",
        "x\x0bBearer\x0b\u3000TOK123",
        "Bearer\u00a0TOK123",
        "Authorization: Bearer\nTOK123",
        "Authorization:\nTOK123",
        "Authorization:\r\nBearer TOK123",
        "Proxy-Authorization:\tBearer\n\tTOK123",
        "x\fAuthorization: TOK123",
        'Authorization: Digest username="u",\n response="TOK123"',
        "Basic\ndXNlcjpUT0sxMjM=",  # user:TOK123
        *(f"a{c}Bearer{c}TOK123" for c in WHITE_SPACE),
        *(f"{chr(c)}Bearer TOK123" for c in range(0x20)),
    ],
)
def test_a_credential_after_white_space_is_masked_in_lines_as_in_text(text: str) -> None:
    # A line masks what mask() masks, though the line holds a line break as `\n`, a
    # control character as `\u001b` and a Unicode space as its UTF-8.
    masked = logs.mask(text)
    assert "TOK123" not in masked and "dXNlcjpUT0sxMjM" not in masked
    out = io.BytesIO()
    sink = logs.LogSink(stream=out)
    sink.emit("inference", {"metadata": {"n": text}})
    sink.put({"event": "x", "msg": text})
    sink.close()
    for line in out.getvalue().splitlines():
        event = json.loads(line)
        assert (event["metadata"]["n"] if "metadata" in event else event["msg"]) == masked


@pytest.mark.parametrize(
    "text", ["forbearer TOK123", "unbasic dXNlcjpUT0sxMjM=", "xauthorization: TOK123"]
)
def test_a_scheme_word_inside_another_word_is_kept_in_lines_as_in_text(text: str) -> None:
    # A line's patterns look for the start of the word as `\b` does in mask(): the end
    # of another word is no scheme.
    assert logs.mask(text) == text
    out = io.BytesIO()
    sink = logs.LogSink(stream=out)
    sink.put({"event": "x", "msg": text})
    sink.close()
    assert json.loads(out.getvalue())["msg"] == text


# Pieces of encoded lines: the words the masking looks for, in any case and company.
PIECES = [
    *("Authorization", "authorization", "AUTHORIZATION", "Proxy-Authorization"),
    *("proxy-authorization", "xauthorization", "Authorizationauthorization", "uthorization"),
    *("Bearer", "bearer", "BEARER", "xBearer", "Basic", "basic", "BASIC", "dXNlcjpwYXNz"),
    *("aGVsbG8=", "abc.def", "token", "sk-1234", "Digest", 'username=\\"u\\"', "realm=r"),
    *(": ", ":", "=", '\\"', "'", " ", "  ", "\\n", "\\t", "\\u001b", ",", ";", "\u00a0"),
    *("\u2028", "é", "x", "-", "/", "+"),
]


def test_the_masking_of_a_line_is_the_regex_engines_own() -> None:
    # The patterns are tried only where the words they start with are: what they mask
    # is what substituting them over the whole line masks.
    def by_regex(line: bytes) -> bytes:
        line = logs.AUTH_HEADER_BYTES.sub(rb"\1\2***", line)
        line = logs.BEARER_BYTES.sub(rb"\1 ***", line)
        return logs.BASIC_BYTES.sub(logs._basic_bytes, line)

    rng = random.Random(7)
    masked = 0
    for _ in range(20_000):
        line = "".join(rng.choices(PIECES, k=rng.randint(1, 24))).encode()
        expected = by_regex(line)
        assert logs._mask_schemes(line, line.lower()) == expected, line
        masked += expected != line
    assert masked > 1000  # the pieces do make credentials to mask


def test_a_long_line_is_masked_by_trying_its_patterns_only_where_their_words_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Not the regex engine stepping through each of its bytes: with log.content a line
    # holds a whole conversation, and the loop waits while any one call holds the GIL.
    # So the patterns are only ever matched at a few places, never run over the line.
    text = b"def handler(request):\\n    return render(request, 'index.html')  # ok\\n"
    line = text * 3_000 + b" Authorization: Bearer abc.def basic idea " + text * 3_000
    tries: list[int] = []

    class Counted:
        def __init__(self, pattern: re.Pattern[bytes]) -> None:
            self.pattern = pattern

        def match(self, string: bytes, pos: int = 0) -> re.Match[bytes] | None:
            tries.append(pos)
            return self.pattern.match(string, pos)

        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the pattern's {name} runs over the whole line")

    for name in ("AUTH_HEADER_BYTES", "BEARER_BYTES", "BASIC_BYTES"):
        monkeypatch.setattr(logs, name, Counted(getattr(logs, name)))
    masked = logs._mask_schemes(line, line.lower())
    assert masked.count(b"***") == 1 and b"abc.def" not in masked
    assert 0 < len(tries) <= 6  # two places for the header's word, one for each other


def test_a_configured_authorization_header_is_masked_without_its_scheme() -> None:
    from stella.settings import load_settings, secret_values

    settings = load_settings(
        {
            "backends": {
                "up": {
                    "kind": "openai",
                    "base_url": "http://127.0.0.1:9",
                    "headers": {"Authorization": "Bearer tok-in-config-123"},
                }
            }
        },
        environ={},
    )
    secrets = secret_values(settings)
    assert "tok-in-config-123" in secrets
    # A password in a backend's base_url (sent as Basic auth) is one too.
    with_user = load_settings(
        {"backends": {"up": {"kind": "openai", "base_url": "http://bob:pw%2Fin-url-77@h:9/v1"}}},
        environ={},
    )
    assert "pw/in-url-77" in secret_values(with_user)
    out = io.BytesIO()
    sink = logs.LogSink(stream=out, secrets=secrets)
    sink.put({"event": "x", "note": "rejected tok-in-config-123"})
    sink.close()
    assert "tok-in-config-123" not in out.getvalue().decode()


def test_tokens_of_a_non_stream_attempt_that_failed_are_still_counted(stella: LiveServer) -> None:
    # Each attempt makes three tokens, then fails; a non-stream answer starts over, so
    # the client sees none of them, but they were made: the log and the limits count them.
    rid = "discarded-tokens-1"
    body = {"model": "echo-fail-after", "stream": False}
    body["messages"] = [{"role": "user", "content": "a b c d e"}]
    r = httpx.post(stella.url + "/api/v1/chat", json=body, headers={"X-Request-ID": rid})
    assert r.status_code == 502
    ev = stella.wait_event(lambda e: e["request_id"] == rid)
    assert len(ev["attempts"]) >= 2
    assert ev["discarded_tokens"] == 3 * len(ev["attempts"])
    assert ev["completion_tokens"] == ev["discarded_tokens"]


def test_a_non_blocking_stdout_is_made_blocking() -> None:
    # A pipe a parent shares non-blocking would take part of a batch and leave the rest
    # in the buffer, to be torn into the next line.
    import os

    r, w = os.pipe()
    os.set_blocking(w, False)
    with os.fdopen(w, "wb") as out, os.fdopen(r, "rb"):
        sink = logs.LogSink(stream=out)
        assert os.get_blocking(w)
        sink.close()


def test_an_audit_file_locked_for_good_is_a_counted_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process holds the file's lock and never lets go: the batch is a failed
    # write after LOCK_WAIT_S (counted, reported), not a writer stuck with its lines.
    import fcntl

    monkeypatch.setattr(logs, "LOCK_WAIT_S", 0.2)
    audit = tmp_path / "audit.jsonl"
    sink = logs.LogSink(stream=io.BytesIO(), audit_path=str(audit))
    sink.emit("inference", {"n": 1})
    assert sink.flush()
    with audit.open("ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        sink.emit("inference", {"n": 2})
        assert sink.flush(5.0)
        assert sink.counts()["audit"] == (1, 1)
    sink.emit("inference", {"n": 3})
    assert sink.close()
    assert [json.loads(line)["n"] for line in audit.read_text().splitlines()] == [1, 3]


def test_a_line_an_earlier_process_left_cut_short_does_not_swallow_the_next(
    tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.jsonl"
    audit.write_bytes(b'{"n":0}\n{"n":1,"cut sh')  # a process died in the middle of a line
    sink = logs.LogSink(stream=io.BytesIO(), audit_path=str(audit))
    sink.emit("inference", {"n": 2})
    assert sink.close()
    lines = audit.read_bytes().splitlines()
    assert lines[0] == b'{"n":0}' and lines[1] == b'{"n":1,"cut sh'
    assert json.loads(lines[2])["n"] == 2 and len(lines) == 3


def test_the_logged_status_is_the_one_the_clients_api_gave(stella: LiveServer) -> None:
    # The same overload is a 503 in most APIs and a 529 in Anthropic's: the log and
    # stella_requests_total say what each client got, streamed or not.
    from tests.test_metrics import scrape, value

    before = scrape(stella)
    msgs = [{"role": "user", "content": "a b"}]
    asks = [
        ("/api/v1/chat", {"stream": False}, 503),
        ("/v1/chat/completions", {"stream": True}, 503),
        ("/api/chat", {"stream": False}, 503),
        ("/v1/messages", {"stream": False, "max_tokens": 5}, 529),
        ("/v1/messages", {"stream": True, "max_tokens": 5}, 529),
    ]
    for n, (path, extra, status) in enumerate(asks):
        rid = f"api-status-{n}"
        body = {"model": "echo-overloaded", "messages": msgs, **extra}
        r = httpx.post(stella.url + path, json=body, headers={"X-Request-ID": rid})
        assert r.status_code == status, (path, r.text)
        ev = stella.wait_event(lambda e, rid=rid: e["request_id"] == rid)
        assert (ev["status"], ev["error_code"]) == (status, "overloaded"), path
    after = scrape(stella)
    label = 'stella_requests_total{api="anthropic",backend="overloaded",model="echo-overloaded",'
    assert value(after, label + 'status="529"}') - value(before, label + 'status="529"}') == 2
    assert value(after, label + 'status="503"}') == 0


def test_each_admin_routing_change_is_one_event_with_its_outcome() -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    with run_stella(env={"STELLA_API_KEYS": f"ops={KEY}"}) as server:
        url = server.url + "/api/v1/models"
        calls = [
            ("post", url, {"name": "rt", "backend": "echo", "aliases": ["rt-a"]}, 201),
            ("post", url, {"name": "rt2", "backend": "echo", "aliases": ["rt-a"]}, 409),
            ("post", url, {"name": "a/../b", "backend": "echo"}, 400),
            ("post", url + "/switch/rt-a", None, 200),
            ("delete", url + "/rt", None, 409),  # the default
            ("post", url + "/switch/echo", None, 200),
            ("delete", url + "/rt-a", None, 200),
            ("delete", url + "/nope", None, 404),
            ("post", url, {"name": "rt3", "backend": "echo", "fallbacks": ["echo", "echo"]}, 400),
        ]
        rids = []
        for method, target, body, status in calls:
            r = httpx.request(method, target, json=body, headers=auth)
            assert r.status_code == status, (target, r.text)
            rids.append(r.headers["x-request-id"])
        deadline = time.monotonic() + 5
        while len(server.events("routing_change")) < len(calls):
            assert time.monotonic() < deadline, server.events("routing_change")
            time.sleep(0.05)
        got = [
            (e["action"], e["name"], e["route"], e["result"], e["key"], e["request_id"])
            for e in server.events("routing_change")
        ]
        assert got == [
            ("register", "rt", "rt", "ok", "ops", rids[0]),
            ("register", "rt2", None, "conflict", "ops", rids[1]),
            ("register", None, None, "invalid_request", "ops", rids[2]),
            ("switch", "rt-a", "rt", "ok", "ops", rids[3]),
            ("delete", "rt", None, "conflict", "ops", rids[4]),
            ("switch", "echo", "echo", "ok", "ops", rids[5]),
            ("delete", "rt-a", "rt", "ok", "ops", rids[6]),
            ("delete", "nope", None, "model_not_found", "ops", rids[7]),
            ("register", "rt3", None, "invalid_request", "ops", rids[8]),  # its body was read
        ]
        assert KEY not in "\n".join(server.lines())


def test_workers_on_one_stdout_pipe_never_tear_each_others_lines(tmp_path: Path) -> None:
    """`stella serve --workers 2 | slow reader`: lines of tens of KB (log.content), more
    than a pipe holds, and two workers writing at once; every line arrives whole."""
    config = {"server": {"workers": 2}, "log": {"content": True}}
    out = bytearray()

    def read_slowly(pipe: Any) -> None:
        # A page at a time, with a pause: each worker's write blocks part-way through a
        # line while the pipe is full, and the other's is waiting too.
        while chunk := os.read(pipe.fileno(), 4096):
            out.extend(chunk)
            time.sleep(0.001)

    clients, each = 8, 6
    statuses: list[int] = []  # an assert in a thread would only warn
    with run_stella(config, stdout=subprocess.PIPE) as server:
        assert server.proc.stdout is not None
        reader = threading.Thread(target=read_slowly, args=(server.proc.stdout,), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 60
            while bytes(out).count(b'"event":"started"') < 2:
                assert server.proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)

            def chat(n: int) -> None:
                text = f"client {n} " + "lorem ipsum " * 3000  # ~36 KB, twice in the line
                body = {
                    "model": "echo",
                    "stream": False,
                    "messages": [{"role": "user", "content": text}],
                }
                # One connection, one worker.
                with httpx.Client(base_url=server.url, timeout=30) as client:
                    for _ in range(each):
                        statuses.append(client.post("/api/v1/chat", json=body).status_code)

            threads = [threading.Thread(target=chat, args=(n,)) for n in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert statuses == [200] * clients * each
            assert server.stop() == 0
            reader.join(30)
        finally:
            server.stop()
            server.proc.stdout.close()
    bad, events = [], []
    for line in bytes(out).splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            bad.append(line[:80])
    assert not bad, f"{len(bad)} torn lines: {bad[:3]}"
    inferences = [e for e in events if e["event"] == "inference"]
    assert len(inferences) == clients * each
    assert len({e["pid"] for e in events if e["event"] == "started"}) == 2


def test_a_line_a_killed_worker_left_cut_short_on_stdout_ends_before_the_next(
    tmp_path: Path,
) -> None:
    # A worker is killed half-way through a line longer than the pipe holds (its reader
    # was slow): the next process to write ends that line first, so its own is whole.
    import fcntl
    import termios

    lock = tmp_path / "stdout.lock"
    lock.write_bytes(b"")
    r, w = os.pipe()
    script = f"""
from stella import logs
sink = logs.LogSink(stdout_lock={str(lock)!r})
sink.emit("inference", {{"n": 1, "prompt": "x" * 200_000}})
sink.flush(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=w)
    try:
        deadline = time.monotonic() + 30
        size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        while int.from_bytes(fcntl.ioctl(r, termios.FIONREAD, b"\0" * 4), sys.byteorder) < size:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.kill()  # the pipe is full: the write blocked in the middle of the line
        proc.wait(10)
        cut = b""
        os.set_blocking(r, False)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(r, 65536):
                cut += chunk
        assert cut.startswith(b'{"n":1') and b"\n" not in cut
        with os.fdopen(w, "wb") as out:
            sink = logs.LogSink(stream=out, stdout_lock=str(lock))
            sink.emit("inference", {"n": 2})
            assert sink.close()
        os.set_blocking(r, True)
        rest = b""
        while chunk := os.read(r, 65536):
            rest += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(r)
    assert rest.startswith(b"\n")
    assert json.loads(rest.splitlines()[1])["n"] == 2


def test_the_workers_stdout_lock_needs_no_directory_and_leaves_nothing(tmp_path: Path) -> None:
    # It was a file in a temporary directory: a server with no writable one could not
    # start its workers, and a supervisor killed outright left the directory behind.
    temp = tmp_path / "temp"
    temp.mkdir()
    with run_stella({"server": {"workers": 2}}, {"TMPDIR": str(temp)}) as server:
        proc = server.proc
        workers = [
            int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ]
        assert workers
        for pid in workers:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            lock = next(v for v in environ if v.startswith(b"STELLA_STDOUT_LOCK="))
            assert lock.split(b"=", 1)[1].startswith(b"/proc/")
        proc.kill()  # no cleanup runs: nothing may be left to clean
        proc.wait(10)
        deadline = time.monotonic() + 30  # the workers drain and go with it
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert list(temp.iterdir()) == []


def test_lines_queued_at_exit_are_written_before_it() -> None:
    # A warning logged just before a failed start's exit (a port in use) was still on
    # the writer thread's queue: lost, or written while the interpreter tore stdout
    # down ("Fatal Python error: _enter_buffered_busy", an abort).
    script = (
        "import sys, structlog\n"
        "from stella import logs\n"
        "logs.configure(fmt='json')\n"
        "log = structlog.get_logger('stella')\n"
        "for i in range(3000): log.warning('queued', i=i, pad='x' * 200)\n"
        "sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 3, done.stderr[-500:]
    lines = done.stdout.splitlines()
    assert len(lines) == 3000 and json.loads(lines[-1])["i"] == 2999
