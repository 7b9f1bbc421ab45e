"""Adaptive phase splitting end to end (docs/design/adaptive-splitting.md), on both relay paths.

A traced session runs a statement; once its record shows it took at least
``phase_split_threshold``, its shape (the query text, comments left out) is
slow, and the relay splices a Flush after the Parse, Bind and Execute of the
batches that run it: the pump (protocol/framing.py), or on the asyncio path
(here: WAL propagation on) the session itself (``Session._splits``). From then
on its spans have parse, plan and execute children with observed boundaries.
Fast statements are left alone, and the client reads the same bytes either way.
"""

from __future__ import annotations

import struct
import time

import psycopg
import pytest

from rawpg import RawConn, message
from tracetree import children, collect, comment, server_spans

pytestmark = pytest.mark.timeout(60)

SLOW = "SELECT pg_sleep(%s)"
FAST = "SELECT %s::int"
# The event loop reads the pump's log every few milliseconds: a statement's record has marked
# its shape before the next statement is sent once this has passed.
SETTLE = 0.1


@pytest.fixture(params=["pump", "asyncio"])
def split_proxy(request, make_proxy):
    """``make_proxy`` for sessions on the pump, or on the asyncio path (WAL propagation keeps them there)."""
    extra = {"wal_propagation": True} if request.param == "asyncio" else {}

    def factory(**overrides):
        proxy = make_proxy(**extra, **overrides)
        proxy.path = request.param
        return proxy

    return factory


def connect(proxy, **kwargs) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(application_name="split-tests"), autocommit=True, **kwargs)


TABLE = "split_items"


@pytest.fixture(scope="module")
def table(pg):
    pg.psql(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id int); INSERT INTO {TABLE} VALUES (0)")
    return TABLE


def _slow_plan_and_execute(conn, table: str) -> str:
    """A statement whose planning (a 10-way join, exhaustive search) and execution (a sleep) take milliseconds."""
    conn.execute("SET join_collapse_limit = 20")
    conn.execute("SET from_collapse_limit = 20")
    conn.execute("SET geqo = off")
    joins = " ".join(f"JOIN {table} t{i} ON t{i}.id = t{i - 1}.id" for i in range(1, 10))
    return f"SELECT pg_sleep(0.05) FROM {table} t0 {joins} WHERE t0.id = %s"


def _traced_runs(proxy, otlp, app, sql, params, n: int, prepare: bool | None = False, **connect_kwargs):
    """Run ``sql`` (or what ``sql(conn)`` returns) ``n`` times, each in an app span of its own; each run's
    statement span and its phase spans, in order."""
    ctxs = []
    with connect(proxy, **connect_kwargs) as conn:
        if callable(sql):
            sql = sql(conn)
        for _ in range(n):
            with app.span() as ctx:
                conn.execute(comment(sql, ctx), params, prepare=prepare)
            ctxs.append(ctx)
            time.sleep(SETTLE)
    spans = collect(proxy, otlp, lambda s: all(_executions(s, c) for c in ctxs))
    runs = []
    for ctx in ctxs:
        (stmt,) = _executions(spans, ctx)
        runs.append((stmt, children(spans, stmt)))
    return runs


def _executions(spans, ctx):
    """The statement spans of ``ctx``'s trace, a PREPARE's left out (psycopg prepares in a batch of its own)."""
    return [s for s in server_spans(spans, ctx.trace_id) if not s.name.startswith("PREPARE")]


def _assert_split(stmt, kids) -> None:
    assert [k.name for k in kids] == ["parse", "plan", "execute"], [k.describe() for k in kids]
    for k in kids:
        assert k.attributes["pgotel.timing.exact"] is True, k.describe()
        assert k.end_ns > k.start_ns, k.describe()
    parse, middle, execute = kids
    assert parse.end_ns <= middle.start_ns and middle.end_ns <= execute.start_ns
    assert middle.end_ns - middle.start_ns >= 5_000_000  # the join search is in plan
    assert execute.end_ns - execute.start_ns >= 40_000_000  # the sleep is in execute
    assert (parse.start_ns, execute.end_ns) == (stmt.start_ns, stmt.end_ns)


def test_a_slow_shape_is_split_from_the_run_after_it_was_slow(split_proxy, otlp, app, table):
    proxy = split_proxy()
    runs = _traced_runs(proxy, otlp, app, lambda conn: _slow_plan_and_execute(conn, table), (0,), 3)
    # The first run was not known to be slow: one merged child, as without splitting.
    assert [k.name for k in runs[0][1]] == ["parse+plan+execute"]
    for stmt, kids in runs[1:]:
        _assert_split(stmt, kids)


def test_a_prepared_statement_of_a_slow_shape_is_split_at_its_bind(split_proxy, otlp, app):
    proxy = split_proxy()
    runs = _traced_runs(proxy, otlp, app, SLOW, (0.05,), 4, prepare=True)
    assert [k.name for k in runs[0][1]] != ["parse", "plan", "execute"]
    for stmt, kids in runs[2:]:  # prepared in the first run (not split), bound by name after
        names = [k.name for k in kids]
        assert "execute" in names and all(k.attributes["pgotel.timing.exact"] for k in kids), names
        execute = kids[-1]
        assert execute.end_ns - execute.start_ns >= 40_000_000
        assert len(kids) >= 2, names  # the Bind's answer was seen apart from Execute's


def test_a_text_in_a_client_encoding_other_than_utf8_is_split(split_proxy, otlp, app):
    """The pump hashes the client's LATIN1 bytes, the event loop the text decoded as UTF-8: they agree."""
    proxy = split_proxy()
    runs = _traced_runs(proxy, otlp, app, 'SELECT pg_sleep(%s) AS "séance"', (0.05,), 3, client_encoding="LATIN1")
    for stmt, kids in runs[1:]:
        names = [k.name for k in kids]
        assert names[-1] == "execute" and len(names) >= 2, names
        assert kids[-1].end_ns - kids[-1].start_ns >= 40_000_000


def test_a_shape_fast_again_is_no_longer_split_and_is_forgotten(split_proxy, otlp, app):
    """Slow (split from the next run), then fast: once the moving average falls below the threshold
    the shape is no longer split, and once it is well below, the shape leaves the table, so that fast
    statements cost no hash again (ProxyServer.shape_durations)."""
    proxy = split_proxy()
    ctxs = []
    # The mean after two 50 ms runs is about 12 ms: seven fast runs bring it below the 5 ms
    # threshold, six more below half of it.
    with connect(proxy) as conn:
        for delay in (0.05, 0.05) + (0,) * 30:
            with app.span() as ctx:
                conn.execute(comment(SLOW, ctx), (delay,))
            ctxs.append(ctx)
            time.sleep(SETTLE)
    watched = (ctxs[1], ctxs[-1])
    spans = collect(proxy, otlp, lambda s: all(_executions(s, c) for c in watched))
    names = [[k.name for k in children(spans, _executions(spans, c)[0])] for c in watched]
    assert "execute" in names[0] and len(names[0]) >= 2, names  # known slow after the first run
    assert names[1] == ["parse+plan+execute"], names  # fast again: not split
    proxy.server.observe_now()
    assert not proxy.server.shape_durations, proxy.server.shape_durations


def test_fast_statements_are_not_split(split_proxy, otlp, app):
    proxy = split_proxy()
    runs = _traced_runs(proxy, otlp, app, FAST, (1,), 4)
    assert all([k.name for k in kids] == ["parse+plan+execute"] for _, kids in runs)


def test_a_threshold_of_zero_turns_splitting_off(split_proxy, otlp, app):
    proxy = split_proxy(phase_split_threshold=0)
    runs = _traced_runs(proxy, otlp, app, SLOW, (0.05,), 3)
    assert all([k.name for k in kids] == ["parse+plan+execute"] for _, kids in runs)


def _raw_batch(sql: str) -> bytes:
    """Parse, Bind, Describe, Execute and Sync of ``sql`` (unnamed statement and portal, no parameters)."""
    return (message(b"P", b"\0" + sql.encode() + b"\0" + b"\0\0")
            + message(b"B", b"\0\0" + b"\0\0" + b"\0\0" + b"\0\0")
            + message(b"D", b"P\0")
            + message(b"E", b"\0" + struct.pack("!I", 0))
            + message(b"S", b""))


def _raw_answers(proxy, n: int) -> list[bytes]:
    """What a hand-written client reads for ``n`` runs of a slow batch, and of a fast one between them."""
    got = []
    with RawConn("127.0.0.1", proxy.port) as c:
        c.startup()
        for i in range(n):
            for sql in ("SELECT pg_sleep(0.03)", f"SELECT {i}"):
                c.send(_raw_batch(sql))
                got.append(b"".join(t.encode() + struct.pack("!I", len(b) + 4) + b for t, b in c.read_until_ready()))
            time.sleep(SETTLE)
    return got


def test_the_client_reads_the_same_bytes_with_and_without_splitting(split_proxy, otlp):
    split = split_proxy()
    with_split = _raw_answers(split, 4)
    spans = collect(split, otlp, lambda s: len([x for x in server_spans(s) if x.name.startswith("SELECT")]) >= 8)
    slow = [s for s in server_spans(spans) if "pg_sleep" in s.attributes.get("db.query.text", "")]
    assert len(slow) == 4, [s.describe() for s in server_spans(spans)]
    # split from the second run on: the sleep's answer came in a read of its own
    assert [k.name for k in children(spans, slow[0])] == ["parse+plan+execute"]
    assert [k.name for k in children(spans, slow[-1])][-1] == "execute"
    without = _raw_answers(split_proxy(phase_split_threshold=0), 4)
    assert with_split == without
