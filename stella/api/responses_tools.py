"""The Responses API's tools in stella's terms, and the way back for the model's calls.

A backend knows only function tools, each by a name of its own. The API has more:
- a `namespace` groups function and custom tools under a name; its tools are offered as
  function tools, each under its own name unless that name is taken (by a top-level
  tool, or by an earlier namespace's tool), then as `<namespace>__<name>`; a call comes
  back as a `function_call` with `namespace` set, under the tool's own name;
- a `custom` (freeform) tool takes one string: it is offered as a function of one
  string parameter, `input`, whose description carries the tool's grammar as text (no
  upstream can be held to it); a call comes back as a `custom_tool_call` with `input`;
- a built-in (hosted) tool stella cannot run (web_search, file_search, tool_search,
  code_interpreter, mcp, ...) is left out: a tool never offered is never called. A
  request that forces one (a `tool_choice` naming it, or `required` when only such
  tools were given) is a 400: the model would be made to call what is not there.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from stella.api.openai_request import allowed_tools, open_tool_choice
from stella.errors import InvalidRequest
from stella.protocol import (
    FunctionSpec,
    NamedFunction,
    NamedToolChoice,
    Tool,
    ToolChoice,
    arguments_text,
)

# The API's built-in tool types (openai-python's `Tool` union and `ToolChoiceTypes`).
HOSTED = frozenset(
    {
        "web_search",
        "web_search_2025_08_26",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "file_search",
        "computer",
        "computer_use",
        "computer_use_preview",
        "code_interpreter",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "tool_search",
        "programmatic_tool_calling",
    }
)
_SPEC = ("name", "description", "parameters", "strict")
_NAME_LIMIT = 64  # a function name's length, as the protocol's ToolName bounds it


class Declared(NamedTuple):
    """A tool as the request declared it: its name, its namespace, whether it is custom."""

    name: str
    namespace: str | None = None
    custom: bool = False


def _unique(name: str, namespace: str, taken: set[str]) -> str:
    """A namespaced tool's name upstream: its own when free, else prefixed with its
    namespace (and numbered, should that be taken or too long too)."""
    if name not in taken:
        return name
    base = f"{namespace}__{name}"
    candidate, n = base[:_NAME_LIMIT], 2
    while candidate in taken:
        suffix = f"_{n}"
        candidate, n = base[: _NAME_LIMIT - len(suffix)] + suffix, n + 1
    return candidate


def _custom_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    """A custom tool's one string parameter, its format said in words."""
    fmt = tool.get("format")
    said = "The tool's whole input, as plain text (the tool reads it as it is)."
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        said = (
            "The tool's whole input, as plain text (not JSON), written in this "
            f"{fmt.get('syntax', '')} grammar:\n{fmt.get('definition', '')}"
        )
    return {
        "type": "object",
        "properties": {"input": {"type": "string", "description": said}},
        "required": ["input"],
        "additionalProperties": False,
    }


def _spec(tool: dict[str, Any], path: str) -> FunctionSpec:
    """A function or custom tool as a native function, errors said at `path`."""
    if tool.get("type") == "custom":
        fields = {k: tool[k] for k in ("name", "description") if tool.get(k) is not None}
        fields["parameters"] = _custom_parameters(tool)
    else:
        # A null description or parameters is none given (the struct takes no null).
        fields = {k: tool[k] for k in _SPEC if tool.get(k) is not None}
    try:
        return msgspec.convert(fields, FunctionSpec)
    except msgspec.ValidationError as exc:
        # Said of the tool: msgspec's path starts at the function's own fields.
        text = str(exc)
        if "$." in text:
            text = text.replace("$.", f"$.{path}.", 1)
        else:
            text += f" - at `$.{path}`"
        raise InvalidRequest.blaming(text) from None


def _entries(
    tools: list[dict[str, Any]],
) -> tuple[list[tuple[str, dict[str, Any], str | None]], int]:
    """Each function and custom tool with its path and namespace, a namespace's
    flattened in place; and how many built-in tools were left out."""
    entries: list[tuple[str, dict[str, Any], str | None]] = []
    hosted = 0
    for i, t in enumerate(tools):
        kind = t.get("type")
        if kind in ("function", "custom"):
            entries.append((f"tools[{i}]", t, None))
        elif kind == "namespace":
            name, inner = t.get("name"), t.get("tools")
            if not isinstance(name, str) or not name:
                raise InvalidRequest(f"$.tools[{i}].name: required", param=f"tools[{i}].name")
            if not isinstance(inner, list):
                raise InvalidRequest(
                    f"$.tools[{i}].tools: expected a list of tools", param=f"tools[{i}].tools"
                )
            for j, u in enumerate(inner):
                kind = u.get("type") if isinstance(u, dict) else None
                if kind not in ("function", "custom"):
                    raise InvalidRequest(
                        f"$.tools[{i}].tools[{j}].type: {kind!r} is not supported in a "
                        "namespace (function and custom tools)",
                        param=f"tools[{i}].tools[{j}].type",
                    )
                entries.append((f"tools[{i}].tools[{j}]", u, name))
        elif _hosted(kind):
            hosted += 1
        else:
            raise InvalidRequest(
                f"$.tools[{i}].type: {kind!r} is not supported (function, custom and "
                "namespace tools; built-in tools are left out, as stella runs none)",
                param=f"tools[{i}].type",
            )
    return entries, hosted


class ToolSet:
    """The tools a request offers upstream, and how it declared each (by upstream name)."""

    def __init__(self, tools: list[Tool], declared: dict[str, Declared], hosted: int) -> None:
        self.tools = tools
        self.declared = declared
        self.hosted = hosted  # built-in tools given and left out
        self._upstream = {(d.namespace, d.name): name for name, d in declared.items()}

    @classmethod
    def read(cls, tools: list[dict[str, Any]] | None) -> ToolSet:
        """The request's `tools`: a 400 naming the path of one stella cannot read."""
        entries, hosted = _entries(tools or [])
        specs = [(_spec(t, path), ns, t.get("type") == "custom") for path, t, ns in entries]
        # Top-level tools keep their names: the client's own, which a namespace's give way to.
        taken = {spec.name for spec, ns, _ in specs if ns is None}
        out, declared = [], {}
        for spec, ns, custom in specs:
            own = spec.name
            if ns is not None:
                spec = msgspec.structs.replace(spec, name=_unique(own, ns, taken))
                taken.add(spec.name)
            out.append(Tool(function=spec))
            declared[spec.name] = Declared(own, ns, custom)
        return cls(out, declared, hosted)

    def upstream(self, name: str, namespace: str | None = None) -> str | None:
        """The upstream name of the tool the request declared as `name` in `namespace`."""
        return self._upstream.get((namespace, name))

    def _named(self, name: str, custom: bool) -> str | None:
        """The upstream name of the (custom) tool a tool_choice names: a top-level one
        before one in a namespace (the API's choice names none)."""
        found = [up for up, d in self.declared.items() if d.name == name and d.custom == custom]
        found.sort(key=lambda up: self.declared[up].namespace is not None)
        return found[0] if found else None

    def choice(self, value: Any) -> tuple[list[Tool] | None, ToolChoice | None]:
        """tool_choice: auto, none, required, {"type": "function" | "custom", "name"};
        allowed_tools narrows the tools sent, as on chat completions. One that forces a
        built-in tool is a 400 (the model would be made to call what is not there).
        With the tools to send."""
        tools = self.tools or None
        if value is None:
            return tools, None
        choice = open_tool_choice(value)
        if isinstance(choice, str):
            if choice == "required" and tools is None and self.hosted:
                raise InvalidRequest(
                    "$.tool_choice: 'required', and the only tools are built-in ones, which "
                    "stella cannot run",
                    param="tool_choice",
                )
            return tools, choice
        kind = choice.get("type")
        if kind in ("function", "custom"):
            name = choice.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidRequest("$.tool_choice.name: required", param="tool_choice.name")
            upstream = self._named(name, kind == "custom")
            if upstream is None:
                raise InvalidRequest(
                    f"$.tool_choice.name: no {kind} tool named {name!r}",
                    param="tool_choice.name",
                )
            return tools, NamedToolChoice(function=NamedFunction(name=upstream))
        if kind == "allowed_tools":
            listed = choice.get("tools")
            if isinstance(listed, list):
                # A built-in tool allowed is one left out: allowed or not, it is not offered.
                kept = [e for e in listed if not (isinstance(e, dict) and _hosted(e.get("type")))]
                choice = {**choice, "tools": kept}
            return allowed_tools(tools, choice, "tool_choice", self._allowed_name)
        raise InvalidRequest(
            f"$.tool_choice.type: {kind!r} is not supported (function and custom tools: "
            "stella runs no built-in tools)",
            param="tool_choice.type",
        )

    def _allowed_name(self, entry: Any) -> tuple[str, Any]:
        """The upstream name an allowed_tools entry names (the API's flat shape), and its
        field; a name no tool has, as it was given (the 400 names it)."""
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str):
            name = self._named(name, entry.get("type") == "custom") or name
        return "name", name


def _hosted(kind: Any) -> bool:
    """Whether a tool's `type` names a built-in tool (any JSON value may be sent)."""
    return isinstance(kind, str) and kind in HOSTED


def custom_input(arguments: dict[str, Any], raw: str | None) -> str:
    """A custom tool's input from the arguments of the function it was offered as: its
    `input`; else the model's own text when it wrote no JSON object, its one string
    value, or the arguments' JSON (a model may name the parameter otherwise)."""
    value = arguments.get("input")
    if isinstance(value, str):
        return value
    if raw is not None:
        return raw
    strings = [v for v in arguments.values() if isinstance(v, str)]
    if len(arguments) == 1 and strings:
        return strings[0]
    return arguments_text(arguments, raw)
