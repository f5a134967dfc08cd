// Parser and client tests for stella.js, with node's own test runner: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { parseNdjson, chat, models, embed, StellaError } from "../../stella/static/stella.js";

function streamOf(chunks) {
  return new ReadableStream({
    start(controller) {
      for (const c of chunks) controller.enqueue(typeof c === "string" ? new TextEncoder().encode(c) : c);
      controller.close();
    },
  });
}

async function collect(iter) {
  const out = [];
  for await (const x of iter) out.push(x);
  return out;
}

test("lines split across chunks", async () => {
  const events = await collect(parseNdjson(streamOf(['{"type":"st', 'art"}\n{"type":"delta",', '"text":"a"}\n', '{"type":"done"}'])));
  assert.deepEqual(events, [{ type: "start" }, { type: "delta", text: "a" }, { type: "done" }]);
});

test("multi-byte UTF-8 split across chunks", async () => {
  const bytes = new TextEncoder().encode('{"type":"delta","text":"héllo 👋 日本"}\n');
  const cut1 = 27; // inside "é"... and the emoji below
  const chunks = [bytes.slice(0, cut1), bytes.slice(cut1, cut1 + 5), bytes.slice(cut1 + 5, cut1 + 9), bytes.slice(cut1 + 9)];
  const events = await collect(parseNdjson(streamOf(chunks)));
  assert.equal(events[0].text, "héllo 👋 日本");
});

test("blank lines are skipped", async () => {
  const events = await collect(parseNdjson(streamOf(['\n{"a":1}\n\n', '{"b":2}\n'])));
  assert.deepEqual(events, [{ a: 1 }, { b: 2 }]);
});

function fakeFetch(lines, { status = 200, headers = {} } = {}) {
  return async (url, init) => {
    const body = streamOf(lines);
    return new Response(status === 200 ? body : JSON.stringify({ error: { code: "rate_limited", message: "slow down", request_id: "r1" } }),
      { status, headers: { "X-Request-ID": "req_1", ...headers } });
  };
}

test("an in-band error line throws a typed error after the deltas", async () => {
  const got = [];
  const iter = chat({ messages: [] }, { fetch: fakeFetch(['{"type":"start","id":"req_1"}\n', '{"type":"delta","text":"x"}\n',
    '{"type":"ping"}\n', '{"type":"error","code":"upstream_timeout","message":"slow","retryable":true}\n']) });
  await assert.rejects(async () => { for await (const e of iter) got.push(e.type); }, (err) => {
    assert.ok(err instanceof StellaError);
    assert.equal(err.code, "upstream_timeout");
    assert.equal(err.retryable, true);
    return true;
  });
  assert.deepEqual(got, ["start", "delta"]);
});

test("an HTTP error throws with status, code and retry-after", async () => {
  await assert.rejects(() => collect(chat({ messages: [] }, { fetch: fakeFetch([], { status: 429, headers: { "Retry-After": "7" } }) })),
    (err) => err instanceof StellaError && err.status === 429 && err.code === "rate_limited" && err.retryAfter === 7 && err.requestId === "r1");
});

test("abort ends the stream and closes the connection", async () => {
  let closed = false;
  let sent = 0;
  const server = http.createServer((req, res) => {
    res.writeHead(200, { "Content-Type": "application/x-ndjson" });
    res.write('{"type":"start","id":"x"}\n');
    const timer = setInterval(() => { sent++; res.write('{"type":"delta","text":"t"}\n'); }, 10);
    req.on("close", () => { closed = true; clearInterval(timer); });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address();
  const controller = new AbortController();
  const seen = [];
  for await (const event of chat({ messages: [{ role: "user", content: "hi" }] }, { baseUrl: `http://127.0.0.1:${port}`, signal: controller.signal })) {
    seen.push(event.type);
    if (seen.length === 3) controller.abort();
  }
  assert.deepEqual(seen.slice(0, 3), ["start", "delta", "delta"]);
  for (let i = 0; i < 50 && !closed; i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(closed, "the server saw the connection close");
  server.close();
});

test("models() returns the listing and throws on 401", async () => {
  const ok = await models({ fetch: async () => new Response('{"models":[],"default":"echo"}', { status: 200 }) });
  assert.equal(ok.default, "echo");
  await assert.rejects(() => models({ fetch: async () => new Response('{"error":{"code":"unauthorized","message":"key"}}', { status: 401 }) }),
    (err) => err.status === 401 && err.code === "unauthorized");
});

test("embed() posts the native request and returns its answer; errors are StellaErrors", async () => {
  let url, init;
  const answer = { model: "m", embeddings: [[0.6, 0.8]], usage: { prompt_tokens: 1, total_tokens: 1 } };
  const capture = async (u, i) => { url = u; init = i; return new Response(JSON.stringify(answer), { status: 200 }); };
  const got = await embed({ input: "hi", model: "m", dimensions: 2 }, { fetch: capture, baseUrl: "http://h:1", apiKey: "sk-k" });
  assert.deepEqual(got, answer);
  assert.equal(url, "http://h:1/api/v1/embed");
  assert.equal(init.method, "POST");
  assert.deepEqual(JSON.parse(init.body), { input: "hi", model: "m", dimensions: 2 });
  assert.equal(init.headers.Authorization, "Bearer sk-k");
  assert.equal(init.headers.Accept, "application/json");
  // Only what was given: the server's defaults stand for the rest.
  await embed({ input: ["a", "b"] }, { fetch: capture });
  assert.deepEqual(JSON.parse(init.body), { input: ["a", "b"] });
  const refusal = '{"error":{"code":"not_supported","message":"no embeddings","retryable":false}}';
  await assert.rejects(() => embed({ input: "x" }, { fetch: async () => new Response(refusal, { status: 400 }) }),
    (err) => err instanceof StellaError && err.status === 400 && err.code === "not_supported" && err.retryable === false);
  // A signal's timeout is `timeout`, as for a stream.
  const timedOut = AbortSignal.abort(new DOMException("too slow", "TimeoutError"));
  const slow = async (u, i) => { if (i.signal.aborted) throw i.signal.reason; return new Response("{}"); };
  await assert.rejects(() => embed({ input: "x" }, { fetch: slow, signal: timedOut }),
    (err) => err instanceof StellaError && err.code === "timeout");
});

test("an error body's retryable wins over the status's guess", async () => {
  const body = '{"error":{"code":"upstream_rejected","message":"no","retryable":false}}';
  await assert.rejects(() => models({ fetch: async () => new Response(body, { status: 502 }) }),
    (err) => err.status === 502 && err.code === "upstream_rejected" && err.retryable === false);
  const plain = '{"error":{"code":"upstream_error","message":"no"}}';
  await assert.rejects(() => models({ fetch: async () => new Response(plain, { status: 502 }) }),
    (err) => err.retryable === true);
});

test("chat() sends tools and toolChoice as the native request has them", async () => {
  let sent;
  const capture = async (url, init) => {
    sent = JSON.parse(init.body);
    return new Response(streamOf(['{"type":"start","id":"r"}\n', '{"type":"done","finish_reason":"stop"}\n']), { status: 200 });
  };
  const tools = [{ function: { name: "lookup" } }];
  for await (const _ of chat({ messages: [], tools, toolChoice: "none" }, { fetch: capture })) { /* drain */ }
  assert.deepEqual(sent.tools, tools);
  assert.equal(sent.tool_choice, "none");
  assert.equal("parallel_tool_calls" in sent, false); // unset stays unset
  for await (const _ of chat({ messages: [], tools, parallelToolCalls: false }, { fetch: capture })) { /* drain */ }
  assert.equal(sent.parallel_tool_calls, false);
});

async function listen(handler) {
  const server = http.createServer(handler);
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { server, baseUrl: `http://127.0.0.1:${server.address().port}` };
}

function slowStream(state) {
  return (req, res) => {
    res.writeHead(200, { "Content-Type": "application/x-ndjson" });
    res.write('{"type":"start","id":"x"}\n');
    const timer = setInterval(() => res.write('{"type":"delta","text":"t"}\n'), 10);
    req.on("close", () => { state.closed = true; clearInterval(timer); });
  };
}

test("leaving the loop early (break) closes the connection", async () => {
  const state = { closed: false };
  const { server, baseUrl } = await listen(slowStream(state));
  for await (const event of chat({ messages: [] }, { baseUrl })) {
    if (event.type === "delta") break;
  }
  for (let i = 0; i < 50 && !state.closed; i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(state.closed, "break must cancel the request, not leave it running");
  server.close();
});

test("a signal that times out throws code timeout, not a quiet end", async () => {
  const state = { closed: false };
  const { server, baseUrl } = await listen((req, res) => {
    res.writeHead(200, { "Content-Type": "application/x-ndjson" });
    res.write('{"type":"start","id":"x"}\n'); // then silence
    req.on("close", () => { state.closed = true; });
  });
  await assert.rejects(() => collect(chat({ messages: [] }, { baseUrl, signal: AbortSignal.timeout(200) })),
    (err) => err instanceof StellaError && err.code === "timeout");
  server.close();
});

test("a stream that ends without done or error throws network_error", async () => {
  const fetch = fakeFetch(['{"type":"start","id":"r"}\n', '{"type":"delta","text":"partial"}\n']);
  await assert.rejects(() => collect(chat({ messages: [] }, { fetch })),
    (err) => err instanceof StellaError && err.code === "network_error" && err.requestId === "req_1");
});

test("a connection dropped mid-stream and a server that is down are StellaErrors", async () => {
  const { server, baseUrl } = await listen((req, res) => {
    res.writeHead(200, { "Content-Type": "application/x-ndjson" });
    res.write('{"type":"start","id":"x"}\n');
    setTimeout(() => res.socket.destroy(), 50);
  });
  await assert.rejects(() => collect(chat({ messages: [] }, { baseUrl })),
    (err) => err instanceof StellaError && err.code === "network_error");
  server.close();
  const down = { fetch: async () => { throw new TypeError("fetch failed"); } };
  await assert.rejects(() => models(down), (err) => err instanceof StellaError && err.code === "network_error");
  await assert.rejects(() => models({ fetch: async () => new Response("<html>proxy</html>", { status: 200 }) }),
    (err) => err instanceof StellaError && err.code === "bad_response");
});

test("in-band errors have status 0; Retry-After as an HTTP date is seconds", async () => {
  const inband = fakeFetch(['{"type":"start","id":"r"}\n', '{"type":"error","code":"upstream_error","message":"m"}\n']);
  await assert.rejects(() => collect(chat({ messages: [] }, { fetch: inband })),
    (err) => err.status === 0 && err.code === "upstream_error" && err.retryAfter === null);
  // A stream's status went out before the backend was asked: the line says when to come back.
  const waited = fakeFetch(['{"type":"start","id":"r"}\n',
    '{"type":"error","code":"upstream_rate_limited","message":"m","retryable":true,"retry_after":30}\n']);
  await assert.rejects(() => collect(chat({ messages: [] }, { fetch: waited })),
    (err) => err.status === 0 && err.retryable === true && err.retryAfter === 30);
  const when = new Date(Date.now() + 30_000).toUTCString();
  const dated = fakeFetch([], { status: 429, headers: { "Retry-After": when } });
  await assert.rejects(() => collect(chat({ messages: [] }, { fetch: dated })),
    (err) => err.retryAfter >= 28 && err.retryAfter <= 31);
  const junk = fakeFetch([], { status: 429, headers: { "Retry-After": "soon" } });
  await assert.rejects(() => collect(chat({ messages: [] }, { fetch: junk })), (err) => err.retryAfter === null);
});

test("chat() takes the protocol's own field names too (tool_choice, response_format)", async () => {
  let sent;
  const capture = async (url, init) => {
    sent = JSON.parse(init.body);
    return new Response(streamOf(['{"type":"start","id":"r"}\n', '{"type":"done","finish_reason":"stop"}\n']), { status: 200 });
  };
  const format = { type: "json_object" };
  for await (const _ of chat({ messages: [], tools: [], tool_choice: "none", parallel_tool_calls: true, response_format: format }, { fetch: capture })) { /* drain */ }
  assert.equal(sent.tool_choice, "none");
  assert.equal(sent.parallel_tool_calls, true);
  assert.deepEqual(sent.response_format, format);
});

test("a line that is not an event is bad_response; unknown event types are skipped", async () => {
  const odd = fakeFetch(['{"foo":1}\n', '{"type":"done","finish_reason":"stop"}\n']);
  await assert.rejects(() => collect(chat({ messages: [] }, { fetch: odd })),
    (err) => err instanceof StellaError && err.code === "bad_response");
  const newer = fakeFetch(['{"type":"start","id":"r"}\n', '{"type":"usage_hint","n":1}\n', '{"type":"done","finish_reason":"stop"}\n']);
  const events = await collect(chat({ messages: [] }, { fetch: newer }));
  assert.deepEqual(events.map((e) => e.type), ["start", "done"]);
});

test("a line cut off by a broken connection is network_error, not bad_response", async () => {
  const { server, baseUrl } = await listen((req, res) => {
    res.writeHead(200, { "Content-Type": "application/x-ndjson" });
    res.write('{"type":"start","id":"r"}\n{"type":"delta","text":"a"}\n{"type":"del');
    setTimeout(() => res.socket.destroy(), 50);
  });
  await assert.rejects(() => collect(chat({ messages: [] }, { baseUrl })),
    (err) => err instanceof StellaError && err.code === "network_error");
  server.close();
});

test("a whole answer that is not stella's, even without a newline, is bad_response", async () => {
  for (const body of ["<!doctype html><html></html>", '{"type":"start","id":"r"}\n{"type":"del']) {
    await assert.rejects(() => collect(chat({ messages: [] }, { fetch: fakeFetch([body]) })),
      (err) => err instanceof StellaError && err.code === "bad_response", body);
  }
});

test("a baseUrl with a trailing slash works", async () => {
  let url;
  const capture = async (u) => {
    url = u;
    return new Response(streamOf(['{"type":"start","id":"r"}\n', '{"type":"done","finish_reason":"stop"}\n']), { status: 200 });
  };
  await collect(chat({ messages: [] }, { fetch: capture, baseUrl: "http://h:1/" }));
  assert.equal(url, "http://h:1/api/v1/chat");
});

test("a key a header cannot carry is a clear client-side error, and nothing is sent", async () => {
  let sent = 0;
  const fetch = async (url, init) => { sent += 1; new Headers(init.headers); return new Response("{}"); };
  const bad = (err) => err instanceof StellaError && err.code === "invalid_api_key" && err.status === 0
    && err.message.includes("U+200B");
  await assert.rejects(() => collect(chat({ messages: [] }, { fetch, apiKey: "sk-abc\u200b" })), bad);
  await assert.rejects(() => models({ fetch, apiKey: "sk-abc\u200b" }), bad);
  await assert.rejects(() => models({ fetch, apiKey: "sk-abc\r\nX-Evil: 1" }),
    (err) => err instanceof StellaError && err.code === "invalid_api_key" && err.message.includes("U+000D"));
  assert.equal(sent, 0);
});

test("a connection refused is retryable: nothing was sent; a drop after the answer began is not", async () => {
  const { server, baseUrl: refused } = await listen(() => {});
  await new Promise((r) => server.close(r)); // the port is free again: connections are refused
  for (const call of [() => models({ baseUrl: refused }), () => collect(chat({ messages: [] }, { baseUrl: refused }))]) {
    await assert.rejects(call, (err) => err instanceof StellaError && err.code === "network_error" && err.retryable === true
      && /ECONNREFUSED/.test(err.message));
  }
  const dropped = await listen((req, res) => {
    res.writeHead(200, { "Content-Type": "application/x-ndjson" });
    res.write('{"type":"start","id":"x"}\n');
    setTimeout(() => res.socket.destroy(), 50);
  });
  await assert.rejects(() => collect(chat({ messages: [] }, { baseUrl: dropped.baseUrl })),
    (err) => err instanceof StellaError && err.code === "network_error" && err.retryable === false);
  dropped.server.close();
  // A browser's fetch names no cause: it cannot be told from a drop, so it is not retryable.
  const opaque = { fetch: async () => { throw new TypeError("Failed to fetch"); } };
  await assert.rejects(() => models(opaque), (err) => err.code === "network_error" && err.retryable === false);
});

test("a reasoning model's thinking comes in delta events' reasoning, text \"\" when alone", async () => {
  // The protocol's lines as stella sends them from a reasoning model's upstream: reasoning
  // alone, reasoning and the first text in one line, then text alone (no reasoning key).
  const events = await collect(chat({ messages: [] }, { fetch: fakeFetch(['{"type":"start","id":"req_1"}\n',
    '{"type":"delta","text":"","reasoning":"Let me think."}\n', '{"type":"delta","text":"Blue","reasoning":" Done."}\n',
    '{"type":"delta","text":" light."}\n', '{"type":"done","finish_reason":"stop"}\n']) }));
  const deltas = events.filter((e) => e.type === "delta");
  assert.deepEqual(deltas.map((e) => e.reasoning ?? null), ["Let me think.", " Done.", null]);
  assert.equal(deltas.map((e) => e.text).join(""), "Blue light."); // a reader of text alone: the answer
  assert.equal(events.at(-1).type, "done");
});

test("a redirect is bad_response and nothing goes on to where it points", async () => {
  const followed = [];
  const { server: elsewhere, baseUrl: there } = await listen((req, res) => {
    followed.push(req.url);
    res.writeHead(200, { "Content-Type": "application/json" });
    res.end(req.url === "/api/v1/chat" ? '{"type":"start","id":"x"}\n{"type":"done"}\n' : '{"models":[],"default":"m"}');
  });
  const { server, baseUrl } = await listen((req, res) => {
    req.resume();
    res.writeHead(308, { Location: there + req.url, "X-Request-ID": "req_r" });
    res.end("moved");
  });
  try {
    const isRedirect = (err) => {
      assert.ok(err instanceof StellaError);
      assert.equal(err.code, "bad_response");
      assert.equal(err.status, 308);
      assert.equal(err.requestId, "req_r");
      assert.match(err.message, /308 Permanent Redirect, a redirect to http:\/\/127\.0\.0\.1:\d+\/api\/v1\/\w+; stella\.js follows none/);
      return true;
    };
    await assert.rejects(() => collect(chat({ messages: [{ role: "user", content: "secret" }] }, { baseUrl, apiKey: "sk-k" })), isRedirect);
    await assert.rejects(() => models({ baseUrl }), isRedirect);
    await assert.rejects(() => embed({ input: "x" }, { baseUrl }), isRedirect);
    assert.deepEqual(followed, []);
    // A browser's manual redirect: an opaqueredirect, status 0 and no Location to show.
    let init;
    const opaque = async (u, i) => {
      init = i;
      const res = new Response(null, { status: 200 });
      Object.defineProperty(res, "type", { value: "opaqueredirect" });
      Object.defineProperty(res, "status", { value: 0 });
      return res;
    };
    await assert.rejects(() => collect(chat({ messages: [] }, { fetch: opaque })),
      (err) => err instanceof StellaError && err.code === "bad_response" && err.status === 0 && /a redirect; stella\.js follows none/.test(err.message));
    assert.equal(init.redirect, "manual");
    await assert.rejects(() => models({ fetch: opaque }), (err) => err.code === "bad_response");
    assert.equal(init.redirect, "manual");
  } finally {
    server.close();
    elsewhere.close();
  }
});
