"""Logs: one JSON inference event, the audit file, content only on request, no secrets."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import httpx
import pytest

from stella import logs
from tests.live import LiveServer, run_stella

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
    sink.close()
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["request_id"] for r in rows] == ["r1", "r2"]
    assert all(r["status"] == 200 and "metadata" not in r for r in rows)
    assert rows[0]["log_error"] == "not rendered whole: ValueError"
    assert rows[1]["log_error"] == "not rendered whole: RecursionError"
    assert [json.loads(line)["request_id"] for line in audit.read_text().splitlines()] == [
        "r1",
        "r2",
    ]


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
    ],
)
def test_field_names_that_hold_credentials_are_masked(name: str) -> None:
    assert logs.is_secret_field(name)
    out = io.BytesIO()
    sink = logs.LogSink(stream=out)
    sink.emit("inference", {"metadata": {name: "hunter2-value"}})
    sink.close()
    assert "hunter2-value" not in out.getvalue().decode()


@pytest.mark.parametrize("name", ["key", "idempotency_key", "max_tokens", "primary_key", "tokens"])
def test_field_names_that_do_not_hold_credentials_are_kept(name: str) -> None:
    assert not logs.is_secret_field(name)


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
