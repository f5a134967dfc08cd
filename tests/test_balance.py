"""Load balancing: a route served by several backends (`balance`)."""

from __future__ import annotations

from typing import Any

import pytest

from stella.backends import ConfigError, build_backend, registry
from stella.routing import Router
from stella.settings import enabled_backends, load_settings


def router(routes: dict[str, Any], backends: dict[str, Any] | None = None) -> Router:
    settings = load_settings(
        {
            "backends": {
                "local": {"enabled": False},
                "other": {"kind": "echo"},
                **(backends or {}),
            },
            "models": {"default": "echo", "routes": routes},
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
