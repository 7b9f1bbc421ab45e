"""The codec compiled (Cython) against the same sources interpreted: the same answers.

The codec's modules are one source each, compiled where Cython was at build
time. These tests load the ``.py`` sources a second time as an interpreted
twin (tests/codec_twin.py), feed the same streams, split the same way, to a
compiled Session and to an interpreted one, and compare everything either
produces: what each call returns, every field of every statement record, and
the session's state (queues, counters, names, status) after every step.

Streams: the recorded corpus (real psycopg traffic) whole, mutated and split
at random points; and generated conversations (errors inside a batch,
statements bound twice, named portals, suspended portals, Close, pipelined
Syncs, Flush, notices, ParameterStatus, Query with several statements,
injected requests, queue bounds). The pump's log is read by both builds of
``protocol/pumplog.py`` alike.
"""

from __future__ import annotations

import os
import struct
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgotel_proxy.protocol import events, pumplog
from pgotel_proxy.protocol import session as session_mod
from pgotel_proxy.protocol.errors import ProtocolViolation
from pgotel_proxy.protocol.events import COMPLETION_LAYOUT, STATEMENT_LAYOUT, Completion, Statement
from pgotel_proxy.protocol.pumplog import LOG_HEAD as _LOG_HEAD
from pgotel_proxy.proxy import server as server_mod
from pgotel_proxy.proxy.connection import ClientConnection

from codec_twin import interpreted
from test_protocol_fuzz import CORPUS, _split, cut_lists, mutate
from wire import (
    AUTH_OK, FLUSH, SYNC, BackendKeyData, Bind, Close, CommandComplete, DataRow, Describe, ErrorResponse, Execute,
    ParameterDescription, ParameterStatus, Parse, Query, ReadyForQuery, RowDescription, fields, message as msg,
)

pytestmark = pytest.mark.skipif(not session_mod.COMPILED, reason="codec not compiled (or PGOTEL_PURE_PYTHON)")

#: The two builds: (Session, ProtocolViolation, observe_log) of each.
COMPILED = SimpleNamespace(Session=session_mod.Session, ProtocolViolation=ProtocolViolation,
                           observe_log=pumplog.observe_log)
if session_mod.COMPILED:
    _twin = interpreted()
    INTERPRETED = SimpleNamespace(Session=_twin.session.Session, ProtocolViolation=_twin.errors.ProtocolViolation,
                                  observe_log=_twin.pumplog.observe_log)
else:
    INTERPRETED = COMPILED
FIELDS = [name for name, _, _ in STATEMENT_LAYOUT]
CFIELDS = [name for name, _, _ in COMPLETION_LAYOUT]
SETTINGS = settings(
    max_examples=200,
    deadline=4000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_built_when_expected():
    if os.environ.get("PGOTEL_EXPECT_COMPILED"):
        assert session_mod.COMPILED
        assert all(m.__file__.endswith(".so") for m in (session_mod, events, pumplog))


# ------------------------------------------------------------------ driving


class Driver:
    """One Session of one build (``fast``: the compiled one) fed step by step.

    ``in_place``: as the pump's log is read, each piece is handed over as a
    range of a larger buffer (``client_observe``, ``server_observe`` with
    start and stop), bytes of other sessions around it; nothing is returned.
    """

    def __init__(self, fast: bool, in_place: bool = False, **kw) -> None:
        self.build = COMPILED if fast else INTERPRETED
        self.in_place = in_place
        self.s = self.build.Session(**kw)
        self.violated = False
        self.records: list[Statement] = []

    @staticmethod
    def _framed(data: bytes) -> tuple[bytes, int, int]:
        head, tail = b"Q\x00\x00\x00\x05" * 3, b"\xffD\x00"  # what a neighbour's chunk may hold
        return head + data + tail, len(head), len(head) + len(data)

    def client(self, data: bytes, now: int):
        if self.violated:
            return "closed"
        try:
            if self.in_place:
                self.s.client_observe(*self._framed(data), now)
                return None
            return self.s.client_data(data, now)
        except self.build.ProtocolViolation as exc:
            self.violated = True
            return ("violation", str(exc))

    def server(self, data: bytes, now: int):
        if self.s.server_hold:
            return self.s.server_filter(data, now)
        if self.in_place:
            buf, start, stop = self._framed(data)
            self.s.server_observe(buf, now, start, stop)
        else:
            self.s.server_observe(data, now)
        return None

    def take(self) -> None:
        self.records.extend(self.s.take_completed())


def record_values(rec: Statement) -> tuple:
    values = []
    for name in FIELDS:
        v = getattr(rec, name)
        if name == "results" and v is not None:
            v = [tuple(getattr(c, f) for f in CFIELDS) for c in v]
        values.append(v)
    return tuple(values)


def state(s: Session) -> dict:
    return {
        "pending": [(k, None if r is None else (r if isinstance(r, list) else record_values(r)), inj)
                    if not isinstance(r, list) else (k, [record_values(x) for x in r], inj)
                    for k, r, inj in s._pending],
        "batch": [record_values(r) for r in s._batch],
        "batch_parsed": sorted(s._batch_parsed),
        "prepared": dict(s._prepared),
        "portals": {k: record_values(v) for k, v in s._portals.items()},
        "scalars": (s.messages_in, s.messages_out, s._rows, s.tx_status, s.ready, s._skipping,
                    s._last_kind, s.out_of_sync, s._injected_pending, s._copy_in_ext, s._cbuf, s._cskip,
                    s._sbuf, s._sfwd, s._sskip, s.backend_pid, s.fatal, s.client_terminated,
                    dict(s.server_params)),
        "last_rec": None if s._last_rec is None or isinstance(s._last_rec, list) else record_values(s._last_rec),
        "completed": [record_values(r) for r in s.completed],
    }


def run_both(steps, cuts, in_place: bool | None = None, **kw) -> tuple[Driver, Driver]:
    """Feed (side, bytes) steps, each split at ``cuts``, to both; compare after every piece.

    Compiled against Python, or with ``in_place`` (True: compiled, False:
    Python) ranges of a larger buffer against whole pieces, on the same path.
    """
    if in_place is None:
        a, b = Driver(True, **kw), Driver(False, **kw)
    else:
        a, b = Driver(in_place, in_place=True, **kw), Driver(in_place, **kw)
    now = 0
    for i, (side, data) in enumerate(steps):
        for piece in _split(data, cuts[i % len(cuts)] if cuts else []):
            now += 1
            if side == "c":
                ra, rb = a.client(piece, now), b.client(piece, now)
            else:
                ra, rb = a.server(piece, now), b.server(piece, now)
            if in_place is None or ra == "closed" or rb == "closed":
                assert ra == rb, f"step {i} ({side}): returns differ"
            else:  # an in-place read returns nothing; a violation is raised alike
                assert (isinstance(ra, tuple), ra if isinstance(ra, tuple) else None) == (
                    isinstance(rb, tuple), rb if isinstance(rb, tuple) else None), f"step {i} ({side})"
            assert state(a.s) == state(b.s), f"step {i} ({side}): state differs"
        a.take()
        b.take()
    for d in (a, b):
        d.s.finish_all(now + 1)
        d.take()
    assert [record_values(r) for r in a.records] == [record_values(r) for r in b.records]
    return a, b


# ------------------------------------------------------------------ messages


def parse(name: str, sql: str) -> bytes:
    return Parse(sql, name)


def bind(portal: str, stmt: str, value: str = "1") -> bytes:
    return Bind(stmt, portal, (value.encode(),))


execute, describe, close, complete, ready = Execute, Describe, Close, CommandComplete, ReadyForQuery
ROWDESC = RowDescription("a", type_oid=23, type_size=4)


def row(v: str = "7") -> bytes:
    return DataRow(v.encode())


def error(code: str = "42P01", severity: str = "ERROR") -> bytes:
    return ErrorResponse(code, 'no "x" here', severity)


NOTICE = msg("N", fields(S="NOTICE", C="00000", M="hello"))
PARAM = ParameterStatus("application_name", "app")
STARTUP_SERVER = AUTH_OK + PARAM + BackendKeyData(4242, b"keyk") + ready("I")


# One conversation step: (client bytes, server bytes), built from a few choices.
SQLS = ["/*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/ SELECT $1",
        "SELECT a FROM t WHERE b = $1", "BEGIN", "COMMIT", "UPDATE t SET a = $1", "SELECT 'ü'"]


@st.composite
def exchange(draw) -> tuple[bytes, bytes]:
    kind = draw(st.sampled_from([
        "simple", "simple_multi", "simple_error", "empty", "unnamed", "prepare", "run_prepared",
        "bind_error", "parse_error", "portal", "suspended", "close", "pipeline", "flush", "notice",
        "describe_stmt", "twice", "tx",
    ]))
    sql = draw(st.sampled_from(SQLS))
    name = draw(st.sampled_from(["", "s1", "P0_1"]))
    rows = draw(st.integers(min_value=0, max_value=3))
    tx = draw(st.sampled_from("ITE"))
    data = b"".join(row(str(i)) for i in range(rows))
    if kind == "simple":
        return Query(sql.replace("$1", "1")), ROWDESC + data + complete(f"SELECT {rows}") + ready(tx)
    if kind == "simple_multi":
        return (Query("SELECT 1; SELECT 2"),
                ROWDESC + data + complete(f"SELECT {rows}") + ROWDESC + row() + complete("SELECT 1") + ready(tx))
    if kind == "simple_error":
        return Query("SELECT x"), ROWDESC + data + error() + ready("E" if tx != "I" else "I")
    if kind == "empty":
        return Query(""), msg("I") + ready(tx)
    if kind == "unnamed":
        return (parse("", sql) + bind("", "") + describe("P", "") + execute() + SYNC,
                msg("1") + msg("2") + ROWDESC + data + complete(f"SELECT {rows}") + ready(tx))
    if kind == "prepare":
        return parse(name, sql) + describe("S", name) + SYNC, msg("1") + ParameterDescription(23) + ROWDESC + ready(tx)
    if kind == "run_prepared":
        return bind("", name) + execute() + SYNC, msg("2") + data + complete(f"SELECT {rows}") + ready(tx)
    if kind == "bind_error":
        return parse("", sql) + bind("", "") + execute() + SYNC, msg("1") + error("22P02") + ready(tx)
    if kind == "parse_error":
        return parse("", "SELEC") + bind("", "") + execute() + SYNC, error("42601") + ready(tx)
    if kind == "portal":
        return (bind("c1", name) + execute("c1") + SYNC,
                msg("2") + data + complete(f"SELECT {rows}") + ready(tx))
    if kind == "suspended":
        return (bind("c2", name) + execute("c2", 1) + execute("c2", 0) + SYNC,
                msg("2") + row() + msg("s") + data + complete(f"SELECT {rows + 1}") + ready(tx))
    if kind == "close":
        return close("S", name) + close("P", "c1") + SYNC, msg("3") + msg("3") + ready(tx)
    if kind == "pipeline":
        return (bind("", name) + execute() + SYNC + parse("", sql) + bind("", "") + execute() + SYNC,
                msg("2") + data + complete("SELECT 1") + ready("I") + msg("1") + msg("2") + complete("UPDATE 1") + ready(tx))
    if kind == "flush":
        return (parse(name, sql) + FLUSH + bind("", name) + FLUSH + execute() + SYNC,
                msg("1") + msg("2") + data + complete(f"SELECT {rows}") + ready(tx))
    if kind == "notice":
        return (bind("", name) + execute() + SYNC,
                NOTICE + msg("2") + PARAM + data + NOTICE + complete(f"SELECT {rows}") + ready(tx))
    if kind == "describe_stmt":
        return describe("S", name) + SYNC, ParameterDescription() + msg("n") + ready(tx)
    if kind == "twice":  # executemany: bound and run twice in the Parse's own batch
        return (parse("", sql) + bind("", "") + execute() + bind("", "") + execute() + SYNC,
                msg("1") + msg("2") + complete("UPDATE 1") + msg("2") + complete("UPDATE 1") + ready(tx))
    # tx: BEGIN, statement, COMMIT in one pipeline
    return (Query("BEGIN") + bind("", name) + execute() + SYNC + Query("COMMIT"),
            complete("BEGIN") + ready("T") + msg("2") + data + complete("SELECT 1") + ready("T")
            + complete("COMMIT") + ready("I"))


def conversation(exchanges, inject_at: int | None) -> list[tuple[str, bytes]]:
    steps = [("s", STARTUP_SERVER)]
    for i, (c, s) in enumerate(exchanges):
        steps.append(("c", c))
        if inject_at == i:
            steps.append(("inject", b""))
        steps.append(("s", s))
    return steps


# ------------------------------------------------------------------ tests


@SETTINGS
@given(name=st.sampled_from(sorted(CORPUS)), cuts=cut_lists)
def test_corpus_same_records_and_state(name, cuts):
    a, _b = run_both(CORPUS[name], cuts, observe_limit=1 << 20, max_message_size=1 << 20)
    assert a.records, "the recording produced no statements"
    assert a.s.out_of_sync is None


@SETTINGS
@given(name=st.sampled_from(sorted(CORPUS)), cuts=cut_lists, fast=st.booleans())
def test_corpus_read_in_place_as_the_pump_log_is(name, cuts, fast):
    a, _b = run_both(CORPUS[name], cuts, in_place=fast, observe_limit=1 << 20, max_message_size=1 << 20)
    assert a.records and a.s.out_of_sync is None


@SETTINGS
@given(name=st.sampled_from(sorted(CORPUS)), muts=st.lists(st.tuples(
    st.sampled_from(["flip", "set", "length", "type", "cut", "dup", "insert"]),
    st.integers(min_value=0, max_value=1 << 16),
    st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1)), max_size=6), cuts=cut_lists,
    fast=st.booleans())
def test_mutated_corpus_read_in_place_same_answers(name, muts, cuts, fast):
    run_both(mutate(CORPUS[name], muts), cuts, in_place=fast, observe_limit=512, max_pending=64,
             max_message_size=4096)


@SETTINGS
@given(name=st.sampled_from(sorted(CORPUS)), muts=st.lists(st.tuples(
    st.sampled_from(["flip", "set", "length", "type", "cut", "dup", "insert"]),
    st.integers(min_value=0, max_value=1 << 16),
    st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1)), max_size=6), cuts=cut_lists,
    limits=st.sampled_from([(512, 64, 4096), (1 << 20, 10_000, 1 << 20), (64, 3, 128)]))
def test_mutated_corpus_same_answers(name, muts, cuts, limits):
    observe_limit, max_pending, max_message = limits
    run_both(mutate(CORPUS[name], muts), cuts, observe_limit=observe_limit, max_pending=max_pending,
             max_message_size=max_message)


@SETTINGS
@given(exchanges=st.lists(exchange(), min_size=1, max_size=8), cuts=cut_lists,
       max_pending=st.sampled_from([10_000, 4]), capture=st.booleans())
def test_conversations_same_records_and_state(exchanges, cuts, max_pending, capture):
    run_both(conversation(exchanges, None), cuts, max_pending=max_pending, capture_params=capture)


@SETTINGS
@given(exchanges=st.lists(exchange(), min_size=2, max_size=6), at=st.integers(min_value=0, max_value=4),
       cuts=cut_lists)
def test_injected_requests_leave_the_fast_path_correct(exchanges, at, cuts):
    """A request the proxy injected is due: its answers are Python's to remove."""
    at = at % len(exchanges)
    a, b = Driver(True), Driver(False)
    now = 0
    for side, data in conversation(exchanges, at):
        for d in (a, b):
            if side == "inject":
                d.s.inject_request("query")
                d.s.client_data(b"", now)
        if side == "inject":
            # its answer comes first: a CommandComplete and a ReadyForQuery
            data = complete("SELECT 1") + ready("I")
            side = "s"
        for piece in _split(data, cuts[0]):
            now += 1
            if side == "c":
                assert a.client(piece, now) == b.client(piece, now)
            else:
                assert a.server(piece, now) == b.server(piece, now)
            assert state(a.s) == state(b.s)
        a.take()
        b.take()
    assert [record_values(r) for r in a.records] == [record_values(r) for r in b.records]


def test_fast_path_really_runs():
    """The common exchange is handled compiled: no Python frame of the per-message code runs."""
    import sys

    calls = []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name in ("_client_message", "_server_message", "_extended_rec",
                                                         "_ready_for_query", "_pop", "_queue"):
            calls.append(frame.f_code.co_name)
        return None

    d = Driver(True)
    d.server(STARTUP_SERVER, 1)
    c, s = bind("", "") + execute() + SYNC, msg("2") + row() + complete("SELECT 1") + ready("I")
    sys.setprofile(None)
    sys.settrace(tracer)
    try:
        d.client(parse("", "SELECT 1") + c, 2)
        d.server(msg("1") + s, 3)
        d.client(Query("SELECT 1"), 4)
        d.server(ROWDESC + row() + complete("SELECT 1") + ready("I"), 5)
    finally:
        sys.settrace(None)
    d.take()
    assert calls == []
    assert [(r.protocol, r.status, r.tag, r.rows, r.tx_status) for r in d.records] == [
        ("extended", "ok", "SELECT 1", 1, "I"), ("simple", "ok", None, 0, "I")]
    assert d.records[1].results == [Completion(5, "SELECT 1", 1)] or [
        (c.end_ns, c.tag, c.rows) for c in d.records[1].results] == [(5, "SELECT 1", 1)]


# ------------------------------------------------------------------ texts decoded once


def test_repeated_texts_decode_to_what_was_sent():
    """Texts of one length and one beginning and end, bytes that are not UTF-8: each record has its own text."""
    from test_protocol_session import Bind, Execute, Parse, msg, ready_session

    texts = [f"SELECT {i:04d} /* {'x' * 60} */" for i in range(700)] + ["SELECT 'caf\xe9'", "SELECT 1"] * 3
    s = ready_session()
    for n, text in enumerate(texts):
        s.client_data(Parse(text, "") + Bind("", "", ()) + Execute() + msg(b"S"), 10 * n + 1)
        s.server_observe(msg(b"1") + msg(b"2") + msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I"), 10 * n + 5)
    raw = msg(b"P", b"\x00SELECT \xff\x00\x00\x00") + msg(b"S")  # not UTF-8
    s.client_data(raw, 99999)
    s.server_observe(msg(b"1") + msg(b"Z", b"I"), 100000)
    recs = s.take_completed()
    assert [r.sql for r in recs] == texts + ["SELECT \ufffd"]
    assert all(r.tag == "SELECT 1" for r in recs[:-1])


# ------------------------------------------------------------------ the pump's log


class _PumpedConn:
    """The part of ClientConnection the pump's log reaches: its own methods, on a real Session."""

    pump_observe = ClientConnection.pump_observe
    pump_failed = ClientConnection.pump_failed
    stop_observing = ClientConnection.stop_observing

    def __init__(self, pumped: dict, pair: int, compiled: bool = True, **kw) -> None:
        self.pumped, self.pair = pumped, pair
        self.peer = "test"
        self.observe = True
        self.session = (COMPILED if compiled else INTERPRETED).Session(**kw)
        self.backs: list[tuple[bytes, int]] = []

    def pump_back(self, payload: bytes, ts: int) -> None:
        self.pumped.pop(self.pair)  # as ProxyServer.unpump
        self.backs.append((payload, ts))


def _log(entries) -> bytes:
    return b"".join(_LOG_HEAD.pack(pair, kind, len(data), ts) + data for pair, kind, data, ts in entries)


def _log_entries(streams, cuts, back_at: int | None) -> list[list[tuple[int, int, bytes, int]]]:
    """The pump's log for conversations relayed at once: pieces of each, interleaved, in reads of a few."""
    pieces = []
    for pair, steps in enumerate(streams, start=1):
        mine = []
        for i, (side, data) in enumerate(steps):
            for piece in _split(data, cuts[i % len(cuts)] if cuts else []):
                mine.append((pair, 0 if side == "c" else 1, piece))
        pieces.append(mine)
    entries, ts = [], 0
    while any(pieces):
        for mine in pieces:
            if mine:
                ts += 1
                pair, kind, piece = mine.pop(0)
                entries.append((pair, kind, piece, ts))
                if back_at is not None and ts == back_at:
                    entries.append((pair, 2, b"handed back", ts))
    entries.insert(len(entries) // 2, (99, 0, b"Q\x00\x00\x00\x05", ts))  # a pair nobody owns any more
    return [entries[i:i + 7] for i in range(0, len(entries), 7)]


def _feed_log(compiled: bool, streams, cuts, back_at, **kw):
    pumped: dict = {}
    conns = {pair: _PumpedConn(pumped, pair, compiled, **kw) for pair in range(1, len(streams) + 1)}
    pumped.update(conns)
    owner = SimpleNamespace(pumped=pumped)
    resumed = 0

    def resume(*args):
        nonlocal resumed
        resumed += 1
        server_mod._resume(*args)

    fed = []
    for read in _log_entries(streams, cuts, back_at):
        data = _log(read)
        touched = (COMPILED if compiled else INTERPRETED).observe_log(data, owner.pumped, resume)
        fed.append(sorted(touched))
        for c in conns.values():
            c.records = getattr(c, "records", []) + c.session.take_completed()
    return conns, fed, resumed


def _same_feeds(streams, cuts, back_at=None, **kw):
    a, fed_a, resumed = _feed_log(True, streams, cuts, back_at, **kw)
    b, fed_b, _ = _feed_log(False, streams, cuts, back_at, **kw)
    assert fed_a == fed_b
    for pair in a:
        ca, cb = a[pair], b[pair]
        assert (ca.observe, ca.backs) == (cb.observe, cb.backs), f"pair {pair}"
        assert state(ca.session) == state(cb.session), f"pair {pair}"
        assert [record_values(r) for r in ca.records] == [record_values(r) for r in cb.records], f"pair {pair}"
    return a, resumed


@SETTINGS
@given(names=st.lists(st.sampled_from(sorted(CORPUS)), min_size=1, max_size=3), cuts=cut_lists,
       back=st.one_of(st.none(), st.integers(min_value=1, max_value=40)))
def test_pump_log_fed_compiled_as_in_python(names, cuts, back):
    conns, _ = _same_feeds([CORPUS[n] for n in names], cuts, back, observe_limit=1 << 20,
                           max_message_size=1 << 20)
    if back is None:
        assert all(c.records and c.observe for c in conns.values())


@SETTINGS
@given(names=st.lists(st.sampled_from(sorted(CORPUS)), min_size=1, max_size=3), muts=st.lists(st.tuples(
    st.sampled_from(["flip", "set", "length", "type", "cut", "dup", "insert"]),
    st.integers(min_value=0, max_value=1 << 16),
    st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1)), max_size=6), cuts=cut_lists)
def test_damaged_pump_log_chunks_answered_as_in_python(names, muts, cuts):
    _same_feeds([mutate(CORPUS[n], muts) for n in names], cuts, None, observe_limit=512, max_pending=64,
                max_message_size=4096)


def test_pump_log_common_chunks_take_no_python_call():
    name = max(CORPUS, key=lambda n: len(CORPUS[n]))
    conns, resumed = _same_feeds([CORPUS[name]] * 2, [[]], observe_limit=1 << 20, max_message_size=1 << 20)
    chunks = 2 * len(CORPUS[name])
    assert all(c.records for c in conns.values())
    assert resumed < chunks // 2, f"{resumed} of {chunks} chunks went through Python"


def test_observe_log_refuses_a_truncated_log():
    conn = _PumpedConn({}, 1)
    whole = _log([(1, 0, b"Q\x00\x00\x00\x0bSELECT 1\x00", 5)])
    for cut in (whole[:10], whole[:-1]):
        with pytest.raises(ValueError):
            pumplog.observe_log(cut, {1: conn}, server_mod._resume)


@pytest.mark.parametrize("kind", [0, 1])
def test_a_loop_that_raises_on_the_pump_log_is_answered_as_in_python(kind):
    """A session raising on a chunk of the pump's log (a field of the wrong type here): the client
    side stops observing, the server side desyncs, in both builds alike."""
    from pgotel_proxy.stats import STATS

    answers = []
    for compiled in (True, False):
        build = COMPILED if compiled else INTERPRETED
        pumped: dict = {}
        conn = pumped[1] = _PumpedConn(pumped, 1, compiled)
        s = conn.session
        build.observe_log(_log([(1, 1, ready(), 1)]), pumped, server_mod._resume)
        if kind == 0:
            s.max_message_size = "not a size"
            chunk = Query("SELECT 1")
        else:
            build.observe_log(_log([(1, 0, Query("SELECT 1"), 2)]), pumped, server_mod._resume)
            s._rows = "not a count"
            chunk = RowDescription() + row() + complete("SELECT 1") + ready()
        before = STATS.decode_desyncs
        build.observe_log(_log([(1, kind, chunk, 3)]), pumped, server_mod._resume)
        # (the TypeError's words differ: the compiled build says so converting the field)
        answers.append((conn.observe, STATS.decode_desyncs - before, s.out_of_sync.split("(")[0]))
    assert answers[0] == answers[1]
    stream = "client" if kind == 0 else "server"
    assert answers[0][:2] == (kind != 0, 1 if kind == 0 else 0)
    assert answers[0][2] == f"{stream} stream: TypeError"


def test_a_client_wait_in_the_pump_log_goes_to_the_statement_whose_rows_were_in_flight():
    """PUMP_LOG_CLIENT_WAIT (the pump stopped reading the server while the client's socket was full):
    its ns go to the statement being answered, in both builds; none due, nobody's."""
    wait = struct.Struct("=q").pack
    answers = []
    for build in (COMPILED, INTERPRETED):
        pumped: dict = {}
        conn = pumped[1] = _PumpedConn(pumped, 1, build is COMPILED)
        build.observe_log(_log([
            (1, pumplog.PUMP_LOG_SERVER, ready(), 1),
            (1, pumplog.PUMP_LOG_CLIENT_WAIT, wait(5_000), 2),  # nothing in flight: nobody's
            (1, pumplog.PUMP_LOG_CLIENT, Query("SELECT 1") + Query("SELECT 2"), 3),
            (1, pumplog.PUMP_LOG_SERVER, RowDescription() + row(), 4),
            (1, pumplog.PUMP_LOG_CLIENT_WAIT, wait(7_000_000), 5),
            (1, pumplog.PUMP_LOG_SERVER, row() + complete("SELECT 2") + ready(), 6),
            (1, pumplog.PUMP_LOG_CLIENT_WAIT, wait(3_000_000), 7),  # the second statement's rows are due
            (1, pumplog.PUMP_LOG_SERVER, RowDescription() + row() + complete("SELECT 1") + ready(), 8),
        ]), pumped, server_mod._resume)
        done = conn.session.take_completed()
        answers.append([(r.status, r.client_wait_ns) for r in done])
        assert conn.observe
    assert answers[0] == answers[1] == [("ok", 7_000_000), ("ok", 3_000_000)]
