"""The backend registry: built-ins and third-party distributions share one entry point group."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from stella.backends import registry
from tests.live import install_plugin, ndjson, run_stella

PLUGIN = """
from stella.backends import Backend, BackendConfig
from stella.protocol import Delta, Done, Usage


class ShoutConfig(BackendConfig, kw_only=True):
    suffix: str = "!"


class ShoutBackend(Backend):
    kind = "shout"
    Config = ShoutConfig

    async def chat(self, request, ctx):
        text = request.messages[-1].content.upper() + self.config.suffix
        yield Delta(text=text)
        yield Done(finish_reason="stop", usage=Usage(1, 1, 2))


class BuggyBackend(Backend):
    kind = "buggy"

    async def chat(self, request, ctx):
        yield Delta(text="partial")
        {}["no such key"]
"""


def test_builtins_are_entry_points() -> None:
    kinds = registry()
    assert {"echo", "mlx", "openai", "ollama", "anthropic"} <= set(kinds)
    assert kinds["echo"].value == "stella.backends.echo:EchoBackend"


def test_backend_from_another_distribution_is_picked_up(tmp_path: Path) -> None:
    # An installed distribution is a package plus a .dist-info with entry_points.txt on sys.path.
    kinds = {"shout": "ShoutBackend", "buggy": "BuggyBackend"}
    env = install_plugin(tmp_path, "stella_shout", PLUGIN, kinds)
    config = {
        "backends": {"loud": {"kind": "shout", "suffix": "!!"}, "bug": {"kind": "buggy"}},
        "breaker": {"failure_threshold": 1},
        "models": {"routes": {"loud": {"backend": "loud"}, "bug": {"backend": "bug"}}},
    }
    with run_stella(config, env) as server:
        r = httpx.post(
            server.url + "/api/v1/chat",
            json={"model": "loud", "messages": [{"role": "user", "content": "hello"}]},
        )
        lines = ndjson(r.text)
        assert lines[1] == {"type": "delta", "text": "HELLO!!"}
        assert lines[-1]["type"] == "done"
        # A backend that crashes mid-stream still ends the stream with one error line.
        r = httpx.post(
            server.url + "/api/v1/chat",
            json={"model": "bug", "messages": [{"role": "user", "content": "x"}]},
        )
        lines = ndjson(r.text)
        assert [e["type"] for e in lines] == ["start", "delta", "error"]
        assert lines[-1]["code"] == "upstream_error"
        ev = server.wait_event(lambda e: e["model"] == "bug")
        assert ev["status"] == 502 and ev["error_code"] == "upstream_error"
        # A failure of the backend, as one before its first token: the attempt says so,
        # it is counted, and its circuit (opened by one failure here) heard of it.
        assert ev["attempts"] == [
            {
                "backend": "bug",
                "route": "bug",
                "ms": ev["attempts"][0]["ms"],
                "error": "upstream_error",
            }
        ]
        text = httpx.get(server.url + "/metrics").text
        assert 'stella_backend_failures_total{backend="bug",code="upstream_error"} 1.0' in text
        assert 'stella_circuit_state{backend="bug"} 2.0' in text
        # Every log line of a request carries its ID, not only the inference event.
        assert [e["request_id"] for e in server.events("backend_failed")] == [lines[0]["id"]]
        models = httpx.get(server.url + "/api/v1/models").json()["models"]
        assert {"name": "loud", "kind": "shout"}.items() <= next(
            m for m in models if m["name"] == "loud"
        ).items()


@pytest.mark.parametrize("content", [False, True])
def test_a_backend_s_failure_is_logged_with_its_message_only_with_content(
    tmp_path: Path, content: bool
) -> None:
    # A backend's exception message is its own text, and may quote what it was sent
    # (here the KeyError names a key of the prompt's): without log.content the traceback
    # and the exception's type are logged, not its message.
    env = install_plugin(tmp_path, "stella_quote", QUOTING_PLUGIN, {"quoting": "QuotingBackend"})
    config = {
        "log": {"content": content},
        "backends": {"q": {"kind": "quoting"}},
        "models": {"routes": {"q": {"backend": "q"}}},
    }
    with run_stella(config, env) as server:
        # Before its first token, and after it (a backend failing mid-answer).
        for prompt in ("private plan", "late private plan"):
            r = httpx.post(
                server.url + "/api/v1/chat",
                json={
                    "model": "q",
                    "stream": False,
                    "messages": [{"role": "user", "content": prompt}],
                },
            )
            assert r.status_code == 502
            rid = r.headers["x-request-id"]
            server.wait_event(lambda e, rid=rid: e["request_id"] == rid)
        failures = server.events("backend_failed")  # one an attempt (retries)
        logged = "\n".join(server.lines())
    # Both sites logged: the first event awaited (_first), and one mid-answer.
    assert {", in _first\n" in f["exception"] for f in failures} == {True, False}
    for failed in failures:
        trace = failed["exception"]
        assert "Traceback (most recent call last)" in trace and "in chat" in trace
        assert "KeyError" in trace and ("private plan" in trace) is content
    assert ("private plan" in logged) is content


class PlanError(Exception):
    """An exception of a module's own: named with its module in a traceback."""


def test_a_traceback_without_messages_keeps_the_chain_and_each_type() -> None:
    # What led to the failure is told as Python tells it, each exception's message left
    # out; a context suppressed (`from None`) is left out as Python leaves it out.
    from stella.core import _traceback_only

    secret = "private plan"  # a variable: the source lines shown do not hold it
    try:
        try:
            {}[secret]
        except KeyError as exc:
            raise PlanError(secret) from exc
    except PlanError as exc:
        caused = exc
    try:
        try:
            raise ValueError(secret)
        except ValueError:
            raise PlanError(secret) from None
    except PlanError as exc:
        suppressed = exc
    text = _traceback_only(caused)
    assert "private" not in text
    key = text.index("\nKeyError (message not logged)")
    led = text.index("which led to")
    assert key < led < text.index(f"\n{__name__}.PlanError (message not logged)")
    assert text.startswith("Traceback (most recent call last):\n") and "in test_a" in text
    text = _traceback_only(suppressed)
    assert "ValueError" not in text and "which led to" not in text and "private" not in text


QUOTING_PLUGIN = """
from stella.backends import Backend
from stella.protocol import Delta


class QuotingBackend(Backend):
    kind = "quoting"

    async def chat(self, request, ctx):
        text = request.messages[-1].content
        if text.startswith("late "):
            yield Delta(text="a")
        {}[text]
        yield
"""


@pytest.mark.parametrize(
    ("key", "value"),
    [("delay_s", -1), ("error_code", "bogus"), ("fail_after", -2), ("fail_first_calls", -1)],
)
def test_echo_knobs_are_checked(key: str, value: object) -> None:
    from stella.backends import ConfigError, build_backend, registry

    with pytest.raises(ConfigError, match=f"backends.e.{key}: "):
        build_backend("e", {"kind": "echo", key: value}, registry())


@pytest.mark.parametrize(
    ("value", "got"), [(5, "int"), (["echo"], "array"), ({"a": 1}, "object"), (True, "bool")]
)
def test_a_kind_of_the_wrong_type_is_said_to_be_one(value: object, got: str) -> None:
    # It was reported as missing ("required"), which it is not.
    from stella.backends import ConfigError, build_backend, registry

    with pytest.raises(ConfigError) as err:
        build_backend("e", {"kind": value}, registry())
    assert str(err.value) == f"backends.e.kind: Expected `str`, got `{got}`"
    with pytest.raises(ConfigError, match=r"^backends\.e\.kind: required, one of \["):
        build_backend("e", {}, registry())


@pytest.mark.parametrize("value", [0, -5])
def test_anthropic_default_max_tokens_must_be_positive(value: int) -> None:
    # The Messages API refuses max_tokens below 1: said at start-up, not on every call.
    from stella.backends import ConfigError, build_backend, registry

    with pytest.raises(ConfigError, match=r"backends\.a\.max_tokens: "):
        build_backend("a", {"kind": "anthropic", "max_tokens": value}, registry())


def test_an_openai_backend_s_token_limit_name_is_one_of_the_apis() -> None:
    # A typo would otherwise reach every call as an unknown field the upstream ignores.
    from stella.backends import ConfigError, build_backend, registry

    table = {"kind": "openai", "base_url": "http://127.0.0.1:1/v1"}
    with pytest.raises(ConfigError, match=r"backends\.o\.max_tokens_param: .*'max_output_tokens'"):
        build_backend("o", {**table, "max_tokens_param": "max_output_tokens"}, registry())
    built = build_backend("o", {**table, "max_tokens_param": "max_completion_tokens"}, registry())
    assert built.cfg.max_tokens_param == "max_completion_tokens"  # type: ignore[attr-defined]


def test_every_echo_error_code_is_a_failure_it_can_raise() -> None:
    import typing

    from stella.backends.echo import _FAILURES, EchoConfig

    hints = typing.get_type_hints(EchoConfig, include_extras=True)
    assert set(typing.get_args(hints["error_code"])) == set(_FAILURES)


@pytest.mark.parametrize(
    ("text", "limit", "stops", "pieces", "finish", "stop"),
    [
        ("hello big world", None, ["o b"], ["hell"], "stop", "o b"),
        ("hello big world", None, ["big"], ["hello", " "], "stop", "big"),
        ("hello big world", None, ["hello"], [], "stop", "hello"),
        ("hello big world", 1, ["o b"], ["hello"], "length", None),
        ("hello big world", 2, ["o b", "zz"], ["hell"], "stop", "o b"),
        ("hello big world", 2, ["zz"], ["hello", " big"], "length", None),
        ("hello big world", None, ["zz"], ["hello", " big", " world"], "stop", None),
        ("a b", 5, [], ["a", " b"], "stop", None),
    ],
)
def test_echo_cuts_at_a_stop_even_inside_a_word(
    text: str, limit: int | None, stops: list[str], pieces: list[str], finish: str, stop: str | None
) -> None:
    from stella.backends.echo import _WORDS, _pieces

    assert _pieces(_WORDS.findall(text), limit, stops) == (pieces, finish, stop)


def test_tool_results_are_linked_to_their_calls() -> None:
    from stella.backends.base import linked_tool_calls
    from stella.protocol import FunctionCall, Message, ToolCallRef

    def call(name: str, id: str = "") -> ToolCallRef:
        return ToolCallRef(id=id, function=FunctionCall(name=name, arguments={}))

    def links(messages: list[Message]) -> list[tuple[str, str | None]]:
        out = []
        for m in linked_tool_calls(messages):
            if m.tool_calls:
                out += [("call", c.id) for c in m.tool_calls]
            elif m.role == "tool":
                out.append((m.content, m.tool_call_id))
        return out

    user = Message(role="user", content="q")
    # Partly linked: a result naming its call keeps it, one without takes the call left.
    partial = [
        user,
        Message(role="assistant", tool_calls=[call("w", "id_a"), call("w", "id_b")]),
        Message(role="tool", content="res B"),
        Message(role="tool", content="res A", tool_call_id="id_a"),
    ]
    assert links(partial) == [
        ("call", "id_a"),
        ("call", "id_b"),
        ("res B", "id_b"),
        ("res A", "id_a"),
    ]
    # Ollama's way: no ids; results by tool name (in any order), else in order; turn by turn.
    ollama = [
        user,
        Message(role="assistant", tool_calls=[call("w"), call("t"), call("w")]),
        Message(role="tool", content="t1", name="t"),
        Message(role="tool", content="w1", name="w"),
        Message(role="tool", content="w2"),
        Message(role="assistant", content="and?"),
        user,
        Message(role="assistant", tool_calls=[call("w")]),
        Message(role="tool", content="w3", name="w"),
    ]
    assert links(ollama) == [
        ("call", "call_1_0"),
        ("call", "call_1_1"),
        ("call", "call_1_2"),
        ("t1", "call_1_1"),
        ("w1", "call_1_0"),
        ("w2", "call_1_2"),
        ("call", "call_7_0"),
        ("w3", "call_7_0"),
    ]
    # Linked already: the very list comes back.
    linked = [user, Message(role="assistant", tool_calls=[call("w", "x")])]
    linked.append(Message(role="tool", content="r", tool_call_id="x"))
    assert linked_tool_calls(linked) is linked
