"""The tracer: the one narrow interface the proxy talks to, and the builder thread behind it.

The proxy calls, on the event loop:

* ``wants_connection(session)`` once a connection is ready;
* ``open(info)`` → a per-connection handle whose ``statements(records)`` takes
  finished statement records (an O(1) append to a bounded queue; when the
  queue is full the records are dropped and counted: the relay never waits);
* ``handle.close()`` when the connection ends.

A builder thread turns records into spans (sqlcommenter parsing, SQL summaries,
attributes) and hands them to the export pipeline, which exports in batches
from its own thread. While the export queue is more than half full the
builder waits (up to a second at a time), so that a collector slower than
the traffic for a moment costs queued records rather than dropped spans; the
record queue's bound still protects the relay. Tracing can be switched on
and off and the sample ratio changed at runtime (admin endpoint, SIGHUP);
connections that were opened while tracing was off at start-up stay plain
relays.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

from opentelemetry.sdk.resources import Resource

from ..config import DEFAULT_EXPORT_BATCH
from ..stats import STATS
from .attributes import connection_attributes
from .export import ExportPipeline, make_exporter
from .sampling import Presampler
from .spans import ConnState, SpanBuilder

__all__ = ["Tracer", "connection_attributes"]

log = logging.getLogger("pgotel_proxy.tracing")

_CLOSE = object()


class _Handle:
    """Per-connection handle given to the proxy."""

    __slots__ = ("tracer", "state", "gap", "pre")

    def __init__(self, tracer: "Tracer", state: ConnState) -> None:
        self.tracer = tracer
        self.state = state
        self.gap = False  # statements went unseen since the builder last heard of this connection
        self.pre = Presampler(state.info.session.startup_params.get("application_name"))

    def statements(self, records: list) -> None:
        t = self.tracer
        q = t._records
        # The bound is in records (statements), not in queue entries (one per batch of them).
        if not t.enabled or t._records_in - t._records_out >= t.queue_size:
            if t.enabled:
                STATS.statements_dropped += len(records)
            if not self.gap:
                # The builder will not see these statements, and one of them may have changed
                # the session carrier: tell it (once per gap, so the queue stays bounded by
                # the number of connections) to forget what it knows.
                self.gap = True
                q.append((self.state, None, False))
            return
        self.gap = False
        builder = t.builder
        rate = builder.sample_rate
        if rate < 1.0 and not builder.transaction_spans:
            # New roots the sample rate leaves out stop here (sampling.Presampler).
            drawn, records, left_out = self.pre.split(records, rate)
            STATS.statements += left_out
            if drawn:
                t._records_in += len(drawn)
                q.append((self.state, drawn, True))
            if not records:
                return
        t._records_in += len(records)
        q.append((self.state, records, False))

    def close(self) -> None:
        if self.tracer.builder.transaction_spans:
            # A transaction still open when the connection ended is built now.
            self.tracer._records.append((self.state, _CLOSE, False))


class Tracer:
    """Owns the record queue, the builder thread and the export pipeline."""

    def __init__(
        self,
        *,
        exporter,
        resource: Resource,
        sample_rate: float = 1.0,
        enabled: bool = True,
        queue_size: int = 32768,
        batch_size: int = 512,
        export_interval: float = 1.0,
        capture_parameters: bool = False,
        capture_literals: bool = False,
        transaction_spans: bool = False,
        shutdown_timeout: float = 5.0,
        config: Any = None,
        thread: bool = True,
    ) -> None:
        self.config = config
        self.enabled = enabled
        self.queue_size = queue_size
        self.shutdown_timeout = shutdown_timeout
        self.builder = SpanBuilder(
            resource=resource,
            sample_rate=sample_rate,
            capture_parameters=capture_parameters,
            capture_literals=capture_literals,
            transaction_spans=transaction_spans,
        )
        self.pipeline = ExportPipeline(exporter, queue_size=queue_size, batch_size=batch_size, interval=export_interval)
        self._enricher = None
        self.enricher = None  # pgotel_proxy.enrich.attach() sets it: server-side records joined into spans
        self._records: deque = deque()
        # Records queued = in - out; each counter has one writer (the event loop,
        # the builder thread), so neither needs a lock.
        self._records_in = 0
        self._records_out = 0
        self._wake = threading.Event()
        self._stop = False
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pgotel-spans", daemon=True)
        if thread:
            self._thread.start()
        else:  # the owner calls build_now(); nothing is ever queued
            self._idle.set()
        # The interpreter's switch interval stays at its default (5 ms): a shorter one
        # makes threads trade the interpreter lock more often, which costs CPU per
        # transaction and does not shorten the relay's waits at the tail.

    @classmethod
    def from_config(cls, config: Any, exporter: Any = None, thread: bool = True) -> "Tracer":
        service = getattr(config, "service_name", None) or os.environ.get("OTEL_SERVICE_NAME") or "pgotel-proxy"
        resource = Resource.create({"service.name": service})
        return cls(
            exporter=exporter if exporter is not None else make_exporter(config),
            resource=resource,
            sample_rate=float(getattr(config, "sample_rate", 1.0)),
            enabled=bool(getattr(config, "tracing", True)),
            queue_size=int(getattr(config, "span_queue_size", 32768)),
            batch_size=int(getattr(config, "export_batch_size", DEFAULT_EXPORT_BATCH)),
            export_interval=float(getattr(config, "export_interval", 1.0)),
            capture_parameters=bool(getattr(config, "capture_parameters", False)),
            capture_literals=bool(getattr(config, "capture_query_literals", False)),
            transaction_spans=bool(getattr(config, "transaction_spans", False)),
            shutdown_timeout=float(getattr(config, "shutdown_timeout", 5.0)),
            config=config,
            thread=thread,
        )

    @property
    def enricher(self):
        return self._enricher

    @enricher.setter
    def enricher(self, enricher) -> None:
        # Spans leave the builder encoded when nothing needs them as objects:
        # an exporter of otlp.py takes the bytes, the enricher edits spans, and
        # without an exporter (exporter = "none") they are only counted and dropped.
        self._enricher = enricher
        exporter = self.pipeline.exporter
        builder = self.builder
        builder.encode = enricher is None and (exporter is None or bool(getattr(exporter, "accepts_encoded", False)))
        # ... and as their fields alone when the exporter is told whose they are (or there is none)
        builder.bare = builder.encode and (exporter is None or hasattr(exporter, "encoded_head"))
        if builder.bare and exporter is not None:
            exporter.encoded_head = builder._head

    # ------------------------------------------------------- runtime control

    @property
    def sample_rate(self) -> float:
        return self.builder.sample_rate

    def set_sample_rate(self, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("sample rate must be between 0 and 1")
        self.builder.sample_rate = rate
        log.info("sample rate set to %s", rate)

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        log.info("tracing %s", "enabled" if enabled else "disabled")

    def queue_size_now(self) -> int:
        """Statements waiting to be built plus spans waiting to be exported."""
        return self._records_in - self._records_out + len(self.pipeline)

    # -------------------------------------------------------- proxy facing

    def wants_connection(self, session) -> bool:
        return True

    def open(self, info) -> _Handle:
        return _Handle(self, ConnState(info, connection_attributes(info)))

    # ------------------------------------------------------ builder thread

    def _loop(self) -> None:
        q = self._records
        pipeline = self.pipeline
        while True:
            if not q:
                if self._stop:
                    break
                self._idle.set()
                self._wake.wait(0.02)
                self._wake.clear()
                self._enrich_tick()
                continue
            self._idle.clear()
            spans: list = []
            n = 0
            while q and n < 256:
                state, records, drawn = q.popleft()
                self._build(state, records, spans, drawn)
                n += 1
                if len(spans) >= pipeline.batch_size:  # to the queue a batch at a time (flow control below)
                    break
            self._enrich_tick()
            if spans:
                STATS.spans_started += len(spans)
                pipeline.put_paced(spans, tick=self._enrich_tick)
        self._enrich_tick(final=True)
        self._idle.set()

    def _build(self, state: ConnState, records, spans: list, drawn: bool = False) -> None:
        """Append the spans of one queue entry (records, a gap marker or a close) to ``spans``.

        ``drawn``: the relay's draw kept these records' new roots (sampling.Presampler).
        """
        if records is None:
            state.forget()
            return
        builder = self.builder
        if records is _CLOSE:
            self._enrich_groups(builder.flush_connection(state, spans), spans)
            return
        state.presampled = drawn
        self._records_out += len(records)
        enriching = self.enricher is not None
        if not enriching and not builder.transaction_spans:
            # Nothing joins per-record span runs and no transaction holds records:
            # straight to the per-statement builder (what build() would call).
            STATS.statements += len(records)
            one, kept = builder.one, builder.kept
            i, n = 0, len(records)
            while i < n:
                i, error = kept(state, records, i, spans)  # statements of kept shapes, in one call
                if error is not None:
                    log.error("could not build a span", exc_info=error)
                    i += 1
                    continue
                if i >= n:
                    break
                mark = len(spans)
                try:
                    one(state, records[i], spans)
                except Exception:  # one odd statement must not stop the thread
                    log.exception("could not build a span")
                    del spans[mark:]
                i += 1
            return
        build = builder.build
        for rec in records:
            mark = len(spans)
            try:
                groups = build(state, rec, spans)
            except Exception:  # one odd statement must not stop the thread
                log.exception("could not build a span")
                del spans[mark:]
                continue
            if enriching:
                self._enrich_groups(groups, spans)

    def build_now(self, state: ConnState, records, spans: list, drawn: bool = False) -> None:
        """Build one entry on the caller's thread (a tracer made with ``thread=False``)."""
        self._records_in += len(records) if isinstance(records, list) else 0
        self._build(state, records, spans, drawn)

    def _enrich_groups(self, groups: list, spans: list) -> None:
        """Let the enricher join each record's run of spans (from the last, so indexes hold)."""
        if self.enricher is None:
            return
        for rec, start, end in reversed(groups):
            if end > start:
                spans[start:end] = self._enriched(rec, spans[start:end])

    def flush(self, timeout: float = 5.0) -> None:
        """Build and export everything queued so far (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._records and time.monotonic() < deadline:
            time.sleep(0.005)
        self._idle.wait(max(0.0, deadline - time.monotonic()))
        while self.enricher is not None and self.enricher.pending() and time.monotonic() < deadline:
            time.sleep(0.01)  # statements waiting for server-side records (at most join_timeout)
        self.pipeline.flush(max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        """Build what is queued and flush it, all within ``shutdown_timeout``."""
        deadline = time.monotonic() + self.shutdown_timeout
        if self.enricher is not None:
            self.enricher.stop()
        self._stop = True
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(self.shutdown_timeout)
        self.pipeline.shutdown(max(0.0, deadline - time.monotonic()))

    # ------------------------------------ server-side enrichment (pgotel_proxy.enrich), builder thread

    def _enriched(self, rec, spans: list) -> list:
        try:
            return self.enricher.statement(rec, spans)
        except Exception:  # enrichment must never cost a span
            log.exception("could not join server-side records")
            return spans

    def _enrich_tick(self, final: bool = False) -> None:
        enricher = self.enricher
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
