// stella.js: a dependency-free client for stella's native NDJSON API.
//
//   import { chat } from "/static/stella.js";
//   for await (const event of chat({ model, messages }, { signal, apiKey })) {
//     if (event.type === "delta") output.textContent += event.text;
//   }
//
// Events are the protocol's lines: start, delta, tool_call, done ({type: "ping"} lines
// are skipped). An HTTP error or an in-band `error` line throws a StellaError; aborting
// the AbortSignal cancels the request (the server stops generating) and ends the loop.

/** An error from stella: an HTTP status before the stream, or an in-band error line. */
export class StellaError extends Error {
  constructor({ status = 0, code = "error", message = "", retryAfter = null, requestId = "", retryable = false } = {}) {
    super(message || code);
    this.name = "StellaError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter; // seconds, from Retry-After, or null
    this.requestId = requestId;
    this.retryable = retryable;
  }
}

/**
 * Parse NDJSON from a ReadableStream of bytes, one object per line.
 * Lines split across chunks and multi-byte UTF-8 split across chunks are both handled.
 */
export async function* parseNdjson(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (line) yield JSON.parse(line);
      }
    }
    buffer += decoder.decode();
    if (buffer.trim()) yield JSON.parse(buffer);
  } finally {
    reader.releaseLock();
  }
}

function headersFor(apiKey) {
  const headers = { "Content-Type": "application/json", Accept: "application/x-ndjson" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  return headers;
}

async function httpError(res) {
  let code = "http_" + res.status;
  let message = res.statusText || `HTTP ${res.status}`;
  let requestId = res.headers.get("X-Request-ID") || "";
  try {
    const body = await res.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
      requestId = body.error.request_id || requestId;
    }
  } catch {
    // not JSON: keep the status line
  }
  const retry = res.headers.get("Retry-After");
  return new StellaError({
    status: res.status,
    code,
    message,
    requestId,
    retryAfter: retry === null ? null : Number(retry),
    retryable: res.status === 429 || res.status >= 500,
  });
}

function isAbort(err, signal) {
  return (signal && signal.aborted) || (err && err.name === "AbortError");
}

async function* streamEvents(path, body, { signal, apiKey, baseUrl = "", fetch: fetchImpl = globalThis.fetch } = {}) {
  let res;
  try {
    res = await fetchImpl(baseUrl + path, {
      method: "POST",
      headers: headersFor(apiKey),
      body: JSON.stringify({ ...body, stream: true }),
      signal,
    });
  } catch (err) {
    if (isAbort(err, signal)) return;
    throw new StellaError({ code: "network_error", message: String(err && err.message || err) });
  }
  if (!res.ok) throw await httpError(res);
  const requestId = res.headers.get("X-Request-ID") || "";
  try {
    for await (const event of parseNdjson(res.body)) {
      if (event.type === "ping") continue;
      if (event.type === "error") {
        throw new StellaError({ status: res.status, code: event.code, message: event.message,
                                requestId, retryable: !!event.retryable });
      }
      yield event;
    }
  } catch (err) {
    if (isAbort(err, signal)) return; // Stop pressed: the request is cancelled, the loop ends
    throw err;
  }
}

/** Stream a chat: yields start, delta, tool_call and done events. */
export function chat({ model, messages, options, tools, toolChoice, metadata } = {}, opts = {}) {
  const body = { messages };
  if (model) body.model = model;
  if (options) body.options = options;
  if (tools) body.tools = tools;
  if (toolChoice) body.tool_choice = toolChoice;
  if (metadata) body.metadata = metadata;
  return streamEvents("/api/v1/chat", body, opts);
}

/** Stream a completion of one prompt (with an optional system prompt). */
export function generate({ prompt, system, model, options, metadata } = {}, opts = {}) {
  const body = { prompt };
  if (system) body.system = system;
  if (model) body.model = model;
  if (options) body.options = options;
  if (metadata) body.metadata = metadata;
  return streamEvents("/api/v1/generate", body, opts);
}

/** The routable models: {models: [...], default}. */
export async function models({ apiKey, baseUrl = "", signal, fetch: fetchImpl = globalThis.fetch } = {}) {
  const res = await fetchImpl(baseUrl + "/api/v1/models", { headers: headersFor(apiKey), signal });
  if (!res.ok) throw await httpError(res);
  return res.json();
}
