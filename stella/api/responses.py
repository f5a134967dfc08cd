"""The OpenAI Responses dialect: POST /v1/responses (a Response object, or its SSE events).

Clients written for the Responses API (the `openai` SDK's `client.responses`, the
OpenAI Agents SDK, Codex CLI) use any backend through the one pipeline: `input` items
and `instructions` become the conversation, the tools (a namespace's and custom tools
too: responses_tools.py) and their calls map onto stella's, and the answer comes back
as a Response with `reasoning` (a reasoning model's thinking), `message`,
`function_call` and `custom_tool_call` output items, or as the API's typed event
stream. stella keeps no state: nothing is stored, and what would need it is refused
(responses_request.py). Errors take OpenAI's shape, as on /v1/chat/completions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.routing import Route

from stella.api import shapes
from stella.api.http import (
    JSONResponse,
    Reply,
    decode,
    endpoint,
    read_body,
    run_to_end,
    services,
    stream_response,
)
from stella.api.openai import OpenAIDialect, refused, resolve_provider
from stella.api.openapi import Operation, document
from stella.api.responses_request import ResponsesRequest, echoed, to_chat
from stella.api.responses_tools import Declared, ToolSet, custom_input
from stella.core import Call
from stella.errors import StellaError
from stella.protocol import Delta, Done, Error, Start, ToolCall, Usage, arguments_text
from stella.streaming import Codec, json_text, one_line

_enc = msgspec.json.Encoder()
_req = msgspec.json.Decoder(ResponsesRequest)

# The pipeline's names for the request's parts, as this API names them.
_PARAMS = {
    "messages": "input",
    "tool_choice.function.name": "tool_choice.name",
    "response_format": "text.format",
}


class ResponsesDialect(OpenAIDialect):
    """OpenAI's error object, naming the Responses API's own parameters."""

    name = "responses"

    def error_body(self, exc: StellaError, request_id: str) -> Any:
        """OpenAI's error object; the pipeline's `messages` is this API's `input`."""
        body = super().error_body(exc, request_id)
        param = body["error"]["param"]
        if param is not None:
            head = param.split("[", 1)[0]
            if head in _PARAMS:
                # An index into the pipeline's messages is none into `input` (instructions
                # and calls merged into one turn shift them): the field alone is named.
                body["error"]["param"] = _PARAMS[head]
                path, colon, rest = exc.message.partition(":")
                if path.startswith("$." + head) and colon:
                    body["error"]["message"] = f"$.{_PARAMS[head]}:{rest}"
        return body


RESPONSES = ResponsesDialect()
# Paths whose errors (404, 405, draining) take this shape; the longest prefix wins.
ERROR_PREFIXES = {"/v1/responses": RESPONSES}
# A failed Response's error.code is one of the API's closed list (the SDK's
# ResponseError rejects any other): stella's codes onto it, the rest server_error.
# A request no backend will take as sent (too long, invalid, refused by the upstream)
# is invalid_prompt; stella's own code still leads the message.
_FAILED_CODES = {
    "rate_limited": "rate_limit_exceeded",
    "quota_exceeded": "rate_limit_exceeded",
    "upstream_rate_limited": "rate_limit_exceeded",
    "context_length_exceeded": "invalid_prompt",
    "invalid_request": "invalid_prompt",
    "upstream_rejected": "invalid_prompt",
}


def failed_error(code: str, message: str) -> dict[str, str]:
    """A failed Response's error: the API's code for stella's, which leads the message."""
    return {"code": _FAILED_CODES.get(code, "server_error"), "message": f"{code}: {message}"}


def usage_of(usage: Usage) -> dict[str, Any]:
    """The API's usage for stella's counts (cached_tokens and reasoning_tokens 0 when the
    backend said none: the SDK's type requires both)."""
    details = usage.prompt_tokens_details
    cached = 0 if details is msgspec.UNSET else details.cached_tokens
    thought = usage.completion_tokens_details
    reasoning = 0 if thought is msgspec.UNSET else thought.reasoning_tokens
    return {
        "input_tokens": usage.prompt_tokens,
        # cache_write_tokens is required by the SDK's type; the native usage this is read
        # from has no count of cache writes (only an Anthropic upstream gives one, which
        # /v1/messages reports), so 0.
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": usage.total_tokens,
    }


def status_of(finish_reason: str) -> tuple[str, dict[str, str] | None]:
    """A Response's status and incomplete_details for a finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    # An answer an upstream's content filter cut short (a refusal is completed: the
    # codec and the route decide that before asking).
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def message_item(item_id: str, text: str, status: str, refusal: bool = False) -> dict[str, Any]:
    """An assistant `message` output item holding `text` (as a `refusal` part when the
    model declined)."""
    part = (
        {"type": "refusal", "refusal": text}
        if refusal
        else {"type": "output_text", "text": text, "annotations": []}
    )
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [part],
    }


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A `reasoning` output item holding the model's thinking as one `reasoning_text`
    part (no summary: the upstream gave the reasoning itself, never one)."""
    return {
        "id": item_id,
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def call_item(
    item_id: str, call_id: str, tool: Declared, payload: str, status: str
) -> dict[str, Any]:
    """A tool call output item: `function_call` (`namespace` set for a namespace's tool)
    with its arguments, or `custom_tool_call` with its input."""
    kind, field = ("custom_tool_call", "input") if tool.custom else ("function_call", "arguments")
    item = {"type": kind, "id": item_id, "call_id": call_id, "name": tool.name, field: payload}
    if tool.namespace is not None:
        item["namespace"] = tool.namespace
    item["status"] = status
    return item


def called(
    tools: ToolSet, name: str, arguments: dict[str, Any], raw: str | None
) -> tuple[Declared, str]:
    """The tool a call is to, as the request declared it, and its arguments (JSON text)
    or a custom tool's input."""
    tool = tools.declared.get(name) or Declared(name)  # one never offered: a function
    if tool.custom:
        return tool, custom_input(arguments, raw)
    return tool, arguments_text(arguments, raw)


class Answer:
    """The Response object of one call, as its parts become known."""

    def __init__(self, rid: str, model: str, created: float, echo: dict[str, Any]) -> None:
        self.rid = rid
        self.model = model
        self.created = int(created)
        self.echo = echo
        self.output: list[dict[str, Any]] = []

    def item_id(self, prefix: str) -> str:
        """The ID of the next output item."""
        return f"{prefix}_{self.rid}_{len(self.output)}"

    def body(
        self,
        status: str,
        usage: Usage | None = None,
        incomplete: dict[str, str] | None = None,
        error: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The Response object as it stands."""
        return {
            "id": "resp_" + self.rid,
            "object": "response",
            "created_at": self.created,
            "completed_at": int(time.time()) if status == "completed" else None,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": self.output,
            "usage": usage_of(usage) if usage is not None else None,
            **self.echo,
        }


def _event(name: str, seq: int, data: dict[str, Any]) -> bytes:
    data = {"type": name, "sequence_number": seq, **data}
    return b"event: " + name.encode() + b"\ndata: " + _enc.encode(data) + b"\n\n"


class ResponsesCodec(Codec):
    """Events as the Responses API's SSE sequence: response.created, in_progress, each
    output item added, its reasoning, text (or refusal), arguments or custom tool input,
    done; then response.completed (or .incomplete), or response.failed after a failure."""

    media_type = "text/event-stream"
    # Each run of reasoning is a `reasoning` item of its own, before the text it precedes:
    # shown, it starts the answer, and a failure after it ends the stream (as after text).
    shows_reasoning = True
    shows_signatures = False  # no field for an upstream's signature

    def __init__(
        self,
        echo: dict[str, Any],
        refusal: Callable[[], bool] | None = None,
        tools: ToolSet | None = None,
    ) -> None:
        super().__init__()
        self.echo = echo
        self.tools = tools if tools is not None else ToolSet.read(None)
        self.answer: Answer | None = None
        self.seq = 0
        self.texts: list[str] | None = None  # the open content part's text, while one is open
        # The open reasoning item's text, while one is open (never with a message open).
        self.thoughts: list[str] | None = None
        self.thought_head = b""
        # Asked at each piece of output_text: the backend marks a refusal before it yields
        # its text. None once refusing, so a refusal's pieces ask nothing.
        self.refusal = refusal
        self.refusing = False  # the upstream refused: the open part is a `refusal` part
        self.delta_head = b""

    def _next(self, name: str, data: dict[str, Any]) -> bytes:
        seq = self.seq
        self.seq += 1
        return _event(name, seq, data)

    def start(self, event: Start) -> bytes:
        """response.created and response.in_progress, with no output yet."""
        answer = self.answer = Answer(event.id, event.model, event.created, self.echo)
        body = answer.body("in_progress")
        return one_line(
            self._next("response.created", {"response": body})
            + self._next("response.in_progress", {"response": body})
        )

    def _open_message(self) -> bytes:
        answer = self.answer
        assert answer is not None
        index = len(answer.output)
        item = message_item(answer.item_id("msg"), "", "in_progress")
        item["content"] = []
        answer.output.append(item)
        if self.refusal is not None and self.refusal():
            self.refusal, self.refusing = None, True
        return (
            self._next("response.output_item.added", {"output_index": index, "item": item})
            + self._open_part()
        )

    def _open_part(self) -> bytes:
        """The open message's next content part: `refusal` once the upstream refused, as
        the API streams one (its pieces `response.refusal.delta`), else `output_text`."""
        answer = self.answer
        assert answer is not None
        index = len(answer.output) - 1
        item = answer.output[index]
        content_index = len(item["content"])
        self.texts = []
        if self.refusing:
            name = b"response.refusal.delta"
            part: dict[str, Any] = {"type": "refusal", "refusal": ""}
            tail = b',"sequence_number":'
        else:
            name = b"response.output_text.delta"
            part = {"type": "output_text", "text": "", "annotations": []}
            tail = b',"logprobs":[],"sequence_number":'
        self.delta_head = (
            b"event: "
            + name
            + b'\ndata: {"type":"'
            + name
            + b'","item_id":'
            + _enc.encode(item["id"])
            + b',"output_index":'
            + str(index).encode()
            + b',"content_index":'
            + str(content_index).encode()
            + tail
        )
        where = {"item_id": item["id"], "output_index": index, "content_index": content_index}
        return self._next("response.content_part.added", {**where, "part": part})

    def _end_part(self) -> tuple[dict[str, Any], str]:
        """The open part as it ends, added to its message's content, and its text."""
        texts, answer = self.texts, self.answer
        assert texts is not None and answer is not None
        self.texts = None
        text = "".join(texts)
        part = (
            {"type": "refusal", "refusal": text}
            if self.refusing
            else {"type": "output_text", "text": text, "annotations": []}
        )
        answer.output[-1]["content"].append(part)
        return part, text

    def _close_part(self) -> bytes:
        """The open part's done events."""
        answer = self.answer
        assert answer is not None
        index = len(answer.output) - 1
        content_index = len(answer.output[index]["content"])
        where = {
            "item_id": answer.output[index]["id"],
            "output_index": index,
            "content_index": content_index,
        }
        part, text = self._end_part()
        if part["type"] == "refusal":
            out = self._next("response.refusal.done", {**where, "refusal": text})
        else:
            out = self._next("response.output_text.done", {**where, "text": text, "logprobs": []})
        return out + self._next("response.content_part.done", {**where, "part": part})

    def _close_message(self, status: str) -> bytes:
        """The open message's done events, its part then itself (b"" when none is open)."""
        answer = self.answer
        if self.texts is None or answer is None:
            return b""
        out = self._close_part()
        index = len(answer.output) - 1
        answer.output[index] = done = {**answer.output[index], "status": status}
        return out + self._next("response.output_item.done", {"output_index": index, "item": done})

    def _open_reasoning(self) -> bytes:
        """A `reasoning` item and its one `reasoning_text` part, added empty."""
        answer = self.answer
        assert answer is not None
        index = len(answer.output)
        item = reasoning_item(answer.item_id("rs"), "", "in_progress")
        item["content"] = []
        answer.output.append(item)
        self.thoughts = []
        self.thought_head = (
            b'event: response.reasoning_text.delta\ndata: {"type":"response.reasoning_text.delta"'
            b',"item_id":'
            + _enc.encode(item["id"])
            + b',"output_index":'
            + str(index).encode()
            + b',"content_index":0,"sequence_number":'
        )
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        part = {"type": "reasoning_text", "text": ""}
        return self._next(
            "response.output_item.added", {"output_index": index, "item": item}
        ) + self._next("response.content_part.added", {**where, "part": part})

    def _end_reasoning(self, status: str) -> dict[str, Any]:
        """The open reasoning item as it ends, in the output with its text."""
        thoughts, answer = self.thoughts, self.answer
        assert thoughts is not None and answer is not None
        self.thoughts = None
        item = answer.output[-1]
        answer.output[-1] = done = reasoning_item(item["id"], "".join(thoughts), status)
        return done

    def _close_reasoning(self) -> bytes:
        """The open reasoning item's done events (b"" when none is open)."""
        answer = self.answer
        if self.thoughts is None or answer is None:
            return b""
        done = self._end_reasoning("completed")
        index = len(answer.output) - 1
        part = done["content"][0]
        where = {"item_id": done["id"], "output_index": index, "content_index": 0}
        return (
            self._next("response.reasoning_text.done", {**where, "text": part["text"]})
            + self._next("response.content_part.done", {**where, "part": part})
            + self._next("response.output_item.done", {"output_index": index, "item": done})
        )

    def _reason(self, text: str) -> bytes:
        """A piece of reasoning: in the open reasoning item, or one opened for it (an
        open message ends first: its text went before this reasoning)."""
        out = b""
        if self.thoughts is None:
            out = one_line(self._close_message("completed") + self._open_reasoning())
        assert self.thoughts is not None
        self.thoughts.append(text)
        seq = self.seq
        self.seq += 1
        return (
            out + self.thought_head + str(seq).encode() + b',"delta":' + json_text(text) + b"}\n\n"
        )

    def encode(self, event: Any) -> bytes:
        """The API's events for one pipeline event (each `data:` JSON on one line)."""
        kind = type(event)
        if kind is Delta:
            if not event.text:
                return self._reason(event.reasoning) if event.reasoning else b""
            if event.reasoning:  # the last of the reasoning and the first of the text
                return self._reason(event.reasoning) + self.encode(Delta(text=event.text))
            if self.thoughts is not None:
                # The text after the reasoning: a message of its own.
                out = one_line(self._close_reasoning() + self._open_message())
            elif self.texts is None:
                out = one_line(self._open_message())
            elif self.refusal is not None and self.refusal():
                # The upstream refused after text went out as output_text: that part
                # ends as it is, the refusal a part of its own after it.
                closed = self._close_part()
                self.refusal, self.refusing = None, True
                out = one_line(closed + self._open_part())
            else:
                out = b""
            assert self.texts is not None
            self.texts.append(event.text)
            seq = self.seq
            self.seq += 1
            # A delta's text is escaped on its own: a stream's many deltas scan only it.
            return (
                out
                + self.delta_head
                + str(seq).encode()
                + b',"delta":'
                + json_text(event.text)
                + b"}\n\n"
            )
        return one_line(self._encode(event, kind))

    def _encode(self, event: Any, kind: type) -> bytes:
        answer = self.answer
        assert answer is not None
        if kind is ToolCall:
            out = self._close_reasoning() + self._close_message("completed")
            index = len(answer.output)
            tool, payload = called(self.tools, event.name, event.arguments, event.raw_arguments)
            item_id = answer.item_id("ctc" if tool.custom else "fc")
            added = call_item(item_id, event.id, tool, "", "in_progress")
            done = call_item(item_id, event.id, tool, payload, "completed")
            answer.output.append(done)
            where = {"item_id": item_id, "output_index": index}
            out += self._next("response.output_item.added", {"output_index": index, "item": added})
            if tool.custom:
                out += self._next(
                    "response.custom_tool_call_input.delta", {**where, "delta": payload}
                ) + self._next("response.custom_tool_call_input.done", {**where, "input": payload})
            else:
                out += self._next(
                    "response.function_call_arguments.delta", {**where, "delta": payload}
                ) + self._next(
                    "response.function_call_arguments.done",
                    {**where, "name": tool.name, "arguments": payload},
                )
            return out + self._next(
                "response.output_item.done", {"output_index": index, "item": done}
            )
        if kind is Done:
            # A refusal is a finished answer, as the API ends one: completed, its refusal
            # part the output (the SDK's stream helper gives a final response only after
            # response.completed).
            status, incomplete = (
                ("completed", None) if self.refusing else status_of(event.finish_reason)
            )
            # An answer of no text and no call (nothing, or reasoning alone) still holds
            # its (empty) message, as a whole answer does: a client reading the output
            # finds the turn ended.
            out = self._close_reasoning()
            if all(item["type"] == "reasoning" for item in answer.output):
                out += self._open_message()
            out += self._close_message("incomplete" if incomplete else "completed")
            name = "response.incomplete" if incomplete else "response.completed"
            body = answer.body(status, event.usage, incomplete)
            return out + self._next(name, {"response": body})
        if kind is Error:
            if self.texts is not None:  # the message cut short, as far as it went
                self._end_part()
                answer.output[-1] = {**answer.output[-1], "status": "incomplete"}
            elif self.thoughts is not None:  # so is the reasoning
                self._end_reasoning("incomplete")
            error = failed_error(event.code, event.message)
            return self._next("response.failed", {"response": answer.body("failed", error=error)})
        return b""

    def ping(self) -> bytes:
        """An SSE comment."""
        return b": ping\n\n"


@endpoint(RESPONSES, inference=True)
async def responses(request: Request, call: Call) -> Reply:
    """POST /v1/responses."""
    svc = services(request)
    body = await read_body(request, svc.settings.server.max_body_bytes)
    req = decode(body, ResponsesRequest, _req)
    tools = ToolSet.read(req.tools)
    chat = resolve_provider(request, call, to_chat(req, tools), req.provider)
    echo = echoed(req)
    inference = await svc.pipeline.prepare(chat, call)
    if chat.stream:
        codec = ResponsesCodec(echo, lambda: refused(inference), tools)
        return stream_response(request, inference, codec, RESPONSES)
    result = await run_to_end(request, inference)
    # A refusal's text is no answer: as a `refusal` part, the SDK's `parse()` leaves
    # `output_parsed` empty instead of failing to read it as the schema asked; the
    # Response is completed, as the API answers one. Text an upstream's content filter
    # cut short is the answer as far as it went, as the API gives one: `output_text`,
    # incomplete with reason content_filter.
    refusal = bool(result.response) and refused(inference)
    status, incomplete = ("completed", None) if refusal else status_of(result.finish_reason)
    answer = Answer(result.id, result.model, inference.created, echo)
    if result.message.reasoning:  # the thinking before the answer, as an item before it
        answer.output.append(
            reasoning_item(answer.item_id("rs"), result.message.reasoning, "completed")
        )
    calls = result.message.tool_calls or ()
    if result.response or not calls:
        item_status = "incomplete" if incomplete else "completed"
        answer.output.append(
            message_item(answer.item_id("msg"), result.response, item_status, refusal)
        )
    for c in calls:
        fn = c.function
        tool, payload = called(tools, fn.name, fn.arguments, fn.raw_arguments)
        item_id = answer.item_id("ctc" if tool.custom else "fc")
        answer.output.append(call_item(item_id, c.id, tool, payload, "completed"))
    return JSONResponse(
        answer.body(status, result.usage, incomplete), headers=inference.permit.headers
    )


document(
    Operation(
        "post",
        "/v1/responses",
        "OpenAI Responses API, stateless (SSE events when stream)",
        tag="openai",
        request=ResponsesRequest,
        response=shapes.RESPONSES_RESPONSE,
        stream="text/event-stream",
        stream_item=shapes.RESPONSES_EVENT,
        error=shapes.OPENAI_ERROR,
    )
)

routes = [Route("/v1/responses", responses, methods=["POST"])]
