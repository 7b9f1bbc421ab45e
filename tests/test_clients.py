"""Real drivers through the relay: psycopg 3, asyncpg, pg8000, psql, pgbench and raw bytes.

This module owns the client tier of the suite: each test drives a real client
library or tool against the session PostgreSQL server through a running proxy
and checks what the client sees (results, errors, notices, notifications,
cancellation), usually against the same thing done directly on the server.
TLS and authentication live in ``test_tls_auth.py``; the cross-version smoke
set in ``test_versions.py``.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

import asyncpg
import pg8000.native
import psycopg
import pytest
from psycopg import errors

from pgotel_proxy.protocol import Session
from pgotel_proxy.proxy import connection as connection_mod
from pgserver import USERS
from rawpg import RawConn, error_fields
from waiting import cancel_sleep


@pytest.fixture(autouse=True)
def no_lost_observation(monkeypatch):
    """Every client here speaks valid protocol: the proxy must follow all of it.

    A session that goes out of sync still relays bytes, so the client tests
    would pass; this records every desync so they fail instead.
    """
    reasons: list[str] = []

    class RecordingSession(Session):
        # (a subclass: the compiled Session's own methods cannot be replaced)
        def desync(self, reason):
            if self.out_of_sync is None:
                reasons.append(reason)
            super().desync(reason)

    monkeypatch.setattr(connection_mod, "Session", RecordingSession)
    yield
    assert reasons == []


def _connect(dsn: str, **kw) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=10, **kw)


# --------------------------------------------------------------------------
# psycopg 3


def test_psycopg_simple_query_several_statements(proxy):
    with _connect(proxy.dsn()) as conn:
        cur = conn.cursor()
        # No parameters: psycopg sends one simple Query; each statement is a result set.
        cur.execute("select 1 as a; select 'two' as b, 2; values (3), (4)", prepare=False)
        sets = [cur.fetchall()]
        while cur.nextset():
            sets.append(cur.fetchall())
        assert sets == [[(1,)], [("two", 2)], [(3,), (4,)]]
        # ClientCursor merges parameters client-side and also uses the simple protocol.
        ccur = psycopg.ClientCursor(conn)
        ccur.execute("select %s::text || %s", ("it's", "!"))
        assert ccur.fetchone() == ("it's!",)


def test_psycopg_extended_with_params(proxy):
    with _connect(proxy.dsn()) as conn:
        row = conn.execute(
            "select %s::int + %s::int, %s::text, %s::bytea, %s::numeric", (40, 2, "é", b"\x00\xff", "1.5")
        ).fetchone()
        assert row[0] == 42 and row[1] == "é" and bytes(row[2]) == b"\x00\xff" and str(row[3]) == "1.5"
        # Binary results over the extended protocol.
        cur = conn.cursor(binary=True)
        cur.execute("select %s::int8[]", ([1, 2, 3],))
        assert cur.fetchone() == ([1, 2, 3],)


def test_psycopg_prepared_statement_reused(proxy):
    with _connect(proxy.dsn()) as conn:
        query = "select %s::int * 2 as doubled"
        results = [conn.execute(query, (i,), prepare=True).fetchone()[0] for i in range(3)]
        assert results == [0, 2, 4]
        # The server really holds one named prepared statement, executed three times.
        row = conn.execute(
            "select count(*) from pg_prepared_statements where statement like 'select $1::int * 2%%'"
        ).fetchone()
        assert row == (1,)


# Fails only after 0.3 s (the sleep is an InitPlan, so the division cannot be folded at
# plan time): every statement queued after it is sent before its error comes back.
_SLOW_FAILURE = "select 1 / (%s::int * (select count(*) from pg_sleep(0.3))::int)"


def test_psycopg_pipeline_with_error(proxy):
    with _connect(proxy.dsn()) as conn:
        with conn.pipeline() as p:
            before = [conn.execute("select %s::int", (i,)) for i in range(30)]
            failing = conn.execute(_SLOW_FAILURE, (0,))
            after = [conn.execute("select %s::int + 100", (i,)) for i in range(5)]
            with pytest.raises(errors.DivisionByZero):
                failing.fetchone()
            # The server skipped everything after the error up to the Sync.
            for cur in after:
                assert cur.pgresult is None
            with pytest.raises(errors.PipelineAborted):
                conn.execute("select 'queued after the error'")
                p.sync()
            assert [c.fetchone()[0] for c in before] == list(range(30))
            # After the Sync the pipeline is usable again.
            again = conn.execute("select 'recovered'")
            p.sync()
            assert again.fetchone() == ("recovered",)
        assert conn.execute("select 7").fetchone() == (7,)


def test_psycopg_pipeline_in_transaction(proxy):
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
        conn.execute("create temp table pipe_t (i int)")
        with conn.pipeline():
            cur = conn.cursor()
            cur.executemany("insert into pipe_t values (%s)", [(i,) for i in range(500)])
            total = conn.execute("select sum(i) from pipe_t")
        assert total.fetchone() == (sum(range(500)),)
        conn.rollback()


def _copy_payload(rows: int) -> bytes:
    # About 4 MB of text with characters that COPY must escape.
    return b"".join(b"%d\tline %d with tab\\tand backslash\\\\ and \xc3\xa9 %s\n" % (i, i, b"x" * 40) for i in range(rows))


@pytest.mark.parametrize("fmt", ["text", "binary"])
def test_psycopg_copy_in_and_out(proxy, pg, fmt):
    table = f"copy_clients_{fmt}"
    with _connect(pg.dsn()) as direct:
        direct.execute(f"drop table if exists {table}")
        direct.execute(f"create table {table} (id int, body text)")
    try:
        with _connect(proxy.dsn()) as conn:
            cur = conn.cursor()
            if fmt == "text":
                payload = _copy_payload(50_000)
                assert len(payload) > 3_000_000
                with cur.copy(f"copy {table} from stdin") as copy:
                    for i in range(0, len(payload), 100_000):
                        copy.write(payload[i : i + 100_000])
                assert cur.rowcount == 50_000
                out = io.BytesIO()
                with cur.copy(f"copy (select * from {table} order by id) to stdout") as copy:
                    for chunk in copy:
                        out.write(chunk)
                assert out.getvalue() == payload
            else:
                rows = [(i, "b" * 60 + str(i)) for i in range(50_000)]
                with cur.copy(f"copy {table} from stdin (format binary)") as copy:
                    copy.set_types(["int4", "text"])
                    for row in rows:
                        copy.write_row(row)
                with cur.copy(f"copy (select * from {table} order by id) to stdout (format binary)") as copy:
                    copy.set_types(["int4", "text"])
                    back = list(copy.rows())
                assert back == rows
        with _connect(pg.dsn()) as direct:
            assert direct.execute(f"select count(*) from {table}").fetchone() == (50_000,)
    finally:
        with _connect(pg.dsn()) as direct:
            direct.execute(f"drop table if exists {table}")


def test_psycopg_copy_error_keeps_connection(proxy):
    with _connect(proxy.dsn()) as conn:
        conn.execute("create temp table copy_bad (i int)")
        with pytest.raises(errors.InvalidTextRepresentation):
            with conn.cursor().copy("copy copy_bad from stdin") as copy:
                copy.write(b"1\n2\nnot a number\n3\n")
        assert conn.execute("select count(*) from copy_bad").fetchone() == (0,)


def test_psycopg_listen_notify(proxy):
    with _connect(proxy.dsn()) as listener, _connect(proxy.dsn()) as sender:
        listener.execute("listen clients_chan")
        sender.execute("notify clients_chan, 'hello through the proxy'")
        sender.execute("select pg_notify('clients_chan', 'second')")
        got = list(listener.notifies(timeout=5, stop_after=2))
        assert [(n.channel, n.payload) for n in got] == [
            ("clients_chan", "hello through the proxy"),
            ("clients_chan", "second"),
        ]
        assert got[0].pid == sender.info.backend_pid


def test_psycopg_notices(proxy):
    with _connect(proxy.dsn()) as conn:
        notices = []
        # The Diagnostic is only valid inside the handler: copy what we check.
        conn.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary)))
        conn.execute("do $$ begin raise notice 'first %', 1; raise warning 'second'; end $$")
        conn.execute("select 1")
        assert notices == [
            ("NOTICE", "first 1"),
            ("WARNING", "second"),
        ]


def test_psycopg_parameter_status(proxy):
    with _connect(proxy.dsn(application_name="before")) as conn:
        assert conn.info.parameter_status("application_name") == "before"
        assert conn.info.parameter_status("server_version")
        conn.execute("set application_name = 'after proxy'")
        assert conn.info.parameter_status("application_name") == "after proxy"
        conn.execute("set timezone = 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"


_CANCEL_SCRIPT = """
import sys, threading, time
import psycopg
from psycopg import errors

with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    timer = threading.Timer(0.3, getattr(conn, sys.argv[2]))
    timer.start()
    t0 = time.monotonic()
    try:
        conn.execute("select pg_sleep(10)")
        outcome = "finished"
    except errors.QueryCanceled as exc:
        outcome = exc.sqlstate
    timer.join()
    after = conn.execute("select 'still here'").fetchone()[0]
    print(outcome, round(time.monotonic() - t0, 2), after, sep="|")
"""


@pytest.mark.parametrize("how", ["cancel", "cancel_safe"])
def test_psycopg_cancel(proxy, how):
    # In a child process: psycopg's cancel() calls the blocking PQcancel() without
    # releasing the GIL, which would starve the proxy's loop thread in this process.
    res = subprocess.run([sys.executable, "-c", _CANCEL_SCRIPT, proxy.dsn(), how],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    outcome, elapsed, after = res.stdout.strip().split("|")
    assert outcome == "57014"
    assert float(elapsed) < 3
    assert after == "still here"


def test_psycopg_cancel_safe_in_process(proxy):
    with _connect(proxy.dsn()) as conn:
        took = cancel_sleep(conn)
        assert took < 3
        assert conn.execute("select 'still here'").fetchone() == ("still here",)


def test_psycopg_large_result_identical(proxy, pg):
    query = "select g, md5(g::text), repeat('x', g % 17) from generate_series(1, 200000) g"
    with _connect(pg.dsn()) as direct:
        expected = direct.execute(query).fetchall()
    with _connect(proxy.dsn()) as conn:
        got = conn.execute(query).fetchall()
        # And the same through a server-side cursor fetched in batches (PortalSuspended).
        with conn.transaction():
            cur = conn.cursor(name="big")
            cur.itersize = 7000
            cur.execute(query)
            streamed = list(cur)
    assert len(got) == 200_000
    assert got == expected
    assert streamed == expected


def test_raw_function_call(proxy):
    with _connect(proxy.dsn()) as conn:
        oid = conn.execute("select 'int4pl'::regproc::oid").fetchone()[0]
    with RawConn("127.0.0.1", proxy.port) as raw:
        assert raw.startup()[-1][0] == "Z"
        raw.send_function_call(oid, [struct.pack("!i", 40), struct.pack("!i", 2)])
        msgs = raw.read_until_ready()
        assert [t for t, _ in msgs] == ["V", "Z"]
        body = msgs[0][1]
        assert struct.unpack("!i", body[:4])[0] == 4
        assert struct.unpack("!i", body[4:8])[0] == 42
        # A failing call reports the error and the connection goes on.
        raw.send_function_call(oid, [struct.pack("!i", 2**31 - 1), struct.pack("!i", 1)])
        msgs = raw.read_until_ready()
        assert [t for t, _ in msgs] == ["E", "Z"]
        assert error_fields(msgs[0][1])["C"] == "22003"
        msgs = raw.query("select 1")
        assert [t for t, _ in msgs] == ["T", "D", "C", "Z"]


# --------------------------------------------------------------------------
# asyncpg


def _asyncpg_kw(proxy, user: str = "postgres") -> dict:
    kw = {"host": "127.0.0.1", "port": proxy.port, "user": user, "database": "postgres", "ssl": False}
    if user in USERS:
        kw["password"] = USERS[user][0]
    return kw


async def test_asyncpg_statement_cache_and_executemany(proxy):
    conn = await asyncpg.connect(**_asyncpg_kw(proxy))
    try:
        for i in range(50):
            rows = await conn.fetch("select $1::int + 1 as n, $2::text as t", i, str(i))
            assert [tuple(r) for r in rows] == [(i + 1, str(i))]
        await conn.execute("create temp table apg (id int primary key, v text)")
        await conn.executemany("insert into apg values ($1, $2)", [(i, f"v{i}") for i in range(300)])
        assert await conn.fetchval("select count(*) from apg") == 300
        stmt = await conn.prepare("select v from apg where id = $1")
        assert [await stmt.fetchval(i) for i in (0, 7, 299)] == ["v0", "v7", "v299"]
        # A cursor inside a transaction fetches in chunks (Execute with a row limit).
        async with conn.transaction():
            seen = [r["id"] async for r in conn.cursor("select id from apg order by id", prefetch=40)]
        assert seen == list(range(300))
    finally:
        await conn.close()


async def test_asyncpg_copy(proxy):
    conn = await asyncpg.connect(**_asyncpg_kw(proxy))
    try:
        await conn.execute("create temp table apg_copy (id int, name text, score float8)")
        records = [(i, f"name {i}", i / 3) for i in range(20_000)]
        status = await conn.copy_records_to_table("apg_copy", records=records)
        assert status == "COPY 20000"
        out = io.BytesIO()
        status = await conn.copy_from_query("select * from apg_copy where id < 1000 order by id", output=out, format="csv")
        assert status == "COPY 1000"
        lines = out.getvalue().decode().splitlines()
        assert lines[0] == "0,name 0,0" and lines[999].startswith("999,name 999,333")
        assert await conn.fetchval("select sum(id) from apg_copy") == sum(range(20_000))
    finally:
        await conn.close()


async def test_asyncpg_timeout_cancels(proxy):
    conn = await asyncpg.connect(**_asyncpg_kw(proxy))
    try:
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetch("select pg_sleep(5)", timeout=0.5)
        assert await conn.fetchval("select 'usable'") == "usable"
        assert time.monotonic() - t0 < 3
    finally:
        await conn.close()


async def test_asyncpg_transactions(proxy):
    conn = await asyncpg.connect(**_asyncpg_kw(proxy))
    try:
        await conn.execute("create temp table apg_tx (i int)")
        async with conn.transaction():
            await conn.execute("insert into apg_tx values (1)")
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await conn.execute("insert into apg_tx values (2)")
                1 / 0
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute("insert into apg_tx values (3)")
                await conn.execute("create temp table apg_tx_u (i int unique); insert into apg_tx_u values (1), (1)")
        async with conn.transaction():
            await conn.execute("insert into apg_tx values (4)")
            async with conn.transaction():  # a savepoint
                await conn.execute("insert into apg_tx values (5)")
            with pytest.raises(asyncpg.DivisionByZeroError):
                async with conn.transaction():
                    await conn.execute("insert into apg_tx values (6)")
                    await conn.execute("select 1/0")
        assert [r[0] for r in await conn.fetch("select i from apg_tx order by i")] == [1, 4, 5]
        assert not conn.is_in_transaction()
    finally:
        await conn.close()


# --------------------------------------------------------------------------
# pg8000


def test_pg8000_native(proxy):
    conn = pg8000.native.Connection(
        user="md5_user", password=USERS["md5_user"][0], host="127.0.0.1", port=proxy.port, database="postgres"
    )
    try:
        assert conn.run("select 1, 'a'") == [[1, "a"]]
        assert conn.run("select :x::int * 2, :y::text", x=21, y="zz") == [[42, "zz"]]
        with pytest.raises(pg8000.native.DatabaseError) as exc:
            conn.run("select * from no_such_table_here")
        assert exc.value.args[0]["C"] == "42P01"
        assert conn.run("select 'continues'") == [["continues"]]
        conn.run("create temp table p8 (i int)")
        conn.run("start transaction")
        conn.run("insert into p8 values (:i)", i=5)
        with pytest.raises(pg8000.native.DatabaseError):
            conn.run("insert into p8 values ('x')")
        conn.run("rollback")
        assert conn.run("select count(*) from p8") == [[0]]
    finally:
        conn.close()


# --------------------------------------------------------------------------
# psql and pgbench


def _client_tool(name: str, pg) -> str:
    path = os.path.join(pg.bin_dir, name)
    if os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed")
    return found


def _tool_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def test_psql_script_same_as_direct(proxy, pg, tmp_path):
    psql = _client_tool("psql", pg)
    src = tmp_path / "in.tsv"
    src.write_text("".join(f"{i}\tname {i}\n" for i in range(2000)))

    def run(port: int, tag: str) -> tuple[str, str, str]:
        out_file = tmp_path / f"out_{tag}.tsv"
        script = tmp_path / f"script_{tag}.sql"
        script.write_text(
            "\\set answer 41\n"
            "select :answer + 1 as answer;\n"
            "create temp table ps (id int, name text);\n"
            f"\\copy ps from '{src}'\n"
            "select count(*), sum(id) from ps;\n"
            "select 1/0;\n"
            "select 'after error' as still; select 2 as two;\n"
            f"\\copy (select * from ps where id % 100 = 0 order by id) to '{out_file}'\n"
            "begin; insert into ps values (-1, 'x'); select count(*) from ps; rollback;\n"
            "select count(*) from ps;\n"
        )
        res = subprocess.run(
            [psql, "-X", "-v", "ON_ERROR_STOP=0", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
             "-d", "postgres", "-f", str(script)],
            capture_output=True, text=True, env=_tool_env(), timeout=60,
        )
        assert res.returncode == 0, res.stderr
        # Error lines name the script file; make them comparable.
        return res.stdout, res.stderr.replace(str(script), "SCRIPT"), out_file.read_text()

    via_proxy = run(proxy.port, "proxy")
    direct = run(pg.port, "direct")
    assert via_proxy == direct
    stdout, stderr, copied = via_proxy
    assert " 42\n" in stdout and "after error" in stdout
    assert "ERROR:  division by zero" in stderr
    assert copied.splitlines()[:2] == ["0\tname 0", "100\tname 100"]


@pytest.fixture(scope="module")
def bench_db(pg):
    name = "pgbench_clients"
    pg.psql(f"drop database if exists {name}")
    pg.psql(f"create database {name}")
    yield name
    pg.psql(f"drop database if exists {name} with (force)")


def _pgbench_stats(output: str) -> tuple[int, int, float]:
    processed = re.search(r"number of transactions actually processed: (\d+)", output)
    failed = re.search(r"number of failed transactions: (\d+)", output)
    tps = re.search(r"tps = ([\d.]+)", output)
    assert processed and tps, output
    return int(processed.group(1)), int(failed.group(1)) if failed else 0, float(tps.group(1))


def test_pgbench_through_proxy(proxy, pg, bench_db):
    pgbench = _client_tool("pgbench", pg)
    base = [pgbench, "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "postgres"]
    init = subprocess.run(base + ["-i", "-s", "1", "-q", bench_db], capture_output=True, text=True,
                          env=_tool_env(), timeout=120)
    assert init.returncode == 0, init.stderr
    with _connect(pg.dsn(dbname=bench_db)) as direct:
        assert direct.execute("select count(*) from pgbench_accounts").fetchone() == (100_000,)
    for mode in ("simple", "extended", "prepared"):
        res = subprocess.run(base + ["-M", mode, "-c", "4", "-t", "150", "-n", bench_db],
                             capture_output=True, text=True, env=_tool_env(), timeout=120)
        assert res.returncode == 0, f"{mode}: {res.stdout}\n{res.stderr}"
        processed, failed, tps = _pgbench_stats(res.stdout)
        assert (processed, failed) == (600, 0), res.stdout
        assert tps > 0


# --------------------------------------------------------------------------
# Replication connections and the Unix socket listener


def test_replication_connection(proxy, pg):
    with _connect(pg.dsn()) as direct:
        system_id = str(direct.execute("select system_identifier from pg_control_system()").fetchone()[0])
    dsn = proxy.dsn(user="repl_user", password=USERS["repl_user"][0], replication="database")
    with _connect(dsn) as conn:
        row = conn.execute("IDENTIFY_SYSTEM").fetchone()
        assert row[0] == system_id and row[3] == "postgres"
        slot = conn.execute("CREATE_REPLICATION_SLOT clients_tmp_slot TEMPORARY LOGICAL pgoutput").fetchone()
        assert slot[0] == "clients_tmp_slot"
        # A database replication connection runs ordinary SQL too.
        assert conn.execute("select 1 + 1").fetchone() == (2,)


def test_unix_socket_listener(make_proxy):
    sock_dir = tempfile.mkdtemp(prefix="pgotel-sock-")
    try:
        path = os.path.join(sock_dir, ".s.PGSQL.6543")
        make_proxy(unix_socket=path)
        with _connect(f"host={sock_dir} port=6543 user=postgres dbname=postgres") as conn:
            assert conn.info.host == sock_dir
            assert conn.execute("select 'via unix'").fetchone() == ("via unix",)
            # Upstream the proxy is a TCP client.
            assert conn.execute("select client_addr is not null from pg_stat_activity where pid = pg_backend_pid()").fetchone() == (True,)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_unix_socket_upstream(make_proxy, pg):
    proxy = make_proxy(upstream=os.path.join(str(pg.socket_dir), f".s.PGSQL.{pg.port}"))
    with _connect(proxy.dsn()) as conn:
        # Upstream the proxy is a Unix-socket client: no client address.
        row = conn.execute("select client_addr from pg_stat_activity where pid = pg_backend_pid()").fetchone()
        assert row == (None,)
        # Cancel requests are forwarded over the same socket.
        cancel_sleep(conn)
        assert conn.execute("select 1").fetchone() == (1,)


# --------------------------------------------------------------------------
# Replication protocol tools (CopyBoth, base backups)


def _repl_env() -> dict[str, str]:
    env = _tool_env()
    env["PGPASSWORD"] = USERS["repl_user"][0]
    return env


def test_pg_recvlogical_copy_both(proxy, pg, tmp_path):
    recvlogical = _client_tool("pg_recvlogical", pg)
    base = [recvlogical, "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "repl_user", "-d", "postgres",
            "--slot", "clients_logical"]
    res = subprocess.run(base + ["--create-slot", "-P", "test_decoding"], capture_output=True, text=True,
                         env=_repl_env(), timeout=30)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "decoded.txt"
    # Streams in CopyBoth mode, the client sending a standby status update every second.
    # (Not -E: pg_recvlogical may stop at a keepalive before the last change is printed.)
    stream = subprocess.Popen(base + ["--start", "-f", str(out), "-F", "0", "-s", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_repl_env())
    try:
        with _connect(pg.dsn()) as direct:
            direct.execute("create table clients_decoded (i int)")
            direct.execute("insert into clients_decoded select generate_series(1, 500)")
        deadline = time.monotonic() + 15
        inserts: list[str] = []
        while time.monotonic() < deadline and len(inserts) < 500:
            time.sleep(0.1)
            text = out.read_text() if out.exists() else ""
            inserts = [line for line in text.splitlines() if "clients_decoded: INSERT" in line]
        assert stream.poll() is None, stream.stderr.read()
        assert len(inserts) == 500
        assert inserts[-1].endswith("i[integer]:500")
        assert "COMMIT" in out.read_text().splitlines()[-1]
    finally:
        stream.terminate()  # SIGTERM: pg_recvlogical ends its stream and exits cleanly
        stream.communicate(timeout=10)
        with _connect(pg.dsn()) as direct:
            direct.execute("select pg_drop_replication_slot('clients_logical')")
            direct.execute("drop table if exists clients_decoded")


def test_pg_basebackup(proxy, pg, tmp_path):
    basebackup = _client_tool("pg_basebackup", pg)
    verify = _client_tool("pg_verifybackup", pg)
    target = tmp_path / "backup"
    # -X stream adds a second replication connection streaming WAL alongside the tar stream.
    res = subprocess.run([basebackup, "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "repl_user", "-D", str(target),
                          "-X", "stream", "-c", "fast", "--no-sync"],
                         capture_output=True, text=True, env=_repl_env(), timeout=60)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([verify, "-n", str(target)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------
# The relay under pressure and when the server goes away


def test_slow_reader_backpressure(proxy):
    """A client that stops reading must not make the proxy buffer the whole result."""
    rows = 40_000
    with RawConn("127.0.0.1", proxy.port, timeout=30) as raw:
        raw.startup()
        sql = f"select repeat('x', 1000) from generate_series(1, {rows})".encode() + b"\x00"
        raw.send(b"Q" + struct.pack("!I", len(sql) + 4) + sql)
        time.sleep(1.5)  # about 40 MB are due; the server produces them far faster than that

        async def buffered() -> int:
            (conn,) = [c for c in proxy.server.connections if c.ready]
            return conn.client.get_write_buffer_size() + conn.upstream.get_write_buffer_size()

        held = proxy.call(buffered())
        assert held < 4 << 20, f"proxy buffered {held} bytes for a client that does not read"
        msgs = raw.read_until_ready()
        assert sum(1 for t, _ in msgs if t == "D") == rows
        assert (b"SELECT %d\x00" % rows) in [body for t, body in msgs if t == "C"]


def test_busy_server_backpressure(proxy, pg):
    """A client pushing COPY data at a server that does not read must be paused, not buffered."""
    rows, width = 40_000, 1000
    with _connect(pg.dsn()) as direct:
        direct.execute("drop table if exists clients_push")
        direct.execute("create table clients_push (t text)")
    locker = psycopg.connect(pg.dsn())
    try:
        # The COPY waits for this lock before it reads a byte of its input.
        locker.execute("lock table clients_push in access exclusive mode")
        with RawConn("127.0.0.1", proxy.port, timeout=30) as raw:
            raw.startup()
            sql = b"copy clients_push from stdin\x00"
            line = b"z" * (width - 1) + b"\n"
            data = b"d" + struct.pack("!I", len(line) + 4) + line
            stream = b"Q" + struct.pack("!I", len(sql) + 4) + sql + data * rows + b"c\x00\x00\x00\x04"
            pusher = threading.Thread(target=raw.send, args=(stream,))
            pusher.start()
            time.sleep(1.5)

            async def buffered() -> int:
                (conn,) = [c for c in proxy.server.connections if c.ready]
                return conn.client.get_write_buffer_size() + conn.upstream.get_write_buffer_size()

            held = proxy.call(buffered())
            assert pusher.is_alive(), "the client could push 40 MB into a server that does not read"
            assert held < 4 << 20, f"proxy buffered {held} bytes for a server that does not read"
            locker.rollback()
            pusher.join(30)
            msgs = raw.read_until_ready()
            assert [t for t, _ in msgs] == ["G", "C", "Z"]
            assert msgs[1][1] == b"COPY %d\x00" % rows
    finally:
        locker.close()
        with _connect(pg.dsn()) as direct:
            direct.execute("drop table if exists clients_push")


def test_backend_terminated(proxy, pg):
    with RawConn("127.0.0.1", proxy.port) as raw:
        raw.startup()
        with _connect(pg.dsn()) as direct:
            assert direct.execute("select pg_terminate_backend(%s)", (raw.backend_pid,)).fetchone() == (True,)
        typ, body = raw.read_message()
        assert typ == "E" and error_fields(body)["C"] == "57P01"
        # The server's own FATAL is all the client gets, then the connection closes.
        with pytest.raises(ConnectionError):
            raw.read_message()
    # Terminated in the middle of a query: again only the server's FATAL, no error of the proxy's.
    with RawConn("127.0.0.1", proxy.port) as raw:
        raw.startup()
        sql = b"select pg_sleep(10)\x00"
        raw.send(b"Q" + struct.pack("!I", len(sql) + 4) + sql)
        time.sleep(0.3)
        with _connect(pg.dsn()) as direct:
            direct.execute("select pg_terminate_backend(%s)", (raw.backend_pid,))
        got = []
        with pytest.raises(ConnectionError):
            while True:
                got.append(raw.read_message())
        assert [(t, error_fields(b)["C"] if t == "E" else None) for t, b in got] == [("T", None), ("E", "57P01")]
    with _connect(proxy.dsn()) as conn:
        pid = conn.info.backend_pid
        with _connect(pg.dsn()) as direct:
            direct.execute("select pg_terminate_backend(%s)", (pid,))
        with pytest.raises(errors.AdminShutdown):
            conn.execute("select 1")
