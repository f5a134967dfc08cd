"""Admin routes beyond the model table: usage accounting."""

from __future__ import annotations

import re
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stella.api.http import JSONResponse, endpoint, services
from stella.api.openapi import Operation, document
from stella.core import Call, Listener
from stella.cost import usd
from stella.errors import InvalidRequest
from stella.metrics import OTHER_MODEL
from stella.protocol import UsageReport, UsageRow, UsageTotals
from stella.state import StateStore

# With models.allow_direct a key may name any upstream model: past this many models in
# a day, a key's further ones are counted together as "(other)" (by this process), a
# name no route can take, as the metrics' catch-all.
MAX_MODELS_PER_KEY_DAY = 256
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)  # not other scripts' digits


def usage_listener(state: StateStore) -> Listener:
    """A pipeline listener counting each inference per key, model and UTC day (on the
    store's clock: with Redis, Redis's, so that every replica names an instant alike)."""

    # The day's name and its bounds: formatted once a day, not per request (and again
    # should the store's clock, measured anew, put now outside of them).
    today, today_starts, today_ends = "", 0.0, 0.0
    models: dict[str, set[str]] = {}  # per key, the models counted today

    def record(event: dict[str, Any]) -> None:
        nonlocal today, today_starts, today_ends
        now = state.wall()
        if not today_starts <= now < today_ends:
            today = time.strftime("%Y-%m-%d", time.gmtime(now))
            today_starts = now // 86400 * 86400
            today_ends = today_starts + 86400
            models.clear()
        key, model = event["key"], event["model"]
        seen = models.setdefault(key, set())
        if model not in seen:
            if len(seen) >= MAX_MODELS_PER_KEY_DAY:
                model = OTHER_MODEL
            else:
                seen.add(model)
        state.record_usage(key, model, today, event)

    return record


@endpoint(auth="admin")
async def usage(request: Request, call: Call) -> Response:
    """GET /api/v1/usage?day=YYYY-MM-DD&key=NAME&model=NAME: counters per key, model and day."""
    q = request.query_params
    day = q.get("day")
    if day is None:
        # today, as the counters name it
        day = time.strftime("%Y-%m-%d", time.gmtime(services(request).state.wall()))
    else:
        try:
            # strptime takes "2026-11-7" too: a day no counter is named by, answered empty.
            if not _DAY.fullmatch(day):
                raise ValueError
            time.strptime(day, "%Y-%m-%d")
        except ValueError:
            raise InvalidRequest("day: expected YYYY-MM-DD") from None
    rows = await services(request).state.get_usage(day)
    if key := q.get("key"):
        rows = [r for r in rows if r["key"] == key]
    if model := q.get("model"):
        # Rows are by route name: an alias (or `default`) keeps the rows of the route it
        # stands for now, and rows under the name itself (a route since removed).
        names = {model, services(request).router.target(model) or model}
        rows = [r for r in rows if r["model"] in names]
    totals: dict[str, Any] = {
        f: sum(r[f] for r in rows)
        for f in ("requests", "prompt_tokens", "completion_tokens", "errors")
    }
    # Summed in nano-dollars, exactly, then shown in USD as each row is.
    totals["cost_usd"] = usd(sum(r.pop("cost_nanos") for r in rows))
    return JSONResponse(
        UsageReport(usage=[UsageRow(**r) for r in rows], totals=UsageTotals(**totals))
    )


document(
    Operation(
        "get",
        "/api/v1/usage",
        "Usage per key, model and day (admin)",
        tag="admin",
        admin=True,
        response=UsageReport,
        errors=(400, 401, 403, 503),
        query=(
            ("day", "YYYY-MM-DD (UTC); today when absent"),
            ("key", "only this key's rows"),
            ("model", "only this model's rows (a route's name, or an alias of it)"),
        ),
    )
)

routes = [Route("/api/v1/usage", usage, methods=["GET"])]
