"""Acceptance tests of the product: whole trace trees for real drivers against a real PostgreSQL.

Every test drives a real driver (psycopg 3, asyncpg) through a running proxy
and asserts the trees the in-process OTLP receiver decoded from real protobuf:
the application's own CLIENT span (created here with the OpenTelemetry SDK and
written into the SQL as a sqlcommenter comment), the proxy's SERVER statement
span under it, and the parse / plan / execute phase spans under that.

Covered: simple, extended and pipelined statements, multi-statement Query,
errors inside a pipeline, COPY, prepared statements executed in later batches
under session carriers (``SET [LOCAL] pgotel.traceparent``) without leaking
the context frozen in their text, sampling, privacy defaults, phase timing.
"""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from tracetree import (
    assert_nested,
    assert_statement,
    attribute_values,
    children,
    collect,
    comment,
    held_phases,
    random_traceparent,
    server_spans,
)

pytestmark = pytest.mark.timeout(60)

TABLE = "trace_items"
SECRET = "s3cr3t-literal"
PARAM = "p4ram-value-42"


@pytest.fixture(scope="module")
def table(pg):
    pg.psql(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id int, note text)")
    return TABLE


def n_server(n: int, trace_id: str | None = None):
    return lambda spans: len(server_spans(spans, trace_id)) >= n


def with_app(trace_id: str, n: int):
    """Predicate: the app span of ``trace_id`` arrived and ``n`` statement spans are in it."""
    return lambda spans: any(s.kind == "CLIENT" and s.trace_id == trace_id for s in spans) and len(
        server_spans(spans, trace_id)
    ) >= n


def marker(conn, proxy, otlp, ctx) -> None:
    """Run a traced statement and wait for it: everything sent before it has been exported too."""
    conn.execute(comment("SELECT 'marker'", ctx))
    collect(proxy, otlp, n_server(1, ctx.trace_id))


def connect(proxy, **kw) -> psycopg.Connection:
    kw.setdefault("autocommit", True)
    return psycopg.connect(proxy.dsn(application_name="tracing-tests"), **kw)


async def apg(proxy) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres", database="postgres", ssl=False)


# --------------------------------------------------------------------------
# shapes of single statements


def test_simple_query_tree(make_proxy, otlp, app, pg, table):
    proxy = make_proxy()
    with connect(proxy) as conn:
        pid = conn.info.backend_pid
        with app.span("load items") as ctx:
            rows = conn.execute(comment(f"SELECT id FROM {table} WHERE note = 'x'", ctx, route="%2Fitems")).fetchall()
    spans = collect(proxy, otlp, with_app(ctx.trace_id, 1))
    trace = [s for s in spans if s.trace_id == ctx.trace_id]
    assert len(trace) == 3, otlp.tree(ctx.trace_id)

    app_span = next(s for s in trace if s.kind == "CLIENT")
    assert app_span.span_id == ctx.span_id and app_span.parent_span_id is None
    assert app_span.resource["service.name"] == "tracing-test-app"
    (stmt,) = server_spans(trace)
    (execute,) = assert_statement(trace, stmt, name=f"SELECT {table}", phases=("execute",), parent=ctx.span_id)
    assert execute.attributes["pgotel.timing.exact"] is True
    assert stmt.status_code == "UNSET"
    assert stmt.resource["service.name"] == "pgotel-proxy"

    a = stmt.attributes
    assert a["db.system.name"] == "postgresql"
    assert a["db.namespace"] == "postgres"
    assert a["db.user"] == "postgres"
    assert a["db.query.summary"] == f"SELECT {table}"
    assert a["db.query.text"] == f"SELECT id FROM {table} WHERE note = ?"
    assert a["db.operation.name"] == "SELECT"
    assert a["db.collection.name"] == table
    assert a["db.response.returned_rows"] == len(rows)
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == pg.port
    assert a["network.peer.address"] == "127.0.0.1" and isinstance(a["network.peer.port"], int)
    assert a["db.postgresql.application_name"] == "tracing-tests"
    assert a["db.postgresql.backend_pid"] == pid
    assert a["db.postgresql.protocol"] == "simple"
    assert a["pgotel.sqlcommenter.route"] == "/items"
    assert "db.response.status_code" not in a and "error.type" not in a
    assert not any(k.startswith("pgotel.sqlcommenter.trace") for k in a)


def test_extended_query_tree(make_proxy, otlp, app, table):
    proxy = make_proxy()
    with connect(proxy) as conn:
        with app.span() as ctx:
            conn.execute(comment(f"INSERT INTO {table} (id, note) VALUES (%s, %s)", ctx), (1, "one"))
    spans = collect(proxy, otlp, with_app(ctx.trace_id, 1))
    (stmt,) = server_spans(spans, ctx.trace_id)
    # Parse, Bind and Execute went in one write and the server answered all three at
    # Sync: no boundary between the phases was observed, so one child holds them all,
    # over the statement's whole interval. Its end (the answer to Execute) was observed.
    (phases,) = assert_statement(spans, stmt, name=f"INSERT {table}", phases=("parse+plan+execute",), parent=ctx.span_id)
    assert (phases.start_ns, phases.end_ns) == (stmt.start_ns, stmt.end_ns)
    assert phases.attributes["pgotel.timing.exact"] is True
    a = stmt.attributes
    assert a["db.query.text"] == f"INSERT INTO {table} (id, note) VALUES ($1, $2)"
    assert a["db.postgresql.protocol"] == "extended"
    assert a["db.postgresql.command_tag"] == "INSERT 0 1"
    assert a["db.operation.name"] == "INSERT" and a["db.collection.name"] == table
    assert "db.postgresql.statement_name" not in a  # psycopg uses the unnamed statement
    assert not any(k.startswith("db.query.parameter") for k in a)


def test_error_statement(make_proxy, otlp, app):
    proxy = make_proxy()
    with connect(proxy) as conn:
        with app.span() as ctx, pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute(comment("SELECT * FROM no_such_table", ctx))
        with app.span() as ctx2, pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(comment("SELECT %s::int / 0", ctx2), (1,))
    spans = collect(proxy, otlp, lambda s: with_app(ctx.trace_id, 1)(s) and with_app(ctx2.trace_id, 1)(s))
    (simple,) = server_spans(spans, ctx.trace_id)
    assert_statement(spans, simple, name="SELECT no_such_table", phases=("execute",), parent=ctx.span_id)
    (ext,) = server_spans(spans, ctx2.trace_id)
    # The error came at Execute: the statement had parsed and planned (answered together).
    assert_statement(spans, ext, name="SELECT", phases=("parse+plan+execute",), parent=ctx2.span_id)
    for span, code in ((simple, "42P01"), (ext, "22012")):
        assert span.status_code == "ERROR"
        assert span.attributes["db.response.status_code"] == code
        assert span.attributes["error.type"] == code
        assert "db.response.returned_rows" not in span.attributes
    # Names quoted in the message stay (values would not: see the privacy tests).
    assert simple.status_message == 'relation "no_such_table" does not exist'
    assert ext.status_message == "division by zero"


def test_statement_the_parser_rejects_still_has_a_name(make_proxy, otlp, app):
    """Text neither PostgreSQL nor the summariser can read: the span is named after the system."""
    proxy = make_proxy()
    with connect(proxy) as conn:
        with app.span() as simple_ctx, pytest.raises(psycopg.errors.SyntaxError):
            conn.execute(comment("selec 1", simple_ctx))
        with app.span() as extended_ctx, pytest.raises(psycopg.errors.SyntaxError):
            conn.execute(comment("frobnicate %s", extended_ctx), (1,))
    spans = collect(proxy, otlp, lambda s: with_app(simple_ctx.trace_id, 1)(s) and with_app(extended_ctx.trace_id, 1)(s))
    for ctx, protocol in ((simple_ctx, "simple"), (extended_ctx, "extended")):
        (stmt,) = server_spans(spans, ctx.trace_id)
        assert stmt.name == "postgresql", (protocol, stmt.name)
        assert stmt.attributes["db.postgresql.protocol"] == protocol
        assert stmt.attributes.get("db.query.summary", "postgresql") != ""
        assert stmt.attributes["db.response.status_code"] == "42601"


# --------------------------------------------------------------------------
# pipelines and batches


def test_psycopg_pipeline_tree(make_proxy, otlp, app, table):
    proxy = make_proxy()
    with connect(proxy) as conn:
        with app.span("first") as c1, app.span("second") as c2, app.span("third") as c3:
            with conn.pipeline():
                conn.execute(comment(f"INSERT INTO {table} VALUES (%s, %s)", c1), (10, "p"))
                conn.execute(comment(f"UPDATE {table} SET note = %s WHERE id = %s", c2), ("q", 10))
                cur = conn.execute(comment(f"SELECT note FROM {table} WHERE id = %s", c3), (10,))
            assert cur.fetchall() == [("q",)]
    spans = collect(proxy, otlp, lambda s: all(with_app(c.trace_id, 1)(s) for c in (c1, c2, c3)))
    stmts = []
    for ctx, name in ((c1, f"INSERT {table}"), (c2, f"UPDATE {table}"), (c3, f"SELECT {table}")):
        (stmt,) = server_spans(spans, ctx.trace_id)
        phases = assert_statement(spans, stmt, name=name, phases=("parse+plan+execute",), parent=ctx.span_id)
        stmts.append((stmt, phases))
    # Wire order is statement order.
    assert stmts[0][0].start_ns <= stmts[1][0].start_ns <= stmts[2][0].start_ns
    assert stmts[2][0].attributes["db.response.returned_rows"] == 1
    # Wire mode: nothing was flushed after the first statement's requests, so not even its end is exact.
    assert [p.attributes["pgotel.timing.exact"] for p in stmts[0][1]] == [False]


def test_asyncpg_prepare_then_execute_batches(make_proxy, otlp, app, table):
    """asyncpg prepares (Parse, Describe, Flush) and then binds and executes, one Sync at the end.

    executemany binds the one prepared statement once per row in that batch:
    every execution belongs to the comment's trace.
    """
    proxy = make_proxy()

    async def work():
        conn = await apg(proxy)
        try:
            with app.span("fetch") as c1:
                val = await conn.fetchval(comment("SELECT $1::int + 1", c1), 41)
            with app.span("bulk") as c2:
                await conn.executemany(comment(f"INSERT INTO {table} VALUES ($1, $2)", c2), [(21, "a"), (22, "b"), (23, "c")])
            return val, c1, c2
        finally:
            await conn.close()

    val, c1, c2 = asyncio.run(work())
    assert val == 42
    spans = collect(proxy, otlp, lambda s: with_app(c1.trace_id, 1)(s) and with_app(c2.trace_id, 3)(s))
    (fetch,) = server_spans(spans, c1.trace_id)
    # Parse's answer came with Describe's, Bind's with Execute's: no boundary between the phases was seen.
    assert_statement(spans, fetch, name="SELECT", phases=("parse+plan+execute",), parent=c1.span_id)
    assert fetch.attributes["db.postgresql.statement_name"].startswith("__asyncpg_stmt_")
    assert fetch.attributes["db.response.returned_rows"] == 1

    inserts = server_spans(spans, c2.trace_id)
    assert len(inserts) == 3, otlp.tree(c2.trace_id)
    assert_statement(spans, inserts[0], name=f"INSERT {table}", phases=("parse+plan+execute",), parent=c2.span_id)
    for stmt in inserts[1:]:
        assert_statement(spans, stmt, name=f"INSERT {table}", phases=("plan+execute",), parent=c2.span_id)
        assert "pgotel.statement.prepared_earlier" not in stmt.attributes
    for stmt in inserts:
        assert stmt.attributes["db.postgresql.command_tag"] == "INSERT 0 1"
        assert stmt.status_code == "UNSET"


def test_multi_statement_query(make_proxy, otlp, app, table):
    proxy = make_proxy()
    with connect(proxy) as conn:
        with app.span() as ctx:
            conn.execute(comment(f"BEGIN; INSERT INTO {table} VALUES (30, 'multi'); COMMIT", ctx))
    spans = collect(proxy, otlp, with_app(ctx.trace_id, 3))
    stmts = server_spans(spans, ctx.trace_id)
    assert [s.name for s in stmts] == ["BEGIN", f"INSERT {table}", "COMMIT"], otlp.tree(ctx.trace_id)
    texts = [s.attributes["db.query.text"] for s in stmts]
    assert texts == ["BEGIN", f"INSERT INTO {table} VALUES (?, ?)", "COMMIT"]
    tags = [s.attributes["db.postgresql.command_tag"] for s in stmts]
    assert tags == ["BEGIN", "INSERT 0 1", "COMMIT"]
    for s in stmts:
        assert_statement(spans, s, name=s.name, phases=("execute",), parent=ctx.span_id)
        assert s.attributes["db.query.summary"] == s.name
    for a, b in zip(stmts, stmts[1:]):
        assert a.end_ns <= b.start_ns, "statements of one Query must not overlap"


def test_error_inside_pipeline(make_proxy, otlp, app, table):
    proxy = make_proxy()
    with connect(proxy) as conn:
        with app.span() as ctx:
            with pytest.raises(psycopg.errors.DivisionByZero):
                with conn.pipeline():
                    conn.execute(comment("SELECT %s::int", ctx), (1,))
                    conn.execute(comment("SELECT 1 / %s::int", ctx), (0,))
                    conn.execute(comment(f"INSERT INTO {table} VALUES (%s, 'after error')", ctx), (40,))
                    conn.execute(comment("SELECT %s::text", ctx), ("never",))
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE id = 40").fetchone() == (0,)
        # A marker proves the pipeline's records were all built and exported before we look.
        marker(conn, proxy, otlp, random_traceparent())
    spans = collect(proxy, otlp, with_app(ctx.trace_id, 2))
    stmts = server_spans(spans, ctx.trace_id)
    ok, failed, *after = stmts
    assert_statement(spans, ok, name="SELECT", phases=("parse+plan+execute",), parent=ctx.span_id)
    assert ok.status_code == "UNSET"
    assert failed.status_code == "ERROR"
    assert failed.attributes["db.response.status_code"] == "22012"
    assert failed.attributes["error.type"] == "22012"
    assert_statement(spans, failed, name="SELECT", phases=("parse+plan+execute",), parent=ctx.span_id)
    for s in after:
        assert s.attributes.get("pgotel.statement.status") == "skipped", s.describe()
        assert s.status_code != "OK"
        assert not any("execute" in held_phases(k) for k in children(spans, s))
        assert "db.postgresql.command_tag" not in s.attributes


def test_copy_from_and_to(make_proxy, otlp, app, table):
    proxy = make_proxy()
    with connect(proxy) as conn:
        with app.span("copy in") as cin:
            with conn.cursor().copy(comment(f"COPY {table} (id, note) FROM STDIN", cin)) as copy:
                for i in range(50, 55):
                    copy.write_row((i, f"copied {i}"))
        with app.span("copy out") as cout:
            out = bytearray()
            with conn.cursor().copy(comment(f"COPY (SELECT * FROM {table} WHERE id >= 50 AND id < 55) TO STDOUT", cout)) as copy:
                for chunk in copy:
                    out += chunk
    assert out.count(b"\n") == 5
    spans = collect(proxy, otlp, lambda s: with_app(cin.trace_id, 1)(s) and with_app(cout.trace_id, 1)(s))
    (s_in,) = server_spans(spans, cin.trace_id)
    assert_statement(spans, s_in, name=f"COPY {table}", phases=("execute",), parent=cin.span_id)
    assert s_in.attributes["db.postgresql.copy"] == "in"
    assert s_in.attributes["db.postgresql.command_tag"] == "COPY 5"
    (s_out,) = server_spans(spans, cout.trace_id)
    assert_statement(spans, s_out, name=s_out.attributes["db.query.summary"], phases=("execute",), parent=cout.span_id)
    assert s_out.attributes["db.postgresql.copy"] == "out"
    assert s_out.attributes["db.postgresql.command_tag"] == "COPY 5"
    assert s_out.attributes["db.operation.name"] == "COPY"


# --------------------------------------------------------------------------
# context: prepared statements and session carriers


def _carrier_sql(ctx, local: bool = False) -> str:
    return f"SET {'LOCAL ' if local else ''}pgotel.traceparent = '{ctx.traceparent}'"


def test_asyncpg_prepared_statement_follows_session_carrier(make_proxy, otlp, app):
    """The comment frozen in a prepared statement's text never parents its later executions."""
    proxy = make_proxy()
    frozen = random_traceparent()
    carriers = [random_traceparent() for _ in range(3)]

    async def work():
        conn = await apg(proxy)
        try:
            stmt = await conn.prepare(comment("SELECT $1::int * 2", frozen))
            got = []
            for i, carrier in enumerate(carriers):
                await conn.execute(_carrier_sql(carrier))
                got.append(await stmt.fetchval(i))
            await conn.execute("RESET pgotel.traceparent")
            got.append(await stmt.fetchval(10))
            return got, stmt.get_name()
        finally:
            await conn.close()

    got, name = asyncio.run(work())
    assert got == [0, 2, 4, 20]
    spans = collect(proxy, otlp, lambda s: all(n_server(2, c.trace_id)(s) for c in carriers) and n_server(1, frozen.trace_id)(s))
    for carrier in carriers:
        stmts = server_spans(spans, carrier.trace_id)
        assert [s.name for s in stmts] == ["SET", "SELECT"], otlp.tree(carrier.trace_id)
        execution = stmts[1]
        assert execution.parent_span_id == carrier.span_id
        assert execution.attributes["db.postgresql.statement_name"] == name
        assert execution.attributes["pgotel.statement.prepared_earlier"] is True
        # Its parse happened long before, under another context: not part of this execution.
        assert_statement(spans, execution, name="SELECT", phases=("plan+execute",), parent=carrier.span_id)
    # The frozen trace holds the PREPARE only, never an execution.
    frozen_spans = server_spans(spans, frozen.trace_id)
    assert [s.name for s in frozen_spans] == ["PREPARE SELECT"], otlp.tree(frozen.trace_id)
    assert_statement(spans, frozen_spans[0], name="PREPARE SELECT", phases=("parse",), parent=frozen.span_id)
    # After RESET the execution is a root of its own trace (sample rate 1).
    roots = [s for s in server_spans(spans) if s.attributes.get("db.postgresql.statement_name") == name and s.parent_span_id is None]
    assert len(roots) == 1
    assert roots[0].trace_id not in {c.trace_id for c in carriers} | {frozen.trace_id}


def test_psycopg_prepared_statement_follows_session_carrier(make_proxy, otlp, app):
    proxy = make_proxy()
    frozen = random_traceparent()
    carriers = [random_traceparent() for _ in range(3)]
    query = comment("SELECT %s::int + 100", frozen)
    with connect(proxy) as conn:
        conn.execute(query, (0,), prepare=True)  # Parse in a batch of its own, then the first execution
        for i, carrier in enumerate(carriers):
            conn.execute(_carrier_sql(carrier))
            assert conn.execute(query, (i,), prepare=True).fetchone() == (100 + i,)
    spans = collect(proxy, otlp, lambda s: all(n_server(2, c.trace_id)(s) for c in carriers))
    names = set()
    for carrier in carriers:
        stmts = server_spans(spans, carrier.trace_id)
        assert [s.name for s in stmts] == ["SET", "SELECT"], otlp.tree(carrier.trace_id)
        assert_statement(spans, stmts[1], name="SELECT", phases=("plan+execute",), parent=carrier.span_id)
        names.add(stmts[1].attributes["db.postgresql.statement_name"])
    assert len(names) == 1 and names != {""}
    # The first execution follows its Parse in the next round trip: it is that request's.
    # Every later one follows the session carrier, never the frozen comment.
    assert [s.name for s in server_spans(spans, frozen.trace_id)] == ["PREPARE SELECT", "SELECT"]


def test_set_local_carrier_ends_at_commit(make_proxy, otlp, app):
    proxy = make_proxy()
    carrier = random_traceparent()
    with connect(proxy, autocommit=False) as conn:
        conn.execute(_carrier_sql(carrier, local=True))
        conn.execute("SELECT 'inside'")
        conn.execute("SELECT %s::text", ("inside extended",))
        conn.commit()
        conn.execute("SELECT 'after commit'")
        conn.commit()
        # SET LOCAL outside a transaction block does nothing in Postgres, nor here.
        conn.autocommit = True
        conn.execute(_carrier_sql(carrier, local=True))
        conn.execute("SELECT 'no transaction'")
        marker(conn, proxy, otlp, random_traceparent())
    spans = otlp.spans
    inside = server_spans(spans, carrier.trace_id)
    # BEGIN (psycopg's implicit one) ran before the SET: it is not in the carrier's trace.
    assert [s.name for s in inside] == ["SET", "SELECT", "SELECT", "COMMIT"], otlp.tree(carrier.trace_id)
    assert all(s.parent_span_id == carrier.span_id for s in inside)
    extended = [s for s in server_spans(spans) if s.attributes["db.query.text"] == "SELECT $1::text"]
    assert len(extended) == 1 and extended[0].trace_id == carrier.trace_id
    later = [s for s in server_spans(spans) if s.trace_id != carrier.trace_id and s.attributes["db.query.summary"] == "SELECT"]
    # 'after commit', 'no transaction', and the marker: none in the carrier's trace.
    assert len(later) == 3
    assert all(s.parent_span_id is None for s in later[:2])


def test_rolled_back_set_is_undone(make_proxy, otlp, app):
    proxy = make_proxy()
    outer, inner = random_traceparent(), random_traceparent()
    with connect(proxy) as conn:
        conn.execute(_carrier_sql(outer))
        conn.execute("BEGIN")
        conn.execute(_carrier_sql(inner))
        conn.execute("SELECT 'in rolled back tx'")
        conn.execute("ROLLBACK")
        assert conn.execute("SHOW pgotel.traceparent").fetchone() == (outer.traceparent,)
        conn.execute("SELECT 'after rollback'")
        # A SET that failed inside a transaction block is undone as well.
        conn.execute("BEGIN")
        conn.execute(_carrier_sql(inner))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.execute("ROLLBACK")
        conn.execute("SELECT 'after failed tx'")
        conn.execute("RESET pgotel.traceparent")
        marker(conn, proxy, otlp, random_traceparent())
    spans = otlp.spans
    by_text = {}
    for s in server_spans(spans):
        by_text.setdefault(s.attributes["db.query.text"], []).append(s)
    assert by_text["SELECT ?"][0].trace_id == inner.trace_id  # 'in rolled back tx'
    for s in by_text["ROLLBACK"]:
        assert s.trace_id == inner.trace_id  # the ROLLBACK still ran under the inner carrier
    # 'after rollback' and 'after failed tx': the outer carrier again.
    outer_selects = [s for s in server_spans(spans, outer.trace_id) if s.name == "SELECT"]
    assert len(outer_selects) == 2, otlp.tree(outer.trace_id)
    assert all(s.parent_span_id == outer.span_id for s in outer_selects)


def test_unsampled_comment_produces_no_spans(make_proxy, otlp, app):
    proxy = make_proxy()
    with connect(proxy) as conn:
        with app.span("not sampled", sampled=False) as ctx:
            conn.execute(comment("SELECT 'unsampled simple'", ctx))
            conn.execute(comment("SELECT %s::text", ctx), ("unsampled extended",))
        # An unsampled carrier as well.
        conn.execute(_carrier_sql(random_traceparent(sampled=False)))
        conn.execute("SELECT 'unsampled carrier'")
        conn.execute("RESET pgotel.traceparent")
        marker(conn, proxy, otlp, random_traceparent())
    texts = [s.attributes.get("db.query.text") for s in server_spans(otlp.spans)]
    assert all(s.trace_id != ctx.trace_id or s.kind == "CLIENT" for s in otlp.spans)
    assert texts.count("SELECT ?") == 1  # the marker only
    assert "SELECT $1::text" not in texts
    # RESET ran with no context: a root statement at sample rate 1.
    assert "RESET pgotel.traceparent" in texts


def test_sample_rate_zero_keeps_sampled_contexts(make_proxy, otlp, app):
    proxy = make_proxy(sample_rate=0)
    with connect(proxy) as conn:
        for _ in range(20):
            conn.execute("SELECT 'root, not sampled'")
            conn.execute("SELECT %s::int", (1,))
        with app.span() as ctx:
            conn.execute(comment("SELECT %s::int", ctx), (2,))
        carrier = random_traceparent()
        conn.execute(_carrier_sql(carrier))
        conn.execute("SELECT 'under carrier'")
    spans = collect(proxy, otlp, lambda s: with_app(ctx.trace_id, 1)(s) and n_server(2, carrier.trace_id)(s))
    traces = {s.trace_id for s in server_spans(spans)}
    assert traces == {ctx.trace_id, carrier.trace_id}, otlp.dump()


# --------------------------------------------------------------------------
# privacy


def _privacy_workload(proxy, otlp, app):
    with connect(proxy) as conn:
        with app.span() as ctx:
            conn.execute(comment(f"SELECT count(*) FROM pg_class WHERE relname = '{SECRET}'", ctx))
            conn.execute(comment("SELECT count(*) FROM pg_class WHERE relname = %s", ctx), (PARAM,))
            # Values end up in Postgres' error messages too.
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                conn.execute(comment(f"SELECT '{SECRET}'::int", ctx))
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                conn.execute(comment("SELECT %s::text::int", ctx), (PARAM,))
    return collect(proxy, otlp, with_app(ctx.trace_id, 4)), ctx


def test_privacy_defaults_hide_literals_and_parameters(make_proxy, otlp, app):
    spans, ctx = _privacy_workload(make_proxy(), otlp, app)
    values = attribute_values([s for s in spans if s.scope == "pgotel_proxy"])
    leaks = [v for v in values if SECRET in v or PARAM in v]
    assert not leaks, leaks
    errors = [s for s in server_spans(spans, ctx.trace_id) if s.status_code == "ERROR"]
    assert len(errors) == 2 and all(s.attributes["db.response.status_code"] == "22P02" for s in errors)


def test_privacy_capture_on_exports_literals_and_parameters(make_proxy, otlp, app):
    spans, ctx = _privacy_workload(make_proxy(capture_query_literals=True, capture_parameters=True), otlp, app)
    stmts = server_spans(spans, ctx.trace_id)
    assert stmts[0].attributes["db.query.text"] == f"SELECT count(*) FROM pg_class WHERE relname = '{SECRET}'"
    assert stmts[1].attributes["db.query.parameter.1"] == PARAM
    assert any(SECRET in (s.status_message or "") for s in stmts)


def test_privacy_capture_parameters_only(make_proxy, otlp, app):
    spans, ctx = _privacy_workload(make_proxy(capture_parameters=True), otlp, app)
    values = attribute_values([s for s in spans if s.scope == "pgotel_proxy"])
    assert not [v for v in values if SECRET in v]
    assert server_spans(spans, ctx.trace_id)[1].attributes["db.query.parameter.1"] == PARAM


# --------------------------------------------------------------------------
# phase timing


def _slow_phases_query(conn, table):
    """A statement whose planning (a 10-way join, exhaustive search: ~25 ms) and execution (a sleep) take milliseconds."""
    conn.execute("SET join_collapse_limit = 20")
    conn.execute("SET from_collapse_limit = 20")
    conn.execute("SET geqo = off")
    joins = " ".join(f"JOIN {table} t{i} ON t{i}.id = t{i - 1}.id" for i in range(1, 10))
    return f"SELECT pg_sleep(0.03) FROM {table} t0 {joins} WHERE t0.id = %s"


@pytest.mark.parametrize("mode", ["flush", "wire"])
def test_phase_timing_exact_only_where_the_wire_shows_the_boundary(make_proxy, otlp, app, table, mode):
    proxy = make_proxy(phase_timing=mode)
    with connect(proxy) as conn:
        sql = _slow_phases_query(conn, table)
        with app.span() as c1:
            conn.execute(comment(sql, c1), (0,))
    spans = collect(proxy, otlp, with_app(c1.trace_id, 1))
    (stmt,) = server_spans(spans, c1.trace_id)
    if mode == "flush":
        # The server answered each phase at once, and planning and execution took
        # long enough for each answer to arrive in a read of its own.
        parse, plan, execute = assert_statement(spans, stmt, name=stmt.name, phases=("parse", "plan", "execute"),
                                                parent=stmt.parent_span_id)
        assert [p.attributes["pgotel.timing.exact"] for p in (parse, plan, execute)] == [True, True, True]
        assert parse.end_ns <= plan.start_ns and plan.end_ns <= execute.start_ns, [p.describe() for p in (parse, plan, execute)]
        assert all(p.end_ns > p.start_ns for p in (parse, plan, execute))
        assert plan.end_ns - plan.start_ns >= 5_000_000  # the join search is in plan
        assert execute.end_ns - execute.start_ns >= 25_000_000  # the sleep is in execute
        assert (parse.start_ns, execute.end_ns) == (stmt.start_ns, stmt.end_ns)
    else:
        # Everything was answered at Sync: no boundary between the phases was seen, and
        # no span claims one. The one child ends with the statement, when Execute's answer came.
        (phases,) = assert_statement(spans, stmt, name=stmt.name, phases=("parse+plan+execute",),
                                     parent=stmt.parent_span_id)
        assert phases.attributes["pgotel.timing.exact"] is True
        assert (phases.start_ns, phases.end_ns) == (stmt.start_ns, stmt.end_ns)


def test_flush_mode_in_a_pipeline_keeps_spans_nested(make_proxy, otlp, app):
    proxy = make_proxy(phase_timing="flush")
    with connect(proxy) as conn:
        with app.span() as c2, conn.pipeline():
            conn.execute(comment("SELECT %s::int", c2), (1,))
            conn.execute(comment("SELECT %s::int", c2), (2,))
    spans = collect(proxy, otlp, with_app(c2.trace_id, 2))
    for stmt in server_spans(spans, c2.trace_id):
        # Fast phases' answers may share a read (then their span is shared too): any
        # split, as long as the children hold parse, plan and execute in order, nested.
        shape = tuple(k.name for k in children(spans, stmt))
        kids = assert_statement(spans, stmt, name=stmt.name, phases=shape, parent=stmt.parent_span_id)
        assert [p for k in kids for p in held_phases(k)] == ["parse", "plan", "execute"]
        for p in kids:
            # Flush after every request: each span's end was observed.
            assert p.attributes["pgotel.timing.exact"] is True, p.describe()
            assert p.end_ns > p.start_ns or p.name == "plan"


def test_wire_timing_in_pipeline_is_marked_inexact(make_proxy, otlp, app):
    proxy = make_proxy()
    with connect(proxy) as conn:
        with app.span() as ctx, conn.pipeline():
            conn.execute(comment("SELECT %s::int", ctx), (1,))
            conn.execute(comment("SELECT %s::int", ctx), (2,))
    spans = collect(proxy, otlp, with_app(ctx.trace_id, 2))
    first, last = server_spans(spans, ctx.trace_id)
    f = {k.name: k.attributes["pgotel.timing.exact"] for k in children(spans, first)}
    l_ = {k.name: k.attributes["pgotel.timing.exact"] for k in children(spans, last)}
    # The whole pipeline was answered at its Sync: no phase boundary was observed.
    # Each statement's phases share one span; only the last one's end (answered at Sync) is exact.
    assert f == {"parse+plan+execute": False}
    assert l_ == {"parse+plan+execute": True}
