"""The span process's work: statement records → spans → server-side enrichment → the export pipeline.

:func:`pgotel_proxy.tracing.process.child_main` (the helper process) owns one
:class:`SpanHelper` and calls it on its one reading thread: ``build`` for
each connection's finished records as they arrive, ``close`` and ``forget``
for a connection that ended or whose statements went unseen, ``tick`` while
it waits for input. The :class:`~.spans.SpanBuilder` does sqlcommenter
parsing, SQL summaries and attributes; when server-side enrichment is on
(:mod:`pgotel_proxy.enrich`), each statement's spans pass through the
enricher's join before they go to the :class:`~.export.ExportPipeline`,
which exports in batches from its own thread. While the export queue is more
than half full the build waits (up to a second at a time), so that a
collector slower than the traffic for a moment costs records waiting in the
socket and the relay's bounded buffer rather than dropped spans.

Every record also goes to the latency histograms (:mod:`.histograms`) when
they are on: before its spans are built, so that a record whose bucket wants
an exemplar is built alone and the ids of its statement span are taken. The
shape keys the histograms compute (``shape.StatementKeys``) are the builder's
too: each record's text is keyed once.

Nothing here bounds, samples ahead or drops records: that is the relay side's
(:class:`~.process.ProcessTracer`), in one place.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.semconv.attributes.db_attributes import DB_NAMESPACE

from ..config import Config
from ..shape import StatementKeys
from ..stats import STATS
from .export import ExportPipeline, make_exporter, make_metric_exporter
from .histograms import LatencyHistograms, MetricsExport
from . import otlp
from .spans import ConnState, SpanBuilder

__all__ = ["SpanHelper"]

log = logging.getLogger("pgotel_proxy.tracing")

_NO_EXPORTER = object()


class SpanHelper:
    """Owns the span builder, the enricher (when configured) and the export pipeline of the span process."""

    def __init__(self, config: Config, exporter: Any = _NO_EXPORTER) -> None:
        """``exporter``: the exporter the config names unless given (tests of this class alone)."""
        service = config.service_name or os.environ.get("OTEL_SERVICE_NAME") or "pgotel-proxy"
        resource = Resource.create({"service.name": service})
        self.builder = SpanBuilder(
            resource=resource,
            sample_rate=config.sample_rate,
            capture_parameters=config.capture_parameters,
            capture_literals=config.capture_query_literals,
            transaction_spans=config.transaction_spans,
            keep_errors=config.always_trace_errors,
            keep_slower_than_ns=int(config.always_trace_slower_than * 1e9),
            keep_rate=config.always_trace_rate,
        )
        self.shutdown_timeout = config.shutdown_timeout
        self.pipeline = ExportPipeline(
            make_exporter(config) if exporter is _NO_EXPORTER else exporter,
            queue_size=config.span_queue_size,
            batch_size=config.export_batch_size,
            interval=config.export_interval,
        )
        #: latency histograms over every statement (histograms.py), None when turned off
        self.latency = LatencyHistograms(config.latency_histogram_series) if config.latency_histograms else None
        # the shape keys of the hand-over being built: filled by the histograms, read by the builder
        self._keys = StatementKeys()
        if self.latency is not None:
            self.builder.statement_key = self._keys.__getitem__
        self.metrics: MetricsExport | None = None
        if self.latency is not None and exporter is _NO_EXPORTER:
            metric_exporter = make_metric_exporter(config)
            if metric_exporter is not None:
                # Each span process exports its own cumulative series (one a worker, a new one after
                # a restart, starting from zero): its own instance id keeps their streams apart.
                instance = Resource({"service.instance.id": uuid.uuid4().hex})
                self.metrics = MetricsExport(self.latency, metric_exporter, resource.merge(instance),
                                             config.latency_histogram_interval)
        self._enricher = None
        self.enricher = None  # sets the builder's output form

    @property
    def enricher(self):
        """Server-side records joined into spans (pgotel_proxy.enrich.Enricher), or None."""
        return self._enricher

    @enricher.setter
    def enricher(self, enricher) -> None:
        # Spans leave the builder encoded when nothing needs them as objects:
        # an exporter of otlp.py takes the bytes, the enricher edits spans, and
        # without an exporter (exporter = "none") they are only counted and dropped.
        self._enricher = enricher
        exporter = self.pipeline.exporter
        builder = self.builder
        encodable = exporter is None or bool(getattr(exporter, "accepts_encoded", False))
        builder.encode = enricher is None and encodable
        # ... and as their fields alone when the exporter is told whose they are (or there is none)
        builder.bare = builder.encode and (exporter is None or hasattr(exporter, "encoded_head"))
        if builder.bare and exporter is not None:
            exporter.encoded_head = builder._head
        # With an enricher, the statements its join adds attributes to at most (Joiner.plain)
        # are built encoded all the same, as (resource, scope, field) among the ReadableSpans.
        self._plain_encoded = enricher is not None and encodable and hasattr(enricher, "plain")

    def set_sample_rate(self, rate: float) -> None:
        self.builder.sample_rate = rate

    def queue_size_now(self) -> int:
        """Spans waiting to be exported, and statements waiting for their server-side records."""
        enricher = self._enricher
        return len(self.pipeline) + (enricher.pending() if enricher is not None else 0)

    # ------------------------------------------------------------- building

    def build(self, state: ConnState, records: list, spans: list, drawn: bool = False) -> None:
        """Append the spans of one connection's finished ``records`` to ``spans``.

        ``drawn``: the relay's draw kept these records' new roots (sampling.Presampler).
        """
        builder = self.builder
        state.presampled = drawn
        enriching = self._enricher is not None
        latency = self.latency
        wanted: list = []  # (index, ...) of records whose histogram bucket wants an exemplar, in order
        if latency is not None:
            keys = self._keys
            keys.clear()
            try:
                wanted = latency.observe(records, state.base_attrs.get(DB_NAMESPACE), keys)
            except Exception:  # the histograms must never cost a span
                log.exception("could not record statement latencies")
        if not enriching and not builder.transaction_spans:
            # Nothing joins per-record span runs and no transaction holds records:
            # straight to the per-statement builder (what build() would call).
            STATS.statements += len(records)
            one, kept = builder.one, builder.kept
            i, n = 0, len(records)
            pending = iter(wanted)
            want = next(pending, None)
            while i < n:
                stop = want[0] if want is not None else n
                if i < stop:
                    # statements of kept shapes, in one call (up to the next record wanted alone)
                    i, error = kept(state, records, i, stop, spans)
                    if error is not None:
                        log.error("could not build a span", exc_info=error)
                        i += 1
                        continue
                    if i >= stop:
                        continue
                mark = len(spans)
                try:
                    one(state, records[i], spans)
                except Exception:  # one odd statement must not stop the span process
                    log.exception("could not build a span")
                    del spans[mark:]
                else:
                    if i == stop and len(spans) > mark:
                        latency.exemplar(want, spans[mark])  # a statement's first span is its own
                if i == stop:
                    want = next(pending, None)
                i += 1
            return
        if enriching and self._plain_encoded and not builder.transaction_spans:
            self._build_enriched(state, records, spans, wanted)
            return
        build = builder.build
        by_record = {id(records[w[0]]): w for w in wanted}
        for rec in records:
            mark = len(spans)
            try:
                groups = build(state, rec, spans)
            except Exception:  # one odd statement must not stop the span process
                log.exception("could not build a span")
                del spans[mark:]
                continue
            if by_record:
                for built, start, end in groups:
                    want = by_record.get(id(built))
                    if want is not None and end > start:
                        latency.exemplar(want, spans[start])
            if enriching:
                self._enrich_groups(groups, spans)

    def _build_enriched(self, state: ConnState, records: list, spans: list, wanted: list) -> None:
        """``build`` with an enricher: the statements its join only adds attributes to go the encoded way.

        Those are built as without an enricher (runs of kept shapes in one
        compiled call, else the Python steps), their attributes added to their
        statement span's encoded field, and that span noted for lock waits;
        the others as ReadableSpans through the join.
        """
        builder = self.builder
        enricher = self._enricher
        latency = self.latency
        sessions = getattr(enricher, "sessions", None)
        pid = state.info.session.backend_pid
        by_index = {w[0]: w for w in wanted}
        decided = []  # per record: the attributes the join adds, or None (the full join)
        for rec in records:
            try:
                decided.append(enricher.plain(rec, pid))
            except Exception:  # enrichment must never cost a span
                log.exception("could not join server-side records")
                decided.append(None)

        def finish(index: int, start: int, end: int) -> None:
            """The record ``records[index]`` built encoded into ``spans[start:end]``: its join and exemplar."""
            if end <= start:
                return  # not sampled
            want = by_index.get(index)
            if want is not None:
                latency.exemplar(want, spans[start])
            first = spans[start]  # a statement's first span is its own
            field = first[2] if type(first) is tuple else first
            attrs = decided[index]
            if attrs:
                field = otlp.with_attributes(field, attrs)
                spans[start] = (first[0], first[1], field) if type(first) is tuple else field
            if sessions is not None and pid is not None:
                sessions.note_encoded(pid, field)

        i, n = 0, len(records)
        while i < n:
            if decided[i] is None:
                mark = len(spans)
                try:
                    groups = builder.build(state, records[i], spans)
                except Exception:  # one odd statement must not stop the span process
                    log.exception("could not build a span")
                    del spans[mark:]
                else:
                    want = by_index.get(i)
                    if want is not None and len(spans) > mark:
                        latency.exemplar(want, spans[mark])
                    self._enrich_groups(groups, spans)
                i += 1
                continue
            stop = i + 1
            while stop < n and decided[stop] is not None:
                stop += 1
            STATS.statements += stop - i
            builder.encode = True
            try:
                while i < stop:
                    marks: list = []
                    after, error = builder.kept(state, records, i, stop, spans, marks)
                    marks.append(len(spans))
                    for k in range(after - i):
                        finish(i + k, marks[k], marks[k + 1])
                    i = after
                    if i >= stop:
                        break
                    if error is not None:
                        log.error("could not build a span", exc_info=error)
                    else:  # a shape not kept yet, or a record kept_run leaves to the Python steps
                        mark = len(spans)
                        try:
                            builder.one(state, records[i], spans)
                        except Exception:  # one odd statement must not stop the span process
                            log.exception("could not build a span")
                            del spans[mark:]
                        else:
                            finish(i, mark, len(spans))
                    i += 1
            finally:
                builder.encode = False

    def close(self, state: ConnState, spans: list) -> None:
        """The connection ended: a transaction it left open is built now."""
        if self.builder.transaction_spans:
            self._enrich_groups(self.builder.flush_connection(state, spans), spans)

    def export(self, spans: list) -> None:
        """Hand built spans to the export pipeline, waiting while it is more than half full."""
        if spans:
            STATS.spans_started += len(spans)
            self.pipeline.put_paced(spans, tick=self.tick)

    # ------------------------------------ server-side enrichment (pgotel_proxy.enrich)

    def _enrich_groups(self, groups: list, spans: list) -> None:
        """Let the enricher join each record's run of spans (from the last, so indexes hold)."""
        if self._enricher is None:
            return
        for rec, start, end in reversed(groups):
            if end > start:
                spans[start:end] = self._enriched(rec, spans[start:end])

    def _enriched(self, rec, spans: list) -> list:
        try:
            return self._enricher.statement(rec, spans)
        except Exception:  # enrichment must never cost a span
            log.exception("could not join server-side records")
            return spans

    def tick(self, final: bool = False) -> None:
        """Export the enriched spans whose wait is over (all of them when ``final``)."""
        enricher = self._enricher
        if enricher is None:
            return
        try:
            ready = enricher.release_all() if final else enricher.tick()
        except Exception:
            log.exception("could not join server-side records")
            return
        if ready:
            STATS.spans_started += len(ready)
            self.pipeline.put(ready)

    # ------------------------------------------------------------ lifecycle

    def flush(self, timeout: float = 5.0) -> None:
        """Export everything built so far, statements waiting for server-side records included."""
        deadline = time.monotonic() + timeout
        while self._enricher is not None and self._enricher.pending() and time.monotonic() < deadline:
            time.sleep(0.01)  # statements waiting for server-side records (at most join_timeout)
            self.tick()
        self.pipeline.flush(max(0.0, deadline - time.monotonic()))
        if self.metrics is not None:
            self.metrics.export_soon()

    def shutdown(self, timeout: float | None = None) -> None:
        """Release what the enricher holds and flush it all, within ``timeout`` (``shutdown_timeout``)."""
        deadline = time.monotonic() + max(0.0, self.shutdown_timeout if timeout is None else timeout)
        if self._enricher is not None:
            self._enricher.stop(max(0.0, deadline - time.monotonic()))
            self.tick(final=True)
        self.pipeline.shutdown(max(0.0, deadline - time.monotonic()))
        if self.metrics is not None:
            self.metrics.shutdown(deadline - time.monotonic())
