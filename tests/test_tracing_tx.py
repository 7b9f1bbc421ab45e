"""Transaction spans (``transaction_spans``): a BEGIN … COMMIT/ROLLBACK block as one span."""

from __future__ import annotations

import psycopg
import pytest

from tracetree import comment, random_traceparent


def _by_trace(spans, trace_id):
    return [s for s in spans if s.trace_id == trace_id]


def test_block_becomes_a_transaction_span_in_the_apps_trace(make_proxy, otlp):
    proxy = make_proxy(transaction_spans=True)
    ctx = random_traceparent()
    with psycopg.connect(proxy.dsn()) as conn:  # not autocommit: psycopg sends BEGIN itself
        conn.execute(comment("SELECT %s::int", ctx), (1,))
        conn.execute(comment("SELECT 2", ctx))
        conn.commit()
    proxy.flush()
    spans = otlp.wait_for(lambda s: any(x.name == "transaction" for x in s))
    mine = _by_trace(spans, ctx.trace_id)
    tx = [s for s in mine if s.name == "transaction"]
    assert len(tx) == 1, otlp.tree(ctx.trace_id)
    tx = tx[0]
    assert tx.parent_span_id == ctx.span_id and tx.kind == "INTERNAL"
    assert tx.attributes["db.postgresql.transaction.outcome"] == "COMMIT"
    assert tx.attributes["db.postgresql.transaction.statements"] == 4
    # BEGIN and COMMIT carry no context of their own: they are children of the transaction
    inner = {s.name: s for s in mine if s.parent_span_id == tx.span_id}
    assert set(inner) == {"BEGIN", "COMMIT"}, otlp.tree(ctx.trace_id)
    # statements with their own context keep the app's parent and link to the transaction
    own = [s for s in mine if s.kind == "SERVER" and s.parent_span_id == ctx.span_id]
    assert len(own) == 2
    for s in own:
        assert [link.span_id for link in s.links] == [tx.span_id]
        assert tx.start_ns <= s.start_ns and s.end_ns <= tx.end_ns


def test_failed_block_is_an_error_and_off_by_default(make_proxy, otlp):
    proxy = make_proxy(transaction_spans=True)
    ctx = random_traceparent()
    with psycopg.connect(proxy.dsn()) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(comment("SELECT 1/0", ctx))
        conn.rollback()
    proxy.flush()
    spans = otlp.wait_for(lambda s: any(x.name == "transaction" and x.trace_id == ctx.trace_id for x in s))
    tx = next(s for s in spans if s.name == "transaction" and s.trace_id == ctx.trace_id)
    assert tx.status_code == "ERROR"
    assert tx.attributes["db.postgresql.transaction.outcome"] == "ROLLBACK"

    otlp.clear()
    plain = make_proxy()
    ctx = random_traceparent()
    with psycopg.connect(plain.dsn()) as conn:
        conn.execute(comment("SELECT 3", ctx))
        conn.commit()
    plain.flush()
    spans = otlp.wait_for(lambda s: any(x.trace_id == ctx.trace_id and x.kind == "SERVER" for x in s))
    assert not any(s.name == "transaction" for s in spans)


def test_transaction_open_when_the_connection_ends_is_still_exported(make_proxy, otlp):
    proxy = make_proxy(transaction_spans=True)
    ctx = random_traceparent()
    conn = psycopg.connect(proxy.dsn())
    conn.execute(comment("SELECT 4", ctx))
    conn.close()  # psycopg closes without COMMIT: the server rolls back
    proxy.flush()
    spans = otlp.wait_for(lambda s: any(x.name == "transaction" and x.trace_id == ctx.trace_id for x in s))
    tx = next(s for s in spans if s.name == "transaction" and s.trace_id == ctx.trace_id)
    assert tx.attributes["pgotel.statement.status"] == "open"
