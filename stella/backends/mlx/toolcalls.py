"""Tool calls in a model's streamed text, between its tokenizer's start and end markers.

mlx-lm's tokenizer wrapper knows, per model family, the text that opens and closes
a tool call (`<tool_call>` ... `</tool_call>` for Qwen/Hermes-style templates; the
Mistral family has no end marker, its calls run to the end of the answer) and a
parser for what comes between. The text outside the markers is the answer; what is
inside becomes ToolCall events, never text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from stella.backends.stops import partial_start

Parser = Callable[[str, Any], Any]
Call = tuple[str, dict[str, Any]]  # (name, arguments)
Piece = str | Call  # answer text, or a call, in the order the model wrote them


class ToolCallBuffer:
    """Splits streamed text into answer text and parsed calls, in order."""

    def __init__(self, start: str, end: str, parse: Parser, tools: Any) -> None:
        self.start = start
        self.end = end  # "" when a call runs to the end of the answer
        self.parse = parse
        self.tools = tools
        self.inside = False
        self.held = ""
        self.made = 0  # calls parsed so far

    @property
    def holding(self) -> bool:
        """Whether text is held back (a call being written, or what may start one)."""
        return self.inside or bool(self.held)

    def feed(self, text: str) -> list[Piece]:
        """The answer text safe to emit now and the calls completed, in order."""
        buf = self.held + text
        out: list[Piece] = []
        while buf:
            if not self.inside:
                at = buf.find(self.start)
                if at < 0:
                    keep = partial_start(buf, self.start)
                    if len(buf) > keep:
                        out.append(buf[: len(buf) - keep])
                    self.held = buf[len(buf) - keep :]
                    return out
                if at:
                    out.append(buf[:at])
                buf = buf[at + len(self.start) :]
                self.inside = True
            else:
                at = buf.find(self.end) if self.end else -1
                if at < 0:
                    self.held = buf
                    return out
                body, buf = buf[:at], buf[at + len(self.end) :]
                self.inside = False
                parsed = self._parse(body)
                if parsed is None:  # not a call after all: it was text
                    out.append(self.start + body + self.end)
                else:
                    out += parsed
        self.held = ""
        return out

    def flush(self) -> list[Piece]:
        """At the end of the answer: a call still open is parsed if it can be (one cut
        off by max_tokens cannot), else given back as text, as is a partial marker."""
        held, self.held = self.held, ""
        if not self.inside:
            return [held] if held else []
        self.inside = False
        parsed = self._parse(held)
        return list(parsed) if parsed else [self.start + held]

    def _parse(self, body: str) -> list[Call] | None:
        try:
            parsed = self.parse(body, self.tools)
        except Exception:  # a model's text is anything (a parser can even recurse out)
            return None
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            args = item.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    return None
            if not isinstance(args, dict):
                return None
            calls.append((item["name"], args))
        if not calls:
            return None
        self.made += len(calls)
        return calls
