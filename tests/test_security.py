"""Access control end to end: every route needs a key, scopes hold, secrets never leak."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Mount, Route

from stella.app import create_app
from stella.settings import load_settings, origin
from tests.fakes.server import serve
from tests.live import install_plugin, merge, run_stella, stella_without_stdin

ADMIN = "sk-sec-admin-000111"
NARROW = "sk-sec-narrow-000222"
UPSTREAM_SECRET = "sk-upstream-secret-999"
PUBLIC = {
    "/health",
    "/ready",
    "/playground",
    "/api/version",
    "/api/llm/health",
    "/v1/health",
    "/docs",
    "/openapi.json",
    "/",
}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


CONFIG = {
    "auth": {"keys": {"narrow": {"sha256": sha(NARROW), "models": ["echo"]}}},
    "backends": {
        "paid": {
            "kind": "openai",
            "base_url": "http://127.0.0.1:9/v1",
            "api_key_env": "PAID_KEY",
            "connect_timeout_s": 0.5,
        }
    },
    "models": {"routes": {"paid-model": {"backend": "paid", "retries": 0}}},
    # The second as a user may write it: browsers send `https://caps.example:8443`.
    "cors": {"allowed_origins": ["https://app.example", "https://Caps.Example:8443/"]},
    "server": {"max_body_bytes": 2048},
}


def all_routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves, found by walking its routes."""
    app = create_app(
        load_settings(
            {"models": {"default": "echo"}, "backends": {"local": {"enabled": False}}}, environ={}
        )
    )
    out = []
    for r in app.router.routes:
        if isinstance(r, Route):
            for method in sorted((r.methods or {"GET"}) - {"HEAD"}):
                out.append(
                    (
                        method,
                        r.path.replace("{name:path}", "echo")
                        .replace("{model:path}", "echo")
                        .replace("{name}", "echo"),
                    )
                )
        elif isinstance(r, Mount):
            out.append(("GET", r.path + "/stella.js"))
    return out


def test_every_route_needs_a_key_and_nothing_leaks() -> None:
    env = {"STELLA_API_KEYS": f"admin={ADMIN}", "PAID_KEY": UPSTREAM_SECRET}
    with run_stella(CONFIG, env) as server:
        routes = all_routes()
        assert len(routes) > 25
        seen = []
        for method, path in routes:
            r = httpx.request(
                method,
                server.url + path,
                json={"messages": [{"role": "user", "content": "x"}]},
                timeout=10,
            )
            seen.append(r.text)
            if path in PUBLIC or path.startswith("/static"):
                assert r.status_code != 401, (method, path)
            else:
                assert r.status_code == 401, (method, path, r.status_code)
        # With the admin key, exercise every route once more, including a failing upstream.
        for method, path in routes:
            r = httpx.request(
                method,
                server.url + path,
                headers={"Authorization": f"Bearer {ADMIN}"},
                json={"model": "echo", "messages": [{"role": "user", "content": "x"}]},
                timeout=10,
            )
            assert r.status_code < 500 or path in ("/api/v1/chat",), (method, path, r.status_code)
            seen.append(r.text)
        r = httpx.post(
            server.url + "/api/v1/chat",
            headers={"X-API-Key": ADMIN},
            json={
                "model": "paid-model",
                "stream": False,
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        assert r.status_code == 502
        seen.append(r.text)
        # A key limited to one model gets 403 elsewhere.
        r = httpx.post(
            server.url + "/api/v1/chat",
            headers={"Authorization": f"Bearer {NARROW}"},
            json={"model": "paid-model", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = httpx.post(
            server.url + "/api/v1/models/switch/echo", headers={"Authorization": f"Bearer {NARROW}"}
        )
        assert r.status_code == 403
        # The metrics name every model and its traffic: not for a key limited to some.
        r = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {NARROW}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        seen.append(
            httpx.get(server.url + "/config", headers={"Authorization": f"Bearer {ADMIN}"}).text
        )
        seen.append(
            httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        )
        server.stop()
        everything = "\n".join(seen + server.lines())
    for secret in (ADMIN, NARROW, UPSTREAM_SECRET, sha(ADMIN), sha(NARROW)):
        assert secret not in everything, secret
    assert "Bearer sk-" not in everything


@pytest.mark.parametrize(
    ("configured", "sent"),
    [
        ("https://App.example:443/", "https://app.example"),  # browsers omit default ports
        ("http://app.example:80", "http://app.example"),
        ("https://app.example:80", "https://app.example:80"),  # not https's default
        ("http://app.example:8080", "http://app.example:8080"),
        ("*", "*"),
    ],
)
def test_a_configured_origin_reads_as_browsers_send_it(configured: str, sent: str) -> None:
    assert origin(configured) == sent


def test_cors_allows_the_configured_origin_only() -> None:
    with run_stella(CONFIG, {"STELLA_API_KEYS": ADMIN}) as server:
        pre = httpx.options(
            server.url + "/api/v1/chat",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        caps = {"Origin": "https://caps.example:8443", "Access-Control-Request-Method": "POST"}
        pre = httpx.options(server.url + "/api/v1/chat", headers=caps)
        assert pre.status_code == 200, pre.text
        assert pre.headers["access-control-allow-origin"] == "https://caps.example:8443"
        # Every answer has its request ID, a preflight's too (the client's when well formed).
        assert pre.headers["x-request-id"].startswith("req_")
        pre = httpx.options(server.url + "/api/v1/chat", headers={**caps, "X-Request-ID": "pf-1"})
        assert pre.headers["x-request-id"] == "pf-1"
        # What the official browser SDKs ask to send.
        sdk = "content-type,anthropic-version,anthropic-dangerous-direct-browser-access,x-stainless-os"
        pre = httpx.options(
            server.url + "/v1/messages",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": sdk,
            },
        )
        assert pre.status_code == 200, pre.text
        r = httpx.post(
            server.url + "/api/v1/chat",
            headers={"Origin": "https://app.example", "Authorization": f"Bearer {ADMIN}"},
            json={"model": "echo", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        exposed = {h.strip() for h in r.headers["access-control-expose-headers"].lower().split(",")}
        # request-id: where the Anthropic SDK reads a response's ID (in a browser too);
        # x-should-retry: whether the OpenAI and Anthropic SDKs send a failure again.
        assert {"x-request-id", "request-id", "retry-after", "x-should-retry"} <= exposed
        bad = httpx.options(
            server.url + "/api/v1/chat",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert bad.status_code == 400
        assert "access-control-allow-origin" not in bad.headers
        assert bad.headers["x-request-id"].startswith("req_")
        # In stella's error shape, as every other refusal (Starlette's was plain text).
        assert bad.headers["content-type"] == "application/json"
        assert bad.headers["x-content-type-options"] == "nosniff"
        error = bad.json()["error"]
        assert error["code"] == "invalid_request" and error["retryable"] is False, error
        assert error["request_id"] == bad.headers["x-request-id"]
        assert "'https://evil.example' is not one of cors.allowed_origins" in error["message"]
        bad = httpx.options(
            server.url + "/api/v1/chat",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "PUT"},
        )
        assert bad.status_code == 400 and "'PUT' is not one of" in bad.json()["error"]["message"]
        assert bad.headers["access-control-allow-origin"] == "https://app.example"


def test_oversized_body_is_413() -> None:
    with run_stella(CONFIG, {"STELLA_API_KEYS": ADMIN}) as server:
        r = httpx.post(
            server.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {ADMIN}"},
            json={"model": "echo", "messages": [{"role": "user", "content": "x" * 4000}]},
        )
        assert r.status_code == 413


def test_no_keys_on_a_public_address_refuses_to_start() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "STELLA_MODELS__DEFAULT": "echo",
        "STELLA_BACKENDS__LOCAL__ENABLED": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "stella", "serve", "--host", "0.0.0.0", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "allow_anonymous" in proc.stderr


def test_quick_start_keys_keep_their_equals_signs() -> None:
    from stella.auth import Authenticator
    from stella.backends import ConfigError

    settings = load_settings({"models": {"default": "echo"}}, environ={})
    b64 = "Zm9vYmFyYmF6cXV4MTIz4A=="

    def who(raw: str, key: str) -> tuple[str, bool]:
        auth = Authenticator(settings, {"STELLA_API_KEYS": raw})
        try:
            p = auth.authenticate([(b"authorization", b"Bearer " + key.encode())])
        except Exception as exc:
            return type(exc).__name__, False
        return p.name, p.admin

    # A base64 key is one key, not the name "Zm9v..." for the key "==".
    assert who(b64, b64) == ("env-1", True)
    assert who(b64, "==")[0] == "Unauthorized" and who(b64, "=")[0] == "Unauthorized"
    assert who(f"alice={b64},{ADMIN}", b64) == ("alice", True)
    assert who(f"alice={b64},{ADMIN}", ADMIN) == ("env-2", True)
    assert who(f" bob = {ADMIN} ", ADMIN) == ("bob", True)
    for raw in ("short", "alice=short", "alice=secret123", "=", "x=="):
        with pytest.raises(ConfigError, match="shorter than 12"):
            Authenticator(settings, {"STELLA_API_KEYS": raw})
    # A name that is not one is said so, not read as a part of the key.
    for raw in (f"ci bot={ADMIN}", f"a/b={ADMIN}", f"{'n' * 70}={ADMIN}"):
        with pytest.raises(ConfigError, match="not name=key"):
            Authenticator(settings, {"STELLA_API_KEYS": raw})


def test_an_origin_configured_with_its_default_port_is_the_one_browsers_send() -> None:
    # Browsers leave https's :443 out of Origin: the origin configured with it is allowed
    # by CORS and trusted by the key-less Origin guard as browsers send it.
    with run_stella({"cors": {"allowed_origins": ["https://app.example:443"]}}) as server:
        sent = {"Origin": "https://app.example"}
        pre = httpx.options(
            server.url + "/v1/chat/completions",
            headers={**sent, "Access-Control-Request-Method": "POST"},
        )
        assert pre.status_code == 200, pre.text
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(server.url + "/v1/chat/completions", headers=sent, json=chat)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_without_keys_other_sites_pages_are_not_trusted_as_the_local_caller() -> None:
    # The loopback rule trusts this machine's clients. A page on another site reaches a
    # key-less server through the user's browser too: "simple" cross-site requests
    # (no preflight: a POST without body, text/plain JSON) carry that site's Origin,
    # and a page whose own name was rebound to 127.0.0.1 sends that name as its Host.
    config = {
        "cors": {"allowed_origins": ["https://app.example"]},
        "server": {"allowed_hosts": ["Stella.LAN"], "public_url": "https://llm.example.com/"},
        "backends": {"two": {"kind": "echo"}},
        "models": {"routes": {"echo-two": {"backend": "two"}}},
    }
    with run_stella(config) as server:
        url, port = server.url, server.port
        chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}

        def default() -> str:
            return httpx.get(url + "/api/v1/models").json()["default"]

        # DNS rebinding: the page's own name in Host, read by every route needing trust,
        # each dialect answering in its own shape.
        rebound = {"Host": f"attacker.example:{port}"}
        r = httpx.get(url + "/config", headers=rebound)
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert err["code"] == "forbidden" and "server.allowed_hosts" in err["message"]
        # Logged as a refused call, by what refused it (no key is involved).
        rid = r.headers["x-request-id"]
        event = server.wait_event(lambda e: e["request_id"] == rid, name="auth_failed")
        assert event["reason"] == "browser" and "key" not in event, event
        r = httpx.post(url + "/v1/chat/completions", headers=rebound, json=chat)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        r = httpx.post(url + "/v1/messages", headers=rebound, json={**chat, "max_tokens": 5})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        r = httpx.post(url + "/api/chat", headers=rebound, json=chat)
        assert r.status_code == 403 and "allowed_hosts" in r.json()["error"]
        r = httpx.post(url + "/api/v1/models/switch/echo-two", headers=rebound)
        assert r.status_code == 403 and default() == "echo"
        # This machine's names, and the ones configured, are trusted (any port, any case).
        for host in (
            f"localhost:{port}",
            "LOCALHOST",
            f"localhost.:{port}",
            f"app.localhost:{port}",
            f"127.0.0.1:{port}",
            "127.9.9.9",
            f"[::1]:{port}",
            f"stella.lan:{port}",
            "llm.example.com",
            "0.0.0.0:8000",
            "192.0.2.7",
            f"[2001:db8::1]:{port}",
            socket.gethostname(),
        ):
            r = httpx.get(url + "/config", headers={"Host": host})
            assert r.status_code == 200, (host, r.text)
        for host in (
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "127.0.0.1.example:80",
            "example.com",
        ):
            assert httpx.get(url + "/config", headers={"Host": host}).status_code == 403, host

        # Another site's script, sent without a preflight (as `fetch(..., {mode:
        # "no-cors"})` or a form sends it): refused before anything is done.
        evil = {"Origin": "https://evil.example"}
        r = httpx.post(url + "/api/v1/models/switch/echo-two", headers=evil)
        assert r.status_code == 403, r.text
        assert "cors.allowed_origins" in r.json()["error"]["message"]
        planted = {"name": "planted", "backend": "echo", "aliases": ["gpt-4o"]}
        r = httpx.post(
            url + "/api/v1/models",
            headers={**evil, "Content-Type": "text/plain"},
            content=json.dumps(planted),
        )
        assert r.status_code == 403
        for origin in ("null", f"http://attacker.example:{port}", f"https://127.0.0.1:{port}0"):
            r = httpx.post(url + "/api/v1/chat", headers={"Origin": origin}, json=chat)
            assert r.status_code == 403, origin
        # GETs too: nothing of this server is another site's business.
        assert httpx.get(url + "/config", headers=evil).status_code == 403
        assert httpx.get(url + "/api/v1/models", headers=evil).status_code == 403
        names = [m["name"] for m in httpx.get(url + "/api/v1/models").json()["models"]]
        assert "planted" not in names and default() == "echo"

        # The server's own pages (same origin), configured origins and clients that
        # send no Origin (curl, the SDKs) go on working.
        own = {"Origin": url}
        assert httpx.post(url + "/api/v1/chat", headers=own, json=chat).status_code == 200
        r = httpx.post(
            url + "/api/v1/models/switch/echo-two", headers={"Origin": "https://app.example"}
        )
        assert r.status_code == 200 and default() == "echo-two"
        r = httpx.post(
            url + "/api/v1/models/switch/echo",
            headers={"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"},
        )
        assert r.status_code == 200 and default() == "echo"
        r = httpx.post(
            url + "/api/v1/models", content=json.dumps({"name": "mine", "backend": "echo"})
        )
        assert r.status_code in (200, 201), r.text
        # Public routes stay public.
        assert httpx.get(url + "/health", headers={**rebound, **evil}).status_code == 200


def test_a_keyed_call_is_judged_by_its_key_not_its_host_or_origin() -> None:
    from stella.auth import Authenticator
    from stella.errors import Forbidden

    forged = [(b"host", b"attacker.example"), (b"origin", b"https://evil.example")]
    settings = load_settings({"models": {"default": "echo"}}, environ={})
    keyed = Authenticator(settings, {"STELLA_API_KEYS": ADMIN})
    key = [(b"authorization", f"Bearer {ADMIN}".encode())]
    assert keyed.authenticate([*forged, *key], server=("127.0.0.1", 8000)).admin
    keyless = Authenticator(settings, {})
    with pytest.raises(Forbidden):
        keyless.authenticate(forged, server=("127.0.0.1", 8000))
    # Over a Unix socket the Host is made up by the client ("http://x"); an Origin is not.
    assert keyless.authenticate([(b"host", b"x")], server=("/run/stella.sock", None)).admin
    with pytest.raises(Forbidden):
        keyless.authenticate(forged, server=None)
    # On a network address with auth.allow_anonymous, no caller is trusted more than
    # any other: nothing to guard.
    public = load_settings(
        {
            "models": {"default": "echo"},
            "server": {"host": "0.0.0.0"},
            "auth": {"allow_anonymous": True},
        },
        environ={},
    )
    assert not Authenticator(public, {}).authenticate(forged, server=("127.0.0.1", 8000)).admin


def test_anonymous_callers_are_admins_on_loopback_only() -> None:
    from stella.auth import Authenticator

    local = load_settings({"models": {"default": "echo"}}, environ={})
    assert Authenticator(local, {}).authenticate([]).admin
    public = load_settings(
        {
            "models": {"default": "echo"},
            "server": {"host": "0.0.0.0"},
            "auth": {"allow_anonymous": True},
        },
        environ={},
    )
    assert not Authenticator(public, {}).authenticate([]).admin
    app = create_app(public)
    transport = httpx.ASGITransport(app=app)

    async def calls() -> list[int]:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return [
                (await c.post("/api/v1/models/switch/echo")).status_code,
                (await c.get("/config")).status_code,
                (
                    await c.post(
                        "/api/v1/chat",
                        json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
                    )
                ).status_code,
            ]

    assert asyncio.run(calls()) == [403, 403, 200]


def test_without_keys_a_call_on_a_network_address_is_refused_whatever_server_host_says() -> None:
    # `uvicorn stella.app:create_app --factory --host 0.0.0.0` binds a network address
    # that server.host (loopback by default) does not know of: each call is judged by
    # the local address it came in on.
    from stella.auth import Authenticator
    from stella.errors import Unauthorized

    local = load_settings({"models": {"default": "echo"}}, environ={})
    auth = Authenticator(local, {})
    assert auth.authenticate([], server=("127.0.0.1", 8000)).admin
    assert auth.authenticate([], server=("::1", 8000)).admin
    assert auth.authenticate([], server=("::ffff:127.0.0.1", 8000)).admin  # dual-stack ::
    assert auth.authenticate([], server=None).admin  # a Unix socket
    assert auth.authenticate([], server=("/run/stella.sock", None)).admin  # as uvicorn says it
    with pytest.raises(Unauthorized):
        auth.authenticate([], server=("192.0.2.7", 8000))
    app = create_app(local)

    async def calls(host: str) -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as c:
            chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
            return [
                (await c.get("/config")).status_code,
                (await c.post("/api/v1/models/switch/echo")).status_code,
                (await c.post("/api/v1/chat", json=chat)).status_code,
            ]

    # ASGITransport reports the URL's host as the local address.
    assert asyncio.run(calls("192.0.2.7")) == [401, 401, 401]
    assert asyncio.run(calls("127.0.0.1")) == [200, 200, 200]
    # With auth.allow_anonymous, network callers are served, never as admins.
    open_to_all = load_settings(
        {"models": {"default": "echo"}, "auth": {"allow_anonymous": True}}, environ={}
    )
    app = create_app(open_to_all)
    assert asyncio.run(calls("192.0.2.7")) == [403, 403, 200]


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("bob", ["--admin"]),
        ("bob", ["--models", "echo*", "gpt-*"]),
        ("ci bot", []),
        ("a.b@corp", []),
    ],
)
def test_keys_new_prints_a_working_config_line(name: str, extra: list[str]) -> None:
    import tomllib

    from stella.auth import Authenticator

    out = subprocess.run(
        [sys.executable, "-m", "stella", "keys", "new", name, *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    key = out.stderr.split("key: ", 1)[1].split()[0]
    assert f'sha256 = "{sha(key)}"' in out.stdout
    # The lines printed are a config the server takes, under the name given.
    auth = tomllib.loads(out.stdout)["auth"]
    settings = load_settings({"models": {"default": "echo"}, "auth": auth}, environ={})
    who = Authenticator(settings, {}).authenticate([(b"authorization", f"Bearer {key}".encode())])
    assert who.name == name and who.admin == ("--admin" in extra)
    hashed = subprocess.run(
        [sys.executable, "-m", "stella", "keys", "hash"],
        input=key + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert hashed.stdout.strip() == sha(key)


def test_keys_refuses_what_the_config_would_and_a_closed_stdin() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "stella", "keys", "new", "a|b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "may not be empty or hold '|'" in bad.stderr
    closed = stella_without_stdin("keys", "hash")
    assert closed.returncode == 2 and closed.stderr == "stella: no key on stdin\n", closed.stderr
    binary = subprocess.run(
        [sys.executable, "-m", "stella", "keys", "hash"],
        input=b"ab\xffcd\n",
        capture_output=True,
        timeout=60,
    )
    assert (
        binary.returncode == 2 and binary.stderr == b"stella: the key on stdin is not UTF-8 text\n"
    )


def test_credentials_an_upstream_echoes_or_the_config_holds_stay_hidden() -> None:
    # An upstream that refuses a key often quotes it ("Incorrect API key provided: sk-...");
    # the client must not learn stella's credentials from that, nor from /config.
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route as StarletteRoute

    async def refuse(request: Request) -> JSONResponse:
        seen = request.headers.get("authorization", "")
        custom = request.headers.get("x-custom-auth", "")
        message = f"Incorrect API key provided: {seen.split()[-1]}. headers seen: {custom}"
        return JSONResponse({"error": {"message": message}}, status_code=401)

    upstream = Starlette(routes=[StarletteRoute("/v1/chat/completions", refuse, methods=["POST"])])
    redis_url = "redis://127.0.0.1:9/0?password=redis-secret-4242"
    with serve(upstream, health="/nothing") as url:
        config = {
            **CONFIG,
            "backends": {
                "paid": {
                    "kind": "openai",
                    "base_url": url + "/v1",
                    "api_key_env": "PAID_KEY",
                    "headers": {
                        "X-Custom-Auth": "hdr-secret-777",
                        "X-Title": "stella-test",
                        "X-Bypass-Cache": "true",  # not a credential: masking it would
                    },  # turn every "true" in the logs into ***
                },
                # A user and password in the URL go as Basic auth: the token is a credential.
                "basic": {
                    "kind": "openai",
                    "base_url": url.replace("//", "//bob:basic-pw-5150@", 1) + "/v1",
                },
            },
            "models": {
                "routes": {
                    "paid-model": {"backend": "paid", "retries": 0},
                    "basic-model": {"backend": "basic", "retries": 0},
                }
            },
            "state": {"redis_url": redis_url},
        }
        env = {"STELLA_API_KEYS": f"admin={ADMIN}", "PAID_KEY": UPSTREAM_SECRET}
        with run_stella(config, env) as server:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            seen = []
            for model, stream, path in (
                ("paid-model", False, "/api/v1/chat"),
                ("paid-model", True, "/api/v1/chat"),
                ("paid-model", False, "/v1/chat/completions"),
                ("basic-model", False, "/api/v1/chat"),
                ("basic-model", True, "/v1/chat/completions"),
            ):
                r = httpx.post(
                    server.url + path,
                    headers=admin,
                    json={
                        "model": model,
                        "stream": stream,
                        "messages": [{"role": "user", "content": "x"}],
                    },
                    timeout=10,
                )
                assert "Incorrect API key provided: ***" in r.text, r.text
                seen.append(r.text)
            r = httpx.get(server.url + "/config", headers={"Authorization": f"Bearer {NARROW}"})
            assert r.status_code == 403  # the configuration is for admins
            cfg = httpx.get(server.url + "/config", headers=admin).json()["config"]
            assert cfg["backends"]["paid"]["headers"] == {
                "X-Custom-Auth": "***",
                "X-Title": "stella-test",
                "X-Bypass-Cache": "true",
            }
            assert cfg["state"]["redis_url"] == "redis://127.0.0.1:9/0?password=***"
            seen.append(json.dumps(cfg))
            server.stop()
            everything = "\n".join(seen + server.lines())
            events = [json.loads(line) for line in server.lines() if line.startswith("{")]
            assert any(e.get("stream") is True for e in events)  # "true" is not masked
    basic = base64.b64encode(b"bob:basic-pw-5150").decode()
    for secret in (UPSTREAM_SECRET, "hdr-secret-777", "redis-secret-4242", basic, "basic-pw-5150"):
        assert secret not in everything, secret


def test_a_quoted_key_cut_by_the_message_limit_leaves_none_of_it() -> None:
    # An upstream's error text is cut to 500 characters; a key it quoted just where the
    # cut falls must not reach the client in part, as an error status or inside a stream.
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route as StarletteRoute

    async def refuse(request: Request) -> Response:
        body = await request.json()
        key = request.headers.get("authorization", "").split()[-1]
        pad = int(body["messages"][-1]["content"])
        message = "A" * pad + f" key: {key} is not valid"
        if not body.get("stream"):
            return JSONResponse({"error": {"message": message}}, status_code=401)
        event = b"data: " + json.dumps({"error": {"message": message}}).encode() + b"\n\n"
        return StreamingResponse(iter([event]), media_type="text/event-stream")

    upstream = Starlette(routes=[StarletteRoute("/v1/chat/completions", refuse, methods=["POST"])])
    with serve(upstream, health="/nothing") as url:
        config = {
            **CONFIG,
            "backends": {
                "paid": {"kind": "openai", "base_url": url + "/v1", "api_key_env": "PAID_KEY"}
            },
            "breaker": {"failure_threshold": 0},
        }
        env = {"STELLA_API_KEYS": f"admin={ADMIN}", "PAID_KEY": UPSTREAM_SECRET}
        with run_stella(config, env) as server:
            seen = []
            # The key starts 476 characters into the message at 470: a cut at 500 would
            # leave 21 of its characters; at 480, 11; at 487, 4 ("sk-u").
            for pad in (470, 480, 487):
                for stream, path in (
                    (False, "/api/v1/chat"),
                    (True, "/api/v1/chat"),
                    (True, "/v1/chat/completions"),
                ):
                    r = httpx.post(
                        server.url + path,
                        headers={"Authorization": f"Bearer {ADMIN}"},
                        json={
                            "model": "paid-model",
                            "stream": stream,
                            "messages": [{"role": "user", "content": str(pad)}],
                        },
                        timeout=10,
                    )
                    assert "A" * 400 in r.text and "key: ***" in r.text, r.text
                    seen.append(r.text)
            server.stop()
            everything = "\n".join(seen + server.lines())
    assert UPSTREAM_SECRET[:4] not in everything


LOGIN_PLUGIN = """
import structlog

from stella.backends import Backend, BackendConfig
from stella.errors import UpstreamError


class LoginConfig(BackendConfig, kw_only=True):
    passwd: str = ""
    credentials: str = ""
    auth_retries: int = 0
    sign_requests: bool = False


class LoginBackend(Backend):
    kind = "login"
    Config = LoginConfig

    async def chat(self, request, ctx):
        cfg = self.config
        structlog.get_logger("stella").info("login_tried", note=f"as {cfg.credentials}")
        raise UpstreamError(f"login refused: {cfg.credentials} / {cfg.passwd}")
        yield
"""


def test_a_plugin_backends_credentials_are_hidden_by_their_names(tmp_path: Path) -> None:
    # A plugin kind's own fields are credentials by the words a header's name is read by
    # (passwd, credentials), not only key/secret/token/password: /config shows them
    # masked, and a log line or an error message that quotes them too.
    env = install_plugin(tmp_path, "stella_login", LOGIN_PLUGIN, {"login": "LoginBackend"})
    config = {
        **CONFIG,
        "backends": {
            "corp": {
                "kind": "login",
                "passwd": "PlainPasswd123",
                "credentials": "svc:CredSecret456",
                "auth_retries": 2,
                "sign_requests": True,
            }
        },
        "models": {"routes": {"corp-model": {"backend": "corp", "retries": 0}}},
    }
    with run_stella(config, {**env, "STELLA_API_KEYS": f"admin={ADMIN}"}) as server:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        chat = {"model": "corp-model", "messages": [{"role": "user", "content": "x"}]}
        r = httpx.post(server.url + "/api/v1/chat", headers=admin, json=chat, timeout=10)
        assert "login refused: *** / ***" in r.text, r.text
        cfg = httpx.get(server.url + "/config", headers=admin).json()["config"]
        corp = cfg["backends"]["corp"]
        assert (corp["passwd"], corp["credentials"]) == ("***", "***")
        # Not strings: shown as they are, whatever their names say.
        assert (corp["auth_retries"], corp["sign_requests"]) == (2, True)
        assert cfg["auth"]["allow_anonymous"] is False
        assert cfg["auth"]["keys_env"] == "STELLA_API_KEYS"
        assert server.wait_event(lambda e: True, name="login_tried")["note"] == "as ***"
        server.stop()
        everything = "\n".join([r.text, json.dumps(cfg), *server.lines()])
    for secret in ("PlainPasswd123", "svc:CredSecret456", "CredSecret456"):
        assert secret not in everything, secret


def test_the_public_health_route_asks_the_upstreams_at_most_every_few_seconds() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route as StarletteRoute

    calls: list[str] = []

    async def models(request: Request) -> JSONResponse:
        calls.append(request.headers.get("authorization", ""))
        return JSONResponse({"object": "list", "data": []})

    upstream = Starlette(routes=[StarletteRoute("/v1/models", models)])
    with serve(upstream, health="/nothing") as url:
        config = {
            "backends": {
                "paid": {"kind": "openai", "base_url": url + "/v1", "api_key_env": "PAID_KEY"}
            },
            "models": {"routes": {"paid-model": {"backend": "paid"}}},
        }
        env = {"STELLA_API_KEYS": f"admin={ADMIN}", "PAID_KEY": UPSTREAM_SECRET}
        with run_stella(config, env) as server:
            for _ in range(20):  # no key: the status alone, and no upstream asked
                r = httpx.get(server.url + "/v1/health")
                assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
            assert calls == []
            admin = {"Authorization": f"Bearer {ADMIN}"}
            for _ in range(20):
                r = httpx.get(server.url + "/v1/health", headers=admin)
                assert r.status_code == 200 and r.json()["providers"]["paid"]["ok"] is True
    assert len(calls) == 1, calls  # one probe for 20 calls within the 5 s it is kept


def test_endless_headers_are_refused_by_the_server() -> None:
    import socket

    with run_stella(CONFIG, {"STELLA_API_KEYS": ADMIN}) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            # 70 KB of headers that do not end, all of it read by the server before it
            # answers (so its close is not a reset that could overtake the answer).
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"a" * 70_000)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        assert httpx.get(server.url + "/health").status_code == 200


def test_a_probe_that_raises_is_its_backends_answer_not_a_500() -> None:
    settings = load_settings(
        {"models": {"default": "echo"}, "backends": {"local": {"enabled": False}}}, environ={}
    )
    app = create_app(settings)
    svc = app.state.stella

    async def broken() -> None:
        raise ValueError("a plugin's bug")

    svc.backends["echo"].health = broken

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as c:
            return await c.get("/v1/health")

    r = asyncio.run(call())
    assert r.status_code == 200, r.text
    assert r.json()["providers"]["echo"]["ok"] is False


def test_with_keys_the_public_routes_name_no_model_and_no_backend() -> None:
    # A key limited to some models sees `default: null`: a route anyone may call must
    # not name the default model, its backend or its fallback, in any circuit state;
    # the probes still answer as they did, with their statuses. Without keys they do.
    hidden = ("secret/internal-model", "slowbox", "spare-model", "spare-box")
    cfg: dict[str, Any] = {
        "models": {
            "default": "secret/internal-model",
            "routes": {
                "secret/internal-model": {"backend": "slowbox", "fallbacks": ["spare-model"]},
                "spare-model": {"backend": "spare-box"},
            },
        },
        "backends": {
            "local": {"enabled": False},
            "slowbox": {"kind": "echo"},
            "spare-box": {"kind": "echo"},
        },
    }
    keys = {"auth": {"keys": {"narrow": {"sha256": sha(NARROW), "models": ["echo"]}}}}

    async def public(app: Any) -> tuple[list[tuple[str, int, str]], dict[str, Any]]:
        router = app.state.stella.router
        main, spare = router.breaker("slowbox"), router.breaker("spare-box")
        seen = []
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as c:
            # closed; open with the fallback answering; both open; half-open.
            for main_state, spare_state in (
                ("closed", "closed"),
                ("open", "closed"),
                ("open", "open"),
                ("half_open", "closed"),
            ):
                main.state = "open" if main_state != "closed" else "closed"
                main.opened_at = time.monotonic() - (3600 if main_state == "half_open" else 0)
                spare.state, spare.opened_at = spare_state, time.monotonic()
                for path in ("/health", "/", "/api/llm/health", "/ready", "/v1/health"):
                    r = await c.get(path)
                    seen.append((f"{path} {main_state}/{spare_state}", r.status_code, r.text))
            # A wrong key is no key; any valid one, however narrow, sees the backends.
            keyed = {}
            for key in ("sk-wrong-key-000333", NARROW):
                r = await c.get("/v1/health", headers={"Authorization": f"Bearer {key}"})
                keyed[key] = (r.status_code, r.json())
        return seen, keyed

    for with_keys in (True, False):
        app = create_app(load_settings(merge(cfg, keys) if with_keys else cfg, environ={}))
        seen, keyed = asyncio.run(public(app))
        statuses = {what: status for what, status, _ in seen}
        assert statuses["/ready open/open"] == 503, seen  # no backend left to answer
        assert all(v == 200 for k, v in statuses.items() if k != "/ready open/open"), seen
        named = {what for what, _, text in seen if any(name in text for name in hidden)}
        if with_keys:
            assert not named, [s for s in seen if s[0] in named]
            bodies = {what: json.loads(text) for what, _, text in seen}
            assert bodies["/health closed/closed"]["backend"] is None
            assert bodies["/ closed/closed"]["default_model"] is None
            llm = bodies["/api/llm/health closed/closed"]
            assert llm["model"] is None and llm["backend"] is None and llm["status"] == "ok"
            for state in ("closed/closed", "open/open"):
                assert bodies[f"/v1/health {state}"] == {"status": "ok"}, bodies
            assert keyed["sk-wrong-key-000333"] == (200, {"status": "ok"}), keyed
            status, full = keyed[NARROW]
            assert status == 200 and full["status"] == "ok", keyed
            assert full["providers"]["slowbox"] == {
                "kind": "echo",
                "ok": True,
                "detail": "ok",
                "circuit": "half_open",  # as the loop left it
            }, full
            assert {"slowbox", "spare-box", "echo"} <= set(full["providers"]), full
            circuits = [
                bodies[f"/ready {s}"]["checks"]["circuit"]
                for s in ("open/closed", "open/open", "half_open/closed")
            ]
            assert circuits == [
                "ok (open; a fallback answers)",
                "open",
                "ok (half_open: the next request probes it)",
            ], circuits
        else:  # the same routes, keyless on loopback: the operator's own, names and all
            assert {"/health closed/closed", "/ closed/closed"} <= named, named
            assert "/ready open/closed" in named and "/api/llm/health closed/closed" in named
            assert "/v1/health closed/closed" in named, named


def test_every_model_listing_shows_a_scoped_key_only_its_models() -> None:
    settings = load_settings(
        {
            **CONFIG,
            "models": {"default": "echo", "routes": CONFIG["models"]["routes"]},
            "backends": {**CONFIG["backends"], "local": {"enabled": False}},
        },
        environ={"PAID_KEY": UPSTREAM_SECRET},
    )
    app = create_app(settings)
    narrow = {"Authorization": f"Bearer {NARROW}"}

    async def listings() -> dict[str, set[str]]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as c:
            native = (await c.get("/api/v1/models", headers=narrow)).json()
            tags = (await c.get("/api/tags", headers=narrow)).json()
            ps = (await c.get("/api/ps", headers=narrow)).json()
            llm = (await c.get("/api/llm/models", headers=narrow)).json()
            oai = (await c.get("/v1/models", headers=narrow)).json()
            return {
                "native": {m["name"] for m in native["models"]},
                "tags": {m["name"].removesuffix(":latest") for m in tags["models"]},
                "ps": {m["name"].removesuffix(":latest") for m in ps["models"]},
                "llm": {m if isinstance(m, str) else m["name"] for m in llm["models"]},
                "openai": {m["id"] for m in oai["data"]},
            }

    seen = asyncio.run(listings())
    assert seen["native"] == {"echo"}, seen
    for name, models in seen.items():
        assert "paid-model" not in models, (name, models)
        assert models <= {"echo"}, (name, models)
    assert seen["tags"] == {"echo"} and seen["openai"] == {"echo"} and seen["llm"] == {"echo"}


def test_without_keys_a_unix_socket_caller_is_local(tmp_path: Path) -> None:
    # uvicorn --uds gives scope["server"] as (path, None): a local caller, the operator.
    import os
    import time

    sock = tmp_path / "stella.sock"
    env = {
        **os.environ,
        "STELLA_MODELS__DEFAULT": "echo",
        "STELLA_BACKENDS__LOCAL__ENABLED": "false",
    }
    env.pop("STELLA_API_KEYS", None)
    args = ["-m", "uvicorn", "stella.app:create_app", "--factory", "--uds", str(sock)]
    proc = subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "uvicorn did not start"
            time.sleep(0.05)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://x") as c:
            deadline = time.monotonic() + 10
            while True:
                try:
                    r = c.get("/config")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(20)


def test_keys_are_read_once_at_start_and_only_the_key_routes_change_them() -> None:
    # README: the config and STELLA_API_KEYS are read as the process starts; a key
    # taken out of the config is still accepted until the process restarts (or it is
    # revoked: DELETE /api/v1/keys/{name}, tests/test_keys.py).
    keyed = {path for _, path in all_routes() if "key" in path.lower()}
    # its {name} filled in
    assert keyed == {"/api/v1/keys", "/api/v1/keys/echo", "/api/v1/keys/echo/rotate"}
    chat = {"model": "echo", "stream": False, "messages": [{"role": "user", "content": "x"}]}
    with run_stella(CONFIG, {"STELLA_API_KEYS": f"admin={ADMIN}"}) as server:
        conf = server.log_path.parent / "stella.toml"
        assert sha(NARROW) in conf.read_text()
        conf.write_text(conf.read_text().replace(sha(NARROW), sha("sk-another-key-000333")))
        r = httpx.post(
            server.url + "/api/v1/chat", headers={"Authorization": f"Bearer {NARROW}"}, json=chat
        )
        assert r.status_code == 200, r.text


def test_a_key_with_no_models_may_use_none_and_names_and_keys_are_unique() -> None:
    from stella.auth import Authenticator
    from stella.backends import ConfigError

    def settings(keys: dict[str, dict[str, object]]) -> object:
        return load_settings({"models": {"default": "echo"}, "auth": {"keys": keys}}, environ={})

    bearer = [(b"authorization", b"Bearer " + NARROW.encode())]
    # An empty list reads as "no models", not as the default "*": the key fails closed.
    ops = Authenticator(settings({"ops": {"sha256": sha(NARROW), "models": [], "admin": True}}), {})
    p = ops.authenticate(bearer)
    assert p.models == () and not p.may_use("echo") and p.scope is not None
    assert p.admin
    # One name for two keys (a config key and a quick-start one) would share logs,
    # usage rows and limit buckets: refused, as is one key under two names.
    narrow = settings({"rpm": {"sha256": sha(NARROW), "requests_per_minute": 5}})
    with pytest.raises(ConfigError, match="'rpm' is used twice"):
        Authenticator(narrow, {"STELLA_API_KEYS": f"rpm={ADMIN}"})
    with pytest.raises(ConfigError, match="'env-1' is used twice"):
        Authenticator(settings({"env-1": {"sha256": sha(NARROW)}}), {"STELLA_API_KEYS": ADMIN})
    with pytest.raises(ConfigError, match="the same key as 'rpm'"):
        Authenticator(narrow, {"STELLA_API_KEYS": f"root={NARROW}"})
    with pytest.raises(ConfigError, match="the same key as 'a'"):
        Authenticator(settings({"a": {"sha256": sha(NARROW)}, "b": {"sha256": sha(NARROW)}}), {})
    with pytest.raises(ConfigError, match="'x' is used twice") as info:
        Authenticator(settings({}), {"STELLA_API_KEYS": f"x={ADMIN},x={NARROW}"})
    assert ADMIN not in str(info.value) and NARROW not in str(info.value)
    # Names are written into usage fields "name|model|count": a "|" would move them.
    for name in ("a|b", "", "tab\there"):
        with pytest.raises(ConfigError, match="a key name may not"):
            Authenticator(settings({name: {"sha256": sha(NARROW)}}), {})
    # Any other name a TOML file can hold still loads, as it always did.
    for name in ("_ci", "ci bot", "team:ml", "José", "svc/etl"):
        assert Authenticator(settings({name: {"sha256": sha(NARROW)}}), {}).keys


def test_metrics_and_models_refuse_a_key_with_no_models() -> None:
    app = create_app(
        load_settings(
            {
                "models": {"default": "echo"},
                "backends": {"local": {"enabled": False}},
                "auth": {"keys": {"ops": {"sha256": sha(NARROW), "models": []}}},
            },
            environ={},
        )
    )
    h = {"Authorization": f"Bearer {NARROW}"}

    async def calls() -> tuple[int, int, list[object]]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as c:
            chat = await c.post(
                "/api/v1/chat",
                headers=h,
                json={
                    "model": "echo",
                    "stream": False,
                    "messages": [{"role": "user", "content": "x"}],
                },
            )
            metrics = await c.get("/metrics", headers=h)
            models = (await c.get("/api/v1/models", headers=h)).json()["models"]
            return chat.status_code, metrics.status_code, models

    chat, metrics, models = asyncio.run(calls())
    assert (chat, metrics, models) == (403, 403, [])


def test_upgrades_and_malformed_requests_are_answered_by_stella_in_json_only() -> None:
    # A WebSocket upgrade was answered by the websockets library (plain text, no request
    # ID; one with a body was held 20 s), and each malformed request cost a plain-text
    # uvicorn warning on stderr, which any client could repeat to flood it.
    with run_stella() as server:
        upgrade = (
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n"
        )
        asks = {
            "upgrade": upgrade + b"\r\n",
            "upgrade with a body": upgrade + b"Content-Length: 2\r\n\r\n{}",
            "malformed": b"GET /he\x01alth HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        }
        for what, ask in asks.items():
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(ask)
                head = sock.recv(65536).split(b"\r\n\r\n")[0].lower()
            status = b"400" if what == "malformed" else b"200"
            assert head.startswith(b"http/1.1 " + status), (what, head)
            assert b"content-type: application/json" in head and b"x-request-id: req_" in head
        # A request that asks to upgrade is plain HTTP/1.1 to stella, its body included
        # (`curl --http2` asks for h2c on every http:// request): the parser stops at
        # its headers, which lost the body; the connection ends with the answer.
        body = json.dumps(
            {
                "model": "echo",
                "stream": False,
                "messages": [{"role": "user", "content": "hi there"}],
            }
        ).encode()
        head = (
            b"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        then = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        for pieces in ([head + body + then], [head, body]):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                for piece in pieces:
                    sock.sendall(piece)
                    time.sleep(0.2)
                got = b""
                while chunk := sock.recv(65536):  # to the end: the server closes it
                    got += chunk
            answer = json.loads(got.split(b"\r\n\r\n", 1)[1])
            assert got.count(b"HTTP/1.1 ") == 1 and b"connection: close" in got.lower()
            if len(pieces) == 1:
                assert answer["response"] == "hi there", got
            else:  # a body after the headers: not read, and said so
                assert "without Upgrade" in answer["error"]["message"], got
        # Starlette's route patterns end in `$`, which lets a final newline through.
        for path in ("/health%0A", "/v1/models/echo%0A", "/api/v1/models/switch/echo%0a"):
            r = httpx.request("POST" if "switch" in path else "GET", server.url + path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        # The playground's files come whole whatever Range asks (Starlette's answer to a
        # bad one was plain text).
        for path in ("/playground", "/static/stella.js"):
            for asked in ("bytes=999999-", "bytes=5-1", "garbage", "bytes=0-9"):
                r = httpx.get(server.url + path, headers={"Range": asked})
                assert r.status_code == 200 and len(r.content) > 100, (path, asked, r.text)
                # And no Accept-Ranges promises a part (RFC 9110 14.3).
                assert "accept-ranges" not in r.headers, (path, r.headers)
        # \d is any script's digit: a day is ASCII.
        r = httpx.get(server.url + "/api/v1/usage", params={"day": "２０２６-01-01"})
        assert r.status_code == 400 and "day" in r.json()["error"]["message"], r.text
        time.sleep(0.3)  # the log writer's hand-over
        other = [
            line
            for line in server.lines()
            if not line.startswith("{") and not line.startswith("stella: serving on")
        ]
        assert other == []


def test_two_different_keys_in_one_request_are_refused() -> None:
    # The first `Authorization: Bearer` counted and the last `X-API-Key`: which of two keys
    # a request carried depended on the header and on their order (a proxy that adds its
    # own key decided it). Two different keys in one header are no key at all.
    chat = {"model": "echo", "stream": False, "messages": [{"role": "user", "content": "x"}]}
    with run_stella(CONFIG, {"STELLA_API_KEYS": f"admin={ADMIN}"}) as server:

        def status(*headers: tuple[str, str]) -> tuple[int, str]:
            sent = [(name, value.strip()) for name, value in headers]  # h11: no end space
            r = httpx.post(server.url + "/api/v1/chat", json=chat, headers=sent)
            return r.status_code, r.json().get("error", {}).get("message", "")

        for name, value in (("authorization", "Bearer {}"), ("x-api-key", "{}")):
            for pair in ((ADMIN, NARROW), (NARROW, ADMIN), (ADMIN, "sk-wrong-000000")):
                code, message = status(*((name, value.format(k)) for k in pair))
                assert code == 401 and "more than one API key given" in message, (name, pair)
            # The same key twice is one key; an empty second value gives none.
            assert status((name, value.format(ADMIN)), (name, value.format(ADMIN)))[0] == 200
            assert status((name, value.format(ADMIN)), (name, value.format("")))[0] == 200
        # One of each: the Bearer key counts, as before, whatever the other says.
        assert status(("authorization", f"Bearer {ADMIN}"), ("x-api-key", "sk-wrong-0"))[0] == 200
        assert status(("x-api-key", ADMIN), ("authorization", "Bearer sk-wrong-0"))[0] == 401
        # A Bearer whose key is empty, or another scheme, leaves X-API-Key its say.
        assert status(("authorization", "Bearer"), ("x-api-key", ADMIN))[0] == 200
        assert status(("authorization", "Basic dTpw"), ("x-api-key", ADMIN))[0] == 200


def test_refused_keys_are_logged_without_the_key() -> None:
    # A key tried and refused left no trace but a counter: nothing told which client, on
    # which route, nor whether the key was missing, unknown or out of its scope.
    wrong = ADMIN[:-3] + "999"  # a near miss: none of it may show
    chat = {"model": "paid-model", "messages": [{"role": "user", "content": "x"}]}
    with run_stella(CONFIG, {"STELLA_API_KEYS": f"admin={ADMIN}"}) as server:
        url = server.url
        calls = [
            ("missing", None, httpx.post(url + "/api/v1/chat", json=chat)),
            ("invalid", None, httpx.get(url + "/config", headers={"x-api-key": wrong})),
            (
                "duplicate",
                None,
                httpx.get(url + "/metrics", headers=[("x-api-key", ADMIN), ("x-api-key", wrong)]),
            ),
            (
                "scope",
                "narrow",
                httpx.post(url + "/api/v1/chat", json=chat, headers=bearer(NARROW)),
            ),
            ("scope", "narrow", httpx.get(url + "/metrics", headers=bearer(NARROW))),
            (
                "scope",
                "narrow",
                httpx.post(url + "/api/v1/models/switch/echo", headers=bearer(NARROW)),
            ),
        ]
        for reason, key, r in calls:
            assert r.status_code == (403 if reason == "scope" else 401), r.text
            rid = r.headers["x-request-id"]
            event = server.wait_event(lambda e, rid=rid: e["request_id"] == rid, name="auth_failed")
            assert event["level"] == "warning" and event["reason"] == reason, event
            assert event["method"] == r.request.method and event["path"] == r.request.url.path
            assert event["client"] == "127.0.0.1" and event.get("key") == key, event
            assert "suppressed" not in event
        # A call that passes is no failure.
        r = httpx.get(url + "/config", headers=bearer(ADMIN))
        assert r.status_code == 200
        server.stop()
        lines = [line for line in server.lines() if '"auth_failed"' in line]
    assert len(lines) == len(calls)
    for line in lines:
        for secret in (ADMIN, NARROW, wrong):
            # No part of a key: not even its first characters after the common "sk-".
            assert secret[3:9] not in line, (secret, line)
        assert "sk-" not in line


def test_a_flood_of_bad_keys_is_logged_at_most_ten_times_a_second() -> None:
    sent = 60
    with run_stella(CONFIG, {"STELLA_API_KEYS": f"admin={ADMIN}"}) as server:
        started = time.monotonic()
        with httpx.Client(base_url=server.url) as client:
            for i in range(sent):
                r = client.get("/config", headers={"x-api-key": f"sk-guess-{i:06d}"})
                assert r.status_code == 401
        elapsed = time.monotonic() - started
        time.sleep(1.1)  # a second later: the next failure is written, and tells the rest
        last = httpx.get(server.url + "/config").headers["x-request-id"]
        event = server.wait_event(lambda e: e["request_id"] == last, name="auth_failed")
        events = server.events("auth_failed")
    written = len(events) - 1
    left_out = sum(e.get("suppressed", 0) for e in events)
    # Every failure is either written or counted in the `suppressed` of a later one (the
    # last, written a second after the flood, tells those of its last second).
    assert event["reason"] == "missing" and left_out > 0, events
    assert written + left_out == sent, (written, left_out)
    assert 10 <= written <= 10 * (int(elapsed) + 1), (written, elapsed)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
