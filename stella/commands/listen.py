"""The address `stella serve` listens on: checked before start-up, bound with one line
naming the key when the kernel refuses it."""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Mapping
from typing import Any

from stella.backends import ConfigError

# How long a host name may take to resolve: past it, the same lookup in the bind would
# hold start-up for as long as the resolver retries, with nothing said.
RESOLVE_TIMEOUT_S = 3.0

# The command-line flag that sets each key `serve` binds with.
_FLAGS = {"server.host": "--host", "server.port": "--port"}


class CannotListen(Exception):
    """The kernel refused the address or port (a runtime condition: a port in use)."""


def check_host(host: str, timeout_s: float = RESOLVE_TIMEOUT_S) -> None:
    """Raise ConfigError (server.host) for a host that does not resolve in time or is
    not an address of this machine."""
    family = _family(host)
    address = _resolve(host, family, timeout_s)
    # Port 0: whether the address is this machine's, whatever port is in use on it.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(
                    f"server.host: {host!r} is not an address of this machine"
                ) from None
            # Anything else is the real bind's to say, with the port.


def bind(host: str, port: int, overrides: Mapping[str, Any]) -> socket.socket:
    """A socket bound to host:port as uvicorn binds one (SO_REUSEADDR, inherited by the
    workers); CannotListen naming the address and the key when the kernel refuses."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CannotListen(_refusal(host, port, exc, overrides)) from None
    sock.set_inheritable(True)
    return sock


def _family(host: str) -> socket.AddressFamily:
    """The family uvicorn binds a host with: IPv6 for an address with a colon."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _resolve(host: str, family: socket.AddressFamily, timeout_s: float) -> Any:
    """The first socket address `host` resolves to, or ConfigError (server.host)."""
    found: list[Any] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, 0, family, socket.SOCK_STREAM)[0][4])
        except OSError as exc:
            found.append(exc)

    # getaddrinfo takes no timeout: a daemon thread, left behind when it takes too long
    # (it ends with the resolver's own timeout, and never holds the process's exit).
    thread = threading.Thread(target=lookup, name="stella-resolve-host", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not found:
        raise ConfigError(f"server.host: {host!r} did not resolve within {timeout_s:g} s")
    if isinstance(found[0], OSError):
        reason = found[0].strerror or str(found[0])
        raise ConfigError(f"server.host: {host!r} does not resolve ({reason})")
    return found[0]


def _refusal(host: str, port: int, exc: OSError, overrides: Mapping[str, Any]) -> str:
    """The line for a bind the kernel refused: the address, the key to change, why."""
    if exc.errno in (errno.EADDRINUSE, errno.EACCES):
        keys = ["server.port"]
    elif exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        keys = ["server.host"]
    else:
        keys = ["server.host", "server.port"]
    if exc.errno == errno.EADDRNOTAVAIL:
        reason = "not an address of this machine"  # the kernel's "cannot assign requested address"
    else:
        reason = exc.strerror or str(exc)
        reason = reason[:1].lower() + reason[1:]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"cannot listen on {where} ({', '.join(_named(k, overrides) for k in keys)}): {reason}"


def _named(key: str, overrides: Mapping[str, Any]) -> str:
    """`key`, and the flag or environment variable that set it when one did."""
    from stella.settings import setting_variable

    section, _, field = key.partition(".")
    flags = overrides.get(section)
    if isinstance(flags, Mapping) and field in flags:
        return f"{key}, set by {_FLAGS[key]}"
    variable = setting_variable(key, overrides)
    return f"{key}, set by {variable}" if variable else key
