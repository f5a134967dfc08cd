"""Prometheus metrics at GET /metrics, fed by the pipeline's one record per inference.

Labels are bounded: models are configured route names (anything else counts as
"other"), never request IDs. Gauges that describe state (streams in flight,
queue depth, circuit breakers) are read at scrape time, so the hot path pays
only for a few counter and histogram updates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stella.api.http import endpoint, services
from stella.api.openapi import Operation, document
from stella.calls import Call
from stella.errors import StellaError

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError:  # the metrics extra is not installed: no /metrics
    CollectorRegistry = None  # type: ignore[assignment,misc]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BREAKER = {"closed": 0, "half_open": 1, "open": 2}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The registry and the hot-path listener of one app."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "stella_requests",
            "Inferences by outcome",
            ["api", "model", "backend", "status"],
            registry=r,
        )
        self.tokens = Counter("stella_tokens", "Tokens processed", ["model", "kind"], registry=r)
        self.ttft = Histogram(
            "stella_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.total = Histogram(
            "stella_request_duration_seconds",
            "Whole inference time",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "stella_queue_wait_seconds",
            "Time waiting for a backend slot",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "stella_rejections",
            "Requests refused before the first byte",
            ["api", "code"],
            registry=r,
        )
        self.attempts = Counter(
            "stella_backend_failures", "Failed backend attempts", ["backend", "code"], registry=r
        )
        r.register(_StateCollector(svc))
        self._children: dict[tuple[str, ...], tuple[Any, ...]] = {}

    def _model(self, name: str) -> str:
        return name if name in self.svc.router.routes else "other"

    def observe(self, record: dict[str, Any]) -> None:
        """Count one inference (runs for every request: keep it cheap)."""
        key = (record["api"], record["model"], record["backend"], str(record["status"]))
        children = self._children.get(key)
        if children is None:
            model = self._model(record["model"])
            children = (
                self.requests.labels(key[0], model, record["backend"], key[3]),
                self.tokens.labels(model, "prompt"),
                self.tokens.labels(model, "completion"),
                self.ttft.labels(model),
                self.total.labels(model),
                self.queue.labels(model),
            )
            if len(self._children) < 10_000:
                self._children[key] = children
        requests, prompt, completion, ttft, total, queue = children
        requests.inc()
        if record["prompt_tokens"]:
            prompt.inc(record["prompt_tokens"])
        if record["completion_tokens"]:
            completion.inc(record["completion_tokens"])
        if record["ttft_ms"] is not None:
            ttft.observe(record["ttft_ms"] / 1000)
        total.observe(record["total_ms"] / 1000)
        queue.observe(record["queue_ms"] / 1000)
        if len(record["attempts"]) > 1 or record["attempts"][0].get("error"):
            for attempt in record["attempts"]:
                if attempt.get("error"):
                    self.attempts.labels(attempt["backend"], attempt["error"]).inc()

    def rejected(self, exc: StellaError, api: str) -> None:
        """Count a refusal before the first byte (401, 404, 429, 503, ...)."""
        self.rejections.labels(api, exc.code).inc()


class _StateCollector(Collector):
    """Gauges read at scrape time: streams in flight, queue depth, circuit state."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Any]:
        """Current values."""
        svc = self.svc
        inflight = GaugeMetricFamily("stella_inflight_requests", "Calls running now")
        inflight.add_metric([], len(svc.drain.tasks))
        yield inflight
        depth = GaugeMetricFamily(
            "stella_queue_depth", "Generations waiting per backend", labels=["backend"]
        )
        breaker = GaugeMetricFamily(
            "stella_circuit_state",
            "Circuit breaker per backend: 0 closed, 1 half open, 2 open",
            labels=["backend"],
        )
        for name, backend in svc.backends.items():
            worker = getattr(backend, "worker", None)
            if worker is not None:
                depth.add_metric([name], getattr(worker, "waiting", 0))
            breaker.add_metric([name], BREAKER.get(svc.router.breaker(name).state, 0))
        yield depth
        yield breaker
        limiter = getattr(svc.admission, "rejections", None)
        if limiter is not None:
            limited = GaugeMetricFamily(
                "stella_rate_limited_total", "Requests refused by rate limits since start"
            )
            limited.add_metric([], limiter)
            yield limited


@endpoint(auth="user")
async def metrics(request: Request, call: Call) -> Response:
    """GET /metrics: Prometheus text."""
    m: Metrics = services(request).metrics
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE)


document(Operation("get", "/metrics", "Prometheus metrics", tag="ops", errors=(401,)))


def install(app: Any, svc: Any) -> None:
    """Wire metrics into an app: the listener, the refusal hook and the route."""
    if CollectorRegistry is None or not svc.settings.metrics.enabled:
        return
    svc.metrics = Metrics(svc)
    svc.pipeline.listeners.append(svc.metrics.observe)
    svc.on_reject.append(svc.metrics.rejected)
    app.router.routes.append(Route("/metrics", metrics, methods=["GET"]))
