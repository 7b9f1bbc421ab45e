"""In-process OTLP trace and metrics receiver for tests and benchmarks.

This module owns a small stand-in for an OpenTelemetry collector: it accepts
OTLP/HTTP (protobuf, optionally gzip/deflate compressed) on ``/v1/traces`` and
``/v1/metrics``, and OTLP/gRPC ``TraceService/Export`` and
``MetricsService/Export``; it decodes the real protobuf with
``opentelemetry-proto`` into immutable :class:`Span` records (and histogram
points, :class:`HistogramPoint`), and offers query helpers to assert whole
trace trees. Metrics are always accepted and not counted in the request
counts: ``mode`` plays a sick trace collector.

Both servers run on their own background threads, so the receiver works the
same whatever event loop (or none) the caller uses. A ``mode`` switch lets a
test play a sick collector: ``"error"`` rejects, ``"slow"`` answers late and
``"blackhole"`` swallows requests without ever answering.

It deliberately imports nothing from pytest so ``bench/`` can reuse it.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, NamedTuple

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = [
    "MODES",
    "Event",
    "HistogramPoint",
    "Link",
    "OtlpReceiver",
    "Span",
]

log = logging.getLogger(__name__)

MODES = ("ok", "error", "slow", "blackhole")

_KIND_NAMES = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}

_STATUS_NAMES = {
    trace_pb2.Status.STATUS_CODE_UNSET: "UNSET",
    trace_pb2.Status.STATUS_CODE_OK: "OK",
    trace_pb2.Status.STATUS_CODE_ERROR: "ERROR",
}

_TRACES_PATH = "/v1/traces"
_METRICS_PATH = "/v1/metrics"
# Attributes worth showing in a tree line; anything else would drown the shape.
_TREE_ATTRS = 4


class HistogramPoint(NamedTuple):
    """One histogram data point of an ExportMetricsServiceRequest."""

    name: str
    unit: str
    attributes: dict[str, Any]
    count: int
    sum: float
    bucket_counts: tuple[int, ...]
    explicit_bounds: tuple[float, ...]
    exemplars: tuple[tuple[str, str, float], ...]  # (trace id hex, span id hex, value)
    time_unix_nano: int
    temporality: int
    service: str | None


class Event(NamedTuple):
    name: str
    time_ns: int
    attributes: dict[str, Any]


class Link(NamedTuple):
    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Span:
    """One decoded span, with ids as lowercase hex and attributes as Python values."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: str = "UNSET"
    status_message: str = ""
    events: tuple[Event, ...] = ()
    links: tuple[Link, ...] = ()
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""
    trace_state: str = ""
    flags: int = 0  # OTLP span flags: HAS_IS_REMOTE (0x100), IS_REMOTE (0x200) of the parent

    # Dict fields make the generated hash unusable; a span is identified by its ids.
    def __hash__(self) -> int:
        return hash((self.trace_id, self.span_id))

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def is_root(self) -> bool:
        return self.parent_span_id is None

    def describe(self) -> str:
        """One line: name, kind, duration, status and the first few attributes."""
        parts = [f"{self.name} [{self.kind}] {self.duration_ms:.2f}ms"]
        if self.status_code != "UNSET":
            status = self.status_code
            if self.status_message:
                status += f"({self.status_message})"
            parts.append(status)
        shown = list(self.attributes.items())[:_TREE_ATTRS]
        if shown:
            attrs = ", ".join(f"{k}={v!r}" for k, v in shown)
            if len(self.attributes) > _TREE_ATTRS:
                attrs += ", ..."
            parts.append("{" + attrs + "}")
        return " ".join(parts)


# --------------------------------------------------------------------------
# protobuf -> Python


def _any_value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _key_values(value.kvlist_value.values)
    return getattr(value, which)


def _key_values(items: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in items}


def _hex_or_none(raw: bytes) -> str | None:
    return raw.hex() if raw else None


def decode_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    """Flatten an export request into spans, each carrying its resource and scope."""
    spans: list[Span] = []
    for resource_spans in request.resource_spans:
        resource = _key_values(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for s in scope_spans.spans:
                spans.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=_hex_or_none(s.parent_span_id),
                        name=s.name,
                        kind=_KIND_NAMES.get(s.kind, str(s.kind)),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=_key_values(s.attributes),
                        status_code=_STATUS_NAMES.get(s.status.code, str(s.status.code)),
                        status_message=s.status.message,
                        events=tuple(
                            Event(e.name, e.time_unix_nano, _key_values(e.attributes))
                            for e in s.events
                        ),
                        links=tuple(
                            Link(l.trace_id.hex(), l.span_id.hex(), _key_values(l.attributes))
                            for l in s.links
                        ),
                        resource=resource,
                        scope=scope,
                        trace_state=s.trace_state,
                        flags=s.flags,
                    )
                )
    return spans


# --------------------------------------------------------------------------
# transports


def decode_metrics(request: metrics_service_pb2.ExportMetricsServiceRequest) -> list[HistogramPoint]:
    """The histogram data points of a request (other metric kinds are left out)."""
    points = []
    for rm in request.resource_metrics:
        service = _key_values(rm.resource.attributes).get("service.name")
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.WhichOneof("data") != "histogram":
                    continue
                for dp in metric.histogram.data_points:
                    exemplars = tuple((e.trace_id.hex(), e.span_id.hex(), e.as_double) for e in dp.exemplars)
                    points.append(HistogramPoint(
                        metric.name, metric.unit, _key_values(dp.attributes), dp.count, dp.sum,
                        tuple(dp.bucket_counts), tuple(dp.explicit_bounds), exemplars, dp.time_unix_nano,
                        metric.histogram.aggregation_temporality, service))
    return points


class _HttpServer(ThreadingHTTPServer):
    # Non-daemon, joined handler threads: stop() must not leave any behind.
    daemon_threads = False
    block_on_close = True
    receiver: "OtlpReceiver"


class _HttpHandler(BaseHTTPRequestHandler):
    # HTTP/1.0 closes each connection after one answer, so no handler thread
    # lingers on an idle keep-alive socket and server_close() joins promptly.
    protocol_version = "HTTP/1.0"
    # Bounds how long a silent client can hold a handler (and thus stop()).
    timeout = 5
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("otlp http: " + format, *args)

    def do_GET(self) -> None:
        self._reply(405 if self.path == _TRACES_PATH else 404, b"", "text/plain")

    def do_POST(self) -> None:
        receiver = self.server.receiver
        path = self.path.split("?", 1)[0]
        if path == _METRICS_PATH:
            self._metrics(receiver)
            return
        if path != _TRACES_PATH:
            self._reply(404, b"not found", "text/plain")
            return
        try:
            body = self._body()
        except ValueError as exc:
            self._reply(400, f"bad request: {exc}".encode(), "text/plain")
            return
        mode = receiver._begin_request("http")

        if mode == "blackhole":
            # Accepted but never answered; the connection just closes at stop().
            receiver._stopping.wait()
            self.close_connection = True
            return
        if mode == "error":
            self._reply(503, b"receiver in error mode", "text/plain")
            return

        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype != "application/x-protobuf":
            self._reply(415, b"only application/x-protobuf is supported", "text/plain")
            return
        try:
            payload = _decompress(body, self.headers.get("Content-Encoding"))
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(payload)
        except (OSError, zlib.error, DecodeError, ValueError) as exc:
            log.warning("otlp http: undecodable request: %s", exc)
            self._reply(400, f"bad request: {exc}".encode(), "text/plain")
            return

        if mode == "slow" and receiver._stopping.wait(receiver.delay):
            # Stopping mid-delay: drop the request rather than hold stop().
            self.close_connection = True
            return
        receiver._store(decode_request(request))
        response = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self._reply(200, response, "application/x-protobuf")

    def _metrics(self, receiver: "OtlpReceiver") -> None:
        try:
            payload = _decompress(self._body(), self.headers.get("Content-Encoding"))
            request = metrics_service_pb2.ExportMetricsServiceRequest()
            request.ParseFromString(payload)
        except (OSError, zlib.error, DecodeError, ValueError) as exc:
            self._reply(400, f"bad request: {exc}".encode(), "text/plain")
            return
        receiver._store_metrics(decode_metrics(request))
        response = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
        self._reply(200, response, "application/x-protobuf")

    def _body(self) -> bytes:
        """The request body, by Content-Length or in chunks (OpenTelemetry JS's exporter streams it)."""
        if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""
        chunks = []
        while True:
            size = int(self.rfile.readline(100).split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                break
            chunks.append(self.rfile.read(size))
            if self.rfile.readline(3) != b"\r\n":
                raise ValueError("a chunk does not end with CRLF")
        while self.rfile.readline(1000) not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def _reply(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)


def _decompress(body: bytes, encoding: str | None) -> bytes:
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: "OtlpReceiver") -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802 - name fixed by the service
        receiver = self._receiver
        mode = receiver._begin_request("grpc")
        if mode == "blackhole":
            # Hold until stop(), but give the worker back once the caller has
            # given up: a bounded pool would otherwise starve later calls.
            while context.is_active() and not receiver._stopping.wait(0.05):
                pass
            context.abort(grpc.StatusCode.CANCELLED, "blackholed")
        if mode == "error":
            context.abort(grpc.StatusCode.UNAVAILABLE, "receiver in error mode")
        if mode == "slow" and receiver._stopping.wait(receiver.delay):
            context.abort(grpc.StatusCode.UNAVAILABLE, "receiver stopping")
        receiver._store(decode_request(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: "OtlpReceiver") -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802 - name fixed by the service
        self._receiver._store_metrics(decode_metrics(request))
        return metrics_service_pb2.ExportMetricsServiceResponse()


# --------------------------------------------------------------------------
# the receiver


class OtlpReceiver:
    """OTLP/HTTP + OTLP/gRPC trace receiver on 127.0.0.1 with ephemeral ports.

    ``mode`` and ``delay`` may be changed at any time; each request follows the
    mode current when it arrived.
    """

    def __init__(
        self,
        *,
        mode: str = "ok",
        delay: float = 5.0,
        http: bool = True,
        grpc_enabled: bool = True,
        grpc_workers: int = 8,
    ) -> None:
        self.mode = mode
        self.delay = delay
        self._want_http = http
        self._want_grpc = grpc_enabled
        self._grpc_workers = grpc_workers
        self._cond = threading.Condition()
        self._spans: list[Span] = []
        self._histograms: list[HistogramPoint] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self._stopping = threading.Event()
        self._http_server: _HttpServer | None = None
        self._http_thread: threading.Thread | None = None
        self._grpc_server: grpc.Server | None = None
        self._grpc_executor: ThreadPoolExecutor | None = None
        self._http_port: int | None = None
        self._grpc_port: int | None = None

    # -- lifecycle -------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {value!r}")
        self._mode = value

    @property
    def running(self) -> bool:
        return self._http_server is not None or self._grpc_server is not None

    def start(self) -> "OtlpReceiver":
        if self.running:
            raise RuntimeError("receiver already started")
        self._stopping = threading.Event()
        try:
            if self._want_http:
                self._start_http()
            if self._want_grpc:
                self._start_grpc()
        except BaseException:
            self.stop()
            raise
        log.debug("otlp receiver up: http=%s grpc=%s", self._http_port, self._grpc_port)
        return self

    def _start_http(self) -> None:
        server = _HttpServer(("127.0.0.1", 0), _HttpHandler)
        server.receiver = self
        self._http_server = server
        self._http_port = server.server_address[1]
        # A short poll interval keeps stop() snappy; serve_forever checks it.
        self._http_thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"otlp-receiver-http-{self._http_port}",
            daemon=True,
        )
        self._http_thread.start()

    def _start_grpc(self) -> None:
        self._grpc_executor = ThreadPoolExecutor(
            max_workers=self._grpc_workers, thread_name_prefix="otlp-receiver-grpc"
        )
        # SO_REUSEPORT would let two receivers share a port and split traffic.
        server = grpc.server(self._grpc_executor, options=[("grpc.so_reuseport", 0)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self), server)
        port = server.add_insecure_port("127.0.0.1:0")
        if not port:
            raise RuntimeError("could not bind a gRPC port")
        self._grpc_server = server
        self._grpc_port = port
        server.start()

    def stop(self) -> None:
        """Release held requests, close both listeners and join every thread."""
        self._stopping.set()
        http_server, self._http_server = self._http_server, None
        if http_server is not None:
            http_server.shutdown()
            http_server.server_close()
        if self._http_thread is not None:
            self._http_thread.join(timeout=10)
            self._http_thread = None
        grpc_server, self._grpc_server = self._grpc_server, None
        if grpc_server is not None:
            grpc_server.stop(grace=None).wait(timeout=10)
        if self._grpc_executor is not None:
            self._grpc_executor.shutdown(wait=True)
            self._grpc_executor = None

    def __enter__(self) -> "OtlpReceiver":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- endpoints -------------------------------------------------------

    @property
    def http_port(self) -> int:
        if self._http_port is None:
            raise RuntimeError("HTTP receiver not started")
        return self._http_port

    @property
    def grpc_port(self) -> int:
        if self._grpc_port is None:
            raise RuntimeError("gRPC receiver not started")
        return self._grpc_port

    @property
    def http_endpoint(self) -> str:
        """Base URL, as for OTEL_EXPORTER_OTLP_ENDPOINT (exporters append /v1/traces)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def http_traces_url(self) -> str:
        return self.http_endpoint + _TRACES_PATH

    @property
    def grpc_endpoint(self) -> str:
        """``host:port`` for an insecure gRPC exporter."""
        return f"127.0.0.1:{self.grpc_port}"

    # -- bookkeeping used by the transports ------------------------------

    def _begin_request(self, transport: str) -> str:
        mode = self._mode
        with self._cond:
            self._counts[(transport, mode)] += 1
            self._cond.notify_all()
        return mode

    def _store(self, spans: list[Span]) -> None:
        with self._cond:
            self._spans.extend(spans)
            self._cond.notify_all()

    def _store_metrics(self, points: list[HistogramPoint]) -> None:
        with self._cond:
            self._histograms.extend(points)
            self._cond.notify_all()

    # -- queries ---------------------------------------------------------

    @property
    def histogram_points(self) -> list[HistogramPoint]:
        """Every histogram data point received, in arrival order."""
        with self._cond:
            return list(self._histograms)

    def latest_histograms(self, name: str) -> dict[tuple, HistogramPoint]:
        """The last point received of each series (its attributes, sorted) of histogram ``name``."""
        latest: dict[tuple, HistogramPoint] = {}
        for point in self.histogram_points:
            if point.name == name:
                key = tuple(sorted(point.attributes.items()))
                held = latest.get(key)
                if held is None or point.time_unix_nano >= held.time_unix_nano:
                    latest[key] = point
        return latest

    def wait_for_histograms(self, name: str, predicate: Callable[[dict], Any],
                            timeout: float = 10.0) -> dict[tuple, HistogramPoint]:
        """Block until ``predicate(latest_histograms(name))`` is truthy; return that mapping."""
        deadline = time.monotonic() + timeout
        while True:
            latest = self.latest_histograms(name)
            if predicate(latest):
                return latest
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"histograms {name} not as expected within {timeout}s: {latest}")
            with self._cond:
                self._cond.wait(min(remaining, 0.1))

    @property
    def spans(self) -> list[Span]:
        with self._cond:
            return list(self._spans)

    def clear(self) -> None:
        """Forget received spans and histogram points (request counters are kept; see reset_counts)."""
        with self._cond:
            self._spans.clear()
            self._histograms.clear()

    def reset_counts(self) -> None:
        with self._cond:
            self._counts.clear()

    def request_count(self, mode: str | None = None, transport: str | None = None) -> int:
        """Requests received, optionally only those in ``mode`` / on ``transport``."""
        with self._cond:
            return sum(
                n
                for (t, m), n in self._counts.items()
                if (mode is None or m == mode) and (transport is None or t == transport)
            )

    @property
    def request_counts(self) -> dict[str, int]:
        """Requests received per mode, both transports together."""
        out = {m: 0 for m in MODES}
        with self._cond:
            for (_, m), n in self._counts.items():
                out[m] += n
        return out

    def wait_for(
        self, predicate: Callable[[list[Span]], Any], timeout: float = 10.0
    ) -> list[Span]:
        """Block until ``predicate(spans)`` is truthy; return the spans then seen.

        Raises AssertionError describing everything received on timeout.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot = list(self._spans)
                if predicate(snapshot):
                    return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Wake on every arrival, but re-check at least every 100ms in
                # case the predicate depends on something other than spans.
                self._cond.wait(min(remaining, 0.1))
        raise AssertionError(
            f"condition not met within {timeout}s; received {len(snapshot)} span(s):\n"
            + self.dump(snapshot)
        )

    def wait_for_spans(self, n: int, timeout: float = 10.0) -> list[Span]:
        return self.wait_for(lambda spans: len(spans) >= n, timeout)

    def by_name(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> Span:
        """The single span called ``name``; fails loudly if there are 0 or several."""
        found = self.by_name(name)
        if len(found) != 1:
            raise AssertionError(
                f"expected exactly one span {name!r}, found {len(found)}:\n" + self.dump()
            )
        return found[0]

    def trace(self, trace_id: str) -> list[Span]:
        return sorted(
            (s for s in self.spans if s.trace_id == trace_id), key=lambda s: s.start_ns
        )

    def children(self, span: Span) -> list[Span]:
        return sorted(
            (
                s
                for s in self.spans
                if s.trace_id == span.trace_id and s.parent_span_id == span.span_id
            ),
            key=lambda s: s.start_ns,
        )

    def tree(self, trace_id: str) -> str:
        """Indented text rendering of one trace; orphans (parent not received) are marked."""
        return _render_tree(self.trace(trace_id))

    def dump(self, spans: list[Span] | None = None) -> str:
        """Every received trace as a tree, for assertion messages."""
        spans = self.spans if spans is None else spans
        if not spans:
            return "  (no spans)"
        by_trace: dict[str, list[Span]] = {}
        for s in sorted(spans, key=lambda s: s.start_ns):
            by_trace.setdefault(s.trace_id, []).append(s)
        return "\n".join(
            f"trace {tid}:\n{_render_tree(members)}" for tid, members in by_trace.items()
        )


def _render_tree(spans: list[Span]) -> str:
    ids = {s.span_id for s in spans}
    kids: dict[str, list[Span]] = {}
    roots: list[Span] = []
    for s in sorted(spans, key=lambda s: s.start_ns):
        if s.parent_span_id is not None and s.parent_span_id in ids:
            kids.setdefault(s.parent_span_id, []).append(s)
        else:
            roots.append(s)

    lines: list[str] = []

    def walk(span: Span, depth: int) -> None:
        orphan = " (orphan: parent missing)" if span.parent_span_id and depth == 0 else ""
        lines.append("  " * (depth + 1) + span.describe() + orphan)
        for child in kids.get(span.span_id, []):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return "\n".join(lines)
