"""Tier-1 tables for the sans-IO protocol session: bytes in, Statement records and state out.

No sockets: each scenario is a list of steps (``"c"`` client bytes, ``"s"``
server bytes) played into a :class:`Session` that has finished start-up. The
clock is the step number times ten, so the same scenario fed in any chunking
must give identical records, which is how the split tests check framing.

The byte builders (tests/wire.py) follow the "Message Formats" chapter;
frontend and backend share some type letters (D is Describe and DataRow),
hence the long names.
"""

from __future__ import annotations

import struct

import pytest

from pgotel_proxy.protocol import ProtocolViolation, Session, Statement
from pgotel_proxy.protocol.events import as_dict
from wire import (
    AUTH_OK, BIND_COMPLETE, CLOSE_COMPLETE, COPY_DONE, EMPTY_QUERY, FLUSH, NO_DATA, PARSE_COMPLETE,
    PORTAL_SUSPENDED, SYNC, TERMINATE, AuthSASL, BackendKeyData, Bind, Close, CommandComplete, CopyData,
    CopyFail, CopyInResponse, CopyOutResponse, DataRow, Describe, ErrorResponse, Execute, FunctionCall,
    FunctionCallResponse, NoticeResponse, Notification, ParameterDescription, ParameterStatus, Parse, Query,
    ReadyForQuery as Ready, RowDescription, message as msg,
)

# ---------------------------------------------------------------------------
# fixed messages

KEY4 = bytes.fromhex("0badcafe")
STARTUP_REPLY = (
    AUTH_OK
    + ParameterStatus("server_version", "15.0")
    + ParameterStatus("client_encoding", "UTF8")
    + BackendKeyData(4242, KEY4)
    + Ready("I")
)

# ---------------------------------------------------------------------------
# driver


def ready_session(session_class=Session, **kw) -> Session:
    s = session_class(**kw)
    out = s.server_filter(STARTUP_REPLY, 1)
    assert out == STARTUP_REPLY
    assert s.ready and not s.server_hold and s.out_of_sync is None
    assert s.take_completed() == []
    return s


def chunks(data: bytes, size: int | None):
    if size is None:
        yield data
        return
    for i in range(0, len(data), size):
        yield data[i : i + size]


def play(steps, chunk: int | None = None, session: Session | None = None, **kw):
    """Play steps; return (session, [(step, record)], client bytes forwarded, server bytes forwarded)."""
    s = session or ready_session(**kw)
    done: list[tuple[int, object]] = []
    cout: list[bytes] = []
    sout: list[bytes] = []
    for i, (side, data) in enumerate(steps, start=1):
        now = i * 10
        for piece in chunks(data, chunk):
            if side == "c":
                r = s.client_data(piece, now)
                cout.append(piece if r is None else r)
            elif s.server_hold:
                sout.append(s.server_filter(piece, now))
            else:
                s.server_observe(piece, now)
                sout.append(piece)
        done.extend((i, rec) for rec in s.take_completed())
    return s, done, b"".join(cout), b"".join(sout)


def view(rec, keys):
    out = {}
    for k in keys:
        if k == "sqlstate":
            out[k] = rec.error["C"] if rec.error else None
        elif k == "results":
            out[k] = [(c.tag, c.rows, c.error["C"] if c.error else None) for c in rec.results]
        else:
            out[k] = getattr(rec, k)
    return out


def check(done, expected):
    """``expected``: list of (step the record is completed at, {field: value})."""
    got = [(step, view(rec, exp.keys())) for (step, rec), (_, exp) in zip(done, expected)]
    assert got == expected
    assert len(done) == len(expected), [view(r, ("protocol", "sql", "status")) for _, r in done]


def snapshot(done):
    return [(step, as_dict(rec)) for step, rec in done]


# ---------------------------------------------------------------------------
# scenarios: (id, steps, expected records as (completed-at step, fields), session kwargs)

EXT_OK = PARSE_COMPLETE + BIND_COMPLETE + RowDescription("x") + DataRow(b"1") + CommandComplete("SELECT 1")

SCENARIOS = [
    (
        "simple",
        [("c", Query("select 1")), ("s", RowDescription("x") + DataRow(b"1") + CommandComplete("SELECT 1") + Ready())],
        [(2, {"protocol": "simple", "sql": "select 1", "status": "ok", "results": [("SELECT 1", 1, None)],
              "start_ns": 10, "end_ns": 20, "tx_status": "I", "exec_exact": True})],
    ),
    (
        "simple-multi-statement",
        [
            ("c", Query("begin; select 1; select 2 union select 3; commit")),
            ("s", CommandComplete("BEGIN") + RowDescription("x") + DataRow(b"1") + CommandComplete("SELECT 1")),
            ("s", RowDescription("x") + DataRow(b"2") + DataRow(b"3") + CommandComplete("SELECT 2")),
            ("s", CommandComplete("COMMIT") + Ready("I")),
        ],
        [(4, {"status": "ok", "end_ns": 40, "results": [("BEGIN", 0, None), ("SELECT 1", 1, None), ("SELECT 2", 2, None), ("COMMIT", 0, None)]})],
    ),
    (
        "simple-multi-statement-error",
        [
            ("c", Query("select 1; select 1/0; select 3")),
            ("s", RowDescription("x") + DataRow(b"1") + CommandComplete("SELECT 1") + RowDescription("x") + ErrorResponse("22012") + Ready("I")),
        ],
        [(2, {"status": "error", "results": [("SELECT 1", 1, None), (None, 0, "22012")]})],
    ),
    (
        "simple-error-in-transaction",
        [("c", Query("begin; select x")), ("s", CommandComplete("BEGIN") + ErrorResponse("42703") + Ready("E"))],
        [(2, {"status": "error", "tx_status": "E", "results": [("BEGIN", 0, None), (None, 0, "42703")]})],
    ),
    (
        "extended",
        [("c", Parse("select $1::int", types=(23,)) + Bind(params=(b"7",)) + Describe() + Execute() + SYNC), ("s", EXT_OK + Ready())],
        [(2, {"protocol": "extended", "sql": "select $1::int", "statement_name": "", "portal": "", "status": "ok",
              "tag": "SELECT 1", "rows": 1, "reused": False, "start_ns": 10, "parse_start_ns": 10, "parse_end_ns": 20,
              "bind_start_ns": 10, "bind_end_ns": 20, "exec_start_ns": 10, "end_ns": 20,
              "parse_exact": False, "bind_exact": False, "exec_exact": True, "params": None})],
    ),
    (
        "extended-describe-statement",
        [("c", Parse("select $1", "s1") + Describe(b"S", "s1") + SYNC), ("s", PARSE_COMPLETE + ParameterDescription(25) + RowDescription("x") + Ready())],
        [(2, {"status": "prepared", "statement_name": "s1", "parse_end_ns": 20, "exec_start_ns": 0})],
    ),
    (
        "extended-phases-answered-one-by-one",
        [
            ("c", Parse("select 1") + FLUSH), ("s", PARSE_COMPLETE),
            ("c", Bind() + FLUSH), ("s", BIND_COMPLETE),
            ("c", Execute() + SYNC), ("s", DataRow(b"1") + CommandComplete("SELECT 1") + Ready()),
        ],
        [(6, {"parse_start_ns": 10, "parse_end_ns": 20, "bind_start_ns": 30, "bind_end_ns": 40, "exec_start_ns": 50,
              "end_ns": 60, "parse_exact": True, "bind_exact": True, "exec_exact": True, "start_ns": 10})],
    ),
    (
        "pipeline-many-syncs",
        [
            ("c", Parse("select 1", "a") + Bind("a") + Execute() + SYNC + Parse("select 2") + Bind() + Execute() + SYNC
             + Bind("a") + Execute() + SYNC + Query("select 3")),
            ("s", PARSE_COMPLETE + BIND_COMPLETE + DataRow(b"1") + CommandComplete("SELECT 1") + Ready()),
            ("s", PARSE_COMPLETE + BIND_COMPLETE + DataRow(b"2") + CommandComplete("SELECT 1") + Ready()
             + BIND_COMPLETE + DataRow(b"1")),
            ("s", CommandComplete("SELECT 1") + Ready() + RowDescription("x") + DataRow(b"3") + CommandComplete("SELECT 1") + Ready()),
        ],
        [
            (2, {"sql": "select 1", "statement_name": "a", "reused": False, "status": "ok"}),
            (3, {"sql": "select 2", "statement_name": "", "reused": False, "status": "ok"}),
            (4, {"sql": "select 1", "statement_name": "a", "reused": True, "status": "ok", "parse_start_ns": 0, "bind_end_ns": 30}),
            (4, {"protocol": "simple", "sql": "select 3", "results": [("SELECT 1", 1, None)]}),
        ],
    ),
    (
        "extended-error-skips-to-sync",
        [
            ("c", Parse("select 1/0") + Bind() + Execute() + Parse("select 2") + Bind() + Execute() + SYNC
             + Parse("select 3") + Bind() + Execute() + SYNC),
            ("s", PARSE_COMPLETE + BIND_COMPLETE + ErrorResponse("22012") + Ready("I")),
            ("s", PARSE_COMPLETE + BIND_COMPLETE + DataRow(b"3") + CommandComplete("SELECT 1") + Ready("I")),
        ],
        [
            (2, {"sql": "select 1/0", "status": "error", "sqlstate": "22012", "end_ns": 20}),
            (2, {"sql": "select 2", "status": "skipped", "sqlstate": None, "parse_end_ns": 0}),
            (3, {"sql": "select 3", "status": "ok", "rows": 1}),
        ],
    ),
    (
        "extended-parse-error",
        [("c", Parse("selec 1") + Bind() + Describe() + Execute() + SYNC), ("s", ErrorResponse("42601") + Ready())],
        [(2, {"status": "error", "sqlstate": "42601", "parse_end_ns": 20, "bind_end_ns": 0})],
    ),
    (
        "extended-error-before-sync-is-sent",
        [
            ("c", Parse("select 1/0") + Bind() + Execute() + FLUSH),
            ("s", PARSE_COMPLETE + BIND_COMPLETE + ErrorResponse("22012")),
            ("c", Parse("select 2") + Bind() + Describe() + Execute() + Close(b"S", "") + SYNC),
            ("s", Ready("I")),
            ("c", Query("select 4")),
            ("s", RowDescription("x") + DataRow(b"4") + CommandComplete("SELECT 1") + Ready()),
        ],
        [
            (4, {"sql": "select 1/0", "status": "error", "end_ns": 20}),
            (4, {"sql": "select 2", "status": "skipped", "end_ns": 30}),
            (6, {"sql": "select 4", "status": "ok"}),
        ],
    ),
    (
        "error-at-sync-deferred-commit",
        # A deferred constraint fails when Sync commits the implicit transaction:
        # the ErrorResponse answers the Sync itself, and the next batch must still pair.
        [
            ("c", Parse("insert into t values (1)") + Bind() + Execute() + SYNC + Parse("select 2") + Bind() + Execute() + SYNC),
            ("s", PARSE_COMPLETE + BIND_COMPLETE + CommandComplete("INSERT 0 1") + ErrorResponse("23503") + Ready("I")),
            ("s", PARSE_COMPLETE + BIND_COMPLETE + DataRow(b"2") + CommandComplete("SELECT 1") + Ready("I")),
        ],
        [
            (2, {"sql": "insert into t values (1)", "tag": "INSERT 0 1", "status": "error", "sqlstate": "23503"}),
            (3, {"sql": "select 2", "status": "ok", "rows": 1}),
        ],
    ),
    (
        "copy-in-simple",
        [
            ("c", Query("copy t from stdin")), ("s", CopyInResponse()),
            ("c", CopyData(b"1\n") + CopyData(b"2\n") + COPY_DONE), ("s", CommandComplete("COPY 2") + Ready()),
        ],
        [(4, {"copy": "in", "status": "ok", "results": [("COPY 2", 0, None)]})],
    ),
    (
        "copy-in-simple-fail",
        [
            ("c", Query("copy t from stdin")), ("s", CopyInResponse()),
            ("c", CopyData(b"1\n") + CopyFail("nope")), ("s", ErrorResponse("57014") + Ready()),
        ],
        [(4, {"copy": "in", "status": "error", "results": [(None, 0, "57014")]})],
    ),
    (
        "copy-out-simple",
        [("c", Query("copy t to stdout")), ("s", CopyOutResponse() + CopyData(b"1\n") + CopyData(b"2\n") + msg(b"c") + CommandComplete("COPY 2") + Ready())],
        [(2, {"copy": "out", "status": "ok", "results": [("COPY 2", 0, None)]})],
    ),
    (
        "copy-out-extended",
        [
            ("c", Parse("copy t to stdout") + Bind() + Describe() + Execute() + SYNC),
            ("s", PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + CopyOutResponse() + CopyData(b"1\n") + msg(b"c") + CommandComplete("COPY 1") + Ready()),
        ],
        [(2, {"copy": "out", "status": "ok", "tag": "COPY 1"})],
    ),
    (
        "copy-in-extended-libpq",
        # libpq (so psycopg) sends P/B/D/E/S, then CopyData, CopyDone and a second Sync:
        # the server ignores the first Sync while in copy-in mode and answers one ReadyForQuery.
        [
            ("c", Parse("copy t from stdin") + Bind() + Describe() + Execute() + SYNC),
            ("s", PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + CopyInResponse()),
            ("c", CopyData(b"1\n") + CopyData(b"2\n") + COPY_DONE + SYNC),
            ("s", CommandComplete("COPY 2") + Ready()),
            ("c", Query("select 1")),
            ("s", RowDescription("x") + DataRow(b"1") + CommandComplete("SELECT 1") + Ready()),
        ],
        [(4, {"copy": "in", "status": "ok", "tag": "COPY 2"}), (6, {"sql": "select 1", "status": "ok"})],
    ),
    (
        "copy-in-extended-fail",
        [
            ("c", Parse("copy t from stdin") + Bind() + Execute() + SYNC),
            ("s", PARSE_COMPLETE + BIND_COMPLETE + CopyInResponse()),
            ("c", CopyData(b"x\n") + CopyFail("client gave up") + SYNC),
            ("s", ErrorResponse("57014") + Ready()),
            ("c", Query("select 1")),
            ("s", RowDescription("x") + DataRow(b"1") + CommandComplete("SELECT 1") + Ready()),
        ],
        [(4, {"copy": "in", "status": "error", "sqlstate": "57014"}), (6, {"sql": "select 1", "status": "ok"})],
    ),
    (
        "portal-suspended-then-resumed",
        [
            ("c", Parse("select generate_series(1, 3)", "g") + Bind("g", "cur") + Execute("cur", 2) + FLUSH),
            ("s", PARSE_COMPLETE + BIND_COMPLETE + DataRow(b"1") + DataRow(b"2") + PORTAL_SUSPENDED),
            ("c", Execute("cur", 2) + SYNC),
            ("s", DataRow(b"3") + CommandComplete("SELECT 1") + Ready()),
        ],
        [
            (4, {"status": "suspended", "rows": 2, "portal": "cur", "end_ns": 20, "reused": False, "exec_exact": True}),
            (4, {"status": "ok", "rows": 1, "portal": "cur", "sql": "select generate_series(1, 3)", "statement_name": "g",
                 "reused": True, "exec_start_ns": 30, "end_ns": 40, "tag": "SELECT 1"}),
        ],
    ),
    (
        "named-statement-reused-across-batches",
        [
            ("c", Parse("select $1", "s1") + SYNC), ("s", PARSE_COMPLETE + Ready()),
            ("c", Bind("s1", params=(b"a",)) + Execute() + SYNC), ("s", BIND_COMPLETE + DataRow(b"a") + CommandComplete("SELECT 1") + Ready()),
            ("c", Bind("s1", params=(None,)) + Execute() + SYNC), ("s", BIND_COMPLETE + DataRow(None) + CommandComplete("SELECT 1") + Ready()),
        ],
        [
            (2, {"status": "prepared", "statement_name": "s1", "parse_end_ns": 20}),
            # the first execution, in the batch right after its Parse's: that Parse's request
            (4, {"status": "ok", "sql": "select $1", "statement_name": "s1", "reused": False, "parse_start_ns": 0, "start_ns": 30}),
            (6, {"status": "ok", "sql": "select $1", "statement_name": "s1", "reused": True, "start_ns": 50}),
        ],
    ),
    (
        "unnamed-statement-executed-in-the-next-batch",  # pgx, tokio-postgres
        [
            ("c", Parse("select $1") + Describe(b"S", "") + SYNC),
            ("s", PARSE_COMPLETE + ParameterDescription(25) + RowDescription("x") + Ready()),
            ("c", Bind(params=(b"a",)) + Describe() + Execute() + SYNC),
            ("s", BIND_COMPLETE + RowDescription("x") + DataRow(b"a") + CommandComplete("SELECT 1") + Ready()),
        ],
        [
            (2, {"status": "prepared", "statement_name": ""}),
            (4, {"status": "ok", "sql": "select $1", "statement_name": "", "reused": False, "parse_start_ns": 0}),
        ],
    ),
    (
        "only-the-first-execution-in-the-next-batch-is-the-parses",
        [
            ("c", Parse("select $1", "s1") + SYNC), ("s", PARSE_COMPLETE + Ready()),
            ("c", Bind("s1") + Execute() + Bind("s1") + Execute() + SYNC),
            ("s", BIND_COMPLETE + CommandComplete("SELECT 1") + BIND_COMPLETE + CommandComplete("SELECT 1") + Ready()),
        ],
        [
            (2, {"status": "prepared", "statement_name": "s1"}),
            (4, {"status": "ok", "statement_name": "s1", "reused": False}),
            (4, {"status": "ok", "statement_name": "s1", "reused": True}),
        ],
    ),
    (
        "a-request-between-parse-and-execute-makes-it-prepared-earlier",
        [
            ("c", Parse("select $1", "s1") + SYNC), ("s", PARSE_COMPLETE + Ready()),
            ("c", Query("select 0")), ("s", RowDescription("x") + DataRow(b"0") + CommandComplete("SELECT 1") + Ready()),
            ("c", Bind("s1") + Execute() + SYNC), ("s", BIND_COMPLETE + CommandComplete("SELECT 1") + Ready()),
            ("c", Parse("select $1", "s2") + SYNC + SYNC), ("s", PARSE_COMPLETE + Ready() + Ready()),
            ("c", Bind("s2") + Execute() + SYNC), ("s", BIND_COMPLETE + CommandComplete("SELECT 1") + Ready()),
            ("c", Parse("select $1", "s3") + Bind("s3") + Execute() + SYNC), ("s", EXT_OK + Ready()),
            ("c", Bind("s3") + Execute() + SYNC), ("s", BIND_COMPLETE + CommandComplete("SELECT 1") + Ready()),
        ],
        [
            (2, {"status": "prepared", "statement_name": "s1"}),
            (4, {"protocol": "simple"}),
            (6, {"statement_name": "s1", "reused": True}),
            (8, {"status": "prepared", "statement_name": "s2"}),
            (10, {"statement_name": "s2", "reused": True}),
            (12, {"statement_name": "s3", "reused": False}),
            (14, {"statement_name": "s3", "reused": True}),  # bound in its Parse's own batch already
        ],
    ),
    (
        "each-record-carries-the-application-name-it-ran-under",
        [
            ("c", Query("set application_name = 'a'")),
            ("s", CommandComplete("SET") + ParameterStatus("application_name", "a") + Ready()),
            ("c", Query("select 1")), ("s", RowDescription("x") + DataRow(b"1") + CommandComplete("SELECT 1") + Ready()),
            ("c", Query("set application_name = 'b'") + Query("select 2")),
            ("s", CommandComplete("SET") + ParameterStatus("application_name", "b") + Ready()
             + RowDescription("x") + DataRow(b"2") + CommandComplete("SELECT 1") + Ready()),
        ],
        [
            (2, {"sql": "set application_name = 'a'", "application_name": "a"}),
            (4, {"sql": "select 1", "application_name": "a"}),
            (6, {"sql": "set application_name = 'b'", "application_name": "b"}),
            (6, {"sql": "select 2", "application_name": "b"}),
        ],
    ),
    (
        "close-statement-forgets-it",
        [
            ("c", Parse("select 1", "s1") + SYNC), ("s", PARSE_COMPLETE + Ready()),
            ("c", Close(b"S", "s1") + Close(b"P", "") + SYNC), ("s", CLOSE_COMPLETE + CLOSE_COMPLETE + Ready()),
            ("c", Bind("s1") + Execute() + SYNC), ("s", ErrorResponse("26000") + Ready()),
        ],
        [(2, {"status": "prepared"}), (6, {"sql": None, "status": "error", "sqlstate": "26000", "statement_name": "s1"})],
    ),
    (
        "function-call",
        [("c", FunctionCall(1598, b"x")), ("s", FunctionCallResponse(b"42") + Ready())],
        [(2, {"protocol": "function", "status": "ok", "end_ns": 20, "sql": None})],
    ),
    (
        "function-call-error",
        [("c", FunctionCall(0)), ("s", ErrorResponse("42883") + Ready())],
        [(2, {"protocol": "function", "status": "error"})],
    ),
    (
        "empty-query-simple-and-extended",
        [
            ("c", Query("")), ("s", EMPTY_QUERY + Ready()),
            ("c", Parse("") + Bind() + Execute() + SYNC), ("s", PARSE_COMPLETE + BIND_COMPLETE + EMPTY_QUERY + Ready()),
        ],
        [(2, {"status": "ok", "results": [(None, 0, None)]}), (4, {"status": "ok", "tag": None, "rows": 0})],
    ),
    (
        "async-messages-mid-stream",
        [
            ("c", Query("listen c; select 1") + Parse("select 2") + Bind() + Execute() + SYNC),
            ("s", NoticeResponse() + CommandComplete("LISTEN") + Notification(9, "c", "p") + RowDescription("x")
             + ParameterStatus("TimeZone", "UTC") + DataRow(b"1") + NoticeResponse("w", "01000") + CommandComplete("SELECT 1")
             + Notification(9, "c", "q") + Ready("I")),
            ("s", NoticeResponse() + PARSE_COMPLETE + Notification(1, "x", "") + BIND_COMPLETE + ParameterStatus("a", "b")
             + DataRow(b"2") + NoticeResponse() + CommandComplete("SELECT 1") + Notification(2, "y", "z") + Ready()),
            ("s", Notification(3, "c", "idle") + ParameterStatus("application_name", "x")),
        ],
        [
            (2, {"status": "ok", "results": [("LISTEN", 0, None), ("SELECT 1", 1, None)]}),
            (3, {"status": "ok", "rows": 1, "sql": "select 2"}),
        ],
    ),
]


@pytest.mark.parametrize("steps,expected", [pytest.param(s, e, id=i) for i, s, e in SCENARIOS])
def test_scenario(steps, expected):
    s, done, cout, sout = play(steps)
    check(done, expected)
    assert s.out_of_sync is None
    assert not s._pending and not s._batch
    # Wire mode forwards every byte untouched, both ways.
    assert cout == b"".join(d for side, d in steps if side == "c")
    assert sout == b"".join(d for side, d in steps if side == "s")


@pytest.mark.parametrize("steps,expected", [pytest.param(s, e, id=i) for i, s, e in SCENARIOS])
def test_scenario_one_byte_at_a_time(steps, expected):
    _, whole, _, _ = play(steps)
    s, split, cout, sout = play(steps, chunk=1)
    assert snapshot(split) == snapshot(whole)
    assert s.out_of_sync is None
    assert cout == b"".join(d for side, d in steps if side == "c")
    assert sout == b"".join(d for side, d in steps if side == "s")


def _flat(steps):
    return b"".join(d for _, d in steps)


@pytest.mark.parametrize("name", ["pipeline-many-syncs", "async-messages-mid-stream", "copy-in-extended-libpq"])
def test_split_at_every_boundary(name):
    steps, expected = next((s, e) for i, s, e in SCENARIOS if i == name)
    _, whole, _, _ = play(steps)
    for idx, (side, data) in enumerate(steps):
        for cut in range(1, len(data)):
            split = steps[:idx] + [(side, data[:cut]), (side, data[cut:])] + steps[idx + 1 :]
            s, done, cout, sout = play(split)
            assert s.out_of_sync is None, (idx, cut, s.out_of_sync)
            assert [view(r, ("sql", "status", "tag", "rows", "reused", "copy")) for _, r in done] == [
                view(r, ("sql", "status", "tag", "rows", "reused", "copy")) for _, r in whole
            ], (idx, cut)
            assert cout + sout == b"".join(d for sd, d in split if sd == "c") + b"".join(d for sd, d in split if sd == "s")


# ---------------------------------------------------------------------------
# start-up: keys, parameters, SCRAM -PLUS


@pytest.mark.parametrize("key", [KEY4, bytes(range(32))], ids=["4-byte", "32-byte"])
def test_backend_key_data(key):
    s = Session(protocol_version=196610 if len(key) > 4 else 196608)
    reply = AUTH_OK + BackendKeyData(777, key) + ParameterStatus("is_superuser", "on") + Ready("I")
    forwarded = b"".join(s.server_filter(reply[i : i + 1], 5) for i in range(len(reply)))
    assert forwarded == reply
    assert (s.backend_pid, s.cancel_key) == (777, key)
    assert s.authenticated and s.ready and s.tx_status == "I"
    assert s.server_params == {"is_superuser": "on"}


def test_startup_fatal_is_kept():
    s = Session()
    out = s.server_filter(ErrorResponse("28P01", "password authentication failed", "FATAL"), 1)
    assert out.startswith(b"E")
    assert s.fatal["C"] == "28P01" and not s.ready


def test_fatal_with_a_request_in_flight_is_kept():
    """A FATAL answering a request (pg_terminate_backend) still marks the session as ended by the server."""
    s, _, _, _ = play([("c", Query("select pg_sleep(10)")), ("s", ErrorResponse("57P01", "terminating connection", "FATAL"))])
    assert s.fatal is not None and s.fatal["C"] == "57P01"


@pytest.mark.parametrize(
    "strip,offered,expected",
    [
        (True, ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"), ("SCRAM-SHA-256",)),
        (True, ("SCRAM-SHA-256",), ("SCRAM-SHA-256",)),
        (True, ("SCRAM-SHA-256-PLUS",), ("SCRAM-SHA-256-PLUS",)),  # nothing left to offer: leave it
        (False, ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"), ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
    ],
)
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_scram_plus_stripping(strip, offered, expected, chunk):
    s = Session(strip_scram_plus=strip)
    stream = AuthSASL(*offered) + msg(b"R", struct.pack("!I", 11) + b"r=abc") + msg(b"R", struct.pack("!I", 12) + b"v=xyz")
    out = b"".join(s.server_filter(piece, 1) for piece in chunks(stream, chunk))
    assert out == AuthSASL(*expected) + stream[len(AuthSASL(*offered)) :]
    assert s.server_hold  # still authenticating
    rest = AUTH_OK + BackendKeyData(1, KEY4) + Ready() + NoticeResponse()
    assert s.server_filter(rest, 2) == rest
    assert not s.server_hold


def test_hold_ends_mid_chunk_and_rest_is_observed():
    s = Session()
    tail = RowDescription("x") + DataRow(b"1") + CommandComplete("SELECT 1") + Ready()
    s.client_data(Query("select 1"), 1)  # sent early, right behind the start-up packet
    out = s.server_filter(STARTUP_REPLY + tail[:7], 2)
    assert out == STARTUP_REPLY + tail[:7]
    assert not s.server_hold
    s.server_observe(tail[7:], 3)
    (rec,) = s.take_completed()
    assert rec.results[0].tag == "SELECT 1" and rec.results[0].rows == 1


# ---------------------------------------------------------------------------
# Flush insertion (phase_timing = "flush")


@pytest.mark.parametrize(
    "sent,forwarded,flags",
    [
        (Parse("select 1") + Bind() + Describe() + Execute() + SYNC,
         Parse("select 1") + FLUSH + Bind() + FLUSH + Describe() + Execute() + SYNC, (True, True, True)),
        (Parse("select 1") + Bind() + Execute() + FLUSH + SYNC,
         Parse("select 1") + FLUSH + Bind() + FLUSH + Execute() + FLUSH + SYNC, (True, True, True)),
        (Parse("select 1") + SYNC, None, (True, False, False)),  # nothing to add
        (Parse("select 1") + FLUSH + Bind() + Execute() + SYNC,
         Parse("select 1") + FLUSH + Bind() + FLUSH + Execute() + SYNC, (True, True, True)),
        # The last message of a chunk gets a Flush: the next may be a while coming.
        (Parse("select 1"), Parse("select 1") + FLUSH, (True, False, False)),
        (Query("select 1"), None, None),
    ],
)
def test_flush_insertion(sent, forwarded, flags):
    s = ready_session(flush_phases=True)
    out = s.client_data(sent, 10)
    assert out == forwarded
    if flags is not None:
        rec = next(r for _k, r, _i in s._pending if isinstance(r, Statement))
        assert (rec.parse_exact, rec.bind_exact, rec.exec_exact) == flags
        # Without flush mode nothing is inserted and only Sync / Flush the client sent count.
        w = ready_session()
        assert w.client_data(sent, 10) is None


def test_flush_insertion_split_stream_keeps_messages_whole():
    stream = Parse("select 1") + Bind() + Describe() + Execute() + SYNC
    s = ready_session(flush_phases=True)
    out = b"".join(_fwd(s, stream[i : i + 1]) for i in range(len(stream)))
    # Every message ended a chunk, so each Parse/Bind/Execute got a Flush of its own.
    assert out == Parse("select 1") + FLUSH + Bind() + FLUSH + Describe() + Execute() + FLUSH + SYNC


def _fwd(s: Session, piece: bytes) -> bytes:
    r = s.client_data(piece, 10)
    return piece if r is None else r


# ---------------------------------------------------------------------------
# big messages and buffering bounds


def test_datarow_spanning_chunks_is_not_held():
    row = DataRow(b"x" * 50_000)
    stream = RowDescription("x") + row + DataRow(b"y") + CommandComplete("SELECT 2") + Ready()
    s = ready_session()
    s.client_data(Query("select big"), 10)
    for piece in chunks(stream, 4096):
        s.server_observe(piece, 20)
        assert len(s._sbuf) < 4096
    (rec,) = s.take_completed()
    assert rec.results == [] or rec.results[0].rows == 2


def test_oversized_messages_pass_through_undecoded():
    big_sql = "select '" + "x" * 500 + "'"
    big_notice = NoticeResponse("n" * 500)
    s = ready_session(observe_limit=64)
    for piece in chunks(Query(big_sql), 50):
        assert s.client_data(piece, 10) is None  # relayed at once, never held
        assert len(s._cbuf) <= 64 + 5
    for piece in chunks(big_notice + RowDescription("x") + DataRow(b"1") + CommandComplete("SELECT 1") + Ready(), 50):
        s.server_observe(piece, 20)
        assert len(s._sbuf) <= 64 + 5
    (rec,) = s.take_completed()
    assert rec.sql is None and rec.status == "ok" and rec.results[0].rows == 1
    assert s.out_of_sync is None


def test_oversized_parse_in_filter_mode_is_forwarded_whole():
    s = Session(observe_limit=64)
    big = ParameterStatus("x", "y" * 300)
    stream = AUTH_OK + big + BackendKeyData(1, KEY4) + Ready()
    out = b"".join(s.server_filter(p, 1) for p in chunks(stream, 40))
    assert out == stream and s.ready


# ---------------------------------------------------------------------------
# client garbage


@pytest.mark.parametrize(
    "garbage,what",
    [
        (b"Z\x00\x00\x00\x04", "invalid frontend message type"),
        (b"\x00\x00\x00\x00\x08", "invalid frontend message type"),
        (b"Q" + struct.pack("!i", -5) + b"select 1\x00", "invalid message length"),
        (b"Q" + struct.pack("!i", 3), "invalid message length"),
        (b"Q" + struct.pack("!i", 2000), "invalid message length"),  # over max_message_size
    ],
)
@pytest.mark.parametrize("chunk", [None, 1])
def test_client_garbage_is_a_violation(garbage, what, chunk):
    s = ready_session(max_message_size=1000)
    s.client_data(Query("select 1"), 5)  # a good message first
    with pytest.raises(ProtocolViolation, match=what) as info:
        for piece in chunks(garbage, chunk):
            s.client_data(piece, 10)
    assert info.value.sqlstate == "08P01"


def test_message_at_max_message_size_is_fine():
    s = ready_session(max_message_size=1000, observe_limit=100)
    body = b"x" * 995 + b"\x00"
    assert s.client_data(msg(b"Q", body), 1) is None


# ---------------------------------------------------------------------------
# regressions


def test_pending_queue_is_bounded_for_syncs_and_queries():
    s = ready_session(max_pending=50)
    s.client_data((SYNC + Query("select 1") + FunctionCall(1)) * 100, 1)
    assert len(s._pending) <= 50
    assert s.out_of_sync is not None


def test_longest_done_is_the_slowest_statement_finished_since_it_was_reset():
    s = ready_session()
    s.client_data(Parse("select 1") + Bind() + Execute() + SYNC, 1_000)
    s.server_observe(PARSE_COMPLETE + BIND_COMPLETE + CommandComplete("SELECT 1") + Ready("I"), 5_000)
    assert s.longest_done_ns == 4_000
    s.client_data(Query("select 2"), 10_000)
    s.server_observe(CommandComplete("SELECT 1") + Ready("I"), 11_000)
    assert s.longest_done_ns == 4_000  # (a faster one does not lower it)
    s.longest_done_ns = 0  # the reader looked
    s.client_data(Query("select 3"), 20_000)
    s.server_observe(CommandComplete("SELECT 1") + Ready("I"), 22_500)
    assert s.longest_done_ns == 2_500
    assert [r.end_ns - r.start_ns for r in s.take_completed()] == [4_000, 1_000, 2_500]


def test_slow_done_lists_the_statements_as_slow_as_asked_since_the_last_take():
    from pgotel_proxy.protocol import session as session_module

    s = ready_session()
    s.client_data(Query("select 0"), 0)
    s.server_observe(CommandComplete("SELECT 1") + Ready("I"), 9_000)
    assert s.slow_done == []  # not asked for yet
    s.slow_after_ns = 2_500
    for n, took in enumerate((4_000, 1_000, 2_500, 2_499)):
        at = 10_000 * (n + 1)
        s.client_data(Parse(f"select {n}") + Bind() + Execute() + SYNC, at)
        s.server_observe(PARSE_COMPLETE + BIND_COMPLETE + CommandComplete("SELECT 1") + Ready("I"), at + took)
    done = s.completed
    assert s.slow_done == [done[1], done[3]] and not s.slow_done_full
    s.take_completed()
    assert s.slow_done == [] and not s.slow_done_full
    # Bounded: past the most it holds, the list says so.
    for n in range(session_module._SLOW_DONE_MAX + 1):
        s.client_data(Query(f"select {n}"), 0)
        s.server_observe(CommandComplete("SELECT 1") + Ready("I"), 3_000)
    assert len(s.slow_done) == session_module._SLOW_DONE_MAX and s.slow_done_full


def test_a_long_pipeline_is_answered_in_order_while_it_grows():
    """Thousands of requests in flight, answered a few at a time while more arrive: each gets its own answer.

    (The queue of requests due drops its answered part in one go past a thousand
    entries; the answers must still pair with the requests they answer.)
    """
    s = ready_session()
    n = 4000
    answers = []
    for i in range(n):
        s.client_data(Parse(f"select {i}") + Bind() + Execute(), 1)
        answers.append(PARSE_COMPLETE + BIND_COMPLETE + DataRow(b"x") * (i % 3) + CommandComplete(f"SELECT {i % 3}"))
        if i >= 2500 and i % 2 == 0:  # 2,500 statements (7,500 requests) due; then three answered for two sent
            for answer in answers[:3]:
                s.server_observe(answer, 2)
            del answers[:3]
    s.client_data(SYNC, 3)
    for answer in answers:
        s.server_observe(answer, 4)
    s.server_observe(Ready("I"), 5)
    recs = s.take_completed()
    assert s.out_of_sync is None and not s.answers_due
    assert [(r.sql, r.status, r.rows, r.tag) for r in recs] == [
        (f"select {i}", "ok", i % 3, f"SELECT {i % 3}") for i in range(n)]


def test_injected_answers_removed_split_everywhere():
    """Answers to a request the proxy injected never reach the client, however they are chunked."""
    ours = RowDescription("lsn") + DataRow(b"0/" + b"A" * 3000) + CommandComplete("SELECT 1") + Ready("T")
    theirs = RowDescription("x") + DataRow(b"1") + CommandComplete("SELECT 1") + Ready("T")
    for size in (None, 1, 7, 1000):
        s = ready_session()
        s.inject_request("query")
        s.client_data(Query("select 1"), 1)
        out = b"".join(s.server_filter(p, 2) for p in chunks(ours + theirs, size))
        assert out == theirs, size
        assert not s.server_hold and s.out_of_sync is None
        (rec,) = s.take_completed()
        assert rec.sql == "select 1" and rec.results[0].rows == 1


def test_server_filter_decode_failure_forwards_everything():
    """A server message that breaks decoding in hold mode must still reach the client, with all that follows."""
    s = Session()
    bad_z = msg(b"Z")  # ReadyForQuery without its status byte
    stream = AUTH_OK + bad_z
    out = s.server_filter(stream, 1)
    assert out == stream
    assert s.out_of_sync is not None and not s.server_hold


def test_client_decode_failure_keeps_held_bytes():
    """A malformed (but well-framed) message desyncs observation; no client byte is lost."""
    s = ready_session()
    bad = msg(b"P", b"no-terminator")  # Parse without NUL-terminated strings
    stream = Query("select 1") + bad + Query("select 2")
    out = b"".join(_fwd(s, p) for p in chunks(stream, 3))
    assert out == stream
    assert s.out_of_sync is not None


def test_terminate_is_noted():
    """After Terminate the server's close is expected: the proxy must not add an error of its own."""
    s = ready_session()
    s.client_data(Query("select 1"), 1)
    assert not s.client_terminated
    s.client_data(TERMINATE[:3], 2)
    s.client_data(TERMINATE[3:], 3)
    assert s.client_terminated


# ---------------------------------------------------------------------------
# the first row's arrival

_FIRST_ROW_CASES = [
    # (client request, server answer in steps, expected first_row_ns per record)
    ("extended", Parse("select g") + Bind() + Execute() + SYNC,
     [PARSE_COMPLETE + BIND_COMPLETE, RowDescription("g") + DataRow(b"1")[:7], DataRow(b"1")[7:] + DataRow(b"2"),
      CommandComplete("SELECT 2") + Ready()], [30]),
    ("extended-no-rows", Parse("select 1 where false") + Bind() + Execute() + SYNC,
     [PARSE_COMPLETE + BIND_COMPLETE + RowDescription("x"), CommandComplete("SELECT 0") + Ready()], [0]),
    ("extended-error-after-rows", Parse("select 1/(2-g)") + Bind() + Execute() + SYNC,
     [PARSE_COMPLETE + BIND_COMPLETE + RowDescription("x"), DataRow(b"1"), ErrorResponse("22012") + Ready()], [30]),
    ("extended-two-executions", Parse("select g") + Bind() + Execute() + Bind() + Execute() + SYNC,
     [PARSE_COMPLETE + BIND_COMPLETE + DataRow(b"1"), CommandComplete("SELECT 1") + BIND_COMPLETE,
      CommandComplete("SELECT 0") + Ready()], [20, 0]),
    ("simple-second-statement", Query("select 1 where false; select 2"),
     [RowDescription("x") + CommandComplete("SELECT 0"), RowDescription("x") + DataRow(b"2"),
      CommandComplete("SELECT 1") + Ready()], [30]),
    ("copy-out", Query("copy t to stdout"),
     [CopyOutResponse(), CopyData(b"1\n"), CopyData(b"2\n") + COPY_DONE + CommandComplete("COPY 2") + Ready()], [30]),
    ("copy-out-extended", Parse("copy t to stdout") + Bind() + Execute() + SYNC,
     [PARSE_COMPLETE + BIND_COMPLETE + CopyOutResponse(), CopyData(b"1\n") + COPY_DONE,
      CommandComplete("COPY 1") + Ready()], [30]),
]


@pytest.mark.parametrize("feed", ["observe", "filter"])
@pytest.mark.parametrize("request_,answers,expected", [pytest.param(*c[1:], id=c[0]) for c in _FIRST_ROW_CASES])
def test_first_row_is_the_arrival_of_the_read_holding_its_header(request_, answers, expected, feed):
    """The receive time of the chunk that completes the header (type, length) of a statement's first DataRow
    (or CopyData of COPY TO): where the codec counts it."""
    s = ready_session()
    assert s.client_data(request_, 10) is None
    for i, data in enumerate(answers, start=2):
        if feed == "observe":
            s.server_observe(data, i * 10)
        else:
            assert s.server_filter(data, i * 10) == data
    assert [rec.first_row_ns for rec in s.take_completed()] == expected
    assert s._first_row_ns == 0


def test_client_wait_goes_to_the_statement_whose_answer_is_due():
    s = ready_session()
    s.client_data(Parse("select 1") + Bind() + Execute() + Parse("select 2") + Bind() + Execute() + SYNC, 10)
    s.client_waited(5)  # nothing answered yet: the first execution's
    s.server_observe(PARSE_COMPLETE + BIND_COMPLETE + DataRow(b"1") + CommandComplete("SELECT 1"), 20)
    s.client_waited(7)
    s.client_waited(1)
    s.server_observe(PARSE_COMPLETE + BIND_COMPLETE + CommandComplete("SELECT 0") + Ready(), 30)
    s.client_waited(100)  # nothing due: nobody's
    s.client_data(Query("select 3"), 40)
    s.client_waited(9)
    s.server_observe(RowDescription("x") + DataRow(b"3") + CommandComplete("SELECT 1") + Ready(), 50)
    assert [r.client_wait_ns for r in s.take_completed()] == [5, 8, 9]


# ---- statement texts decoded once (messages.text)


def test_a_repeated_ascii_text_comes_back_as_the_same_str_and_every_text_as_its_own():
    """The decoded-text table: a repeat is the same object; texts that share a slot never mix."""
    from pgotel_proxy.protocol.messages import text

    def wire(s: str) -> bytes:
        return b"\x00\x00" + s.encode() + b"\x00"  # the text inside a message, as the codec finds it

    first = text(wire("SELECT 1"), 2, 10)
    assert first == "SELECT 1" and text(wire("SELECT 1"), 2, 10) is first
    # Texts alike in the bytes the slot's hash reads (the first 24 and the last 40), unlike in the
    # middle: they share a slot and must each come back as themselves, over and over.
    middle = [f"SELECT * FROM accounts WHERE {'x' * 10}{i:06d}{'y' * 10} AND the_rest_of_it_is_the_same /*c*/"
              for i in range(40)]
    many = [f"SELECT {i} /*traceparent='00-{i:032x}-{i + 1:016x}-01'*/" for i in range(2000)]
    for _ in range(2):
        for s in middle + many:
            data = wire(s)
            assert text(data, 2, len(data) - 1) == s
    # Not ASCII, or not UTF-8 at all: decoded (bad bytes replaced), never taken for another text.
    assert text(wire("SELECT 'é'"), 2, 13) == "SELECT 'é'"
    bad = b"\x00\x00SELECT '\xff'\x00"
    assert text(bad, 2, len(bad) - 1) == "SELECT '\ufffd'"
    assert text(wire("SELECT '?'"), 2, 12) == "SELECT '?'"
