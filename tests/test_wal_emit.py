"""otelwal emission by the proxy, end to end against the real server.

Clients with a traceparent write through a proxy with ``wal_propagation`` on; the
in-process CDC consumer must then emit a CONSUMER span in the same trace with the
client's span as parent, for every write transaction shape (explicit block, autocommit
simple Query, autocommit extended batch, each session context channel), and nothing for rollbacks,
untraced writes and reads. The client must receive exactly the bytes it would have
received with emission off (raw-socket scripts, compared byte for byte).
"""

from __future__ import annotations

import socket
import struct

import psycopg
import pytest

from pgotel_proxy.protocol.startup import encode_startup
from pgotel_proxy.stats import STATS
from test_wal_consumer import TRACE_ID, RunningConsumer, cdc_table, consumer_spans, traceparent  # noqa: F401
from wire import SYNC, Bind, Execute as _execute, Parse as _parse, Query as _q, message as _msg


def _emitted() -> int:
    return STATS.wal_messages_emitted


# ------------------------------------------------------------------- end to end


def test_traced_writes_continue_on_the_cdc_side(pg, otlp, make_proxy, cdc_table):
    table, pub, slot = cdc_table
    proxy = make_proxy(wal_propagation=True)
    running = RunningConsumer(pg, otlp, slot, pub).start()
    try:
        expected = []
        before = _emitted()
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            # autocommit simple Query (psycopg sends parameterless statements as Query)
            tp, sid = traceparent()
            conn.execute(f"INSERT INTO {table} VALUES (1, 'simple') /*traceparent='{tp}'*/")
            expected.append(sid)
            # autocommit extended batch (Parse/Bind/Execute/Sync)
            tp, sid = traceparent()
            conn.execute(f"INSERT INTO {table} VALUES (%s, 'extended') /*traceparent='{tp}'*/", (2,))
            expected.append(sid)
            # explicit transaction block: BEGIN / writes / COMMIT
            tp, sid = traceparent()
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (%s, 'block') /*traceparent='{tp}'*/", (3,))
                conn.execute(f"UPDATE {table} SET v = 'block2' WHERE id = 3 /*traceparent='{tp}'*/")
            expected.append(sid)
            # the session carrier instead of a comment
            tp, sid = traceparent()
            conn.execute(f"SET pgotel.traceparent = '{tp}'")
            conn.execute(f"DELETE FROM {table} WHERE id = %s", (1,))
            conn.execute("RESET pgotel.traceparent")
            expected.append(sid)
            # untraced write, traced reads, an unsampled context: no message
            conn.execute(f"INSERT INTO {table} VALUES (4, 'untraced')")
            tp, _ = traceparent()
            assert conn.execute(f"SELECT count(*) FROM {table} /*traceparent='{tp}'*/").fetchone() == (3,)
            assert conn.execute(f"SELECT v FROM {table} WHERE id = %s /*traceparent='{tp}'*/", (2,)).fetchone() == ("extended",)
            conn.execute(f"INSERT INTO {table} VALUES (5, 'unsampled') /*traceparent='{tp[:-2]}00'*/")
        with psycopg.connect(proxy.dsn()) as conn:  # rolled back: no message
            tp, _ = traceparent()
            conn.execute(f"INSERT INTO {table} VALUES (%s, 'rolled back') /*traceparent='{tp}'*/", (6,))
            conn.rollback()
            # non-autocommit commit of a traced write (psycopg: BEGIN, extended INSERT, COMMIT)
            tp, sid = traceparent()
            conn.execute(f"INSERT INTO {table} VALUES (%s, 'committed') /*traceparent='{tp}'*/", (7,))
            conn.commit()
            expected.append(sid)
        # one message per traced committed transaction; a block that rolls back never gets one
        assert _emitted() - before == len(expected)
        txs = running.wait_transactions(len(expected) + 2)
        otlp.wait_for(lambda spans: len(consumer_spans(otlp)) >= len(expected))
        spans = consumer_spans(otlp)
        assert [s.parent_span_id for s in spans] == expected
        assert {s.trace_id for s in spans} == {TRACE_ID}
        block = spans[2].attributes
        assert block["db.postgresql.wal.inserts"] == 1 and block["db.postgresql.wal.updates"] == 1
        assert spans[3].attributes["db.postgresql.wal.deletes"] == 1
        # the untraced and unsampled writes were decoded, counted, not traced
        assert running.consumer.stats["transactions"] == len(expected) + 2 == len(txs)
        with psycopg.connect(pg.dsn()) as conn:
            assert conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {table}").fetchone() == ([2, 3, 4, 5, 7],)
    finally:
        running.stop()


def test_emission_off_when_the_role_may_not_emit(pg, make_proxy):
    proxy = make_proxy(wal_propagation=True)
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS wal_noemit (id int)")
        admin.execute("GRANT ALL ON wal_noemit TO md5_user")
        admin.execute("REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC")
        admin.execute("REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC")
        try:
            disabled, emitted = STATS.wal_emission_disabled, _emitted()
            with psycopg.connect(proxy.dsn(user="md5_user", password="md5_pass"), autocommit=True) as conn:
                tp, _ = traceparent()
                conn.execute(f"INSERT INTO wal_noemit VALUES (1) /*traceparent='{tp}'*/")
                with conn.transaction():
                    conn.execute(f"INSERT INTO wal_noemit VALUES (%s) /*traceparent='{tp}'*/", (2,))
            assert STATS.wal_emission_disabled == disabled + 1
            assert _emitted() == emitted
            assert admin.execute("SELECT count(*) FROM wal_noemit").fetchone() == (2,)
        finally:
            admin.execute("GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO PUBLIC")
            admin.execute("GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, bytea) TO PUBLIC")
            admin.execute("DROP TABLE wal_noemit")


# --------------------------------------------- the connection's first statement


def _wal_messages(pg, slot: str, publication: str) -> list[bytes]:
    """The logical messages decoded from ``slot`` so far (pgoutput, read without consuming)."""
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        # The fixture server commits asynchronously and decoding reads only flushed WAL.
        admin.execute("CHECKPOINT")
        rows = admin.execute(
            "SELECT data FROM pg_catalog.pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
            " 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
            (slot, publication),
        ).fetchall()
    return [bytes(data) for (data,) in rows if bytes(data)[:1] == b"M"]


@pytest.mark.parametrize("user", ["postgres", "md5_user", "scram_user"])
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_first_statement_of_a_connection_gets_its_message(pg, make_proxy, cdc_table, user, protocol):
    """A traced write sent as a new connection's very first statement is emitted for.

    Whatever the authentication (trust, or a password exchanged through the
    proxy), the emission check has answered before the client may send it.
    """
    table, pub, slot = cdc_table
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("SELECT pg_catalog.pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    proxy = make_proxy(wal_propagation=True)
    tp, _sid = traceparent()
    with psycopg.connect(pg.dsn(user=user, host="127.0.0.1", port=proxy.port, sslmode="disable"),
                         autocommit=True) as conn:
        if protocol == "simple":  # no parameter: psycopg sends a Query
            conn.execute(f"INSERT INTO {table} VALUES (1, 'first') /*traceparent='{tp}'*/")
        else:
            conn.execute(f"INSERT INTO {table} VALUES (%s, 'first') /*traceparent='{tp}'*/", (1,))
    messages = _wal_messages(pg, slot, pub)
    assert len(messages) == 1 and b"otelwal" in messages[0] and tp.encode() in messages[0]


# ------------------------------------------------------------- byte identity


def _bind(params: list[bytes], stmt: str = "", portal: str = "") -> bytes:
    return Bind(stmt, portal, tuple(params))


_SYNC = SYNC
_DESCRIBE_PORTAL = _msg(b"D", b"P\x00")


class _Raw:
    """A trust-auth wire client recording everything the server side sends after start-up."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.sock.sendall(encode_startup({"user": "postgres", "database": "postgres"}))
        self.until_ready(1)
        self.buf = b""

    def until_ready(self, n: int) -> bytes:
        """Read whole messages until the n-th ReadyForQuery; return the bytes read."""
        got = b""
        seen = 0
        while seen < n:
            while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack_from("!I", self.buf, 1)[0]:
                chunk = self.sock.recv(65536)
                assert chunk, "connection closed"
                self.buf += chunk
            end = 1 + struct.unpack_from("!I", self.buf, 1)[0]
            msg, self.buf = self.buf[:end], self.buf[end:]
            got += msg
            if msg[:1] == b"Z":
                seen += 1
            if msg[:1] == b"G":  # CopyInResponse: send the rows
                self.sock.sendall(_msg(b"d", b"90\tcopied\n") + _msg(b"c", b""))
        return got

    def run(self, data: bytes, readies: int) -> bytes:
        self.sock.sendall(data)
        return self.until_ready(readies)

    def close(self) -> None:
        self.sock.sendall(_msg(b"X", b""))
        self.sock.close()


def _script(table: str) -> list[tuple[bytes, int, int]]:
    """(client bytes, ReadyForQuery count, messages the proxy should emit for them)."""
    tp = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    c = f" /*traceparent='{tp}'*/"
    return [
        (_q(f"INSERT INTO {table} VALUES (1, 'a'){c}"), 1, 1),
        (_q(f"INSERT INTO {table} VALUES (2, 'b'); SELECT id FROM {table} ORDER BY id{c}"), 1, 1),
        (_parse(f"INSERT INTO {table} VALUES ($1, 'c') RETURNING id{c}") + _bind([b"3"]) + _DESCRIBE_PORTAL
         + _execute() + _SYNC, 1, 1),
        (_q("BEGIN") + _q(f"INSERT INTO {table} VALUES (4, 'd'){c}") + _q(f"SELECT * FROM {table}{c}"), 3, 0),
        (_q("COMMIT"), 1, 1),
        (_q("BEGIN"), 1, 0),
        (_parse(f"INSERT INTO {table} VALUES ($1, 'e'){c}", "ins") + _bind([b"5"], "ins") + _execute() + _SYNC, 1, 0),
        (_parse("COMMIT", "commit_stmt") + _bind([], "commit_stmt") + _execute() + _SYNC, 1, 1),
        (_q(f"COPY {table} FROM STDIN{c}"), 1, 1),
        (_q(f"BEGIN; INSERT INTO {table} VALUES (6, 'f'){c}"), 1, 0),
        (_q(f"INSERT INTO {table} VALUES (7, 'g') /* no */; ROLLBACK"), 1, 0),  # failed? no: rolled back
        (_q(f"SELECT * FROM {table}{c}") + _q(f"INSERT INTO {table} VALUES (8, 'h')"), 2, 0),
        (_q(f"INSERT INTO {table} VALUES ('bad', 'i'){c}"), 1, 1),  # fails: message rolled back too
        (_q("BEGIN") + _q(f"INSERT INTO {table} VALUES (9, 'j'){c}") + _q("SELECT 1/0") + _q("COMMIT"), 4, 0),
        # a syntax error in the client's text: the position must still point into it
        (_q(f"INSERT INTO {table} VALUES (10,, 'k'){c}"), 1, 1),
        # an extended batch failing before the emit: the server skips ours with the rest
        (_parse(f"INSERT INTO {table} VALUES ($1, 'l'){c}") + _bind([b"bad"]) + _execute() + _SYNC, 1, 1),
        # pipelined: the second batch is sent while the first is unanswered: no message, untouched
        (_parse(f"INSERT INTO {table} VALUES ($1, 'm'){c}") + _bind([b"11"]) + _execute() + _SYNC
         + _bind([b"12"]) + _execute() + _SYNC, 2, 1),
    ]


def _transcript(port: int, table: str) -> tuple[list[bytes], int]:
    raw = _Raw(port)
    before = _emitted()
    try:
        out = [raw.run(data, readies) for data, readies, _ in _script(table)]
    finally:
        raw.close()
    return out, _emitted() - before


def test_client_bytes_identical_with_emission_on_and_off(pg, make_proxy):
    table = "wal_bytes"
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {table} (id int, v text)")
    try:
        off, n_off = _transcript(make_proxy().port, table)
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute(f"TRUNCATE {table}")
        on, n_on = _transcript(make_proxy(wal_propagation=True).port, table)
        assert n_off == 0
        assert n_on == sum(e for _, _, e in _script(table))
        for i, (a, b) in enumerate(zip(off, on)):
            assert a == b, f"step {i}: client bytes differ\noff: {a!r}\non:  {b!r}"
        # every message the proxy wrote made it into the WAL of a committed transaction or went with a rollback
        with psycopg.connect(pg.dsn()) as admin:
            assert admin.execute(f"SELECT array_agg(id ORDER BY id) FROM {table}").fetchone() == ([1, 2, 3, 4, 5, 8, 11, 12, 90],)
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP TABLE {table}")


@pytest.mark.parametrize("phase_timing", ["flush"])
def test_emission_with_flush_phase_timing(pg, make_proxy, phase_timing):
    """Flush insertion and emission splice into the same client stream."""
    table = "wal_flush"
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {table} (id int, v text)")
    try:
        off, _ = _transcript(make_proxy(phase_timing=phase_timing).port, table)
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute(f"TRUNCATE {table}")
        on, n_on = _transcript(make_proxy(wal_propagation=True, phase_timing=phase_timing).port, table)
        assert on == off and n_on == sum(e for _, _, e in _script(table))
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP TABLE {table}")


# ------------------------------------------------------------ session level


def test_session_splices_and_removes_the_emit_and_keeps_its_lsn():
    """Case (b) on a bare Session: what goes upstream, what the client gets, where the LSN lands."""
    from pgotel_proxy.protocol import Session
    from pgotel_proxy.wal.emit import WalInjector

    s = Session()
    inj = WalInjector("otelwal")
    s.injector = inj
    s.hold_first_ready = True
    assert s.server_filter(_msg(b"Z", b"I"), 1) == b""  # the first ReadyForQuery is held...
    check = inj.start(s)
    assert check.startswith(b"Q") and b"pg_logical_emit_message" in check
    row = _msg(b"T", b"\x00\x01x\x00" + b"\x00" * 18) + _msg(b"D", struct.pack("!hi", 1, 1) + b"t")
    released = s.server_filter(row + _msg(b"C", b"SELECT 1\x00") + _msg(b"Z", b"I"), 2)
    assert released == _msg(b"Z", b"I")  # ...until the check is answered, which the client never sees
    tp = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    sql = f"INSERT INTO t VALUES (1) /*traceparent='{tp}'*/"
    upstream = s.client_data(_q(sql), 3)
    assert upstream is not None and upstream.startswith(b"Q")
    assert upstream[5:].startswith(b"SELECT pg_catalog.pg_logical_emit_message(true, E'otelwal', E'{\"traceparent\":\"" + tp.encode())
    assert upstream.endswith(sql.encode() + b"\x00")
    emit_answer = (_msg(b"T", b"\x00\x01x\x00" + b"\x00" * 18) + _msg(b"D", struct.pack("!hi", 1, 9) + b"0/16B3F50")
                   + _msg(b"C", b"SELECT 1\x00"))
    client_answer = _msg(b"C", b"INSERT 0 1\x00") + _msg(b"Z", b"I")
    # Split at every byte boundary of the emit's answer: the client gets its own bytes only.
    got = b""
    data = emit_answer + client_answer
    for i in range(len(data)):
        got += s.server_filter(data[i : i + 1], 4) if s.server_hold else (s.server_observe(data[i : i + 1], 4) or data[i : i + 1])
    assert got == client_answer
    done = s.take_completed()
    inj.statements(done)
    assert [r.sql for r in done] == [sql] and done[0].extra == {"wal_lsn": "0/16B3F50"}
    assert done[0].results[0].tag == "INSERT 0 1"


def test_authentication_messages_are_not_a_batch():
    """The password exchange before the first ReadyForQuery leaves the emission rules untouched."""
    from pgotel_proxy.protocol import Session
    from pgotel_proxy.wal.emit import WalInjector

    s = Session()
    inj = WalInjector("otelwal")
    s.injector = inj
    s.hold_first_ready = True
    assert s.server_filter(_msg(b"R", struct.pack("!I", 5) + b"salt"), 1) == _msg(b"R", struct.pack("!I", 5) + b"salt")
    password = _msg(b"p", b"md5" + b"0" * 32 + b"\x00")
    assert s.client_data(password, 2) is None
    assert s.server_filter(_msg(b"R", struct.pack("!I", 0)) + _msg(b"Z", b"I"), 3) == _msg(b"R", struct.pack("!I", 0))
    inj.start(s)
    row = _msg(b"T", b"\x00\x01x\x00" + b"\x00" * 18) + _msg(b"D", struct.pack("!hi", 1, 1) + b"t")
    assert s.server_filter(row + _msg(b"C", b"SELECT 1\x00") + _msg(b"Z", b"I"), 4) == _msg(b"Z", b"I")
    tp = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    upstream = s.client_data(_q(f"INSERT INTO t VALUES (1) /*traceparent='{tp}'*/"), 5)
    assert upstream is not None and b"pg_logical_emit_message" in upstream


def test_a_statement_sent_before_the_check_answered_leaves_emission_on():
    """A client that does not wait for ReadyForQuery: its early write goes untouched, later ones get messages."""
    from pgotel_proxy.protocol import Session
    from pgotel_proxy.wal.emit import WalInjector

    s = Session()
    inj = WalInjector("otelwal")
    s.injector = inj
    s.hold_first_ready = True
    assert s.server_filter(_msg(b"Z", b"I"), 1) == b""
    inj.start(s)
    tp = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    early = _q(f"INSERT INTO t VALUES (1) /*traceparent='{tp}'*/")
    assert s.client_data(early, 2) is None  # the check is still in flight: no decision on it
    row = _msg(b"T", b"\x00\x01x\x00" + b"\x00" * 18) + _msg(b"D", struct.pack("!hi", 1, 1) + b"t")
    check_answer = row + _msg(b"C", b"SELECT 1\x00") + _msg(b"Z", b"I")
    assert s.server_filter(check_answer, 3) == _msg(b"Z", b"I")
    assert s.server_filter(_msg(b"C", b"INSERT 0 1\x00") + _msg(b"Z", b"I"), 4) == _msg(b"C", b"INSERT 0 1\x00") + _msg(b"Z", b"I")
    assert inj.state != "off"
    upstream = s.client_data(_q(f"INSERT INTO t VALUES (2) /*traceparent='{tp}'*/"), 5)
    assert upstream is not None and b"pg_logical_emit_message" in upstream


def test_emitted_message_lsn_is_on_a_statement_span(pg, otlp, make_proxy, cdc_table):
    table, _pub, _slot = cdc_table
    proxy = make_proxy(wal_propagation=True)
    tp, _sid = traceparent()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (11, 'lsn') /*traceparent='{tp}'*/")
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (%s, 'lsn block') /*traceparent='{tp}'*/", (12,))
    proxy.flush()
    spans = otlp.wait_for(lambda s: sum("pgotel.wal.message_lsn" in x.attributes for x in s) >= 2)
    lsns = [x.attributes["pgotel.wal.message_lsn"] for x in spans if "pgotel.wal.message_lsn" in x.attributes]
    for lsn in lsns:
        hi, lo = lsn.split("/")
        int(hi, 16), int(lo, 16)  # a pg_lsn
    assert len(set(lsns)) == len(lsns)


# ------------------------------------------------------- session context channels


def test_session_channels_reach_the_wal(pg, otlp, make_proxy, cdc_table):
    """Writes whose context comes from ``application_name`` or ``pg_tracing.trace_context`` get their message.

    The channels follow the span builder's rules (tracing.carrier): the start-up
    value, ``SET`` / ``SET LOCAL`` / ``RESET``, a statement's own comment first,
    then ``pg_tracing.trace_context``, then ``application_name``.
    """
    table, pub, slot = cdc_table
    proxy = make_proxy(wal_propagation=True)
    running = RunningConsumer(pg, otlp, slot, pub).start()
    try:
        expected = []
        before = _emitted()
        # application_name from the start-up message, the connection's first statement a write
        tp, sid = traceparent()
        with psycopg.connect(proxy.dsn(application_name=tp), autocommit=True) as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1, 'startup')")
            expected.append(sid)
        with psycopg.connect(proxy.dsn(application_name="app"), autocommit=True) as conn:
            # SET application_name before each write (OpenTelemetry JS's pg instrumentation does that)
            tp, sid = traceparent()
            conn.execute(f"SET application_name = '{tp}'")
            conn.execute(f"INSERT INTO {table} VALUES (2, 'simple')")
            expected.append(sid)
            tp, sid = traceparent()
            conn.execute(f"SET application_name = '{tp}'")
            conn.execute(f"UPDATE {table} SET v = %s WHERE id = 2", ("extended",))
            expected.append(sid)
            # pg_tracing's setting wins over application_name
            tp, sid = traceparent()
            conn.execute(f"SET pg_tracing.trace_context = 'traceparent=''{tp}'''")
            conn.execute(f"INSERT INTO {table} VALUES (%s, 'pg_tracing')", (3,))
            expected.append(sid)
            # a statement's own comment wins over both
            tp, sid = traceparent()
            conn.execute(f"INSERT INTO {table} VALUES (4, 'comment') /*traceparent='{tp}'*/")
            expected.append(sid)
            conn.execute("RESET pg_tracing.trace_context")
            conn.execute("RESET application_name")  # back to "app", which is no context
            conn.execute(f"INSERT INTO {table} VALUES (5, 'untraced')")
            # SET LOCAL lasts for its transaction
            tp, sid = traceparent()
            with conn.transaction():
                conn.execute(f"SET LOCAL application_name = '{tp}'")
                conn.execute(f"DELETE FROM {table} WHERE id = %s", (1,))
            expected.append(sid)
            conn.execute(f"INSERT INTO {table} VALUES (6, 'after SET LOCAL')")
            # a rolled-back SET is undone
            tp, _ = traceparent()
            with conn.transaction(force_rollback=True):
                conn.execute(f"SET pg_tracing.trace_context = 'traceparent=''{tp}'''")
            conn.execute(f"INSERT INTO {table} VALUES (7, 'after rollback')")
        assert _emitted() - before == len(expected)
        running.wait_transactions(len(expected) + 3)
        otlp.wait_for(lambda spans: len(consumer_spans(otlp)) >= len(expected))
        spans = consumer_spans(otlp)
        assert [s.parent_span_id for s in spans] == expected
        assert {s.trace_id for s in spans} == {TRACE_ID}
        assert running.consumer.stats["transactions"] == len(expected) + 3
    finally:
        running.stop()
