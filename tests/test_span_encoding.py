"""The builder's two outputs mean the same: encoded spans (``SpanBuilder.encode``) and ReadableSpans.

With an exporter of otlp.py the builder writes each span's OTLP bytes
directly; with any other exporter, or with the enricher, it makes SDK
ReadableSpans. The same records, built with the same span ids both ways,
must give the same OTLP request, whatever the statement: simple or
extended, errors, phases, sqlcommenter tags, tracestate, transaction spans
with their links, session carriers.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from pgotel_proxy.protocol.events import Completion, Statement
from pgotel_proxy.stats import STATS
from pgotel_proxy.tracing import otlp, spans as spans_mod
from pgotel_proxy.tracing.spans import ConnState, SpanBuilder

RESOURCE = Resource.create({"service.name": "encoding-test"})
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class _Session:
    backend_pid = 4242
    server_params = {"application_name": "shop"}
    startup_params: dict = {}


class _Info:
    session = _Session()


def _build(records: list[Statement], encode: bool, *, transaction_spans: bool, seed: int) -> tuple[list, bytes]:
    builder = SpanBuilder(resource=RESOURCE, sample_rate=1.0, capture_parameters=True, capture_literals=False,
                          transaction_spans=transaction_spans, encode=encode)
    conn = ConnState(_Info(), {"db.system.name": "postgresql", "db.namespace": "shop", "server.port": 5432})
    spans_mod._rand.seed(seed)  # the same span ids both ways
    out: list = []
    for rec in records:
        builder.build(conn, rec, out)
    builder.flush_connection(conn, out)
    return out, otlp.encode_request(out)


def _same_request(records: list[Statement], transaction_spans: bool = False, seed: int = 1) -> list:
    readable, want = _build(records, False, transaction_spans=transaction_spans, seed=seed)
    encoded, got = _build(records, True, transaction_spans=transaction_spans, seed=seed)
    assert all(isinstance(s, ReadableSpan) for s in readable)
    assert all(type(s) is tuple and type(s[2]) is bytes for s in encoded)
    assert len(readable) == len(encoded)
    assert ExportTraceServiceRequest.FromString(got) == ExportTraceServiceRequest.FromString(want)
    return readable


def _extended(sql: str, t: int = 1_000, **kw) -> Statement:
    fields = dict(start_ns=t, parse_start_ns=t, parse_end_ns=t + 10, parse_exact=True, bind_start_ns=t + 20,
                  bind_end_ns=t + 30, bind_exact=True, exec_start_ns=t + 40, end_ns=t + 50, exec_exact=True,
                  status="ok", tag="SELECT 1", rows=1, tx_status="I")
    fields.update(kw)
    return Statement("extended", sql, **fields)


def _simple(sql: str, t: int = 1_000, results=None, **kw) -> Statement:
    fields = dict(start_ns=t, end_ns=t + 50, status="ok", tx_status="I",
                  results=results if results is not None else [Completion(t + 50, "SELECT 1", 1)])
    fields.update(kw)
    return Statement("simple", sql, **fields)


def test_a_statement_of_each_kind_encodes_the_same_both_ways():
    error = {"C": "22P02", "M": 'invalid input syntax for type integer: "s3cr3t"', "S": "ERROR"}
    records = [
        _extended(f"SELECT * FROM users WHERE id = $1 /*route='%2Fusers',traceparent='{TP}'*/", params=["7", None]),
        _extended(f"SELECT $1::int /*traceparent='{TP}',tracestate='rojo%3D00f067aa0ba902b7%2Ccongo%3Dt61rcWkgMzE'*/"),
        _extended("SELECT $1::int", status="error", error=error, tag=None, rows=0, end_ns=1_045),
        _extended("INSERT INTO t VALUES ($1)", status="prepared", bind_start_ns=0, bind_end_ns=0, exec_start_ns=0,
                  end_ns=0, statement_name="s1", tag=None),
        _extended("SELECT 1", reused=True, parse_start_ns=0, parse_end_ns=0, portal="p", statement_name="s1",
                  copy=None, parse_exact=False, bind_exact=False),
        _simple(f"SELECT 1; SELECT 2 /*traceparent='{TP}'*/",
                results=[Completion(1_020, "SELECT 1", 1), Completion(1_050, "SELECT 1", 1)]),
        _simple("SELECT 1/0", status="ok", results=[Completion(1_050, None, 0, {"C": "22012", "M": "division by zero"})]),
        _simple("COPY t TO STDOUT", copy="out", results=[Completion(1_050, "COPY 3", 3)], extra={"wal_lsn": "0/16B3748"}),
        _simple("SELECT pg_sleep(1)", status="incomplete", results=[]),
        _simple(f"SET pgotel.traceparent = '{TP}'", results=[Completion(1_010, "SET", 0)]),
        _simple("SELECT 'under the session carrier'"),
        Statement("function", None, start_ns=1_000, end_ns=1_010, status="ok", tx_status="I",
                  results=[Completion(1_010, None, 0)]),
    ]
    readable = _same_request(records)
    names = {s.name for s in readable}
    assert {"SELECT users", "parse", "plan", "execute", "plan+execute", "PREPARE INSERT t", "FUNCTION CALL"} <= names, names
    assert any(s.parent is not None and s.parent.trace_id == int(TP[3:35], 16) and s.context.trace_state
               for s in readable)


_ONE_READ = dict(parse_end_ns=1_050, bind_end_ns=1_050, end_ns=1_050)  # every answer arrived in one read


@pytest.mark.parametrize("fields, want", [
    # Parse, Bind, Execute, Sync in one write (psycopg, asyncpg, JDBC, pgx), answered together:
    # one span over the statement, its end (Execute's answer, flushed at Sync) observed.
    (dict(parse_exact=False, bind_exact=False, **_ONE_READ), [("parse+plan+execute", True, 1_000, 1_050)]),
    # phase_timing "flush", each answer in a read of its own: three exact phases.
    ({}, [("parse", True, 1_000, 1_010), ("plan", True, 1_020, 1_030), ("execute", True, 1_040, 1_050)]),
    # Flushed, but ParseComplete and BindComplete read together: no boundary between them.
    (dict(parse_end_ns=1_030), [("parse+plan", True, 1_000, 1_030), ("execute", True, 1_040, 1_050)]),
    # A statement prepared earlier (Bind, Execute, Sync): plan and execute answered together.
    (dict(reused=True, parse_start_ns=0, parse_end_ns=0, parse_exact=False, bind_exact=False, bind_end_ns=1_050),
     [("plan+execute", True, 1_020, 1_050)]),
    # Pipelined, not followed by a Flush or Sync: not even the end was observed.
    (dict(parse_exact=False, bind_exact=False, exec_exact=False, **_ONE_READ),
     [("parse+plan+execute", False, 1_000, 1_050)]),
    # Prepared only (Parse, Describe, Sync): Describe's answer came before the end.
    (dict(status="prepared", parse_exact=False, bind_start_ns=0, bind_end_ns=0, exec_start_ns=0, end_ns=0,
          tag=None), [("parse", False, 1_000, 1_010)]),
    # Skipped after an earlier error in its batch: parsed and bound, never executed.
    (dict(status="skipped", parse_exact=False, bind_exact=False, tag=None, rows=0),
     [("parse+plan", False, 1_000, 1_030)]),
])
def test_phase_spans_claim_no_boundary_the_wire_did_not_show(fields, want):
    readable = _same_request([_extended(f"SELECT $1::int /*traceparent='{TP}'*/", **fields)])
    statement, *phases = readable
    got = [(p.name, p.attributes["pgotel.timing.exact"], p.start_time, p.end_time) for p in phases]
    assert got == want
    for p in phases:
        assert p.parent.span_id == statement.context.span_id
        held = p.name.split("+")
        if len(held) > 1:
            assert list(p.attributes["pgotel.phases"]) == held
        else:
            assert "pgotel.phases" not in p.attributes


def test_transaction_spans_and_their_links_encode_the_same_both_ways():
    records = [
        _simple("BEGIN", tx_status="T", results=[Completion(1_010, "BEGIN", 0)]),
        _extended(f"SELECT $1::int /*traceparent='{TP}'*/", t=2_000, tx_status="T"),
        _simple("SELECT 2", t=3_000, tx_status="T"),
        _simple("COMMIT", t=4_000, results=[Completion(4_050, "COMMIT", 0)]),
        _simple("BEGIN", t=5_000, tx_status="T", results=[Completion(5_010, "BEGIN", 0)]),
        _simple("SELECT 1/0", t=6_000, tx_status="E", results=[Completion(6_050, None, 0, {"C": "22012", "M": "x"})]),
        _simple("ROLLBACK", t=7_000, results=[Completion(7_050, "ROLLBACK", 0)]),
        _simple("BEGIN", t=8_000, tx_status="T", results=[Completion(8_010, "BEGIN", 0)]),  # open at the end
    ]
    readable = _same_request(records, transaction_spans=True)
    tx = [s for s in readable if s.name == "transaction"]
    assert len(tx) == 3
    linked = [s for s in readable if s.links]
    assert linked and all(s.links[0].context.span_id == tx[0].context.span_id for s in linked)


_statuses = st.sampled_from(["ok", "error", "skipped", "suspended", "incomplete", "prepared"])
_texts = st.sampled_from([
    "SELECT 1", "SELECT * FROM t WHERE a = $1", "UPDATE t SET a = 1", "not sql at all (", "",
    f"SELECT 1 /*traceparent='{TP}'*/", f"SELECT 1 /*app='x%20y',traceparent='{TP}'*/",
    "SELECT 1 /*traceparent='00-00000000000000000000000000000000-0000000000000000-01'*/",
    "SELECT 1 /*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00'*/",
])


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.tuples(
        st.booleans(), _texts, _statuses, st.integers(0, 2**31), st.booleans(), st.booleans(),
        st.sampled_from(["I", "T", "E"]), st.sampled_from([None, "SELECT 3", "INSERT 0 1", "FETCH 2"]),
    ), min_size=1, max_size=6),
    transaction_spans=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_any_records_encode_the_same_both_ways(rows, transaction_spans, seed):
    records = []
    t = 1_000
    for extended, sql, status, n, exact, reused, tx, tag in rows:
        error = {"C": "42P01", "M": 'relation "t" does not exist'} if status == "error" else None
        if extended:
            records.append(_extended(sql, t=t, status=status, rows=n, tag=tag, error=error, parse_exact=exact,
                                     exec_exact=not exact, reused=reused, tx_status=tx))
        else:
            records.append(_simple(sql, t=t, status=status if status in ("ok", "incomplete") else "ok", tx_status=tx,
                                   results=[Completion(t + 40, tag, n, error)]))
        t += random.Random(n).randint(100, 10_000)
    _same_request(records, transaction_spans=transaction_spans, seed=seed)


def test_repeated_statement_shapes_encode_the_same_as_the_first(monkeypatch):
    """Encoded spans of a shape seen before on the connection come from its kept parts: same request."""
    records = []
    t = 1_000
    for i in range(12):
        reused = i % 3 != 0
        records.append(_extended(f"SELECT * FROM users WHERE id = $1 /*route='%2Fusers',traceparent='{TP}'*/",
                                 t=t, reused=reused, rows=1 + i % 2, statement_name="s1" if reused else "",
                                 parse_start_ns=0 if reused else t, parse_end_ns=0 if reused else t + 10))
        t += 1_000
        if i == 5:  # the session carrier changes in between: repeated shapes follow it
            records.append(_simple(f"SET pgotel.traceparent = '{TP[:-2]}00'", t=t,
                                   results=[Completion(t + 10, "SET", 0)]))
            t += 1_000
        if i == 8:
            records.append(_simple("RESET pgotel.traceparent", t=t, results=[Completion(t + 10, "RESET", 0)]))
            t += 1_000
    calls = []
    real = SpanBuilder._attrs

    def counting(self, *args):
        calls.append(args[2])
        return real(self, *args)

    monkeypatch.setattr(SpanBuilder, "_attrs", counting)
    _build(records, True, transaction_spans=False, seed=3)
    encoded_attrs = len(calls)
    calls.clear()
    _same_request(records, seed=3)
    # The SDK path builds attributes for every sampled statement; the encoded path
    # only for each statement shape's first execution.
    assert encoded_attrs < len(calls) / 2, (encoded_attrs, len(calls))


def test_shape_parts_are_not_kept_for_what_varies(monkeypatch):
    """Errors, transaction spans, COPY, captured parameters and session SETs never come from kept parts."""
    error = {"C": "22P02", "M": "bad", "S": "ERROR"}
    records = []
    for i in range(4):
        records.append(_extended("SELECT $1::int", t=1_000 * (i + 1), status="error", error=error, tag=None, rows=0))
        records.append(_extended("SELECT $1::int", t=1_000 * (i + 1) + 500, params=[str(i)]))
        records.append(_extended("COPY t TO STDOUT", t=1_000 * (i + 1) + 700, copy="out", tag="COPY 1"))
    _same_request(records, seed=5)
    assert _kept_shapes(records, capture_parameters=True) == {}


def test_repeated_shapes_inside_transactions_and_carrier_sets_encode_the_same():
    other = "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01"
    set_sql = f"SET pgotel.traceparent = '{other}'"
    records = [
        _simple("BEGIN", tx_status="T", results=[Completion(1_010, "BEGIN", 0)]),
        _extended(f"SELECT $1::int /*traceparent='{TP}'*/", t=2_000, tx_status="T"),
        _extended(f"SELECT $1::int /*traceparent='{TP}'*/", t=3_000, tx_status="T"),
        _simple("COMMIT", t=4_000, results=[Completion(4_050, "COMMIT", 0)]),
        # a SET of the session carrier sent as an extended statement, twice, a RESET between
        _extended(set_sql, t=5_000, tag="SET", rows=0),
        _extended("SELECT 1", t=6_000, reused=True),
        _simple("RESET pgotel.traceparent", t=7_000, results=[Completion(7_010, "RESET", 0)]),
        _extended(set_sql, t=8_000, tag="SET", rows=0),
        _extended("SELECT 1", t=9_000, reused=True),
    ]
    readable = _same_request(records, transaction_spans=True, seed=9)
    assert sum(1 for s in readable if s.links) == 2
    under_carrier = [s for s in readable if s.name == "SELECT" and s.context.trace_id == int(other[3:35], 16)]
    assert len(under_carrier) == 2


def test_repeated_simple_shapes_with_other_values_encode_the_same():
    """Simple statements of one shape, values inline, reuse the shape's parts; anything else does not."""
    records = []
    t = 1_000
    for i in range(10):
        records.append(_simple(f"/*route='%2Fa',traceparent='{TP}'*/ SELECT * FROM users WHERE id = {i * 37};", t=t,
                               results=[Completion(t + 50, "SELECT 1", 1 + i % 2)]))
        records.append(_simple(f"SELECT name FROM users WHERE name = 'ALL{i}'", t=t + 100,
                               results=[Completion(t + 150, "SELECT 0", 0)]))
        t += 1_000
    records.append(_simple("SELECT 1/0", t=t, results=[Completion(t + 50, None, 0, {"C": "22012", "M": "x"})]))
    _same_request(records, seed=11)
    # one shape, two row counts; the 'ALL' texts (which may set a context channel, so their text
    # is read for it each time) kept as such; the error not kept
    kept = _kept_shapes(records, capture_parameters=False)
    assert len(kept) == 3
    assert [key[1] for key in kept if key[0] == spans_mod._SETTER] == ["SELECT name FROM users WHERE name = \x01"]


def _kept_shapes(records: list[Statement], *, capture_parameters: bool) -> dict:
    """The statement shapes an encoding builder keeps for one connection after ``records``."""
    builder = SpanBuilder(resource=RESOURCE, sample_rate=1.0, capture_parameters=capture_parameters,
                          capture_literals=False, encode=True)
    conn = ConnState(_Info(), {})
    for rec in records:
        builder.build(conn, rec, [])
    return conn.shapes


def _traceparent(i: int, flags: str = "01") -> str:
    return f"00-{0x0af7651916cd43dd8448eb211c80319c + i:032x}-{0xb7ad6b7169203331 + i:016x}-{flags}"


def test_simple_statements_keyed_by_shape_encode_the_same_and_skip_the_parsers(monkeypatch):
    """A simple statement of a known statement_key is spanned without sqlcomment or sqlinfo: same request."""
    records = []
    t = 1_000
    for i in range(12):
        tp = _traceparent(i, "00" if i == 7 else "01")  # one unsampled: no spans, like the full path
        records.append(_simple(f"SELECT abalance FROM accounts WHERE aid = {i * 7919} AND name = 'n{i}''s' "
                               f"/*route='%2Fa',traceparent='{tp}',tracestate='congo%3Dt61rcWkgMzE'*/;",
                               t=t, results=[Completion(t + 50, "SELECT 1", 1)]))
        # same code, another route: another key
        records.append(_simple(f"SELECT abalance FROM accounts WHERE aid = {i} AND name = 'x' "
                               f"/*route='%2Fb',traceparent='{tp}'*/", t=t + 100,
                               results=[Completion(t + 150, "SELECT 1", 1 + i % 2)]))
        t += 1_000
    calls = []
    real = spans_mod.sqlcomment.parse

    def counting(sql, **kw):
        calls.append(sql)
        return real(sql, **kw)

    monkeypatch.setattr(spans_mod.sqlcomment, "parse", counting)
    parsed0 = STATS.sqlcomment_parsed
    _build(records, True, transaction_spans=False, seed=13)
    encoded_calls, encoded_parsed = len(calls), STATS.sqlcomment_parsed - parsed0
    calls.clear()
    parsed0 = STATS.sqlcomment_parsed
    readable = _same_request(records, seed=13)
    # the SDK path parses every statement; the encoded path the first of each key
    # (two shapes, the second with two row counts), and counts the same
    assert encoded_calls == 3, encoded_calls
    assert (STATS.sqlcomment_parsed - parsed0) / 2 == encoded_parsed == len(records)
    assert len(readable) == 2 * (len(records) - 2)
    assert {s.attributes["db.query.text"] for s in readable if s.name != "execute"} == {
        "SELECT abalance FROM accounts WHERE aid = ? AND name = ?"}


def _analysed(monkeypatch) -> list:
    """The texts the span builder analyses (sqlinfo.analyze / analyze_many) from now on, in order."""
    calls: list = []
    for name in ("analyze", "analyze_many"):
        def counting(sql, real=getattr(spans_mod.sqlinfo, name)):
            calls.append(sql)
            return real(sql)
        monkeypatch.setattr(spans_mod.sqlinfo, name, counting)
    return calls


def test_statements_without_a_comment_keyed_by_shape_encode_the_same_and_skip_the_analysis(monkeypatch):
    """Values inline and no sqlcommenter (each statement a new root): spanned from the text's key
    after the first of a shape, simple and extended alike; the same request as the SDK path."""
    records = []
    t = 1_000
    for i in range(10):
        records.append(_simple(f"SELECT abalance FROM accounts WHERE aid = {i * 7919} AND name = 'n{i}''s'",
                               t=t, results=[Completion(t + 50, "SELECT 1", 1)]))
        records.append(_extended(f"UPDATE accounts SET abalance = abalance + $1 WHERE aid = {i}", t=t + 100,
                                 tag="UPDATE 1", rows=1))
        t += 1_000
    calls = _analysed(monkeypatch)
    parsed0 = STATS.sqlcomment_parsed
    _build(records, True, transaction_spans=False, seed=7)
    assert len(calls) == 2, calls  # the first statement of each shape; the rest are keyed
    assert STATS.sqlcomment_parsed == parsed0  # no comment, none counted
    readable = _same_request(records, seed=7)
    assert len([s for s in readable if s.kind == SpanKind.SERVER]) == len(records)
    assert {s.attributes["db.query.text"] for s in readable if s.kind == SpanKind.SERVER} == {
        "SELECT abalance FROM accounts WHERE aid = ? AND name = ?",
        "UPDATE accounts SET abalance = abalance + $1 WHERE aid = ?"}
    assert len({s.context.trace_id for s in readable if s.kind == SpanKind.SERVER}) == len(records)  # new roots


def test_statements_with_tags_but_no_traceparent_keyed_by_shape_encode_the_same(monkeypatch):
    """Rails' query log tags (sqlcommenter's form, no traceparent): spanned from the text's key after
    the first of a shape, the tags still attributes, each comment counted as parsed as before."""
    records = []
    t = 1_000
    for i in range(8):
        records.append(_simple(f"SELECT * FROM users WHERE id = {i} /*application='shop',controller='users'*/",
                               t=t, results=[Completion(t + 50, "SELECT 1", 1)]))
        records.append(_extended(f"SELECT * FROM users WHERE id = $1 AND n = {i} /*controller='users'*/",
                                 t=t + 100))
        t += 1_000
    calls = _analysed(monkeypatch)
    parsed0 = STATS.sqlcomment_parsed
    _build(records, True, transaction_spans=False, seed=9)
    encoded_parsed = STATS.sqlcomment_parsed - parsed0
    assert len(calls) == 2, calls  # the first of each shape
    parsed0 = STATS.sqlcomment_parsed
    readable = _same_request(records, seed=9)
    assert (STATS.sqlcomment_parsed - parsed0) / 2 == encoded_parsed == len(records)
    statements = [s for s in readable if s.kind == SpanKind.SERVER]
    assert {s.attributes.get("pgotel.sqlcommenter.controller") for s in statements} == {"users"}


def test_statements_without_a_comment_keyed_by_shape_join_the_session_carrier():
    """Under a session carrier (SET pgotel.traceparent), keyed texts without a comment take its context."""
    records = [_simple(f"SET pgotel.traceparent = '{TP}'", results=[Completion(1_010, "SET", 0)])]
    for i in range(4):
        t = 2_000 + 1_000 * i
        records.append(_simple(f"SELECT * FROM t WHERE id = {i}", t=t, results=[Completion(t + 50, "SELECT 1", 1)]))
        records.append(_extended(f"SELECT * FROM t WHERE id = $1 AND n = {i}", t=t + 100))
    readable = _same_request(records, seed=3)
    statements = [s for s in readable if s.kind == SpanKind.SERVER and s.name != "SET"]
    assert len(statements) == 8
    assert {(s.context.trace_id, s.parent.span_id) for s in statements} == {(int(TP[3:35], 16), int(TP[36:52], 16))}


def test_statements_under_application_name_contexts_share_their_shapes(monkeypatch):
    """OpenTelemetry JS's pg sets a new traceparent in application_name before each statement:
    such a value is no name, so every statement after the first is spanned from its kept shape,
    each under its own SET's context; a real name is still an attribute."""
    records = []
    for i in range(6):
        t = 2_000 + 1_000 * i
        app = _traceparent(i)
        records.append(_simple(f"SET application_name = '{app}'", t=t, application_name=app,
                               results=[Completion(t + 10, "SET", 0)]))
        records.append(_extended("SELECT * FROM t WHERE id = $1", t=t + 100, application_name=app))
    records.append(_simple("SET application_name = 'billing'", t=9_000, application_name="billing",
                           results=[Completion(9_010, "SET", 0)]))
    records.append(_extended("SELECT * FROM t WHERE id = $1", t=9_100, application_name="billing"))
    calls = _analysed(monkeypatch)
    _build(records, True, transaction_spans=False, seed=5)
    # the first SET and SELECT under a context, the SET and SELECT under a name
    assert calls == [records[0].sql, records[1].sql, records[-2].sql, records[-1].sql]
    readable = _same_request(records, seed=5)
    selects = [s for s in readable if s.kind == SpanKind.SERVER and s.name != "SET"]
    assert [(s.context.trace_id, s.parent.span_id) for s in selects[:6]] == [
        (int(_traceparent(i)[3:35], 16), int(_traceparent(i)[36:52], 16)) for i in range(6)]
    assert [s.attributes.get("db.postgresql.application_name") for s in selects] == [None] * 6 + ["billing"]


def test_simple_statements_that_a_key_must_not_stand_for_are_parsed_every_time(monkeypatch):
    """Oversized tags, carrier SETs, errors and several statements in one Query are never keyed."""
    records = []
    t = 1_000
    for i in range(4):
        tp = _traceparent(i)
        texts = [
            # an oversized tag value: counted on every statement
            (f"SELECT {i} /*traceparent='{tp}',big='{'x' * 3000}'*/", "SELECT 1", None),
            (f"SELECT set_config('pgotel.traceparent', '{tp}', false) /*traceparent='{tp}'*/", "SELECT 1", None),
            (f"SELECT {i} FROM t /*traceparent='{tp}'*/", None, {"C": "42P01", "M": "no t"}),
        ]
        for sql, tag, error in texts:
            records.append(_simple(sql, t=t, results=[Completion(t + 50, tag, 1 if tag else 0, error)]))
            t += 100
        records.append(_simple(f"SELECT {i}; SELECT 2 /*traceparent='{tp}'*/", t=t,
                               results=[Completion(t + 20, "SELECT 1", 1), Completion(t + 40, "SELECT 1", 1)]))
        t += 1_000
    oversized0 = STATS.sqlcomment_oversized
    _same_request(records, seed=17)
    # once per statement on each of the two builds
    assert STATS.sqlcomment_oversized - oversized0 == 2 * 4
    assert not [k for k in _kept_shapes(records, capture_parameters=False) if type(k[0]) is str and "/*" in k[0]]
