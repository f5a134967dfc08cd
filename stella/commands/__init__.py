"""Subcommands of the `stella` CLI, one module each."""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # the client (and httpx) load only with the commands that use them
    from stella.client import StellaClientError


def _said(exc: StellaClientError) -> str:
    """The start of the CLI's line for a client error: code, message, request ID."""
    where = f" (request {exc.request_id})" if exc.request_id else ""
    return f"stella: {exc.code}: {exc.message}{where}"


def client_error(exc: StellaClientError, key_from: str = "") -> str:
    """The CLI's line for an error the server sent: code, message, request ID, what to do
    (`key_from`: where the key sent came from, "" when none was)."""
    hint = ""
    if exc.code == "unauthorized":
        hint = (
            f"; check the key (from {key_from})"
            if key_from
            else "; give the key with --api-key or STELLA_API_KEY"
        )
    elif exc.code == "timeout":  # the client's own wait, not the server's 504
        hint = "; wait longer with --timeout SECONDS (or STELLA_TIMEOUT)"
    if exc.retry_after is not None:  # a 429's or 503's Retry-After: when to try again
        hint += f"; retry after {exc.retry_after:g}s"
    return f"{_said(exc)}{hint}"


# How many times a command sends a request again after a retryable error (the client's
# default, said in each retry's line).
CLI_MAX_RETRIES = 2


def retry_notice(limit_s: float) -> Callable[[StellaClientError, float], None]:
    """The client's `on_retry` for a command: a line on stderr before each retry's wait,
    or the error raised at once when the wait is longer than `limit_s` (its --timeout:
    a command told to give up after so long does not sit silent for longer)."""
    retries = 0

    def on_retry(exc: StellaClientError, wait: float) -> None:
        nonlocal retries
        if wait > limit_s:
            raise exc
        retries += 1
        line = f"{_said(exc)}; retrying in {wait:.3g} s ({retries} of {CLI_MAX_RETRIES})"
        if sys.stderr is not None:
            with contextlib.suppress(OSError):  # a notice that cannot be said ends no request
                print(line, file=sys.stderr, flush=True)

    return on_retry


def command_client(args: argparse.Namespace, timeout: Any) -> Any:
    """The client a command calls its server with: --url, --api-key, `timeout` (from
    client_timeout), its retries said on stderr and none waited for longer than it."""
    from stella.client import Client

    return Client(
        args.url,
        args.api_key,
        timeout=timeout,
        max_retries=CLI_MAX_RETRIES,
        on_retry=retry_notice(timeout.read),
    )


def key_from(given: str | None) -> str:
    """Where the API key the client sends comes from: "--api-key", "STELLA_API_KEY", or ""
    for none (the client's rule: the flag when given, else the variable; blank is none)."""
    if given is not None:
        return "--api-key" if given.strip() else ""
    return "STELLA_API_KEY" if os.environ.get("STELLA_API_KEY", "").strip() else ""


# How long a command waits to connect, whatever --timeout says (when it says more): a
# server that is down or unreachable is known in seconds, not at the end of a long wait.
CONNECT_TIMEOUT_S = 10.0


def seconds(text: str) -> float:
    """A --timeout value: a number of seconds, more than 0 (ValueError otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):  # NaN too
        raise ValueError(f"{text!r}: must be a number of seconds more than 0")
    return value


def seconds_option(text: str) -> float:
    """`seconds` as an argparse type (its error a usage error, exit 2)."""
    try:
        return seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_timeout(parser: argparse.ArgumentParser, default_s: float, what: str) -> None:
    """The --timeout option of a command that calls a server with the client."""
    parser.add_argument(
        "--timeout",
        type=seconds_option,
        metavar="SECONDS",
        help=f"seconds to wait for {what} (default: $STELLA_TIMEOUT, else {default_s:g}); "
        f"at most {CONNECT_TIMEOUT_S:g} for a connection",
    )


def timeout_seconds(given: float | None, default_s: float) -> float | None:
    """--timeout, else STELLA_TIMEOUT, else `default_s`; None, with the error line said,
    when STELLA_TIMEOUT is not a number of seconds."""
    if given is not None:
        return given
    env = os.environ.get("STELLA_TIMEOUT", "").strip()
    try:
        return seconds(env) if env else default_s
    except ValueError as exc:
        print(f"stella: STELLA_TIMEOUT: {exc}", file=sys.stderr)
        return None


def client_timeout(given: float | None, default_s: float) -> Any:
    """The client's httpx.Timeout for `timeout_seconds`, the connection waited for at most
    CONNECT_TIMEOUT_S; None when STELLA_TIMEOUT is bad (said)."""
    import httpx

    limit = timeout_seconds(given, default_s)
    if limit is None:
        return None
    return httpx.Timeout(limit, connect=min(limit, CONNECT_TIMEOUT_S))


def ask_server(
    args: argparse.Namespace, default_s: float, ask: Callable[[Any], Any]
) -> tuple[Any, int | None]:
    """Call a command's server (`ask(client)`, the client of command_client, waiting up to
    --timeout, default `default_s`): (its answer, None), or (None, the exit code) once the
    failure is said on stderr."""
    from stella.client import StellaClientError

    timeout = client_timeout(args.timeout, default_s)
    if timeout is None:
        return None, 2
    try:
        with command_client(args, timeout) as client:
            return ask(client), None
    except StellaClientError as exc:
        print(client_error(exc, key_from(args.api_key)), file=sys.stderr)
        return None, client_exit(exc)
    except OSError as exc:
        print(f"stella: cannot reach the server: {exc}", file=sys.stderr)
        return None, 1


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Print `rows` (the header first) as columns two spaces apart, each as wide as its
    widest cell, with no trailing spaces."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def client_exit(exc: StellaClientError) -> int:
    """The exit code for a client error: 2 for a bad URL or key given (a usage error, like
    a bad flag), else 1."""
    return 2 if exc.code in ("invalid_url", "invalid_api_key") else 1


def use_config_file(path: str | None) -> bool:
    """Point STELLA_CONFIG at `--config`'s file when given; False (with the error line
    said) when the flag is empty."""
    if path is None:
        return True
    if not path:
        # STELLA_CONFIG="" means no file: `--config=` would quietly serve the defaults.
        print("stella: config error: --config: empty; name a TOML file", file=sys.stderr)
        return False
    os.environ["STELLA_CONFIG"] = path
    return True


class OutputError(OSError):
    """Writing the command's output failed (a full disk, a terminal gone): told apart
    from the network's OSErrors, which a command reports as its own."""


def _is_tty(stream: TextIO | None) -> bool:
    """Whether `stream` is a terminal (False when it cannot say)."""
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError, AttributeError):
        return False


class Output:
    """stdout for a command: its write errors raise OutputError. A reader that left
    (`| head`) stays a BrokenPipeError, which the CLI ends quietly."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream  # None: the process started with fd 1 closed (`>&-`)
        # Off a terminal, text without its line end waits for the next write or flush:
        # with PYTHONUNBUFFERED (the Containerfile sets it) print() is two writes, the
        # text and its newline, and `stella config | head -30` found the reader gone at
        # the newline. Whole lines still go at once, in order with stderr's.
        self._hold = not _is_tty(stream)
        self._held = ""

    def write(self, text: str) -> int:
        """Write `text`, as the stream does (off a terminal, an unended line waits for
        the next write or flush)."""
        if self._stream is None:
            raise OutputError(errno.EBADF, "stdout is closed")
        if not self._hold:
            return self._send(text)
        line, self._held = self._held + text, ""
        if not line.endswith("\n"):
            self._held = line
        else:
            self._send(line)
        return len(text)

    def _release(self) -> None:
        """Write the line that waits, if any."""
        if self._held:
            text, self._held = self._held, ""
            self._send(text)

    def _send(self, text: str) -> int:
        """Write `text` to the stream, its errors as OutputError."""
        assert self._stream is not None
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(*exc.args) from exc
        except UnicodeEncodeError as exc:  # PYTHONIOENCODING=ascii, a Latin-1 locale
            what = ascii(exc.object[exc.start : exc.end])
            raise OutputError(
                errno.EILSEQ, f"stdout's encoding ({exc.encoding}) has no {what}"
            ) from exc

    def flush(self) -> None:
        """Flush the stream, as it does."""
        if self._stream is None:
            return  # nothing was written
        self._release()
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(*exc.args) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)  # isatty(), buffer, fileno(), encoding, ...
