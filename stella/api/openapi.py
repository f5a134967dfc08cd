"""/openapi.json, generated from the same msgspec structs that decode and encode."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

import msgspec

from stella import __version__
from stella.calls import RID_PATTERN
from stella.protocol import ErrorResponse, StreamEvent


@dataclass(frozen=True, eq=False)
class Schema:
    """A hand-written schema component, for a body a handler writes without a struct (a
    dialect's dicts and hand-built stream bytes); `uses` are the structs and other
    Schemas it names by $ref."""

    name: str
    schema: dict[str, Any]
    uses: tuple[Any, ...] = ()


def ref(target: Any) -> dict[str, Any]:
    """A $ref to a Schema or a struct's component (the struct must be in some `uses`)."""
    name = target.name if isinstance(target, Schema) else target.__name__
    return {"$ref": f"#/components/schemas/{name}"}


@dataclass(frozen=True, slots=True)
class Operation:
    """One documented operation."""

    method: str
    path: str
    summary: str
    tag: str = "native"
    description: str = ""  # more than the summary says, when there is more
    # request, response, stream_item, error and the bodies of `others` are structs, or
    # Schemas for bodies written without one.
    request: Any = None
    request_optional: bool = False  # the body may be left out (its fields' defaults hold)
    response: Any = None
    stream: str = ""  # media type of a streamed alternative, e.g. application/x-ndjson
    # One line of an NDJSON stream, or one event of an SSE one (as OpenAPI 3.1 tools read a
    # stream's schema: what 3.2 calls itemSchema).
    stream_item: Any = None
    # Further streamed forms: (media type, the schema of one event), e.g. an SSE one that
    # the Accept header chooses over `stream`.
    streams: tuple[tuple[str, Any], ...] = ()
    # The body of every error status: a dialect answers in its own shape.
    error: Any = ErrorResponse
    admin: bool = False
    public: bool = False
    errors: tuple[int, ...] = (400, 401, 403, 404, 413, 415, 429, 502, 503, 504)
    params: tuple[str, ...] = field(default=())
    # Optional query parameters: (name, description), any string; or (name, description,
    # schema) for one the server takes only in some form (a boolean's true or false).
    query: tuple[tuple[str, str] | tuple[str, str, dict[str, Any]], ...] = field(default=())
    media: str = "application/json"  # the media type of `response`
    # Statuses answered with a body of their own, not ErrorResponse (GET /ready's 503).
    others: tuple[tuple[int, Any], ...] = ()
    # Statuses answered without a body: (status, description), e.g. a redirect.
    bare: tuple[tuple[int, str], ...] = ()
    # Names from HEADERS that answers may carry besides X-Request-ID (a dialect's own).
    headers: tuple[str, ...] = ()
    # An admin POST that creates (201) and may replace what it names instead (200).
    replaced: bool = False


OPERATIONS: list[Operation] = []
# Probes answer while the server drains; every other route answers 503 shutting_down.
UNDRAINED = ("/health", "/ready")


def document(*ops: Operation) -> None:
    """Add operations to the schema (each API module calls this once)."""
    OPERATIONS.extend(ops)


def build_schema(without: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The OpenAPI 3.1 document for every registered operation but those on the paths
    `without` (routes this server does not serve, such as a disabled /metrics)."""
    types: list[Any] = [ErrorResponse, StreamEvent]
    operations = [op for op in OPERATIONS if op.path not in without]
    for op in operations:
        types += [t for t in (op.request, op.response, op.stream_item, op.error) if t is not None]
        types += [t for _, t in op.others]
        types += [t for _, t in op.streams]
    written = _written(types)
    structs = [t for t in types if not isinstance(t, Schema)]
    structs += [t for s in written for t in s.uses if not isinstance(t, Schema)]
    schemas, components = msgspec.json.schema_components(
        structs, ref_template="#/components/schemas/{name}"
    )
    by_type: dict[Any, Any] = dict(zip(structs, schemas, strict=True))
    for s in written:
        if components.get(s.name, s.schema) is not s.schema:
            raise ValueError(f"two schemas are named {s.name}")
        # msgspec qualifies a struct's name that two modules share: `ref` would miss it.
        missing = [t for t in s.uses if ref(t)["$ref"].rsplit("/", 1)[1] not in components]
        if any(not isinstance(t, Schema) for t in missing):
            raise ValueError(f"{s.name} names a struct whose component has another name")
        components[s.name] = s.schema
        by_type[s] = ref(s)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        item: dict[str, Any] = {"summary": op.summary, "tags": [op.tag]}
        if op.description:
            item["description"] = op.description
        if op.params or op.query:
            item["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in op.params
            ] + [_query(*q) for q in op.query]
        if op.request is not None:
            item["requestBody"] = {
                "required": not op.request_optional,
                "content": {"application/json": {"schema": by_type[op.request]}},
            }
        content: dict[str, Any] = {}
        if op.response is not None:
            content[op.media] = {"schema": by_type[op.response]}
        if op.stream:
            content[op.stream] = {"schema": by_type[op.stream_item or StreamEvent]}
        for media, event in op.streams:
            content[media] = {"schema": by_type[event]}
        ok = "201" if op.method == "post" and op.admin and op.request else "200"
        responses: dict[str, Any] = {
            ok: {"description": "OK", "headers": _headers(200, op), "content": content}
        }
        if op.replaced:
            responses[ok]["description"] = "Created"
            responses["200"] = {
                "description": "Replaced: the one of that name",
                "headers": _headers(200, op),
                "content": content,
            }
        errors = op.errors
        if 503 not in errors and op.path not in UNDRAINED:
            errors = (*errors, 503)  # every other route refuses new work while draining
        # And any route may meet a fault of stella's own: 500 internal_error, in its shape.
        errors = (*errors, 500)
        for status in errors:
            if op.public and status in (401, 403):
                continue
            responses[str(status)] = {
                "description": "error",
                "headers": _headers(status, op, error=True),
                "content": {"application/json": {"schema": by_type[op.error]}},
            }
        for status, text in op.bare:
            responses[str(status)] = {"description": text, "headers": _headers(status, op)}
        for status, body in op.others:
            responses[str(status)] = {
                "description": "see the body",
                "headers": _headers(status, op),
                "content": {"application/json": {"schema": by_type[body]}},
            }
        item["responses"] = responses
        if not op.public:
            item["security"] = [{"bearer": []}, {"apiKey": []}]
        paths.setdefault(op.path, {})[op.method] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "stella", "version": __version__, "description": "An async LLM gateway."},
        "paths": paths,
        "components": {
            "schemas": components,
            "headers": HEADERS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


def _written(types: list[Any]) -> list[Schema]:
    """The Schemas among `types` and those they use, each once."""
    out: dict[int, Schema] = {}
    todo = [t for t in types if isinstance(t, Schema)]
    while todo:
        s = todo.pop()
        if id(s) not in out:
            out[id(s)] = s
            todo += [t for t in s.uses if isinstance(t, Schema)]
    return list(out.values())


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """An optional query parameter's entry: any string unless `schema` says otherwise."""
    shape = {"type": "string"} if schema is None else schema
    return {"name": name, "in": "query", "description": description, "schema": shape}


def _header(description: str, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "schema": {"type": kind}}


HEADERS = {
    "X-Request-ID": _header(
        f"The request's ID: the client's own when it matches {RID_PATTERN}, else a new one"
    ),
    "request-id": _header("The same ID, by the name Anthropic's API gives it"),
    "Retry-After": _header("Seconds to wait before trying again", "integer"),
    "x-should-retry": _header(
        "On an error: whether the same request may succeed if sent again (true or false),"
        " as the body's retryable; the OpenAI and Anthropic SDKs obey it"
    ),
    "X-Content-Type-Options": _header("On an error: nosniff (its body is JSON, nothing else)"),
    "X-RateLimit-Limit": _header(
        "The per-minute limit, and size, of one token bucket: the first that applies of the"
        " key's requests, its tokens, the model's requests, its tokens (on a 429, the first"
        " that refused)",
        "integer",
    ),
    "X-RateLimit-Remaining": _header("What is left in that bucket", "integer"),
    "X-RateLimit-Reset": _header("Seconds until that bucket is full again", "integer"),
    "X-Quota-Limit": _header(
        "The per-day number of one daily quota (a fixed UTC day; a budget's in USD, to the"
        " micro-dollar, 5.000000): the first that applies of the key's requests, its tokens,"
        " its budget, the model's requests, its tokens, its budget (on a 429 quota_exceeded,"
        " the first used up; on a 429 rate_limited for a day held by calls still running,"
        " that one)",
        "number",
    ),
    "X-Quota-Remaining": _header(
        "What is left of that quota today (0 also when a call's usage took it below nothing)",
        "number",
    ),
    "X-Quota-Reset": _header("Seconds until the next UTC midnight, when it renews", "integer"),
    "WWW-Authenticate": _header("On a 401: Bearer, the scheme a key is sent with"),
    "Cache-Control": _header(
        "On a GET's answer: no-store (it depends on the caller's key, or on the moment)"
    ),
}


def _headers(status: int, op: Operation, error: bool = False) -> dict[str, Any]:
    """The headers a response with this status may carry, as references."""
    names = ["X-Request-ID", *op.headers]
    if op.method == "get":
        names.append("Cache-Control")
    if error:
        names += ["x-should-retry", "X-Content-Type-Options"]
        # 502: an upstream's own 429 (upstream_rate_limited) passes its wait on (unless it
        # says not to ask again: a used-up quota's wait is not this call's).
        if status in (429, 502, 503, 529):
            names.append("Retry-After")
        if status == 401:
            names.append("WWW-Authenticate")
    # An inference (an operation that can be rate limited) tells a limited key its limits.
    if 429 in op.errors and (status < 400 or status == 429):
        names += ["X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"]
        names += ["X-Quota-Limit", "X-Quota-Remaining", "X-Quota-Reset"]
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


# A summary wraps and a long path breaks anywhere: the page fits a 360 px phone.
DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>stella API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="static/favicon.svg" type="image/svg+xml">
<style>
body{font:15px/1.5 system-ui,sans-serif;margin:0;background:#f7f7f9;color:#1d1d24}
main{max-width:980px;margin:0 auto;padding:24px}
h1{margin:0 0 4px} .op{background:#fff;border:1px solid #e3e3ea;border-radius:8px;margin:10px 0}
summary{cursor:pointer;padding:10px 14px;display:flex;flex-wrap:wrap;gap:4px 12px;align-items:center}
summary code{min-width:0;overflow-wrap:anywhere}
.m{font:600 12px monospace;padding:2px 8px;border-radius:4px;color:#fff;min-width:54px;text-align:center}
.get{background:#2f7d4f}.post{background:#2e5ea8}.delete{background:#b03a2e}.patch{background:#8a6d1f}
code,pre{font:13px ui-monospace,monospace} pre{background:#f2f2f6;padding:10px;overflow:auto;margin:0 14px 14px}
</style></head><body><main><h1>stella API</h1><p id="sub"></p><div id="ops"></div></main>
<script type="module">
const spec = await (await fetch("openapi.json")).json();
document.getElementById("sub").textContent = spec.info.description + " Version " + spec.info.version;
const box = document.getElementById("ops");
for (const [path, item] of Object.entries(spec.paths)) {
  for (const [method, op] of Object.entries(item)) {
    const d = document.createElement("details"); d.className = "op";
    const s = document.createElement("summary");
    const m = document.createElement("span"); m.className = "m " + method; m.textContent = method.toUpperCase();
    const p = document.createElement("code"); p.textContent = path;
    const t = document.createElement("span"); t.textContent = op.summary;
    s.append(m, p, t); d.append(s);
    const pre = document.createElement("pre"); pre.textContent = JSON.stringify(op, null, 2);
    d.append(pre); box.append(d);
  }
}
</script></body></html>
"""


def _inline_hash(page: str, tag: str) -> str:
    """The CSP source that lets the page's one inline `tag` element run (by its hash)."""
    body = page.split(f"<{tag}", 1)[1].split(">", 1)[1].split(f"</{tag}>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    return f"'sha256-{digest}'"


# The docs page's own inline script and style, allowed by their hashes and nothing else
# inline: a schema text that found its way into the page as markup could run no code.
DOCS_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        f"default-src 'self'; script-src {_inline_hash(DOCS_HTML, 'script')}; "
        f"style-src {_inline_hash(DOCS_HTML, 'style')}; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}
