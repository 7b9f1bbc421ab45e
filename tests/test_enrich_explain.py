"""Estimated plans from EXPLAIN on the side connection (the ``explain`` source), against the real test server.

The fixture's server logs auto_explain plans; these tests leave the
auto_explain source out (``enrich_sources=["explain"]``), as where no log
can be read, so every plan seen here came from EXPLAIN.
"""

from __future__ import annotations

import re
import time
import urllib.request

import psycopg
import pytest

from pgotel_proxy.enrich.explain import explainable, has_parameters, plan_hash, strip_expressions
from pgotel_proxy.enrich.join import PLAN_CHANGED
from tracetree import comment, random_traceparent

SLOW = "SELECT pg_sleep(0.3), code FROM {table} WHERE code = 4242"
FAST = "SELECT code FROM {table} WHERE code = 17"


@pytest.fixture(scope="module")
def tables(pg):
    pg.psql(
        "DROP TABLE IF EXISTS explain_items, explain_moved;"
        "CREATE TABLE explain_items (code int, note text);"
        "CREATE TABLE explain_moved (code int, note text);"
        "INSERT INTO explain_items SELECT g, 'n' || g FROM generate_series(1, 20000) g;"
        "INSERT INTO explain_moved SELECT g, 'n' || g FROM generate_series(1, 20000) g;"
        "ANALYZE explain_items, explain_moved;"
    )


def explaining(make_proxy, pg, **overrides):
    overrides.setdefault("stats_dsn", pg.dsn())
    overrides.setdefault("server_log", str(pg.log_dir))  # configured, but its source is left out
    overrides.setdefault("enrich_sources", ["explain"])
    overrides.setdefault("explain_min_duration", 0.2)
    overrides.setdefault("join_timeout", 3.0)
    proxy = make_proxy(**overrides)
    assert proxy.enricher.wait_ready(15)
    return proxy


def run(proxy, sql, params=None):
    ctx = random_traceparent()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(comment(sql, ctx), params).fetchall()
    return ctx


def statement(spans, ctx):
    found = [s for s in spans if s.trace_id == ctx.trace_id and s.kind == "SERVER"]
    assert len(found) == 1, found
    return found[0]


def plan_nodes(spans, ctx):
    return [s for s in spans if s.trace_id == ctx.trace_id and "db.postgresql.plan.node_type" in s.attributes]


def test_slow_shape_gets_an_estimated_plan_fast_shape_none(make_proxy, pg, otlp, tables):
    proxy = explaining(make_proxy, pg)
    assert proxy.enricher.status["auto_explain"] == "off"
    assert proxy.enricher.status["explain"].startswith("ok")
    fast = run(proxy, FAST.format(table="explain_items"))
    slow = run(proxy, SLOW.format(table="explain_items"))

    spans = otlp.wait_for(lambda ss: plan_nodes(ss, slow))
    nodes = plan_nodes(spans, slow)
    stmt = statement(spans, slow)
    execute = [s for s in spans if s.parent_span_id == stmt.span_id and s.name == "execute"]
    assert len(execute) == 1
    assert all(n.attributes["pgotel.plan.estimated"] is True for n in nodes)
    scan = [n for n in nodes if n.attributes.get("db.postgresql.plan.relation") == "explain_items"]
    assert scan and scan[0].name == "Seq Scan explain_items"
    assert "db.postgresql.plan.actual_rows" not in scan[0].attributes  # nothing was executed
    top = [n for n in nodes if n.parent_span_id == execute[0].span_id]
    assert len(top) == 1 and top[0].start_ns == execute[0].start_ns and top[0].end_ns == execute[0].end_ns
    assert stmt.attributes["db.postgresql.plan.hash"] == plan_hash_of(pg, SLOW.format(table="explain_items"))

    otlp.wait_for(lambda ss: any(s.trace_id == fast.trace_id and s.kind == "SERVER" for s in ss))
    time.sleep(0.3)  # anything still on its way
    assert plan_nodes(otlp.spans, fast) == []
    assert "db.postgresql.plan.hash" not in statement(otlp.spans, fast).attributes

    # The span process counts the EXPLAINs; the relay's /metrics shows its count.
    proxy.flush()
    with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    runs = re.search(r"^pgotel_explains_run_total (\S+)$", metrics, re.M)
    assert runs is not None and float(runs.group(1)) >= 1, metrics


def plan_hash_of(pg, sql):
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        return plan_hash(conn.execute("EXPLAIN (FORMAT JSON) " + sql).fetchone()[0][0]["Plan"])


def test_an_index_created_between_two_runs_yields_a_plan_changed_event(make_proxy, pg, otlp, tables):
    proxy = explaining(make_proxy, pg, explain_cache_ttl=0.5)
    sql = SLOW.format(table="explain_moved")
    first = run(proxy, sql)
    spans = otlp.wait_for(lambda ss: plan_nodes(ss, first))
    assert [n.name for n in plan_nodes(spans, first) if n.attributes.get("db.postgresql.plan.relation")] == [
        "Seq Scan explain_moved"]
    before = statement(spans, first)
    assert not [e for e in before.events if e.name == PLAN_CHANGED]

    pg.psql("CREATE INDEX explain_moved_code ON explain_moved (code); ANALYZE explain_moved;")
    time.sleep(0.7)  # past explain_cache_ttl: the next slow run explains the shape again
    second = run(proxy, sql)
    spans = otlp.wait_for(lambda ss: plan_nodes(ss, second))
    assert any(n.attributes.get("db.postgresql.plan.index") == "explain_moved_code" for n in plan_nodes(spans, second))
    after = statement(spans, second)
    changed = [e for e in after.events if e.name == PLAN_CHANGED]
    assert len(changed) == 1
    assert changed[0].attributes["db.postgresql.plan.previous_hash"] == before.attributes["db.postgresql.plan.hash"]
    assert changed[0].attributes["db.postgresql.plan.hash"] == after.attributes["db.postgresql.plan.hash"]
    assert after.attributes["db.postgresql.plan.hash"] != before.attributes["db.postgresql.plan.hash"]


def test_parameters_need_generic_plan_or_captured_values(make_proxy, pg, otlp, tables):
    """A text with $1: GENERIC_PLAN on 16+; before 16 no plan unless parameters are captured.

    The parameter goes in text format (%t): a value the proxy saw in binary cannot be written as a literal.
    """
    sql = "SELECT pg_sleep(0.3), code FROM explain_items WHERE code = %t"
    proxy = explaining(make_proxy, pg)
    ctx = run(proxy, sql, (4242,))
    if pg.major >= 16:
        assert otlp.wait_for(lambda ss: plan_nodes(ss, ctx))
    else:
        otlp.wait_for(lambda ss: any(s.trace_id == ctx.trace_id and s.kind == "SERVER" for s in ss))
        time.sleep(0.3)
        assert plan_nodes(otlp.spans, ctx) == []
        proxy = explaining(make_proxy, pg, capture_parameters=True)
        ctx = run(proxy, sql, (4242,))
        spans = otlp.wait_for(lambda ss: plan_nodes(ss, ctx))
        assert "Seq Scan explain_items" in [n.name for n in plan_nodes(spans, ctx)]


# ----------------------------------------------------------------- what may be explained (no server)

@pytest.mark.parametrize("text, ok", [
    ("SELECT 1", True),
    ("  /* c */ (SELECT a FROM t) UNION SELECT 2;", True),
    ("WITH x AS (SELECT 1) SELECT * FROM x", True),
    ("update t set a = 1", True),
    ("DELETE FROM t WHERE a = 'x;y'", True),
    ("MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE", True),
    ("SELECT 1 INTO new_table", False),
    ("CREATE TABLE t AS SELECT 1", False),
    ("VACUUM t", False),
    ("EXPLAIN ANALYZE SELECT 1", False),
    ("SELECT 1; DROP TABLE t", False),
    ("CALL p()", False),
    ("", False),
])
def test_only_single_queries_are_explainable(text, ok):
    assert explainable(text) is ok


def test_parameters_are_found_outside_quotes_only():
    assert has_parameters("SELECT * FROM t WHERE a = $1")
    assert not has_parameters("SELECT '$1', $$ $2 $$ FROM t -- $3")
    assert not has_parameters("SELECT 1")


def test_plan_hash_ignores_costs_and_stripping_drops_expressions():
    plan = {"Node Type": "Seq Scan", "Relation Name": "t", "Total Cost": 10.0, "Filter": "(name = 'secret'::text)",
            "Plans": [{"Node Type": "Index Scan", "Index Name": "i", "Index Cond": "(a = 42)"}]}
    dearer = {**plan, "Total Cost": 99.0, "Plan Rows": 7}
    assert plan_hash(plan) == plan_hash(dearer)
    assert plan_hash(plan) != plan_hash({**plan, "Node Type": "Bitmap Heap Scan"})
    stripped = strip_expressions(plan)
    assert "secret" not in repr(stripped) and "42" not in repr(stripped)
    assert plan_hash(stripped) == plan_hash(plan)
