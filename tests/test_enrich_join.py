"""Server-side truth joined into spans, against the real test server (auto_explain + pg_stat_statements loaded).

Each test starts a proxy reading the ``pg`` fixture's jsonlog directory and
sampling over a side connection, runs real psycopg traffic through it and
checks the exported spans.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request

import psycopg
import pytest

from pgotel_proxy.enrich.plans import node_name, plan_shape
from pgotel_proxy.stats import STATS
from tracetree import comment, random_traceparent

JOIN_SQL = (
    "SELECT u.name, count(*) FROM enrich_users u JOIN enrich_orders o ON o.user_id = u.id "
    "WHERE u.id < {n} GROUP BY u.name"
)


@pytest.fixture(scope="module")
def tables(pg):
    pg.psql(
        "DROP TABLE IF EXISTS enrich_orders, enrich_users, enrich_locked;"
        "CREATE TABLE enrich_users (id int PRIMARY KEY, name text);"
        "CREATE TABLE enrich_orders (id int PRIMARY KEY, user_id int, amount int);"
        "CREATE TABLE enrich_locked (id int PRIMARY KEY);"
        "INSERT INTO enrich_users SELECT g, 'u' || g FROM generate_series(1, 2000) g;"
        "INSERT INTO enrich_orders SELECT g, g % 2000 + 1, g FROM generate_series(1, 20000) g;"
        "INSERT INTO enrich_locked VALUES (1);"
        "ANALYZE enrich_users, enrich_orders, enrich_locked;"
    )


def enriched(make_proxy, pg, **overrides):
    overrides.setdefault("server_log", str(pg.log_dir))
    overrides.setdefault("server_log_format", "jsonlog" if pg.major >= 15 else "csvlog")
    overrides.setdefault("stats_dsn", pg.dsn())
    overrides.setdefault("stats_interval", 0.3)
    overrides.setdefault("wait_event_threshold", 0.3)
    overrides.setdefault("join_timeout", 3.0)
    proxy = make_proxy(**overrides)
    assert proxy.enricher.wait_ready(15)
    return proxy


def status(proxy) -> dict:
    with urllib.request.urlopen(proxy.admin_url + "/status", timeout=5) as r:
        return json.loads(r.read())


def subtree(spans, root):
    """(name, children...) of the spans under ``root``, children ordered as the plan lists them."""
    kids = [s for s in spans if s.parent_span_id == root.span_id]
    kids.sort(key=lambda s: s.attributes.get("db.postgresql.plan.parent_relationship", ""))
    return tuple(_shape(spans, k) for k in kids)


def _shape(spans, span):
    return (span.name, subtree(spans, span))


def _sorted_shape(shape):
    name, kids = shape
    return (name, tuple(sorted(_sorted_shape(k) for k in kids)))


def server_span(spans, trace_id):
    found = [s for s in spans if s.trace_id == trace_id and s.kind == "SERVER"]
    assert len(found) == 1, found
    return found[0]


def child(spans, parent, name):
    found = [s for s in spans if s.parent_span_id == parent.span_id and s.name == name]
    assert len(found) == 1, (name, found)
    return found[0]


def test_join_query_becomes_plan_node_spans_matching_explain(make_proxy, pg, otlp, tables):
    proxy = enriched(make_proxy, pg)
    assert status(proxy)["sources"] == {"auto_explain": "ok", "pg_stat_statements": "ok", "wait_events": "ok",
                                        "explain": "off"}
    joined_before = STATS.enrich_joined
    ctx = random_traceparent()
    sql = JOIN_SQL.format(n=500)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        rows = conn.execute(comment(sql, ctx)).fetchall()
    assert len(rows) == 499
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        explain = conn.execute("EXPLAIN (FORMAT JSON) " + sql).fetchone()[0][0]["Plan"]

    spans = otlp.wait_for(lambda ss: any(s.trace_id == ctx.trace_id and s.name.startswith(explain["Node Type"]) for s in ss))
    stmt = server_span(spans, ctx.trace_id)
    execute = child(spans, stmt, "execute")
    top = [s for s in spans if s.parent_span_id == execute.span_id]
    assert len(top) == 1
    # Same tree of node types and relations as EXPLAIN of the same query.
    assert _sorted_shape(_shape(spans, top[0])) == _sorted_shape(plan_shape(explain))
    assert top[0].name == node_name(explain)
    scans = [s for s in spans if s.trace_id == ctx.trace_id and s.attributes.get("db.postgresql.plan.relation") == "enrich_orders"]
    assert scans and scans[0].name.endswith("enrich_orders")
    assert scans[0].attributes["db.postgresql.plan.actual_rows"] > 0
    assert scans[0].attributes["db.postgresql.plan.loops"] >= 1
    assert "db.postgresql.plan.shared_hit_blocks" in scans[0].attributes
    # Node spans nest: each inside its parent, all inside execute, all ending at execute's end.
    by_id = {s.span_id: s for s in spans}
    nodes = [s for s in spans if s.trace_id == ctx.trace_id and "db.postgresql.plan.node_type" in s.attributes]
    assert len(nodes) >= 3
    for node in nodes:
        parent = by_id[node.parent_span_id]
        assert parent.start_ns <= node.start_ns and node.end_ns == parent.end_ns == execute.end_ns
        total = node.attributes["db.postgresql.plan.total_time_ms"] * node.attributes["db.postgresql.plan.loops"]
        assert node.end_ns - node.start_ns == pytest.approx(min(total * 1e6, parent.end_ns - parent.start_ns), abs=1000)
    assert stmt.attributes["db.postgresql.query_id"] != 0
    assert stmt.attributes["db.postgresql.execution_time_ms"] > 0
    proxy.flush()  # the span process's counters arrive with its reports
    assert STATS.enrich_joined > joined_before


def test_prepared_statement_planning_and_execution_split_from_the_log(make_proxy, pg, otlp, tables):
    # Adaptive splitting off: the wire is to hold planning and execution together (what the log splits).
    proxy = enriched(make_proxy, pg, phase_split_threshold=0)
    sql = "SELECT pg_sleep(0.06), count(*) AS prepared_split FROM enrich_users WHERE id < %s"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(3):
            # prepare=True: Parse once, then Bind/Execute/Sync in one batch, so BindComplete is held back
            # with the results and the wire alone cannot tell planning from execution.
            conn.execute(sql, (100 + i,), prepare=True)

    def executions(ss):
        return [s for s in ss if s.kind == "SERVER" and "prepared_split" in s.attributes.get("db.query.text", "")
                and s.attributes.get("pgotel.statement.prepared_earlier")]

    # The first execution directly follows its Parse (it takes the Parse's context and is not
    # "prepared earlier"); the two after it are.
    spans = otlp.wait_for(lambda ss: len(executions(ss)) == 2 and all(
        "db.postgresql.execution_time_ms" in s.attributes for s in executions(ss)))
    stmt = executions(spans)[-1]
    assert stmt.attributes.get("pgotel.statement.prepared_earlier") is True
    plan = child(spans, stmt, "plan")  # split off the wire's plan+execute
    execute = child(spans, stmt, "execute")
    assert "pgotel.phases" not in plan.attributes and "pgotel.phases" not in execute.attributes
    assert plan.attributes["pgotel.timing.exact"] is False
    assert plan.attributes["pgotel.timing.source"] == "auto_explain"
    assert execute.attributes["pgotel.timing.source"] == "auto_explain"
    # The executor's 60 ms sleep now sits on execute, not on plan.
    assert plan.end_ns == execute.start_ns
    exec_ms = stmt.attributes["db.postgresql.execution_time_ms"]
    assert exec_ms >= 55
    assert execute.duration_ms == pytest.approx(exec_ms, abs=0.01)
    assert plan.duration_ms < 30
    assert any(s.parent_span_id == execute.span_id and s.name == "Aggregate" for s in spans)


def test_one_write_statement_gets_its_execution_split_off_from_the_log(make_proxy, pg, otlp, tables):
    proxy = enriched(make_proxy, pg)
    ctx = random_traceparent()
    sql = "SELECT pg_sleep(0.06), count(*) AS one_write_split FROM enrich_users WHERE id < %s"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(comment(sql, ctx), (100,))  # Parse, Bind, Describe, Execute, Sync in one write
    spans = otlp.wait_for(lambda ss: any(s.trace_id == ctx.trace_id and s.kind == "SERVER"
                                         and "db.postgresql.execution_time_ms" in s.attributes for s in ss))
    stmt = server_span(spans, ctx.trace_id)
    # The wire showed one parse+plan+execute span; the executor's time from the log split
    # the execution off it, and parse and plan stay together.
    early = child(spans, stmt, "parse+plan")
    execute = child(spans, stmt, "execute")
    assert early.attributes["pgotel.phases"] == ["parse", "plan"]
    assert early.attributes["pgotel.timing.exact"] is False
    assert early.attributes["pgotel.timing.source"] == execute.attributes["pgotel.timing.source"] == "auto_explain"
    assert (early.start_ns, early.end_ns, execute.end_ns) == (stmt.start_ns, execute.start_ns, stmt.end_ns)
    assert execute.duration_ms == pytest.approx(stmt.attributes["db.postgresql.execution_time_ms"], abs=0.01)
    assert any(s.parent_span_id == execute.span_id and s.name == "Aggregate" for s in spans)


def test_pg_sleep_records_wait_events(make_proxy, pg, otlp, tables):
    proxy = enriched(make_proxy, pg)
    ctx = random_traceparent()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(comment("SELECT pg_sleep(1.2)", ctx))
    spans = otlp.wait_for(lambda ss: any(s.trace_id == ctx.trace_id and s.kind == "SERVER" for s in ss))
    stmt = server_span(spans, ctx.trace_id)
    waits = [e for e in stmt.events if e.name == "db.postgresql.wait"]
    assert waits, stmt
    assert waits[0].attributes["db.postgresql.wait_event_type"] == "Timeout"
    assert waits[0].attributes["db.postgresql.wait_event"] == "PgSleep"
    assert waits[0].attributes["pgotel.wait.samples"] >= 3
    assert stmt.start_ns + 300_000_000 <= waits[0].time_ns <= stmt.end_ns


def test_lock_wait_records_wait_events(make_proxy, pg, otlp, tables):
    proxy = enriched(make_proxy, pg)
    ctx = random_traceparent()
    holder = psycopg.connect(pg.dsn())
    try:
        holder.execute("SELECT * FROM enrich_locked WHERE id = 1 FOR UPDATE")
        release = threading.Timer(1.0, holder.commit)
        release.start()
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute(comment("UPDATE enrich_locked SET id = 1 WHERE id = 1", ctx))
        release.join()
    finally:
        holder.close()
    spans = otlp.wait_for(lambda ss: any(s.trace_id == ctx.trace_id and s.kind == "SERVER" for s in ss))
    stmt = server_span(spans, ctx.trace_id)
    waits = [e for e in stmt.events if e.name == "db.postgresql.wait"]
    assert any(e.attributes["db.postgresql.wait_event_type"] == "Lock" for e in waits), stmt
    assert stmt.duration_ms >= 900


def rotate_to_a_new_file(pg, attempts=4):
    """Rotate the server log and wait until the logging collector has opened a new file.

    The rotation is asynchronous (a signal to the collector), and a file name carries the
    second it was opened in: a rotation within the same second as the latest file appends to
    that file. So ask, watch for the new name, and ask again a second later if none came.
    """
    before = set(pg.log_files())
    for _ in range(attempts):
        time.sleep(1.05)
        pg.psql("SELECT pg_rotate_logfile()")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if set(pg.log_files()) - before:
                return
            time.sleep(0.05)
    raise AssertionError(f"no new server log file after {attempts} rotations")


def test_log_rotation_during_the_run_loses_no_plan(make_proxy, pg, otlp, tables):
    proxy = enriched(make_proxy, pg)
    timeouts_before = STATS.enrich_timeouts
    ctxs = []
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(12):
            if i in (4, 8):
                rotate_to_a_new_file(pg)
            ctx = random_traceparent()
            ctxs.append(ctx)
            conn.execute(comment(f"SELECT count(*) FROM enrich_users WHERE id < {i + 10}", ctx))
    ids = {c.trace_id for c in ctxs}

    def all_planned(ss):
        return {s.trace_id for s in ss if s.trace_id in ids and s.name.startswith("Aggregate")} == ids

    spans = otlp.wait_for(all_planned, timeout=10)
    for ctx in ctxs:
        assert "pgotel.enrich.plan_missing" not in server_span(spans, ctx.trace_id).attributes
    proxy.flush()  # the span process's counters arrive with its reports
    assert STATS.enrich_timeouts == timeouts_before


def test_pg_stat_statements_window_figures(make_proxy, pg, otlp, tables):
    proxy = enriched(make_proxy, pg)
    sql = "SELECT count(*) FROM enrich_orders WHERE amount > %s"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(4):
            conn.execute(sql, (i,))
        time.sleep(0.8)  # at least one poll window has seen those calls
        ctx = random_traceparent()
        conn.execute(comment(sql, ctx), (7,))
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        qid = conn.execute(
            "SELECT queryid FROM pg_stat_statements WHERE query LIKE 'SELECT count(*) FROM enrich_orders WHERE amount > $1%'"
        ).fetchone()[0]
    spans = otlp.wait_for(lambda ss: any(s.trace_id == ctx.trace_id and s.kind == "SERVER" for s in ss))
    attrs = server_span(spans, ctx.trace_id).attributes
    assert attrs["db.postgresql.query_id"] == qid
    # The window is the latest poll interval in which the query ran: the four
    # warm-up calls, or (when a poll fell between them and the traced call) the
    # traced call alone — which one depends on the poll timing.
    calls = attrs["db.postgresql.pgss.calls"]
    assert calls in (1, 4, 5), calls
    assert attrs["db.postgresql.pgss.mean_exec_time_ms"] > 0
    assert attrs["db.postgresql.pgss.shared_blks_hit"] + attrs["db.postgresql.pgss.shared_blks_read"] > 0
    assert attrs["db.postgresql.pgss.rows"] == calls  # count(*) returns one row per call
    assert "db.postgresql.pgss.wal_bytes" in attrs


def test_statement_without_plan_leaves_after_join_timeout(make_proxy, pg, otlp, tables, tmp_path):
    # A log file that exists but never receives this server's plans: every planned statement times out.
    silent = tmp_path / "other.json"
    silent.write_text("")
    proxy = enriched(make_proxy, pg, server_log=str(silent), stats_dsn="", join_timeout=0.4)
    assert status(proxy)["sources"]["auto_explain"] == "ok"
    before = STATS.enrich_timeouts
    ctx = random_traceparent()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(comment("SELECT 1", ctx))
        conn.execute("SET application_name = 'x'")  # no plan expected: leaves at once
    done = time.monotonic()
    spans = otlp.wait_for(lambda ss: any(s.trace_id == ctx.trace_id and s.kind == "SERVER" for s in ss), timeout=5)
    waited = time.monotonic() - done
    assert 0.2 <= waited < 2.0
    assert server_span(spans, ctx.trace_id).attributes["pgotel.enrich.plan_missing"] is True
    proxy.flush()  # the span process's counters arrive with its reports
    assert STATS.enrich_timeouts == before + 1


def test_unreadable_log_and_missing_pg_stat_statements_are_reported_once(make_proxy, pg, otlp, tables, tmp_path, caplog):
    pg.psql("DROP DATABASE IF EXISTS enrich_nopgss")
    pg.psql("CREATE DATABASE enrich_nopgss")
    caplog.set_level(logging.INFO, logger="pgotel_proxy.enrich")
    missing = tmp_path / "no-such-dir" / "postgresql.json"
    proxy = enriched(make_proxy, pg, server_log=str(missing), stats_dsn=pg.dsn(dbname="enrich_nopgss"), join_timeout=5.0)
    sources = status(proxy)["sources"]
    assert sources["auto_explain"].startswith("unavailable: cannot read server log")
    assert "No such file" in sources["auto_explain"]
    assert sources["pg_stat_statements"].startswith("unavailable: the pg_stat_statements extension is not created")
    assert sources["wait_events"] == "ok"
    lines = [r for r in caplog.records if r.name == "pgotel_proxy.enrich"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "pg_stat_statements unavailable" in lines[0].getMessage()
    # Spans leave on time: nothing waits for a plan that cannot come.
    ctx = random_traceparent()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(comment("SELECT count(*) FROM enrich_users", ctx))
    done = time.monotonic()
    otlp.wait_for(lambda ss: any(s.trace_id == ctx.trace_id and s.kind == "SERVER" for s in ss), timeout=5)
    assert time.monotonic() - done < 1.0
