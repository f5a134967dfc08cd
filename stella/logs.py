"""Structured logs: structlog on the event loop, writing on threads.

The event loop renders a line (JSON through msgspec, or a console line) and adds
it to a batch; every HANDOVER_S the batch goes to the writers: one thread for
stdout and one for the optional JSONL audit file, each with its own queue and a
bounded backlog. So a slow terminal or disk never stalls a request, and a stalled
or broken stdout never stalls or loses the audit file.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import datetime as dt
import errno
import fcntl
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote

import msgspec
import structlog
from structlog.typing import EventDict

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
# Field names whose values are masked at any depth, matched by their words (snake,
# kebab or camelCase): any name with one of SECRET_WORDS (`client_secret`,
# `db_password`, `bearer`, `jwt`, `otp_code`); one ending in `token` (`access_token`,
# `x-auth-token`, but not `max_tokens`) or `signature` (`webhook_signature`, but not
# `signature_method`); one ending in `auth` after another word (`basic_auth`,
# `proxy_auth`; not `auth` alone, stella's own events name the auth mode so); one
# ending in `key` or `keys` after a word that makes it a credential (`api_key`,
# `private_keys`, `aws_secret_access_key`, but not `idempotency_key`, nor `key`, which
# names an API key's owner in stella's own events); one ending in `tokens` after a word
# that makes them credentials (`refresh_tokens`, `access_tokens`: `tokens` alone, or
# after any other word, is a count, as `prompt_tokens` or `max_tokens`).
SECRET_WORDS = frozenset(
    {
        "authorization",
        "bearer",
        "secret",
        "secrets",
        "password",
        "passwords",
        "passwd",
        "passwds",
        "passphrase",
        "passphrases",
        "pwd",
        "cookie",
        "cookies",
        "credential",
        "credentials",
        "apikey",
        "apikeys",
        "passkey",
        "passkeys",
        "jwt",
        "jwts",
        "otp",
        "totp",
        "hotp",
    }
)
SECRET_ENDINGS = (
    "token",
    "secret",
    "secrets",
    "password",
    "passwords",
    "passwd",
    "apikey",
    "apikeys",
)
SECRET_LAST_WORDS = frozenset({"token", "signature", "signatures"})
KEY_WORDS = frozenset(
    {"api", "secret", "private", "access", "auth", "signing", "encryption", "session", "master"}
)
TOKEN_WORDS = KEY_WORDS | {
    "refresh",
    "id",
    "bearer",
    "oauth",
    "csrf",
    "xsrf",
    "github",
    "bot",
    "device",
    "personal",
}
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
    if last in SECRET_LAST_WORDS or (last == "auth" and len(words) > 1):
        return True
    if len(words) > 1 and (
        (last in ("key", "keys") and words[-2] in KEY_WORDS)
        or (last == "tokens" and words[-2] in TOKEN_WORDS)
    ):
        return True
    # Words run together (accesstoken, APIToken, dbpassword, xapikey).
    return "".join(words).endswith(SECRET_ENDINGS)


BEARER_TEXT = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
# In an encoded line a control character before a word is an escape (`\n`, `\f`,
# `\u001b`) whose last character is a word character: the word starts there too,
# though `\b` sees none. Checked after the word's first character, which the pattern
# then starts with: the regex engine skips ahead to that character instead of trying
# these look-behinds at every position of the line (3 times faster).
_STARTED_BYTES = r"(?:(?<!\w.)|(?<=\\[bfnrt].)|(?<=\\u[0-9a-f]{4}.))"
# What `\s` matches in text (and so in mask()), as an encoded line holds it: a space,
# an escaped tab, newline, return, form feed, vertical tab or \x1c-\x1f, or the UTF-8
# of a Unicode space (U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F,
# U+205F, U+3000: msgspec writes them as they are).
_SPACE_BYTES = (
    r"(?:[ ]|\\[tnrf]|\\u00(?:0b|1[c-f])|\xc2[\x85\xa0]|\xe1\x9a\x80"
    r"|\xe2\x80[\x80-\x8a\xa8\xa9\xaf]|\xe2\x81\x9f|\xe3\x80\x80)"
)
BEARER_BYTES = re.compile(
    (r"([Bb]" + _STARTED_BYTES + r"(?i:earer))" + _SPACE_BYTES + r"+[A-Za-z0-9._~+/=-]+").encode()
)
# An Authorization or Proxy-Authorization header quoted in text (`Authorization: token
# ghp_...`, `'authorization': 'Basic ...'`, `authorization=...`): its credential is
# masked, a token or a list of parameters (`Digest username="u", response="..."`,
# `AWS4-HMAC-SHA256 Credential=.., SignedHeaders=a;b, Signature=..`). A known scheme
# word stays (it says what was there), as does a word that parameters follow; any
# other first word may be the credential itself (`sk-12ab is not valid`) or a scheme
# stella does not know (`Klaviyo-API-Key pk_...`): it is masked, and so is the word
# after it when that looks like a credential (a digit or one of `_.=+/` in it).
# Possessive: a scheme with no credential after it (`Bearer <key>`) is left as it is.
# The scheme's credential may follow on the next line (`{gap}`: any white space, as
# after `Bearer`), and so may a parameter after a comma; a second word with no scheme
# or a parameter with no comma is looked for on the same line only (`{ws}`).
_SCHEMES = (
    r"basic|bearer|digest|token|api-?key|key|negotiate|ntlm|oauth|hoba|mutual|vapid"
    r"|dpop|jwt|ssws|scram-sha-(?:1|256)"
)
_TOKEN = r"[^\s\"'\\,;<>]+"
_AUTH_HEADER = (
    r"(?i){start}((?:p{started}roxy-a|a{started})uthorization{q}{sp}*[:=]{sp}*{q})"  # name
    r"((?:" + _SCHEMES + r"|[a-z][a-z0-9-]*(?={gap}+[a-z0-9_.-]+=)){gap}+)?+"  # the scheme
    r"((?:{param}|" + _TOKEN + r")(?:(?:{gap}*,{gap}*|{ws}+){param})*"  # the credential
    r"(?(2)|(?:{ws}+(?=[^\s\"'\\,;<>]*[0-9_.=+/])" + _TOKEN + r")?))"  # no scheme: a 2nd
)
_PARAM = r"[a-z0-9_.-]+=(?:{string}|[^\s\"',\\]+)"  # name=value, name="value"
AUTH_HEADER_TEXT = re.compile(
    _AUTH_HEADER.format(
        start=r"\b",
        started="",
        q=r"[\"']?",
        sp=r"\s",
        gap=r"\s",
        ws=r"[ \t]",
        param=_PARAM.format(string=r'"[^"\r\n]*"'),
    )
)
# In an encoded line a quote inside a string is escaped: a bare one ends the string, so
# a JSON key named authorization (masked by its name) never matches, nor its `null`; a
# quoted value is `\"..\"`, whole escapes only.
AUTH_HEADER_BYTES = re.compile(
    _AUTH_HEADER.format(
        start="",
        started=_STARTED_BYTES,
        q=r"(?:\\\"|')?",
        sp=_SPACE_BYTES,
        gap=_SPACE_BYTES,
        ws=r"(?:[ ]|\\t)",
        param=_PARAM.format(string=r'\\"(?:[^"\\]|\\[^"])*\\"'),
    ).encode()
)
# `Basic <base64 of user:password>`, the colon checked: `basic idea` is no credential.
BASIC_TEXT = re.compile(r"(?i)\b(basic)\s+([A-Za-z0-9+/]{4,}={0,2})")
BASIC_BYTES = re.compile(
    (
        r"([Bb]" + _STARTED_BYTES + r"(?i:asic))" + _SPACE_BYTES + r"+([A-Za-z0-9+/]{4,}={0,2})"
    ).encode()
)


def _basic_text(m: re.Match[str]) -> str:
    return f"{m[1]} ***" if _is_basic(m[2].encode()) else m[0]


def _basic_bytes(m: re.Match[bytes]) -> bytes:
    return m[1] + b" ***" if _is_basic(m[2]) else m[0]


def _is_basic(token: bytes) -> bool:
    """Whether `token` is base64 of `user:password`, as a Basic credential is."""
    try:
        return b":" in base64.b64decode(token, validate=True)
    except ValueError:  # binascii.Error: not base64
        return False


# A URL's credentials in text: its user info (`postgres://u:pw@h/db`, a token as the
# user, `https://ghp_..@github.com`) and the values of its parameters named like a
# secret (`?token=..`, `&api_key=..`; also Google's `?key=..` and a SAS `&sig=..`). The
# user info ends at the authority's last `@`, the authority at the first `/`, `?` or `#`
# (RFC 3986: user info holds none of them unencoded), so an `@` further on (a package
# version `repo@v1.2`, an e-mail address in text without spaces) takes nothing with it;
# but an authority that looks like `user:password` cut short (a `:` not before a port's
# digits: `redis://:p/w@h`, a password with a `/` as people write them) goes up to the
# URL's last `@`, as /config has it.
# A URL ends at white space, a quote, `<`, `>`, or a backslash (an escape, in an
# encoded line).
_URL_TEXT = re.compile(r"://([^\s\"'`\\<>]+)")
_URL_BYTES = re.compile(rb"://([^\s\"'`\\<>]+)")
_AFTER_AUTHORITY = re.compile(r"[/?#]")
_CUT_PASSWORD = re.compile(r":(?![0-9]*$)")
_URL_PARAM = re.compile(r"([?&#;])([^=&#?;]*)=([^&#?;]+)")
URL_SECRET_PARAMS = frozenset({"key", "sig"})


def _is_url_secret(name: str) -> bool:
    """Whether a URL's parameter of that name (percent-encoded) holds a credential."""
    name = unquote(name)
    return is_secret_field(name) or name.lower() in URL_SECRET_PARAMS


def _masked_url(rest: str) -> str:
    """A URL after its `://` with its user info and secret parameters masked."""
    if "@" in rest:
        cut = _AFTER_AUTHORITY.search(rest)
        end = cut.start() if cut else len(rest)
        if "@" in rest[:end]:
            rest = "***@" + rest[:end].rpartition("@")[2] + rest[end:]
        elif _CUT_PASSWORD.search(rest[:end]):
            rest = "***@" + rest.rpartition("@")[2]
    if "=" in rest:
        rest = _URL_PARAM.sub(
            lambda p: p[1] + p[2] + "=***" if _is_url_secret(p[2]) else p[0], rest
        )
    return rest


def _url_text(m: re.Match[str]) -> str:
    return "://" + _masked_url(m[1])


def _url_bytes(m: re.Match[bytes]) -> bytes:
    # An encoded line's URL as text (a line is UTF-8; surrogateescape keeps any byte as
    # it was): one rule for both.
    rest = m[1].decode(errors="surrogateescape")
    return b"://" + _masked_url(rest).encode(errors="surrogateescape")


def _found(
    pattern: re.Pattern[bytes], line: bytes, where: bytes, word: bytes, backs: tuple[int, ...]
) -> list[re.Match[bytes]]:
    """The matches `pattern.sub` replaces in `line`, looked for only where one can start:
    `back` bytes before an occurrence of `word` in `where` (`line`, or `line` lowercased
    for a case-blind pattern), for each of `backs`, largest first.

    The regex engine on its own tries the pattern at every byte of a line: a whole
    conversation, with log.content, in one call that holds the GIL for as long as it
    takes (0.2 s for 7.5 MB with an Authorization header in it), while a search for the
    word's bytes runs at memory speed. Every match starts at one of these places and
    they come in order (a word is longer than its backs, and never overlaps itself), so
    the first one that matches after the last match is the one sub would take next."""
    found: list[re.Match[bytes]] = []
    done = 0
    at = where.find(word)
    while at >= 0:
        for back in backs:
            start = at - back
            if start >= done and (m := pattern.match(line, start)) is not None:
                found.append(m)
                done = m.end()
                break
        at = where.find(word, max(at + 1, done))
    return found


def _spliced(text: bytes, found: list[re.Match[bytes]], new: Iterable[bytes]) -> bytes:
    """`text` with each of the matches `found` (in order, apart) replaced by the next of
    `new`, copied once (a line may be megabytes)."""
    view = memoryview(text)
    parts: list[bytes | memoryview] = []
    done = 0
    for m, replacement in zip(found, new, strict=True):
        parts += (view[done : m.start()], replacement)
        done = m.end()
    parts.append(view[done:])
    return b"".join(parts)


def _masked(
    pattern: re.Pattern[bytes],
    replace: Callable[[re.Match[bytes]], bytes],
    line: bytes,
    lower: bytes,
    word: bytes,
    backs: tuple[int, ...],
) -> tuple[bytes, bytes]:
    """`line` with what `pattern` matches replaced (see _found), and lowercased."""
    # A match left as it was (`basic idea`: no credential) is no change to make.
    found = []
    new = []
    for m in _found(pattern, line, lower, word, backs):
        replacement = replace(m)
        if replacement != m[0]:
            found.append(m)
            new.append(replacement)
    if not found:
        return line, lower
    return _spliced(line, found, new), _spliced(lower, found, [n.lower() for n in new])


def _mask_schemes(line: bytes, lower: bytes) -> bytes:
    """An encoded line with credentials in its text masked: an Authorization header's
    (any scheme), a Basic one's, a bearer token (`lower` is the line lowercased)."""
    if b"uthorization" in lower:  # `Proxy-Authorization` 7 bytes before, or 1
        line, lower = _masked(
            AUTH_HEADER_BYTES, _auth_header_bytes, line, lower, b"uthorization", (7, 1)
        )
    if b"earer" in lower:
        line, lower = _masked(BEARER_BYTES, _bearer_bytes, line, lower, b"earer", (1,))
    if b"asic" in lower:
        line, lower = _masked(BASIC_BYTES, _basic_bytes, line, lower, b"asic", (1,))
    return line


def _auth_header_bytes(m: re.Match[bytes]) -> bytes:
    return m.expand(rb"\1\2***")


def _bearer_bytes(m: re.Match[bytes]) -> bytes:
    return m[1] + b" ***"


_encoder = msgspec.json.Encoder()
# What a client or a model wrote: left out of a line that could not be rendered whole.
_FREE_FORM = ("metadata", "prompt", "completion", "reasoning", "tool_calls")
# Lines gathered on the event loop go to the writer thread at most this often: each
# hand-over wakes the thread, and waking it per request costs more than the line.
HANDOVER_S = 0.01
# The most each output may have waiting to be written: past it, new lines are dropped
# and counted, so a stalled terminal or disk holds at most this much memory. In bytes,
# not lines: with `log.content` one line can hold a whole request.
MAX_BACKLOG_BYTES = 32 << 20
# The path of the file whose lock the processes of one server (its supervisor and its
# workers, which share one stdout) take around each write to stdout; set by the
# supervisor, unset with one process.
STDOUT_LOCK_VARIABLE = "STELLA_STDOUT_LOCK"


def _default(obj: Any) -> Any:
    return str(obj)


_lenient_encoder = msgspec.json.Encoder(enc_hook=_default)


class _Writer:
    """One output and the thread that writes it, with its backlog and error counts.

    The backlog is what the producers have queued minus what the thread has taken
    off the queue and tried to write. Each side writes only its own counters (the
    producers under the sink's lock, once per hand-over), so the thread never locks.
    """

    def __init__(
        self,
        output: str,
        write: Callable[[bytes], None],
        on_error: Callable[[str, BaseException], None],
        limit: int,
        done: Callable[[], None] = lambda: None,
    ) -> None:
        self.output = output
        self.limit = limit
        self._write_out = write
        self._on_error = on_error
        self._done = done
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Producers' side (under the sink's lock).
        self.queued = 0
        self.dropped_full = 0
        # The thread's side.
        self.handled = 0
        self.dropped_failed = 0
        self.errors = 0
        self.thread = threading.Thread(target=self._run, name=f"stella-log-{output}", daemon=True)
        self.thread.start()

    @property
    def dropped(self) -> int:
        """Lines that never reached the output: its backlog was full, or the write failed."""
        return self.dropped_full + self.dropped_failed

    def submit(self, lines: list[bytes]) -> None:
        """Queue lines, or drop those past the backlog's bound (caller holds the lock)."""
        size = sum(map(len, lines))
        room = self.limit - (self.queued - self.handled)
        if size > room:  # keep the oldest lines that fit, in order
            kept: list[bytes] = []
            size = 0
            for line in lines:
                if size + len(line) > room:
                    break
                size += len(line)
                kept.append(line)
            self.dropped_full += len(lines) - len(kept)
            lines = kept
            if not lines:
                return
        self.queued += size
        self._queue.put(lines)

    def mark(self) -> threading.Event:
        """An Event set once everything queued before it has been handled."""
        done = threading.Event()
        self._queue.put(done)
        return done

    def stop(self) -> None:
        """Ask the thread to end once it has handled everything queued before."""
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(items) < 256:
                    items.append(self._queue.get_nowait())
            lines: list[bytes] = []
            stop = False
            for item in items:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    self._write(lines)
                    lines = []
                    item.set()
                else:
                    lines.extend(item)
            self._write(lines)
            if stop:
                self._done()
                return

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        data = b"".join(lines)
        try:
            self._write_out(data)
        except Exception as exc:  # a broken output must not end its thread: count, go on
            self.errors += 1
            # The lines that went whole before the failure are not lost.
            self.dropped_failed += len(lines) - getattr(exc, "lines_written", 0)
            self._on_error(self.output, exc)
        finally:
            self.handled += len(data)


class LogSink:
    """Renders events where they happen; threads do the writing.

    `put` redacts and encodes one event (microseconds, with msgspec) and adds it
    to a batch; on an event loop the batch is handed to the writer threads every
    HANDOVER_S, so a burst of requests wakes each thread once. stdout and the audit
    file have a thread each: a stalled or broken one holds up or loses only its own
    lines. Each keeps at most `max_backlog` bytes waiting (beyond it lines are
    dropped and counted), counts its failed writes, and reports the first failure of
    each kind as one JSON line on stderr.
    """

    def __init__(
        self,
        *,
        fmt: str = "json",
        stream: IO[bytes] | None = None,
        audit_path: str = "",
        secrets: Iterable[str] = (),
        max_backlog: int = MAX_BACKLOG_BYTES,
        stdout_lock: str = "",
    ) -> None:
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stdout.buffer
        with contextlib.suppress(AttributeError, OSError, ValueError):
            # A stdout a parent made non-blocking (a shared pipe) would take part of a
            # batch and keep the rest in its buffer: lines torn into each other.
            os.set_blocking(self.stream.fileno(), True)
        self.audit_path = audit_path
        self.secrets: list[str] = []
        self._secret_bytes: list[bytes] = []
        self.add_secrets(secrets)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._audit: IO[bytes] | None = None
        self._audit_fresh = False  # just opened: its last line not looked at yet
        self._stdout_lock: int | None = None
        if stdout_lock:
            self.share_stdout(stdout_lock)
        self._batch: list[bytes] = []
        self._audit_batch: list[bytes] = []
        self._safe_keys: set[Any] = set()
        self._scheduled = False
        self._closed = False
        # Hand-overs come from the event loop and from other threads (at start-up, the
        # MLX worker): the lock keeps the writers' queued counts whole.
        self._lock = threading.Lock()
        self._reported: set[tuple[str, str, int | None]] = set()
        self._out = _Writer("stdout", self._write_stdout, self._report, max_backlog)
        self._audit_out = (
            _Writer("audit", self._write_audit, self._report, max_backlog, self._close_audit)
            if audit_path
            else None
        )

    def share_stdout(self, lock_path: str) -> None:
        """Write each batch to stdout under an exclusive lock on the file at `lock_path`,
        which every other process writing to the same stdout takes too (see
        _write_stdout); without the file, stdout is written unlocked as before. Once:
        the writer thread may be using the descriptor."""
        if self._stdout_lock is not None:
            return
        with contextlib.suppress(OSError):
            # A descriptor of its own (not inherited): flock excludes another process
            # only through another open file description.
            self._stdout_lock = os.open(lock_path, os.O_RDWR)

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
            line, audit = self._lines(event, self._encode(event, checked))
        except Exception as exc:  # a log line must never break a request
            line, audit = self._reduced(event, exc)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._submit([line], [audit] if audit is not None else [])  # not on the loop
            return
        self._batch.append(line)
        if audit is not None:
            self._audit_batch.append(audit)
        if not self._scheduled:
            self._scheduled = True
            loop.call_later(HANDOVER_S, self._handover)

    def _reduced(self, event: dict[str, Any], exc: Exception) -> tuple[bytes, bytes | None]:
        """The event without its free-form parts, when it could not be rendered whole:
        an inference still leaves its audit line."""
        try:
            reduced = {k: v for k, v in event.items() if k not in _FREE_FORM}
            reduced["log_error"] = f"not rendered whole: {type(exc).__name__}"
            return self._lines(event, self._encode(reduced))
        except Exception as again:
            return f"log render failed: {again!r}\n".encode(), None

    def _lines(self, event: dict[str, Any], line: bytes) -> tuple[bytes, bytes | None]:
        """An encoded event as stdout shows it, and as the audit file keeps it (an
        inference's, when there is an audit file)."""
        audit = line if self.audit_path and event.get("event") == "inference" else None
        if self.fmt != "json":
            line = _console(msgspec.json.decode(line))
        return line, audit

    def _handover(self) -> None:
        batch, self._batch = self._batch, []
        audit, self._audit_batch = self._audit_batch, []
        self._scheduled = False
        if batch or audit:
            self._submit(batch, audit)

    def _submit(self, lines: list[bytes], audit: list[bytes]) -> None:
        with self._lock:
            if lines:
                self._out.submit(lines)
            if audit and self._audit_out is not None:
                self._audit_out.submit(audit)

    def counts(self) -> dict[str, tuple[int, int]]:
        """Per output (stdout, audit): lines dropped and failed writes since start."""
        return {w.output: (w.dropped, w.errors) for w in self._writers()}

    def _encode(self, event: dict[str, Any], checked: bool = False) -> bytes:
        if not checked and self._has_secret_field(event):
            event = self._redact(event)
        line = _lenient_encoder.encode(event)
        for secret in self._secret_bytes:
            if secret in line:
                line = line.replace(secret, b"***")
        # A memchr for the slash first: most lines have none, and looking for `://`
        # costs five times as much.
        if b"/" in line and b"://" in line:
            line = _URL_BYTES.sub(_url_bytes, line)
        # A scheme's credential follows white space: a space, an escape (`\n`) or a
        # Unicode space (not ASCII), and an encoded line holds a literal space only
        # inside a string: two memchr and an ASCII check spare most lines the slower
        # substring search.
        if b" " in line or b"\\" in line or not line.isascii():
            line = _mask_schemes(line, line.lower())
        elif (not checked or "metadata" in event or "prompt" in event) and (
            b"uthorization" in line or b"UTHORIZATION" in line
        ):
            # `Authorization:token`, no space: looked for where free text may be (an
            # inference event has it only in a client's or a model's part).
            line = AUTH_HEADER_BYTES.sub(rb"\1\2***", line)
        return line + b"\n"

    def _has_secret_field(self, node: dict[str, Any] | list[Any]) -> bool:
        """Whether any key, at any depth, names a secret (known-safe keys are cached)."""
        if isinstance(node, list):
            for item in node:
                if (type(item) is dict or type(item) is list) and self._has_secret_field(item):
                    return True
            return False
        safe = self._safe_keys
        for key, value in node.items():
            if key not in safe:
                if is_secret_field(str(key)):
                    if value:
                        return True
                    # An empty value now says nothing of the next one: never cached as safe.
                elif len(safe) < 4096:
                    safe.add(key)
            if (type(value) is dict or type(value) is list) and self._has_secret_field(value):
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

    def _writers(self) -> list[_Writer]:
        return [w for w in (self._out, self._audit_out) if w is not None]

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait, up to `timeout` seconds in all, until every output has written what was
        queued so far; whether all of them did."""
        if self._closed:
            return True
        self._handover()
        deadline = time.monotonic() + timeout
        # Each output waits on its own: a stalled stdout does not hold up the audit file.
        marks = [w.mark() for w in self._writers()]
        return all([m.wait(max(0.0, deadline - time.monotonic())) for m in marks])

    def close(self, timeout: float = 10.0) -> bool:
        """Write what is queued, close the audit file, stop the threads (waiting up to
        `timeout` seconds in all); whether every thread ended."""
        if self._closed:
            return True
        self._handover()
        self._closed = True
        deadline = time.monotonic() + timeout
        writers = self._writers()
        for w in writers:
            w.stop()
        for w in writers:
            w.thread.join(max(0.0, deadline - time.monotonic()))
        if self._stdout_lock is not None and not self._out.thread.is_alive():
            with contextlib.suppress(OSError):
                os.close(self._stdout_lock)
            self._stdout_lock = None
        return not any(w.thread.is_alive() for w in writers)

    def _write_stdout(self, data: bytes) -> None:
        """Write a batch to stdout, whole, under the shared lock when there is one.

        Several workers share one stdout: a write to a pipe stays whole only up to
        PIPE_BUF (4 KiB), and a batch, or one line with `log.content`, can be far more
        than the pipe holds; another worker's lines would land in the middle of it. The
        lock is waited for as long as it takes, as a blocked write would be (a stalled
        reader holds up every worker alike; each one's backlog bound applies). A worker
        that dies holding it lets go with its descriptors (the kernel's doing).
        """
        fd = self._stdout_lock
        if fd is None:
            self.stream.write(data)
            self.stream.flush()
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on the lock file's file system: written unlocked
            self.stream.write(data)
            self.stream.flush()
            return
        try:
            # Byte 0 of the lock file is 1 while a batch is being written: still 1, the
            # last writer died or failed part-way, and its cut line ends here first.
            if os.pread(fd, 1, 0) == b"1":
                data = b"\n" + data
            os.pwrite(fd, b"1", 0)
            self.stream.write(data)
            self.stream.flush()
            os.pwrite(fd, b"0", 0)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _write_audit(self, data: bytes) -> None:
        """Append whole lines. Each batch is written under an exclusive lock on the file
        (workers of one server share it); a write a full disk cut short is cut back to
        its last whole line, so the file never holds a torn one. The lines it lost are
        counted (`lines_written` on the error says how many went)."""
        if self._audit is not None and self._audit_moved(self._audit):
            # Rotated by rename (logrotate's default) or deleted: the open file is no
            # longer the one at audit_path, and lines written to it would end up in the
            # old file, then in none once it is removed. A new one is made at the path.
            self._close_audit()
        if self._audit is None:
            self._audit = self._open_audit()
        fd = self._audit.fileno()
        failed: OSError | None = None
        try:
            with _locked(fd) as held:
                if self._audit_fresh:
                    # A line a process that died mid-write left cut short ends here, so
                    # the next is whole.
                    self._audit_fresh = False
                    _end_line(fd)
                start = os.fstat(fd).st_size  # appended after this: nobody else writes now
                try:
                    _write_all(fd, data)
                except _Cut as cut:
                    whole = data.rfind(b"\n", 0, cut.done) + 1  # bytes of whole lines
                    # Cut back only what is surely this write's: under the lock, or when
                    # the file grew by exactly what went (nobody else appended).
                    if held or os.fstat(fd).st_size == start + cut.done:
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, start + whole)
                        written = data.count(b"\n", 0, whole)
                    else:
                        written = data.count(b"\n", 0, cut.done)
                    failed = cut.cause
                    failed.lines_written = written  # type: ignore[attr-defined]
        except OSError as exc:  # the lock never came
            failed = exc
        if failed is not None:
            # Open afresh for the next batch: the file may have been moved, its disk
            # remounted, or space freed.
            self._close_audit()
            raise failed

    def _audit_moved(self, audit: IO[bytes]) -> bool:
        """Whether audit_path no longer names the open `audit` file (two stat calls a
        batch: cheap next to the write, and on the writer's thread)."""
        try:
            at_path = os.stat(self.audit_path)
            held = os.fstat(audit.fileno())
        except (OSError, ValueError):
            return True
        return (at_path.st_ino, at_path.st_dev) != (held.st_ino, held.st_dev)

    def _open_audit(self) -> IO[bytes]:
        path = Path(self.audit_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.write on its descriptor (no buffer); readable, for the last line's check.
        audit = os.fdopen(open_audit(path, os.O_RDWR), "a+b", buffering=0)
        self._audit_fresh = True  # its last line is looked at under the first write's lock
        return audit

    def _close_audit(self) -> None:
        audit, self._audit = self._audit, None
        if audit is not None:
            with contextlib.suppress(OSError, ValueError):
                audit.close()

    def _report(self, output: str, exc: BaseException) -> None:
        """Say on stderr, once per output and kind of error, that writes are failing."""
        kind = (output, type(exc).__name__, getattr(exc, "errno", None))
        if kind in self._reported:
            return
        self._reported.add(kind)
        event: dict[str, Any] = {
            "event": "log_write_failed",
            "ts": time.time(),
            "level": "error",
            "output": output,
            "error": f"{type(exc).__name__}: {exc}",
            "note": "later failures like this one are only counted (stella_log_write_errors_total)",
        }
        if output == "audit":
            event["path"] = self.audit_path
        line = _lenient_encoder.encode(event) + b"\n"
        # Best effort, from a thread of its own: stderr may be as stalled as stdout,
        # and the writer that failed must not wait on it.
        threading.Thread(
            target=_to_stderr, args=(line,), name="stella-log-report", daemon=True
        ).start()

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


# A new audit file is its owner's alone: with log.content its lines hold every prompt and
# answer (an existing file, made by the operator or a log rotator, keeps its mode).
AUDIT_MODE = 0o600


def open_audit(path: str | Path, access: int = os.O_WRONLY) -> int:
    """A descriptor appending to the audit file, which is created with AUDIT_MODE when it
    does not exist."""
    return os.open(path, access | os.O_APPEND | os.O_CREAT, AUDIT_MODE)


class _Cut(Exception):
    """A write that failed after `done` bytes."""

    def __init__(self, done: int, cause: OSError) -> None:
        super().__init__(done, cause)
        self.done = done
        self.cause = cause


# The longest the audit writer waits for another process's lock on the file (a worker
# writing, a rotation script): past it, the batch is a failed write, counted.
LOCK_WAIT_S = 2.0


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[bool]:
    """An exclusive lock on an open file, waited for at most LOCK_WAIT_S (OSError past
    it); yields whether it is held (False on a file system without locks)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise OSError(
                    errno.EWOULDBLOCK, "the audit file stays locked by another process"
                ) from None
            time.sleep(0.01)
        except OSError:  # no locks here: written unlocked
            yield False
            return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)


def _end_line(fd: int) -> None:
    """End the file's last line if it was left without its newline."""
    with contextlib.suppress(OSError):
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.write(fd, b"\n")


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`, or raise _Cut saying how much went."""
    view = memoryview(data)
    done = 0
    try:
        while done < len(data):
            done += os.write(fd, view[done:])
    except OSError as exc:
        raise _Cut(done, exc) from None


def _to_stderr(line: bytes) -> None:
    with contextlib.suppress(OSError):
        os.write(2, line)


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


def _add_meta(_: Any, method: str, event: EventDict) -> EventDict:
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
    _sink = LogSink(
        fmt=fmt,
        stream=stream,
        audit_path=audit_path,
        secrets=secrets,
        stdout_lock=os.environ.get(STDOUT_LOCK_VARIABLE, ""),
    )
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


@atexit.register
def _close_at_exit() -> None:
    """Close the sink in use when the interpreter exits: a line still queued (a warning
    just before a failed start's exit) is written, and the writer threads end before
    the interpreter tears stdout down under them (a fatal error, not just a lost line)."""
    # A stream already closed (a test runner's captured stdout) has nothing to take.
    if _sink is not None and not getattr(_sink.stream, "closed", False):
        _sink.close(timeout=5.0)


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
    """`text` with every secret the sink knows of, credentials after a scheme or an
    Authorization header, and a URL's user info and secret parameters masked: for text
    that reaches a client from elsewhere, such as an upstream's error message."""
    current = _sink
    if current is not None:
        for secret in current.secrets:
            if secret in text:
                text = text.replace(secret, "***")
    if "://" in text:
        text = _URL_TEXT.sub(_url_text, text)
    lower = text.lower()
    if "uthorization" in lower:
        text = AUTH_HEADER_TEXT.sub(r"\1\2***", text)
    if "earer" in lower:
        text = BEARER_TEXT.sub(r"\1 ***", text)
    if "asic" in lower:
        text = BASIC_TEXT.sub(_basic_text, text)
    return text


# The shortest start of a secret masked at the end of a text cut short: shorter ones
# ("sk-") tell nothing of a key, and would mask the last letters of many a message.
CUT_SECRET_MIN = 4


def mask_cut(text: str) -> str:
    """`text`, cut short, with the start of a secret the cut left at its end masked
    too: a cut falling inside a credential an upstream quoted must not pass on its
    first characters (mask() finds whole secrets only)."""
    current = _sink
    if current is None or not text:
        return text
    longest = 0
    for secret in current.secrets:
        for n in range(min(len(secret) - 1, len(text)), max(longest, CUT_SECRET_MIN - 1), -1):
            if text.endswith(secret[:n]):
                longest = n
                break
    return text[:-longest] + "***" if longest else text


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
