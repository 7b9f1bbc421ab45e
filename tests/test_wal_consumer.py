"""The CDC side of otelwal: pgoutput decoding, SCRAM, carrier extraction (pure), and the
consumer against the real server: spans in the carried trace, slot position across a
restart, hostile message content. Also home of :class:`RunningConsumer`, which
test_wal_emit uses too.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import struct
import threading
import time

import psycopg
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from pgotel_proxy.stats import STATS
from pgotel_proxy.config import Config
from pgotel_proxy.tracing.export import make_exporter
from pgotel_proxy.wal import CdcConsumer, extract, extract_carrier
from pgotel_proxy.wal import pgoutput as po
from pgotel_proxy.wal.replication import PgError, ReplicationConnection, parse_dsn
from pgotel_proxy.wal.scram import ScramClient, ScramError

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
_ids = itertools.count(1)


def traceparent(span: int | None = None) -> tuple[str, str]:
    """A fresh sampled traceparent and its span id (hex)."""
    sid = f"{span if span is not None else next(_ids) + 0x1000:016x}"
    return f"00-{TRACE_ID}-{sid}-01", sid


# ---------------------------------------------------------------- in-process consumer


class RunningConsumer:
    """A CdcConsumer on its own event-loop thread, exporting to the test's OTLP receiver."""

    def __init__(self, pg, otlp, slot: str, publication: str, **kw) -> None:
        settings = Config(exporter="otlp", otlp_endpoint=otlp.http_endpoint, otlp_protocol="http/protobuf")
        self.provider = TracerProvider(resource=Resource.create({"service.name": "cdc-test"}))
        self.provider.add_span_processor(SimpleSpanProcessor(make_exporter(settings)))
        self.transactions: list = []
        self.consumer = CdcConsumer(
            pg.dsn(user="repl_user", password="repl_pass", sslmode="disable"), slot, publication,
            create_slot=True, tracer_provider=self.provider, status_interval=0.2,
            on_transaction=self.transactions.append, **kw,
        )
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            self.loop.run_until_complete(self.consumer.run())
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc

    def start(self) -> "RunningConsumer":
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self.consumer.started.is_set():
            if self.error is not None or time.monotonic() > deadline:
                raise AssertionError(f"consumer did not start: {self.error!r}")
            time.sleep(0.02)
        return self

    def wait_transactions(self, n: int, timeout: float = 10.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.transactions) < n:
            if self.error is not None:
                raise AssertionError(f"consumer failed: {self.error!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.transactions)} of {n} transactions seen: {self.transactions}")
            time.sleep(0.02)
        return self.transactions

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.consumer.stop(), self.loop).result(10)
            self._thread.join(10)
        self.loop.close()
        self.provider.shutdown()
        assert self.error is None, repr(self.error)


def drop_slot(pg, slot: str) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        for _ in range(100):
            try:
                conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (slot,))
                return
            except psycopg.errors.ObjectInUse:
                time.sleep(0.05)


@pytest.fixture
def cdc_table(pg):
    """A fresh table and a publication for it; yields (table, publication, slot); drops the slot after."""
    n = next(_ids)
    table, pub, slot = f"wal_t{n}", f"wal_p{n}", f"wal_s{n}"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        conn.execute(f"GRANT ALL ON {table} TO PUBLIC")
        conn.execute(f"CREATE PUBLICATION {pub} FOR TABLE {table}")
    yield table, pub, slot
    drop_slot(pg, slot)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP PUBLICATION IF EXISTS {pub}")
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def consumer_spans(otlp) -> list:
    return [s for s in otlp.spans if s.kind in ("CONSUMER", "SPAN_KIND_CONSUMER")]


# ------------------------------------------------------------------------ pure: pgoutput


def _s(text: str) -> bytes:
    return text.encode() + b"\x00"


def test_decode_transaction_messages():
    begin = b"B" + struct.pack("!QqI", 0x16B3F50, 760000000000000, 741)
    assert po.decode_message(begin) == po.Begin(0x16B3F50, 760000000000000, 741)
    rel = (b"R" + struct.pack("!I", 16400) + _s("public") + _s("t") + b"d" + struct.pack("!h", 2)
           + b"\x01" + _s("id") + struct.pack("!Ii", 23, -1) + b"\x00" + _s("v") + struct.pack("!Ii", 25, -1))
    r = po.decode_message(rel)
    assert r.qualified == "public.t" and [c.name for c in r.columns] == ["id", "v"] and r.columns[0].flags == 1
    tup = struct.pack("!h", 3) + b"t" + struct.pack("!i", 1) + b"7" + b"n" + b"u"
    assert po.decode_message(b"I" + struct.pack("!I", 16400) + b"N" + tup) == po.Insert(16400, (b"7", None, ...))
    upd = po.decode_message(b"U" + struct.pack("!I", 16400) + b"K" + tup + b"N" + tup)
    assert upd.old == (b"7", None, ...) and upd.new == (b"7", None, ...)
    assert po.decode_message(b"U" + struct.pack("!I", 1) + b"N" + tup).old is None
    assert po.decode_message(b"D" + struct.pack("!I", 1) + b"O" + tup) == po.Delete(1, (b"7", None, ...))
    assert po.decode_message(b"T" + struct.pack("!iB", 2, 1) + struct.pack("!II", 5, 6)) == po.Truncate(1, (5, 6))
    msg = po.decode_message(b"M" + b"\x01" + struct.pack("!Q", 99) + _s("otelwal") + struct.pack("!i", 3) + b"abc")
    assert msg == po.LogicalMessage(True, 99, "otelwal", b"abc")
    assert po.decode_message(b"C" + b"\x00" + struct.pack("!QQq", 10, 20, 30)) == po.Commit(0, 10, 20, 30)
    assert po.decode_message(b"O" + struct.pack("!Q", 5) + _s("origin")) == po.Origin(5, "origin")
    assert po.decode_message(b"Y" + struct.pack("!I", 700) + _s("public") + _s("mood")) == po.TypeInfo(700, "public", "mood")
    assert isinstance(po.decode_message(b"S\x00\x00"), po.Unknown)


@pytest.mark.parametrize("data", [
    b"", b"B\x00", b"C\x00", b"R\x00\x00\x00\x01public",
    b"I" + struct.pack("!I", 1) + b"X",
    b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", 50) + b"short",
    b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", -5),
    b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"?",
    b"M\x01" + struct.pack("!Q", 1) + _s("p") + struct.pack("!i", 2**30) + b"x",
    b"T" + struct.pack("!iB", -1, 0),
])
def test_decode_rejects_truncated_and_malformed(data):
    with pytest.raises(po.DecodeError):
        po.decode_message(data)


def test_stream_layer_and_status_update():
    w = po.decode_copy_data(b"w" + struct.pack("!QQq", 1, 2, 3) + b"Bpayload")
    assert w == po.XLogData(1, 2, 3, b"Bpayload")
    assert po.decode_copy_data(b"k" + struct.pack("!Qq", 7, 8) + b"\x01") == po.Keepalive(7, 8, True)
    assert po.decode_copy_data(b"z") is None
    with pytest.raises(po.DecodeError):
        po.decode_copy_data(b"k\x00")
    r = po.standby_status_update(30, 20, 10, reply=True, clock=5)
    assert r == b"r" + struct.pack("!QQQqB", 30, 20, 10, 5, 1)
    assert po.lsn_to_str(po.str_to_lsn("16/B374D848")) == "16/B374D848"


def test_scram_rfc7677_vector():
    # RFC 7677 section 3 (user name "user" there; PostgreSQL sends an empty one, which
    # only changes the auth message, so the vector is replayed with the same bare message).
    c = ScramClient("pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    c._bare = "n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    final = c.final(server_first)
    assert final == b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    c.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    with pytest.raises(ScramError):
        c.verify(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    with pytest.raises(ScramError):
        ScramClient("x", nonce="abc").final(b"r=zzz,s=AAAA,i=1")


def test_parse_dsn():
    assert parse_dsn("host=h port=5 user='a b' password=x\\ y") == {"host": "h", "port": "5", "user": "a b", "password": "x y"}
    assert parse_dsn("postgresql://u:p%40w@h:6/db?sslmode=disable") == {
        "host": "h", "port": "6", "user": "u", "password": "p@w", "dbname": "db", "sslmode": "disable"}


# ------------------------------------------------------------------------ pure: extract


def test_extract_every_delivery_form():
    tp = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    doc = '{"traceparent": "%s", "tracestate": "vendor=x"}' % tp
    for content in (doc, doc.encode(), base64.b64encode(doc.encode()).decode(), doc.encode().hex(),
                    "\\x" + doc.encode().hex(), base64.b64encode(doc.encode())):
        ctx = extract(content)
        assert ctx is not None, content
        from opentelemetry import trace

        sc = trace.get_current_span(ctx).get_span_context()
        assert (f"{sc.trace_id:032x}", f"{sc.span_id:016x}", sc.is_remote) == (TRACE_ID, "00f067aa0ba902b7", True)
        assert sc.trace_state.get("vendor") == "x"


@pytest.mark.parametrize("content", [
    "garbage{{{", b"\xff\xfe\x00invalid", "[1,2]", '{"traceparent": 5}', '{"traceparent": "00-zz"}',
    '{"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"}', "", "abc", "{" * 100_000,
    '{"a":' * 5000, b"x" * 1_000_000, None, 12,
])
def test_extract_hostile_content_is_ignored_and_counted(content):
    before = STATS.wal_carrier_malformed + STATS.wal_carrier_oversized
    assert extract(content) is None
    assert STATS.wal_carrier_malformed + STATS.wal_carrier_oversized == before + 1
    assert extract_carrier(b'{"traceparent": "x"}') == {"traceparent": "x"}


# ------------------------------------------------------------------- against the server


@pytest.mark.parametrize("user,password", [
    ("postgres", None), ("scram_user", "scram_pass"), ("md5_user", "md5_pass"), ("password_user", "password_pass"),
])
async def test_client_authenticates(pg, user, password):
    params = {"host": pg.host, "port": str(pg.port), "user": user, "dbname": "postgres", "sslmode": "disable"}
    if password:
        params["password"] = password
    conn = await ReplicationConnection.connect(params, replication=None)
    try:
        assert await conn.query("SELECT current_user, 1") == [(user, "1")]
    finally:
        await conn.close()


async def test_client_tls_and_wrong_password(pg):
    conn = await ReplicationConnection.connect(pg.dsn(user="repl_user", password="repl_pass", sslmode="require"))
    try:
        rows = await conn.query("IDENTIFY_SYSTEM")
        assert len(rows) == 1 and rows[0][3] == "postgres"
    finally:
        await conn.close()
    with pytest.raises(PgError) as info:
        await ReplicationConnection.connect(pg.dsn(user="scram_user", password="nope", sslmode="disable"))
    assert info.value.sqlstate == "28P01"


def _write(pg, table: str, rows, tp: str | None = None, rollback: bool = False) -> None:
    """One transaction on ``pg`` directly, emitting the otelwal message itself when ``tp`` is given."""
    with psycopg.connect(pg.dsn()) as conn:
        for r in rows:
            conn.execute(f"INSERT INTO {table} VALUES (%s, 'x')", (r,))
        if tp:
            conn.execute("SELECT pg_logical_emit_message(true, 'otelwal', %s)", ('{"traceparent": "%s"}' % tp,))
        if rollback:
            conn.rollback()


def test_consumer_span_and_restart_without_loss_or_repeat(pg, otlp, cdc_table):
    table, pub, slot = cdc_table
    first = RunningConsumer(pg, otlp, slot, pub).start()
    try:
        tp1, sid1 = traceparent()
        _write(pg, table, [1, 2], tp1)
        _write(pg, table, [3])  # untraced: counted, no span
        first.wait_transactions(2)
        span = otlp.wait_for(lambda spans: consumer_spans(otlp))[0]
        assert span.trace_id == TRACE_ID and span.parent_span_id == sid1
        assert span.name == f"otelwal consume public.{table}"
        a = span.attributes
        assert a["db.postgresql.wal.inserts"] == 2 and a["db.postgresql.wal.tables"] == [f"public.{table}"]
        assert a["pgotel.cdc.lag_ms"] >= 0 and a["db.postgresql.wal.commit_lsn"].count("/") == 1
        assert a["messaging.consumer.group.name"] == slot
        assert first.consumer.stats["transactions"] == 2 and first.consumer.stats["transactions_traced"] == 1
    finally:
        first.stop()
    # Written while no consumer runs: the restarted one must see exactly these.
    tp2, sid2 = traceparent()
    _write(pg, table, [4], tp2)
    _write(pg, table, [5], rollback=True)
    _write(pg, table, [6])
    second = RunningConsumer(pg, otlp, slot, pub).start()
    try:
        txs = second.wait_transactions(2)
        time.sleep(0.5)  # anything repeated or extra would show up now
        assert [t.counts["insert"] for t in second.transactions] == [1, 1]
        assert len(second.transactions) == 2
        spans = otlp.wait_for(lambda spans: len(consumer_spans(otlp)) >= 2)
        assert sorted(s.parent_span_id for s in consumer_spans(otlp)) == sorted([sid1, sid2])
        assert txs[0].end_lsn > 0
    finally:
        second.stop()


def test_consumer_survives_hostile_messages(pg, otlp, cdc_table):
    table, pub, slot = cdc_table
    running = RunningConsumer(pg, otlp, slot, pub).start()
    try:
        with psycopg.connect(pg.dsn(user="md5_user", password="md5_pass")) as conn:  # any role may emit
            conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            conn.execute("SELECT pg_logical_emit_message(true, 'otelwal', 'garbage{{{')")
            conn.execute("SELECT pg_logical_emit_message(true, 'otelwal', %s)", ("[" * 50_000,))
            conn.execute("SELECT pg_logical_emit_message(true, 'otelwal', %s::bytea)", (b"\xff\xfe{\x00\x80",))
            conn.execute("SELECT pg_logical_emit_message(false, 'otelwal', 'not transactional')")
        tp, sid = traceparent()
        _write(pg, table, [2], tp)
        running.wait_transactions(2)
        spans = otlp.wait_for(lambda spans: consumer_spans(otlp))
        assert [s.parent_span_id for s in consumer_spans(otlp)] == [sid]
        stats = running.consumer.stats
        assert stats["messages_ignored"] == 3 and stats["messages_other"] == 1
        assert stats["transactions_traced"] == 1 and stats["decode_errors"] == 0
    finally:
        running.stop()


def test_cdc_command_streams_and_stops_on_sigterm(pg, cdc_table):
    import os
    import signal
    import subprocess
    import sys

    table, pub, slot = cdc_table
    env = dict(os.environ, PGOTEL_CDC_DSN=pg.dsn(user="repl_user", password="repl_pass", sslmode="disable"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgotel_proxy", "cdc", "--slot", slot, "--publication", pub, "--create-slot",
         "--otlp-endpoint", "console"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            while not conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchall() == [(True,)]:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else "slow"
                time.sleep(0.1)
        tp, sid = traceparent()
        _write(pg, table, [1], tp)
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            # (the insert position: with synchronous_commit off the write position may lag behind the commit)
            end = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
            while conn.execute("SELECT confirmed_flush_lsn < %s FROM pg_replication_slots WHERE slot_name = %s",
                               (end, slot)).fetchone()[0]:
                assert time.monotonic() < deadline, "slot position never advanced"
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert f"otelwal consume public.{table}" in out and "'transactions_traced': 1" in out


def test_cdc_command_reports_a_bad_slot_in_one_line(pg):
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "pgotel_proxy", "cdc", "--dsn", pg.dsn(user="repl_user", password="repl_pass", sslmode="disable"),
         "--slot", "no_such_slot", "--publication", "p", "--otlp-endpoint", "console"],
        capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 1
    assert "no_such_slot" in res.stderr and "Traceback" not in res.stderr
