"""What the wire shows about the client on the execute span, against the real test server with psycopg.

``pgotel.execute.first_row_offset_ms``: how long after the start of the span
holding execute the first row (DataRow, or CopyData of COPY TO) arrived; absent
when none came.
"""

from __future__ import annotations

import psycopg
import pytest

from tracetree import children, comment, random_traceparent

FIRST_ROW = "pgotel.execute.first_row_offset_ms"


def execute_spans(spans, trace_id: str) -> list:
    """The spans holding execute of a trace's statements, in start order."""
    out = []
    for stmt in sorted((s for s in spans if s.trace_id == trace_id and s.kind == "SERVER"), key=lambda s: s.start_ns):
        held = [c for c in children(spans, stmt) if "execute" in c.name.split("+")]
        assert len(held) == 1, (stmt, held)
        out.append(held[0])
    return out


def wait_statements(otlp, trace_id: str, count: int) -> list:
    spans = otlp.wait_for(lambda ss: len([s for s in ss if s.trace_id == trace_id and s.kind == "SERVER"]) >= count
                          and len([s for s in ss if s.trace_id == trace_id]) >= 2 * count)
    found = execute_spans(spans, trace_id)
    assert len(found) == count, found
    return found


def assert_first_row(span, at_start: bool = False) -> float:
    """The span's first row's offset, within it; 0 only when ``at_start`` (the span starts at an arrival)."""
    offset = span.attributes.get(FIRST_ROW)
    assert offset is not None, span
    assert (0 <= offset if at_start else 0 < offset) and offset <= (span.end_ns - span.start_ns) / 1e6, span
    return offset


@pytest.mark.parametrize("cursor", ["extended", "simple"])
def test_rows_put_the_first_row_on_the_execute_span(make_proxy, otlp, cursor):
    proxy = make_proxy()
    ctx = random_traceparent()
    sql = comment("SELECT g, repeat('x', 200) FROM generate_series(1, %s) g", ctx)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cur = conn.cursor() if cursor == "extended" else psycopg.ClientCursor(conn)
        # The same shape again and again: spans of kept shapes (the compiled loop) carry it too.
        for _ in range(4):
            assert len(cur.execute(sql, (20000,)).fetchall()) == 20000
    for span in wait_statements(otlp, ctx.trace_id, 4):
        assert_first_row(span)


def test_copy_to_puts_the_first_row_on_the_execute_span(make_proxy, otlp):
    proxy = make_proxy()
    ctx = random_traceparent()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.cursor().copy(comment("COPY (SELECT generate_series(1, 50000)) TO STDOUT", ctx)) as copy:
            assert sum(len(chunk) for chunk in copy) > 0
    (span,) = wait_statements(otlp, ctx.trace_id, 1)
    assert_first_row(span)


def test_statements_without_rows_have_no_first_row(make_proxy, otlp):
    proxy = make_proxy()
    ctx = random_traceparent()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for cur in (conn.cursor(), psycopg.ClientCursor(conn)):
            for _ in range(2):
                assert cur.execute(comment("SELECT 1 WHERE %s", ctx), (False,)).fetchall() == []
        conn.execute(comment("SET application_name = 'no rows'", ctx))
    spans = wait_statements(otlp, ctx.trace_id, 5)
    assert not [s for s in spans if FIRST_ROW in s.attributes]


def test_a_simple_query_puts_it_on_the_statement_that_returned_rows(make_proxy, otlp):
    proxy = make_proxy()
    ctx = random_traceparent()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.pgconn.exec_(comment("SELECT 1 WHERE false; SELECT generate_series(1, 1000); SELECT 2", ctx).encode())
    spans = wait_statements(otlp, ctx.trace_id, 3)
    assert [FIRST_ROW in s.attributes for s in spans] == [False, True, False]
    # The second statement's span starts when the first one's completion arrived: its rows
    # may have come in the same read.
    assert_first_row(spans[1], at_start=True)
