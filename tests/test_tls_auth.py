"""TLS on both legs of the proxy and password authentication passed through it.

The proxy terminates the client's TLS with its own certificate (SSLRequest,
or PostgreSQL 17 direct TLS with ALPN ``postgresql``) and opens its own TLS
connection to the server (``upstream_tls`` = disable / prefer / require /
verify-ca / verify-full). Authentication is not done by the proxy: the
server's requests and the client's answers (cleartext password, MD5, SCRAM)
pass through unchanged, so every method the server supports works, with one
exception, channel binding:

Channel binding
---------------
SCRAM-SHA-256-PLUS binds the SCRAM exchange to the TLS connection the client
sees, through a hash of the server certificate (``tls-server-end-point``).
Behind a proxy that terminates TLS the client hashes the certificate the proxy
presented, the server its own. So:

* When the proxy presents the upstream's own certificate (and key) to its
  clients, both hashes agree: the proxy passes SCRAM-SHA-256-PLUS through
  untouched and binding verifies end to end (``channel_binding=require``
  works, and libpq's defaults bind).
* Otherwise the proxy removes SCRAM-SHA-256-PLUS from the mechanisms the
  server offers, and ``channel_binding=require`` cannot work through it.
  With libpq's default ``channel_binding=prefer`` over TLS to the proxy, a
  client offered only SCRAM-SHA-256 tells the server "I support channel
  binding but believe you do not" (GS2 flag ``y``). A server that itself
  talks TLS to the proxy (``upstream_tls`` not ``disable``) does support it,
  takes the flag as a downgrade attack and refuses the login. The proxy cannot
  rewrite the flag: the client repeats it in its final message, the server
  checks that both agree, and the client's proof and the server's signature
  cover that final message. So when both legs use TLS with different
  certificates, SCRAM users of libpq must connect with
  ``channel_binding=disable`` (the proxy warns at start-up), or reach the
  proxy without TLS (a sidecar on localhost).
* When either leg is plain text, or for clients that never send ``y``
  (asyncpg, pg8000, ...), SCRAM works as usual.
* trust, password and md5 are not affected.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time

import asyncpg
import pg8000.native
import psycopg
import pytest

from pgserver import USERS, PgServer
from rawpg import RawConn, error_fields
from waiting import cancel_sleep

from pgotel_proxy.proxy import server as server_mod
from pgotel_proxy.proxy import tls as tls_mod

#: Whether TLS sessions relay on the pump in this build (the compiled pump and the compiled TLS).
PUMPED = server_mod.Pump is not None and tls_mod.COMPILED

LIBPQ = psycopg.pq.version()


def _password(user: str) -> str | None:
    return USERS[user][0] if user in USERS else None


def _connect(proxy, user: str = "postgres", **params) -> psycopg.Connection:
    password = _password(user)
    if password is not None:
        params.setdefault("password", password)
    return psycopg.connect(proxy.dsn(user=user, **params), autocommit=True, connect_timeout=10)


def _upstream_ssl(conn: psycopg.Connection) -> bool:
    """Whether the server's end of this session (the proxy's upstream leg) is TLS."""
    return conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()[0]


def _client_tls(certs) -> dict:
    return {"client_tls_cert": certs["proxy_cert"], "client_tls_key": certs["proxy_key"]}


# --------------------------------------------------------------------------
# Client leg


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_client_tls_terminated(make_proxy, certs, host):
    proxy = make_proxy(**_client_tls(certs))
    with _connect(proxy, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 'over tls'").fetchone() == ("over tls",)
    with _connect(proxy, host=host, sslmode="verify-full", sslrootcert=certs["ca"]) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.info.host == host
        assert conn.execute("select 1").fetchone() == (1,)


def test_cancel_over_client_tls(make_proxy, certs):
    proxy = make_proxy(upstream_tls="require", **_client_tls(certs))
    with _connect(proxy, sslmode="verify-full", sslrootcert=certs["ca"]) as conn:
        # cancel_safe() opens its cancel connection with the same sslmode: SSLRequest, then CancelRequest.
        cancel_sleep(conn)
        assert conn.execute("select 'after cancel'").fetchone() == ("after cancel",)


def test_client_tls_min_version(make_proxy, certs):
    proxy = make_proxy(client_tls_min_version="TLSv1.3", **_client_tls(certs))
    with pytest.raises(psycopg.OperationalError):
        _connect(proxy, sslmode="require", ssl_max_protocol_version="TLSv1.2")
    with _connect(proxy, sslmode="require", ssl_min_protocol_version="TLSv1.3") as conn:
        assert conn.pgconn.ssl_in_use


def test_client_tls_verify_full_rejects_unknown_ca(make_proxy, certs, tmp_path):
    from certs import make_certs

    other = make_certs(tmp_path / "other")
    proxy = make_proxy(**_client_tls(certs))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        _connect(proxy, sslmode="verify-full", sslrootcert=other["ca"])


def test_client_tls_not_configured(make_proxy):
    proxy = make_proxy()
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL, but SSL was required"):
        _connect(proxy, sslmode="require")
    with _connect(proxy, sslmode="prefer") as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 'plain'").fetchone() == ("plain",)


@pytest.mark.skipif(LIBPQ < 170000, reason="sslnegotiation=direct needs libpq 17")
def test_direct_tls(make_proxy, certs):
    proxy = make_proxy(**_client_tls(certs))
    with _connect(proxy, sslmode="verify-full", sslrootcert=certs["ca"], sslnegotiation="direct") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 'direct'").fetchone() == ("direct",)
        # The cancel connection negotiates the same way.
        cancel_sleep(conn)
        assert conn.execute("select 2").fetchone() == (2,)


@pytest.mark.skipif(LIBPQ < 170000, reason="sslnegotiation=direct needs libpq 17")
def test_direct_tls_without_client_tls_fails(make_proxy):
    proxy = make_proxy()
    with pytest.raises(psycopg.OperationalError):
        _connect(proxy, sslmode="require", sslnegotiation="direct")
    # The proxy is unharmed.
    with _connect(proxy) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_direct_tls_requires_alpn(make_proxy, certs):
    proxy = make_proxy(**_client_tls(certs))
    ctx = ssl.create_default_context(cafile=certs["ca"])  # no ALPN offered
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            data = _read_all(tls)
    assert data[:1] == b"E"
    fields = error_fields(data[5:])
    assert fields["C"] == "08P01" and "ALPN" in fields["M"]


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def test_gssenc_request_refused_then_startup(make_proxy, certs):
    proxy = make_proxy(**_client_tls(certs))
    with RawConn("127.0.0.1", proxy.port) as raw:
        raw.send(struct.pack("!II", 8, 80877104))  # GSSENCRequest
        assert raw.sock.recv(1) == b"N"
        assert raw.startup()[-1][0] == "Z"
        assert [t for t, _ in raw.query("select 1")] == ["T", "D", "C", "Z"]


def test_plaintext_after_ssl_request_refused(make_proxy, certs):
    """Bytes pipelined after SSLRequest would be trusted as if they came over TLS: refuse them."""
    proxy = make_proxy(**_client_tls(certs))
    body = b"user\x00postgres\x00database\x00postgres\x00\x00"
    startup = struct.pack("!II", len(body) + 8, 196608) + body
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(struct.pack("!II", 8, 80877103) + startup)
        data = _read_all(sock)
    assert data[:1] == b"E"
    fields = error_fields(data[5:])
    assert fields["C"] == "08P01" and "unencrypted data after SSL request" in fields["M"]


@pytest.mark.parametrize("packet,sqlstate", [
    (struct.pack("!II", 4, 196608), "08P01"),  # length below the minimum
    (struct.pack("!II", 1 << 20, 196608), "08P01"),  # longer than max_startup_packet
    (struct.pack("!II", 8, 131072), "0A000"),  # protocol 2.0
])
def test_bad_startup_packets(make_proxy, packet, sqlstate):
    proxy = make_proxy()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(packet)
        data = _read_all(sock)
    assert data[:1] == b"E"
    assert error_fields(data[5:])["C"] == sqlstate


# --------------------------------------------------------------------------
# Upstream leg


@pytest.mark.parametrize("mode,encrypted", [("disable", False), ("prefer", True), ("require", True),
                                            ("verify-ca", True), ("verify-full", True)])
def test_upstream_tls_modes(make_proxy, certs, mode, encrypted):
    ca = {} if mode == "disable" else {"upstream_tls_ca": certs["ca"]}
    proxy = make_proxy(upstream_tls=mode, **ca)
    with _connect(proxy) as conn:
        assert _upstream_ssl(conn) is encrypted
        assert not conn.pgconn.ssl_in_use


def test_upstream_verify_full_wrong_name(make_proxy, pg, certs):
    proxy = make_proxy(upstream_tls="verify-full", upstream_tls_ca=certs["ca"],
                       upstream_tls_server_name="wrong.example")
    upstream = f"{pg.host}:{pg.port}"
    with pytest.raises(psycopg.OperationalError) as exc:
        _connect(proxy)
    assert f"could not connect to upstream server {upstream}" in str(exc.value)
    with RawConn("127.0.0.1", proxy.port) as raw:
        msgs = raw.startup()
    assert [t for t, _ in msgs] == ["E"]
    fields = error_fields(msgs[0][1])
    assert fields["C"] == "08001" and fields["S"] == "FATAL"
    assert upstream in fields["M"] and "certificate" in fields["M"].lower()


def test_upstream_verify_full_unknown_ca(make_proxy, certs, tmp_path):
    from certs import make_certs

    other = make_certs(tmp_path / "other")
    proxy = make_proxy(upstream_tls="verify-ca", upstream_tls_ca=other["ca"])
    with pytest.raises(psycopg.OperationalError, match="could not connect to upstream server"):
        _connect(proxy)


@pytest.fixture(scope="module")
def plain_pg(pg_versions, certs):
    """A server with TLS switched off, for the upstream fallback rules."""
    from conftest import default_pg_major

    major = default_pg_major(pg_versions)
    if major is None:
        pytest.skip("no PostgreSQL server installed")
    server = PgServer(pg_versions[major], settings={"ssl": False}, certs=certs)
    server.start()
    yield server
    server.stop()


def test_upstream_tls_against_plain_server(make_proxy, plain_pg):
    upstream = f"{plain_pg.host}:{plain_pg.port}"
    prefer = make_proxy(upstream=upstream, upstream_tls="prefer")
    with _connect(prefer) as conn:
        assert _upstream_ssl(conn) is False
    require = make_proxy(upstream=upstream, upstream_tls="require")
    with RawConn("127.0.0.1", require.port) as raw:
        msgs = raw.startup()
    fields = error_fields(msgs[0][1])
    assert (msgs[0][0], fields["C"]) == ("E", "08001")
    assert upstream in fields["M"] and "does not accept TLS" in fields["M"]


# Where a TLS session's bytes move after start-up: the pump (the default), or the event loop's
# TLS transports (Flush phase timing keeps a session there).
_RELAYS = {"pump": {}, "event-loop": {"phase_timing": "flush"}}


@pytest.mark.parametrize("relay", list(_RELAYS))
def test_large_data_over_both_tls_legs(make_proxy, pg, certs, relay):
    proxy = make_proxy(upstream_tls="verify-full", upstream_tls_ca=certs["ca"], **_client_tls(certs), **_RELAYS[relay])
    query = "select g, md5(g::text) from generate_series(1, 100000) g"
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        expected = direct.execute(query).fetchall()
    with _connect(proxy, sslmode="require") as conn:
        assert conn.execute(query).fetchall() == expected
        conn.execute("create temp table tls_copy (t text)")
        payload = b"".join(b"line %d %s\n" % (i, b"y" * 100) for i in range(40_000))
        with conn.cursor().copy("copy tls_copy from stdin") as copy:
            copy.write(payload)
        out = bytearray()
        with conn.cursor().copy("copy tls_copy to stdout") as copy:
            for chunk in copy:
                out += chunk
        assert bytes(out) == payload


@pytest.mark.parametrize("relay", list(_RELAYS))
def test_slow_reader_backpressure_over_tls(make_proxy, certs, relay):
    proxy = make_proxy(upstream_tls="require", **_client_tls(certs), **_RELAYS[relay])
    rows = 30_000
    ctx = ssl.create_default_context(cafile=certs["ca"])
    with RawConn("127.0.0.1", proxy.port, timeout=30, tls=ctx) as raw:
        raw.startup()
        sql = f"select repeat('x', 1000) from generate_series(1, {rows})".encode() + b"\x00"
        raw.send(b"Q" + struct.pack("!I", len(sql) + 4) + sql)
        time.sleep(1.5)  # about 30 MB are due and the client reads none of it

        async def buffered() -> int:
            (conn,) = [c for c in proxy.server.connections if c.ready]
            if relay == "pump":  # what it keeps is one read's worth; its transports are closed
                assert conn.pump_id is not None or not PUMPED
                return 0
            assert conn.pump_id is None
            return conn.client.get_write_buffer_size() + conn.upstream.get_write_buffer_size()

        held = proxy.call(buffered())
        assert held < 4 << 20, f"proxy buffered {held} bytes for a TLS client that does not read"
        msgs = raw.read_until_ready()
        assert sum(1 for t, _ in msgs if t == "D") == rows


# --------------------------------------------------------------------------
# Authentication through the proxy


_LEGS = [(False, "disable"), (False, "require"), (True, "disable"), (True, "require")]
_USERS = ["postgres", "password_user", "md5_user", "scram_user"]


@pytest.mark.parametrize("client_tls,upstream_tls", _LEGS, ids=[f"client-{c and 'tls' or 'plain'}-upstream-{u}" for c, u in _LEGS])
def test_auth_passthrough(make_proxy, certs, client_tls, upstream_tls):
    proxy = make_proxy(upstream_tls=upstream_tls, **(_client_tls(certs) if client_tls else {}))
    sslmode = "require" if client_tls else "disable"
    for user in _USERS:
        if user == "scram_user" and client_tls and upstream_tls != "disable":
            # See "Channel binding" above: the server takes the client's
            # GS2 flag "y" for a downgrade attack.
            with pytest.raises(psycopg.OperationalError, match="SCRAM channel binding negotiation error"):
                _connect(proxy, user, sslmode=sslmode)
            params = {"channel_binding": "disable"}
        else:
            params = {}
        with _connect(proxy, user, sslmode=sslmode, **params) as conn:
            assert conn.execute("select current_user").fetchone() == (user,)
            assert conn.pgconn.ssl_in_use is client_tls
            assert _upstream_ssl(conn) is (upstream_tls != "disable")


@pytest.mark.parametrize("client_tls", [False, True], ids=["client-plain", "client-tls"])
def test_channel_binding_require_fails(make_proxy, certs, client_tls):
    proxy = make_proxy(upstream_tls="require", **(_client_tls(certs) if client_tls else {}))
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        _connect(proxy, "scram_user", sslmode="require" if client_tls else "disable", channel_binding="require")


def _sasl_mechanisms(raw: RawConn) -> list[str]:
    raw.send_startup(user="scram_user")
    typ, body = raw.read_message()
    assert typ == "R" and struct.unpack_from("!I", body)[0] == 10, (typ, body)
    return [m.decode() for m in body[4:].split(b"\x00") if m]


def test_scram_plus_removed_from_the_offer(make_proxy, pg, certs):
    """Over TLS the server offers SCRAM-SHA-256-PLUS; through the proxy the client never sees it."""
    ctx = ssl.create_default_context(cafile=certs["ca"])
    with RawConn(pg.host, pg.port, tls=ctx) as raw:
        assert _sasl_mechanisms(raw) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    proxy = make_proxy(upstream_tls="require", **_client_tls(certs))
    with RawConn("127.0.0.1", proxy.port, tls=ctx) as raw:
        assert _sasl_mechanisms(raw) == ["SCRAM-SHA-256"]
    # And channel binding really works when there is no proxy in between.
    with psycopg.connect(pg.dsn("scram_user", sslmode="require", channel_binding="require"), connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


async def test_asyncpg_scram_over_both_tls_legs(make_proxy, certs):
    proxy = make_proxy(upstream_tls="verify-full", upstream_tls_ca=certs["ca"], **_client_tls(certs))
    ctx = ssl.create_default_context(cafile=certs["ca"])
    conn = await asyncpg.connect(host="localhost", port=proxy.port, user="scram_user", password=_password("scram_user"),
                                 database="postgres", ssl=ctx)
    try:
        assert await conn.fetchval("select current_user") == "scram_user"
        assert await conn.fetchval("select ssl from pg_stat_ssl where pid = pg_backend_pid()") is True
        assert conn.get_settings().server_version
    finally:
        await conn.close()


@pytest.mark.parametrize("user", ["scram_user", "md5_user", "password_user"])
async def test_wrong_password(make_proxy, user):
    proxy = make_proxy(upstream_tls="require")
    with pytest.raises(psycopg.OperationalError, match=f'password authentication failed for user "{user}"'):
        _connect(proxy, user, password="not-the-password")
    with pytest.raises(asyncpg.InvalidPasswordError) as exc:
        await asyncpg.connect(host="127.0.0.1", port=proxy.port, user=user, password="wrong", database="postgres",
                              ssl=False)
    assert exc.value.sqlstate == "28P01"
    # The proxy keeps serving.
    with _connect(proxy, user) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)


# --------------------------------------------------------------------------
# Channel binding end to end: the proxy presents the upstream's own certificate


def _upstream_certificate(certs) -> dict:
    """Client TLS with the certificate and key the fixture server itself presents."""
    return {"client_tls_cert": certs["server_cert"], "client_tls_key": certs["server_key"]}


def _psql(pg, proxy, user: str, **env_extra: str) -> subprocess.CompletedProcess:
    path = os.path.join(pg.bin_dir, "psql")
    psql = path if os.access(path, os.X_OK) else shutil.which("psql")
    if not psql:
        pytest.skip("psql not installed")
    # libpq's defaults: no PG* variable but the password (sslmode=prefer, channel_binding=prefer).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=_password(user) or "", PGCONNECT_TIMEOUT="10", **env_extra)
    # First line: the user and whether the upstream leg is TLS; then \conninfo, which names TLS on the client leg.
    return subprocess.run([psql, "-X", "-At", "-h", "localhost", "-p", str(proxy.port), "-U", user, "-d", "postgres",
                           "-c", "select current_user, (select ssl from pg_stat_ssl where pid = pg_backend_pid())",
                           "-c", "\\conninfo"],
                          env=env, capture_output=True, text=True, timeout=30)


def _pg8000(proxy, user: str, **kw) -> list:
    conn = pg8000.native.Connection(user, password=_password(user), host="localhost", port=proxy.port,
                                    database="postgres", timeout=10, **kw)
    try:
        return conn.run("select current_user, (select ssl from pg_stat_ssl where pid = pg_backend_pid())")
    finally:
        conn.close()


def test_scram_plus_passes_through_with_the_upstream_certificate(make_proxy, certs):
    ctx = ssl.create_default_context(cafile=certs["ca"])
    proxy = make_proxy(upstream_tls="verify-full", upstream_tls_ca=certs["ca"], **_upstream_certificate(certs))
    with RawConn("127.0.0.1", proxy.port, tls=ctx) as raw:
        assert _sasl_mechanisms(raw) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    # A plain client leg has nothing to bind to: the offer is filtered as before.
    with RawConn("127.0.0.1", proxy.port) as raw:
        assert _sasl_mechanisms(raw) == ["SCRAM-SHA-256"]


@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
def test_channel_binding_require_with_the_upstream_certificate(make_proxy, certs, sslmode):
    proxy = make_proxy(upstream_tls="verify-full", upstream_tls_ca=certs["ca"], **_upstream_certificate(certs))
    with _connect(proxy, "scram_user", host="localhost", sslmode=sslmode, sslrootcert=certs["ca"],
                  channel_binding="require") as conn:
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
        assert conn.pgconn.ssl_in_use and _upstream_ssl(conn)


def test_default_clients_bind_with_the_upstream_certificate(make_proxy, pg, certs):
    """psql, psycopg and pg8000 with their defaults, SCRAM, TLS on both legs."""
    proxy = make_proxy(upstream_tls="require", **_upstream_certificate(certs))
    with _connect(proxy, "scram_user", sslmode="prefer") as conn:  # libpq's default sslmode
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
        assert _upstream_ssl(conn)
    res = _psql(pg, proxy, "scram_user")
    assert res.returncode == 0, res.stderr
    first, conninfo = res.stdout.split("\n", 1)
    assert first == "scram_user|t" and "SSL connection" in conninfo
    assert _pg8000(proxy, "scram_user") == [["scram_user", True]]  # pg8000 binds by default over TLS
    tls = ssl.create_default_context(cafile=certs["ca"])
    assert _pg8000(proxy, "scram_user", ssl_context=tls) == [["scram_user", True]]


def test_default_clients_with_the_proxys_own_certificate(make_proxy, pg, certs):
    """Different certificates: over TLS to the proxy the GS2 flag "y" is refused (see "Channel binding")."""
    proxy = make_proxy(upstream_tls="require", **_client_tls(certs))
    with pytest.raises(psycopg.OperationalError, match="SCRAM channel binding negotiation error"):
        _connect(proxy, "scram_user", sslmode="require")
    # libpq's default sslmode=prefer retries the refused login without TLS: it gets in, in plain text.
    with _connect(proxy, "scram_user", sslmode="prefer") as conn:
        assert not conn.pgconn.ssl_in_use
    res = _psql(pg, proxy, "scram_user")
    assert res.returncode == 0, res.stderr
    assert "SSL connection" not in res.stdout
    with pytest.raises(pg8000.native.DatabaseError, match="SCRAM channel binding negotiation error"):
        _pg8000(proxy, "scram_user")
    # The ways out: channel_binding=disable, or no TLS on the client leg (a sidecar on localhost).
    res = _psql(pg, proxy, "scram_user", PGSSLMODE="require", PGCHANNELBINDING="disable")
    assert res.returncode == 0, res.stderr
    first, conninfo = res.stdout.split("\n", 1)
    assert first == "scram_user|t" and "SSL connection" in conninfo
    assert _pg8000(proxy, "scram_user", ssl_context=False) == [["scram_user", True]]


def _binding_warnings(caplog, make_proxy, **config) -> list[str]:
    caplog.set_level(logging.WARNING, logger="pgotel_proxy.proxy")
    proxy = make_proxy(**config)
    deadline = time.monotonic() + 10
    while proxy.server.binding_check == "pending":
        assert time.monotonic() < deadline, "the start-up certificate comparison never finished"
        time.sleep(0.02)
    return [r.getMessage() for r in caplog.records if "channel_binding=disable" in r.getMessage()]


def test_start_up_warning_when_the_certificates_differ(make_proxy, certs, caplog):
    (line,) = _binding_warnings(caplog, make_proxy, upstream_tls="require", **_client_tls(certs))
    assert "sidecar" in line and "SCRAM-SHA-256-PLUS" in line
    with _connect(make_proxy(upstream_tls="require", **_client_tls(certs)), "scram_user", sslmode="require",
                  channel_binding="disable") as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("config", ["same-certificate", "client-plain", "upstream-plain"])
def test_no_start_up_warning_when_binding_is_not_lost(make_proxy, certs, caplog, config):
    legs = {
        "same-certificate": {"upstream_tls": "require", **_upstream_certificate(certs)},
        "client-plain": {"upstream_tls": "require"},
        "upstream-plain": {"upstream_tls": "disable", **_client_tls(certs)},
    }[config]
    assert _binding_warnings(caplog, make_proxy, **legs) == []
