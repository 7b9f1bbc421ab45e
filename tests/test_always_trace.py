"""Failed and slow statements are traced although sampling left them out (``always_trace_*``).

A statement under an unsampled parent (a traceparent with flags 00), or a new
root the sample rate's draw leaves out, makes no span, unless it failed or ran
longer than ``always_trace_slower_than``: then it is a new root (never a child
in the trace the application did not sample) linked to the carried context,
with ``pgotel.kept_because``, at most ``always_trace_rate`` a second, and the
statements past that bound are counted. The relay's own draw (latency
histograms off) hands such statements over too.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from pgotel_proxy.stats import STATS

from tracetree import comment, random_traceparent, server_spans

KEPT = "pgotel.kept_because"


def _failing(conn, sql: str) -> None:
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute(sql)


def _with_text(spans, marker: str) -> list:
    return [s for s in server_spans(spans) if marker in str(s.attributes.get("db.query.text", ""))]


@pytest.mark.parametrize("prepare", [False, True], ids=["extended", "prepared"])
def test_failed_and_slow_statements_under_an_unsampled_parent_are_linked_roots(make_proxy, otlp, prepare):
    # (sample rate 0: the later executions of a prepared statement, whose comment is not read
    # again, are new roots under the sample rate)
    proxy = make_proxy(always_trace_slower_than=0.2, sample_rate=0.0)
    parent = random_traceparent(sampled=False)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0 if prepare else None) as conn:
        for _ in range(3):
            conn.execute(comment("SELECT 'fast' AS unsampled_fast", parent))
        _failing(conn, comment("SELECT 1 / 0 AS unsampled_failing", parent))
        conn.execute(comment("SELECT pg_sleep(0.01) AS unsampled_sleep", parent))
        conn.execute(comment("SELECT pg_sleep(0.25) AS unsampled_sleep", parent))
        conn.execute(comment("SELECT 'last' AS unsampled_last", random_traceparent()))
    proxy.flush()
    otlp.wait_for(lambda got: _with_text(got, "unsampled_last"))
    spans = otlp.spans
    assert not [s for s in spans if s.trace_id == parent.trace_id], "a span inside the unsampled trace"
    assert _with_text(spans, "unsampled_fast") == []
    failing = _with_text(spans, "unsampled_failing")
    sleeps = _with_text(spans, "unsampled_sleep")
    assert len(failing) == 1 and len(sleeps) == 1, (failing, sleeps)
    assert sleeps[0].end_ns - sleeps[0].start_ns >= 200_000_000
    for span, reason in ((failing[0], "error"), (sleeps[0], "slow")):
        assert span.parent_span_id is None
        assert span.attributes[KEPT] == reason
        assert [(link.trace_id, link.span_id) for link in span.links] == [(parent.trace_id, parent.span_id)]
        # whole: its phase spans are in its own new trace
        assert [s for s in spans if s.parent_span_id == span.span_id]
        assert {s.trace_id for s in spans if s.parent_span_id == span.span_id} == {span.trace_id}
    assert failing[0].status_code == "ERROR"
    assert failing[0].trace_id != sleeps[0].trace_id


def test_a_failed_simple_query_under_an_unsampled_parent_is_kept(make_proxy, otlp):
    proxy = make_proxy()
    parent = random_traceparent(sampled=False)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        with pytest.raises(psycopg.errors.DivisionByZero):
            cur.execute(comment("SELECT 1 AS simple_fine; SELECT 1 / 0 AS simple_failing", parent))
    proxy.flush()
    got = otlp.wait_for(lambda got: _with_text(got, "simple_failing"))
    [span] = _with_text(got, "simple_failing")
    assert span.attributes[KEPT] == "error" and span.parent_span_id is None
    assert [(link.trace_id, link.span_id) for link in span.links] == [(parent.trace_id, parent.span_id)]
    assert _with_text(otlp.spans, "simple_fine") == []


@pytest.mark.parametrize("histograms", [True, False], ids=["histograms", "relay-draw"])
def test_failed_statements_are_kept_at_a_low_sample_rate(make_proxy, otlp, histograms):
    proxy = make_proxy(sample_rate=0.01, latency_histograms=histograms)
    n = 40
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        for i in range(n):
            conn.execute("SELECT %s::int AS rare_fine", (i,))
            _failing(conn, f"SELECT {i} / 0 AS rare_failing")
    proxy.flush()
    got = otlp.wait_for(lambda got: len(_with_text(got, "rare_failing")) >= n)
    failing = _with_text(got, "rare_failing")
    assert len(failing) == n
    assert all(s.parent_span_id is None and not s.links for s in failing)
    # kept by the rule unless the draw itself kept them (one in a hundred)
    assert sum(s.attributes.get(KEPT) == "error" for s in failing) >= n - 5
    assert len(_with_text(otlp.spans, "rare_fine")) < 8


def test_errors_are_not_kept_when_turned_off(make_proxy, otlp):
    proxy = make_proxy(sample_rate=0.0, always_trace_errors=False)
    parent = random_traceparent(sampled=False)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        _failing(conn, "SELECT 1 / 0 AS off_failing")
        _failing(conn, comment("SELECT 1 / 0 AS off_failing", parent))
        conn.execute(comment("SELECT 'last' AS off_last", random_traceparent()))
    proxy.flush()
    otlp.wait_for(lambda got: _with_text(got, "off_last"))
    assert _with_text(otlp.spans, "off_failing") == []


def test_the_rate_bound_drops_and_counts(make_proxy, otlp):
    proxy = make_proxy(sample_rate=0.0, always_trace_rate=3)
    proxy.flush()
    kept_before, over_before = STATS.statements_kept, STATS.statements_kept_over_rate
    n = 30
    started = time.monotonic()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(n):
            _failing(conn, f"SELECT {i} / 0 AS bounded_failing")
        conn.execute(comment("SELECT 'last' AS bounded_last", random_traceparent()))
    elapsed = time.monotonic() - started
    proxy.flush()
    otlp.wait_for(lambda got: _with_text(got, "bounded_last"))
    kept = len(_with_text(otlp.spans, "bounded_failing"))
    # a bucket of 3, refilled at 3 a second while they ran
    assert 3 <= kept <= 3 + int(3 * elapsed) + 1, (kept, elapsed)
    assert STATS.statements_kept - kept_before == kept
    assert STATS.statements_kept_over_rate - over_before == n - kept


def test_a_slow_statement_of_a_kept_shape_is_kept(make_proxy, otlp):
    """A shape already spanned on the connection is built by the compiled loop: it must not drop a slow one."""
    proxy = make_proxy(always_trace_slower_than=0.2)
    sampled, unsampled = random_traceparent(), random_traceparent(sampled=False)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        for _ in range(3):
            conn.execute(comment("SELECT pg_sleep(0.001) AS shape_sleep", sampled))
        conn.execute(comment("SELECT pg_sleep(0.25) AS shape_sleep", unsampled))
        conn.execute(comment("SELECT pg_sleep(0.001) AS shape_sleep", unsampled))
        conn.execute(comment("SELECT 'last' AS shape_last", sampled))
    proxy.flush()
    otlp.wait_for(lambda got: _with_text(got, "shape_last"))
    sleeps = _with_text(otlp.spans, "shape_sleep")
    assert [s.trace_id == sampled.trace_id for s in sleeps] == [True, True, True, False]
    kept = sleeps[-1]
    assert kept.attributes[KEPT] == "slow" and kept.parent_span_id is None
    assert [(link.trace_id, link.span_id) for link in kept.links] == [(unsampled.trace_id, unsampled.span_id)]


def test_the_relay_draw_hands_failed_and_slow_statements_over():
    from pgotel_proxy.protocol.events import Completion, Statement
    from pgotel_proxy.tracing.sampling import Presampler

    fast = Statement("extended", "SELECT 1", start_ns=1, end_ns=50, status="ok", tx_status="I")
    failed = Statement("extended", "SELECT 1/0", start_ns=1, end_ns=50, status="error", tx_status="I")
    slow = Statement("extended", "SELECT pg_sleep(1)", start_ns=1, end_ns=500, status="ok", tx_status="I")
    simple = Statement("simple", "SELECT 1; SELECT 1/0", start_ns=1, end_ns=50, status="error", tx_status="I",
                       results=[Completion(20, "SELECT 1", 1, None), Completion(50, None, 0, {"C": "22012"})])
    records = [fast, failed, slow, simple]
    assert Presampler().split(records, 0.0, 100, True) == ([], [failed, slow, simple], 1)
    assert Presampler().split(records, 0.0, 0, True) == ([], [failed, simple], 2)
    assert Presampler().split(records, 0.0, 0, False) == ([], [], 4)


def test_a_bound_below_one_a_second_keeps_one_then_waits():
    from pgotel_proxy.tracing.spans import SpanBuilder

    builder = SpanBuilder(resource=None, sample_rate=0.0, capture_parameters=False, capture_literals=False,
                          keep_errors=True, keep_rate=0.5)
    over = STATS.statements_kept_over_rate
    assert builder._keep_root("error", None) is not None
    assert builder._keep_root("error", None) is None
    assert STATS.statements_kept_over_rate - over == 1


def test_a_failed_statement_of_an_unsampled_transaction_is_kept(make_proxy, otlp):
    proxy = make_proxy(sample_rate=0.0, transaction_spans=True)
    with psycopg.connect(proxy.dsn(), prepare_threshold=None) as conn:
        conn.execute("SELECT 'in the block' AS tx_fine")
        _failing(conn, "SELECT 1 / 0 AS tx_failing")
        conn.rollback()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(comment("SELECT 'last' AS tx_last", random_traceparent()))
    proxy.flush()
    got = otlp.wait_for(lambda got: _with_text(got, "tx_last") and _with_text(got, "tx_failing"))
    [span] = _with_text(got, "tx_failing")
    assert span.attributes[KEPT] == "error" and span.parent_span_id is None and not span.links
    assert _with_text(otlp.spans, "tx_fine") == []
    assert not [s for s in otlp.spans if s.name == "transaction"]
