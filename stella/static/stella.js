// stella.js: a dependency-free client for stella's native NDJSON API.
//
//   import { chat } from "/static/stella.js";
//   for await (const event of chat({ model, messages }, { signal, apiKey })) {
//     if (event.type === "delta") output.textContent += event.text;
//   }
//
// A reasoning model's thinking comes in a delta's `reasoning` (absent when none; `text` is
// "" in a line of reasoning alone, so a caller that reads `text` gets the answer alone):
//     if (event.type === "delta" && event.reasoning) thinking.textContent += event.reasoning;
//
// Events are the protocol's lines: start, delta, tool_call, done ({type: "ping"} lines,
// and types this version does not know, are skipped; a line that is not an event is
// code "bad_response", as is a redirect: stella.js follows none). An HTTP error, an
// in-band `error` line, a broken connection or a stream that ends without its done line
// throws a StellaError. Aborting the AbortSignal (Stop)
// cancels the request (the server stops generating) and ends the loop quietly; a
// signal that times out (AbortSignal.timeout) throws code "timeout". Leaving the loop
// early (break, return, an exception) cancels the request too. An API key an HTTP
// header cannot carry is code "invalid_api_key", and nothing is sent.

/** An error from stella: an HTTP status before the stream, or an in-band error line. */
export class StellaError extends Error {
  constructor({ status = 0, code = "error", message = "", retryAfter = null, requestId = "", retryable = false } = {}) {
    super(message || code);
    this.name = "StellaError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter; // seconds, from Retry-After or an error line's retry_after, or null
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
  let finished = false;
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
    finished = true;
    buffer += decoder.decode();
    // A last line without its newline. The body ended whole (a broken connection makes
    // read() fail instead, a network error): what is left is the server's, and not
    // JSON means not stella's protocol (a proxy's page, say).
    if (buffer.trim()) yield JSON.parse(buffer);
  } finally {
    // Left before the end (break, return, an error): cancel the body, so the connection
    // closes and the server stops generating; releasing the lock alone keeps it open.
    if (!finished) await reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}

// What an HTTP header value may hold: tab, space, visible ASCII, and Latin-1's upper half.
const NOT_IN_HEADER = /[^\t\x20-\x7e\x80-\xff]/u;

/**
 * Why `apiKey` cannot go in an Authorization header ("" when it can): a pasted key may
 * bring a zero-width space or a line break along, and fetch() then fails with a
 * TypeError that reads like a network error.
 */
export function apiKeyProblem(apiKey) {
  const bad = NOT_IN_HEADER.exec(apiKey || "");
  if (!bad) return "";
  const code = bad[0].codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
  return `the API key has U+${code} at position ${bad.index + 1}, which an HTTP header cannot carry`;
}

function headersFor(apiKey) {
  const headers = { "Content-Type": "application/json", Accept: "application/x-ndjson" };
  const problem = apiKeyProblem(apiKey);
  if (problem) throw new StellaError({ code: "invalid_api_key", message: problem });
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  return headers;
}

async function httpError(res) {
  let code = "http_" + res.status;
  let message = res.statusText || `HTTP ${res.status}`;
  let requestId = res.headers.get("X-Request-ID") || "";
  // The server says whether asking again may help; other servers leave it to the status.
  let retryable = res.status === 429 || res.status >= 500;
  try {
    const body = await res.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
      requestId = body.error.request_id || requestId;
      if (typeof body.error.retryable === "boolean") retryable = body.error.retryable;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new StellaError({
    status: res.status,
    code,
    message,
    requestId,
    retryAfter: retryAfter(res.headers.get("Retry-After")),
    retryable,
  });
}

/** Retry-After in seconds: a number of seconds or an HTTP date; null when absent or unreadable. */
function retryAfter(value) {
  if (value === null || value.trim() === "") return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const at = Date.parse(value);
  return Number.isNaN(at) ? null : Math.max(0, Math.ceil((at - Date.now()) / 1000));
}

/**
 * What an exception means when a signal may have ended the request: null for a Stop
 * (the caller's abort: the loop ends quietly), a StellaError for a timeout or a
 * failure, undefined when it is not about the signal at all.
 */
function whenAborted(err, signal) {
  const aborted = (signal && signal.aborted) || (err && err.name === "AbortError");
  if (!aborted) return undefined;
  const reason = signal && signal.aborted ? signal.reason : err;
  if (reason && reason.name === "TimeoutError") {
    return new StellaError({ code: "timeout", message: "the request timed out (its AbortSignal)" });
  }
  return null;
}

// What node's fetch names as the cause of a connection that was never made (nothing was
// sent: asking again is safe, and a server restarting refuses connections for a moment).
// A browser's fetch says only "Failed to fetch", whatever happened: never retryable there.
const NOT_CONNECTED = new Set(["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH",
  "UND_ERR_CONNECT_TIMEOUT"]);

function notConnected(cause) {
  if (!cause) return false;
  if (NOT_CONNECTED.has(cause.code)) return true;
  // Several addresses tried (happy eyeballs): each of them refused.
  return Array.isArray(cause.errors) && cause.errors.length > 0 && cause.errors.every(notConnected);
}

/** A failure of fetch() or of reading its body as a StellaError; `beforeAnswer`: fetch()
 * itself failed, so a cause that says no connection was made makes it retryable. */
function networkError(err, requestId = "", beforeAnswer = false) {
  if (err instanceof StellaError) return err;
  if (err instanceof SyntaxError) {
    return new StellaError({ code: "bad_response", message: `not stella's protocol: ${err.message}`, requestId });
  }
  const cause = err && err.cause ? `: ${err.cause.message || err.cause}` : "";
  return new StellaError({ code: "network_error", message: String((err && err.message) || err) + cause, requestId,
                           retryable: beforeAnswer && notConnected(err && err.cause) });
}

const KNOWN = new Set(["start", "delta", "tool_call", "done", "error"]);

/**
 * A redirect as the bad_response it is, or null for any other answer. stella.js follows
 * none (every fetch asks for `redirect: "manual"`): a 307 or 308 would send the prompt and
 * the key on to wherever it points, and that answer would be read as stella's. A browser
 * shows a manual redirect as an `opaqueredirect` (status 0, no Location); node's fetch
 * gives the 3xx itself.
 */
async function redirected(res, url) {
  const opaque = res.type === "opaqueredirect";
  if (!opaque && !(res.status >= 300 && res.status < 400)) return null;
  const where = opaque ? "" : res.headers.get("Location") || "";
  const requestId = opaque ? "" : res.headers.get("X-Request-ID") || "";
  // Its body is not wanted: cancelling it lets the connection go.
  if (res.body) await res.body.cancel().catch(() => {});
  const status = opaque ? "a redirect" : `${res.status} ${res.statusText}`.trim() + ", a redirect";
  return new StellaError({
    status: res.status,
    code: "bad_response",
    message: `${url || "the page's origin"} answered ${status}${where ? ` to ${where}` : ""}; ` +
      "stella.js follows none: give the URL it points to as baseUrl",
    requestId,
  });
}

/** The server's address without a trailing slash ("" for the page's own origin). */
function base(baseUrl) {
  return (baseUrl || "").replace(/\/+$/, "");
}

async function* streamEvents(path, body, { signal, apiKey, baseUrl = "", fetch: fetchImpl = globalThis.fetch } = {}) {
  let res;
  try {
    res = await fetchImpl(base(baseUrl) + path, {
      method: "POST",
      headers: headersFor(apiKey),
      body: JSON.stringify({ ...body, stream: true }),
      signal,
      redirect: "manual",
    });
  } catch (err) {
    const abort = whenAborted(err, signal);
    if (abort === null) return;
    throw abort || networkError(err, "", true);
  }
  const redirect = await redirected(res, base(baseUrl));
  if (redirect) throw redirect;
  if (!res.ok) throw await httpError(res);
  const requestId = res.headers.get("X-Request-ID") || "";
  let ended = false;
  try {
    for await (const event of parseNdjson(res.body)) {
      if (event === null || typeof event !== "object" || typeof event.type !== "string") {
        throw new SyntaxError(`a line that is not an event: ${JSON.stringify(event).slice(0, 80)}`);
      }
      if (!KNOWN.has(event.type)) continue; // "ping", and what a newer server may add
      if (event.type === "error") {
        ended = true;
        // status 0: an in-band error (the HTTP status was 200), as in the Python client
        // The line's own wait: the stream's headers went out before the backend was asked.
        const wait = typeof event.retry_after === "number" ? event.retry_after : null;
        throw new StellaError({ status: 0, code: event.code || "error", message: event.message,
                                retryAfter: wait, requestId, retryable: !!event.retryable });
      }
      if (event.type === "done") ended = true;
      yield event;
    }
  } catch (err) {
    const abort = whenAborted(err, signal);
    if (abort === null) return; // Stop pressed: the request is cancelled, the loop ends
    throw abort || networkError(err, requestId);
  }
  if (!ended) {
    throw new StellaError({ code: "network_error", message: "the stream ended without a done or error line", requestId });
  }
}

/** Stream a chat: yields start, delta (`text`, and `reasoning` when the model thinks),
 * tool_call and done events. */
export function chat({ model, messages, options, tools, toolChoice, tool_choice, parallelToolCalls, parallel_tool_calls, responseFormat, response_format, metadata } = {}, opts = {}) {
  const body = { messages };
  if (model) body.model = model;
  if (options) body.options = options;
  if (tools) body.tools = tools;
  const choice = toolChoice ?? tool_choice; // camelCase, or the protocol's own name
  if (choice) body.tool_choice = choice;
  const parallel = parallelToolCalls ?? parallel_tool_calls;
  if (parallel !== undefined && parallel !== null) body.parallel_tool_calls = parallel;
  const format = responseFormat ?? response_format;
  if (format) body.response_format = format;
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

/** A JSON call (the answer's body), its failures as a stream's before the answer. */
async function callJson(path, init, { apiKey, baseUrl = "", signal, fetch: fetchImpl = globalThis.fetch } = {}) {
  let answered = false;
  try {
    const headers = { ...headersFor(apiKey), Accept: "application/json" };
    const res = await fetchImpl(base(baseUrl) + path, { ...init, headers, signal, redirect: "manual" });
    answered = true;
    const redirect = await redirected(res, base(baseUrl));
    if (redirect) throw redirect;
    if (!res.ok) throw await httpError(res);
    return await res.json();
  } catch (err) {
    // A Stop here is an error too: there is no answer to give.
    throw whenAborted(err, signal) || networkError(err, "", !answered);
  }
}

/** The routable models: {models: [...], default}. */
export function models(opts = {}) {
  return callJson("/api/v1/models", { method: "GET" }, opts);
}

/** Embed texts (`input`: a string or a list of strings): {model, embeddings, usage}, one
 * vector per input, in order. */
export function embed({ input, model, dimensions } = {}, opts = {}) {
  const body = { input };
  if (model) body.model = model;
  if (dimensions !== undefined && dimensions !== null) body.dimensions = dimensions;
  return callJson("/api/v1/embed", { method: "POST", body: JSON.stringify(body) }, opts);
}
