"""The cheap paths of the tracer: the builder's span contexts.

The builder makes SpanContext tuples without SpanContext's validating
constructor and shares parsed tracestates; these tests check the result is what
the constructor makes, and what a collector receives of it. (The bound between
the relay and the span process, and its drop counts, are tests/test_span_process.py's.)
"""

from __future__ import annotations

import psycopg
from opentelemetry.trace import SpanContext, TraceFlags, TraceState

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


def test_phase_spans_share_the_statement_context(make_proxy, otlp):
    """Phase spans: same trace, flags and tracestate as their statement span, a valid id of their own."""
    proxy = make_proxy()
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"SELECT %s::int /*traceparent='{tp}',tracestate='rojo%%3D00f067aa0ba902b7'*/", (1,))
    proxy.flush()
    captured = otlp.wait_for(lambda got: sum(s.trace_id == "0af7651916cd43dd8448eb211c80319c" for s in got) >= 2)
    top = next(s for s in captured if s.kind == "SERVER")
    phases = [s for s in captured if s.parent_span_id == top.span_id]
    assert {p.name for p in phases} == {"parse+plan+execute"}  # one write, answered together
    assert len({top.span_id, *(p.span_id for p in phases)}) == 2
    assert top.parent_span_id == "b7ad6b7169203331"
    assert top.flags & 0x300 == 0x300  # its parent is remote (the application's span)
    for span in [top, *phases]:
        assert int(span.span_id, 16) != 0
        assert span.trace_id == "0af7651916cd43dd8448eb211c80319c"  # (exported: sampled)
        assert span.trace_state == "rojo=00f067aa0ba902b7"
    for span in phases:
        assert span.flags & 0x300 == 0x100  # a local parent
