"""Exporters and the export pipeline: OTLP over HTTP/protobuf or gRPC, a console tree, bounded batching.

Both run in the span process (``tracing.helper.SpanHelper`` owns the one
pipeline); the console tree is printed on the stdout that process inherits
from the proxy.

The OTLP exporters are opentelemetry-exporter-otlp's own, subclassed only to
encode faster (``otlp.py``); they read the standard ``OTEL_EXPORTER_OTLP_*``
variables themselves. ``otlp_endpoint`` in
the config is a base URL with the standard meaning (``/v1/traces`` is
appended for HTTP). The latency histograms' metric exporter
(``make_metric_exporter``, stock, for ``histograms.MetricsExport``) goes to
the same endpoint and protocol (``/v1/metrics`` for HTTP).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from itertools import repeat
from typing import TYPE_CHECKING, Any, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from ..stats import STATS

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["make_exporter", "make_metric_exporter", "ConsoleTreeExporter", "ExportPipeline", "format_tree"]

log = logging.getLogger("pgotel_proxy.export")


def make_exporter(config: Config) -> SpanExporter | None:
    """The exporter the config asks for; None for ``exporter = "none"``."""
    if config.exporter == "none":
        return None
    if config.exporter == "console":
        return ConsoleTreeExporter()
    grpc, kw = _otlp_settings(config, "/v1/traces")
    if grpc:
        from .otlp import GrpcSpanExporter as GrpcExporter

        return GrpcExporter(**kw)
    from .otlp import HttpSpanExporter as HttpExporter

    return HttpExporter(**kw)


def make_metric_exporter(config: Config):
    """OpenTelemetry's OTLP metric exporter for the spans' endpoint and protocol; None unless spans go to OTLP."""
    if config.exporter != "otlp":
        return None
    grpc, kw = _otlp_settings(config, "/v1/metrics")
    if grpc:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        return GrpcExporter(**kw)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    return HttpExporter(**kw)


def _otlp_settings(config: Config, http_path: str) -> tuple[bool, dict[str, Any]]:
    """(gRPC or not, the exporter's keyword arguments) for one signal; ``http_path`` is its OTLP/HTTP path."""
    endpoint = config.otlp_endpoint
    kw: dict[str, Any] = {"timeout": config.export_timeout}
    if config.resolved_otlp_protocol() == "grpc":
        if endpoint:
            kw["endpoint"] = endpoint.split("://", 1)[-1] if endpoint.startswith("http://") else endpoint
            kw["insecure"] = not endpoint.startswith("https://")
        return True, kw
    if endpoint:
        kw["endpoint"] = endpoint.rstrip("/") + http_path
    return False, kw


def format_tree(spans: Sequence[ReadableSpan]) -> str:
    """Spans of one or more traces as indented trees with durations."""
    by_id = {s.context.span_id: s for s in spans}
    children: dict[int | None, list[ReadableSpan]] = {}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in by_id else None
        children.setdefault(parent, []).append(s)
    lines: list[str] = []

    def walk(span: ReadableSpan, depth: int) -> None:
        ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        attrs = span.attributes or {}
        extra = []
        for key in ("db.response.returned_rows", "db.response.status_code", "pgotel.timing.exact"):
            if key in attrs:
                extra.append(f"{key.rsplit('.', 1)[-1]}={attrs[key]}")
        status = " ERROR" if span.status.status_code.name == "ERROR" else ""
        lines.append(f"{'  ' * depth}{span.name}  {ms:.3f} ms{status}  {' '.join(extra)}".rstrip())
        for child in sorted(children.get(span.context.span_id, []), key=lambda s: s.start_time or 0):
            walk(child, depth + 1)

    roots = sorted(children.get(None, []), key=lambda s: s.start_time or 0)
    for root in roots:
        lines.append(f"trace {root.context.trace_id:032x}")
        walk(root, 1)
    return "\n".join(lines)


class ConsoleTreeExporter(SpanExporter):
    """Prints each exported batch as readable trace trees (for local use)."""

    def __init__(self, out=None) -> None:
        self.out = out or sys.stdout

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if spans:
            self.out.write(format_tree(spans) + "\n")
            self.out.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class ExportPipeline:
    """A bounded span queue drained by one thread that exports in batches.

    ``put`` never blocks: when the queue is full, spans are dropped and counted.
    """

    def __init__(self, exporter: SpanExporter | None, *, queue_size: int, batch_size: int, interval: float) -> None:
        self.exporter = exporter
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.interval = interval
        self._q: deque = deque()
        self._wake = threading.Event()
        self._stop = False
        self._in_flight = 0  # spans taken off the queue whose export has not returned yet
        self._flush_requested = False
        self._thread = threading.Thread(target=self._loop, name="pgotel-export", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._q)

    def put(self, spans: list[ReadableSpan]) -> None:
        q = self._q
        room = self.queue_size - len(q)
        if room < len(spans):
            STATS.spans_dropped += len(spans) - max(room, 0)
            spans = spans[: max(room, 0)]
        q.extend(spans)
        if len(q) >= self.batch_size:
            self._wake.set()

    def _loop(self) -> None:
        # Full batches leave as soon as they are complete; a partial one waits
        # for the interval (or a flush), as the SDK's BatchSpanProcessor does:
        # every request has a fixed cost (HTTP, a collector round trip), so
        # many small ones cost more CPU per span than few full ones.
        next_partial = time.monotonic() + self.interval
        while not self._stop:
            self._wake.wait(max(0.0, next_partial - time.monotonic()))
            self._wake.clear()
            now = time.monotonic()
            if self._flush_requested or now >= next_partial:
                self._flush_requested = False
                self._drain()
                next_partial = time.monotonic() + self.interval
            else:
                self._drain(full_only=True)
        self._drain()

    def _drain(self, deadline: float | None = None, full_only: bool = False) -> None:
        q = self._q
        while q:
            if deadline is not None and time.monotonic() > deadline:
                return
            if full_only and len(q) < self.batch_size:
                return
            # This thread is the only consumer: the queue cannot shrink under it.
            # (popleft mapped over the deque: no Python step per span)
            batch = list(map(deque.popleft, repeat(q, min(len(q), self.batch_size))))
            self._in_flight = len(batch)
            try:
                self._export(batch)
            finally:
                self._in_flight = 0

    def _export(self, batch: list[ReadableSpan]) -> None:
        exporter = self.exporter
        if exporter is None:
            return
        # otlp.py's exporters send a batch too large for one request in parts and
        # say how many spans arrived; any other exporter succeeds or fails whole.
        counted = getattr(exporter, "export_counted", None)
        try:
            if counted is not None:
                delivered = counted(batch)
            else:
                delivered = len(batch) if exporter.export(batch) is SpanExportResult.SUCCESS else 0
        except Exception as exc:  # an exporter bug must not end the thread
            log.warning("span export raised: %r", exc)
            delivered = 0
        STATS.spans_exported += delivered
        if delivered < len(batch):
            STATS.export_failures += 1
            STATS.spans_dropped += len(batch) - delivered

    def put_paced(self, spans: list, limit: float = 1.0, tick: Any = None) -> None:
        """put() for a builder, with flow control: in parts of a quarter of the queue, each once there is room.

        Before each part it waits, up to ``limit`` seconds, while the queue is
        more than half full, so a part finds room unless the export thread
        fell that far behind. A builder that kept building would only take
        the interpreter lock from the export thread to make spans that find
        no room. While it waits, records queue before it (the span process's
        socket and the relay's bounded buffer); only when those are full are
        statements dropped, and counted there. ``tick`` is called every 50 ms
        of waiting (the span helper's other duty: releasing enriched spans
        whose wait is over).
        Once the pipeline is shut down nothing waits: what finds no room is
        dropped (counted) at once.
        """
        part = max(1, self.queue_size // 4)
        for i in range(0, len(spans), part):
            self._wait_for_room(limit, tick)
            self.put(spans if len(spans) <= part else spans[i:i + part])

    def _wait_for_room(self, limit: float, tick: Any) -> None:
        now = time.monotonic()
        deadline, next_tick = now + limit, now + 0.05
        while len(self._q) > self.queue_size // 2 and now < deadline and not self._stop:
            if len(self._q) < self.batch_size:  # else a full batch is on its way: no partial one
                self.request_export()
            time.sleep(0.002)
            now = time.monotonic()
            if tick is not None and now >= next_tick:
                tick()
                next_tick = now + 0.05

    def request_export(self) -> None:
        """Export what is queued now, partial batches included, without waiting."""
        self._flush_requested = True
        self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Export what is queued now, including the batch on the wire; False when ``timeout`` ran out."""
        deadline = time.monotonic() + timeout
        while self._q or self._in_flight:
            if time.monotonic() >= deadline:
                return False
            self.request_export()
            time.sleep(0.005)
        return True

    def shutdown(self, timeout: float = 5.0) -> None:
        """Flush, then stop; everything, the exporter's own shutdown included, within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._stop = True
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        left = len(self._q) + self._in_flight
        if left:
            # A sick collector: give up on the rest rather than hold the process.
            STATS.spans_dropped += left
            self._q.clear()
            log.warning("shutdown: %s spans not exported within %ss", left, timeout)
        if self.exporter is not None:
            # The exporter may wait for its own request in flight; do not wait past the deadline.
            closer = threading.Thread(target=self._shutdown_exporter, name="pgotel-export-close", daemon=True)
            closer.start()
            closer.join(max(0.05, deadline - time.monotonic()))

    def _shutdown_exporter(self) -> None:
        try:
            self.exporter.shutdown()
        except Exception as exc:
            log.debug("exporter shutdown raised: %r", exc)
