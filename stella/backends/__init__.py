"""The backend registry: a dict from `kind` to its entry point, read from the
installed packages' metadata; a kind's class is imported only when a backend of that
kind is built (or its config shown), so an unused kind's dependencies need not load.

Built-in backends register through the same `stella.backends` entry point group
a third-party package uses, so adding one is a module plus one line in its own
pyproject.toml: `[project.entry-points."stella.backends"] mykind = "pkg.mod:Cls"`.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import msgspec

from stella.backends.base import Backend, BackendConfig, BackendEvent, BackendHealth, CallContext

__all__ = [
    "Backend",
    "BackendConfig",
    "BackendEvent",
    "BackendHealth",
    "CallContext",
    "ConfigError",
    "build_backend",
    "effective_config",
    "registry",
]

GROUP = "stella.backends"


class ConfigError(Exception):
    """A configuration value that stops start-up; the message names the key."""


def registry() -> dict[str, EntryPoint]:
    """Kinds known to this installation, each an entry point not yet imported."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def build_backend(name: str, table: dict[str, Any], kinds: Mapping[str, EntryPoint]) -> Backend:
    """Build backend `name` from its config table; ConfigError names the bad key."""
    kind = table.get("kind")
    if kind is None:
        raise ConfigError(f"backends.{name}.kind: required, one of {sorted(kinds)}")
    if not isinstance(kind, str):
        # Said as every other key's wrong type is (msgspec's words): "required" sent the
        # reader looking for a key that is there.
        try:
            msgspec.convert(kind, str)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"backends.{name}.kind: {exc}") from None
    if kind not in kinds:
        raise ConfigError(f"backends.{name}.kind: unknown kind {kind!r}; known: {sorted(kinds)}")
    try:
        cls = kinds[kind].load()
    except ImportError as exc:
        raise ConfigError(
            f"backends.{name}.kind: {kind!r} cannot be imported ({exc}); "
            "is its extra installed? (e.g. pip install 'stella-gateway[mlx]')"
        ) from exc
    _check_tables(name, table, cls.Config)
    try:
        config = msgspec.convert(table, cls.Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"backends.{name}{_dotted(exc)}") from exc
    check_finite(config, f"backends.{name}")
    return cls(name, config)


def effective_config(table: dict[str, Any], kinds: Mapping[str, EntryPoint]) -> dict[str, Any]:
    """A backend's table as its kind reads it, every default filled in; as written when
    the kind is unknown, cannot be imported, has no config struct or refuses the table."""
    kind = table.get("kind")
    entry = kinds.get(kind) if isinstance(kind, str) else None
    if entry is None:
        return table
    try:
        config = getattr(entry.load(), "Config", None)
    except Exception:  # a plugin that fails to import: the server says so at start-up
        return table
    if not (isinstance(config, type) and issubclass(config, msgspec.Struct)):
        return table
    # `enabled` is stella's key, not the kind's (enabled_backends removes it).
    fields = {k: v for k, v in table.items() if k != "enabled"}
    try:
        shown = msgspec.to_builtins(msgspec.convert(fields, config, strict=False))
    except (msgspec.ValidationError, TypeError):
        return table
    if not isinstance(shown, dict):
        return table
    return {"enabled": table.get("enabled", True), **shown}


def check_finite(value: Any, where: str) -> None:
    """Refuse inf and NaN anywhere in a decoded config value (ConfigError names the key)."""
    # A timeout of inf passes a range check (inf >= 0), then breaks what uses it (an
    # OverflowError in int(), a wait that never ends); NaN compares false with anything.
    try:
        node = msgspec.to_builtins(value)
    except TypeError:  # a plugin's config holding a type msgspec cannot walk: its own
        return
    stack: list[tuple[str, Any]] = [(where, node)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{path or 'config'}: {node} is not a finite number")
        if isinstance(node, dict):
            stack += [(f"{path}.{k}" if path else str(k), v) for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(f"{path}[{i}]", v) for i, v in enumerate(node)]


def _check_tables(name: str, table: dict[str, Any], config: type[Any]) -> None:
    """Decode the config's tables (`headers`) entry by entry: msgspec says `headers[...]`
    of a bad entry, and the entry's name is what the reader needs."""
    for field in msgspec.structs.fields(config):
        value = table.get(field.encode_name)
        if typing.get_origin(field.type) is not dict or not isinstance(value, dict):
            continue
        item_type = typing.get_args(field.type)[1]
        for key, item in value.items():
            try:
                msgspec.convert(item, item_type, strict=False)
            except msgspec.ValidationError as exc:
                raise ConfigError(f"backends.{name}.{field.name}.{key}: {exc}") from exc


def _dotted(exc: msgspec.ValidationError) -> str:
    """msgspec's `... - at `$.a.b`` as `.a.b: ...` (`: ...` without a path)."""
    text = str(exc)
    if " - at `$." in text:
        message, _, path = text.rpartition(" - at `$.")
        return f".{path.rstrip('`')}: {message}"
    return f": {text}"
