"""The cross-version smoke set: the relay in front of every installed PostgreSQL major.

This module owns the checks that must hold for each server major the
``pg_versions`` fixture finds (13 to 18 when ``.ci/install-postgres
--all-versions`` has run; majors not installed are skipped). Each major gets
one server and one proxy for the whole module, with TLS on both legs and SCRAM
authentication, and the same short list of client operations: simple and
extended queries, a pipeline, COPY, cancel. Protocol 3.2 (PostgreSQL 18's
longer cancel keys) is checked with libpq when it can ask for it and with raw
bytes always.
"""

from __future__ import annotations

import struct
import time

import psycopg
import pytest
from psycopg import errors

from otlp_receiver import OtlpReceiver
from pgserver import USERS, PgServer
from proxyctl import RunningProxy
from rawpg import PROTOCOL_3_2, RawConn, error_fields, send_cancel
from waiting import cancel_sleep

pytestmark = pytest.mark.smoke

# Fails only after 0.3 s (the sleep is an InitPlan, so the division cannot be folded at
# plan time): statements queued after it are sent before its error comes back.
_SLOW_FAILURE = "select 1 / (%s::int * (select count(*) from pg_sleep(0.3))::int)"

MAJORS = (13, 14, 15, 16, 17, 18)
LIBPQ = psycopg.pq.version()


class Target:
    """One major: its server and the proxy in front of it."""

    def __init__(self, major: int, server: PgServer, proxy: RunningProxy, ca: str) -> None:
        self.major = major
        self.server = server
        self.proxy = proxy
        self.ca = ca

    def dsn(self, user: str = "scram_user", **params) -> str:
        conn = {
            "host": "localhost", "port": self.proxy.port, "user": user, "dbname": "postgres",
            "sslmode": "verify-full", "sslrootcert": self.ca,
            # Both legs are TLS: see test_tls_auth for why SCRAM needs this.
            "channel_binding": "disable",
        }
        if user in USERS:
            conn["password"] = USERS[user][0]
        conn.update(params)
        return " ".join(f"{k}={v}" for k, v in conn.items())

    def connect(self, **params) -> psycopg.Connection:
        return psycopg.connect(self.dsn(**params), autocommit=True, connect_timeout=10)


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module", params=MAJORS, ids=[f"pg{m}" for m in MAJORS])
def target(request, pg_versions, certs, receiver):
    major = request.param
    if major not in pg_versions:
        pytest.skip(f"PostgreSQL {major} is not installed (.ci/install-postgres --all-versions)")
    server = PgServer(pg_versions[major], certs=certs)
    server.start()
    proxy = None
    try:
        proxy = RunningProxy(
            upstream=f"{server.host}:{server.port}",
            otlp_endpoint=receiver.http_endpoint,
            client_tls_cert=certs["proxy_cert"],
            client_tls_key=certs["proxy_key"],
            upstream_tls="verify-full",
            upstream_tls_ca=certs["ca"],
        )
        proxy.start()
        yield Target(major, server, proxy, certs["ca"])
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()


def test_scram_over_tls(target):
    with target.connect() as conn:
        assert conn.pgconn.ssl_in_use
        row = conn.execute(
            "select current_user, current_setting('server_version_num')::int / 10000, ssl"
            " from pg_stat_ssl where pid = pg_backend_pid()"
        ).fetchone()
        assert row == ("scram_user", target.major, True)


def test_simple_and_extended(target):
    with target.connect() as conn:
        cur = conn.cursor()
        cur.execute("select 1; select 'two'", prepare=False)
        assert cur.fetchall() == [(1,)]
        assert cur.nextset() and cur.fetchall() == [("two",)]
        for i in range(3):
            assert conn.execute("select %s::int + 1, %s::text", (i, "x"), prepare=True).fetchone() == (i + 1, "x")
        with pytest.raises(errors.UndefinedTable):
            conn.execute("select * from missing_table where a = %s", (1,))
        assert conn.execute("select %s::text", ("after error",)).fetchone() == ("after error",)


def test_pipeline(target):
    with target.connect() as conn:
        with conn.pipeline() as p:
            curs = [conn.execute("select %s::int * 3", (i,)) for i in range(20)]
            failing = conn.execute(_SLOW_FAILURE, (0,))
            skipped = conn.execute("select 'skipped'")
            with pytest.raises(errors.DivisionByZero):
                failing.fetchone()
            assert skipped.pgresult is None
            with pytest.raises(errors.PipelineAborted):
                conn.execute("select 'aborted'")
                p.sync()
            assert [c.fetchone()[0] for c in curs] == [i * 3 for i in range(20)]
        assert conn.execute("select 'after pipeline'").fetchone() == ("after pipeline",)


def test_copy(target):
    with target.connect() as conn:
        conn.execute("create temp table smoke_copy (id int, t text)")
        payload = b"".join(b"%d\trow %d\n" % (i, i) for i in range(20_000))
        cur = conn.cursor()
        with cur.copy("copy smoke_copy from stdin") as copy:
            copy.write(payload)
        out = bytearray()
        with cur.copy("copy (select * from smoke_copy order by id) to stdout") as copy:
            for chunk in copy:
                out += chunk
        assert bytes(out) == payload


def test_cancel(target):
    with target.connect() as conn:
        took = cancel_sleep(conn)
        assert took < 3
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.skipif(LIBPQ < 180000, reason="max_protocol_version needs libpq 18")
def test_protocol_3_2_with_libpq(target):
    with target.connect(max_protocol_version="3.2") as conn:
        # PostgreSQL 18 speaks 3.2; older servers answer NegotiateProtocolVersion and libpq falls back.
        expected = 30002 if target.major >= 18 else 30000
        assert conn.pgconn.full_protocol_version == expected
        cancel_sleep(conn)
        assert conn.execute("select 'after'").fetchone() == ("after",)


def test_protocol_3_2_raw(target):
    """A 3.2 StartupMessage by hand: the key length, and a cancel that carries the whole key."""
    port = target.proxy.port
    with RawConn("127.0.0.1", port) as raw:
        msgs = raw.startup(code=PROTOCOL_3_2)
        types = [t for t, _ in msgs]
        assert types[-1] == "Z", msgs
        if target.major >= 18:
            assert "v" not in types
            assert len(raw.cancel_key) > 4
        else:
            # NegotiateProtocolVersion: newest minor the server supports, then the session goes on in 3.0.
            (newest,) = struct.unpack_from("!I", dict(msgs)["v"])
            assert newest == 196608
            assert len(raw.cancel_key) == 4
        payload = b"select pg_sleep(10)\x00"
        raw.send(b"Q" + struct.pack("!I", len(payload) + 4) + payload)
        time.sleep(0.3)
        t0 = time.monotonic()
        assert send_cancel("127.0.0.1", port, raw.backend_pid, raw.cancel_key) == b""
        msgs = raw.read_until_ready()
        assert time.monotonic() - t0 < 3
        errs = [error_fields(body) for t, body in msgs if t == "E"]
        assert [e["C"] for e in errs] == ["57014"]
        assert [t for t, _ in raw.query("select 1")] == ["T", "D", "C", "Z"]


def test_cancel_with_wrong_key_is_dropped(target):
    """A key the proxy did not hand out must not reach the server, even with the right pid."""
    with RawConn("127.0.0.1", target.proxy.port) as raw:
        raw.startup(code=PROTOCOL_3_2)
        payload = b"select pg_sleep(1)\x00"
        raw.send(b"Q" + struct.pack("!I", len(payload) + 4) + payload)
        time.sleep(0.2)
        wrong = bytes(b ^ 0xFF for b in raw.cancel_key)
        send_cancel("127.0.0.1", target.proxy.port, raw.backend_pid, wrong)
        msgs = raw.read_until_ready()
        assert [t for t, _ in msgs] == ["T", "D", "C", "Z"]
