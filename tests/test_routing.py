"""Route names and aliases: each name answers for one route, whatever is added at runtime."""

from __future__ import annotations

from typing import Any

import pytest

from stella.backends import ConfigError, build_backend, registry
from stella.errors import Conflict, InvalidRequest, ModelNotFound
from stella.routing import Router
from stella.settings import RouteSettings, enabled_backends, load_settings


def router(routes: dict[str, Any]) -> Router:
    settings = load_settings(
        {
            "backends": {"local": {"enabled": False}, "other": {"kind": "echo"}},
            "models": {"default": "echo", "routes": routes},
        },
        environ={},
    )
    kinds = registry()
    backends = {n: build_backend(n, t, kinds) for n, t in enabled_backends(settings).items()}
    return Router(settings, backends)


def test_a_runtime_route_cannot_take_a_name_or_alias_of_another() -> None:
    r = router({"echo2": {"backend": "echo", "aliases": ["e2"]}})
    with pytest.raises(Conflict, match="alias of 'echo2'"):
        r.register("e2", RouteSettings(backend="other"))
    with pytest.raises(Conflict, match=r"^'echo2' is already the name of another route$"):
        r.register("mine", RouteSettings(backend="other", aliases=["echo2"]))
    assert r.resolve("e2").name == "echo2"


def test_a_runtime_route_that_cant_be_added_names_the_field_at_fault() -> None:
    r = router({})
    with pytest.raises(InvalidRequest) as refused:
        r.register("mine", RouteSettings(backend="other", fallbacks=["echo", "nope"]))
    assert (refused.value.message, refused.value.param) == (
        "$.fallbacks[1]: unknown route 'nope'",
        "fallbacks[1]",
    )
    with pytest.raises(InvalidRequest) as refused:
        r.register("mine", RouteSettings(backend="nope"))
    assert refused.value.param == "backend"


def test_a_runtime_route_on_a_disabled_backend_is_told_so() -> None:
    r = router({})  # backends.local.enabled = false
    with pytest.raises(InvalidRequest) as refused:
        r.register("mine", RouteSettings(backend="local"))
    assert (refused.value.message, refused.value.param) == (
        "$.backend: backend 'local' is configured but disabled (backends.local.enabled = false)",
        "backend",
    )
    with pytest.raises(InvalidRequest, match=r"unknown backend 'nope'; known: \['echo', 'other'\]"):
        r.register("mine", RouteSettings(backend="nope"))


def test_replacing_a_runtime_route_drops_its_old_aliases() -> None:
    r = router({})
    r.register("mine", RouteSettings(backend="other", aliases=["m1"]))
    r.register("mine", RouteSettings(backend="other", aliases=["m2"]))
    assert r.resolve("m2").name == "mine"
    with pytest.raises(ModelNotFound):
        r.resolve("m1")
    r.remove("mine")
    with pytest.raises(ModelNotFound):
        r.resolve("m2")


def test_configured_routes_may_not_share_names() -> None:
    with pytest.raises(ConfigError, match=r"models\.routes\.b: 'x' is already an alias of 'a'"):
        router(
            {"a": {"backend": "echo", "aliases": ["x"]}, "b": {"backend": "echo", "aliases": ["x"]}}
        )


def test_default_names_the_default_as_it_is_now_unless_a_route_claims_it() -> None:
    r = router({"echo2": {"backend": "echo"}})
    assert r.resolve("default").name == "echo"
    r.set_default("echo2")
    assert (r.resolve("default").name, r.knows("default")) == ("echo2", True)
    claimed = router({"echo2": {"backend": "echo", "aliases": ["default"]}})
    claimed.set_default("echo")
    assert claimed.resolve("default").name == "echo2"


def test_default_can_be_removed_only_as_the_route_that_claims_it() -> None:
    r = router({})
    with pytest.raises(Conflict, match=r"^model 'echo' is the default model; it can't be removed$"):
        r.remove("default")  # the default now, as a request's `default` is
    r.register("default", RouteSettings(backend="other"))  # a route of that name
    assert r.remove("default") == "default"


def test_an_empty_name_is_not_the_default() -> None:
    with pytest.raises(ModelNotFound):
        router({}).set_default("")


async def test_a_refused_change_does_not_undo_one_made_meanwhile() -> None:
    import asyncio

    from stella.api.native import _change
    from stella.app import create_app
    from stella.errors import Unavailable
    from stella.settings import RouteSettings, load_settings

    app = create_app(load_settings({"models": {"default": "echo"}}))
    router = app.services.router  # type: ignore[attr-defined]

    async def refused(_: object) -> None:
        await asyncio.sleep(0.1)  # the store's write takes a while, then fails
        raise Unavailable("the state store is unreachable")

    async def taken(_: object) -> None:
        return None

    x = asyncio.create_task(
        _change(router, lambda: router.register("x", RouteSettings(backend="echo")), refused)
    )
    await asyncio.sleep(0.02)
    await _change(router, lambda: router.register("y", RouteSettings(backend="echo")), taken)
    with pytest.raises(Unavailable):
        await x
    assert router.knows("y") and not router.knows("x")


def test_the_configured_default_is_named_so_after_a_switch() -> None:
    r = router({})
    r.register("quick", RouteSettings(backend="other"))
    with pytest.raises(Conflict, match="'echo' is the default model"):
        r.remove("echo")
    r.set_default("quick")
    with pytest.raises(Conflict, match=r"^model 'echo' is the configured default \(models"):
        r.remove("echo")
    with pytest.raises(Conflict, match="'quick' is the default model"):
        r.remove("quick")


def test_stored_routes_apply_whatever_their_order() -> None:
    from structlog.testing import capture_logs

    from stella.app import apply_routing

    # Two runtime routes that fall back to each other, listed with the one whose
    # fallback comes later first; and two stored (before the store refused that) with
    # one alias: every replica keeps the same one, whatever it held before.
    stored = {
        "r2": {"backend": "echo", "fallbacks": ["r1"]},
        "r1": {"backend": "echo", "fallbacks": ["r2"]},
        "zed": {"backend": "other", "aliases": ["shared"]},
        "amy": {"backend": "echo", "aliases": ["shared"]},
    }
    fresh, held = router({}), router({})
    held.register("zed", RouteSettings(backend="other", aliases=["shared"]))
    for r in (fresh, held):
        with capture_logs() as logs:
            apply_routing(r, stored, None)
        assert [x.name for x in r.chain(r.resolve("r1"))] == ["r1", "r2"]
        assert [x.name for x in r.chain(r.resolve("r2"))] == ["r2", "r1"]
        assert r.resolve("shared").name == "amy" and not r.knows("zed")
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("stored_routing_skipped", "warning")
        ]
        assert "'zed'" in logs[0]["reason"] and "alias of 'amy'" in logs[0]["reason"]


def test_a_stored_default_that_names_no_route_is_the_configured_one_everywhere() -> None:
    from structlog.testing import capture_logs

    from stella.app import apply_routing

    serving, fresh = router({}), router({})
    serving.register("gone", RouteSettings(backend="other"))
    serving.set_default("gone")  # served before the store lost the route
    for r in (serving, fresh):
        with capture_logs() as logs:
            apply_routing(r, {}, "gone")  # the store: default "gone", no route "gone"
        # Every replica alike: the configured default, as one starting now has it.
        assert r.default == "echo" and not r.knows("gone")
        assert "default 'gone'" in logs[0]["reason"]


async def test_the_memory_store_refuses_what_would_leave_routing_inconsistent() -> None:
    from stella.state import MemoryState

    await check_the_store_refuses_conflicts(MemoryState())


async def check_the_store_refuses_conflicts(state: Any) -> None:
    """A store (memory, Redis) refuses a change that conflicts with what it holds, as
    the router does in one process: so replicas changing at once can't both succeed."""
    assert await state.save_route("x", {"backend": "echo", "aliases": ["shared"]}) is False
    with pytest.raises(Conflict, match="'shared' is already an alias of 'x'"):
        await state.save_route("y", {"backend": "echo", "aliases": ["shared"]})
    with pytest.raises(Conflict, match=r"^'x' is already the name of another route$"):
        await state.save_route("y", {"backend": "echo", "aliases": ["x"]})
    with pytest.raises(Conflict, match="'shared' is already an alias of 'x'"):
        await state.save_route("shared", {"backend": "echo"})
    # Itself, replaced: the store says so (the register answers 200, not 201).
    assert await state.save_route("x", {"backend": "echo", "aliases": ["shared", "more"]}) is True
    with pytest.raises(ModelNotFound):
        await state.set_default_model("y", runtime=True)  # never stored (or removed)
    await state.set_default_model("x", runtime=True)
    with pytest.raises(Conflict, match="'x' is the default model"):
        await state.delete_route("x")
    await state.set_default_model("echo")
    await state.delete_route("x")
    assert await state.load_routes() == {}
    await state.save_route("y", {"backend": "echo", "aliases": ["shared"]})  # free again


def test_limits_under_a_name_that_is_no_route_are_warned_of() -> None:
    # The limits go by a route's own name (an alias is refused): under `default`, the
    # name of the default model to a request, they would never apply.
    from structlog.testing import capture_logs

    from stella.app import create_app

    models = {
        "default": "echo",
        "routes": {"echo2": {"backend": "echo", "aliases": ["e2"]}},
    }
    limits = {name: {"requests_per_minute": 1} for name in ("default", "echo2")}
    settings = load_settings(
        {"backends": {"local": {"enabled": False}}, "models": models, "limits": {"models": limits}},
        environ={},
    )
    with capture_logs() as logged:
        create_app(settings)
    warned = {e["key"] for e in logged if e["event"] == "limits_for_unknown_route"}
    assert warned == {"limits.models.default"}


def test_a_route_another_replica_removed_is_forgotten_once_no_call_is_on_it() -> None:
    r = router({})
    forgotten: list[set[str]] = []
    r.on_forget.append(forgotten.append)
    running: set[str] = set()
    r.in_use = lambda: running
    r.apply_stored(
        {"rt": RouteSettings(backend="other"), "rt2": RouteSettings(backend="echo")}, None
    )
    assert {"rt", "rt2"} <= r.counted
    running.add("rt")  # a call on it runs as the store's read removes both
    r.apply_stored({}, None)
    assert forgotten == [{"rt2"}]
    assert "rt" in r.counted and "rt2" not in r.counted  # its call still counts under it
    r.sweep()
    assert forgotten == [{"rt2"}]
    running.clear()
    r.sweep()  # the call ended: a scrape or a routing change forgets it
    assert forgotten == [{"rt2"}, {"rt"}]
    assert r.counted == set(r.routes)
    r.sweep()  # nothing removed since: nothing asked
    assert forgotten == [{"rt2"}, {"rt"}]


def test_a_stored_route_removed_and_stored_again_starts_afresh() -> None:
    r = router({})
    forgotten: list[set[str]] = []
    r.on_forget.append(forgotten.append)
    running = {"rt"}
    r.in_use = lambda: running
    r.apply_stored({"rt": RouteSettings(backend="other")}, None)
    r.apply_stored({}, None)  # removed while a call on it ran
    running.clear()
    r.apply_stored({"rt": RouteSettings(backend="other")}, None)  # stored again
    assert forgotten == [{"rt"}]
    assert "rt" in r.counted


def test_a_removed_route_with_values_not_seen_yet_stays_until_they_are() -> None:
    r = router({})
    forgotten: list[set[str]] = []
    r.on_forget.append(forgotten.append)
    unseen = {"rt"}
    r.unseen = lambda names: names & unseen
    r.apply_stored({"rt": RouteSettings(backend="other")}, None)
    r.apply_stored({}, None)
    assert forgotten == [] and "rt" in r.counted  # counted since the last scrape: kept
    unseen.clear()  # a scrape showed them
    r.sweep()
    assert forgotten == [{"rt"}] and r.counted == set(r.routes)
