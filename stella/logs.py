"""Structured logs: structlog on the event loop, rendering and writing on a thread.

The event loop only builds a dict and puts it on a queue; a writer thread
redacts, renders (JSON through msgspec, or a console line), writes stdout and
the optional JSONL audit file, and flushes on shutdown. So a slow terminal or
disk never stalls a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any

import msgspec
import structlog

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
# Field names whose values are masked at any depth, matched by their words (snake,
# kebab or camelCase): any name with one of SECRET_WORDS (`client_secret`,
# `db_password`); one ending in `token` (`access_token`, `x-auth-token`, but not
# `max_tokens`); one ending in `key` after a word that makes it a credential
# (`api_key`, `private_key`, `aws_secret_access_key`, but not `idempotency_key`, nor
# `key`, which names an API key's owner in stella's own events).
SECRET_WORDS = frozenset(
    {
        "authorization",
        "secret",
        "secrets",
        "password",
        "passwd",
        "passphrase",
        "pwd",
        "cookie",
        "cookies",
        "credential",
        "credentials",
        "apikey",
        "passkey",
    }
)
SECRET_ENDINGS = ("token", "secret", "password", "passwd", "apikey")
KEY_WORDS = frozenset(
    {"api", "secret", "private", "access", "auth", "signing", "encryption", "session", "master"}
)
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_NAME_WORDS = re.compile(r"[a-z0-9]+")


def name_words(name: str) -> list[str]:
    """A name's words, lowercased: split at anything but letters and digits, and where
    camelCase turns upper (X-AuthKey: x, auth, key; accessToken: access, token)."""
    return _NAME_WORDS.findall(_CAMEL.sub(r"\1 \2", name).lower())


def is_secret_field(name: str) -> bool:
    """Whether a field of that name holds a credential (see SECRET_WORDS)."""
    words = name_words(name)
    if not words:
        return False
    if not SECRET_WORDS.isdisjoint(words):
        return True
    last = words[-1]
    if last == "token" or (last == "key" and len(words) > 1 and words[-2] in KEY_WORDS):
        return True
    # Words run together (accesstoken, APIToken, dbpassword, xapikey).
    return "".join(words).endswith(SECRET_ENDINGS)


BEARER_TEXT = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
BEARER_BYTES = re.compile(BEARER_TEXT.pattern.encode())  # the same, for encoded lines

_encoder = msgspec.json.Encoder()
# What a client or a model wrote: left out of a line that could not be rendered whole.
_FREE_FORM = ("metadata", "prompt", "completion")
# Lines gathered on the event loop go to the writer thread at most this often: each
# hand-over wakes the thread, and waking it per request costs more than the line.
HANDOVER_S = 0.01


def _default(obj: Any) -> Any:
    return str(obj)


_lenient_encoder = msgspec.json.Encoder(enc_hook=_default)


class LogSink:
    """Renders events where they happen; a thread does the writing.

    `put` redacts and encodes one event (microseconds, with msgspec) and adds it
    to a batch; on an event loop the batch is handed to the writer thread every
    HANDOVER_S, so a burst of requests wakes the thread once.
    """

    def __init__(
        self,
        *,
        fmt: str = "json",
        stream: IO[bytes] | None = None,
        audit_path: str = "",
        secrets: Iterable[str] = (),
    ) -> None:
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.audit_path = audit_path
        self.secrets: list[str] = []
        self._secret_bytes: list[bytes] = []
        self.add_secrets(secrets)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._audit: IO[bytes] | None = None
        self._batch: list[tuple[bytes, bytes | None]] = []
        self._safe_keys: set[Any] = set()
        self._scheduled = False
        self._thread = threading.Thread(target=self._run, name="stella-log", daemon=True)
        self._closed = False
        self._thread.start()

    def add_secrets(self, values: Iterable[str]) -> None:
        """Mask these values wherever they appear in a log line."""
        self.secrets = sorted(
            {*self.secrets, *(v for v in values if len(v) >= 4)}, key=len, reverse=True
        )
        self._secret_bytes = [s.encode() for s in self.secrets]

    def put(self, event: dict[str, Any], *, checked: bool = False) -> None:
        """Render one event and queue it for writing (never blocks)."""
        try:
            for listener in self.listeners:
                listener(event)
            line = self._encode(event, checked)
            audit = line if self.audit_path and event.get("event") == "inference" else None
            if self.fmt != "json":
                line = _console(msgspec.json.decode(line))
        except Exception as exc:  # a log line must never break a request
            line, audit = self._reduced(event, exc)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._queue.put([(line, audit)])  # not on the loop: hand over at once
            return
        self._batch.append((line, audit))
        if not self._scheduled:
            self._scheduled = True
            loop.call_later(HANDOVER_S, self._handover)

    def _reduced(self, event: dict[str, Any], exc: Exception) -> tuple[bytes, bytes | None]:
        """The event without its free-form parts, when it could not be rendered whole:
        an inference still leaves its audit line."""
        try:
            reduced = {k: v for k, v in event.items() if k not in _FREE_FORM}
            reduced["log_error"] = f"not rendered whole: {type(exc).__name__}"
            line = self._encode(reduced)
            audit = line if self.audit_path and event.get("event") == "inference" else None
            if self.fmt != "json":
                line = _console(msgspec.json.decode(line))
            return line, audit
        except Exception as again:
            return f"log render failed: {again!r}\n".encode(), None

    def _handover(self) -> None:
        batch, self._batch = self._batch, []
        self._scheduled = False
        if batch:
            self._queue.put(batch)

    def _encode(self, event: dict[str, Any], checked: bool = False) -> bytes:
        if not checked and self._has_secret_field(event):
            event = self._redact(event)
        line = _lenient_encoder.encode(event)
        for secret in self._secret_bytes:
            if secret in line:
                line = line.replace(secret, b"***")
        # A bearer token follows a space, and an encoded line holds a literal space only
        # inside a string: one memchr spares most lines the slower substring search.
        if b" " in line and b"earer" in line.lower():
            line = BEARER_BYTES.sub(rb"\1 ***", line)
        return line + b"\n"

    def _has_secret_field(self, node: dict[str, Any]) -> bool:
        """Whether any key, at any depth, names a secret (known-safe keys are cached)."""
        safe = self._safe_keys
        for key, value in node.items():
            if key not in safe:
                if is_secret_field(str(key)):
                    if value:
                        return True
                    # An empty value now says nothing of the next one: never cached as safe.
                elif len(safe) < 4096:
                    safe.add(key)
            if type(value) is dict:
                if self._has_secret_field(value):
                    return True
            elif type(value) is list and self._list_has_secret_field(value):
                return True
        return False

    def _list_has_secret_field(self, items: list[Any]) -> bool:
        for item in items:
            if type(item) is dict:
                if self._has_secret_field(item):
                    return True
            elif type(item) is list and self._list_has_secret_field(item):
                return True
        return False

    def emit(self, name: str, record: dict[str, Any], level: str = "info") -> None:
        """Write one event straight to this sink (same format as structlog's events).

        The per-request `inference` event takes this path: structlog's generic
        processor chain would cost more than the rest of the log line together.
        """
        record["event"] = name
        record["ts"] = time.time()
        record["level"] = level
        # Everything but `metadata` was built by stella; only the client's part needs the
        # field-name check (secret values and bearer tokens are masked on the whole line).
        metadata = record.get("metadata")
        try:
            if metadata and self._has_secret_field(metadata):
                record["metadata"] = self._redact(metadata)
        except RecursionError:  # nested past any reason (the pipeline refuses that)
            del record["metadata"]
            record["log_error"] = "not rendered whole: RecursionError"
        self.put(record, checked=True)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far is written."""
        if self._closed:
            return
        self._handover()
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        """Write what is queued, close the audit file, stop the thread."""
        if self._closed:
            return
        self._handover()
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(items) < 256:
                    items.append(self._queue.get_nowait())
            out: list[bytes] = []
            audit: list[bytes] = []
            stop = False
            for item in items:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    self._write(out, audit)
                    out, audit = [], []
                    item.set()
                else:
                    for line, audit_line in item:
                        out.append(line)
                        if audit_line is not None:
                            audit.append(audit_line)
            self._write(out, audit)
            if stop:
                if self._audit:
                    self._audit.close()
                return

    def _write(self, out: list[bytes], audit: list[bytes]) -> None:
        try:
            if out:
                self.stream.write(b"".join(out))
                self.stream.flush()
            if audit:
                if self._audit is None:
                    path = Path(self.audit_path)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._audit = path.open("ab")
                self._audit.write(b"".join(audit))
                self._audit.flush()
        except (OSError, ValueError):
            pass  # stdout closed or disk full: dropping a log line beats crashing

    def _redact(self, ev: dict[str, Any]) -> dict[str, Any]:
        return {k: self._clean(k, v) for k, v in ev.items()}

    def _clean(self, key: str, value: Any) -> Any:
        if value and is_secret_field(key):
            return "***"
        if isinstance(value, dict):
            return {k: self._clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(key, v) for v in value]
        return value


def _console(ev: dict[str, Any]) -> bytes:
    ts = dt.datetime.fromtimestamp(ev.get("ts", time.time())).strftime("%H:%M:%S.%f")[:-3]
    level = str(ev.get("level", "info")).upper()[:5]
    rest = " ".join(
        f"{k}={v}" for k, v in ev.items() if k not in ("ts", "level", "event") and v is not None
    )
    line = f"{ts} {level:<5} {ev.get('event', '')} {rest}"
    # One event, one line: a newline or an escape sequence in a prompt must not print
    # what looks like another event (or move the terminal's cursor).
    if not line.isprintable():
        line = "".join(c if c.isprintable() else _escape(c) for c in line)
    return f"{line}\n".encode()


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


class QueueLogger:
    """structlog's final logger: hands the processed event dict to the sink."""

    def __init__(self, sink: LogSink) -> None:
        self._sink = sink

    def msg(self, **event: Any) -> None:
        """Queue one event."""
        self._sink.put(event)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


# The request being served in this task (set once per request by the app): one
# ContextVar.set per request instead of structlog's bind_contextvars machinery.
REQUEST_ID: ContextVar[str] = ContextVar("stella_request_id", default="")


def _add_meta(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    if "request_id" not in event:
        rid = REQUEST_ID.get()
        if rid:
            event["request_id"] = rid
    event["ts"] = time.time()
    event["level"] = "warning" if method == "warn" else method
    return event


_sink: LogSink | None = None
_level = 20


def configure(
    *,
    fmt: str = "json",
    level: str = "info",
    audit_path: str = "",
    secrets: Iterable[str] = (),
    stream: IO[bytes] | None = None,
) -> LogSink:
    """Point structlog at a new sink (closing the previous one) and return it."""
    global _sink, _level
    _level = LEVELS.get(level, 20)
    if _sink is not None:
        _sink.close()
    _sink = LogSink(fmt=fmt, stream=stream, audit_path=audit_path, secrets=secrets)
    sink = _sink
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_meta,
            structlog.processors.format_exc_info,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, 20)),
        logger_factory=lambda *_: QueueLogger(sink),
        cache_logger_on_first_use=False,
    )
    return sink


def emitter() -> Callable[[str, dict[str, Any]], None]:
    """A function that writes one named event dict through the current sink."""
    current = _sink
    if current is not None:
        return current.emit
    fallback = structlog.get_logger("stella")
    return lambda name, record: fallback.info(name, **record)


def sink() -> LogSink | None:
    """The sink structlog currently writes to."""
    return _sink


def mask(text: str) -> str:
    """`text` with every secret the sink knows of, and bearer tokens, masked: for text
    that reaches a client from elsewhere, such as an upstream's error message."""
    current = _sink
    if current is not None:
        for secret in current.secrets:
            if secret in text:
                text = text.replace(secret, "***")
    if "earer" in text.lower():
        text = BEARER_TEXT.sub(r"\1 ***", text)
    return text


def secrets_from_env(names: Iterable[str]) -> list[str]:
    """Values of the named env vars that hold secrets, to be masked in logs."""
    out = []
    for name in names:
        value = os.environ.get(name, "")
        for entry in value.split(","):
            entry = entry.strip()
            if entry:
                out.append(entry)
                # "name=key" (STELLA_API_KEYS): the key alone must be masked too.
                _, sep, key = entry.partition("=")
                if sep and key.strip():
                    out.append(key.strip())
    return out


def get_logger(name: str = "stella") -> Any:
    """A structlog logger."""
    return structlog.get_logger(name)
