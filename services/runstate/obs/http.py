"""HTTP metrics for the gateway: requests by route template, method and status,
their latency, and the requests in flight (an ASGI middleware, gateway/app.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNMATCHED = "unmatched"


class HttpMetrics:
    """The gateway's registry; `waiting` is sampled at scrape time."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("runstate_http_requests", "HTTP requests answered, by route template and status.",
                                ["method", "route", "status"], registry=r)
        self.duration = Histogram("runstate_http_request_duration_seconds",
                                  "HTTP request latency, by route template.", ["method", "route"],
                                  buckets=HTTP_BUCKETS, registry=r)
        self.in_flight = Gauge("runstate_http_requests_in_flight", "HTTP requests being answered.", registry=r)
        self.waiting = Gauge("runstate_gateway_waiting_decisions",
                             "Commands published by this gateway whose decision has not arrived yet.", registry=r)
        self.sample_waiting: Callable[[], int] | None = None

    def exposition(self) -> bytes:
        if self.sample_waiting is not None:
            self.waiting.set(self.sample_waiting())
        return generate_latest(self.registry)


def route_template(scope: dict[str, Any]) -> str:
    """The matched route's path template (`/api/task_runs/{id}`): run ids stay out of labels."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class HttpMetricsMiddleware:
    """Pure ASGI, so streaming and the body guard are untouched."""

    def __init__(self, app: Any, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        status = 500
        began = time.perf_counter()

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m = self.metrics
        m.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            m.in_flight.dec()
            route, method = route_template(scope), scope["method"]
            m.requests.labels(method, route, str(status)).inc()
            m.duration.labels(method, route).observe(time.perf_counter() - began)


def metrics_endpoint(metrics: HttpMetrics) -> Callable[..., Any]:
    from starlette.responses import Response

    async def endpoint(request: Any) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return endpoint
