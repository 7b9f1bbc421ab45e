"""What the wire shows about the client on the execute span, against the real test server.

``pgotel.execute.first_row_offset_ms``: how long after the start of the span
holding execute the first row (DataRow, or CopyData of COPY TO) arrived; absent
when none came (psycopg). ``pgotel.client_wait_ms``: how long the relay stopped
reading the server because the client did not read (a raw client that sleeps
before reading a large result), on the asyncio relay and on the compiled pump;
absent for a client that keeps up.
"""

from __future__ import annotations

import ssl
import time

import psycopg
import pytest

from pgotel_proxy.proxy import server as proxy_server
from pgotel_proxy.proxy.tls import COMPILED as COMPILED_TLS
from rawpg import RawConn, message
from tracetree import children, comment, random_traceparent

FIRST_ROW = "pgotel.execute.first_row_offset_ms"
CLIENT_WAIT = "pgotel.client_wait_ms"


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
        # A shape split into its phases (a slow one, framing.py) has an execute span that starts at
        # the read bringing BindComplete, which may have brought the first rows too.
        assert_first_row(span, at_start=span.name == "execute")


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


# About 32 MB of rows: more than the socket buffers of both legs hold.
_BIG = "SELECT repeat('x', 1000) FROM generate_series(1, 32000)"
SLEEP = 1.5


def _slow_reader(proxy, sql: str, pumped: bool, tls: ssl.SSLContext | None = None) -> list:
    with RawConn("127.0.0.1", proxy.port, timeout=30, tls=tls) as raw:
        raw.startup()
        raw.send(message(b"Q", sql.encode() + b"\x00"))
        time.sleep(SLEEP)  # the result fills every buffer on its way, then waits
        (conn,) = proxy.server.connections  # the relay the test means
        assert (conn.pump_id is not None and conn.pump_observes) if pumped else conn.pump_id is None
        msgs = raw.read_until_ready()
        raw.query("SELECT 1")
    return msgs


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.mark.parametrize(("pumped", "tls"), [(False, False), (True, False), (True, True)],
                         ids=["asyncio", "pump", "pump-tls-client"])
def test_a_client_that_does_not_read_makes_the_server_wait(make_proxy, otlp, certs, pumped, tls):
    if tls and not COMPILED_TLS:
        pytest.skip("compiled TLS not built")
    proxy = make_proxy(**({"client_tls_cert": certs["proxy_cert"], "client_tls_key": certs["proxy_key"]} if tls else {}))
    if not pumped:
        proxy.server._pump_failed = True  # as without the compiled pump, or phase_timing = "flush"
    elif proxy_server.Pump is None:
        pytest.skip("compiled pump not built")
    ctx, fast = random_traceparent(), random_traceparent()
    msgs = _slow_reader(proxy, comment(_BIG, ctx), pumped, _tls_context() if tls else None)
    assert sum(1 for t, _ in msgs if t == "D") == 32000
    with RawConn("127.0.0.1", proxy.port, timeout=30) as raw:
        raw.startup()
        assert [t for t, _ in raw.query(comment("SELECT 1", fast))] == ["T", "D", "C", "Z"]
    (span,) = wait_statements(otlp, ctx.trace_id, 1)
    assert_first_row(span)
    (quick,) = wait_statements(otlp, fast.trace_id, 1)
    assert CLIENT_WAIT not in quick.attributes
    waited = span.attributes.get(CLIENT_WAIT)
    assert waited is not None, span
    # Most of the sleep, the proxy's read of the server was paused; never longer than the execution.
    assert SLEEP * 1000 * 0.5 <= waited <= (span.end_ns - span.start_ns) / 1e6, span
