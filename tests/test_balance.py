"""Load balancing: a route served by several backends (`balance`) sends each call to the
least busy one whose circuit lets it go, the others next in its chain, then its fallbacks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from structlog.testing import capture_logs

from stella.backends import ConfigError, build_backend, registry
from stella.calls import Call, Principal
from stella.core import Pipeline
from stella.errors import InvalidRequest, Overloaded, StellaError, Unavailable
from stella.limits import Limiter
from stella.protocol import ChatRequest, EmbedRequest, Message
from stella.routing import Router
from stella.settings import RouteSettings, enabled_backends, load_settings
from tests.live import LiveServer, run_stella, stella_cli

FAILS = {"kind": "echo", "fail_before_first": True}
CONFIG: dict[str, Any] = {
    "backends": {
        "e1": {"kind": "echo"},
        "e2": {"kind": "echo"},
        "s1": {"kind": "echo", "delay_s": 0.05},
        "s2": {"kind": "echo", "delay_s": 0.05},
        "dead": FAILS,
        "alive": {"kind": "echo"},
        "bad1": FAILS,
        "bad2": FAILS,
        "down": FAILS,
        "gone": FAILS,
        "q1": {"kind": "echo", "delay_s": 0.05},
        "q2": {"kind": "echo", "delay_s": 0.05},
        "r1": {"kind": "echo", "delay_s": 0.05},
        "r2": {"kind": "echo", "delay_s": 0.05},
    },
    "models": {
        "allow_direct": True,
        "routes": {
            "pair": {"backend": "e1", "balance": ["e2"]},
            "busy": {"backend": "s1", "balance": ["s2"]},
            "flaky": {"backend": "dead", "balance": ["alive"], "retries": 0},
            "doomed": {"backend": "bad1", "balance": ["bad2"], "retries": 0, "fallbacks": ["echo"]},
            "stranded": {"backend": "bad1", "balance": ["bad2"], "retries": 0},
            "duo": {"backend": "e1", "balance": ["e2"], "upstream_model": "duo-up"},
            "counted": {"backend": "down", "balance": ["alive"], "retries": 0},
            "rr": {"backend": "e1", "balance": ["e2"]},
            "alt": {"backend": "echo", "fallbacks": ["rr"]},
            "rr2": {"backend": "e1", "balance": ["e2"]},
            "lost": {"backend": "gone", "fallbacks": ["rr2"], "retries": 0},
            "queued": {"backend": "q1", "balance": ["q2"]},
            "spill": {"backend": "r1", "balance": ["r2"]},
            "r1only": {"backend": "r1"},
            "r2only": {"backend": "r2"},
        },
    },
    # One failure opens a circuit, for the rest of the module.
    "breaker": {"failure_threshold": 1, "cooldown_s": 60},
    "limits": {
        # A daily quota: it never refills, so it counts exactly.
        "models": {"flaky": {"requests_per_day": 1000}},
        "backends": {"q1": 1, "q2": 5, "r1": 1, "r2": 2},
        "queue_timeout_s": 0.5,
    },
}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with run_stella(CONFIG) as s:
        yield s


def chat(s: LiveServer, model: str, text: str = "hi") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": False}
    return httpx.post(s.url + "/api/v1/chat", json=body, timeout=10)


def logged(s: LiveServer, request_id: str) -> dict[str, Any]:
    return s.wait_event(lambda ev: ev["request_id"] == request_id)


def answered_by(s: LiveServer, model: str, calls: int) -> list[str]:
    """The backend each of `calls` sequential calls was answered by, as its log says."""
    out = []
    for _ in range(calls):
        r = chat(s, model)
        assert r.status_code == 200, r.text
        ev = logged(s, r.json()["id"])
        assert ev["backend"] == r.json()["backend"]
        out.append(ev["backend"])
    return out


def test_sequential_calls_alternate_and_the_log_and_metrics_name_the_backend(
    server: LiveServer,
) -> None:
    got = answered_by(server, "pair", 4)
    assert sorted(got[:2]) == ["e1", "e2"] and got[2:] == got[:2]
    # A stream's start line names the backend chosen for it.
    body = {"model": "pair", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", server.url + "/api/v1/chat", json=body) as r:
        start = json.loads(next(r.iter_lines()))
    assert start["type"] == "start" and start["backend"] == got[0]
    metrics = httpx.get(server.url + "/metrics").text
    for backend in ("e1", "e2"):
        assert f'api="native",backend="{backend}",model="pair",status="200"' in metrics
    listed = {m["name"]: m for m in httpx.get(server.url + "/api/v1/models").json()["models"]}
    assert (listed["pair"]["backend"], listed["pair"]["balance"]) == ("e1", ["e2"])


def test_a_call_in_flight_sends_the_next_to_the_idle_backend(server: LiveServer) -> None:
    long = " ".join(["word"] * 40)  # 40 tokens, 50 ms apart: two seconds
    body = {"model": "busy", "messages": [{"role": "user", "content": long}]}
    with httpx.stream("POST", server.url + "/api/v1/chat", json=body, timeout=10) as r:
        lines = r.iter_lines()
        start = json.loads(next(lines))
        held = start["backend"]
        next(lines)  # a token: the call is on its backend
        idle = {"s1": "s2", "s2": "s1"}[held]
        # Round robin alone would send one of these to the busy backend.
        assert answered_by(server, "busy", 3) == [idle] * 3
    # The client left: the call is no longer counted on its backend, and calls spread again.
    server.wait_event(
        lambda ev: ev["request_id"] == start["id"] and ev["finish_reason"] == "client_closed"
    )
    assert sorted(answered_by(server, "busy", 2)) == ["s1", "s2"]


def test_a_failing_backend_is_answered_by_the_other_then_its_open_circuit_gets_nothing(
    server: LiveServer,
) -> None:
    remaining = []
    attempts = []
    for _ in range(6):
        r = chat(server, "flaky")
        assert r.status_code == 200 and r.json()["backend"] == "alive", r.text
        remaining.append(int(r.headers["x-quota-remaining"]))
        attempts.append(
            [(a["backend"], a["error"]) for a in logged(server, r.json()["id"])["attempts"]]
        )
    # `dead` is tried once (the first or the second call, by turn), answered within the
    # same request by `alive`; its circuit open, it gets nothing more.
    failed = [a for a in attempts if len(a) > 1]
    assert failed == [[("dead", "upstream_error"), ("alive", None)]]
    assert attempts.index(failed[0]) < 2
    assert all(a == [("alive", None)] for a in attempts[attempts.index(failed[0]) + 1 :])
    # The model's limits are the route's, one request a call wherever it went.
    assert remaining == list(range(remaining[0], remaining[0] - 6, -1))
    listed = {m["name"]: m for m in httpx.get(server.url + "/api/v1/models").json()["models"]}
    assert listed["flaky"]["circuit"] == "closed"  # it serves: `alive` does
    metrics = httpx.get(server.url + "/metrics").text
    assert 'stella_backend_failures_total{backend="dead",code="upstream_error"} 1.0' in metrics


def test_fallbacks_follow_the_balanced_backends(server: LiveServer) -> None:
    r = chat(server, "doomed")
    assert r.status_code == 200 and r.json()["backend"] == "echo"
    tried = [
        (a["backend"], a["route"], a["error"]) for a in logged(server, r.json()["id"])["attempts"]
    ]
    assert sorted(tried[:2]) == [
        ("bad1", "doomed", "upstream_error"),
        ("bad2", "doomed", "upstream_error"),
    ]
    assert tried[2:] == [("echo", "echo", None)]
    # Both circuits open now: neither is sent anything, the fallback answers.
    r = chat(server, "doomed")
    pairs = [(a["backend"], a["error"]) for a in logged(server, r.json()["id"])["attempts"]]
    assert pairs == [("bad1", "circuit_open"), ("bad2", "circuit_open"), ("echo", None)]
    # Without a fallback: the usual 503, naming every backend of the route.
    r = chat(server, "stranded")
    assert r.status_code == 503
    assert r.json()["error"]["message"] == (
        "model 'stranded' is unavailable: backends 'bad1', 'bad2' have their circuits open"
    )
    # A token count is refused as that message is, in the same words.
    body = {"model": "stranded", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(server.url + "/v1/messages/count_tokens", json=body)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["message"] == (
        "model 'stranded' is unavailable: backends 'bad1', 'bad2' have their circuits open"
    )


def test_embed_calls_spread_over_the_backends(server: LiveServer) -> None:
    got = []
    for _ in range(2):
        r = httpx.post(server.url + "/api/v1/embed", json={"model": "pair", "input": ["a b"]})
        assert r.status_code == 200, r.text
        got.append(logged(server, r.headers["x-request-id"])["backend"])
    assert sorted(got) == ["e1", "e2"]


def test_a_runtime_route_balances_too(server: LiveServer) -> None:
    url = server.url + "/api/v1/models"
    for balance, param, said in (
        (["nope"], "balance[0]", "unknown backend 'nope'"),
        (["e2", "e2"], "balance[1]", "'e2' is listed twice"),
        (["e1"], "balance[0]", "'e1' is the route's own backend"),
    ):
        r = httpx.post(url, json={"name": "rt", "backend": "e1", "balance": balance})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["message"].startswith(f"$.{param}: ") and said in error["message"], error
    r = httpx.post(url, json={"name": "rt", "backend": "e1", "balance": ["e2"]})
    assert r.status_code == 201, r.text
    assert sorted(answered_by(server, "rt", 2)) == ["e1", "e2"]
    listed = {m["name"]: m for m in httpx.get(url).json()["models"]}
    assert listed["rt"]["balance"] == ["e2"]


def test_a_named_backend_keeps_the_call(server: LiveServer) -> None:
    # A direct name naming one of the route's backends: the route (its name in the log),
    # on that backend, however the turn goes.
    for _ in range(3):
        r = chat(server, "e2/duo-up")
        assert r.status_code == 200 and r.json()["backend"] == "e2", r.text
        assert logged(server, r.json()["id"])["model"] == "duo"
    for _ in range(2):
        r = httpx.post(server.url + "/api/v1/embed", json={"model": "e2/duo-up", "input": ["a"]})
        assert r.status_code == 200, r.text
        assert logged(server, r.headers["x-request-id"])["backend"] == "e2"
    # OpenAI's `provider`: the route's own backend, and another of its backends.
    for provider in ("e1", "e1", "e1", "e2", "e2"):
        body = {
            "model": "duo",
            "provider": provider,
            "messages": [{"role": "user", "content": "hi"}],
        }
        r = httpx.post(server.url + "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        ev = logged(server, r.headers["x-request-id"])
        assert (ev["model"], ev["backend"]) == ("duo", provider)


def test_a_token_count_goes_to_a_backend_whose_circuit_lets_it(server: LiveServer) -> None:
    tried = []
    for _ in range(2):  # `down` is tried by one of them, fails, and its circuit opens
        r = chat(server, "counted")
        assert r.status_code == 200 and r.json()["backend"] == "alive", r.text
        tried += [a["backend"] for a in logged(server, r.json()["id"])["attempts"]]
    assert "down" in tried
    body = {"model": "counted", "messages": [{"role": "user", "content": "three short words"}]}
    r = httpx.post(server.url + "/v1/messages/count_tokens", json=body)
    assert r.status_code == 200 and r.json() == {"input_tokens": 3}, r.text


def test_the_turn_moves_only_with_a_call_that_goes_there(server: LiveServer) -> None:
    def fallback_never_tried() -> None:
        assert chat(server, "alt").json()["backend"] == "echo"  # `rr` is its fallback

    def refused_before_a_backend() -> None:
        image = {"data": "iVBORw0KGgo=", "media_type": "image/png"}  # a PNG's signature
        body = {"model": "rr", "messages": [{"role": "user", "content": "hi", "images": [image]}]}
        r = httpx.post(server.url + "/api/v1/chat", json=body)
        assert r.status_code == 400 and "reads text only" in r.json()["error"]["message"]

    def embed_probe() -> None:
        r = httpx.post(server.url + "/api/embed", json={"model": "rr", "input": []})
        assert r.status_code == 200 and r.json()["embeddings"] == []

    for between in (fallback_never_tried, refused_before_a_backend, embed_probe):
        first = answered_by(server, "rr", 1)
        between()
        assert answered_by(server, "rr", 1) != first, between.__name__
    # A balanced fallback that answers takes its turns as the route itself would.
    got = answered_by(server, "lost", 4)
    assert sorted(got[:2]) == ["e1", "e2"] and got[2:] == got[:2]


def test_a_backend_with_a_free_slot_takes_the_call_of_a_full_one(server: LiveServer) -> None:
    # q1 runs one call at a time, q2 five: six calls at once all run, none waits in vain
    # for q1 (a second each, past the 0.5 s a call waits for a slot).
    long = " ".join(["word"] * 20)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: chat(server, "queued", long), range(6)))
    assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
    assert sorted(r.json()["backend"] for r in answers) == ["q1"] + ["q2"] * 5
    # Each went where a slot was free: none waited for one.
    assert max(r.json()["timings"]["queue_ms"] for r in answers) < 250


def test_a_call_waiting_for_a_slot_takes_the_first_that_frees(server: LiveServer) -> None:
    long = " ".join(["word"] * 60)  # three seconds
    url = server.url + "/api/v1/chat"
    with ExitStack() as held, ExitStack() as freed:
        # Each stream's line iterator kept: one dropped closes its connection.
        streams = []
        for model, stack in (("r1only", held), ("r2only", freed), ("r2only", freed)):
            body = {"model": model, "messages": [{"role": "user", "content": long}]}
            r = stack.enter_context(httpx.stream("POST", url, json=body, timeout=10))
            streams.append(r.iter_lines())
            next(streams[-1])
            next(streams[-1])  # a token: the call holds its backend's slot
        # Every slot of both held: a call on `spill` picks r1 (the less busy), whose slot
        # stays held; r2's free meanwhile, and the call takes one of them then, not after
        # waiting out its 0.5 s for r1's.
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(chat, server, "spill")
            time.sleep(0.2)
            freed.close()
            r = waiting.result()
    assert r.status_code == 200 and r.json()["backend"] == "r2", r.text
    assert 150 <= logged(server, r.json()["id"])["queue_ms"] < 450


def router(routes: dict[str, Any], backends: dict[str, Any] | None = None, **more: Any) -> Router:
    settings = load_settings(
        {
            "backends": {
                "local": {"enabled": False},
                "other": {"kind": "echo"},
                **(backends or {}),
            },
            "models": {"default": "echo", "routes": routes},
            **more,
        },
        environ={},
    )
    kinds = registry()
    made = {n: build_backend(n, t, kinds) for n, t in enabled_backends(settings).items()}
    return Router(settings, made)


@pytest.mark.parametrize(
    ("balance", "error"),
    [
        (["nope"], "models.routes.m.balance[0]: unknown backend 'nope'; known: "),
        (["other", "other"], "models.routes.m.balance[1]: 'other' is listed twice"),
        (["other", "echo"], "models.routes.m.balance[1]: 'echo' is the route's own backend"),
    ],
)
def test_a_bad_balance_is_a_config_error_naming_the_key(balance: list[str], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        router({"m": {"backend": "echo", "balance": balance}})
    assert str(info.value).startswith(error)


def test_a_disabled_backend_is_left_out_and_a_stored_route_round_trips() -> None:
    r = router({"m": {"backend": "echo", "balance": ["local", "other"]}})
    assert [m.backend_name for m in r.routes["m"].pool] == ["echo", "other"]
    # As the state store holds it (Redis: JSON), read back by every replica.
    stored = msgspec.json.decode(
        msgspec.json.encode(msgspec.to_builtins(RouteSettings(backend="echo", balance=["other"])))
    )
    r.apply_stored({"rt": msgspec.convert(stored, RouteSettings)}, None)
    assert [m.backend_name for m in r.routes["rt"].pool] == ["echo", "other"]
    # A new runtime route naming a disabled one is told so.
    with pytest.raises(
        InvalidRequest, match=r"^\$\.balance\[0\]: backend 'local' is configured but disabled"
    ):
        r.register("rt2", RouteSettings(backend="echo", balance=["local"]))


def test_a_disabled_balanced_backend_is_warned_of_at_start_up(tmp_path: Path) -> None:
    routes = {
        "m": {"backend": "echo", "balance": ["local", "other"]},
        # Its own backend disabled too, and every one in its balance: left out, warned of
        # as that, with nothing said of its balance (it is not served at all).
        "gone": {"backend": "local", "balance": ["off"]},
    }
    with capture_logs() as logs:
        r = router(routes, {"off": {"kind": "echo", "enabled": False}})
    assert "gone" not in r.routes
    warned = [e for e in logs if e["event"] == "balance_backend_disabled"]
    assert [(e["key"], e["route"], e["backend"], e["log_level"]) for e in warned] == [
        ("models.routes.m.balance[0]", "m", "local", "warning")
    ]
    left_out = [e for e in logs if e["event"] == "route_backend_disabled"]
    # The shipped smollm2-135m route's backend, `local`, is disabled here too.
    assert [(e["key"], e["route"], e["backend"], e["log_level"]) for e in left_out] == [
        ("models.routes.smollm2-135m.backend", "smollm2-135m", "local", "warning"),
        ("models.routes.gone.backend", "gone", "local", "warning"),
    ]
    # `stella config --check` shows it, and still passes: the server starts.
    conf = tmp_path / "c.toml"
    conf.write_text(
        '[models]\ndefault = "m"\n[models.routes.m]\nbackend = "echo"\nbalance = ["local"]\n'
        "[backends.local]\nenabled = false\n"
    )
    out = stella_cli("config", "--check", "--config", str(conf), env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    [line] = [x for x in out.stderr.splitlines() if "balance_backend_disabled" in x]
    assert "models.routes.m.balance[0]" in line and "backend=local" in line, line
    # The shipped route to the disabled `local` backend is left out, and said so.
    [line] = [x for x in out.stderr.splitlines() if "route_backend_disabled" in x]
    assert "models.routes.smollm2-135m.backend" in line and "backend=local" in line, line


def test_a_request_with_images_goes_to_a_backend_that_reads_them() -> None:
    vision = {"vision": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}}
    r = router({"m": {"backend": "echo", "balance": ["vision"]}}, vision)
    route = r.routes["m"]
    r.busy["vision"] = 5  # far busier than echo, and still the one that reads images
    reads = [r.pick(route, lambda m: m.backend.reads_images).backend_name for _ in range(2)]
    assert reads == ["vision", "vision"]
    assert sorted(r.pick(route).backend_name for _ in range(2)) == ["echo", "echo"]
    # Listed as reading images: a user's images go to the backend that reads them.
    assert "images" in r.capabilities(route)
    assert "images" not in r.capabilities(router({"m": {"backend": "echo"}}).routes["m"])


async def test_a_call_waiting_for_its_key_s_slot_counts_on_the_backend_it_picked() -> None:
    r = router({"m": {"backend": "echo", "balance": ["other"]}})
    pipeline = Pipeline(r, lambda event, fields: None, admission=Limiter(r.settings))
    ask = ChatRequest(messages=[Message(role="user", content="hi")], model="m")
    one_at_a_time = Call(request_id="k", principal=Principal(name="k", max_concurrent=1))
    first = await pipeline.prepare(ask, Call(request_id="x"))  # echo, its turn
    held = await pipeline.prepare(ask, one_at_a_time)  # other, the idle one: the key's slot
    # Each busy with one, echo's turn: this one picks echo and waits for the key's slot.
    waiting = asyncio.create_task(pipeline.prepare(ask, one_at_a_time))
    await asyncio.sleep(0.05)
    assert not waiting.done() and r.busy == {"echo": 2, "other": 1}
    # The next call sees it there and goes to the other backend.
    then = await pipeline.prepare(ask, Call(request_id="y"))
    assert [i.route.backend_name for i in (first, held, then)] == ["echo", "other", "other"]
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for inference in (first, held, then):
        inference.finish()
    assert r.busy == {"echo": 0, "other": 0}


async def test_an_embed_call_named_to_a_backend_whose_circuit_is_open_goes_to_another() -> None:
    r = router({"m": {"backend": "echo", "balance": ["other"]}})
    pipeline = Pipeline(r, lambda event, fields: None, admission=Limiter(r.settings))
    breaker = r.breakers["other"]
    for _ in range(breaker.threshold):
        breaker.failure("upstream_error")
    assert not breaker.available()
    # Named (a direct `other/...` name, OpenAI `provider`): as a chat, skipped, answered
    # by the route's other backend, which is closed.
    inference = await pipeline.prepare_embed(
        EmbedRequest(input=["a b"], model="m"), Call(request_id="e", pin="other")
    )
    result = await inference.embeddings()
    assert len(result.embeddings) == 1
    tried = [(a["backend"], a["error"]) for a in inference.attempts]
    assert tried == [("other", "circuit_open"), ("echo", None)]
    assert r.busy == {"echo": 0, "other": 0}
    # Every backend's circuit open: the 503 naming both.
    breaker = r.breakers["echo"]
    for _ in range(breaker.threshold):
        breaker.failure("upstream_error")
    with pytest.raises(Unavailable, match="backends 'echo', 'other' have their circuits open"):
        await pipeline.prepare_embed(
            EmbedRequest(input=["a"], model="m"), Call(request_id="f", pin="other")
        )


async def test_an_image_goes_to_the_member_of_a_balanced_fallback_that_reads_it() -> None:
    vision = {"vision": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}}
    routes = {
        "t": {"backend": "echo", "fallbacks": ["b"]},
        "b": {"backend": "other", "balance": ["vision"]},
    }
    r = router(routes, vision)
    # Listed as reading images: one of its fallback's backends does.
    assert "images" in r.capabilities(r.routes["t"])
    pipeline = Pipeline(r, lambda event, fields: None, admission=Limiter(r.settings))
    image = {"data": "iVBORw0KGgo=", "media_type": "image/png"}  # a PNG's signature
    ask = msgspec.convert(
        {"model": "t", "messages": [{"role": "user", "content": "hi", "images": [image]}]},
        ChatRequest,
    )
    # Whatever the turn and the load (`other` idle, first in turn), the fallback's member
    # that reads images is the one in the chain, and the text-only route is skipped.
    for _ in range(2):
        inference = await pipeline.prepare(ask, Call(request_id="i"))
        assert [m.backend_name for m in inference.chain] == ["echo", "vision"]
        assert inference.skip_first == "text_only"
        inference.finish()


async def test_a_stored_runtime_route_names_balance_only_when_it_has_one() -> None:
    from stella.app import create_app

    settings = load_settings(
        {
            "backends": {"local": {"enabled": False}, "other": {"kind": "echo"}},
            "models": {"default": "echo"},
        },
        environ={},
    )
    app = create_app(settings)
    state = app.services.state  # type: ignore[attr-defined]
    url = "http://stella/api/v1/models"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        for body in (
            {"name": "plain", "backend": "echo"},
            {"name": "both", "backend": "echo", "balance": ["other"]},
        ):
            r = await client.post(url, json=body)
            assert r.status_code == 201, r.text
    # As the state store holds it (Redis: JSON). Without `balance`, a route a replica from
    # before it takes (its RouteSettings forbids a field it does not know).
    stored = msgspec.json.decode(msgspec.json.encode(await state.load_routes()))
    assert "balance" not in stored["plain"]
    assert stored["both"]["balance"] == ["other"]
    # Read back by another replica, each as it was registered.
    replica = router({})
    specs = {name: msgspec.convert(spec, RouteSettings) for name, spec in stored.items()}
    assert replica.apply_stored(specs, None) == []
    assert replica.routes["plain"].pool == ()
    assert [m.backend_name for m in replica.routes["both"].pool] == ["echo", "other"]


async def test_ready_says_another_backend_answers_for_a_default_whose_circuit_is_open() -> None:
    from stella.app import create_app

    settings = load_settings(
        {
            "backends": {"local": {"enabled": False}, "other": {"kind": "echo"}},
            "models": {"default": "m", "routes": {"m": {"backend": "echo", "balance": ["other"]}}},
        },
        environ={},
    )
    app = create_app(settings)
    router = app.services.router  # type: ignore[attr-defined]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        for backend in ("echo", "other"):
            breaker = router.breakers[backend]
            for _ in range(breaker.threshold):
                breaker.failure("upstream_error")
            r = await client.get("http://stella/ready")
            if backend == "echo":  # the route's own open: the other serves, still ready
                assert r.status_code == 200, r.text
                assert r.json()["checks"]["circuit"] == "ok (echo: open; backend 'other' answers)"
        # Both open: not ready.
        assert r.status_code == 503 and r.json()["checks"]["circuit"] == "echo: open", r.text


async def test_an_embed_call_waiting_for_a_slot_takes_the_first_that_frees() -> None:
    routes = {
        "m": {"backend": "echo", "balance": ["other"]},
        "e": {"backend": "echo"},
        "o": {"backend": "other"},
    }
    limits = {"backends": {"echo": 1, "other": 1}, "queue_timeout_s": 0.5}
    r = router(routes, limits=limits)
    pipeline = Pipeline(r, lambda event, fields: None, admission=Limiter(r.settings))
    ask = ChatRequest(messages=[Message(role="user", content="hi")], model="e")
    held = await pipeline.prepare(ask, Call(request_id="h"))  # echo's one slot
    freed = await pipeline.prepare(msgspec.structs.replace(ask, model="o"), Call(request_id="f"))
    # Both full, as busy: the embed call picks echo (its turn), whose slot stays held;
    # other's frees meanwhile, and the call takes it then, not after its whole wait.
    waiting = asyncio.create_task(
        pipeline.prepare_embed(EmbedRequest(input=["a b"], model="m"), Call(request_id="w"))
    )
    await asyncio.sleep(0.1)
    assert not waiting.done()
    freed.finish()
    inference = await waiting
    assert inference.route.backend_name == "other" and 80 <= inference.waited_ms < 400
    result = await inference.embeddings()
    assert len(result.embeddings) == 1
    held.finish()
    assert r.busy == {"echo": 0, "other": 0}


async def test_a_call_named_to_a_backend_that_stays_full_gets_the_503_there() -> None:
    routes = {
        "m": {"backend": "echo", "balance": ["other"]},
        "e": {"backend": "echo"},
    }
    limits = {"backends": {"echo": 1, "other": 1}, "queue_timeout_s": 0.2}
    r = router(routes, limits=limits)
    pipeline = Pipeline(r, lambda event, fields: None, admission=Limiter(r.settings))
    ask = ChatRequest(messages=[Message(role="user", content="hi")], model="e")
    held = await pipeline.prepare(ask, Call(request_id="h"))  # echo's one slot, for good
    # Named to echo (a direct `echo/m` name, OpenAI `provider`): `other` is idle, and the
    # call stays on echo all the same, as on a route without `balance`.
    named = msgspec.structs.replace(ask, model="m")
    with pytest.raises(Overloaded, match="backend echo already has 1 request running"):
        await pipeline.prepare(named, Call(request_id="c", pin="echo"))
    with pytest.raises(Overloaded, match="backend echo already has 1 request running"):
        await pipeline.prepare_embed(
            EmbedRequest(input=["a"], model="m"), Call(request_id="d", pin="echo")
        )
    assert r.busy == {"echo": 1, "other": 0}  # the held call alone
    # Not named: the idle backend takes it at once.
    inference = await pipeline.prepare(named, Call(request_id="n"))
    assert inference.route.backend_name == "other" and inference.waited_ms < 100
    inference.finish()
    held.finish()
    assert r.busy == {"echo": 0, "other": 0}


def run_now(step: Any) -> Any:
    """What coroutine `step` returns, run with no event loop: it must not suspend."""
    try:
        step.send(None)
    except StopIteration as done:
        return done.value
    step.close()
    raise AssertionError("suspended")


def test_a_balanced_call_on_memory_slots_takes_its_backend_s_free_slot_without_a_wait() -> None:
    # The one look a balanced call takes at the backend it picked, before it would wait
    # on every backend of the pool: in memory, taken or refused with no event loop at
    # all (no turn given away), as a call on a route without `balance` takes a free slot.
    routes = {"m": {"backend": "echo", "balance": ["other"]}}
    r = router(routes, limits={"backends": {"echo": 1, "other": 1}})
    limiter = Limiter(r.settings)
    slots = limiter.slots
    held = run_now(slots.acquire("backend:echo", 1, 0.0))
    assert held is not None and run_now(slots.acquire("backend:echo", 1, 0.0)) is None
    slots.release(held)
    ask = ChatRequest(messages=[Message(role="user", content="hi")], model="m")
    permit = run_now(limiter.admit(Call(request_id="c"), r.routes["m"], ask, others=("other",)))
    assert permit.backend == "" and not limiter.backend_free("echo")
    assert limiter.backend_free("other")
    permit.release()
    assert limiter.backend_free("echo")


async def test_a_chat_waiting_for_a_slot_is_counted_where_it_ends() -> None:
    routes = {
        "m": {"backend": "echo", "balance": ["other"]},
        "e": {"backend": "echo"},
        "o": {"backend": "other"},
    }
    limits = {
        "backends": {"echo": 1, "other": 1},
        "queue_timeout_s": 2,
        "models": {"m": {"requests_per_day": 100}},
    }
    r = router(routes, limits=limits)
    pipeline = Pipeline(r, lambda event, fields: None, admission=Limiter(r.settings))
    ask = ChatRequest(messages=[Message(role="user", content="hi")], model="e")
    on = msgspec.structs.replace(ask, model="m")
    held = await pipeline.prepare(ask, Call(request_id="h"))  # echo's one slot
    freed = await pipeline.prepare(msgspec.structs.replace(ask, model="o"), Call(request_id="f"))
    assert r.busy == {"echo": 1, "other": 1}
    # Both full: the call picks echo (its turn), counted there while it waits.
    waiting = asyncio.create_task(pipeline.prepare(on, Call(request_id="w")))
    await asyncio.sleep(0.1)
    assert not waiting.done() and r.busy == {"echo": 2, "other": 1}
    freed.finish()  # other's slot frees first: the call takes it, and is counted there
    inference = await asyncio.wait_for(waiting, 1)
    assert inference.route.backend_name == "other" and inference.waited_ms < 1000
    assert [m.backend_name for m in inference.chain] == ["other", "echo"]
    assert r.busy == {"echo": 1, "other": 1}
    # The model's limits charged once: one request of its day's hundred.
    assert inference.permit.headers[-2] == (b"x-quota-remaining", b"99")
    # A call that leaves while it waits: counted nowhere, and holds no slot of either.
    gone = asyncio.create_task(pipeline.prepare(on, Call(request_id="g")))
    await asyncio.sleep(0.1)
    assert r.busy == {"echo": 2, "other": 1} or r.busy == {"echo": 1, "other": 2}
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert r.busy == {"echo": 1, "other": 1}
    held.finish()
    inference.finish()
    await asyncio.sleep(0)  # a slot a losing wait took goes back as its wait ends
    assert r.busy == {"echo": 0, "other": 0}
    # Both slots free again: neither the call that left nor a losing wait holds one.
    assert pipeline.admission.backend_free("echo") and pipeline.admission.backend_free("other")
    # Both free in the same moment: the call takes the one it picked, and the other's
    # slot, which its losing wait may have taken too, goes back.
    one = await pipeline.prepare(ask, Call(request_id="1"))
    two = await pipeline.prepare(msgspec.structs.replace(ask, model="o"), Call(request_id="2"))
    waiting = asyncio.create_task(pipeline.prepare(on, Call(request_id="b")))
    await asyncio.sleep(0.05)
    picked = "echo" if r.busy["echo"] == 2 else "other"
    one.finish()
    two.finish()
    inference = await asyncio.wait_for(waiting, 1)
    assert inference.route.backend_name == picked
    await asyncio.sleep(0.01)
    assert r.busy == {"echo": 0, "other": 0} | {picked: 1}
    unpicked = {"echo": "other", "other": "echo"}[picked]
    assert pipeline.admission.backend_free(unpicked)
    assert not pipeline.admission.backend_free(picked)
    inference.finish()


async def test_a_balanced_fallback_tries_its_other_backends_after_the_one_picked() -> None:
    backends = {
        "eFail": FAILS,
        "eA": {"kind": "echo"},
        "eB": {"kind": "echo", "fail_after": 1, "error_code": "unavailable"},  # mid-answer
        "eC": {"kind": "echo"},
    }
    routes = {
        "fb": {"backend": "eFail", "fallbacks": ["bal"], "retries": 0},
        "bal": {"backend": "eA", "balance": ["eB", "eC"], "retries": 1, "retry_backoff_s": 0},
    }
    r = router(routes, backends, limits={"models": {"bal": {"requests_per_day": 100}}})
    events: list[dict[str, Any]] = []
    pipeline = Pipeline(r, lambda _, fields: events.append(fields), admission=Limiter(r.settings))
    ask = ChatRequest(messages=[Message(role="user", content="a b c")], model="bal", stream=False)
    assert (await (await pipeline.prepare(ask, Call(request_id="d"))).result()).backend == "eA"
    # eB's turn now: picked for the fallback, it fails twice (the route's retry), and the
    # fallback's other backends, idle and healthy, are tried next, as for `bal` itself.
    fb = msgspec.structs.replace(ask, model="fb")
    inference = await pipeline.prepare(fb, Call(request_id="f"))
    assert (await inference.result()).backend == "eC"
    assert [(a["backend"], a["error"]) for a in events[-1]["attempts"]] == [
        ("eFail", "upstream_error"),
        ("eB", "unavailable"),
        ("eB", "unavailable"),
        ("eC", None),
    ]
    # Its turn moved once, by the backend picked: eC's next, as after a call asking `bal`
    # that eB got. And its model's limits were taken once for the call, whichever served.
    inference = await pipeline.prepare(ask, Call(request_id="n"))
    assert inference.route.backend_name == "eC"
    assert inference.permit.headers[-2] == (b"x-quota-remaining", b"97")
    inference.finish()
    assert r.busy == {"eA": 0, "eB": 0, "eC": 0}
    assert all(pipeline.admission.backend_free(b) for b in ("eA", "eB", "eC"))


async def test_a_circuit_that_opens_while_a_call_waits_for_a_slot_reads_as_at_the_door() -> None:
    once = {"kind": "echo", "fail_first_calls": 1}
    backends = {"eStall": once, "eX": once, "eY": once}
    routes = {
        "stall": {"backend": "eStall", "retries": 0},
        "two": {"backend": "eX", "retries": 0, "fallbacks": ["y"]},
        "y": {"backend": "eY", "retries": 0},
    }
    r = router(
        routes,
        backends,
        limits={"backends": {"eStall": 1, "eX": 1}, "queue_timeout_s": 2},
        breaker={"failure_threshold": 1, "cooldown_s": 60},
    )
    events: list[dict[str, Any]] = []
    pipeline = Pipeline(r, lambda _, fields: events.append(fields), admission=Limiter(r.settings))
    ask = ChatRequest(messages=[Message(role="user", content="hi")], model="stall", stream=False)
    held = await pipeline.prepare(ask, Call(request_id="h"))  # eStall's one slot
    waiting = asyncio.create_task(pipeline.prepare(ask, Call(request_id="w")))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # admitted while the circuit was closed: waits for the slot
    with pytest.raises(StellaError):
        await held.result()  # fails: the circuit opens, and the slot frees
    inference = await asyncio.wait_for(waiting, 1)
    words = "model 'stall' is unavailable: backend 'eStall' has its circuit open"
    with pytest.raises(Unavailable) as late:
        await inference.result()
    assert late.value.message == words
    # Charged, so logged, as any admitted call is.
    assert events[-1]["request_id"] == "w" and events[-1]["status"] == 503
    assert events[-1]["error_code"] == "unavailable"
    assert events[-1]["attempts"] == [
        {"backend": "eStall", "route": "stall", "error": "circuit_open"}
    ]
    # Refused at the door for the same state: the same words, and no event.
    with pytest.raises(Unavailable) as door:
        await pipeline.prepare(ask, Call(request_id="x"))
    assert door.value.message == words and len(events) == 2
    # A chain whose every circuit opened meanwhile: each backend named, as at the door.
    ask = msgspec.structs.replace(ask, model="two")
    held = await pipeline.prepare(ask, Call(request_id="h2"))
    waiting = asyncio.create_task(pipeline.prepare(ask, Call(request_id="w2")))
    await asyncio.sleep(0.05)
    with pytest.raises(StellaError):
        await held.result()  # eX fails, then its fallback's eY: both circuits open
    inference = await asyncio.wait_for(waiting, 1)
    words = "model 'two' is unavailable: backends 'eX', 'eY' have their circuits open"
    with pytest.raises(Unavailable) as late:
        await inference.result()
    assert late.value.message == words and events[-1]["request_id"] == "w2"
    assert [a["error"] for a in events[-1]["attempts"]] == ["circuit_open"] * 2
    with pytest.raises(Unavailable) as door:
        await pipeline.prepare(ask, Call(request_id="x2"))
    assert door.value.message == words


async def test_a_route_whose_own_backend_is_disabled_is_served_by_its_balance() -> None:
    from stella.app import create_app

    routes = {
        "m": {"backend": "off", "balance": ["e1", "e2"], "upstream_model": "m-up"},
        "lone": {"backend": "off", "balance": ["e2"], "aliases": ["solo"]},
    }
    backends = {
        "off": {"kind": "echo", "enabled": False},
        "e1": {"kind": "echo"},
        "e2": {"kind": "echo"},
    }
    with capture_logs() as logs:
        router(routes, backends)
    # Said once, as it starts: which key, which backend, and that the route is served.
    said = [
        (e["key"], e["detail"])
        for e in logs
        if e["event"] == "route_backend_disabled" and e["route"] in routes
    ]
    served = "backends.off.enabled = false: the route is served by its balance without it"
    assert said == [("models.routes.m.backend", served), ("models.routes.lone.backend", served)]
    settings = load_settings(
        {
            "backends": {"local": {"enabled": False}, **backends},
            "models": {"default": "m", "allow_direct": True, "routes": routes},
        },
        environ={},
    )
    app = create_app(settings)
    table = app.services.router  # type: ignore[attr-defined]
    assert [r.backend_name for r in table.chain(table.resolve("m"))] == ["e1", "e2"]
    assert table.resolve("solo").pool == ()  # one backend left: no pool, as any route
    ask = {"messages": [{"role": "user", "content": "three short words"}]}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://stella"
    ) as client:
        listed = {m["name"]: m for m in (await client.get("/api/v1/models")).json()["models"]}
        assert [listed["m"][k] for k in ("backend", "balance", "left_out", "default")] == [
            "e1",
            ["e2"],
            ["off"],
            True,
        ]
        assert [listed["lone"][k] for k in ("backend", "balance", "left_out")] == [
            "e2",
            [],
            ["off"],
        ]
        assert listed["echo"]["left_out"] == []
        # The other lists have no field for backends: each route once, OpenAI's owner the
        # backend the native list names.
        data = (await client.get("/v1/models")).json()["data"]
        owners = {m["id"]: m["owned_by"] for m in data}
        assert (owners["m"], owners["lone"]) == ("e1", "e2")
        tags = [m["name"] for m in (await client.get("/api/tags")).json()["models"]]
        assert {"m", "lone"} <= {t.split(":")[0] for t in tags}
        r = await client.get("/ready")
        assert r.status_code == 200, r.text
        backends = set()
        for model in ("m", None, "e2/m-up", "solo"):  # the default too, and a direct name
            r = await client.post("/api/v1/chat", json={**ask, "model": model, "stream": False})
            assert r.status_code == 200 and r.json()["model"] in ("m", "lone"), r.text
            backends.add(r.json()["backend"])
        assert backends == {"e1", "e2"}
        r = await client.post("/api/v1/chat", json={**ask, "model": "off/m-up", "stream": False})
        assert r.status_code == 404, r.text
        r = await client.post("/v1/messages/count_tokens", json={**ask, "model": "m"})
        assert r.status_code == 200 and r.json() == {"input_tokens": 3}, r.text
        r = await client.post("/api/v1/embed", json={"model": "m", "input": ["a b"]})
        assert r.status_code == 200, r.text
        # A runtime route naming the disabled backend is still refused, said so.
        r = await client.post("/api/v1/models", json={"name": "rt", "backend": "off"})
        assert r.status_code == 400 and "disabled" in r.json()["error"]["message"], r.text


def test_a_default_served_only_by_its_balance_passes_the_config_check(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        '[models]\ndefault = "m"\n[models.routes.m]\nbackend = "local"\nbalance = ["echo"]\n'
        "[backends.local]\nenabled = false\n"
    )
    out = stella_cli("config", "--check", "--config", str(conf), env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    [line] = [x for x in out.stderr.splitlines() if "models.routes.m.backend" in x]
    assert "route_backend_disabled" in line and "served by its balance" in line, line
    # Every backend of the default route disabled: refused, as before, naming them.
    with pytest.raises(ConfigError, match=r"uses disabled backend 'local' \(and its balance"):
        load_settings(
            {
                "backends": {
                    "local": {"enabled": False},
                    "off": {"kind": "echo", "enabled": False},
                },
                "models": {
                    "default": "m",
                    "routes": {"m": {"backend": "local", "balance": ["off"]}},
                },
            },
            environ={},
        )
