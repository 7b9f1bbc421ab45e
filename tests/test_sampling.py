"""The sample rate's draw made in the relay (tracing/sampling.py): what it leaves out is never handed over.

Below a rate of 1, a new root statement the draw leaves out costs its framing
and its record alone. These tests check the draw keeps what the builder would
keep: statements with a comment and every statement of a connection once a
session carrier may be set go to the builder undrawn; the roots kept are kept
once (not drawn a second time by the builder); and the statements left out
are counted as statements all the same.
"""

from __future__ import annotations

import math

import psycopg
import pytest

from pgotel_proxy.protocol.events import Statement
from pgotel_proxy.stats import STATS
from pgotel_proxy.tracing.sampling import Presampler

from tracetree import comment, random_traceparent, server_spans


def _recs(*texts: str) -> list[Statement]:
    return [Statement("simple", t, start_ns=1, end_ns=2, status="ok", tx_status="I") for t in texts]


def test_rate_one_hands_everything_over_undrawn():
    recs = _recs("SELECT 1", "SELECT 2")
    assert Presampler().split(recs, 1.0) == ([], recs, 0)


def test_rate_zero_leaves_plain_roots_out_and_keeps_the_rest_in_order():
    recs = _recs("SELECT 1", "SELECT 2 /*traceparent='00-ab-cd-01'*/", "SELECT 3", "set pgotel.traceparent = 'x'",
                 "SELECT 4", "SELECT 5 /* c */")
    pre = Presampler()
    drawn, undrawn, left_out = pre.split(recs, 0.0)
    assert drawn == [] and left_out == 2
    assert [r.sql for r in undrawn] == [recs[1].sql] + [r.sql for r in recs[3:]]
    assert not pre.plain
    # From then on the connection's statements all go to the builder, which tracks the carrier.
    later = _recs("SELECT 6", "RESET ALL")
    assert pre.split(later, 0.0) == ([], later, 0)


def test_a_prepared_statements_comment_is_not_read_again_when_it_is_executed():
    recs = [Statement("extended", "SELECT $1 /*traceparent='00-ab-cd-01'*/", reused=reused, start_ns=1, end_ns=2,
                      status="ok", tx_status="I") for reused in (False, True, True)]
    drawn, undrawn, left_out = Presampler().split(recs, 0.0)
    assert (drawn, undrawn, left_out) == ([], recs[:1], 2)


@pytest.mark.parametrize("text", ["DISCARD ALL", "reset all", "SELECT set_config('pgotel.traceparent', 'x', false)"])
def test_a_statement_that_may_set_a_carrier_ends_the_draw(text):
    pre = Presampler()
    drawn, undrawn, left_out = pre.split(_recs("SELECT 1", text, "SELECT 2"), 0.0)
    assert (drawn, [r.sql for r in undrawn], left_out) == ([], [text, "SELECT 2"], 1)


def test_the_draw_keeps_roots_at_the_rate():
    pre = Presampler()
    n, rate = 20_000, 0.3
    drawn, undrawn, left_out = pre.split(_recs(*(f"SELECT {i}" for i in range(n))), rate)
    assert undrawn == [] and len(drawn) + left_out == n
    sd = math.sqrt(n * rate * (1 - rate))
    assert abs(len(drawn) - n * rate) < 5 * sd, len(drawn)


def _statement_spans(otlp, marker: str) -> list:
    return [s for s in server_spans(otlp.spans) if marker in str(s.attributes.get("db.query.text", ""))]


def test_roots_are_sampled_once_at_the_rate_and_all_counted(make_proxy, otlp):
    """At 0.25, 600 plain statements give about 150 statement spans (drawn twice: about 38)."""
    proxy = make_proxy(sample_rate=0.25)
    before = STATS.statements
    n = 600
    # (not prepared: the PREPARE record psycopg's fifth execution makes has a parse phase alone)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        for i in range(n):
            conn.execute("SELECT %s::text AS presampled", (str(i),))
        ctx = random_traceparent()
        conn.execute(comment("SELECT 1 AS presampled", ctx))
    proxy.flush()
    otlp.wait_for(lambda got: any(s.trace_id == ctx.trace_id for s in got))
    roots = [s for s in _statement_spans(otlp, "presampled") if s.trace_id != ctx.trace_id]
    sd = math.sqrt(n * 0.25 * 0.75)
    assert abs(len(roots) - n * 0.25) < 4 * sd, len(roots)
    # kept roots are whole: each has its phase span (one write: parse+plan+execute)
    ids = {s.span_id for s in roots}
    children = [s for s in otlp.spans if s.parent_span_id in ids]
    assert {s.parent_span_id for s in children} == ids
    # the sampled context always arrives, whatever the draw
    assert len(server_spans(otlp.spans, ctx.trace_id)) == 1
    assert STATS.statements - before >= n + 1


def test_statements_left_out_are_not_handed_to_the_span_process(make_proxy, otlp):
    # The relay draws only while latency histograms, which count every statement, are off.
    proxy = make_proxy(sample_rate=0.0, latency_histograms=False)
    tracer = proxy.tracer
    proxy.flush()  # (the readiness check's statement)
    left_before = tracer._left_out
    carrier = random_traceparent()
    # (not prepared: psycopg's Parse of a prepared statement would be one more record)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        for i in range(50):
            conn.execute("SELECT %s::int", (i,))
        conn.execute(f"SET pgotel.traceparent = '{carrier.traceparent}'")
        conn.execute("SELECT 'under the carrier'")
    proxy.flush()
    otlp.wait_for(lambda got: any(s.trace_id == carrier.trace_id and s.kind == "SERVER" for s in got))
    assert tracer._left_out - left_before == 50
    # the carrier still parents what follows it: from the SET on, the builder saw everything
    assert [s.attributes["db.query.text"] for s in server_spans(otlp.spans, carrier.trace_id)] == [
        "SET pgotel.traceparent = ?", "SELECT ?"]
