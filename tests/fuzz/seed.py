"""Record real traffic and SQL into the fuzz corpora (``tests/fuzz/corpus/<target>/seed-*``).

Usage: ``python tests/fuzz/seed.py`` (starts its own throwaway PostgreSQL).

Each workload runs through a small TCP tee to a real server, so the seeds are
what real drivers send and what a real server answers: psycopg (SCRAM, with
OpenTelemetry's psycopg instrumentation writing sqlcommenter comments; simple
and extended queries, a pipeline, COPY both ways, NOTICE, LISTEN/NOTIFY, an
error in a transaction), asyncpg (MD5; prepared statements, executemany,
binary results) and pg8000 (cleartext password). From each recording:

* ``startup``: the start-up packet, plus SSLRequest, GSSENCRequest, a protocol
  3.2 start-up and a CancelRequest carrying the key the server issued;
* ``client``: the client bytes after the start-up packet, with and without
  flush mode;
* ``server``: client bytes then server bytes in the ``server`` target's layout;
* ``sqlcomment`` / ``sqlinfo``: every Query / Parse text the clients sent.

Re-running overwrites the ``seed-*`` files; inputs the fuzzer found keep
their own names.
"""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
import struct
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from rawpg import RecordingTee as Tee  # noqa: E402
from targets import MAX_INPUT  # noqa: E402

CORPUS = HERE / "corpus"


def _psycopg(pg, port: int) -> None:
    import psycopg
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.sdk.trace import TracerProvider

    inst = PsycopgInstrumentor()
    inst.instrument(tracer_provider=TracerProvider(), enable_commenter=True, skip_dep_check=True)
    try:
        dsn = f"host=127.0.0.1 port={port} user=scram_user password=scram_pass dbname=postgres sslmode=disable"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select 1, 'two', now()")
            conn.execute("select %s::int + 1, %s::text", (41, "hello"))
            for i in range(3):
                conn.execute("select %s::int * 2", (i,), prepare=True)
            conn.execute("do $$ begin raise notice 'seed notice'; end $$")
            conn.execute("listen seedchan; notify seedchan, 'payload'")
            conn.execute("create temp table seed_t (id int primary key, v text)")
            with conn.cursor() as cur:
                cur.executemany("insert into seed_t values (%s, %s)", [(i, f"v{i}") for i in range(4)])
                with cur.copy("copy seed_t from stdin") as copy:
                    copy.write_row((10, "copied"))
                with cur.copy("copy seed_t to stdout") as copy:
                    for _ in copy:
                        pass
            with conn.pipeline():
                conn.execute("select 1")
                conn.execute("select %s::text", ("piped",))
            with conn.transaction():
                conn.execute("update seed_t set v = 'x' where id = 1")
            try:
                with conn.transaction():
                    conn.execute("insert into seed_t values (1, 'dup')")
            except psycopg.errors.UniqueViolation:
                pass
            with conn.transaction(), conn.cursor(name="seed_cursor") as cur:
                cur.execute("select * from generate_series(1, 20)")
                cur.fetchmany(5)
    finally:
        inst.uninstrument()


def _asyncpg(pg, port: int) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="md5_user", password="md5_pass",
                                     database="postgres", ssl=False)
        try:
            await conn.fetch("select $1::int as a, $2::text as b", 7, "seven")
            await conn.execute("create temp table seed_a (id int, d jsonb)")
            await conn.executemany("insert into seed_a values ($1, $2)", [(i, '{"k": 1}') for i in range(3)])
            stmt = await conn.prepare("select id, d from seed_a where id > $1")
            await stmt.fetch(0)
            try:
                await conn.execute("select 1/0")
            except asyncpg.DivisionByZeroError:
                pass
            async with conn.transaction():
                await conn.execute("delete from seed_a where id = 2")
        finally:
            await conn.close()

    asyncio.run(run())


def _pg8000(pg, port: int) -> None:
    import pg8000.native

    conn = pg8000.native.Connection("password_user", host="127.0.0.1", port=port, password="password_pass",
                                    database="postgres")
    try:
        conn.run("select :x::text as v, current_user", x="p8")
        conn.run("select * from pg_class where relname = :n limit 1", n="pg_type")
    finally:
        conn.close()


WORKLOADS = {"psycopg": _psycopg, "asyncpg": _asyncpg, "pg8000": _pg8000}


def _messages(stream: bytes, start: int):
    pos = start
    while pos + 5 <= len(stream):
        (n,) = struct.unpack_from("!I", stream, pos + 1)
        yield stream[pos], stream[pos + 5 : pos + 1 + n]
        pos += 1 + n


def _sql_texts(client_after_startup: bytes) -> list[str]:
    out = []
    for typ, body in _messages(client_after_startup, 0):
        if typ == ord("Q"):
            out.append(body[:-1].decode())
        elif typ == ord("P"):
            name_end = body.index(0)
            out.append(body[name_end + 1 : body.index(0, name_end + 1)].decode())
    return out


def _write(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data[:MAX_INPUT])


EXTRA_SQL = [
    "SELECT * FROM t /*action='%2Fparam*d',framework='spring',"
    "traceparent='00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01',"
    "tracestate='congo%3Dt61rcWkgMzE%2Crojo%3D00f067aa0ba902b7'*/",
    "/*dddbs='orders-db',dde='prod',ddps='orders',ddpv='1.2.3',"
    "traceparent='00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01'*/ SELECT 1",
    "select E'it''s /* not */ a comment', $tag$ body */ $tag$ /* a /* nested */ one */ "
    "/*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00'*/;",
    "insert into orders (id, note) values (1, 'a'), (2, U&'d\\0061t\\+000061') returning id "
    "/*db_driver='psycopg%%3A3.2',traceparent='00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01'*/",
    "with w as (update stock set n = n - 1 where id = $1 returning id) select * from w join items using (id)",
    "SET pgotel.traceparent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'; SELECT 1; COMMIT",
    "CREATE TABLE IF NOT EXISTS \"Quoted\" (x numeric(10,2) default 1.5e3, b bit varying default B'101')",
    "explain analyze merge into t using s on t.id = s.id when matched then update set v = s.v",
    "select '/*key=''v''*/' -- trailing line comment /*x='y'*/",
    "COPY (select 1) TO STDOUT; DO $$begin perform pg_sleep(0); end$$; CALL p(1, 'x')",
]


def main() -> None:
    from pgserver import PgServer

    with PgServer() as pg:
        sql: list[str] = list(EXTRA_SQL)
        for name, run in WORKLOADS.items():
            tee = Tee((pg.host, pg.port))
            run(pg, tee.port)
            tee.join()
            cstream = b"".join(d for side, d in tee.steps if side == "c")
            sstream = b"".join(d for side, d in tee.steps if side == "s")
            (n,) = struct.unpack_from("!I", cstream, 0)
            startup, after = cstream[:n], cstream[n:]
            _write("startup", name, startup)
            _write("client", f"{name}-plain", b"\x00" + after)
            _write("client", f"{name}-flush", b"\x01" + after)
            head = after[: min(len(after), 0xFFFF, MAX_INPUT // 2)]
            _write("server", f"{name}-observe", b"\x00" + struct.pack("!H", len(head)) + head + sstream)
            _write("server", f"{name}-hold", b"\x01" + struct.pack("!H", len(head)) + head + sstream)
            sql.extend(_sql_texts(after))
            for typ, body in _messages(sstream, 0):
                if typ == ord("K"):
                    pid, key = body[:4], body[4:]
                    _write("startup", f"{name}-cancel", struct.pack("!II", 12 + len(key), 80877102) + pid + key)
        _write("startup", "ssl", struct.pack("!II", 8, 80877103))
        _write("startup", "gssenc", struct.pack("!II", 8, 80877104))
        body = b"user\x00u\x00database\x00d\x00_pq_.test\x00on\x00\x00"
        _write("startup", "proto-3.2", struct.pack("!II", 8 + len(body), 196610) + body)
        _write("startup", "cancel-long-key", struct.pack("!II", 12 + 32, 80877102) + b"\x00\x00\x30\x39" + bytes(range(32)))
        seen = set()
        for text in sql:
            if text in seen:
                continue
            seen.add(text)
            digest = hashlib.sha1(text.encode()).hexdigest()[:12]
            _write("sqlinfo", digest, text.encode())
            if "/*" in text:
                _write("sqlcomment", digest, text.encode())
    for d in sorted(CORPUS.iterdir()):
        print(f"{d.name}: {len(list(d.iterdir()))} files")


if __name__ == "__main__":
    main()
