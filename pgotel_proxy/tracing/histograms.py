"""Latency histograms per statement shape, for every statement the proxy sees, sampled or not.

Owned here, in the span process: the histogram state (:class:`LatencyHistograms`),
what a statement record adds to it, its exemplars, its bounded series, the
compact snapshot the span process reports to the relay (``/metrics`` renders
it, ``admin``), and the OTLP metrics export (:class:`MetricsExport`).

Metric: OpenTelemetry's database client convention, ``db.client.operation.duration``
(seconds, a histogram with the convention's explicit bucket boundaries
:data:`BOUNDS`), with the attributes ``db.query.summary``,
``db.operation.name``, ``db.namespace``, ``error.type`` and
``db.response.status_code`` (the SQLSTATE of a failed statement, as on spans).
The proxy sits on the wire between the application and the server, not in
the client library: a duration here is from the statement's first message
passing the proxy to its completion passing back, which is the client's
operation less the network between the client and the proxy. The name is
kept so that dashboards built for the convention (and for client libraries'
own histograms) read it; the spans beside it are SERVER spans because they
stand for the database's side in a trace, which is a different question.

Every statement counts: the relay's pre-sampler (``sampling.Presampler``)
would leave most statements out before they reach this process, so while
histograms are on the relay does not pre-sample (``process.ProcessTracer``)
and every record is handed over. The cost is the relay's packing and the
hand-over of statements a low sample rate does not trace; what it buys is
counts equal to the statements seen, and the shape's analysis (summary,
operation) done here rather than in the relay, which keeps the relay's
per-statement work what it is at a sample rate of 1.

Cardinality: one series per (summary, operation, namespace, error type), at
most ``max_series`` of them, admitted in the order they first occur; a
statement of any other series is recorded in one ``other`` series (its
``db.query.summary`` is ``other``, no other attribute) and counted in
``latency_series_overflow``. Series are cumulative and never evicted: moving
a series out would make its counts go down.

Exemplars: each bucket of each series keeps the trace and span ids of one
sampled statement that fell in it; a bucket without one, or whose exemplar is
older than :data:`EXEMPLAR_MAX_AGE_NS`, asks the next statements that fall in
it (:meth:`LatencyHistograms.observe` says which) and the span helper takes
the ids of the statement span it builds for them.

One source: Cython compiles this file where it and a C compiler were there at
install time (pure-Python mode, the types of the per-record loop
:func:`_observe` in ``histograms.pxd``), and it runs as it is otherwise, or
with ``PGOTEL_PURE_PYTHON=1`` (``protocol/_impl.py``);
``tests/test_latency_histograms.py`` holds the two builds to the same counts.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left

try:
    import cython
except ImportError:  # no Cython: the module runs interpreted
    from ..protocol._nocython import cython

from opentelemetry.semconv.attributes.db_attributes import (
    DB_NAMESPACE,
    DB_OPERATION_NAME,
    DB_QUERY_SUMMARY,
    DB_RESPONSE_STATUS_CODE,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.metrics.db_metrics import DB_CLIENT_OPERATION_DURATION

from ..shape import StatementKeys, blank_code, statement_key
from ..stats import LATENCY_BOUNDS, STATS
from . import sqlinfo
from .otlp import encoded_span_facts

__all__ = ["BOUNDS", "COMPILED", "METRIC_NAME", "OTHER", "LatencyHistograms", "MetricsExport", "attributes_of",
           "span_ids"]

log = logging.getLogger("pgotel_proxy.tracing")

#: The metric's name, as OpenTelemetry's database conventions name it.
METRIC_NAME = DB_CLIENT_OPERATION_DURATION
#: Bucket upper bounds in seconds: the convention's explicit boundaries.
BOUNDS = LATENCY_BOUNDS
#: db.query.summary of the series statements beyond the series limit go to.
OTHER = "other"
_OTHER_KEY = (OTHER, None, None, None)
#: An exemplar older than this is replaced by the next sampled statement of its bucket.
EXEMPLAR_MAX_AGE_NS = 10_000_000_000
_WANTED_PER_BATCH = 64  # records of one batch built alone to catch an exemplar (the rest go in compiled runs)
_SHAPES_MAX = 8192  # statement texts whose (summary, operation) are remembered
#: True when this module was compiled by Cython.
COMPILED: bool = cython.compiled


class _Series:
    """One series: bucket counts (the last is +Inf), their sum of seconds, and an exemplar a bucket."""

    __slots__ = ("counts", "total", "low", "high", "exemplars")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.total = 0.0
        self.low = float("inf")  # the smallest and largest durations, in seconds (OTLP's min and max)
        self.high = 0.0
        # per bucket: (trace_id, span_id, seconds, unix ns) or None
        self.exemplars: list = [None] * (len(BOUNDS) + 1)


class LatencyHistograms:
    """The histogram state of the span process (module docstring); used by its reading thread."""

    def __init__(self, max_series: int = 200) -> None:
        self.max_series = max_series
        self.series: dict[tuple, _Series] = {}
        self.start_ns = time.time_ns()
        self.changes = 0  # observations so far: a report carries a snapshot only when it moved
        self._shapes: dict[str, tuple] = {}

    # ------------------------------------------------------------ recording

    def observe(self, records: list, namespace: str | None, keys: StatementKeys | None = None) -> list:
        """Record each of one connection's finished ``records``; the ones whose bucket wants an exemplar.

        Returns (index in ``records``, series, bucket, seconds, end ns) for at
        most ``_WANTED_PER_BATCH`` records, in order. ``keys`` receives each
        text's shape key (``shape.statement_key``), for the span builder.
        """
        if keys is None:
            keys = StatementKeys()
        wanted = _observe(self, records, namespace, keys, time.time_ns() - EXEMPLAR_MAX_AGE_NS)
        self.changes += len(records)
        return wanted

    @staticmethod
    def exemplar(wanted: tuple, span) -> None:
        """Keep the ids of ``span`` (the statement span built for a wanted record) as its bucket's exemplar."""
        ids = span_ids(span)
        if ids is not None:
            _, series, bucket, seconds, end = wanted
            series.exemplars[bucket] = (ids[0], ids[1], seconds, end or time.time_ns())

    # ------------------------------------------------------------- reading

    def snapshot(self) -> list:
        """The state as plain values (marshal-able): one tuple a series.

        (summary, operation, namespace, error type, bucket counts, sum of
        seconds, (min, max) seconds, exemplars as (bucket, trace id hex, span id hex,
        seconds, unix ns)).
        """
        out = []
        for (summary, operation, namespace, code), series in list(self.series.items()):
            exemplars = tuple((i, f"{e[0]:032x}", f"{e[1]:016x}", e[2], e[3])
                              for i, e in enumerate(list(series.exemplars)) if e is not None)
            out.append((summary, operation, namespace, code, tuple(series.counts), series.total,
                        (series.low, series.high), exemplars))
        return out


def _shape(shapes: dict, sql: str, keys: StatementKeys) -> tuple:
    """(summary, operation) of a statement text, remembered in ``shapes`` per text (a traceparent's value aside).

    The text's shape key goes into ``keys`` for the span builder, which keys the same records next.
    """
    q = keys[sql] = statement_key(sql)
    # (a text without a key, such as a SET of a context channel with a new traceparent each
    # time, is still one shape to the analysis: sqlinfo keys its cache by the blanked code too;
    # a text the blanking refuses is its own key, in a tuple: it may hold a blank's "\x01")
    key = q[0] if q is not None else (blank_code(sql) or (sql,))
    hit = shapes.get(key)
    if hit is None:
        # (the analysis reads past comments: no sqlcomment parse, which the span builder counts)
        info = sqlinfo.analyze(sql)
        hit = (info.summary or None, info.operation or None)
        if len(shapes) >= _SHAPES_MAX:
            shapes.clear()  # bounded; refilled by the texts in use
        shapes[key] = hit
    return hit


def _observe(hist: LatencyHistograms, records: list, namespace, keys: StatementKeys, stale: int) -> list:
    """:meth:`LatencyHistograms.observe`'s loop: an exemplar older than ``stale`` (unix ns) is renewed."""
    wanted: list = []
    room = _WANTED_PER_BATCH  # records that may still be wanted
    series_of = hist.series
    shapes = hist._shapes
    # A text repeated in one hand-over arrives as one shared object (protocol/records.py):
    # its shape is looked up once.
    # ... and the series of its statements that succeed, once.
    last_sql, last_shape, last_ok_series, last_ok_overflow = None, (None, None), None, False
    index = -1
    for rec in records:
        index += 1
        sql = rec.sql
        if sql is not last_sql:
            last_sql, last_shape = sql, (_shape(shapes, sql, keys) if sql else (None, None))
            last_ok_series = None
        error = rec.error
        results = rec.results
        if error is None and results:
            for res in results:
                if res.error is not None:
                    error = res.error
                    break
        if error is None and last_ok_series is not None:
            series = last_ok_series
            if last_ok_overflow:
                STATS.latency_series_overflow += 1
        else:
            summary, operation = last_shape
            key = (summary, operation, namespace, error.get("C") if error else None)
            series = series_of.get(key)
            overflow = False
            if series is None:
                if len(series_of) - (_OTHER_KEY in series_of) >= hist.max_series:
                    overflow = True
                    STATS.latency_series_overflow += 1
                    series = series_of.get(_OTHER_KEY)
                    if series is None:
                        series = series_of[_OTHER_KEY] = _Series()
                else:
                    series = series_of[key] = _Series()
            if error is None:
                last_ok_series, last_ok_overflow = series, overflow
        start = rec.start_ns
        end = rec.end_ns or rec.bind_end_ns or rec.parse_end_ns or start
        seconds = (end - start) / 1e9 if end > start else 0.0
        bucket = bisect_left(BOUNDS, seconds)
        series.counts[bucket] += 1
        series.total += seconds
        if seconds < series.low:
            series.low = seconds
        if seconds > series.high:
            series.high = seconds
        if room:
            held = series.exemplars[bucket]
            if held is None or held[3] < stale:
                wanted.append((index, series, bucket, seconds, end))
                room -= 1
    return wanted


def attributes_of(summary, operation, namespace, code) -> dict:
    """A series' OpenTelemetry attributes."""
    attrs = {}
    if summary:
        attrs[DB_QUERY_SUMMARY] = summary
    if operation:
        attrs[DB_OPERATION_NAME] = operation
    if namespace:
        attrs[DB_NAMESPACE] = namespace
    if code:
        attrs[ERROR_TYPE] = code
        attrs[DB_RESPONSE_STATUS_CODE] = code
    return attrs


def span_ids(span) -> tuple[int, int] | None:
    """(trace_id, span_id) of a span as the span builder appends it: a ReadableSpan, or encoded.

    Encoded: the ``ScopeSpans.spans`` field (its tag and length, then the Span
    message), alone or as the last item of (resource, scope, field).
    """
    context = getattr(span, "context", None)
    if context is not None:
        return context.trace_id, context.span_id
    facts = encoded_span_facts(span[2] if type(span) is tuple else span)
    return None if facts is None else (facts[0], facts[1])


class MetricsExport:
    """The histograms as OTLP metrics, to the spans' endpoint, every ``interval`` seconds from a thread.

    The state is read as a snapshot and handed to opentelemetry-exporter-otlp's
    metric exporter as the SDK's metric data (cumulative temporality): no SDK
    instrument is recorded into per statement. Only this thread exports, so a
    collector that is down (the exporter retries for up to its timeout) holds
    neither the building of spans nor a flush; shutdown waits for the last
    export within its deadline.
    """

    def __init__(self, histograms: LatencyHistograms, exporter, resource, interval: float) -> None:
        self.histograms = histograms
        self.exporter = exporter
        self.resource = resource
        self.interval = interval
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pgotel-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.export()
            if self._stopping:
                break
        try:
            self.exporter.shutdown()
        except Exception:
            log.debug("metric exporter shutdown failed", exc_info=True)

    def export_soon(self) -> None:
        """Export now, from the thread (a flush: what was recorded so far reaches the collector soon)."""
        self._wake.set()

    def metrics_data(self):
        from opentelemetry.sdk.metrics import Exemplar
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Histogram,
            HistogramDataPoint,
            Metric,
            MetricsData,
            ResourceMetrics,
            ScopeMetrics,
        )
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from .. import __version__

        now = time.time_ns()
        start = self.histograms.start_ns
        points = []
        for summary, operation, namespace, code, counts, total, (low, high), exemplars \
                in self.histograms.snapshot():
            points.append(HistogramDataPoint(
                attributes=attributes_of(summary, operation, namespace, code),
                start_time_unix_nano=start, time_unix_nano=now, count=sum(counts), sum=total,
                bucket_counts=list(counts), explicit_bounds=list(BOUNDS),
                min=low, max=high,
                exemplars=[Exemplar({}, seconds, at, int(span_hex, 16), int(trace_hex, 16))
                           for _, trace_hex, span_hex, seconds, at in exemplars],
            ))
        if not points:
            return None
        metric = Metric(name=METRIC_NAME, description="Duration of database client operations.", unit="s",
                        data=Histogram(data_points=points,
                                       aggregation_temporality=AggregationTemporality.CUMULATIVE))
        scope = InstrumentationScope("pgotel_proxy", __version__)
        return MetricsData(resource_metrics=[ResourceMetrics(
            resource=self.resource, scope_metrics=[ScopeMetrics(scope=scope, metrics=[metric], schema_url="")],
            schema_url="")])

    def export(self) -> None:
        """Export the state (on the thread)."""
        try:
            data = self.metrics_data()
            if data is not None:
                self.exporter.export(data)
        except Exception:  # a collector's trouble must not stop the span process
            log.warning("could not export the latency histograms", exc_info=True)

    def shutdown(self, timeout: float) -> None:
        """Export a last time and stop, waiting at most ``timeout`` seconds."""
        self._stopping = True
        self._wake.set()
        self._thread.join(max(0.0, timeout))

