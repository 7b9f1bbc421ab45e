"""The cheap paths of the tracer: the builder's span contexts and the record queue's bound and drop counts.

The builder makes SpanContext tuples without SpanContext's validating
constructor and shares parsed tracestates; these tests check the result is what
the constructor makes. The record queue between the relay and the builder is
bounded in statements (not in batches of them) and counts what it drops as
statements, apart from spans.
"""

from __future__ import annotations

import threading
import time

import psycopg
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState

from pgotel_proxy.stats import STATS
from pgotel_proxy.tracing import spans as spans_mod


def test_built_span_contexts_equal_the_constructors():
    cases = [
        (1, 1, 0, None, False),
        (2**128 - 1, 2**64 - 1, 1, None, True),
        (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, 0x103, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", True),
    ]
    for trace_id, span_id, flags, state, remote in cases:
        got = spans_mod._span_context(trace_id, span_id, flags, state, remote=remote)
        want = SpanContext(
            trace_id, span_id, is_remote=remote, trace_flags=TraceFlags(flags & 0xFF),
            trace_state=TraceState.from_header([state]) if state else None,
        )
        assert type(got) is SpanContext
        assert got == want and got.is_valid and got.is_remote is remote
        assert got.trace_flags == flags & 0xFF and isinstance(got.trace_flags, TraceFlags)
        assert list(got.trace_state.items()) == list(want.trace_state.items())


def test_phase_spans_share_the_statement_context(make_proxy):
    """Phase spans: same trace, flags and tracestate as their statement span, a valid id of their own."""
    kept = InMemorySpanExporter()
    proxy = make_proxy(span_exporter=kept)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"SELECT %s::int /*traceparent='{tp}',tracestate='rojo%%3D00f067aa0ba902b7'*/", (1,))
    proxy.flush()
    captured = kept.get_finished_spans()
    top = next(s for s in captured if s.kind is SpanKind.SERVER)
    phases = [s for s in captured if s.parent is not None and s.parent.span_id == top.context.span_id]
    assert {p.name for p in phases} == {"parse", "plan", "execute"}
    assert len({top.context.span_id, *(p.context.span_id for p in phases)}) == 4
    assert top.parent.is_remote and top.parent.span_id == 0xB7AD6B7169203331
    for span in [top, *phases]:
        c = span.context
        assert type(c) is SpanContext and c.is_valid and not c.is_remote
        assert c == SpanContext(c.trace_id, c.span_id, False, c.trace_flags, c.trace_state)
        assert c.trace_id == 0x0AF7651916CD43DD8448EB211C80319C and c.trace_flags.sampled
        assert list(c.trace_state.items()) == [("rojo", "00f067aa0ba902b7")]


class _Parked:
    """Holds the builder thread in its enrichment tick: a builder slower than the relay.

    A builder that falls behind is real (a CPU-starved process) but cannot be
    caused on cue; parking it here makes the queue fill deterministically.
    """

    def __init__(self) -> None:
        self.parked = threading.Event()
        self.release = threading.Event()

    def tick(self):
        self.parked.set()
        self.release.wait(10)
        return []

    def release_all(self):
        return []

    def pending(self):
        return 0

    def statement(self, rec, spans):
        return spans

    def stop(self):
        self.release.set()


def test_record_queue_is_bounded_in_statements_and_counts_them_as_statements(make_proxy):
    """Regression: the bound compared batches with span_queue_size, and statements were counted as spans.

    Four pipelined batches of four statements against a bound of 10: before,
    all 16 were queued (4 batches < 10); now the fourth batch finds 12
    statements queued and is dropped, counted in statements_dropped.
    """
    proxy = make_proxy(span_queue_size=10, export_batch_size=10, sample_rate=0.0, experimental={"span_process": False})
    # Handed over as each pipeline's answers arrive (the asyncio relay): the pump's relay would hand
    # them over as its log is read, several pipelines at once.
    proxy.server._pump_failed = True
    tracer = proxy.tracer
    # (never prepared: a prepared statement executed again is a root the relay's draw takes)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SELECT 1")  # the connection's handle is open before the builder parks
        proxy.flush()
        parked = _Parked()
        tracer.enricher = parked
        assert parked.parked.wait(5)
        before = STATS.snapshot()
        records_in = tracer._records_in
        for batch in range(4):
            # One Sync per pipeline, each waited for: the proxy hands over 4 records at a time.
            with conn.pipeline():
                for i in range(4):
                    # (a comment: the builder draws for it, so it is queued even at a rate of 0)
                    conn.execute("/* queued */ SELECT %s::int", (batch * 4 + i,))
        deadline = time.monotonic() + 5
        # every statement either queued or dropped (the last answers may still be relaying)
        while (tracer._records_in - records_in) + (STATS.statements_dropped - before["statements_dropped"]) < 16:
            assert time.monotonic() < deadline, "statements neither queued nor dropped"
            time.sleep(0.01)
        queued = tracer._records_in - tracer._records_out
        assert queued == 12, queued
        assert tracer.queue_size_now() == queued
        parked.release.set()
        tracer.enricher = None
        proxy.flush()
    after = STATS.snapshot()
    statements_dropped = after["statements_dropped"] - before["statements_dropped"]
    built = after["statements"] - before["statements"]
    assert statements_dropped == 4
    assert built == 12
    assert after["spans_dropped"] == before["spans_dropped"]

