"""A fake Anthropic Messages API following its docs (SSE event sequence, error shapes).

The model name picks the behaviour: `claude-ok`, `claude-tools` (`-whole`: its input
at the start, no deltas), `claude-two-tools` (two tool_use blocks, one when
`tool_choice.disable_parallel_tool_use` is true, as the API honours it),
`claude-tools-end-turn` (the tool_use of `claude-tools` ended with `end_turn`, as a
compatible server may end it), `claude-cached` (a prompt mostly read from the prompt
cache: message_start's usage has `cache_creation_input_tokens` and
`cache_read_input_tokens` beside the uncached `input_tokens`), `claude-null-usage`
(message_delta's usage with null for every count the API may send as null),
`claude-zero-usage` (message_delta's input_tokens 0, as some compatible servers send a
count they do not give again), `claude-grown-usage` (message_delta's cumulative counts
larger than message_start's: DELTA_COUNTS), `claude-bogus-usage` (counts no real server
sends: BOGUS_COUNTS, and output_tokens -7),
`claude-context-full` (the text ended with `model_context_window_exceeded`),
`claude-refusal` (REFUSED_AT, then `refusal`: the API's streaming classifiers cut the
answer short so), `claude-429`
(rate limit with retry-after), `claude-529` (overloaded), `claude-error-mid`
(an `error` event after a text delta), `claude-error-first` and `claude-api-error-first`
(a 200 whose one event is an `error`, overloaded_error or api_error),
`claude-huge-error-first` and `claude-huge-error-mid` (an overloaded_error, then an
api_error after a text delta, of HUGE_ERROR), `claude-malformed`, `claude-pings` (after
the first text delta, a `ping` event every PING_EVERY_S for PINGS_S, then the rest: the
API sends pings while the model is slow), `claude-comments` (the same with SSE comment
lines, `: keepalive`, as OpenRouter and proxies keep a stream open), `claude-too-long`
and `claude-too-long-max` (the API's 400s for a prompt past the context window:
TOO_LONG), `claude-429-limits` (a 429 without retry-after, its `anthropic-ratelimit-*`
headers saying which limits are spent and when they reset: LIMITS),
`claude-no-message-stop` (the stream ends after message_delta, without message_stop),
`claude-cut` (the stream ends after the first text delta), `claude-text-start` (a text
block that starts with TEXT_START), `<model>-json-anyway` (`<model>`'s answer as one
whole Message though a stream was asked for, as a proxy may give it; `claude-json-anyway`
a text), `claude-json-error-anyway` (an overloaded_error object, with status 200, to a
stream), `claude-missing` (the API's 404 for a model it does not have: `not_found_error`,
"model: claude-missing"). A path it does not serve (a base_url ending in `/v1`, which
makes `/v1/v1/messages`) is the API's 404 `not_found_error` "Not Found". Every answer has a `request-id` header (`req_fake_` and a number), as
the API's do. Requests without
the right x-api-key get 401, without `max_tokens` (or with a message without content but a final assistant one, or a
tool_use id used twice in the conversation, a temperature outside 0..1, a stop sequence
of only whitespace, text of only whitespace, no message at all, a final assistant turn
ending in whitespace, both `temperature` and `top_p`, a `metadata` with a key but `user_id` or a `user_id` that
is not a string of at most 256 characters) 400; `"stream": true` gets the event
sequence, anything else one Message object, as the API does. A text answer asked for in
a JSON schema (`output_config.format`, structured outputs) is an instance of it
(`instance`), in pieces; an `output_config` the API would refuse (a format type other
than `json_schema`, no schema object, an unknown key) is a 400.

Prompt caching as the API has it: `cache_control` (`{"type": "ephemeral"}`, `ttl` `5m`
or `1h`) on tool definitions, system text blocks and message content blocks (a
tool_result's own blocks too), or at the top level (automatic caching); anywhere else
(a message, a thinking block), an empty text block, another type or ttl, more than 4
(`A maximum of 4 blocks with cache_control may be provided. Found N.`), and a 1h one
after a 5m one (in the prefix's order: tools, system, messages) are 400s. The fake
keeps every prefix a breakpoint ended (`cached`, by its words and signs as `tokens()`
counts them, cache_control left out) and answers, to a model without counts of its own
in CACHE, the API's usage for it: `cache_read_input_tokens` the longest marked prefix
it kept from an earlier request (a breakpoint's own prefix, or one ending up to 20
blocks before it, as the API looks back), `cache_creation_input_tokens` the rest up to
the last breakpoint, `input_tokens` what follows it (no minimum length).

Extended thinking as the API has it: with `thinking` of type `enabled` or `adaptive`, any
model thinks first (not again when the conversation ends with tool results: its turn goes
on), a thinking block of THOUGHT's pieces (none with `display: "omitted"`, the block then
empty) signed by `sign()`, and `claude-redacts` a `redacted_thinking` block after it (its
`data` kept in `redacted`); message_delta's usage counts the thinking in `output_tokens`
and `output_tokens_details.thinking_tokens`. It refuses what the API refuses: a
`budget_tokens` below 1024, not below `max_tokens`, or missing for `enabled`; with
thinking on, a temperature but 1, a top_k, a top_p below 0.95, a forced tool call, and a
last assistant turn (the messages since the last user message without tool results) that
calls tools without starting with a thinking block; a thinking block in a last turn with
thinking off; a thinking block sent back whose signature is not the fake's for its text
(or for an omitted display's empty one), a redacted one whose data it never gave.
`claude-thinks-fails` thinks (when asked) and then fails with an `api_error` event.

Some models refuse what others take, as the API's models do (MODEL_RULES, after the
models overview and the extended thinking, adaptive thinking and effort pages):
`claude-no-thinking` takes no `thinking` of type enabled or adaptive (Claude 3.5 Haiku),
`claude-adaptive-only` refuses `enabled` (Claude Opus 4.7: adaptive thinking and
`output_config.effort` only), `claude-no-effort` takes `enabled` but neither
`output_config.effort` nor adaptive thinking (Claude Haiku 4.5), and `claude-capped`
refuses a `max_tokens` over 32,000 (Claude Opus 4.1's output cap), each in the API's words.

`POST /v1/messages/count_tokens` answers `{"input_tokens": n}`, `n` the `tokens()` of
the body: it takes the documented parameters alone (a message's `max_tokens`, `stream`,
`temperature`, ... are a 400 "Extra inputs are not permitted"), wants `model` and
`messages`, refuses what `/v1/messages` refuses of them, and answers `claude-429`,
`claude-529` and `claude-missing` as `/v1/messages` does, and `claude-negative-count` with
`{"input_tokens": -5}`, no count; its requests and headers are kept in `counts` and
`count_headers`.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

KEY = "sk-ant-fake-key"
# An upstream's error text of a megabyte over several lines (a traceback, a dump).
HUGE_ERROR = "first line\nsecond line\r\n\t" + "E" * 1_000_000
# What model `claude-refusal` says before the API's classifiers stop it.
REFUSED_AT = "Hello!"
# The cache's counts in message_start's usage, by model: the API's `input_tokens` are
# only the prompt's tokens after the last cache breakpoint, neither written nor read.
CACHE = {"claude-cached": {"cache_creation_input_tokens": 200, "cache_read_input_tokens": 1000}}
# What message_delta's usage may carry as null (MessageDeltaUsage: only output_tokens
# is never null): counts not given again, so message_start's stand.
NULL_COUNTS = {
    "input_tokens": None,
    "cache_creation_input_tokens": None,
    "cache_read_input_tokens": None,
    "server_tool_use": None,
}
# The counts of `claude-bogus-usage`, in message_start's usage and message_delta's (whose
# output_tokens is -7): no count at all, a broken or hostile server's.
BOGUS_COUNTS = {"input_tokens": 10**15, "cache_read_input_tokens": -3}
# message_delta's usage of `claude-grown-usage`: the counts grew since message_start's
# (cumulative, as the API's are; server tools read more input after the start).
DELTA_COUNTS = {"input_tokens": 30, "cache_read_input_tokens": 40}


# What the model thinks, in the pieces it streams, when the request turns thinking on.
THOUGHT = ["The user ", "says hello; ", "I should greet them."]
# The key of its thinking blocks' signatures.
_SECRET = b"fake-anthropic-thinking"
# Where the API's thinking errors point to.
_THINKING_DOCS = (
    "Please consult our documentation at "
    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
)


# `claude-pings`: how often, and how long, it pings between its first text and the rest.
PING_EVERY_S = 0.1
PINGS_S = 1.0
# The API's messages for a prompt past the model's context window, by model.
TOO_LONG = {
    "claude-too-long": "prompt is too long: 210000 tokens > 200000 maximum",
    "claude-too-long-max": (
        "input length and `max_tokens` exceed context limit: 188240 + 21333 > 200000, "
        "decrease input length or `max_tokens` and try again"
    ),
}
# `claude-429-limits`: per rate limit, what is left of it and the seconds until its reset.
# Two are spent: a retry succeeds only once both are reset, after the later one's 3 s.
LIMITS = {"requests": (0, 2), "input-tokens": (0, 3), "output-tokens": (8000, 30)}
# What the text block of `claude-text-start` starts with, in content_block_start.
TEXT_START = "Well, "


# What POST /v1/messages/count_tokens takes (the API's MessageCountTokensParams and the
# beta's): the prompt, not the answer.
COUNT_PARAMS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "output_format",
        "cache_control",
        "speed",
        "mcp_servers",
        "context_management",
        "compaction",
        "billing_policy",
    }
)


def _words(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def tokens(body: dict[str, Any]) -> int:
    """The fake's count of a count_tokens body: the words and signs of its prompt (all but
    the model's name), a number that changes with any of it."""
    prompt = {k: v for k, v in body.items() if k != "model"}
    return len(re.findall(r"\w+|[^\w\s]", json.dumps(prompt, sort_keys=True)))


def err(kind: str, message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        {"type": "error", "error": {"type": kind, "message": message}}, status, headers=headers
    )


async def no_such_path(request: Request, exc: Exception) -> Response:
    """The API's 404 for a path it does not serve."""
    return err("not_found_error", "Not Found", 404)


# What some models refuse (see the module's docstring): per model, the rules it breaks.
MODEL_RULES: dict[str, frozenset[str]] = {
    "claude-no-thinking": frozenset({"enabled", "adaptive", "effort"}),
    "claude-adaptive-only": frozenset({"enabled"}),
    "claude-no-effort": frozenset({"adaptive", "effort"}),
}
# A model's most output tokens (max_tokens), where it is less than the fake's default.
OUTPUT_CAP = {"claude-capped": 32000}


def _model_rules(body: dict[str, Any]) -> str | None:
    """The API's 400 for what the body's model does not take (None: it takes it)."""
    model = str(body.get("model"))
    cap = OUTPUT_CAP.get(model)
    if cap is not None and body["max_tokens"] > cap:
        return (
            f"max_tokens: {body['max_tokens']} > {cap}, which is the maximum allowed number "
            f"of output tokens for {model}"
        )
    refused = MODEL_RULES.get(model)
    if not refused:
        return None
    kind = (body.get("thinking") or {}).get("type")
    if kind in refused:
        if refused >= {"enabled", "adaptive"}:
            return f"'{model}' does not support thinking."
        if kind == "enabled":
            return (
                '"thinking.type.enabled" is not supported for this model. Use '
                '"thinking.type.adaptive" and "output_config.effort" to control thinking '
                "behavior."
            )
        return f"adaptive thinking is not supported on {model}"
    if "effort" in refused and "effort" in (body.get("output_config") or {}):
        return "This model does not support the effort parameter."
    return None


class FakeAnthropic:
    """The app plus the bodies and headers it received."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        # The request-id header of each answer of /v1/messages, in order.
        self.request_ids: list[str] = []
        # The prompt prefixes a cache breakpoint ended, as sent (see _prefixes).
        self.cached: set[str] = set()
        # The bodies and headers POST /v1/messages/count_tokens received.
        self.counts: list[dict[str, Any]] = []
        self.count_headers: list[dict[str, str]] = []
        # The redacted_thinking data it gave (a block sent back must be one of them).
        self.redacted: set[str] = set()
        self.app = Starlette(
            routes=[
                Route("/v1/messages", self.with_request_id, methods=["POST"]),
                Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
                Route("/v1/models", self.models),
                Route("/health", self.models),
            ],
            exception_handlers={404: no_such_path},
        )

    def sign(self, thinking: str) -> str:
        """The signature of a thinking block's text: only this fake makes it."""
        return base64.b64encode(hmac.digest(_SECRET, thinking.encode(), "sha256")).decode()

    def _signatures(self, messages: list[dict[str, Any]]) -> str | None:
        """The API's 400 for a thinking block sent back that it did not sign as it is (its
        text changed, or none given), or a redacted_thinking block it did not give."""
        for i, m in enumerate(messages):
            content = m.get("content")
            for j, b in enumerate(content if isinstance(content, list) else ()):
                if b.get("type") == "thinking":
                    # Its one thinking, as it gave it (or empty: its display omitted).
                    whole = "".join(THOUGHT)
                    if b.get("signature") != self.sign(whole) or b.get("thinking") not in (
                        "",
                        whole,
                    ):
                        return f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
                elif b.get("type") == "redacted_thinking" and b.get("data") not in self.redacted:
                    return f"messages.{i}.content.{j}: Invalid `data` in `redacted_thinking` block"
        return None

    async def models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "data": [{"type": "model", "id": "claude-ok", "display_name": "ok"}],
                "has_more": False,
            }
        )

    async def with_request_id(self, request: Request) -> Response:
        response = await self.messages(request)
        rid = f"req_fake_{len(self.request_ids) + 1}"
        self.request_ids.append(rid)
        response.headers["request-id"] = rid
        return response

    async def count_tokens(self, request: Request) -> Response:
        if request.headers.get("x-api-key") != KEY:
            return err("authentication_error", "invalid x-api-key", 401)
        if not request.headers.get("anthropic-version"):
            return err("invalid_request_error", "anthropic-version: header is required", 400)
        body = await request.json()
        self.counts.append(body)
        self.count_headers.append(dict(request.headers))
        for key in body:
            if key not in COUNT_PARAMS:
                return err("invalid_request_error", f"{key}: Extra inputs are not permitted", 400)
        for key in ("model", "messages"):
            if key not in body:
                return err("invalid_request_error", f"{key}: Field required", 400)
        messages = body["messages"]
        for problem in (
            _cache_controls(body),
            _unlinked(messages),
            _empty(messages),
            _blank(messages),
            _output_config(body.get("output_config")),
        ):
            if problem is not None:
                return err("invalid_request_error", problem, 400)
        model = body["model"]
        if model == "claude-429":
            return err("rate_limit_error", "Rate limited", 429, {"retry-after": "3"})
        if model == "claude-missing":
            return err("not_found_error", f"model: {model}", 404)
        if model == "claude-529":
            return err("overloaded_error", "Overloaded", 529)
        if model == "claude-negative-count":
            return JSONResponse({"input_tokens": -5})
        response = JSONResponse({"input_tokens": tokens(body)})
        response.headers["request-id"] = f"req_fake_count_{len(self.counts)}"
        return response

    async def messages(self, request: Request) -> Response:
        if request.headers.get("x-api-key") != KEY:
            return err("authentication_error", "invalid x-api-key", 401)
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return err("invalid_request_error", "max_tokens: Field required", 400)
        if (problem := _unlinked(body.get("messages") or [])) is not None:
            return err("invalid_request_error", problem, 400)
        if (problem := _cache_controls(body)) is not None:
            return err("invalid_request_error", problem, 400)
        if (problem := _empty(body.get("messages") or [])) is not None:
            return err("invalid_request_error", problem, 400)
        if (problem := _blank(body.get("messages") or [])) is not None:
            return err("invalid_request_error", problem, 400)
        if (problem := _output_config(body.get("output_config"))) is not None:
            return err("invalid_request_error", problem, 400)
        if (problem := _sampling(body)) is not None:
            return err("invalid_request_error", problem, 400)
        if (problem := _metadata(body.get("metadata"))) is not None:
            return err("invalid_request_error", problem, 400)
        if (problem := _thinking(body)) is not None:
            return err("invalid_request_error", problem, 400)
        if (problem := _model_rules(body)) is not None:
            return err("invalid_request_error", problem, 400)
        if (problem := self._signatures(body.get("messages") or [])) is not None:
            return err("invalid_request_error", problem, 400)
        model = body["model"]
        if model == "claude-429":
            return err(
                "rate_limit_error",
                "Number of requests has exceeded your rate limit",
                429,
                {"retry-after": "3"},
            )
        if model == "claude-missing":
            return err("not_found_error", f"model: {model}", 404)
        if model == "claude-529":
            return err("overloaded_error", "Overloaded", 529)
        if model in TOO_LONG:
            return err("invalid_request_error", TOO_LONG[model], 400)
        if model == "claude-429-limits":
            now = datetime.now(UTC)
            headers = {}
            for limit, (left, reset_s) in LIMITS.items():
                reset = (now + timedelta(seconds=reset_s)).isoformat().replace("+00:00", "Z")
                headers[f"anthropic-ratelimit-{limit}-remaining"] = str(left)
                headers[f"anthropic-ratelimit-{limit}-reset"] = reset
            return err("rate_limit_error", "Rate limited", 429, headers)
        if model == "claude-json-error-anyway":
            return err("overloaded_error", "Overloaded", 200)
        if model.endswith("-json-anyway"):
            # A proxy's answer to a stream: one Message, as to the model without the suffix.
            return await self._message(model.removesuffix("-json-anyway"), body)
        if not body.get("stream"):  # the API's default: one Message object
            return await self._message(model, body)
        return StreamingResponse(self._events(model, body), media_type="text/event-stream")

    async def _message(self, model: str, body: dict[str, Any]) -> Response:
        """The non-stream answer: the same content as the events, as one Message."""
        message: dict[str, Any] = {}
        blocks: list[dict[str, Any]] = []
        partial = ""
        async for chunk in self._events(model, body):
            data = chunk.decode().partition("\ndata: ")[2]
            try:
                ev = json.loads(data)
            except ValueError:
                return err("api_error", "Internal server error", 500)
            kind = ev["type"]
            if kind == "error":
                return err(ev["error"]["type"], ev["error"]["message"], 529)
            if kind == "message_start":
                message = ev["message"]
            elif kind == "content_block_start":
                blocks.append(dict(ev["content_block"]))
                partial = ""
            elif kind == "content_block_delta":
                delta = ev["delta"]
                if delta["type"] == "text_delta":
                    blocks[-1]["text"] += delta["text"]
                elif delta["type"] == "thinking_delta":
                    blocks[-1]["thinking"] += delta["thinking"]
                elif delta["type"] == "signature_delta":
                    blocks[-1]["signature"] += delta["signature"]
                else:
                    partial += delta["partial_json"]
            elif kind == "content_block_stop" and blocks[-1]["type"] == "tool_use":
                blocks[-1]["input"] = json.loads(partial)
            elif kind == "message_delta":
                message.update(ev["delta"])
                message["usage"].update(
                    {k: v for k, v in ev["usage"].items() if k.startswith("output_tokens")}
                )
        message["content"] = blocks
        return JSONResponse(message)

    def _cache_usage(self, body: dict[str, Any]) -> dict[str, int]:
        """The usage's counts for a request's breakpoints (none: {}), its prefixes kept."""
        prefixes = _prefixes(body)
        if not prefixes:
            return {}
        read = max((n for key, n in _looked_up(body) if key in self.cached), default=0)
        last_key, last = prefixes[-1]
        written = 0 if last_key in self.cached else last - read
        self.cached.update(key for key, _ in prefixes)
        whole = _words(json.dumps(_units(body)))
        return {
            "input_tokens": max(whole - read - written, 0),
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
        }

    async def _events(self, model: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        if model in ("claude-error-first", "claude-api-error-first"):
            # A refusal after the 200: the stream's one event, before any message.
            kind = "overloaded_error" if model == "claude-error-first" else "api_error"
            message = "Overloaded" if model == "claude-error-first" else "Internal server error"
            yield event("error", {"type": "error", "error": {"type": kind, "message": message}})
            return
        if model == "claude-huge-error-first":
            error = {"type": "overloaded_error", "message": HUGE_ERROR}
            yield event("error", {"type": "error", "error": error})
            return

        base = 0  # the index of the first block after the thinking

        def text_delta(text: str) -> bytes:
            delta = {"type": "text_delta", "text": text}
            return event(
                "content_block_delta",
                {"type": "content_block_delta", "index": base, "delta": delta},
            )

        yield event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": model,
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 25,
                        "output_tokens": 1,
                        **(CACHE.get(model) or self._cache_usage(body)),
                        **(BOGUS_COUNTS if model == "claude-bogus-usage" else {}),
                    },
                },
            },
        )
        yield event("ping", {"type": "ping"})
        thought = 0  # the thinking's tokens
        if _thinks(body) and not _after_tool_results(body):
            # The model thinks first (not again after tool results: only after the next
            # user turn, as the API's models do without interleaved thinking).
            shown = (body.get("thinking") or {}).get("display") != "omitted"
            block = {"type": "thinking", "thinking": "", "signature": ""}
            yield event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            )
            for piece in THOUGHT if shown else ():
                delta = {"type": "thinking_delta", "thinking": piece}
                yield event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            delta = {"type": "signature_delta", "signature": self.sign("".join(THOUGHT))}
            yield event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
            yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
            base, thought = 1, len(THOUGHT)
            if model == "claude-redacts":
                # Thinking the API's safety systems flagged: encrypted, opaque.
                data = self.sign("redacted")
                self.redacted.add(data)
                block = {"type": "redacted_thinking", "data": data}
                yield event(
                    "content_block_start",
                    {"type": "content_block_start", "index": 1, "content_block": block},
                )
                yield event("content_block_stop", {"type": "content_block_stop", "index": 1})
                base = 2
        if model == "claude-thinks-fails":
            error = {"type": "api_error", "message": "Internal server error"}
            yield event("error", {"type": "error", "error": error})
            return
        sequence: str | None = None
        if model in (
            "claude-tools",
            "claude-tools-whole",
            "claude-two-tools",
            "claude-tools-end-turn",
            "claude-text-then-tool",
        ):
            # claude-tools-whole: a compatible server giving the input whole at the start.
            whole = model == "claude-tools-whole"
            cities = ["Paris"]
            single = (body.get("tool_choice") or {}).get("disable_parallel_tool_use")
            if model == "claude-two-tools" and not single:
                cities.append("Oslo")
            first = base
            if model == "claude-text-then-tool":
                # A sentence before the call, as Claude often writes, its last word's
                # space included.
                block = {"type": "text", "text": ""}
                yield event(
                    "content_block_start",
                    {"type": "content_block_start", "index": base, "content_block": block},
                )
                for word in ("Let me check. ", "One moment. "):
                    yield text_delta(word)
                yield event("content_block_stop", {"type": "content_block_stop", "index": base})
                first = base + 1
            for index, city in enumerate(cities, first):
                yield event(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {
                            "type": "tool_use",
                            "id": f"toolu_{index + 1}",
                            "name": "get_weather",
                            "input": {"location": city} if whole else {},
                        },
                    },
                )
                for part in () if whole else ('{"loc', 'ation": "', city, '"}'):
                    yield event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": part},
                        },
                    )
                yield event("content_block_stop", {"type": "content_block_stop", "index": index})
            stop, out = "end_turn" if model == "claude-tools-end-turn" else "tool_use", 12
        else:
            start = TEXT_START if model == "claude-text-start" else ""
            yield event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": base,
                    "content_block": {"type": "text", "text": start},
                },
            )
            words = ["Hello", "!", " How", " can", " I", " help?"]
            if model == "claude-trailing-space":
                words = ["Hello", "! ", "Bye. "]  # the last piece ends in white space
            fmt = (body.get("output_config") or {}).get("format")
            if fmt is not None:
                # Constrained decoding: the text is the schema's JSON, in a few pieces.
                answer = json.dumps(instance(fmt["schema"]))
                words = [answer[i : i + 8] for i in range(0, len(answer), 8)]
            limit = body.get("max_tokens", 1024)
            stop = "model_context_window_exceeded" if model == "claude-context-full" else "end_turn"
            out = 0
            text = ""
            for word in words:
                if out >= limit:
                    stop = "max_tokens"
                    break
                if model == "claude-refusal" and text == REFUSED_AT:
                    stop = "refusal"
                    break
                # A stop sequence ends the text where it begins, and is named in the end.
                hits = [
                    (i, s)
                    for s in body.get("stop_sequences") or ()
                    if (i := (text + word).find(s)) >= 0
                ]
                if hits:
                    at, sequence = min(hits)
                    word = (text + word)[len(text) : at]
                    stop = "stop_sequence"
                    if word:
                        yield text_delta(word)
                        out += 1
                    break
                text += word
                if model == "claude-error-mid" and out == 1:
                    yield event(
                        "error",
                        {
                            "type": "error",
                            "error": {"type": "overloaded_error", "message": "Overloaded"},
                        },
                    )
                    return
                if model == "claude-huge-error-mid" and out == 1:
                    error = {"type": "api_error", "message": HUGE_ERROR}
                    yield event("error", {"type": "error", "error": error})
                    return
                if model == "claude-malformed" and out == 1:
                    yield b"event: content_block_delta\ndata: {broken\n\n"
                    return
                yield text_delta(word)
                out += 1
                if model == "claude-cut":
                    return
                if model in ("claude-pings", "claude-comments") and out == 1:
                    for _ in range(round(PINGS_S / PING_EVERY_S)):
                        await asyncio.sleep(PING_EVERY_S)
                        if model == "claude-pings":
                            yield event("ping", {"type": "ping"})
                        else:
                            yield b": keepalive\n\n"
            yield event("content_block_stop", {"type": "content_block_stop", "index": base})
        usage: dict[str, Any] = {"output_tokens": out + thought, **_delta_counts(model)}
        if thought:
            usage["output_tokens_details"] = {"thinking_tokens": thought}
        yield event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": stop,
                    "stop_sequence": sequence,
                },
                "usage": usage,
            },
        )
        if model != "claude-no-message-stop":
            yield event("message_stop", {"type": "message_stop"})


def _thinks(body: dict[str, Any]) -> bool:
    """Whether the request turns thinking on."""
    return (body.get("thinking") or {}).get("type") in ("enabled", "adaptive")


def _after_tool_results(body: dict[str, Any]) -> bool:
    """Whether the conversation ends with tool results (the model goes on from its last
    turn, whose thinking it was)."""
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content")
    return isinstance(content, list) and any(b.get("type") == "tool_result" for b in content)


def _thinking(body: dict[str, Any]) -> str | None:
    """The API's 400 for a `thinking` it refuses, or what it refuses with thinking on (a
    temperature but 1, a top_k, a top_p below 0.95, a forced tool call, a last assistant
    turn with tool_use that does not start with its thinking), or a thinking block in a
    last turn with thinking off (None: it takes it)."""
    thinking = body.get("thinking")
    messages = body.get("messages") or []
    if thinking is not None:
        kind = thinking.get("type")
        if kind not in ("enabled", "adaptive", "disabled"):
            return "thinking.type: Input tag does not match 'enabled', 'adaptive' or 'disabled'"
        if thinking.get("display") not in (None, "summarized", "omitted"):
            return f"thinking.{kind}.display: Input should be 'summarized' or 'omitted'"
        budget = thinking.get("budget_tokens")
        if kind != "enabled" and budget is not None:
            return f"thinking.{kind}.budget_tokens: Extra inputs are not permitted"
        if kind == "enabled":
            if not isinstance(budget, int) or isinstance(budget, bool):
                return "thinking.enabled.budget_tokens: Field required"
            if budget < 1024:
                return (
                    "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
                )
            if budget >= body["max_tokens"]:
                return (
                    "`max_tokens` must be greater than `thinking.budget_tokens`. " + _THINKING_DOCS
                )
    last = next(
        (i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "assistant"),
        None,
    )
    content = messages[last].get("content") if last is not None else None
    blocks = content if isinstance(content, list) else []
    if not _thinks(body):
        if last == len(messages) - 1 and any(b.get("type") == "thinking" for b in blocks):
            return (
                f"messages.{last}.content.0: When thinking is disabled, an `assistant` "
                "message in the final position cannot contain `thinking`. To use thinking "
                "blocks, enable `thinking` in your request."
            )
        return None
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        return (
            "`temperature` may only be set to 1 when thinking is enabled or in adaptive "
            "mode. " + _THINKING_DOCS
        )
    if body.get("top_k") is not None:
        return "`top_k` must be unset when thinking is enabled. " + _THINKING_DOCS
    top_p = body.get("top_p")
    if top_p is not None and top_p < 0.95:
        return (
            "`top_p` must be greater than or equal to 0.95 or unset when thinking is "
            "enabled. " + _THINKING_DOCS
        )
    if (body.get("tool_choice") or {}).get("type") in ("any", "tool"):
        return "Thinking may not be enabled when tool_choice forces tool use."
    turn = _assistant_turn(messages)
    first = messages[turn[0]].get("content") if turn else None
    called = any(
        b.get("type") == "tool_use"
        for i in turn
        for b in (
            messages[i].get("content") if isinstance(messages[i].get("content"), list) else ()
        )
    )
    kind = first[0].get("type") if isinstance(first, list) and first else "text"
    if called and kind not in ("thinking", "redacted_thinking"):
        return (
            f"messages.{turn[0]}.content.0.type: Expected `thinking` or `redacted_thinking`, "
            f"but found `{kind}`. When `thinking` is enabled, a final "
            "`assistant` message must start with a thinking block (preceeding the "
            "lastmost set of `tool_use` and `tool_result` blocks). We recommend you "
            "include thinking blocks from previous turns. To avoid this requirement, "
            "disable `thinking`. " + _THINKING_DOCS
        )
    return None


def _assistant_turn(messages: list[dict[str, Any]]) -> list[int]:
    """Where the last assistant turn's messages are: those after the last user message
    that holds no tool_result (a turn goes on through its tool results)."""
    start = 0
    for i in range(len(messages) - 1, -1, -1):
        content = messages[i].get("content")
        results = isinstance(content, list) and any(b.get("type") == "tool_result" for b in content)
        if messages[i].get("role") == "user" and not results:
            start = i + 1
            break
    return [i for i in range(start, len(messages)) if messages[i].get("role") == "assistant"]


def _output_config(config: Any) -> str | None:
    """What the API answers about an output_config it refuses (None: it takes it)."""
    if config is None:
        return None
    if not isinstance(config, dict):
        return "output_config: Input should be a valid dictionary"
    for key in config:
        if key not in ("format", "effort"):
            return f"output_config.{key}: Extra inputs are not permitted"
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return "output_config.format.type: Input should be 'json_schema'"
    if not isinstance(fmt.get("schema"), dict):
        return "output_config.format.schema: Input should be a valid dictionary"
    return None


def _metadata(metadata: Any) -> str | None:
    """The API's 400 for a `metadata` it refuses (None: it takes it): an object whose one
    key is `user_id`, a string of at most 256 characters, or null."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "metadata: Input should be a valid dictionary"
    for key in metadata:
        if key != "user_id":
            return f"metadata.{key}: Extra inputs are not permitted"
    user_id = metadata.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        return "metadata.user_id: Input should be a valid string"
    if user_id is not None and len(user_id) > 256:
        return "metadata.user_id: String should have at most 256 characters"
    return None


def _sampling(body: dict[str, Any]) -> str | None:
    """What the API answers about a temperature or stop sequence it refuses."""
    temperature = body.get("temperature")
    if temperature is not None and not 0 <= temperature <= 1:
        return "temperature: range: 0..1"
    if temperature is not None and body.get("top_p") is not None:
        # As current models (Sonnet 4.5, Haiku 4.5, Opus 4.1 and later) answer.
        return "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
    if any(not s.strip() for s in body.get("stop_sequences") or ()):
        return "stop_sequences: each stop sequence must contain non-whitespace"
    return None


def instance(schema: dict[str, Any]) -> Any:
    """A value that keeps to a simple JSON schema (every property of an object given)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        return {k: instance(v) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [instance(schema.get("items") or {"type": "string"})]
    return {"string": "Oslo", "integer": 4, "number": 4.5, "boolean": True}.get(kind)


def _delta_counts(model: str) -> dict[str, Any]:
    """message_delta's usage but for output_tokens, by model."""
    if model in ("claude-null-usage", "claude-cached"):
        return NULL_COUNTS
    if model == "claude-zero-usage":
        return {"input_tokens": 0}
    if model == "claude-grown-usage":
        return DELTA_COUNTS
    if model == "claude-bogus-usage":
        return {**BOGUS_COUNTS, "output_tokens": -7}
    return {}


_TOOL_ID = re.compile(r"[a-zA-Z0-9_-]+")


def _unlinked(messages: list[dict[str, Any]]) -> str | None:
    """What the API answers about tool_use and tool_result blocks that are not linked:
    an id off the pattern, an id used before in the conversation, a result answering no
    tool_use of the message before it."""
    ids: set[str] = set()
    used: set[str] = set()
    for i, m in enumerate(messages):
        blocks = m.get("content") if isinstance(m.get("content"), list) else []
        for j, b in enumerate(blocks):
            if b.get("type") == "tool_use" and not _TOOL_ID.fullmatch(b.get("id") or ""):
                return (
                    f"messages.{i}.content.{j}.tool_use.id: String should match pattern "
                    "'^[a-zA-Z0-9_-]+$'"
                )
            if b.get("type") == "tool_use":
                if b["id"] in used:
                    return f"messages.{i}.content.{j}: `tool_use` ids must be unique"
                used.add(b["id"])
            if b.get("type") == "tool_result" and b.get("tool_use_id") not in ids:
                return (
                    f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                    "`tool_result` blocks: "
                    f"{b.get('tool_use_id')}. Each `tool_result` block must have a "
                    "corresponding `tool_use` block in the previous message."
                )
        ids = {b["id"] for b in blocks if b.get("type") == "tool_use"}
    return None


def _blank(messages: list[dict[str, Any]]) -> str | None:
    """What the API answers about no message at all, a text of only whitespace, and a
    final assistant turn (a prefill) ending in whitespace."""
    if not messages:
        return "messages: at least one message is required"
    for m in messages:
        content = m.get("content")
        texts = (
            [content]
            if isinstance(content, str) and content
            else [b.get("text", "") for b in content or () if b.get("type") == "text"]
            if isinstance(content, list)
            else []
        )
        if any(not t.strip() for t in texts):
            return "messages: text content blocks must contain non-whitespace text"
    last = messages[-1]
    content = last.get("content")
    text = content if isinstance(content, str) else ""
    if isinstance(content, list) and content and content[-1].get("type") == "text":
        text = content[-1].get("text", "")
    if last.get("role") == "assistant" and text[-1:].isspace():
        return "messages: final assistant content cannot end with trailing whitespace"
    return None


def _empty(messages: list[dict[str, Any]]) -> str | None:
    """What the API answers about a message without content (only a final assistant
    message, a prefill, may have none)."""
    for i, m in enumerate(messages):
        if not m.get("content") and not (i == len(messages) - 1 and m.get("role") == "assistant"):
            return (
                f"messages.{i}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
    return None


_UNCACHEABLE = frozenset({"thinking", "redacted_thinking"})


def _marked(body: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every cache_control of a request with its path, in the prefix's order (tools,
    system, messages; the top-level one last); a problem's path where one is misplaced."""
    found: list[tuple[str, Any]] = []
    for i, tool in enumerate(body.get("tools") or ()):
        if "cache_control" in tool:
            found.append((f"tools.{i}.cache_control", tool["cache_control"]))
    system = body.get("system")
    for j, block in enumerate(system if isinstance(system, list) else ()):
        if "cache_control" in block:
            found.append((f"system.{j}.cache_control", block["cache_control"]))
    for i, m in enumerate(body.get("messages") or ()):
        if "cache_control" in m:
            found.append((f"messages.{i}.cache_control: Extra inputs are not permitted", None))
        content = m.get("content")
        for j, block in enumerate(content if isinstance(content, list) else ()):
            inner = block.get("content")
            for k, c in enumerate(inner if isinstance(inner, list) else ()):
                if "cache_control" in c:
                    found.append((f"messages.{i}.content.{j}.content.{k}.cache_control", c))
            if "cache_control" not in block:
                continue
            path = f"messages.{i}.content.{j}"
            if block.get("type") in _UNCACHEABLE:
                found.append(
                    (f"{path}.{block['type']}.cache_control: Extra inputs are not permitted", None)
                )
            elif block.get("type") == "text" and not block.get("text"):
                found.append(
                    (f"{path}.text: cache_control cannot be set for empty text blocks", None)
                )
            else:
                found.append((f"{path}.cache_control", block["cache_control"]))
    if "cache_control" in body:
        found.append(("cache_control", body["cache_control"]))
    return found


def _cache_controls(body: dict[str, Any]) -> str | None:
    """What the API answers about cache breakpoints it refuses (None: it takes them)."""
    marked = _marked(body)
    shortest = False  # a 5m breakpoint came before
    for path, control in marked:
        if control is None:
            return path  # misplaced: the path holds the API's words
        if not isinstance(control, dict) or control.get("type") != "ephemeral":
            return f"{path}.type: Input should be 'ephemeral'"
        ttl = control.get("ttl", "5m")
        if ttl not in ("5m", "1h"):
            return f"{path}.ttl: Input should be '5m' or '1h'"
        if ttl == "1h" and shortest:
            return (
                "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control "
                "block. Note that blocks are processed in the following order: `tools`, "
                "`system`, `messages`."
            )
        shortest = shortest or ttl == "5m"
    if len(marked) > 4:
        return f"A maximum of 4 blocks with cache_control may be provided. Found {len(marked)}."
    return None


def _units(body: dict[str, Any]) -> list[Any]:
    """A prompt as the pieces a breakpoint may end it after (cache_control left out): each
    tool, system block and message block, a block with its message's role."""

    def bare(block: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in block.items() if k != "cache_control"}

    units: list[Any] = [bare(t) for t in body.get("tools") or ()]
    system = body.get("system")
    if isinstance(system, list):
        units += [bare(b) for b in system]
    elif system:
        units.append(system)
    for m in body.get("messages") or ():
        content = m["content"]
        for block in content if isinstance(content, list) else [content]:
            if isinstance(block, dict):
                inner = block.get("content")
                block = bare(block)
                if isinstance(inner, list):
                    block["content"] = [bare(c) for c in inner]
            units.append({"role": m["role"], "block": block})
    return units


def _prefixes(body: dict[str, Any], lookback: int = 0) -> list[tuple[str, int]]:
    """Each prefix a breakpoint ends, as its key and its count, in order (with `lookback`,
    those ending up to that many blocks before one too)."""
    units = _units(body)
    ends: list[int] = []
    k = 0
    for tool in body.get("tools") or ():
        if "cache_control" in tool:
            ends.append(k)
        k += 1
    system = body.get("system")
    if isinstance(system, list):
        for block in system:
            if "cache_control" in block:
                ends.append(k)
            k += 1
    elif system:
        k += 1
    for m in body.get("messages") or ():
        content = m["content"]
        for block in content if isinstance(content, list) else [content]:
            inner = block.get("content") if isinstance(block, dict) else None
            if isinstance(block, dict) and (
                "cache_control" in block
                or (isinstance(inner, list) and any("cache_control" in c for c in inner))
            ):
                ends.append(k)
            k += 1
    if "cache_control" in body and units:
        ends.append(len(units) - 1)  # automatic: the last block
    out = []
    for end in sorted({k for e in ends for k in range(max(e - lookback, 0), e + 1)}):
        key = json.dumps(units[: end + 1], sort_keys=True)
        out.append((key, _words(key)))
    return out


def _looked_up(body: dict[str, Any]) -> list[tuple[str, int]]:
    """The prefixes the API looks for in its cache: each breakpoint's, and those ending
    up to 20 blocks before it."""
    return _prefixes(body, lookback=19)
