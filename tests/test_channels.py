"""Trace context channels and per-statement session attributes, with the writers that use them.

Real writers end to end through the proxy against the real PostgreSQL
fixture, each statement span's parent being the writer's own span:
OpenTelemetry Python's psycopg instrumentation (``enable_commenter``, with and
without ``prepare=True``), SQLAlchemy's (``enable_commenter``), and a
byte-level client for what drivers hide: the Parse + Sync / Bind + Execute +
Sync split of pgx and tokio-postgres, ``application_name`` carrying a
traceparent (as OpenTelemetry JS's pg instrumentation sends it with
``enableTraceContextPropagation``: ``SET application_name = '00-…'`` before
each query), pg_tracing's ``pg_tracing.trace_context``, and which channel
wins. Also: ``db.postgresql.application_name`` is the value each statement
ran under, even when the connection changes it between statements sent in
one write. node-postgres with OpenTelemetry JS's pg instrumentation itself
runs in tests/test_node_writers.py.

The rules of the channels themselves (``SET LOCAL``, rollback, ``RESET``,
``DISCARD ALL``) are checked on the span builder's connection state without
sockets, at the end.
"""

from __future__ import annotations

import struct

import psycopg
import pytest

from rawpg import RawConn, message
from tracetree import collect, comment, random_traceparent, server_spans

pytestmark = pytest.mark.timeout(60)

APP_NAME = "db.postgresql.application_name"


def in_trace(n: int, trace_id: str):
    return lambda spans: len(server_spans(spans, trace_id)) >= n


def texts(spans) -> list[str]:
    return [s.attributes.get("db.query.text") for s in spans]


# ---------------------------------------------------------------- wire helpers


def _cs(text: str) -> bytes:
    return text.encode() + b"\x00"


def parse(sql: str, name: str = "") -> bytes:
    return message(b"P", _cs(name) + _cs(sql) + struct.pack("!H", 0))


def describe_statement(name: str = "") -> bytes:
    return message(b"D", b"S" + _cs(name))


def bind(name: str = "", params: tuple[bytes, ...] = ()) -> bytes:
    body = _cs("") + _cs(name) + struct.pack("!H", 0) + struct.pack("!H", len(params))
    for p in params:
        body += struct.pack("!i", len(p)) + p
    return message(b"B", body + struct.pack("!H", 0))


def execute() -> bytes:
    return message(b"E", _cs("") + struct.pack("!i", 0))


SYNC = message(b"S")


def query(sql: str) -> bytes:
    return message(b"Q", _cs(sql))


def read_readies(conn: RawConn, n: int) -> list[str]:
    """Read through ``n`` ReadyForQuery messages; the ErrorResponse codes seen on the way."""
    errors = []
    while n:
        typ, body = conn.read_message()
        if typ == "E":
            errors.append(body)
        elif typ == "Z":
            n -= 1
    return errors


def raw(proxy, **startup) -> RawConn:
    conn = RawConn("127.0.0.1", proxy.port)
    conn.startup(**startup)
    return conn


# ------------------------------------------- application_name as a channel


def test_application_name_set_before_each_query_parents_it(make_proxy, otlp):
    """OpenTelemetry JS's pg instrumentation: SET application_name = '<traceparent>' before each query."""
    proxy = make_proxy()
    contexts = [random_traceparent() for _ in range(2)]
    with raw(proxy, application_name="orders-service") as conn:
        conn.query("SELECT 'before' AS q")
        for i, ctx in enumerate(contexts):
            conn.query(f"SET application_name = '{ctx.traceparent}'")
            conn.query(f"SELECT {i} AS q")
        conn.query("SET application_name = 'orders-service'")
        conn.query("SELECT 'after' AS q")
    spans = collect(proxy, otlp, lambda got: all(in_trace(2, c.trace_id)(got) for c in contexts)
                    and any(s.attributes.get("db.query.text") == "SELECT ? AS q" and s.start_ns for s in got))
    for ctx in contexts:
        stmts = server_spans(spans, ctx.trace_id)
        assert [s.name for s in stmts] == ["SET", "SELECT"], texts(stmts)
        for s in stmts:
            assert s.parent_span_id == ctx.span_id
            # the value is context, not a name
            assert APP_NAME not in s.attributes, s.attributes
    traced = {c.trace_id for c in contexts}
    roots = [s for s in server_spans(spans) if s.trace_id not in traced]
    assert [s.parent_span_id for s in roots] == [None] * len(roots)
    assert [s.attributes.get(APP_NAME) for s in roots] == ["orders-service"] * len(roots), texts(roots)
    assert len(roots) == 3  # SELECT 'before', SET application_name = 'orders-service', SELECT 'after'


def test_application_name_from_the_startup_message(make_proxy, otlp):
    """A traceparent as the start-up application_name; RESET returns to it, a plain name ends it."""
    proxy = make_proxy(sample_rate=0.0)  # only statements with a context make spans
    ctx = random_traceparent()
    with raw(proxy, application_name=ctx.traceparent) as conn:
        conn.query("SELECT 1 AS first")
        conn.query("SET application_name = 'plain'")
        conn.query("SELECT 1 AS unseen")
        conn.query("RESET application_name")
        conn.query("SELECT 1 AS again")
    spans = collect(proxy, otlp, in_trace(3, ctx.trace_id))
    stmts = server_spans(spans, ctx.trace_id)
    assert texts(stmts) == ["SELECT ? AS first", "RESET application_name", "SELECT ? AS again"]
    assert {s.parent_span_id for s in stmts} == {ctx.span_id}
    assert not [s for s in server_spans(spans) if s.trace_id != ctx.trace_id]


def test_pg_tracing_trace_context_is_a_channel(make_proxy, otlp):
    """pg_tracing's SET LOCAL pg_tracing.trace_context = 'traceparent=''00-…''': its transaction only."""
    proxy = make_proxy()
    ctx, session_ctx = random_traceparent(), random_traceparent()
    with raw(proxy) as conn:
        conn.query("BEGIN")
        conn.query(f"SET LOCAL pg_tracing.trace_context = 'traceparent=''{ctx.traceparent}'''")
        conn.query("SELECT 1 AS inside")
        conn.query("COMMIT")
        conn.query("SELECT 1 AS outside")
        conn.query(f"SET pg_tracing.trace_context = 'traceparent=''{session_ctx.traceparent}'''")
        conn.query("BEGIN")
        conn.query("SET LOCAL pg_tracing.trace_context = 'none'")
        conn.query("SELECT 1 AS without")
        conn.query("ROLLBACK")
        conn.query("SELECT 1 AS session")
    spans = collect(proxy, otlp, lambda got: in_trace(1, ctx.trace_id)(got) and in_trace(2, session_ctx.trace_id)(got))
    inside = server_spans(spans, ctx.trace_id)
    assert "SELECT ? AS inside" in texts(inside) and "SELECT ? AS outside" not in texts(inside)
    assert all(s.parent_span_id == ctx.span_id for s in inside)
    in_session = server_spans(spans, session_ctx.trace_id)
    assert texts(in_session)[0].startswith("SET pg_tracing.trace_context")
    assert texts(in_session)[-1] == "SELECT ? AS session"
    assert "SELECT ? AS without" not in texts(in_session)


def test_which_channel_wins(make_proxy, otlp):
    """A statement's own comment, then pgotel.traceparent, then pg_tracing.trace_context, then application_name."""
    proxy = make_proxy()
    own, proxy_ctx, pg_tracing_ctx, app_ctx = (random_traceparent() for _ in range(4))
    with raw(proxy) as conn:
        conn.query(f"SET application_name = '{app_ctx.traceparent}'")
        conn.query("SELECT 1 AS app")
        conn.query(f"SET pg_tracing.trace_context = 'traceparent=''{pg_tracing_ctx.traceparent}'''")
        conn.query("SELECT 1 AS pg_tracing")
        conn.query(f"SET pgotel.traceparent = '{proxy_ctx.traceparent}'")
        conn.query("SELECT 1 AS proxy")
        conn.query(comment("SELECT 1 AS own", own))
        conn.query("RESET pgotel.traceparent")
        conn.query("SELECT 1 AS pg_tracing_again")
    spans = collect(proxy, otlp, lambda got: all(in_trace(1, c.trace_id)(got) for c in (own, proxy_ctx))
                    and in_trace(3, pg_tracing_ctx.trace_id)(got))
    def selects(ctx):
        return [t for t in texts(server_spans(spans, ctx.trace_id)) if t.startswith("SELECT")]
    assert selects(app_ctx) == ["SELECT ? AS app"]
    assert selects(pg_tracing_ctx) == ["SELECT ? AS pg_tracing", "SELECT ? AS pg_tracing_again"]
    assert selects(proxy_ctx) == ["SELECT ? AS proxy"]
    assert selects(own) == ["SELECT ? AS own"]


# ------------------------------------------- prepare in one batch, execute in the next


@pytest.mark.parametrize("name", ["", "stmt1"], ids=["unnamed", "named"])
def test_first_execution_after_its_parse_batch_takes_its_context(make_proxy, otlp, name):
    """pgx / tokio-postgres / psycopg prepare=True: Parse (+ Describe) + Sync, then Bind / Execute + Sync."""
    proxy = make_proxy()
    ctx = random_traceparent()
    with raw(proxy) as conn:
        conn.send(parse(comment("SELECT $1::int AS n", ctx), name) + describe_statement(name) + SYNC)
        assert read_readies(conn, 1) == []
        conn.send(bind(name, (b"1",)) + execute() + SYNC)
        assert read_readies(conn, 1) == []
        # A later execution of the same statement is no longer the Parse's request.
        conn.send(bind(name, (b"2",)) + execute() + SYNC)
        assert read_readies(conn, 1) == []
    spans = collect(proxy, otlp, lambda got: in_trace(2, ctx.trace_id)(got) and len(server_spans(got)) >= 3)
    stmts = server_spans(spans, ctx.trace_id)
    assert [s.name for s in stmts] == ["PREPARE SELECT", "SELECT"], [s.describe() for s in stmts]
    execution = stmts[1]
    assert execution.parent_span_id == ctx.span_id
    assert execution.attributes["db.response.returned_rows"] == 1
    assert "pgotel.statement.prepared_earlier" not in execution.attributes
    (again,) = [s for s in server_spans(spans) if s.trace_id != ctx.trace_id]
    assert again.name == "SELECT" and again.parent_span_id is None
    assert again.attributes["pgotel.statement.prepared_earlier"] is True


def test_a_request_between_parse_and_execute_keeps_the_old_rule(make_proxy, otlp):
    proxy = make_proxy()
    ctx = random_traceparent()
    with raw(proxy) as conn:
        conn.send(parse(comment("SELECT $1::int AS n", ctx), "s") + SYNC)
        read_readies(conn, 1)
        conn.query("SELECT 'in between'")
        conn.send(bind("s", (b"1",)) + execute() + SYNC)
        read_readies(conn, 1)
    spans = collect(proxy, otlp, lambda got: len(server_spans(got)) >= 3)
    assert [s.name for s in server_spans(spans, ctx.trace_id)] == ["PREPARE SELECT"]


# ------------------------------------------- application_name per statement


def test_application_name_is_the_one_each_statement_ran_under(make_proxy, otlp):
    """Two SET application_name / SELECT pairs in one write: each SELECT carries its own value."""
    proxy = make_proxy()
    with raw(proxy, application_name="at-start") as conn:
        conn.send(query("SELECT 1 AS zero") + query("SET application_name = 'first'") + query("SELECT 1 AS one")
                  + query("SET application_name = 'second'") + query("SELECT 1 AS two"))
        assert read_readies(conn, 5) == []
    spans = collect(proxy, otlp, lambda got: len(server_spans(got)) >= 5)
    got = {s.attributes["db.query.text"]: s.attributes.get(APP_NAME) for s in server_spans(spans)}
    assert got["SELECT ? AS zero"] == "at-start"
    assert got["SELECT ? AS one"] == "first"
    assert got["SELECT ? AS two"] == "second"


# ------------------------------------------- real instrumentations


def _client_spans(spans, scope_part: str):
    return [s for s in spans if s.kind == "CLIENT" and scope_part in s.scope]


def _children_of(spans, client):
    return [s for s in server_spans(spans, client.trace_id) if s.parent_span_id == client.span_id]


@pytest.mark.parametrize("prepare", [False, True], ids=["plain", "prepare"])
def test_opentelemetry_psycopg_instrumentation(make_proxy, otlp, app, prepare):
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    proxy = make_proxy()
    instrumentor = PsycopgInstrumentor()
    instrumentor.instrument(tracer_provider=app.provider, enable_commenter=True, skip_dep_check=True)
    try:
        with psycopg.connect(proxy.dsn(application_name="instrumented"), autocommit=True) as conn:
            with conn.cursor() as cur:
                for i in range(3):
                    cur.execute("SELECT %s::int AS n", (i,), prepare=prepare)
                    assert cur.fetchone() == (i,)
    finally:
        instrumentor.uninstrument()
    spans = collect(proxy, otlp, lambda got: len(_client_spans(got, "psycopg")) >= 3
                    and all(_children_of(got, c) for c in _client_spans(got, "psycopg")))
    clients = _client_spans(spans, "psycopg")
    assert len(clients) == 3
    for client in clients:
        kids = _children_of(spans, client)
        names = [s.name for s in kids]
        # with prepare=True: the PREPARE in one round trip, the execution in the next, both the client's
        assert names == (["PREPARE SELECT", "SELECT"] if prepare else ["SELECT"]), names
        execution = kids[-1]
        assert execution.attributes["db.response.returned_rows"] == 1
        assert execution.attributes[APP_NAME] == "instrumented"
    assert all(s.parent_span_id is not None for s in server_spans(spans)), "a statement span is a root"


def test_opentelemetry_sqlalchemy_instrumentation(make_proxy, otlp, app):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    proxy = make_proxy()
    url = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/postgres?sslmode=disable"
    engine = sqlalchemy.create_engine(url)
    instrumentor = SQLAlchemyInstrumentor()
    instrumentor.instrument(engine=engine, tracer_provider=app.provider, enable_commenter=True, skip_dep_check=True)
    try:
        with engine.connect() as conn:
            for i in range(3):
                got = conn.execute(sqlalchemy.text("SELECT CAST(:n AS int) AS n"), {"n": i}).scalar()
                assert got == i
            conn.commit()
    finally:
        instrumentor.uninstrument()
        engine.dispose()
    def selects(got):  # (its "connect" span has no statement of its own)
        return [c for c in _client_spans(got, "sqlalchemy") if c.name.startswith("SELECT")]

    spans = collect(proxy, otlp, lambda got: len(selects(got)) >= 3 and all(_children_of(got, c) for c in selects(got)))
    clients = selects(spans)
    assert len(clients) == 3, [c.name for c in _client_spans(spans, "sqlalchemy")]
    for client in clients:
        assert [s.name for s in _children_of(spans, client)] == ["SELECT"]


# ------------------------------------------- the rules, without sockets


class _Session:
    def __init__(self, app=None):
        self.startup_params = {"application_name": app} if app else {}
        self.server_params = {}
        self.backend_pid = 1


class _Info:
    def __init__(self, app=None):
        self.session = _Session(app)


A = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
B = "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01"
C = "00-2af7651916cd43dd8448eb211c80319c-d7ad6b7169203331-01"


def _tp(ctx):
    return None if ctx is None else ctx.traceparent()


def _run(steps, app=None):
    """steps: (sql, tx_status after it, command tag); returns the carrier after each."""
    from pgotel_proxy.tracing.spans import ConnState

    conn = ConnState(_Info(app), {})
    out = []
    for sql, tx, tag in steps:
        conn.observe_set(sql, True, tx)
        conn.end_of_statement(tx, tag)
        out.append(_tp(conn.carrier))
    return out


@pytest.mark.parametrize("name,value", [
    ("pgotel.traceparent", A),
    ("pg_tracing.trace_context", f"traceparent=''{A}''"),
    ("application_name", A),
])
def test_every_channel_follows_the_rules_of_settings(name, value):
    assert _run([
        (f"SET {name} = '{value}'", "I", "SET"),
        ("BEGIN", "T", "BEGIN"),
        (f"SET LOCAL {name} = '{value.replace(A, B)}'", "T", "SET"),
        ("COMMIT", "I", "COMMIT"),  # SET LOCAL ends, the session value is back
        ("BEGIN", "T", "BEGIN"),
        (f"SET {name} TO '{value.replace(A, C)}'", "T", "SET"),
        ("ROLLBACK", "I", "ROLLBACK"),  # undone
        (f"set local {name} = '{value.replace(A, B)}'", "I", "SET"),  # outside a block: nothing
        (f"RESET {name}", "I", "RESET"),
        (f"SET {name} = '{value}'", "I", "SET"),
        ("DISCARD ALL", "I", "DISCARD ALL"),
    ]) == [A, A, B, A, A, C, A, A, None, A, None]


def test_application_name_resets_to_its_startup_value_and_a_name_is_no_context():
    assert _run([
        ("SELECT 1", "I", "SELECT 1"),
        ("SET application_name = 'billing'", "I", "SET"),
        ("RESET application_name", "I", "RESET"),
        ("SET application_name TO DEFAULT", "I", "SET"),
        ("SET application_name = billing", "I", "SET"),
        ("RESET ALL", "I", "RESET"),
    ], app=A) == [A, None, A, A, None, A]


def test_the_first_channel_with_a_context_wins():
    assert _run([
        (f"SET application_name = '{C}'", "I", "SET"),
        (f"SET pg_tracing.trace_context = 'traceparent=''{B}'''", "I", "SET"),
        (f"SET pgotel.traceparent = '{A}'", "I", "SET"),
        ("RESET pgotel.traceparent", "I", "RESET"),
        ("RESET pg_tracing.trace_context", "I", "RESET"),
        ("SET application_name = 'x'", "I", "SET"),
    ]) == [C, B, A, B, C, None]


def test_pg_tracing_value_takes_its_tracestate():
    from pgotel_proxy import sqlcomment

    ctx = sqlcomment.context_of_tags(f"traceparent='{A}',tracestate='k=v'")
    assert ctx.traceparent() == A and ctx.tracestate == "k=v"
    assert sqlcomment.context_of_tags("traceparent='00-bad'") is None
    assert sqlcomment.context_of_tags(A) is None  # a bare traceparent is not pg_tracing's form
