"""The gateway's Prometheus metrics: calls by endpoint and status code, their latency, and the calls waiting for
the pipeline's result; served with ``/healthz`` and ``/readyz`` by ``pixelpipe/core/telemetry.py``'s server on
``PIXELPIPE_METRICS_PORT``.

Label values come from bounded sets: the route's path template (``/v1/files`` for every signed file, ``other``
for a path no route serves), never a request id, key, user or file name; the code is the HTTP status, so 429s
(rate limits) and 503s (load shed) are ``code="429"`` and ``code="503"``.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# A call's latency runs from milliseconds (a 401, /v1/models) to the render's minutes (PIXELPIPE_GATEWAY_TIMEOUT_S).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ENDPOINTS = ("/v1/models", "/v1/images/generations", "/v1/images/edits", "/healthz")

REQUESTS = Counter(
    "pixelpipe_gateway_requests_total",
    "Calls the gateway answered, by endpoint and HTTP status code.",
    ["endpoint", "code"],
)
REQUEST_SECONDS = Histogram(
    "pixelpipe_gateway_request_seconds",
    "Time from a call's arrival to the end of its answer (a stream's last event), by endpoint.",
    ["endpoint"],
    buckets=LATENCY_BUCKETS_S,
)
WAITING = Gauge("pixelpipe_gateway_calls_waiting", "Calls published to the pipeline and waiting for their result, now.")


def endpoint_label(path: str) -> str:
    """A path as a bounded label: its route, ``/v1/files`` for any file, else ``other``."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/files/"):
        return "/v1/files"
    return "other"


class MetricsMiddleware:
    """Counts every HTTP call by endpoint and status and times it to the last byte of its answer (pure ASGI, so a
    streamed answer is timed whole and its body is never buffered)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_label(scope.get("path", ""))
        status = 500  # an exception before any answer: Starlette's error handler answers 500
        started_s = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            REQUESTS.labels(endpoint, str(status)).inc()
            REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started_s)
