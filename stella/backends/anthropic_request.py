"""The Messages API request the `anthropic` backend sends for a ChatRequest."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import msgspec

from stella.backends.base import linked_tool_calls
from stella.errors import InvalidRequest
from stella.protocol import (
    MIN_THINKING_BUDGET,
    ChatRequest,
    Image,
    Message,
    ReasoningEffort,
    Tool,
)

# The ids the API takes for a tool_use (and so a tool_result's tool_use_id).
_TOOL_ID = re.compile(r"[a-zA-Z0-9_-]+")
_NOT_IN_ID = re.compile(r"[^a-zA-Z0-9_-]")


def tool_use_id(call_id: str) -> str:
    """`call_id` as an id the Messages API takes, the same for the same id every time."""
    if not call_id or _TOOL_ID.fullmatch(call_id):
        return call_id
    # Other providers' ids (Kimi's `functions.get_weather:0`, a client's `call 1`) would
    # make the API refuse the history. The digest keeps apart ids that differ only in
    # what is replaced; the client's own ids are never touched, only what is sent here.
    digest = hashlib.sha256(call_id.encode()).hexdigest()[:8]
    return f"{_NOT_IN_ID.sub('_', call_id)}_{digest}"


class _ToolUseIds:
    """A history's tool_use ids as sent: each unique, each result naming its own call.

    Clients keep the ids their backends gave, and some backends numbered every answer's
    calls from call_0: the API refuses a history whose tool_use ids repeat. A repeated id
    is renamed in the later tool_use and in the results that answer it (those after it,
    before the id's next use), the same way each time the history is sent.
    """

    def __init__(self, history: list[Message]) -> None:
        # Every id the history sends (a renamed one must not become another call's).
        self.taken = {tool_use_id(c.id) for m in history for c in m.tool_calls or ()}
        self.sent: set[str] = set()
        # Per id as the client wrote it (mapped), the ids sent for it in the last turn
        # that used it: its results answer those, in order.
        self.latest: dict[str, list[str]] = {}

    def turn(self, call_ids: list[str]) -> list[str]:
        """The ids to send for one assistant turn's calls."""
        out = []
        fresh: dict[str, list[str]] = {}
        for call_id in call_ids:
            given = tool_use_id(call_id)
            sent = given
            n = 1
            while sent in self.sent or (sent != given and sent in self.taken):
                n += 1
                sent = f"{given}_{n}"
            self.sent.add(sent)
            fresh.setdefault(given, []).append(sent)
            out.append(sent)
        self.latest.update(fresh)
        return out

    def result(self, call_id: str) -> str:
        """The id a tool_result sends, for the id its client wrote."""
        given = tool_use_id(call_id)
        sent = self.latest.get(given)
        if not sent:
            return given
        # A turn with the id twice: its results answer those calls one after another.
        return sent.pop(0) if len(sent) > 1 else sent[0]


def schema_of(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema of a `json_schema` response_format (None for any other)."""
    if fmt is None or fmt.get("type") != "json_schema":
        return None
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else None


def local_stops(stop: list[str] | None) -> list[str]:
    """The stop strings of only whitespace ("\\n"), which the API refuses: stella applies them."""
    return [s for s in stop or () if s and not s.strip()]


def unsendable(messages: list[Message]) -> InvalidRequest | None:
    """The 400 for a conversation the API would refuse in a way stella cannot mend by
    leaving out what says nothing (None: it can be sent)."""
    kept = False
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m.role == "system":
            continue
        if m.role == "user" and not m.content.strip() and not m.images:
            # The API refuses a text of only whitespace (and an empty message): a 400
            # naming the message, not a 502 with the upstream's words for it.
            return InvalidRequest(
                f"$.messages[{i}].content: the model's backend (anthropic) takes no user "
                "message without text (empty or only whitespace)",
                param=f"messages[{i}].content",
            )
        if m.role == "assistant" and not m.tool_calls:
            if i == last and m.content[-1:].isspace():
                # A prefill the API refuses (the Anthropic dialect's own words for it).
                return InvalidRequest(
                    f"$.messages[{i}].content: final assistant content cannot end with "
                    "trailing whitespace",
                    param=f"messages[{i}].content",
                )
            if i != last and not m.content.strip():
                continue  # left out (see request_body)
        kept = True
    if not kept:
        # The API wants a turn besides the system prompt ("at least one message").
        return InvalidRequest(
            "$.messages: the model's backend (anthropic) needs a user or assistant "
            "message besides the system prompt",
            param="messages",
        )
    return None


# The API's own limit and words for more cache breakpoints than it takes.
MAX_BREAKPOINTS = 4
_TOO_MANY_BREAKPOINTS = "A maximum of 4 blocks with cache_control may be provided"


def breakpoints(request: ChatRequest) -> int:
    """How many prompt-cache breakpoints `request` marks (tools and messages)."""
    return sum(1 for t in request.tools or () if t.cache) + sum(
        1 for m in request.messages if m.cache
    )


def too_many_breakpoints(request: ChatRequest) -> InvalidRequest | None:
    """The API's 400 for more than MAX_BREAKPOINTS breakpoints, before it costs a round
    trip (None: few enough)."""
    n = breakpoints(request)
    if n <= MAX_BREAKPOINTS:
        return None
    return InvalidRequest(f"{_TOO_MANY_BREAKPOINTS}. Found {n}.", param="messages")


def _cache_control(ttl: str) -> dict[str, Any]:
    """A breakpoint as the API takes it; 5m, its default, as the bare form clients send."""
    return {"type": "ephemeral", "ttl": "1h"} if ttl == "1h" else {"type": "ephemeral"}


def _longer_first(body: dict[str, Any]) -> None:
    """Make every breakpoint before the last 1h one 1h too: the API refuses a 1h breakpoint
    after a 5m one (in its order: tools, system, messages), and a native client's order, or
    a tool result placed before its turn's text, may give one. Longer keeps each prefix at
    least as long as asked."""
    marks = [t["cache_control"] for t in body.get("tools", ()) if "cache_control" in t]
    system = body.get("system")
    if isinstance(system, list):
        marks += [b["cache_control"] for b in system if "cache_control" in b]
    for m in body["messages"]:
        if isinstance(m["content"], list):
            marks += [b["cache_control"] for b in m["content"] if "cache_control" in b]
    last = max((i for i, c in enumerate(marks) if c.get("ttl") == "1h"), default=-1)
    for c in marks[:last]:
        c["ttl"] = "1h"


def _system(messages: list[Message]) -> str | list[dict[str, Any]]:
    """The top-level system: the system messages' text joined, or, when one is a cache
    breakpoint, one text block each (blank ones left out), marked as their messages."""
    systems = [m for m in messages if m.role == "system"]
    if not any(m.cache for m in systems):
        return "\n\n".join(m.content for m in systems)
    blocks = []
    for m in systems:
        if m.content.strip():
            block: dict[str, Any] = {"type": "text", "text": m.content}
            if m.cache:
                block["cache_control"] = _cache_control(m.cache)
            blocks.append(block)
    return blocks


# The thinking budget a reasoning effort asks an Anthropic upstream for (`thinking` of
# type enabled): the API's least for low, as its docs advise starting there; 16k for
# high, where they place complex tasks; 32k at most, past which a model seldom uses it.
BUDGETS: dict[ReasoningEffort, int] = {
    "low": MIN_THINKING_BUDGET,
    "medium": 4096,
    "high": 16384,
    "xhigh": 24576,
    "max": 32000,
}
# Anthropic's effort levels, for a backend that asks for adaptive thinking (see
# AnthropicConfig.reasoning_effort_as); none and minimal ask for no thinking.
ADAPTIVE_EFFORT: dict[ReasoningEffort, str] = {
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "xhigh",
    "max": "max",
}
# The top_p the API takes with thinking on (temperature and top_k it refuses).
THINKING_TOP_P = 0.95


# The most max_tokens a budget stella chose may make a request send, unless the backend's
# own max_tokens is more: the output cap of the models with the least (Claude Opus 4 and
# 4.1 take 32,000), so that a budget never makes a request one its model refuses.
THINKING_MAX_TOKENS = 32000


class ThinkingPlan:
    """What a request asks an Anthropic upstream for: its `thinking` (None: none sent),
    `output_config.effort`, and the max_tokens that leaves room for both."""

    __slots__ = ("effort", "max_tokens", "plain_max", "thinking")

    def __init__(
        self,
        thinking: dict[str, Any] | None,
        effort: str | None,
        max_tokens: int,
        plain_max: int | None = None,
    ):
        self.thinking = thinking
        self.effort = effort
        self.max_tokens = max_tokens
        # The max_tokens without the thinking's budget (what is sent when it is dropped).
        self.plain_max = max_tokens if plain_max is None else plain_max

    @property
    def on(self) -> bool:
        """Whether the model is asked to think (the API's rules for thinking then hold)."""
        return self.thinking is not None and self.thinking["type"] != "disabled"

    def drop(self) -> None:
        """Ask for no thinking after all: its budget no longer grows max_tokens."""
        self.thinking = None
        self.max_tokens = self.plain_max


def derived_effort(request: ChatRequest) -> ReasoningEffort | None:
    """The reasoning effort of another dialect's words a request asks an Anthropic upstream
    to think by (`reasoning_effort`, Ollama's `think`; true as medium), when it gives no
    `thinking` or `effort` of Anthropic's own (None: none)."""
    if request.thinking is not None or request.effort is not None:
        return None
    effort = request.reasoning_effort
    if effort is None and request.think is not None:
        # Ollama's words: true is its default effort, false none.
        think = request.think
        effort = "medium" if think is True else "none" if think is False else think
    return None if effort in ("none", "minimal") else effort


def thinking_plan(
    request: ChatRequest, default_max: int, effort_as: str = "budget"
) -> ThinkingPlan:
    """The thinking `request` asks for, in the API's terms; raises InvalidRequest for one
    the API would refuse (an enabled thinking without a budget under max_tokens).

    A client's own `thinking` (the Messages API's words) goes as it came, its `effort`
    too. Otherwise a reasoning effort (see derived_effort) is a budget (BUDGETS: max_tokens,
    when the request sets none, grows by it up to THINKING_MAX_TOKENS or the backend's own
    max_tokens, the budget shrunk to fit, or within the backend's own where that leaves too
    little; one the request sets, or the backend's then, keeps at least half for the
    answer; under 1024 the model does not think), or with `effort_as` "adaptive" adaptive thinking
    at that effort, or with "off" nothing.
    """
    asked = request.options.max_tokens
    plain = asked or default_max
    given = request.thinking
    if given is not None:
        thinking: dict[str, Any] = {"type": given.type}
        budget = given.budget_tokens
        if given.type == "enabled" and budget is None:
            raise InvalidRequest(
                "$.thinking.budget_tokens: required when thinking.type is enabled",
                param="thinking.budget_tokens",
            )
        if budget is not None:
            thinking["budget_tokens"] = budget
        if given.display is not None:
            thinking["display"] = given.display
        limit = asked or default_max + (budget or 0)
        if budget is not None and budget >= limit:
            raise InvalidRequest(
                f"$.thinking.budget_tokens: {budget} must be less than max_tokens ({limit})",
                param="thinking.budget_tokens",
            )
        return ThinkingPlan(thinking, request.effort, limit, plain)
    effort = derived_effort(request)
    if effort is None or effort_as == "off":
        return ThinkingPlan(None, request.effort, plain)
    if effort_as == "adaptive":
        return ThinkingPlan({"type": "adaptive"}, ADAPTIVE_EFFORT[effort], plain)
    budget = BUDGETS[effort]
    if asked is None:
        # Within the cap: a budget that would push max_tokens past it shrinks.
        above = min(budget, max(default_max, THINKING_MAX_TOKENS) - default_max)
        if above >= MIN_THINKING_BUDGET:
            thinking = {"type": "enabled", "budget_tokens": above}
            return ThinkingPlan(thinking, None, default_max + above, plain)
        # No room above the backend's own max_tokens (one set near the cap, as for
        # agents): the budget fits within it, as within a request's own.
        asked = default_max
    budget = min(budget, asked // 2)
    if budget < MIN_THINKING_BUDGET:
        return ThinkingPlan(None, None, asked)  # too few tokens to think and answer
    return ThinkingPlan({"type": "enabled", "budget_tokens": budget}, None, asked)


def _forced(request: ChatRequest) -> bool:
    """Whether the request forces a tool call (tool_choice required or one named)."""
    return bool(request.tools) and request.tool_choice not in (None, "auto", "none")


def _results(m: dict[str, Any]) -> bool:
    """Whether a message of the body holds tool results."""
    content = m["content"]
    return isinstance(content, list) and any(b["type"] == "tool_result" for b in content)


def _unsigned_tool_turn(messages: list[dict[str, Any]]) -> bool:
    """Whether the body's last assistant turn (its messages since the last user message
    that is not tool results: the API joins a text after results to them) called tools
    without starting with signed thinking: the API refuses that with thinking on (its tool
    loop goes on from that thinking), so the request asks for none."""
    start = 0
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m["role"] == "user" and not _results(m):
            if i and messages[i - 1]["role"] == "user" and _results(messages[i - 1]):
                continue  # the text after the turn's results: one message with them
            start = i + 1
            break
    turn = [m["content"] for m in messages[start:] if m["role"] == "assistant"]
    called = any(isinstance(c, list) and any(b["type"] == "tool_use" for b in c) for c in turn)
    if not called:
        return False
    first = turn[0]
    return not isinstance(first, list) or first[0]["type"] not in _THINKING_BLOCKS


# The blocks of an answer's thinking, as the API gives them back.
_THINKING_BLOCKS = frozenset({"thinking", "redacted_thinking"})


def request_body(
    request: ChatRequest, default_max: int, effort_as: str = "budget"
) -> dict[str, Any]:
    """The Messages API body: system pulled out, tool calls and results as blocks; a
    message's cache breakpoint on the last block it becomes; the thinking asked for (see
    thinking_plan), an assistant turn's signed thinking first in it while it is on."""
    system = _system(request.messages)
    messages: list[dict[str, Any]] = []
    history = linked_tool_calls(request.messages)
    ids = _ToolUseIds(history)
    if (refused := unsendable(history) or too_many_breakpoints(request)) is not None:
        raise refused
    plan = thinking_plan(request, default_max, effort_as)
    thinks = plan.on
    if thinks and (_forced(request) or history[-1].role == "assistant"):
        # What the API refuses with thinking on, a forced tool call and a prefill: asked
        # without it, the request is one the API answers.
        plan.drop()
        thinks = False
    # With breakpoints every text goes as a text block, the one form that takes one: a
    # message then reads the same whether or not it holds this turn's breakpoint, and the
    # next turn's prefix is the same bytes (a string would become a block once marked).
    as_blocks = breakpoints(request) > 0
    for m in history:
        if m.role == "system":
            continue
        if m.role == "tool":
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": ids.result(m.tool_call_id or ""),
                "content": _result_content(m),
            }
            if m.is_error:
                block["is_error"] = True
            if m.cache:
                block["cache_control"] = _cache_control(m.cache)
            if (
                messages
                and messages[-1]["role"] == "user"
                and isinstance(messages[-1]["content"], list)
                # A marked user text is a list too: results join only results.
                and messages[-1]["content"][0]["type"] == "tool_result"
            ):
                messages[-1]["content"].append(block)
            else:
                messages.append({"role": "user", "content": [block]})
            continue
        if m.images:
            # A breakpoint on the last block, as any message's.
            blocks = _with_images(m)
            if m.cache:
                blocks[-1]["cache_control"] = _cache_control(m.cache)
            messages.append({"role": m.role, "content": blocks})
            continue
        # The turn's signed thinking, before its text and calls as the API gave it (sent
        # only while thinking is on: the API refuses it in a last turn otherwise).
        # (The native blocks are the API's shape: {"type": "thinking", ...}.)
        thoughts = msgspec.to_builtins(m.thinking_blocks) if thinks and m.thinking_blocks else []
        if m.tool_calls:
            # The text before the calls, unless only whitespace (Qwen-style models write
            # "\n\n" there): the API refuses a text block of only whitespace.
            blocks = [{"type": "text", "text": m.content}] if m.content.strip() else []
            blocks = thoughts + blocks
            blocks += [
                {
                    "type": "tool_use",
                    "id": sent,
                    "name": c.function.name,
                    "input": c.function.arguments,
                }
                for c, sent in zip(
                    m.tool_calls, ids.turn([c.id for c in m.tool_calls]), strict=True
                )
            ]
            if m.cache:
                blocks[-1]["cache_control"] = _cache_control(m.cache)
            messages.append({"role": "assistant", "content": blocks})
        elif m.role == "assistant" and not m.content.strip():
            # A turn that answered nothing (stopped before its first token), or only
            # whitespace: the API refuses it but an empty final prefill, and it says nothing.
            if m is history[-1]:
                messages.append({"role": "assistant", "content": m.content})
        elif as_blocks or thoughts:
            block = {"type": "text", "text": m.content}
            if m.cache:
                block["cache_control"] = _cache_control(m.cache)
            messages.append({"role": m.role, "content": [*thoughts, block]})
        else:
            messages.append({"role": m.role, "content": m.content})
    if thinks and _unsigned_tool_turn(messages):
        # A tool loop whose client dropped the last turn's thinking (a client of another
        # dialect, which has no place for it): asked without thinking, which the API
        # answers, and with none of the history's (it refuses it in a last turn then).
        plan.drop()
        thinks = False
        for sent in messages:
            if sent["role"] == "assistant" and isinstance(sent["content"], list):
                sent["content"] = [b for b in sent["content"] if b["type"] not in _THINKING_BLOCKS]
    o = request.options
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "stream": True,
        "max_tokens": plan.max_tokens,
    }
    if system if isinstance(system, list) else system.strip():
        # One of only whitespace says nothing (and the API refuses it).
        body["system"] = system
    temperature, top_p, top_k = o.temperature, o.top_p, o.top_k
    if thinks:
        # The API refuses a temperature or top_k with thinking on, and a top_p below 0.95:
        # left out, the model samples as thinking needs.
        temperature = top_k = None
        if top_p is not None and top_p < THINKING_TOP_P:
            top_p = None
    for key, value in (
        # The API's range is 0 to 1 (OpenAI's 0 to 2): above it, the most random it takes.
        ("temperature", None if temperature is None else min(temperature, 1.0)),
        # Current models (Sonnet 4.5, Haiku 4.5, Opus 4.1 and later) refuse both at once:
        # given both, only the temperature is sent (the one sampling knob all backends take).
        ("top_p", top_p if temperature is None else None),
        ("top_k", top_k),
        ("stop_sequences", [s for s in o.stop or () if s.strip()] or None),
    ):
        if value is not None:
            body[key] = value
    if plan.thinking is not None:
        body["thinking"] = plan.thinking
    if request.user_id is not None:
        # The end user's id, for Anthropic's abuse detection; nothing else of the metadata,
        # which is the log's.
        body["metadata"] = {"user_id": request.user_id}
    if (schema := schema_of(request.response_format)) is not None:
        body["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    if plan.effort is not None:
        body.setdefault("output_config", {})["effort"] = plan.effort
    if request.tools:
        body["tools"] = [_tool(t) for t in request.tools]
        choice = request.tool_choice
        if choice == "none":
            body["tool_choice"] = {"type": "none"}
        elif choice == "required":
            body["tool_choice"] = {"type": "any"}
        elif choice is not None and not isinstance(choice, str):
            body["tool_choice"] = {"type": "tool", "name": choice.function.name}
        if request.parallel_tool_calls is False and choice != "none":
            # The API's switch lives in tool_choice (auto, any or tool; none calls none).
            body.setdefault("tool_choice", {"type": "auto"})["disable_parallel_tool_use"] = True
    if breakpoints(request):
        _longer_first(body)
    return body


def _result_content(m: Message) -> str | list[dict[str, Any]]:
    """A tool message as a tool_result's content: its text, or with images, its blocks."""
    return _with_images(m) if m.images else m.content


def _with_images(m: Message) -> list[dict[str, Any]]:
    """A message with images as blocks: the images first, then the text (none when only
    whitespace, as the API refuses such a block)."""
    blocks = [*map(_image_block, m.images or ())]
    if m.content.strip():
        blocks.append({"type": "text", "text": m.content})
    return blocks


def _image_block(image: Image) -> dict[str, Any]:
    """An image as the Messages API takes it: a base64 or a url source."""
    if image.url is not None:
        return {"type": "image", "source": {"type": "url", "url": image.url}}
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": image.media_type, "data": image.data},
    }


def _tool(tool: Tool) -> dict[str, Any]:
    """A tool in the API's shape; `strict` only when set, so the upstream's default holds."""
    fn = tool.function
    spec: dict[str, Any] = {
        "name": fn.name,
        "description": fn.description,
        "input_schema": fn.parameters or {"type": "object"},
    }
    if fn.strict is not None:
        spec["strict"] = fn.strict
    if tool.cache:
        spec["cache_control"] = _cache_control(tool.cache)
    return spec
