"""Admin HTTP listener: health, readiness, Prometheus metrics, status, and runtime tracing control.

Endpoints (aiohttp; binds 127.0.0.1 by default):

* ``GET /healthz``  — 200 while the process serves.
* ``GET /readyz``   — 200 when the upstream accepts a TCP connection, else 503.
* ``GET /metrics``  — Prometheus text format, from the counters in ``pgotel_proxy.stats``, and the
  span process's latency histograms (``tracing/histograms.py``) as
  ``db_client_operation_duration_seconds``; OpenMetrics (with the buckets' exemplars) when
  the scrape accepts ``application/openmetrics-text``.
* ``GET /status``   — JSON: version, tracing on/off, sample ratio, queue size, dropped spans.

With ``workers > 1`` (``proxy/workers.py``) worker 0 serves this endpoint:
metrics and status are summed over all workers (``/status`` lists each one),
and ``POST /tracing`` reaches every worker through the shared control block.
* ``POST /tracing`` — JSON ``{"enabled": bool, "sample_rate": float}`` (either key) changes
  tracing at runtime. When ``admin_token`` is set, state-changing requests need
  ``Authorization: Bearer <token>``; without a token configured they are only
  accepted from loopback clients.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from .. import __version__
from ..stats import LATENCY_BOUNDS, METRICS, PROMETHEUS_PREFIX, STATS

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["AdminServer"]

log = logging.getLogger("pgotel_proxy.admin")


class _StatsCollector:
    """Exposes STATS on scrape (the relay path never touches prometheus_client)."""

    def __init__(self, tracer, proxy=None) -> None:
        self.tracer = tracer
        self.proxy = proxy

    def collect(self):
        link = getattr(self.proxy, "worker_link", None)
        if link is not None:
            snap = link.totals()
        else:
            snap = STATS.snapshot()
            if self.tracer is not None:
                snap["span_queue_size"] = self.tracer.queue_size_now()
        for name, (kind, help_text) in METRICS.items():
            full = PROMETHEUS_PREFIX + name
            if kind == "counter":
                m = CounterMetricFamily(full, help_text)
            else:
                m = GaugeMetricFamily(full, help_text)
            m.add_metric([], snap[name])
            yield m


#: The latency histograms' name as OpenTelemetry's Prometheus conversion names
#: db.client.operation.duration (dots to underscores, the unit as a suffix).
LATENCY_METRIC = "db_client_operation_duration_seconds"
_LATENCY_LABELS = ("db_query_summary", "db_operation_name", "db_namespace", "error_type",
                   "db_response_status_code")
_LE = tuple(floatToGoString(bound) for bound in LATENCY_BOUNDS) + ("+Inf",)


class _LatencyCollector:
    """The span process's latency histograms, as its last report held them (``ProcessTracer.latency``)."""

    def __init__(self, tracer) -> None:
        self.tracer = tracer

    def collect(self):
        snapshot = getattr(self.tracer, "latency", None)
        if not snapshot:
            return
        family = HistogramMetricFamily(LATENCY_METRIC, "Duration of database client operations.",
                                       labels=_LATENCY_LABELS, unit="seconds")
        for summary, operation, namespace, code, counts, total, _, exemplars in snapshot:
            by_bucket = {e[0]: Exemplar({"trace_id": e[1], "span_id": e[2]}, e[3], e[4] / 1e9) for e in exemplars}
            buckets = []
            running = 0
            for i, le in enumerate(_LE):
                running += counts[i]
                held = by_bucket.get(i)
                buckets.append((le, running, held) if held is not None else (le, running))
            family.add_metric([summary or "", operation or "", namespace or "", code or "", code or ""],
                              buckets, total)
        yield family


class AdminServer:
    def __init__(self, config: Config, proxy, tracer) -> None:
        self.config = config
        self.proxy = proxy
        self.tracer = tracer
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatsCollector(tracer, proxy))
        if tracer is not None:
            self.registry.register(_LatencyCollector(tracer))
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self._token = config.admin_token.get_secret_value() if config.admin_token is not None else None

    async def start(self) -> None:
        from ..listen import bind_tcp

        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/status", self.status)
        app.router.add_post("/tracing", self.set_tracing)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # Bound here (not by aiohttp) so that an address in use is the configuration's
        # one-line error, like the main listener's.
        host, port = self.config.admin_address
        sock = bind_tcp("admin_listen", host, port)
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        log.info("admin listening on %s:%s", host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        p = self.proxy
        try:
            if p.upstream_path:
                _, w = await asyncio.wait_for(asyncio.open_unix_connection(p.upstream_path), 2)
            else:
                _, w = await asyncio.wait_for(asyncio.open_connection(p.upstream_host, p.upstream_port), 2)
            w.close()
        except (OSError, asyncio.TimeoutError) as exc:
            return web.Response(status=503, text=f"upstream {p.upstream_label} unreachable: {exc}\n")
        if p.draining:
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ready\n")

    async def metrics(self, request: web.Request) -> web.Response:
        self._observe_now()
        if "application/openmetrics-text" in request.headers.get("Accept", ""):
            body = openmetrics.generate_latest(self.registry)
            return web.Response(body=body, headers={"Content-Type": openmetrics.CONTENT_TYPE_LATEST})
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _observe_now(self) -> None:
        observe = getattr(self.proxy, "observe_now", None)  # what the pump relayed, observed before counting
        if observe is not None:
            observe()

    def status_dict(self) -> dict:
        self._observe_now()
        t = self.tracer
        link = getattr(self.proxy, "worker_link", None)
        d = {
            "version": __version__,
            "tracing": bool(t is not None and t.enabled),
            "sample_rate": t.sample_rate if t is not None else 0.0,
            "queue_size": t.queue_size_now() if t is not None else 0,
            "spans_dropped": STATS.spans_dropped,
            "connections_active": STATS.connections_active,
            "upstream": self.proxy.upstream_label,
        }
        if link is not None:
            totals = link.totals()
            d.update(queue_size=totals["span_queue_size"], spans_dropped=totals["spans_dropped"],
                     connections_active=totals["connections_active"], workers=link.workers_status())
        sources = getattr(self.proxy, "source_status", None)
        if sources:
            d["sources"] = sources
        return d

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status_dict())

    def _authorised(self, request: web.Request) -> bool:
        if self._token:
            got = request.headers.get("Authorization", "")
            return hmac.compare_digest(got.encode(), f"Bearer {self._token}".encode())
        peer = request.remote or ""
        try:
            return ipaddress.ip_address(peer).is_loopback
        except ValueError:
            return False

    async def set_tracing(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"error": "unauthorised"}, status=401)
        if self.tracer is None:
            return web.json_response({"error": "tracing was off at start-up; restart with tracing on"}, status=409)
        try:
            body = await request.json()
            rate, enabled = _tracing_request(body)
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        # Validated as a whole first: a request is applied entirely or not at all.
        if rate is not None:
            self.tracer.set_sample_rate(rate)
        if enabled is not None:
            self.tracer.set_enabled(enabled)
        link = getattr(self.proxy, "worker_link", None)
        if link is not None:
            link.publish_control(self.tracer.enabled, self.tracer.sample_rate)
        return web.json_response(self.status_dict())


def _tracing_request(body: Any) -> tuple[float | None, bool | None]:
    """(sample_rate, enabled) from a POST /tracing body; ValueError when anything in it is wrong."""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    unknown = set(body) - {"sample_rate", "enabled"}
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
    rate = body.get("sample_rate")
    if rate is not None:
        # bool is an int to Python, not a ratio to anyone.
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError("sample_rate must be a number from 0 to 1")
        rate = float(rate)
    enabled = body.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError("enabled must be true or false")
    return rate, enabled
