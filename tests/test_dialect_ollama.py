"""The Ollama dialect, driven by the official ollama client against a live stella."""

from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import ollama
import pytest

from tests.live import LiveServer, run_stella


def client(server: LiveServer) -> ollama.Client:
    return ollama.Client(host=server.url)


def test_chat_stream_and_not(stella: LiveServer) -> None:
    c = client(stella)
    r = c.chat(model="echo", messages=[{"role": "user", "content": "hello there"}], stream=False)
    assert r.message.content == "hello there" and r.done and r.done_reason == "stop"
    assert r.eval_count == 2 and r.prompt_eval_count == 2 and r.total_duration > 0
    parts = list(c.chat(model="echo", messages=[{"role": "user", "content": "a b c"}], stream=True))
    assert "".join(p.message.content for p in parts) == "a b c"
    assert parts[-1].done and not any(p.done for p in parts[:-1])


def test_generate_stream_and_not(stella: LiveServer) -> None:
    c = client(stella)
    r = c.generate(model="echo", prompt="one two", system="be brief")
    assert r.response == "one two" and r.done
    parts = list(c.generate(model="echo", prompt="x y", stream=True))
    assert "".join(p.response for p in parts) == "x y" and parts[-1].done_reason == "stop"


def test_raw_generate_is_refused_not_templated(stella: LiveServer) -> None:
    # A raw prompt would still go through the model's chat template: refused, naming `raw`.
    c = client(stella)
    with pytest.raises(ollama.ResponseError) as info:
        c.generate(model="echo", prompt="<|im_start|>user\nhi", raw=True)
    assert info.value.status_code == 400
    assert info.value.error.startswith("$.raw: ") and "chat template" in info.value.error
    assert c.generate(model="echo", prompt="one two", raw=False).response == "one two"
    # `format` reaches backends that take it: echo answers as before.
    assert c.generate(model="echo", prompt="{}", format="json").response == "{}"


def test_suffix_and_template_are_refused_not_dropped(stella: LiveServer) -> None:
    # Dropped, a fill-in-the-middle request would come back an ordinary completion of its
    # prompt; Ollama refuses a suffix for a model without the insert capability.
    c = client(stella)
    for fields, name in (
        ({"prompt": "def f(", "suffix": "    return x"}, "suffix"),
        ({"suffix": "    return x"}, "suffix"),  # no prompt: an insert still, not a load
        ({"prompt": "hi", "template": "{{ .Prompt }}"}, "template"),
    ):
        with pytest.raises(ollama.ResponseError) as info:
            c.generate(model="echo", **fields)
        assert info.value.status_code == 400, fields
        assert info.value.error.startswith(f"$.{name}: "), info.value.error
    # The client sends "" for each when not given: none.
    assert c.generate(model="echo", prompt="a b", suffix="", template="").response == "a b"


def test_logprobs_are_refused(stella: LiveServer) -> None:
    # As the OpenAI dialect refuses them: no backend gives them.
    c = client(stella)
    hi = [{"role": "user", "content": "hi"}]
    for fields, name in (({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs")):
        with pytest.raises(ollama.ResponseError) as chat:
            c.chat(model="echo", messages=hi, **fields)
        with pytest.raises(ollama.ResponseError) as generate:
            c.generate(model="echo", prompt="hi", **fields)
        for info in (chat, generate):
            assert info.value.status_code == 400
            assert info.value.error.startswith(f"$.{name}: "), info.value.error
    r = c.chat(model="echo", messages=hi, logprobs=False, top_logprobs=0)
    assert r.message.content == "hi"


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def test_images_to_a_text_only_model_are_refused_naming_the_field(stella: LiveServer) -> None:
    # Echo reads no image: dropped, the model would answer as if it had seen none (the
    # backends that read images get them: tests/test_images.py). An empty list asks for
    # none.
    c = client(stella)
    with pytest.raises(ollama.ResponseError) as chat:
        c.chat(
            model="echo",
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "user", "content": "what is this?", "images": [PNG]},
            ],
        )
    assert chat.value.status_code == 400
    assert chat.value.error == (
        "$.messages[1].images[0]: model 'echo' reads text only: images are not supported"
    )
    with pytest.raises(ollama.ResponseError) as generate:
        c.generate(model="echo", prompt="what is this?", images=[PNG])
    assert generate.value.status_code == 400
    assert "model 'echo' reads text only" in generate.value.error
    # Not a load either: an empty prompt with an image asks about the image.
    r = httpx.post(stella.url + "/api/generate", json={"model": "echo", "images": [PNG]})
    assert r.status_code == 400 and "reads text only" in r.json()["error"], r.text
    # What is not an image of a format the backends take is refused by its place.
    r = httpx.post(stella.url + "/api/generate", json={"model": "echo", "images": ["aGk="]})
    assert r.status_code == 400 and r.json()["error"].startswith("$.images[0]: not an image")
    with pytest.raises(ollama.ResponseError) as bad:
        c.chat(model="echo", messages=[{"role": "user", "content": "a", "images": [b"not a png"]}])
    assert bad.value.error.startswith("$.messages[0].images[0]: not an image"), bad.value.error
    for path, body in (
        ("/api/chat", {"messages": [{"role": "user", "content": "a b", "images": []}]}),
        ("/api/generate", {"prompt": "a b", "images": []}),
    ):
        r = httpx.post(stella.url + path, json={"model": "echo", "stream": False, **body})
        assert r.status_code == 200 and "a b" in r.text, (path, r.text)


def test_openapi_describes_images(stella: LiveServer) -> None:
    # A generated client reads the field's schema: an array of base64 strings.
    schemas = httpx.get(stella.url + "/openapi.json").json()["components"]["schemas"]
    for name in ("OllamaMessage", "OllamaGenerate"):
        images = schemas[name]["properties"]["images"]["anyOf"][0]
        assert images["type"] == "array" and images["items"] == {"type": "string"}
        assert images["description"].startswith("images, each base64"), name


@pytest.mark.parametrize("value", ["yaml", 5, [], True, ["json"]])
def test_a_format_that_is_neither_json_nor_a_schema_is_refused(
    stella: LiveServer, value: object
) -> None:
    # As Ollama refuses it: dropped, the answer would come back in no format asked for.
    for path, body in (
        ("/api/chat", {"messages": [{"role": "user", "content": "a"}]}),
        ("/api/generate", {"prompt": "a"}),
    ):
        r = httpx.post(
            stella.url + path, json={"model": "echo", "format": value, "stream": False, **body}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith("$.format: "), r.text


@pytest.mark.parametrize("value", ["", None, "json", {"type": "object"}])
def test_a_format_ollama_reads_is_taken(stella: LiveServer, value: object) -> None:
    # "" and null are Ollama's "not set".
    r = httpx.post(
        stella.url + "/api/generate",
        json={"model": "echo", "format": value, "stream": False, "prompt": "{}"},
    )
    assert r.status_code == 200 and r.json()["response"] == "{}", r.text


def test_line_separators_in_text_reach_the_client_whole(stella: LiveServer) -> None:
    # The client reads lines with httpx's iter_lines, which splits at these too; Ollama's
    # Go encoder escapes U+2028 and U+2029, and stella escapes all three.
    text = "a\u2028b c\u2029d e\x85f"
    c = client(stella)
    parts = list(c.chat(model="echo", messages=[{"role": "user", "content": text}], stream=True))
    assert "".join(p.message.content for p in parts) == text
    parts = list(c.generate(model="echo", prompt=text, stream=True))
    assert "".join(p.response for p in parts) == text


@pytest.mark.parametrize("value", ["garbage", [], {"a": 1}, True, "5 minutes"])
def test_a_keep_alive_that_is_no_duration_is_refused(stella: LiveServer, value: object) -> None:
    for path, body in (
        ("/api/chat", {"messages": [{"role": "user", "content": "a"}]}),
        ("/api/generate", {"prompt": "a"}),
    ):
        r = httpx.post(
            stella.url + path, json={"model": "echo", "keep_alive": value, "stream": False, **body}
        )
        assert r.status_code == 400, r.text
        assert "keep_alive" in r.json()["error"]


@pytest.mark.parametrize("value", ["5m", "1h30m", "-1m", 300, -1, "0", None])
def test_a_keep_alive_ollama_reads_is_taken(stella: LiveServer, value: object) -> None:
    c = client(stella)
    r = c.chat(model="echo", messages=[{"role": "user", "content": "a b"}], keep_alive=value)
    assert r.message.content == "a b"


def test_options_map_num_predict(stella: LiveServer) -> None:
    r = client(stella).chat(
        model="echo", messages=[{"role": "user", "content": "a b c d"}], options={"num_predict": 2}
    )
    assert r.message.content == "a b" and r.done_reason == "length"


def test_list_show_ps_version(stella: LiveServer) -> None:
    c = client(stella)
    names = {m.model for m in c.list().models}
    assert "echo:latest" in names
    shown = c.show("echo")
    assert shown.details.family == "echo"
    assert "echo:latest" in {m.model for m in c.ps().models}
    assert httpx.get(stella.url + "/api/version").json()["version"]


def test_root_passes_the_ollama_is_running_probe(stella: LiveServer) -> None:
    # Ollama answers GET / with "Ollama is running"; clients look for it by substring
    # (`text.includes("Ollama is running")`). stella's info document stays JSON.
    for accept in ("*/*", "application/json"):
        r = httpx.get(stella.url + "/", headers={"Accept": accept})
        assert r.status_code == 200 and "Ollama is running" in r.text, r.text
        info = r.json()
        assert info["name"] == "stella" and info["links"]["ollama"] == "/api/chat"


def test_version_is_the_ollama_api_version_clients_check(stella: LiveServer) -> None:
    # Clients compare it with Ollama's releases: VS Code's Copilot Chat refuses a server
    # below 0.6.4 ("Ollama server version 0.1.0 is not supported"). stella's own rides along.
    from stella import __version__

    body = httpx.get(stella.url + "/api/version").json()
    numbers = tuple(int(n) for n in body["version"].split("."))
    assert len(numbers) == 3 and numbers >= (0, 6, 4), body
    assert body["stella_version"] == __version__


def test_details_carry_every_field_ollama_sends(stella: LiveServer) -> None:
    # Ollama's ModelDetails always has these; clients read `details.families.join(", ")`.
    expected = {
        "parent_model": "",
        "format": "echo",
        "family": "echo",
        "families": ["echo"],
        "parameter_size": "",
        "quantization_level": "",
    }
    for path in ("/api/tags", "/api/ps"):
        entries = httpx.get(stella.url + path).json()["models"]
        echo = next(m for m in entries if m["model"] == "echo:latest")
        assert echo["details"] == expected, (path, echo)
    shown = httpx.post(stella.url + "/api/show", json={"model": "echo"}).json()
    assert shown["details"] == expected
    assert client(stella).show("echo").details.families == ["echo"]
    assert all(m.details.families for m in client(stella).list().models)


def test_show_and_ps_give_the_context_length_when_the_backend_knows_it() -> None:
    # Ollama's own: /api/ps's context_length, /api/show's "<arch>.context_length" in
    # model_info. An Ollama upstream says it of a model it runs; echo and a model the
    # upstream is not running have none, and none is claimed.
    from tests.fakes.ollama import CONTEXT, FakeOllama
    from tests.fakes.server import serve

    box = FakeOllama()
    with serve(box.app, "/api/version") as box_url:
        config = {
            "backends": {"box": {"kind": "ollama", "base_url": box_url}},
            "models": {
                "routes": {
                    "llama": {"backend": "box", "upstream_model": "llama3"},
                    "idle": {"backend": "box", "upstream_model": "mistral"},
                }
            },
        }
        with run_stella(config) as server:
            running = {m["name"]: m for m in httpx.get(server.url + "/api/ps").json()["models"]}
            assert running["llama:latest"]["context_length"] == CONTEXT
            assert "context_length" not in running["idle:latest"]
            assert "context_length" not in running["echo:latest"]
            assert client(server).ps().models  # the official client reads it

            def info(model: str) -> dict:
                r = httpx.post(server.url + "/api/show", json={"model": model})
                assert r.status_code == 200, r.text
                return r.json()["model_info"]

            shown = info("llama")
            assert shown["general.architecture"] == "ollama"
            assert shown["ollama.context_length"] == CONTEXT
            assert client(server).show("llama").modelinfo["ollama.context_length"] == CONTEXT
            for model in ("idle", "echo"):
                assert not any(k.endswith(".context_length") for k in info(model)), model
            # A name past the limit every other route has is refused, not quoted back.
            r = httpx.post(server.url + "/api/show", json={"model": "m" * 5000})
            assert r.status_code == 400 and len(r.text) < 300, r.text
            assert r.json()["error"] == "$.model: over 256 characters"


def test_tool_calls(stella: LiveServer) -> None:
    tools = [
        {
            "type": "function",
            "function": {"name": "lookup", "description": "", "parameters": {"type": "object"}},
        }
    ]
    r = client(stella).chat(
        model="echo", messages=[{"role": "user", "content": "Rome"}], tools=tools
    )
    call = r.message.tool_calls[0]
    assert call.function.name == "lookup" and call.function.arguments == {"input": "Rome"}


def test_tool_calls_carry_their_ids_as_ollama_s_do(stella: LiveServer) -> None:
    # Ollama names each call (`id`) and numbers it (`function.index`); a client's tool
    # result names the call it answers by that id.
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    body = {"model": "echo", "messages": [{"role": "user", "content": "Rome"}], "tools": tools}
    whole = httpx.post(stella.url + "/api/chat", json={**body, "stream": False}).json()
    lines = [
        json.loads(line)
        for line in httpx.post(stella.url + "/api/chat", json=body).text.splitlines()
    ]
    streamed = [c for line in lines for c in line["message"].get("tool_calls", ())]
    for calls in (whole["message"]["tool_calls"], streamed):
        assert len(calls) == 1, calls
        assert calls[0]["id"].startswith("call_"), calls
        assert calls[0]["function"] == {
            "index": 0,
            "name": "lookup",
            "arguments": {"input": "Rome"},
        }


def test_tool_results_name_their_calls_by_id_to_every_upstream() -> None:
    # A client that sends the calls' ids and each result's tool_call_id (results here in
    # another order than the calls, both of one tool) has its results linked by them:
    # the same ids reach an Ollama upstream, and an OpenAI-compatible one, which the
    # name alone would have linked in order.
    from tests.fakes.ollama import FakeOllama
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    oai, oll = FakeOpenAI(), FakeOllama()
    history = [
        {"role": "user", "content": "weather in paris and rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_p", "function": {"name": "weather", "arguments": {"city": "Paris"}}},
                {"id": "call_r", "function": {"name": "weather", "arguments": {"city": "Rome"}}},
            ],
        },
        {"role": "tool", "content": "rainy", "tool_name": "weather", "tool_call_id": "call_r"},
        {"role": "tool", "content": "sunny", "tool_name": "weather", "tool_call_id": "call_p"},
    ]
    with serve(oai.app) as oai_url, serve(oll.app) as oll_url:
        config = {
            "backends": {
                "oai": {"kind": "openai", "base_url": oai_url + "/v1"},
                "oll": {"kind": "ollama", "base_url": oll_url},
            },
            "models": {
                "routes": {
                    "via-openai": {"backend": "oai", "upstream_model": "ok", "retries": 0},
                    "via-ollama": {"backend": "oll", "upstream_model": "llama3", "retries": 0},
                }
            },
        }
        with run_stella(config) as server:
            for model in ("via-openai", "via-ollama"):
                body = {"model": model, "messages": history, "stream": False}
                r = httpx.post(server.url + "/api/chat", json=body)
                assert r.status_code == 200 and r.json()["done"], (model, r.text)
    sent = oai.requests[-1]["messages"]
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_p", "call_r"]
    assert [(m["tool_call_id"], m["content"]) for m in sent[2:]] == [
        ("call_r", "rainy"),
        ("call_p", "sunny"),
    ]
    sent = oll.requests[-1]["messages"]
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_p", "call_r"]
    assert [(m["tool_call_id"], m["content"]) for m in sent[2:]] == [
        ("call_r", "rainy"),
        ("call_p", "sunny"),
    ]


def test_models_are_listed_tagged_and_answer_by_that_name() -> None:
    # Ollama lists every model as name:tag; Open WebUI completes a bare name with
    # ":latest" and looks it up in /api/tags (its unload failed: "model not found").
    config = {
        "models": {
            "routes": {
                "coder:7b": {"backend": "echo"},  # tagged already: listed as is
                "plain": {"backend": "echo"},
                # "plain:latest" is another route's alias: "plain" stays bare, so no name
                # in the list leads somewhere else.
                "other": {"backend": "echo", "aliases": ["plain:latest"]},
            }
        }
    }
    with run_stella(config) as server:
        c = client(server)
        listed = {m.model for m in c.list().models}
        assert {"echo:latest", "coder:7b", "plain", "other:latest"} <= listed, listed
        for path in ("/api/tags", "/api/ps"):  # `name` too (the client reads `model`)
            entries = httpx.get(server.url + path).json()["models"]
            assert all(m["name"] == m["model"] for m in entries), entries
        assert "echo:latest" in {m.model for m in c.ps().models}
        hi = [{"role": "user", "content": "hi"}]
        # Every endpoint takes the listed name, and answers with the name the client used.
        for name in ("echo:latest", "echo", "coder:7b"):
            assert c.chat(model=name, messages=hi).model == name
            assert {p.model for p in c.chat(model=name, messages=hi, stream=True)} == {name}
            assert c.generate(model=name, prompt="hi").model == name
            assert {p.model for p in c.generate(model=name, prompt="x", stream=True)} == {name}
            assert c.show(name).details.family == "echo"
            assert c.generate(model=name).done_reason == "load"
            assert c.chat(model=name).model == name
            unloaded = c.generate(model=name, keep_alive=0)
            assert unloaded.done_reason == "unload" and unloaded.model == name
        assert c.chat(model="plain", messages=hi).model == "plain"
        # An alias answers as its route, as in every dialect.
        assert c.chat(model="plain:latest", messages=hi).model == "other"


def test_errors_are_response_errors(stella: LiveServer) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client(stella).chat(model="no-such", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404 and "no-such" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client(stella).show("no-such")
    assert info.value.status_code == 404


def test_error_mid_stream_is_a_last_line(stella: LiveServer) -> None:
    r = httpx.post(
        stella.url + "/api/chat",
        json={"model": "echo-fail-after", "messages": [{"role": "user", "content": "a b c d e"}]},
    )
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines[-1] == {"error": "echo: failing after 3 tokens, as configured"}
    assert sum("message" in x for x in lines) == 3


async def test_disconnect_cancels_and_logs_ollama(stella: LiveServer) -> None:
    body = {"model": "echo-slow", "messages": [{"role": "user", "content": " ".join(["w"] * 100)}]}
    async with httpx.AsyncClient(timeout=10) as c:
        async with c.stream("POST", stella.url + "/api/chat", json=body) as r:
            rid = r.headers["x-request-id"]
            async for _ in r.aiter_lines():
                break
    ev = await asyncio.to_thread(stella.wait_event, lambda e: e["request_id"] == rid)
    assert ev["api"] == "ollama" and ev["finish_reason"] == "client_closed"


def test_latest_tags_and_null_content(stella: LiveServer) -> None:
    # Names copied from an Ollama server carry ":latest"; Ollama reads a null content as "".
    r = client(stella).chat(model="echo:latest", messages=[{"role": "user", "content": "hi"}])
    assert r.message.content == "hi"
    assert client(stella).show("echo:latest").modelinfo["stella.backend"] == "echo"
    body = {
        "model": "echo",
        "stream": False,
        "messages": [{"role": "system", "content": None}, {"role": "user", "content": "yo"}],
    }
    r2 = httpx.post(stella.url + "/api/chat", json=body)
    assert r2.status_code == 200 and r2.json()["message"]["content"] == "yo"
    # So does a null `stream` (true), `prompt` ("": a load) and `raw` (false).
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b"}], "stream": None}
    with httpx.stream("POST", stella.url + "/api/chat", json=body) as r3:
        lines = [json.loads(line) for line in r3.iter_lines() if line]
    assert r3.status_code == 200 and len(lines) > 1 and lines[-1]["done"], lines
    r4 = httpx.post(stella.url + "/api/generate", json={"model": "echo", "prompt": None})
    assert r4.status_code == 200 and r4.json()["done_reason"] == "load", r4.text
    body = {"model": "echo", "prompt": "z", "raw": None, "stream": False}
    r5 = httpx.post(stella.url + "/api/generate", json=body)
    assert r5.status_code == 200 and r5.json()["response"] == "z", r5.text


def test_empty_requests_load_or_unload(stella: LiveServer) -> None:
    # Ollama's preload (no messages, no prompt) and `ollama stop` (keep_alive 0); a remote
    # or echo backend has nothing to load or free, and says which was asked.
    r = httpx.post(stella.url + "/api/chat", json={"model": "echo", "messages": []})
    assert r.json()["done_reason"] == "load" and r.json()["model"] == "echo"
    for keep_alive in (0, "0", "0s", "0m", "0m0s", "0h0m0.0s", "0ms"):
        r = httpx.post(
            stella.url + "/api/generate", json={"model": "echo", "keep_alive": keep_alive}
        )
        assert r.json()["done_reason"] == "unload", keep_alive
    for keep_alive in ("5m", "1h0m", "0.5s", -1, "-1"):
        body = {"model": "echo", "keep_alive": keep_alive}
        r = httpx.post(stella.url + "/api/generate", json=body)
        assert r.json()["done_reason"] == "load", keep_alive
    out = client(stella).generate(model="echo", prompt="", keep_alive=0)
    assert out.done_reason == "unload"


def test_a_think_ollama_refuses_is_a_400_naming_what_it_takes(stella: LiveServer) -> None:
    # Worded as stella's other 400s (`$.field: ...`), not in msgspec's words.
    takes = '$.think: expected true, false or an effort ("high", "medium", "low", "max")'
    hi = [{"role": "user", "content": "hi"}]
    for think, shown in (("extreme", '"extreme"'), (5, "5"), ("High", '"High"'), ([], "[]")):
        for path, body in (("/api/chat", {"messages": hi}), ("/api/generate", {"prompt": "hi"})):
            r = httpx.post(stella.url + path, json={"model": "echo", "think": think, **body})
            assert r.status_code == 400, r.text
            assert r.json() == {"error": f"{takes}, got {shown}"}, (path, think)
    # After a UTF-8 byte-order mark, which the body's decode ignores, the same.
    body = json.dumps({"model": "echo", "think": "extreme", "messages": hi}).encode()
    r = httpx.post(stella.url + "/api/chat", content=b"\xef\xbb\xbf" + body)
    assert r.json() == {"error": f'{takes}, got "extreme"'}, r.text


def test_only_an_admin_key_unloads() -> None:
    user, admin = "sk-ollama-user-1", "sk-ollama-admin-1"
    config = {"auth": {"keys": {"u": {"sha256": hashlib.sha256(user.encode()).hexdigest()}}}}
    with run_stella(config, {"STELLA_API_KEYS": f"ops={admin}"}) as server:
        body = {"model": "echo", "keep_alive": 0}
        r = httpx.post(server.url + "/api/generate", json=body, headers={"X-API-Key": user})
        assert r.status_code == 403 and "admin" in r.json()["error"]
        r = httpx.post(server.url + "/api/generate", json=body, headers={"X-API-Key": admin})
        assert r.status_code == 200 and r.json()["done_reason"] == "unload"
        r = httpx.post(
            server.url + "/api/generate", json={"model": "echo"}, headers={"X-API-Key": user}
        )
        assert r.json()["done_reason"] == "load"  # loading is what any request does


def test_an_admin_only_key_unloads_any_model_it_may_not_use() -> None:
    # An admin key administers every route: `models = []` keeps it from chatting, not
    # from an unload; a key limited to other models is refused for not being an admin.
    ops, user = "sk-ollama-ops-only-1", "sk-ollama-user-other-1"

    def key(secret: str, **fields: object) -> dict[str, object]:
        return {"sha256": hashlib.sha256(secret.encode()).hexdigest(), **fields}

    keys = {"ops": key(ops, models=[], admin=True), "u": key(user, models=["other*"])}
    with run_stella({"auth": {"keys": keys}}) as server:
        for path, body in (
            ("/api/generate", {"model": "echo", "keep_alive": 0}),
            ("/api/chat", {"model": "echo", "messages": [], "keep_alive": "0s"}),
        ):
            r = httpx.post(server.url + path, json=body, headers={"X-API-Key": ops})
            assert r.status_code == 200, (path, r.text)
            assert r.json()["done_reason"] == "unload" and r.json()["model"] == "echo"
            r = httpx.post(server.url + path, json=body, headers={"X-API-Key": user})
            assert r.status_code == 403, (path, r.text)
            assert r.json() == {"error": "unloading a model needs an admin key"}
            # A load is a use of the model: the admin-only key may not.
            load = {k: v for k, v in body.items() if k != "keep_alive"}
            r = httpx.post(server.url + path, json=load, headers={"X-API-Key": ops})
            assert r.status_code == 403, (path, r.text)
            assert r.json() == {"error": "this key may not use model 'echo'"}
        hi = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(server.url + "/api/chat", json=hi, headers={"X-API-Key": ops})
        assert r.status_code == 403


def test_pings_are_empty_pieces_every_client_reads() -> None:
    config = {
        "backends": {"sleepy": {"kind": "echo", "delay_s": 0.4}},
        "models": {"routes": {"echo-sleepy": {"backend": "sleepy"}}},
        "stream": {"ping_interval_s": 0.1},
    }
    with run_stella(config) as server:
        body = {"model": "echo-sleepy", "messages": [{"role": "user", "content": "a b"}]}
        r = httpx.post(server.url + "/api/chat", json=body, timeout=30)
        lines = [json.loads(line) for line in r.text.splitlines()]  # every line is JSON
        pings = [x for x in lines if not x["done"] and x["message"]["content"] == ""]
        assert len(pings) >= 2, lines
        assert all(
            p["model"] == "echo-sleepy" and p["message"]["role"] == "assistant" for p in pings
        )
        assert "".join(x["message"]["content"] for x in lines) == "a b" and lines[-1]["done"]
        stamps = [x["created_at"] for x in lines]  # each line made when sent
        assert stamps == sorted(stamps) and len({p["created_at"] for p in pings}) == len(pings)
        c = ollama.Client(host=server.url)
        parts = list(c.chat(model="echo-sleepy", messages=body["messages"], stream=True))
        assert "".join(p.message.content for p in parts) == "a b"


def test_tool_results_reach_id_linked_upstreams_linked() -> None:
    # Ollama's clients send calls without ids and results with only the tool's name;
    # OpenAI and Anthropic refuse a history whose results answer no call by id (the
    # fakes answer 400 as they do).
    from tests.fakes.anthropic import KEY, FakeAnthropic
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    oai, claude = FakeOpenAI(), FakeAnthropic()
    history = [
        {"role": "user", "content": "weather in paris and rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "time", "arguments": {"city": "Paris"}}},
                {"function": {"name": "weather", "arguments": {"city": "Rome"}}},
            ],
        },
        {"role": "tool", "content": "12:00", "tool_name": "time"},
        {"role": "tool", "content": "sunny", "tool_name": "weather"},
        {"role": "tool", "content": "rainy", "tool_name": "weather"},
    ]
    with serve(oai.app) as oai_url, serve(claude.app) as claude_url:
        config = {
            "backends": {
                "oai": {"kind": "openai", "base_url": oai_url + "/v1"},
                "claude": {"kind": "anthropic", "base_url": claude_url, "api_key_env": "CLAUDE"},
            },
            "models": {
                "routes": {
                    "via-openai": {"backend": "oai", "upstream_model": "ok", "retries": 0},
                    "via-claude": {
                        "backend": "claude",
                        "upstream_model": "claude-ok",
                        "retries": 0,
                    },
                }
            },
        }
        with run_stella(config, env={"CLAUDE": KEY}) as server:
            c = client(server)
            for model in ("via-openai", "via-claude"):
                r = c.chat(model=model, messages=history, stream=False)
                assert r.done and r.message.content, (model, r)
    sent = oai.requests[-1]["messages"]
    ids = [c["id"] for c in sent[1]["tool_calls"]]
    assert len(set(ids)) == 3 and all(ids)
    # Each result answers its own tool's call, in order.
    assert [m["tool_call_id"] for m in sent[2:]] == [ids[1], ids[0], ids[2]]
    blocks = claude.requests[-1]["messages"]
    uses = [b["id"] for b in blocks[1]["content"] if b["type"] == "tool_use"]
    results = [b["tool_use_id"] for b in blocks[2]["content"]]
    assert results == [uses[1], uses[0], uses[2]]


def test_prompt_eval_duration_leaves_out_the_wait_for_a_slot() -> None:
    # Ollama's clients divide prompt_eval_count by prompt_eval_duration ("prompt eval
    # rate"): time spent queued behind another call is not the prompt's processing.
    config = {
        "backends": {"slow": {"kind": "echo", "delay_s": 0.5}},
        "models": {"routes": {"slow": {"backend": "slow"}}},
        "limits": {"backends": {"slow": 1}},
    }
    with run_stella(config) as server:

        async def both() -> list[dict]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
                body = {
                    "model": "slow",
                    "stream": False,
                    "messages": [{"role": "user", "content": "a b"}],
                }
                first = asyncio.create_task(c.post("/api/chat", json=body))
                await asyncio.sleep(0.1)  # the second waits ~0.9 s for the first's slot
                second = await c.post("/api/chat", json=body)
                return [(await first).json(), second.json()]

        _, queued = asyncio.run(both())
    # The first token comes after one 0.5 s delay, whatever the wait before it (~1.4 s
    # counted with it).
    assert queued["prompt_eval_duration"] < 0.9e9, queued
    assert queued["total_duration"] > 1.5e9, queued  # the wait is in the total
    assert queued["eval_duration"] < 0.9e9, queued  # the second token's 0.5 s


def test_a_keep_alive_past_any_date_expires_never_not_a_500() -> None:
    # `keep_alive_s = 1e12`, meant as forever, puts the unload past year 9999: /api/ps
    # says never, as Ollama writes it, where a date would not fit.
    import math
    import time

    from stella.api.ollama import expiry

    never = expiry(math.inf)
    # Go's largest duration from now, some 292 years, as Ollama writes "never".
    assert int(never[:4]) - time.gmtime().tm_year in (292, 293)
    assert expiry(time.time() + 1e12)[:4] == never[:4]
    assert expiry(None) == "0001-01-01T00:00:00Z"
