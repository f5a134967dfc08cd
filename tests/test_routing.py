"""Route names and aliases: each name answers for one route, whatever is added at runtime."""

from __future__ import annotations

from typing import Any

import pytest

from stella.backends import ConfigError, build_backend, registry
from stella.errors import Conflict, ModelNotFound
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
    with pytest.raises(Conflict, match="'echo2' is already the name"):
        r.register("mine", RouteSettings(backend="other", aliases=["echo2"]))
    assert r.resolve("e2").name == "echo2"


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
