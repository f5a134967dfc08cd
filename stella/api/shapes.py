"""The compatible dialects' answers, as /openapi.json declares them.

Their handlers write vendor-shaped dicts (and stream bytes) rather than structs, so
these are hand-written schemas: each names the fields those handlers always send and
leaves room for more (no additionalProperties), so that the document never says
something the route does not do. tests/test_ops.py checks real answers against them.
"""

from __future__ import annotations

from typing import Any

from stella.api.openapi import Schema, ref
from stella.protocol import Usage

STR: dict[str, Any] = {"type": "string"}
INT: dict[str, Any] = {"type": "integer"}
BOOL: dict[str, Any] = {"type": "boolean"}
NULL: dict[str, Any] = {"type": "null"}
OBJECT: dict[str, Any] = {"type": "object"}


def obj(
    required: dict[str, Any], optional: dict[str, Any] | None = None, description: str = ""
) -> dict[str, Any]:
    """An object schema: `required` fields are always sent, `optional` ones sometimes."""
    out: dict[str, Any] = {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
    }
    if description:
        out["description"] = description
    return out


def const(value: Any) -> dict[str, Any]:
    """Exactly this value."""
    return {"const": value}


def array(items: dict[str, Any]) -> dict[str, Any]:
    """A list of `items`."""
    return {"type": "array", "items": items}


def sse_event(
    description: str, data: dict[str, Any], event: dict[str, Any] | None = None, end: str = ""
) -> dict[str, Any]:
    """One event of a text/event-stream body, as OpenAPI 3.1 tools read its schema (3.2
    calls it itemSchema): `data` is JSON text valid against `data` (or the end marker
    `end`), `event` the event's name when it has one. Comments (pings) are not events."""
    json_text = {"contentMediaType": "application/json", "contentSchema": data}
    payload: dict[str, Any] = {"type": "string"}
    payload |= {"if": {"const": end}, "else": json_text} if end else json_text
    props: dict[str, Any] = {"data": payload}
    if event is not None:
        props["event"] = event
    return {
        "type": "object",
        "description": description,
        "properties": props,
        "required": list(props),
    }


# --- OpenAI ------------------------------------------------------------------------------

OPENAI_ERROR = Schema(
    "OpenAIError",
    obj(
        {
            "error": obj(
                {
                    "message": STR,
                    "type": STR,
                    "param": {"type": ["string", "null"]},
                    "code": STR,
                }
            )
        },
        description="OpenAI's error object",
    ),
)
_OPENAI_TOOL_CALL = obj(
    {
        "id": STR,
        "type": const("function"),
        "function": obj(
            {"name": STR, "arguments": {"type": "string", "description": "a JSON object"}}
        ),
    }
)
OPENAI_CHAT = Schema(
    "OpenAIChatCompletion",
    obj(
        {
            "id": STR,
            "object": const("chat.completion"),
            "created": INT,
            "model": STR,
            "system_fingerprint": NULL,
            "usage": ref(Usage),
            "choices": array(
                obj(
                    {
                        "index": INT,
                        "message": obj(
                            {
                                "role": const("assistant"),
                                "content": {"type": ["string", "null"]},
                                # An upstream's refusal: its text here, content null.
                                "refusal": {"type": ["string", "null"]},
                            },
                            {
                                "tool_calls": array(_OPENAI_TOOL_CALL),
                                # A reasoning model's thinking, as vLLM and DeepSeek give it.
                                "reasoning_content": STR,
                            },
                        ),
                        "logprobs": NULL,
                        "finish_reason": STR,
                    }
                )
            ),
        },
        description="A chat completion (stream: false)",
    ),
    uses=(Usage,),
)
OPENAI_COMPLETION = Schema(
    "OpenAITextCompletion",
    obj(
        {
            "id": STR,
            "object": const("text_completion"),
            "created": INT,
            "model": STR,
            "usage": ref(Usage),
            "choices": array(
                obj({"index": INT, "text": STR, "logprobs": NULL, "finish_reason": STR})
            ),
        },
        description="A text completion (stream: false)",
    ),
    uses=(Usage,),
)
OPENAI_STREAM_ERROR = Schema(
    "OpenAIStreamError",
    obj(
        {"error": obj({"message": STR, "type": STR, "code": STR})},
        description="A failure after the stream started: its last event (no [DONE] follows)",
    ),
)


def _chunk(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    """A streamed chunk; with stream_options.include_usage, the one before [DONE] has no
    choices and carries `usage`, and every other has `"usage": null`."""
    return obj(
        {
            "id": STR,
            "object": const(kind),
            "created": INT,
            "model": STR,
            "choices": array(choice),
        },
        {"usage": {"anyOf": [ref(Usage), NULL]}},
    )


OPENAI_CHAT_CHUNK = Schema(
    "OpenAIChatChunk",
    _chunk(
        "chat.completion.chunk",
        obj(
            {
                "index": INT,
                # The first carries the role, the last none of these and the finish_reason.
                "delta": obj(
                    {},
                    {
                        "role": const("assistant"),
                        "content": {"type": ["string", "null"]},
                        # An upstream's refusal, in pieces (the first, with the role, "").
                        "refusal": STR,
                        # A reasoning model's thinking, in pieces before the text's.
                        "reasoning_content": STR,
                        "tool_calls": array(
                            obj(
                                {
                                    "index": INT,
                                    "id": STR,
                                    "type": const("function"),
                                    "function": obj({"name": STR, "arguments": STR}),
                                }
                            )
                        ),
                    },
                ),
                "finish_reason": {"type": ["string", "null"]},
            }
        ),
    ),
    uses=(Usage,),
)
OPENAI_TEXT_CHUNK = Schema(
    "OpenAITextChunk",
    _chunk(
        "text_completion",
        obj(
            {
                "index": INT,
                "text": STR,
                "logprobs": NULL,
                "finish_reason": {"type": ["string", "null"]},
            }
        ),
    ),
    uses=(Usage,),
)
OPENAI_CHAT_EVENT = Schema(
    "OpenAIChatEvent",
    sse_event(
        "One server-sent event: `data: {chat.completion.chunk}`, and `data: [DONE]` at the"
        " end; `: ping` comments keep the connection alive",
        {"anyOf": [ref(OPENAI_CHAT_CHUNK), ref(OPENAI_STREAM_ERROR)]},
        end="[DONE]",
    ),
    uses=(OPENAI_CHAT_CHUNK, OPENAI_STREAM_ERROR),
)
OPENAI_TEXT_EVENT = Schema(
    "OpenAITextEvent",
    sse_event(
        "One server-sent event: `data: {text_completion chunk}`, and `data: [DONE]` at the"
        " end; `: ping` comments keep the connection alive",
        {"anyOf": [ref(OPENAI_TEXT_CHUNK), ref(OPENAI_STREAM_ERROR)]},
        end="[DONE]",
    ),
    uses=(OPENAI_TEXT_CHUNK, OPENAI_STREAM_ERROR),
)
GENERATE_SSE_EVENT = Schema(
    "GenerateSseEvent",
    sse_event(
        'One server-sent event of /api/v1/generate\'s SSE form: `data: {"response": ...}`'
        ' per piece of text, `data: {}` at the end, `data: {"error": ..., "code": ...}`'
        " for a failure after the stream started; `: ping` comments keep the connection alive",
        {
            "oneOf": [
                obj({"response": STR}),
                obj({"error": STR, "code": STR}),
                {"type": "object", "maxProperties": 0},
            ]
        },
    ),
)
OPENAI_MODEL = Schema(
    "OpenAIModel",
    obj({"id": STR, "object": const("model"), "created": INT, "owned_by": STR}),
)
OPENAI_MODELS = Schema(
    "OpenAIModelList",
    obj({"object": const("list"), "data": array(ref(OPENAI_MODEL))}),
    uses=(OPENAI_MODEL,),
)
OPENAI_HEALTH = Schema(
    "ProviderHealth",
    obj(
        {"status": const("ok")},
        {
            "providers": {
                "type": "object",
                "description": "each backend by name; left out when keys are set and the "
                "request has no valid key",
                "additionalProperties": obj(
                    {"kind": STR, "ok": BOOL, "detail": STR, "circuit": STR}
                ),
            },
        },
    ),
)

# --- OpenAI Responses --------------------------------------------------------------------

_RESPONSES_TEXT = obj({"type": const("output_text"), "text": STR, "annotations": array(OBJECT)})
# An answer's refusal (an upstream's `refusal`, finished content_filter) is a part of its
# own, streamed too; text an upstream's content filter cut short is `output_text`.
_RESPONSES_REFUSAL = obj({"type": const("refusal"), "refusal": STR})
_RESPONSES_PART = {"anyOf": [_RESPONSES_TEXT, _RESPONSES_REFUSAL]}
_RESPONSES_STATUS = {"enum": ["in_progress", "completed", "incomplete"]}
_RESPONSES_MESSAGE = obj(
    {
        "type": const("message"),
        "id": STR,
        "status": _RESPONSES_STATUS,
        "role": const("assistant"),
        "content": array(_RESPONSES_PART),
    }
)
# A call to a tool of a `namespace` names it (the tool by its own name).
_NAMESPACE = {"namespace": {"type": "string", "description": "the tool's namespace"}}
_RESPONSES_CALL = obj(
    {
        "type": const("function_call"),
        "id": STR,
        "call_id": STR,
        "name": STR,
        "arguments": {"type": "string", "description": "a JSON object"},
        "status": _RESPONSES_STATUS,
    },
    _NAMESPACE,
)
_RESPONSES_CUSTOM_CALL = obj(
    {
        "type": const("custom_tool_call"),
        "id": STR,
        "call_id": STR,
        "name": STR,
        "input": {"type": "string", "description": "the custom tool's input, as written"},
        "status": _RESPONSES_STATUS,
    },
    _NAMESPACE,
)
# A reasoning model's thinking (as its upstream gave it, never a summary): an item before
# the text or call it preceded, its one part the text.
_RESPONSES_THOUGHT = obj({"type": const("reasoning_text"), "text": STR})
_RESPONSES_REASONING = obj(
    {
        "id": STR,
        "type": const("reasoning"),
        "summary": {"type": "array", "maxItems": 0},
        "content": array(_RESPONSES_THOUGHT),
        "status": _RESPONSES_STATUS,
    }
)
_RESPONSES_ITEM = {
    "anyOf": [_RESPONSES_REASONING, _RESPONSES_MESSAGE, _RESPONSES_CALL, _RESPONSES_CUSTOM_CALL]
}
# A content part as its events carry it: a message's, or a reasoning item's.
_RESPONSES_ANY_PART = {"anyOf": [_RESPONSES_TEXT, _RESPONSES_REFUSAL, _RESPONSES_THOUGHT]}
_RESPONSES_USAGE = obj(
    {
        "input_tokens": INT,
        "input_tokens_details": obj({"cached_tokens": INT, "cache_write_tokens": INT}),
        "output_tokens": INT,
        "output_tokens_details": obj({"reasoning_tokens": INT}),
        "total_tokens": INT,
    }
)
# A failed Response's error: the API's closed list of codes, stella's own code leading
# the message.
_RESPONSES_ERROR = obj(
    {
        "code": {"enum": ["server_error", "rate_limit_exceeded", "invalid_prompt"]},
        "message": {
            "type": "string",
            "description": "stella's code first: `upstream_timeout: ...`",
        },
    }
)
_STR_OR_NULL = {"type": ["string", "null"]}
RESPONSES_RESPONSE = Schema(
    "OpenAIResponse",
    obj(
        {
            "id": STR,
            "object": const("response"),
            "created_at": INT,
            "completed_at": {"type": ["integer", "null"]},
            "status": {"enum": ["in_progress", "completed", "incomplete", "failed"]},
            "error": {"anyOf": [_RESPONSES_ERROR, NULL]},
            "incomplete_details": {"anyOf": [obj({"reason": STR}), NULL]},
            "model": STR,
            "output": array(_RESPONSES_ITEM),
            "usage": {"anyOf": [_RESPONSES_USAGE, NULL]},
            "background": const(False),
            "instructions": {"type": ["string", "null"]},
            "max_output_tokens": {"type": ["integer", "null"]},
            "metadata": OBJECT,
            "parallel_tool_calls": BOOL,
            "previous_response_id": NULL,
            "prompt_cache_key": {"type": ["string", "null"]},
            "reasoning": {
                "anyOf": [obj({"effort": _STR_OR_NULL, "summary": _STR_OR_NULL}), NULL],
                "description": "the request's, as it gave it (null when it gave none)",
            },
            "temperature": {"type": ["number", "null"]},
            "text": obj({"format": OBJECT}, {"verbosity": STR}),
            "tool_choice": {"anyOf": [STR, OBJECT]},
            "tools": array(OBJECT),
            "top_p": {"type": ["number", "null"]},
            "truncation": STR,
            "user": {"type": ["string", "null"]},
            "store": const(False),
        },
        description="A Response (stream: false), the request's parameters repeated in it; "
        "never stored",
    ),
)
_WHERE = {"item_id": STR, "output_index": INT}
_RESPONSES_EVENTS: dict[str, dict[str, Any]] = {
    "response.created": {"response": ref(RESPONSES_RESPONSE)},
    "response.in_progress": {"response": ref(RESPONSES_RESPONSE)},
    "response.output_item.added": {"output_index": INT, "item": _RESPONSES_ITEM},
    "response.content_part.added": {**_WHERE, "content_index": INT, "part": _RESPONSES_ANY_PART},
    "response.reasoning_text.delta": {**_WHERE, "content_index": INT, "delta": STR},
    "response.reasoning_text.done": {**_WHERE, "content_index": INT, "text": STR},
    # logprobs: always [] (no backend gives them)
    "response.output_text.delta": {
        **_WHERE,
        "content_index": INT,
        "delta": STR,
        "logprobs": array(OBJECT),
    },
    "response.output_text.done": {
        **_WHERE,
        "content_index": INT,
        "text": STR,
        "logprobs": array(OBJECT),
    },
    "response.refusal.delta": {**_WHERE, "content_index": INT, "delta": STR},
    "response.refusal.done": {**_WHERE, "content_index": INT, "refusal": STR},
    "response.content_part.done": {**_WHERE, "content_index": INT, "part": _RESPONSES_ANY_PART},
    "response.function_call_arguments.delta": {**_WHERE, "delta": STR},
    "response.function_call_arguments.done": {**_WHERE, "name": STR, "arguments": STR},
    "response.custom_tool_call_input.delta": {**_WHERE, "delta": STR},
    "response.custom_tool_call_input.done": {**_WHERE, "input": STR},
    "response.output_item.done": {"output_index": INT, "item": _RESPONSES_ITEM},
    "response.completed": {"response": ref(RESPONSES_RESPONSE)},
    "response.incomplete": {"response": ref(RESPONSES_RESPONSE)},
    "response.failed": {"response": ref(RESPONSES_RESPONSE)},
}
RESPONSES_EVENT = Schema(
    "OpenAIResponseEvent",
    sse_event(
        "One server-sent event of the Responses API, each with its `type` and"
        " `sequence_number`: response.created, response.in_progress, per output item its"
        " added, reasoning text, text (or an upstream's refusal), arguments (or a custom"
        " tool's input) and done events, then response.completed (or response.incomplete); a failure after"
        " the stream started is a last response.failed; `: ping` comments keep the"
        " connection alive",
        {
            "anyOf": [
                obj({"type": const(name), "sequence_number": INT, **fields})
                for name, fields in _RESPONSES_EVENTS.items()
            ]
        },
        event={"enum": list(_RESPONSES_EVENTS)},
    ),
    uses=(RESPONSES_RESPONSE,),
)

# --- Ollama ------------------------------------------------------------------------------

OLLAMA_ERROR = Schema(
    "OllamaError",
    obj({"error": STR}, description="Ollama's error object (also a stream's last line)"),
)
# A thinking model's thinking, where Ollama gives it (left out when there was none).
_OLLAMA_THINKING = {"thinking": STR}
_OLLAMA_MESSAGE = obj(
    {"role": const("assistant"), "content": STR},
    {
        **_OLLAMA_THINKING,
        "tool_calls": array(
            obj(
                {"function": obj({"index": INT, "name": STR, "arguments": OBJECT})},
                {"id": STR},  # the id a tool result names its call by, when the backend gave one
            ),
        ),
    },
)
# A finished answer's counts and durations (ns); an empty chat's load/unload reply has none.
_OLLAMA_TOTALS = {
    name: INT
    for name in (
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    )
}
# Sent when the backend counted them: the prompt's tokens its cache spared it.
_OLLAMA_CACHED = {"prompt_eval_cached_count": INT}


def _ollama(
    name: str, body: dict[str, Any], what: str, extra: dict[str, Any] | None = None
) -> tuple[Schema, Schema]:
    """The answer and the stream line of /api/chat or /api/generate, `body` being the
    field that carries the text, `extra` fields sent only sometimes."""
    head = {"model": STR, "created_at": STR}
    extra = extra or {}
    answer = Schema(
        f"Ollama{name}Response",
        obj(
            {**head, **body, "done": const(True), "done_reason": STR},
            {**extra, **_OLLAMA_TOTALS, **_OLLAMA_CACHED},
            description=f"The {what} (stream: false), also a stream's last line",
        ),
    )
    line = Schema(
        f"Ollama{name}Line",
        {
            "description": "One line of the NDJSON stream: a piece of text (done: false),"
            " the last line (done: true), or an error ending the stream",
            "anyOf": [
                obj({**head, **body, "done": const(False)}, extra),
                ref(answer),
                ref(OLLAMA_ERROR),
            ],
        },
        uses=(answer, OLLAMA_ERROR),
    )
    return answer, line


OLLAMA_CHAT, OLLAMA_CHAT_LINE = _ollama("Chat", {"message": _OLLAMA_MESSAGE}, "answer")
OLLAMA_GENERATE, OLLAMA_GENERATE_LINE = _ollama(
    "Generate", {"response": STR}, "completion", _OLLAMA_THINKING
)
_OLLAMA_DETAILS = {
    "parent_model": STR,
    "format": STR,
    "family": STR,
    "families": array(STR),
    "parameter_size": STR,
    "quantization_level": STR,
}
OLLAMA_MODEL = Schema(
    "OllamaModel",
    obj(
        {
            "name": STR,
            "model": STR,
            "modified_at": STR,
            "size": INT,
            "digest": STR,
            "details": obj(_OLLAMA_DETAILS),
        }
    ),
)
OLLAMA_TAGS = Schema("OllamaModels", obj({"models": array(ref(OLLAMA_MODEL))}), (OLLAMA_MODEL,))
OLLAMA_PS = Schema(
    "OllamaRunningModels",
    obj(
        {
            "models": array(
                {
                    "allOf": [
                        ref(OLLAMA_MODEL),
                        # context_length: when the backend knows the model's window
                        obj({"size_vram": INT, "expires_at": STR}, {"context_length": INT}),
                    ]
                }
            )
        }
    ),
    (OLLAMA_MODEL,),
)
OLLAMA_SHOW = Schema(
    "OllamaShow",
    obj(
        {
            "modelfile": STR,
            "parameters": STR,
            "template": STR,
            "details": obj(_OLLAMA_DETAILS),
            # "<architecture>.context_length" is a number (when the backend knows it)
            "model_info": {"type": "object", "additionalProperties": {"anyOf": [STR, INT]}},
            "capabilities": array(STR),
            "modified_at": STR,
        }
    ),
)
OLLAMA_VERSION = Schema(
    "OllamaVersion",
    obj(
        # version: the Ollama API version the dialect follows (what Ollama's clients check)
        {"version": STR, "stella_version": STR},
        description="The Ollama API version stella's dialect follows, and stella's own",
    ),
)

# --- Anthropic ---------------------------------------------------------------------------

_ANTHROPIC_USAGE = obj(
    {"input_tokens": INT, "output_tokens": INT},
    # When the backend counted the prompt's tokens it wrote to its cache and read from
    # it (input_tokens then leaves them out).
    {
        "cache_creation_input_tokens": INT,
        "cache_read_input_tokens": INT,
        # When the backend counted the completion's reasoning tokens.
        "output_tokens_details": obj({"thinking_tokens": INT}),
    },
)
_ANTHROPIC_TEXT = obj({"type": const("text"), "text": STR})
_ANTHROPIC_TOOL_USE = obj({"type": const("tool_use"), "id": STR, "name": STR, "input": OBJECT})
# A reasoning model's thinking, when the request turned thinking on: an Anthropic
# upstream's signature, or "" for another's reasoning (such a block sent back is dropped).
_ANTHROPIC_THINKING = obj({"type": const("thinking"), "thinking": STR, "signature": STR})
# Thinking an Anthropic upstream encrypted: its opaque data, sent back as it came.
_ANTHROPIC_REDACTED = obj({"type": const("redacted_thinking"), "data": STR})
_ANTHROPIC_BLOCK = {
    "anyOf": [_ANTHROPIC_THINKING, _ANTHROPIC_REDACTED, _ANTHROPIC_TEXT, _ANTHROPIC_TOOL_USE]
}
ANTHROPIC_ERROR = Schema(
    "AnthropicError",
    obj(
        {"type": const("error"), "error": obj({"type": STR, "message": STR})},
        {"request_id": STR},
        description="Anthropic's error object (an error event of a stream has no request_id)",
    ),
)
ANTHROPIC_MESSAGE = Schema(
    "AnthropicMessage",
    obj(
        {
            "id": STR,
            "type": const("message"),
            "role": const("assistant"),
            "model": STR,
            "content": array(_ANTHROPIC_BLOCK),
            "stop_reason": STR,
            "stop_sequence": {"type": ["string", "null"]},
            "usage": _ANTHROPIC_USAGE,
        },
        description="A Message (stream: false)",
    ),
)
ANTHROPIC_TOKEN_COUNT = Schema(
    "AnthropicTokenCount",
    obj(
        {"input_tokens": INT},
        description="POST /v1/messages/count_tokens: the prompt's tokens, system and tools "
        "included",
    ),
)
ANTHROPIC_MODEL = Schema(
    "AnthropicModel",
    obj(
        {"type": const("model"), "id": STR, "display_name": STR, "created_at": STR},
        description="A model as Anthropic's API lists it (created_at in RFC 3339)",
    ),
)
ANTHROPIC_MODELS = Schema(
    "AnthropicModelList",
    obj(
        {
            "data": array(ref(ANTHROPIC_MODEL)),
            "has_more": BOOL,
            "first_id": {"type": ["string", "null"]},
            "last_id": {"type": ["string", "null"]},
        }
    ),
    uses=(ANTHROPIC_MODEL,),
)
_ANTHROPIC_EVENTS: dict[str, dict[str, Any]] = {
    "message_start": {
        "message": obj(
            {
                "id": STR,
                "type": const("message"),
                "role": const("assistant"),
                "model": STR,
                "content": array(OBJECT),
                "stop_reason": NULL,
                "stop_sequence": NULL,
                "usage": _ANTHROPIC_USAGE,
            }
        )
    },
    "ping": {},
    "content_block_start": {
        "index": INT,
        "content_block": _ANTHROPIC_BLOCK,
    },
    "content_block_delta": {
        "index": INT,
        "delta": {
            "anyOf": [
                obj({"type": const("text_delta"), "text": STR}),
                obj({"type": const("input_json_delta"), "partial_json": STR}),
                obj({"type": const("thinking_delta"), "thinking": STR}),
                obj({"type": const("signature_delta"), "signature": STR}),
            ]
        },
    },
    "content_block_stop": {"index": INT},
    "message_delta": {
        "delta": obj({"stop_reason": STR, "stop_sequence": {"type": ["string", "null"]}}),
        "usage": _ANTHROPIC_USAGE,
    },
    "message_stop": {},
}
ANTHROPIC_EVENT = Schema(
    "AnthropicEvent",
    sse_event(
        "One server-sent event of the Messages API: message_start, ping, per content block"
        " content_block_start, content_block_delta and content_block_stop, then message_delta"
        " and message_stop; a failure after the stream started is a last `error` event",
        {
            "anyOf": [
                *(
                    obj({"type": const(name), **fields})
                    for name, fields in _ANTHROPIC_EVENTS.items()
                ),
                ref(ANTHROPIC_ERROR),
            ]
        },
        event={"enum": [*_ANTHROPIC_EVENTS, "error"]},
    ),
    uses=(ANTHROPIC_ERROR,),
)

# --- aliases -----------------------------------------------------------------------------

FLAT_ERROR = Schema(
    "FlatError",
    obj({"error": STR, "code": STR, "request_id": STR}, description="The aliases' error object"),
)
INVOKE_RESPONSE = Schema(
    "InvokeResponse",
    obj({"output": STR, "metadata": obj({"model": STR, "request_id": STR, "usage": ref(Usage)})}),
    (Usage,),
)
PROMPT_RESPONSE = Schema(
    "PromptResponse", obj({"response": STR, "model": STR, "usage": ref(Usage)}), (Usage,)
)
LLM_RESPONSE = Schema(
    "LLMResponse",
    obj({"response": STR, "model": STR, "finish_reason": STR, "usage": ref(Usage)}),
    (Usage,),
)
# model and backend: null when keys are configured (the route is public).
_NAME = {"type": ["string", "null"]}
LLM_HEALTH = Schema(
    "LLMHealth",
    obj({"status": const("ok"), "model": _NAME, "backend": _NAME, "loaded": BOOL}),
)
# default: null for a key that may not use the default model.
LLM_MODELS = Schema(
    "LLMModels", obj({"models": array(STR), "default": {"type": ["string", "null"]}})
)
