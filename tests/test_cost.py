"""Spend in money: route prices, each call's cost (the inference event, the usage report,
the metrics) and daily budgets in USD, in one process; the Redis ones, shared by
replicas, are in test_redis.py."""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from stella.backends import ConfigError
from stella.client import AsyncClient, Client
from stella.cost import Rates
from stella.settings import Price, load_settings
from tests.fakes.openai import CACHED, FakeOpenAI
from tests.fakes.server import serve
from tests.live import merge, run_stella, stella_cli
from tests.test_key_lifecycle import listed, made
from tests.test_keys import KEYS, ROOT, app_for, calls
from tests.test_limits import KEY, sha
from tests.test_quota import assert_midnight, chat

H = {"Authorization": f"Bearer {KEY}"}
# USD per million tokens: a token of prompt 1 micro-dollar, of answer 2.
PRICE = {"input": 1.0, "output": 2.0}


def priced(price: dict | None = None, **route: object) -> dict:
    """The echo route, priced."""
    return {"models": {"routes": {"echo": {"backend": "echo", "price": price or PRICE, **route}}}}


def cost_of(usage: dict, price: dict = PRICE) -> float:
    """What `usage` costs at `price` (no cached tokens), in USD."""
    return (
        usage["prompt_tokens"] * price["input"] + usage["completion_tokens"] * price["output"]
    ) / 1e6


# --- the arithmetic ---------------------------------------------------------------------


def test_a_price_per_million_tokens_is_nano_dollars_a_token() -> None:
    rates = Rates(Price(input=0.15, output=0.60))
    # 1000 tokens in at $0.15/M and 1000 out at $0.60/M: $0.00075, 750,000 nano-dollars.
    assert rates.cost(1000, 1000) == 750_000
    # Without a cached price, cached prompt tokens cost what any prompt token does.
    assert rates.cost(1000, 0, cached=400) == rates.cost(1000, 0) == 150_000
    cached = Rates(Price(input=0.15, output=0.60, cached_input=0.075))
    assert cached.cost(1000, 0, cached=400) == 600 * 150 + 400 * 75
    # A count the upstream got wrong (more cached than read) bills no more than the prompt
    # at the cached rate, never a negative prompt.
    assert cached.cost(10, 0, cached=50) == 10 * 75
    # A fraction of a nano-dollar is rounded: 3 tokens at $0.0001/M.
    assert Rates(Price(input=0.0001)).cost(3, 0) == 0
    assert Rates(Price()).cost(10**6, 10**6) == 0


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "says"),
    [
        ("{ input = -0.1 }", "models.routes.echo.price.input: Expected `float` >= 0.0"),
        ("{ output = inf }", "models.routes.echo.price.output: Expected `float` <= 100000.0"),
        (
            "{ cached_input = nan }",
            "models.routes.echo.price.cached_input: Expected `float` >= 0.0",
        ),
        ("{ input = 1, outptu = 2 }", "models.routes.echo.price: Object contains unknown field"),
        ("{ input = 'cheap' }", "models.routes.echo.price.input: Expected `float`, got `str`"),
        ("{ output = 1e9 }", "models.routes.echo.price.output: Expected `float` <= 100000.0"),
    ],
)
def test_a_bad_price_names_its_key(tmp_path: Path, price: str, says: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'[models.routes.echo]\nbackend = "echo"\nprice = {price}\n')
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"STELLA_CONFIG": str(conf)})
    assert str(info.value).startswith(says), str(info.value)


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ("[limits]\nusd_per_day = -1\n", "limits.usd_per_day: Expected `float` >= 0.0"),
        (
            "[limits.models.echo]\nusd_per_day = nan\n",
            "limits.models.echo.usd_per_day: Expected `float` >= 0.0",
        ),
        (
            '[auth.keys.a]\nsha256 = "' + "0" * 64 + '"\nusd_per_day = inf\n',
            "auth.keys.a.usd_per_day: Expected `float` <= 1000000.0",
        ),
    ],
)
def test_a_bad_budget_names_its_key(tmp_path: Path, toml: str, says: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"STELLA_CONFIG": str(conf)})
    assert str(info.value).startswith(says), str(info.value)


def test_a_bad_price_stops_start_up_with_exit_2(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[models.routes.echo]\nbackend = "echo"\nprice = { input = -1 }\n')
    proc = stella_cli("serve", env={"STELLA_CONFIG": str(conf), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "models.routes.echo.price.input" in lines[0], proc.stderr


def test_a_budget_from_the_environment() -> None:
    s = load_settings(environ={"STELLA_LIMITS__USD_PER_DAY": "2.5"})
    assert s.limits.usd_per_day == 2.5


# --- cost, in one process ---------------------------------------------------------------


def test_a_priced_route_s_calls_carry_their_cost_everywhere() -> None:
    cfg = priced(fallbacks=[])
    cfg["models"]["routes"]["free"] = {"backend": "echo"}
    with run_stella(cfg) as server:
        r = httpx.post(server.url + "/api/v1/chat", json=chat("one two three four"))
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        want = cost_of(usage)
        rid = r.headers["x-request-id"]
        event = server.wait_event(lambda e: e["request_id"] == rid)
        assert event["cost_usd"] == pytest.approx(want, abs=1e-9)
        assert "usage_estimated" not in event  # echo counts its own usage exactly
        # A route without a price: no cost at all, not a cost of 0.
        r = httpx.post(server.url + "/api/v1/chat", json=chat(model="free"))
        rid = r.headers["x-request-id"]
        assert "cost_usd" not in server.wait_event(lambda e: e["request_id"] == rid)
        report = httpx.get(server.url + "/api/v1/usage").json()
        rows = {row["model"]: row for row in report["usage"]}
        assert rows["echo"]["cost_usd"] == pytest.approx(want, abs=1e-9)
        assert rows["free"]["cost_usd"] == 0
        assert report["totals"]["cost_usd"] == pytest.approx(want, abs=1e-9)
        metrics = httpx.get(server.url + "/metrics").text
        line = next(
            x for x in metrics.splitlines() if x.startswith('stella_cost_usd_total{model="echo"}')
        )
        assert float(line.split()[-1]) == pytest.approx(want, abs=1e-9)
        assert 'stella_cost_usd_total{model="free"}' not in metrics
        # The Python client's report and `stella usage` show it too.
        with Client(server.url) as client:
            got = client.usage(model="echo")
        assert [(r.model, r.cost_usd) for r in got.usage] == [("echo", rows["echo"]["cost_usd"])]
        assert got.totals.cost_usd == rows["echo"]["cost_usd"]
        proc = stella_cli("usage", "--url", server.url, "--model", "echo")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split()[-1] == "COST_USD" and lines[1].split()[:2] == ["anonymous", "echo"]
        assert lines[1].split()[-1] == f"{want:.9f}".rstrip("0") and lines[-1].startswith("(total)")


def test_a_fallback_s_answer_is_priced_at_the_fallback_s_price() -> None:
    cheap = {"input": 1.0, "output": 1.0}
    cfg = {
        "backends": {"broken": {"kind": "echo", "fail_before_first": True}},
        "models": {
            "routes": {
                "dear": {
                    "backend": "broken",
                    "price": {"input": 100.0, "output": 100.0},
                    "fallbacks": ["cheap"],
                    "retries": 0,
                },
                "cheap": {"backend": "echo", "price": cheap},
            }
        },
    }
    with run_stella(cfg) as server:
        r = httpx.post(server.url + "/api/v1/chat", json=chat("a b c", model="dear"))
        assert r.status_code == 200 and r.json()["backend"] == "echo", r.text
        rid = r.headers["x-request-id"]
        event = server.wait_event(lambda e: e["request_id"] == rid)
        assert event["cost_usd"] == pytest.approx(cost_of(r.json()["usage"], cheap), abs=1e-9)
        # Counted under the model asked for, as the usage report counts the call.
        row = httpx.get(server.url + "/api/v1/usage").json()["usage"][0]
        assert row["model"] == "dear" and row["cost_usd"] == event["cost_usd"]


def test_cached_prompt_tokens_are_billed_at_their_price() -> None:
    price = {"input": 10.0, "output": 20.0, "cached_input": 1.0}
    fake = FakeOpenAI()
    with serve(fake.app) as url:
        cfg = {
            "backends": {"up": {"kind": "openai", "base_url": url + "/v1"}},
            "models": {
                "routes": {
                    "cached": {"backend": "up", "price": price},
                    "plain": {"backend": "up", "upstream_model": "cached", "price": PRICE},
                }
            },
        }
        with run_stella(cfg) as server:
            r = httpx.post(server.url + "/api/v1/chat", json=chat(model="cached"))
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert usage["prompt_tokens_details"] == {"cached_tokens": CACHED}
            rid = r.headers["x-request-id"]
            event = server.wait_event(lambda e: e["request_id"] == rid)
            fresh = usage["prompt_tokens"] - CACHED
            want = (fresh * 10.0 + CACHED * 1.0 + usage["completion_tokens"] * 20.0) / 1e6
            assert event["cost_usd"] == pytest.approx(want, abs=1e-9)
            # Without a cached price, the cached tokens cost what the others do.
            r = httpx.post(server.url + "/api/v1/chat", json=chat(model="plain"))
            rid = r.headers["x-request-id"]
            event = server.wait_event(lambda e: e["request_id"] == rid)
            assert event["cost_usd"] == pytest.approx(cost_of(r.json()["usage"]), abs=1e-9)


def test_a_runtime_route_takes_a_price_and_a_bad_one_is_a_400() -> None:
    with run_stella() as server:
        body = {"name": "paid", "backend": "echo", "price": {"input": 5.0, "output": 7.0}}
        r = httpx.post(server.url + "/api/v1/models", json=body)
        assert r.status_code == 201, r.text
        r = httpx.post(server.url + "/api/v1/chat", json=chat("x y", model="paid"))
        rid = r.headers["x-request-id"]
        event = server.wait_event(lambda e: e["request_id"] == rid)
        want = cost_of(r.json()["usage"], {"input": 5.0, "output": 7.0})
        assert event["cost_usd"] == pytest.approx(want, abs=1e-9)
        for price, says in (
            ('{"input": -1}', "$.price.input"),
            ('{"output": 1e999}', "$.price.output"),  # inf, once read
            ('{"input": 1, "cached": 1}', "$.price"),
        ):
            raw = f'{{"name": "paid", "backend": "echo", "price": {price}}}'
            r = httpx.post(
                server.url + "/api/v1/models",
                content=raw,
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 400, r.text
            assert says in r.json()["error"]["message"], r.text


# --- budgets, in one process ------------------------------------------------------------


def test_a_key_s_budget_refuses_the_call_after_the_day_s_spend_reached_it() -> None:
    # Each call costs some tens of micro-dollars: the first takes the day past 1.
    cfg = priced({"input": 10.0, "output": 10.0})
    cfg["auth"] = {"keys": {"q": {"sha256": sha(KEY), "usd_per_day": 0.000001, "admin": True}}}
    cfg["models"]["routes"]["free"] = {"backend": "echo"}
    with run_stella(cfg) as server:
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat("one two three"))
        assert r.status_code == 200, r.text
        # The budget's headers, in USD: what is left after this call's reservation.
        assert r.headers["x-quota-limit"] == "0.000001"
        assert r.headers["x-quota-remaining"] == "0.000000"
        spent = cost_of(r.json()["usage"], {"input": 10.0, "output": 10.0})
        assert spent > 0.000001  # settled with what it cost: past the budget, as allowed
        for model in ("echo", "free"):  # the key's day is over, on any route
            r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat(model=model))
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert err["code"] == "quota_exceeded" and err["retryable"] is False
            assert err["message"].startswith(
                "daily budget of 0.000001 USD used up for key q (0.000000 left); "
                "it renews at 00:00 UTC"
            )
            assert r.headers["x-quota-limit"] == "0.000001"
            assert r.headers["x-quota-remaining"] == "0.000000"
            assert_midnight(r)
        report = httpx.get(server.url + "/api/v1/usage", headers=H).json()
        assert report["totals"]["requests"] == 1  # the refused calls count nothing
        assert report["totals"]["cost_usd"] == pytest.approx(spent, abs=1e-9)


def test_a_budget_is_reserved_then_settled_with_the_cost() -> None:
    # $1 a million tokens both ways: a token is a micro-dollar. A budget of $0.001.
    cfg = priced({"input": 1.0, "output": 1.0})
    cfg["limits"] = {"usd_per_day": 0.001}  # every key's, as [limits] gives quotas
    cfg["auth"] = {"keys": {"q": {"sha256": sha(KEY), "admin": True}}}
    with run_stella(cfg) as server:
        # Reserved: max_tokens and the prompt's estimate (3 tokens), at the route's price.
        r = httpx.post(
            server.url + "/api/v1/chat", headers=H, json=chat("one two three", max_tokens=300)
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-quota-remaining"] == f"{(1000 - 303) / 1e6:.6f}"
        used = r.json()["usage"]["total_tokens"]
        # Settled with what it cost: the next call finds only that spent ("hi" is no
        # whole token of estimate: 100 reserved).
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat("hi", max_tokens=100))
        assert r.status_code == 200, r.text
        assert r.headers["x-quota-remaining"] == f"{(1000 - used - 100) / 1e6:.6f}"
        keys = httpx.get(server.url + "/api/v1/keys", headers=H).json()["keys"]
        assert keys[0]["usd_per_day"] == 0.001  # the default that applies


def test_a_model_s_budget_holds_for_every_key_and_a_runtime_key_takes_one() -> None:
    other = "sk-limits-test-0002"
    cfg = priced({"input": 10.0, "output": 10.0})
    cfg["limits"] = {"models": {"echo": {"usd_per_day": 0.000001}}}
    cfg["auth"] = {"keys": {"q": {"sha256": sha(KEY), "admin": True}, "r": {"sha256": sha(other)}}}
    with run_stella(cfg) as server:
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat())
        assert r.status_code == 200, r.text
        r = httpx.post(
            server.url + "/api/v1/chat", headers={"Authorization": f"Bearer {other}"}, json=chat()
        )
        assert r.status_code == 429 and "for model echo" in r.json()["error"]["message"]
        # A runtime key's budget, listed and held as a configured key's.
        r = httpx.post(
            server.url + "/api/v1/keys", headers=H, json={"name": "rt", "usd_per_day": 0.5}
        )
        assert r.status_code == 201 and r.json()["usd_per_day"] == 0.5, r.text
        listed = {
            k["name"]: k for k in httpx.get(server.url + "/api/v1/keys", headers=H).json()["keys"]
        }
        assert listed["rt"]["usd_per_day"] == 0.5 and listed["r"]["usd_per_day"] == 0
        r = httpx.post(
            server.url + "/api/v1/keys", headers=H, json={"name": "bad", "usd_per_day": -1}
        )
        assert r.status_code == 400 and "$.usd_per_day" in r.json()["error"]["message"]


def test_keys_new_writes_a_budget_and_refuses_a_bad_one() -> None:
    proc = stella_cli("keys", "new", "alice", "--usd", "2.5")
    assert proc.returncode == 0, proc.stderr
    assert "usd_per_day = 2.5" in proc.stdout.splitlines()
    # In decimals, not Python's exponent form (1e-05).
    proc = stella_cli("keys", "new", "alice", "--usd", "0.00001")
    assert proc.returncode == 0, proc.stderr
    assert "usd_per_day = 0.00001" in proc.stdout.splitlines(), proc.stdout
    for bad in ("-1", "nan", "lots"):
        proc = stella_cli("keys", "new", "alice", "--usd", bad)
        assert proc.returncode == 2 and "--usd" in proc.stderr, proc.stderr


# --- a runtime key's budget through its life ----------------------------------------------


def test_a_runtime_key_s_budget_and_its_day_s_spend_survive_an_update_and_a_rotation() -> None:
    # Each call costs some tens of micro-dollars: the first takes the day past 1.
    app = app_for(merge(KEYS, priced({"input": 10.0, "output": 10.0})))
    first = made(app, {"name": "rt", "usd_per_day": 0.000001})
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/chat", first, chat("one two three"))))
    assert r.status_code == 200, r.text
    spent_out = "daily budget of 0.000001 USD used up for key rt"
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/chat", first, chat())))
    assert r.status_code == 429 and r.json()["error"]["message"].startswith(spent_out)
    # Another setting changed: the budget stays, and so does the day's spend (counted by
    # the key's name, which an update keeps).
    (r,) = asyncio.run(calls(app, ("PATCH", "/api/v1/keys/rt", ROOT, {"requests_per_minute": 100})))
    assert r.status_code == 200 and r.json()["usd_per_day"] == 0.000001, r.text
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/chat", first, chat())))
    assert r.status_code == 429 and r.json()["error"]["message"].startswith(spent_out)
    # A new secret: the same key, its budget and the day's spend with it.
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/keys/rt/rotate", ROOT, None)))
    assert r.status_code == 201 and r.json()["usd_per_day"] == 0.000001, r.text
    second = r.json()["key"]
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/chat", second, chat())))
    assert r.status_code == 429 and r.json()["error"]["message"].startswith(spent_out)
    assert listed(app, "rt")["usd_per_day"] == 0.000001
    assert app.state.stella.state.keys["rt"]["usd_per_day"] == 0.000001


def test_an_update_changes_a_runtime_key_s_budget_the_day_s_spend_kept() -> None:
    # $1 a million tokens both ways: a token is a micro-dollar. A budget of $0.001.
    app = app_for(merge(KEYS, priced({"input": 1.0, "output": 1.0})))
    key = made(app, {"name": "rt", "usd_per_day": 0.001})
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/chat", key, chat("one two three"))))
    assert r.status_code == 200, r.text
    used = r.json()["usage"]["total_tokens"]
    (r,) = asyncio.run(calls(app, ("PATCH", "/api/v1/keys/rt", ROOT, {"usd_per_day": 0.002})))
    assert r.status_code == 200, r.text
    assert r.json()["usd_per_day"] == 0.002 and listed(app, "rt")["usd_per_day"] == 0.002
    store = app.state.stella.state
    assert store.keys["rt"]["usd_per_day"] == 0.002
    # The new budget, less what the day spent before the change ("hi": 100 reserved).
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/chat", key, chat("hi", max_tokens=100))))
    assert r.status_code == 200, r.text
    assert r.headers["x-quota-limit"] == "0.002000"
    assert r.headers["x-quota-remaining"] == f"{(2000 - used - 100) / 1e6:.6f}"
    used += r.json()["usage"]["total_tokens"]
    # Lowered under what the day spent: nothing left, not the new budget whole.
    (r,) = asyncio.run(
        calls(app, ("PATCH", "/api/v1/keys/rt", ROOT, {"usd_per_day": (used - 1) / 1e6}))
    )
    assert r.status_code == 200, r.text
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/chat", key, chat())))
    assert r.status_code == 429 and "(0.000000 left)" in r.json()["error"]["message"], r.text
    # Back to 0, none: the stored entry leaves the field out, as a stella from before
    # budgets wrote (and reads) one.
    (r,) = asyncio.run(calls(app, ("PATCH", "/api/v1/keys/rt", ROOT, {"usd_per_day": 0})))
    assert r.status_code == 200 and r.json()["usd_per_day"] == 0, r.text
    assert "usd_per_day" not in store.keys["rt"]
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/chat", key, chat())))
    assert r.status_code == 200 and "x-quota-limit" not in r.headers, r.text
    for bad in (-1, 1e7, "1"):
        (r,) = asyncio.run(calls(app, ("PATCH", "/api/v1/keys/rt", ROOT, {"usd_per_day": bad})))
        assert r.status_code == 400 and "$.usd_per_day" in r.json()["error"]["message"], r.text


def test_the_clients_and_stella_keys_update_change_a_budget() -> None:
    with run_stella(merge(KEYS, priced())) as server:
        with Client(server.url, api_key=ROOT) as c:
            c.create_key("rt", models=["echo"], usd_per_day=0.5)
            changed = c.update_key("rt", usd_per_day=1.25)
            assert (changed.usd_per_day, changed.models) == (1.25, ["echo"])
            # Left out (None): unchanged.
            assert c.update_key("rt", requests_per_minute=5).usd_per_day == 1.25

        async def in_async() -> float | None:
            async with AsyncClient(server.url, api_key=ROOT) as c:
                return (await c.update_key("rt", usd_per_day=0.75)).usd_per_day

        assert asyncio.run(in_async()) == 0.75
        env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
        env["STELLA_API_KEY"] = ROOT
        url = ("--url", server.url)
        proc = stella_cli("keys", "update", "rt", "--usd", "2.5", *url, env=env)
        assert proc.returncode == 0 and proc.stdout.strip() == "updated rt", proc.stderr
        table = stella_cli("keys", "list", *url, env=env).stdout.splitlines()
        column = table[0].split().index("USD/DAY")
        (row,) = [line.split() for line in table if line.startswith("rt ")]
        assert row[column] == "2.5" and row[column - 1] == "0", row  # TPD beside it
        bad = stella_cli("keys", "update", "rt", "--usd", "-1", *url, env=env)
        assert bad.returncode == 2 and "--usd" in bad.stderr, bad.stderr


def test_a_balanced_route_is_priced_on_every_backend_and_a_replaced_one_anew() -> None:
    cfg = {
        "backends": {"off": {"kind": "echo", "enabled": False}, "e2": {"kind": "echo"}},
        "models": {
            # Its own backend disabled: served by its balance, at its price.
            "routes": {"lo": {"backend": "off", "balance": ["echo", "e2"], "price": PRICE}}
        },
    }
    app = app_for(merge(KEYS, cfg))
    router = app.state.stella.router
    route = router.routes["lo"]
    assert [m.backend_name for m in route.pool] == ["echo", "e2"]
    assert route.left_out == ("off",)
    # One price for the pool: the limiter's plans know a route's price by it.
    assert {id(m.price) for m in route.pool} == {id(route.price)} and route.price
    dear = {"input": 100.0, "output": 100.0}
    body = {"name": "rt", "backend": "echo", "balance": ["e2"], "price": PRICE}
    key = made(app, {"name": "k", "usd_per_day": 1.0})

    def costs(model: str) -> list[tuple[str, float, float]]:
        """(backend, cost_usd, the cost at `dear`) of two calls, one per backend."""
        records: list[dict] = []
        listeners = app.state.stella.pipeline.listeners
        listeners.append(records.append)
        try:
            for _ in range(2):
                (r,) = asyncio.run(calls(app, ("POST", "/api/v1/chat", key, chat(model=model))))
                assert r.status_code == 200, r.text
        finally:
            listeners.remove(records.append)
        return [
            (e["backend"], e["cost_usd"], cost_of(e, dear))
            for e in records
            if e.get("op") != "embed"
        ]

    assert {b for b, _, _ in costs("lo")} == {"echo", "e2"}
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/models", ROOT, body)))
    assert r.status_code == 201, r.text
    assert all(cost < at_dear for _, cost, at_dear in costs("rt"))
    # Replaced at runtime with another price: every backend's calls cost the new one.
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/models", ROOT, {**body, "price": dear})))
    assert r.status_code == 200, r.text
    served = costs("rt")
    assert {b for b, _, _ in served} == {"echo", "e2"}
    assert all(cost == pytest.approx(at_dear, abs=1e-9) for _, cost, at_dear in served)


# --- a budget under concurrency -----------------------------------------------------------


async def at_once(app: object, n: int, body: dict, key: str = KEY) -> list[httpx.Response]:
    """`n` calls of `body` at once, in process."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
        base_url="http://127.0.0.1",
        timeout=30,
    ) as c:
        return await asyncio.gather(
            *(
                c.post("/api/v1/chat", json=body, headers={"Authorization": f"Bearer {key}"})
                for _ in range(n)
            )
        )


def spent_usd(app: object) -> float:
    """What the usage report says the day's calls cost."""
    (r,) = asyncio.run(calls(app, ("GET", "/api/v1/usage", ROOT, None)))
    assert r.status_code == 200, r.text
    return r.json()["totals"]["cost_usd"]


@pytest.mark.parametrize("asked", ["unp", "cheap"])
def test_a_key_s_budget_is_reserved_at_the_dearest_price_of_its_fallbacks(asked: str) -> None:
    # The asked route's backend fails at once; its fallback answers, slowly, at $10 a
    # million tokens both ways (10 micro-dollars a token). The budget is 30 such tokens.
    dear = {"input": 10.0, "output": 10.0}
    cfg = {
        "backends": {
            "broken": {"kind": "echo", "fail_before_first": True},
            "slow": {"kind": "echo", "delay_s": 0.05},
        },
        "models": {
            "routes": {
                "unp": {"backend": "broken", "fallbacks": ["slowp"], "retries": 0},
                "cheap": {
                    "backend": "broken",
                    "fallbacks": ["slowp"],
                    "retries": 0,
                    "price": {"input": 0.01, "output": 0.01},
                },
                "slowp": {"backend": "slow", "price": dear},
            }
        },
        "limits": {"usd_per_day": 0.0003},
    }
    app = app_for(merge(KEYS, merge(cfg, {"auth": {"keys": {"q": {"sha256": sha(KEY)}}}})))
    body = chat("one two three four", model=asked, max_tokens=8)
    got = asyncio.run(at_once(app, 20, body))
    ok = [r for r in got if r.status_code == 200]
    assert all(r.status_code in (200, 429) for r in got), [r.text for r in got]
    # Each reserved what its fallback could cost (8 + 4 tokens: 120 micro-dollars), not
    # the asked route's price: two whole reservations and what was left fit, no more.
    assert 1 <= len(ok) <= 3, [r.status_code for r in got]
    one = max(cost_of(r.json()["usage"], dear) for r in ok)
    assert spent_usd(app) <= 0.0003 + one + 1e-9


@pytest.mark.parametrize(
    ("limit", "says"),
    [
        ({"usd_per_day": 0.01}, "daily budget of 0.010000 USD for key q: 0.000000 left, "),
        ({"tokens_per_day": 1000}, "daily quota of 1000 tokens for key q: 0 left, "),
    ],
)
def test_a_day_held_by_calls_still_running_is_a_short_wait_not_midnight(
    limit: dict, says: str
) -> None:
    # 10 micro-dollars a token: the budget is 1000 tokens, as the token quota. Each call
    # reserves 204 tokens (max_tokens and the prompt's estimate) and uses a handful.
    cfg = {
        "backends": {"slow": {"kind": "echo", "delay_s": 0.2}},
        "models": {
            "routes": {"slowp": {"backend": "slow", "price": {"input": 10.0, "output": 10.0}}}
        },
        "auth": {"keys": {"q": {"sha256": sha(KEY), **limit}}},
    }
    app = app_for(merge(KEYS, cfg))
    body = chat("one two three four five six seven eight", model="slowp", max_tokens=200)
    got = asyncio.run(at_once(app, 20, body))
    ok = [r for r in got if r.status_code == 200]
    refused = [r for r in got if r.status_code != 200]
    assert len(ok) == 5 and len(refused) == 15, [r.status_code for r in got]
    for r in refused:
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        # Not used up: what is missing is held by the calls still running, which give most
        # of it back as they end. Retryable, after a few seconds.
        assert err["code"] == "rate_limited" and err["retryable"] is True, err
        assert err["message"].startswith(says), err
        assert "held by calls still running" in err["message"], err
        assert r.headers["retry-after"] == "3" and r.headers["x-should-retry"] == "true"
        assert r.headers["x-quota-remaining"] in ("0", "0.000000")
    # They ended: a call is admitted again, the day far from spent.
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/chat", KEY, body)))
    assert r.status_code == 200, r.text
    assert spent_usd(app) < 0.01 / 10


def test_a_budget_under_a_nano_dollar_is_one_not_none() -> None:
    # 4e-10 USD would round to 0 nano-dollars: no budget at all. It is one nano-dollar.
    cfg = priced({"input": 10.0, "output": 10.0})
    cfg["auth"] = {"keys": {"q": {"sha256": sha(KEY), "usd_per_day": 4e-10}}}
    app = app_for(merge(KEYS, cfg))
    first, second = asyncio.run(
        calls(app, ("POST", "/api/v1/chat", KEY, chat()), ("POST", "/api/v1/chat", KEY, chat()))
    )
    assert first.status_code == 200 and first.headers["x-quota-limit"] == "0.000000", first.text
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "quota_exceeded"


def test_stella_usage_rows_add_up_to_the_total_and_keys_list_writes_decimals() -> None:
    # $0.1 a million tokens: each call costs some hundreds of nano-dollars, under a
    # micro-dollar: to the micro-dollar, two rows of 0.000001 made a total of 0.000001.
    tenth = {"input": 0.1, "output": 0.1}
    cfg = merge(KEYS, priced(tenth))
    cfg["models"]["routes"]["other"] = {"backend": "echo", "price": tenth}
    with run_stella(cfg) as server:
        for model in ("echo", "other"):
            r = httpx.post(
                server.url + "/api/v1/chat",
                headers={"Authorization": f"Bearer {ROOT}"},
                json=chat("one two three", model=model),
            )
            assert r.status_code == 200, r.text
        env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
        env["STELLA_API_KEY"] = ROOT
        url = ("--url", server.url)
        proc = stella_cli("usage", *url, env=env)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        costs = [Decimal(line.split()[-1]) for line in lines[1:]]
        assert len(costs) == 3 and lines[-1].startswith("(total)"), lines
        assert 0 < costs[0] < Decimal("0.000001") and costs[0] + costs[1] == costs[2], lines
        with Client(server.url, api_key=ROOT) as c:
            c.create_key("tiny", usd_per_day=0.00001)
        table = stella_cli("keys", "list", *url, env=env).stdout.splitlines()
        column = table[0].split().index("USD/DAY")
        (row,) = [line.split() for line in table if line.startswith("tiny ")]
        assert row[column] == "0.00001", row
