"""The proxy is transparent: the same client bytes get the same server bytes, directly or through it.

A mixed psycopg workload (simple and extended queries, prepared statements, a
pipeline, COPY in and out, an error, notices, LISTEN/NOTIFY) is recorded as
raw client→server bytes by a small TCP tee. Those exact bytes are then replayed
over a raw socket, once straight to PostgreSQL and once through the proxy in
each phase-timing mode; the server→client streams must be byte-identical after
normalising what differs per backend (process id, cancel key). The server must
also have run the same statements in the same order: a log table the workload
writes to, and pg_stat_statements call counts, are compared.
"""

from __future__ import annotations

import socket
import struct
import threading

import psycopg
import pytest

from rawpg import RecordingTee as Tee

APP = "pgotel-transparency"


def workload(dsn: str) -> None:
    """Everything a driver commonly does on one connection; deterministic output only."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into transp_log (what) values ('simple')")
        conn.execute("select 1; insert into transp_log (what) values ('multi'); select 'two'")
        conn.execute("insert into transp_log (what) values (%s)", ("extended",))
        for i in range(3):
            conn.execute("insert into transp_t (id, v) values (%s, %s)", (i, f"v{i}"), prepare=True)
        conn.execute("select id, v from transp_t where id = %s", (1,), prepare=True).fetchall()
        with conn.pipeline():
            conn.execute("insert into transp_log (what) values (%s)", ("pipe1",))
            conn.execute("select count(*) from transp_t")
            conn.execute("insert into transp_log (what) values (%s)", ("pipe2",))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0 from transp_t")
        with pytest.raises(psycopg.errors.UndefinedTable):
            with conn.pipeline():
                conn.execute("insert into transp_log (what) values (%s)", ("pipe-before-error",))
                conn.execute("select * from transp_missing")
                conn.execute("insert into transp_log (what) values (%s)", ("pipe-after-error",))
        conn.execute("do $$ begin raise notice 'transp notice'; raise warning 'transp warning'; end $$")
        with conn.cursor() as cur:
            with cur.copy("copy transp_t (id, v) from stdin") as cp:
                for i in range(10, 60):
                    cp.write_row((i, "x" * i))
            with cur.copy("copy (select id, v from transp_t order by id) to stdout") as cp:
                rows = list(cp.rows())
            assert len(rows) == 53
        conn.execute("listen transp_ch")
        conn.execute("notify transp_ch, 'payload'")
        with conn.transaction():
            conn.execute("insert into transp_log (what) values ('tx')")
            conn.execute("select pg_notify('transp_ch', 'in tx')")
        conn.execute("insert into transp_log (what) values ('copy-done'), ('end')")


SETUP = """
drop table if exists transp_t, transp_log;
create table transp_t (id int primary key, v text);
create table transp_log (seq serial primary key, what text);
"""


def reset(pg) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("truncate transp_t, transp_log restart identity")


def server_view(pg) -> tuple[list[str], dict[str, int]]:
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        log = [r[0] for r in c.execute("select what from transp_log order by seq")]
        calls = dict(
            c.execute(
                "select query, sum(calls)::int from pg_stat_statements "
                "where query like '%transp\\_%' and query not like '%pg_stat_statements%' group by query"
            ).fetchall()
        )
    return log, calls


def replay(port: int, client: bytes) -> bytes:
    """Send the recorded client bytes at once (reading concurrently); return all the server sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    got: list[bytes] = []

    def reader() -> None:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            got.append(data)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    sock.sendall(client)
    t.join(15)
    assert not t.is_alive(), "the server did not close after Terminate"
    sock.close()
    return b"".join(got)


def messages(stream: bytes) -> list[tuple[str, bytes]]:
    out = []
    pos = 0
    while pos < len(stream):
        assert len(stream) - pos >= 5, stream[pos:]
        typ = chr(stream[pos])
        (n,) = struct.unpack_from("!I", stream, pos + 1)
        out.append((typ, stream[pos + 5 : pos + 1 + n]))
        pos += 1 + n
    return out


def normalise(stream: bytes) -> list[tuple[str, bytes]]:
    """Blank what differs per backend: BackendKeyData, and the sender pid of notifications."""
    out = []
    for typ, body in messages(stream):
        if typ == "K":
            body = b"\x00" * len(body)
        elif typ == "A":
            body = b"\x00\x00\x00\x00" + body[4:]
        out.append((typ, body))
    return out


@pytest.fixture(scope="module")
def recorded(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(SETUP)
    tee = Tee((pg.host, pg.port))
    workload(f"host=127.0.0.1 port={tee.port} user=postgres dbname=postgres sslmode=disable gssencmode=disable application_name={APP}")
    tee.join()
    client = tee.client_bytes()
    assert client.endswith(b"X\x00\x00\x00\x04")
    return client


@pytest.fixture(scope="module")
def direct(pg, recorded):
    reset(pg)
    before = server_view(pg)[1]
    stream = replay(pg.port, recorded)
    log, after = server_view(pg)
    return normalise(stream), log, _delta(before, after)


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {q: n - before.get(q, 0) for q, n in after.items() if n != before.get(q, 0)}


def test_direct_replay_is_what_the_driver_got(direct):
    stream, log, calls = direct
    types = {t for t, _ in stream}
    # The workload really covers what it claims to.
    assert {"K", "G", "H", "d", "c", "N", "A", "E", "1", "2", "T", "D", "C", "Z"} <= types
    assert [f.startswith(b"SERROR") for t, f in stream if t == "E"] == [True, True]
    assert log == ["simple", "multi", "extended", "pipe1", "pipe2", "tx", "copy-done", "end"]
    assert calls, "pg_stat_statements saw nothing"


@pytest.mark.parametrize("phase_timing", ["wire", "flush"])
def test_proxy_is_byte_transparent(pg, make_proxy, otlp, recorded, direct, phase_timing):
    want_stream, want_log, want_calls = direct
    proxy = make_proxy(phase_timing=phase_timing)
    reset(pg)
    before = server_view(pg)[1]
    got = normalise(replay(proxy.port, recorded))
    log, after = server_view(pg)
    if got != want_stream:
        # Show the first difference rather than two long lists.
        for i, (a, b) in enumerate(zip(got, want_stream)):
            assert a == b, f"message {i} differs"
        assert len(got) == len(want_stream)
    assert log == want_log
    assert _delta(before, after) == want_calls
    # The proxy really observed this session (not a bare relay) and stayed in sync past
    # the COPYs and the errors: the statements at the end got spans too.
    proxy.flush()
    spans = otlp.wait_for(lambda spans: [s.name for s in spans].count("insert transp_log") >= 8)
    names = [s.name for s in spans]
    assert {"copy transp_t", "copy select transp_t", "listen", "notify", "COMMIT"} <= set(names), names

