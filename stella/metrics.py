"""Prometheus metrics at GET /metrics, fed by the pipeline's one record per inference.

Labels are bounded: models are route names (anything else counts as "(other)"),
never request IDs, and a removed route's series go once a scrape showed its last counts. Gauges
that describe state (streams in flight, queue depth, circuit breakers) are read at scrape
time, so the hot path pays only for a few counter and histogram updates.

A scrape reads that state and copies the counters on the event loop (a millisecond or
two with hundreds of routes), then writes the text on a thread: that text runs to
megabytes with hundreds of routes, and written on the loop it would hold every call the
server serves for a tenth of a second or more. Scrapes that arrive while one is being
written share it.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stella import logs
from stella.api.http import endpoint, services
from stella.api.openapi import Operation, document
from stella.calls import Call
from stella.cost import nanos, usd
from stella.errors import Forbidden, StellaError

if TYPE_CHECKING:  # the app installs this module
    from stella.app import Services

# Attempts cut for the client's or the server's reasons, not because the backend failed
# (a fallback refused by its limits or an open circuit never ran: it has no "ms"; one the
# request's time cut while its backend was producing is marked "out_of_time", as the
# circuit breaker takes it: no failure), and the client's own request refused by a backend
# that answered (a prompt over the model's context, a JSON mode or conversation it cannot
# serve as asked), which its circuit breaker is not told of either. An upstream's 429 (or
# 403, or a JSON 404 that refuses the model or request, not a missing path) is counted: the
# backend did not serve the attempt, though its circuit, as for one model's or one key's
# refusal, is not told.
NOT_BACKEND_FAILURES = frozenset(
    {
        "client_closed",
        "client_too_slow",
        "cancelled",
        "shutting_down",
        "context_length_exceeded",
        "invalid_request",
    }
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BREAKER = {"closed": 0, "half_open": 1, "open": 2}
# The model label of every name that is no route's: parentheses, which no route name can
# hold (settings.ROUTE_NAME_PATTERN), so a route named "other" keeps a series of its own.
OTHER_MODEL = "(other)"
# Floats, so a bound reads `1.0` as the Prometheus client libraries write it.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A whole inference runs up to its route's total_timeout_s (600 s by default), and so may a
# client's wait for its first token (each attempt's ttft_timeout_s, 120 s, again for each
# retry and fallback): above 120 s it would fall in +Inf alone, where no quantile is read.
DURATION_BUCKETS = (*LATENCY_BUCKETS, 300.0, 600.0)


class _Hist:
    """A histogram's state: its bounds, bucket counts (not cumulative), sum and count."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def copy(self) -> _Hist:
        """The same state, apart from this one's later updates."""
        h = _Hist(self.bounds)
        h.buckets = self.buckets.copy()
        h.sum = self.sum
        h.count = self.count
        return h


def _duration_hist() -> _Hist:
    return _Hist(DURATION_BUCKETS)


class Metrics:
    """Plain counters updated on the event loop, exported at scrape time.

    prometheus-client's own metric objects take a lock on every update; stella's
    counters are only touched from the event loop, so plain integers do. A scrape copies
    them there, in one go (no update can land halfway through the copy), and the thread
    that writes the text reads only that copy.
    """

    def __init__(self, svc: Any) -> None:
        self.svc = svc
        self.requests: dict[tuple[str, str, str, int], int] = defaultdict(int)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)
        self.ttft: dict[str, _Hist] = defaultdict(_duration_hist)
        self.total: dict[str, _Hist] = defaultdict(_duration_hist)
        self.queue: dict[str, _Hist] = defaultdict(_Hist)
        self.rejections: dict[tuple[str, str], int] = defaultdict(int)
        self.failures: dict[tuple[str, str], int] = defaultdict(int)
        # Embed calls, apart from the chats: many short calls (a RAG index's) would skew
        # the chats' rates and latencies.
        self.embeds: dict[tuple[str, str, str, int], int] = defaultdict(int)
        self.embed_tokens: dict[str, int] = defaultdict(int)
        self.embed_total: dict[str, _Hist] = defaultdict(_duration_hist)
        # What priced calls cost per model, chats and embed calls alike, in nano-dollars
        # (whole numbers add up exactly), exported in USD.
        self.cost: dict[str, int] = defaultdict(int)
        self._state = _StateCollector(svc)
        self._rendering: asyncio.Future[bytes] | None = None
        # The calls counted under each model as of the last scrape (what that scrape
        # showed): a removed route's series go only once it showed them all (see unseen).
        self._shown: dict[str, int] = {}

    def _model(self, name: str) -> str:
        # A route's name, or OTHER_MODEL: clients cannot grow the label set. Looked up each
        # time: a route registered at runtime is counted under its name from then on, and
        # a call on one removed while it ran still is (Router.sweep keeps the name for it).
        return name if name in self.svc.router.counted else OTHER_MODEL

    def _calls(self, models: Collection[str] | None = None) -> dict[str, int]:
        # The calls counted under each model (of `models`, or all): every update of a
        # model's series comes with one chat or embed counted, so while this count stands
        # still, so does every series of the model.
        calls: dict[str, int] = defaultdict(int)
        for keyed in (self.requests, self.embeds):
            for key, n in keyed.items():
                if models is None or key[1] in models:
                    calls[key[1]] += n
        return calls

    def unseen(self, models: set[str]) -> set[str]:
        """Of these models (removed routes), those with calls counted since the last scrape:
        their series stay until a scrape has shown them."""
        shown = self._shown
        return {m for m, n in self._calls(models).items() if n != shown.get(m, 0)}

    def forget(self, models: set[str]) -> None:
        """Drop the series of these models (removed routes no call is on any more, their
        last counts scraped): a route added again under one of their names counts from
        zero, a counter reset."""
        for model in models.intersection(self._shown):
            del self._shown[model]
        by_model: tuple[dict[str, Any], ...] = (
            self.ttft,
            self.total,
            self.queue,
            self.embed_tokens,
            self.embed_total,
            self.cost,
        )
        for counts in by_model:
            for model in models.intersection(counts):
                del counts[model]
        for keyed in (self.requests, self.embeds):
            for key in [k for k in keyed if k[1] in models]:
                del keyed[key]
        for model_kind in [k for k in self.tokens if k[0] in models]:
            del self.tokens[model_kind]

    def observe(self, record: dict[str, Any]) -> None:
        """Count one inference (runs for every request: keep it cheap)."""
        model = self._model(record["model"])
        attempts = record["attempts"]
        if len(attempts) > 1 or (attempts and attempts[0].get("error")):
            for attempt in attempts:
                error = attempt.get("error")
                if (
                    error
                    and error not in NOT_BACKEND_FAILURES
                    and "ms" in attempt
                    and "out_of_time" not in attempt
                ):
                    self.failures[(attempt["backend"], error)] += 1
        cost = record.get("cost_usd")
        if cost is not None:
            self.cost[model] += nanos(cost)
        if record["op"] == "embed":
            self.embeds[(record["api"], model, record["backend"], record["status"])] += 1
            if record["prompt_tokens"]:
                self.embed_tokens[model] += record["prompt_tokens"]
            total = record["total_ms"] / 1000
            h = self.embed_total[model]
            h.buckets[bisect_left(DURATION_BUCKETS, total)] += 1
            h.sum += total
            h.count += 1
            return
        self.requests[(record["api"], model, record["backend"], record["status"])] += 1
        if record["prompt_tokens"]:
            self.tokens[(model, "prompt")] += record["prompt_tokens"]
        if record["completion_tokens"]:
            self.tokens[(model, "completion")] += record["completion_tokens"]
        # Each histogram's update, written out here (three method calls per request would
        # be a tenth of this method's time): the value, in seconds, counts once in the first
        # bucket whose bound is at or above it (bisect_left; past every bound, +Inf's), and
        # adds to the sum and the count.
        ttft = record["ttft_ms"]
        if ttft is not None:
            h = self.ttft[model]
            h.buckets[bisect_left(DURATION_BUCKETS, ttft / 1000)] += 1
            h.sum += ttft / 1000
            h.count += 1
        total = record["total_ms"] / 1000
        h = self.total[model]
        h.buckets[bisect_left(DURATION_BUCKETS, total)] += 1
        h.sum += total
        h.count += 1
        queue = record["queue_ms"] / 1000
        h = self.queue[model]
        h.buckets[bisect_left(LATENCY_BUCKETS, queue)] += 1
        h.sum += queue
        h.count += 1

    def rejected(self, exc: StellaError, api: str) -> None:
        """Count an inference request's refusal before the first byte (401, 404, 429, 503, ...)."""
        self.rejections[(api, exc.code)] += 1

    async def render(self) -> bytes:
        """The Prometheus text of now, written on a thread; a scrape that arrives while one
        is being written gets that one (a flood of scrapes costs one thread, not one each)."""
        pending = self._rendering
        if pending is None or pending.done():
            # On the loop, in one go: the gauges (they read the loop's own structures) and
            # a copy of the counters, so the thread sees one moment and races with nothing.
            scrape = _Scrape(_Counts(self), list(self._state.collect()))
            # After the copy: the last calls of a removed route are in this text once, and
            # its series go from the next one (on the loop, where every update is). What
            # it shows is kept, so that a routing change before the next scrape forgets
            # only a removed route with nothing new since (a sum over the series the copy
            # above went through already).
            self._shown = dict(self._calls())
            self.svc.router.sweep()
            pending = asyncio.get_running_loop().run_in_executor(None, generate_latest, scrape)
            self._rendering = pending
            pending.add_done_callback(self._rendered)
        # Shielded: a scrape whose client leaves does not cancel the others' text.
        return await asyncio.shield(pending)

    def _rendered(self, done: asyncio.Future[bytes]) -> None:
        if self._rendering is done:
            self._rendering = None  # the text is not kept past its scrapes
        if not done.cancelled():
            done.exception()  # retrieved: every scrape that waited for it may have left


class _Counts(Collector):
    """A copy of the counters and histograms of Metrics, taken on the event loop; their
    metric families."""

    def __init__(self, m: Metrics) -> None:
        # Made on the loop, where every update is: none lands between two of these copies,
        # so the text agrees with itself (a histogram's count with its buckets and sum).
        self.requests = dict(m.requests)
        self.tokens = dict(m.tokens)
        self.embeds = dict(m.embeds)
        self.embed_tokens = dict(m.embed_tokens)
        self.cost = dict(m.cost)
        self.rejections = dict(m.rejections)
        self.failures = dict(m.failures)
        self.ttft = {model: h.copy() for model, h in m.ttft.items()}
        self.total = {model: h.copy() for model, h in m.total.items()}
        self.embed_total = {model: h.copy() for model, h in m.embed_total.items()}
        self.queue = {model: h.copy() for model, h in m.queue.items()}

    def collect(self) -> Iterator[Metric]:
        """The copied values."""
        requests = CounterMetricFamily(
            "stella_requests", "Inferences by outcome", labels=["api", "model", "backend", "status"]
        )
        for (api, model, backend, status), n in self.requests.items():
            requests.add_metric([api, model, backend, str(status)], n)
        yield requests
        tokens = CounterMetricFamily("stella_tokens", "Tokens processed", labels=["model", "kind"])
        for labels, n in self.tokens.items():
            tokens.add_metric(list(labels), n)
        yield tokens
        embeds = CounterMetricFamily(
            "stella_embed_requests",
            "Embed calls by outcome",
            labels=["api", "model", "backend", "status"],
        )
        for (api, model, backend, status), n in self.embeds.items():
            embeds.add_metric([api, model, backend, str(status)], n)
        yield embeds
        embed_tokens = CounterMetricFamily(
            "stella_embed_tokens", "Tokens embed calls read", labels=["model"]
        )
        for model, n in self.embed_tokens.items():
            embed_tokens.add_metric([model], n)
        yield embed_tokens
        cost = CounterMetricFamily(  # exposed as stella_cost_usd_total
            "stella_cost_usd", "What calls to priced routes cost, in USD", labels=["model"]
        )
        for model, n in self.cost.items():
            cost.add_metric([model], usd(n))
        yield cost
        for name, doc, hists in (
            ("stella_time_to_first_token_seconds", "Time to first token", self.ttft),
            ("stella_request_duration_seconds", "Whole inference time", self.total),
            ("stella_embed_duration_seconds", "Whole embed call time", self.embed_total),
            (
                "stella_queue_wait_seconds",
                "Time waiting for a place: the key's and the backend's concurrency slots, "
                "and a backend's own queue",
                self.queue,
            ),
        ):
            family = HistogramMetricFamily(name, doc, labels=["model"])
            for model, h in hists.items():
                cumulative, running = [], 0
                for bound, n in zip((*h.bounds, float("inf")), h.buckets, strict=True):
                    running += n
                    cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
                family.add_metric([model], cumulative, h.sum)
            yield family
        rejections = CounterMetricFamily(
            "stella_rejections",
            "Inference requests refused before the first byte",
            labels=["api", "code"],
        )
        for labels, n in self.rejections.items():
            rejections.add_metric(list(labels), n)
        yield rejections
        failures = CounterMetricFamily(
            "stella_backend_failures", "Failed backend attempts", labels=["backend", "code"]
        )
        for labels, n in self.failures.items():
            failures.add_metric(list(labels), n)
        yield failures


class _Scrape(Collector):
    """One scrape's metric families: the counters' copy, then the gauges read with it."""

    def __init__(self, counts: _Counts, state: list[Metric]) -> None:
        self.counts = counts
        self.state = state

    def collect(self) -> Iterator[Metric]:
        """The families, in the order /metrics lists them."""
        yield from self.counts.collect()
        yield from self.state


class _StateCollector(Collector):
    """Values read at scrape time: streams in flight, queue depth, circuit state, and the
    log outputs' dropped lines and failed writes."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Any]:
        """Current values."""
        svc = self.svc
        drain = svc.drain
        waiting = len(drain.waiting)
        # A body still arriving is in the drain's care, not a call yet.
        reading = sum(1 for c in drain.tasks.values() if getattr(c, "reading_body", False))
        inflight = GaugeMetricFamily("stella_inflight_requests", "Calls running now")
        inflight.add_metric([], len(drain.tasks) - waiting - reading)
        yield inflight
        admitting = GaugeMetricFamily(
            "stella_waiting_requests", "Calls waiting for a concurrency slot (limits)"
        )
        admitting.add_metric([], waiting)
        yield admitting
        depth = GaugeMetricFamily(
            "stella_queue_depth",
            "Generations waiting per backend, behind the one running (as max_queue counts)",
            labels=["backend"],
        )
        breaker = GaugeMetricFamily(
            "stella_circuit_state",
            "Circuit breaker per backend: 0 closed, 1 half open, 2 open",
            labels=["backend"],
        )
        for name, backend in svc.backends.items():
            worker = getattr(backend, "worker", None)
            if worker is not None:
                depth.add_metric([name], getattr(worker, "behind", 0))
            breaker.add_metric([name], BREAKER.get(svc.router.breaker(name).now(), 0))
        yield depth
        yield breaker
        limiter = getattr(svc.admission, "rejections", None)
        if limiter is not None:
            limited = CounterMetricFamily(  # exposed as stella_rate_limited_total
                "stella_rate_limited", "Requests refused by rate limits since start"
            )
            limited.add_metric([], limiter)
            yield limited
        if (sink := logs.sink()) is not None:
            dropped = CounterMetricFamily(  # exposed as stella_log_lines_dropped_total
                "stella_log_lines_dropped",
                "Log lines not written: the output's backlog was full or its write failed",
                labels=["output"],
            )
            errors = CounterMetricFamily(
                "stella_log_write_errors", "Failed writes to a log output", labels=["output"]
            )
            for output, (lines, failures) in sink.counts().items():
                dropped.add_metric([output], lines)
                errors.add_metric([output], failures)
            yield dropped
            yield errors


@endpoint(auth="user")
async def metrics(request: Request, call: Call) -> Response:
    """GET /metrics: Prometheus text, for a key that may use every model (or an admin)."""
    principal = call.principal
    if "*" not in principal.models and not principal.admin:
        # The counters name every model and its traffic: more than such a key may see.
        raise Forbidden("this key is limited to some models; /metrics shows all of them")
    m: Metrics = services(request).metrics
    return Response(await m.render(), media_type=CONTENT_TYPE)


document(
    Operation(
        "get",
        "/metrics",
        "Prometheus metrics (text exposition format)",
        tag="ops",
        response=str,
        media="text/plain",
        errors=(401, 403),
    )
)


def install(app: Starlette, svc: Services) -> None:
    """Wire metrics into an app: the listener, the refusal hook and the route."""
    if not svc.settings.metrics.enabled:
        return
    svc.metrics = Metrics(svc)
    svc.router.on_forget.append(svc.metrics.forget)
    svc.router.unseen = svc.metrics.unseen
    svc.pipeline.listeners.append(svc.metrics.observe)
    svc.on_reject.append(svc.metrics.rejected)
    app.router.routes.append(Route("/metrics", metrics, methods=["GET"]))
