"""Security properties of a running proxy: TLS versions, secrets kept out of spans and logs, admin exposure.

* TLS towards clients: handshakes made with Python's ``ssl`` pinned to one
  protocol version. TLS 1.0/1.1 are refused (after checking that this
  machine's OpenSSL can speak them at all, so the refusal is the proxy's),
  1.2 and 1.3 accepted, and ``client_tls_min_version = "TLSv1.3"`` refuses
  1.2. Upstream ``verify-full`` against a CA that did not sign the server
  ends in a clear 08001 for the client.
* Secrets: a workload logging in with SCRAM, MD5 and cleartext passwords,
  carrying a secret literal in SQL and a secret bind parameter (also inside
  statements that fail with the value in PostgreSQL's error message), runs with
  the proxy logging at DEBUG and exporting to a real OTLP receiver. Every
  exported string (span names, attribute keys and values, status messages,
  events, links, resource) and every log record is searched: passwords, the
  MD5 response and the admin token never appear; the literal and the
  parameter appear only once capture is switched on.
* Admin: the default configuration binds 127.0.0.1, the listener really is
  unreachable from a non-loopback address, and ``check-config`` masks secrets.
  (The token and loopback rules of ``POST /tracing`` are tested in
  ``test_tracing_control.py``; SCRAM through every TLS combination, with the
  channel binding rules, in ``test_tls_auth.py``.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import ssl
import struct
import threading
import urllib.request
import warnings

import asyncpg
import pg8000.native
import psycopg
import pytest
from click.testing import CliRunner

from pgotel_proxy.cli import main as cli_main
from pgotel_proxy.config import load_config
from rawpg import RawConn, error_fields
from tracetree import random_traceparent, server_spans

pytestmark = pytest.mark.timeout(90)

_SSL_REQUEST = struct.pack("!II", 8, 80877103)


def _client_tls(certs) -> dict:
    return {"client_tls_cert": certs["proxy_cert"], "client_tls_key": certs["proxy_key"]}


def _context(version: ssl.TLSVersion, ca: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca:
        ctx.load_verify_locations(ca)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 on purpose
        ctx.minimum_version = version
        ctx.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def _handshake(port: int, ctx: ssl.SSLContext, ssl_request: bool = True) -> str:
    """TLS version negotiated with whatever listens on ``port`` (SSLRequest first for the proxy)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if ssl_request:
            sock.sendall(_SSL_REQUEST)
            assert sock.recv(1) == b"S"
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            return tls.version()


def _old_tls_possible(certs, version: ssl.TLSVersion) -> bool:
    """Can this machine's OpenSSL complete a handshake at ``version`` with a server that allows it?"""
    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv.load_cert_chain(certs["proxy_cert"], certs["proxy_key"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        srv.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        srv.set_ciphers("DEFAULT:@SECLEVEL=0")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            srv.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        return _handshake(listener.getsockname()[1], _context(version), ssl_request=False) is not None
    except (ssl.SSLError, OSError):
        return False
    finally:
        t.join(5)
        listener.close()


# --------------------------------------------------------------------------
# TLS


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"])
def test_client_tls_refuses_old_versions(make_proxy, certs, version):
    if not _old_tls_possible(certs, version):
        pytest.skip(f"this OpenSSL cannot speak {version.name} even when allowed")
    proxy = make_proxy(**_client_tls(certs))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(proxy.port, _context(version))
    # The proxy goes on serving modern clients.
    assert _handshake(proxy.port, _context(ssl.TLSVersion.TLSv1_2, certs["ca"])) == "TLSv1.2"


def test_client_tls_versions_accepted_and_min_13(make_proxy, certs):
    default = make_proxy(**_client_tls(certs))
    assert _handshake(default.port, _context(ssl.TLSVersion.TLSv1_2, certs["ca"])) == "TLSv1.2"
    assert _handshake(default.port, _context(ssl.TLSVersion.TLSv1_3, certs["ca"])) == "TLSv1.3"
    strict = make_proxy(client_tls_min_version="TLSv1.3", **_client_tls(certs))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(strict.port, _context(ssl.TLSVersion.TLSv1_2, certs["ca"]))
    assert _handshake(strict.port, _context(ssl.TLSVersion.TLSv1_3, certs["ca"])) == "TLSv1.3"


def test_upstream_verify_full_with_and_without_the_right_ca(make_proxy, pg, certs, tmp_path):
    from certs import make_certs

    good = make_proxy(upstream_tls="verify-full", upstream_tls_ca=certs["ca"], upstream_tls_server_name="localhost")
    with psycopg.connect(good.dsn(), autocommit=True) as conn:
        assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone() == (True,)
    other = make_certs(tmp_path / "other")
    bad = make_proxy(upstream_tls="verify-full", upstream_tls_ca=other["ca"], upstream_tls_server_name="localhost")
    with RawConn("127.0.0.1", bad.port) as raw:
        msgs = raw.startup()
    assert [t for t, _ in msgs] == ["E"]
    fields = error_fields(msgs[0][1])
    assert fields["S"] == "FATAL" and fields["C"] == "08001", fields
    assert f"{pg.host}:{pg.port}" in fields["M"] and "certificate" in fields["M"].lower(), fields["M"]


# --------------------------------------------------------------------------
# No secret in spans or logs

LITERAL = "s3cr3t-literal-value"
PARAM = "s3cr3t-param-value"
WRONG_PASSWORD = "wr0ng-s3cr3t-password"
TOKEN = "adm1n-t0ken-s3cr3t"
PASSWORDS = {"scram_user": "scram_pass", "md5_user": "md5_pass", "password_user": "password_pass"}


def _md5_response(user: str, password: str) -> str:
    # What an MD5 client sends (it works as a password for anyone who has it);
    # the salt varies, so check the salt-free inner hash.
    return hashlib.md5((password + user).encode()).hexdigest()


NEVER = [*PASSWORDS.values(), _md5_response("md5_user", "md5_pass"), WRONG_PASSWORD, TOKEN]


def _exported_strings(spans) -> list[str]:
    out = []
    for s in spans:
        out.append(s.name)
        out.append(s.status_message)
        for attrs in (s.attributes, s.resource, *(e.attributes for e in s.events), *(lk.attributes for lk in s.links)):
            for k, v in attrs.items():
                out.append(k)
                out.append(json.dumps(v) if not isinstance(v, str) else v)
        out.extend(e.name for e in s.events)
    return out


def _log_lines(records) -> list[str]:
    """Everything logged in the test process except by the client drivers (they are not the proxy)."""
    fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [fmt.format(r) for r in records if not r.name.startswith(("psycopg", "asyncpg", "pg8000"))]


async def _workload(proxy, marker) -> None:
    """Log in every way, use the secrets in SQL, and fail with them in error messages."""
    dsn = proxy.dsn(user="scram_user", password=PASSWORDS["scram_user"])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SELECT '{LITERAL}' AS v, 42")
        conn.execute("SELECT %s::text AS v", (PARAM,))
        conn.execute("SELECT %s::text AS v, 1", (PARAM,), prepare=True)
        conn.execute("CREATE TEMP TABLE sec (v text)")
        conn.cursor().executemany("INSERT INTO sec VALUES (%s)", [(PARAM,), (LITERAL,)])
        with conn.cursor().copy("COPY sec FROM STDIN") as copy:
            copy.write_row((PARAM,))
        conn.execute(f"LISTEN sec; NOTIFY sec, '{LITERAL}'")
        conn.execute(f"DO $$ BEGIN RAISE NOTICE '%', '{LITERAL}'; END $$")
        for sql, params in ((f"SELECT '{LITERAL}'::int", None), ("SELECT %s::int", (PARAM,)),
                            (f"SELECT 1 FROM sec WHERE v = '{LITERAL}' AND 1/0 = 1", None)):
            with pytest.raises(psycopg.Error) as exc:
                conn.execute(sql, params)
            assert LITERAL in str(exc.value) or PARAM in str(exc.value) or "division" in str(exc.value)
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="md5_user", password=PASSWORDS["md5_user"],
                                 database="postgres", ssl=False)
    try:
        assert await conn.fetchval("SELECT $1::text", PARAM) == PARAM
        assert await conn.fetchval(f"SELECT '{LITERAL}'::text") == LITERAL
        with pytest.raises(asyncpg.PostgresError):
            await conn.fetchval("SELECT $1::text::int", PARAM)
    finally:
        await conn.close()
    p8 = pg8000.native.Connection("password_user", host="127.0.0.1", port=proxy.port,
                                  password=PASSWORDS["password_user"], database="postgres")
    try:
        assert p8.run(f"SELECT '{LITERAL}' AS v, :p::text AS w", p=PARAM) == [[LITERAL, PARAM]]
    finally:
        p8.close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(user="scram_user", password=WRONG_PASSWORD))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"SELECT 'marker' /*traceparent='{marker.traceparent}'*/")


@pytest.mark.parametrize("capture", [False, True], ids=["default", "capture-on"])
async def test_no_credential_or_secret_in_spans_or_logs(make_proxy, otlp, caplog, capture):
    caplog.set_level(logging.DEBUG)  # every logger, the proxy's and the libraries' it uses
    opts = {"capture_parameters": True, "capture_query_literals": True} if capture else {}
    proxy = make_proxy(admin_token=TOKEN, upstream_tls="require", **opts)
    marker = random_traceparent()
    await _workload(proxy, marker)
    proxy.flush()
    otlp.wait_for(lambda s: server_spans(s, marker.trace_id), timeout=15)
    with urllib.request.urlopen(proxy.admin_url + "/status", timeout=5) as r1, \
            urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=5) as r2:
        admin_text = r1.read().decode() + r2.read().decode()

    spans = otlp.spans
    exported = _exported_strings(spans)
    logs = _log_lines(caplog.records)
    assert any(s.status_code == "ERROR" for s in server_spans(spans)), "the failing statements produced no spans"
    assert len(server_spans(spans)) >= 15
    assert any(r.levelno == logging.DEBUG for r in caplog.records), "nothing was logged at DEBUG"
    for secret in NEVER:
        assert not [x for x in exported if secret in x], f"{secret!r} exported"
        assert not [x for x in logs if secret in x], f"{secret!r} logged"
        assert secret not in admin_text
    for secret in (LITERAL, PARAM):
        leaked = [x for x in exported if secret in x]
        if capture:
            assert leaked, f"{secret!r} not captured although capture is on"
        else:
            assert not leaked, f"{secret!r} exported: {leaked[:3]}"
        # Logs never carry statement text or parameters, whatever the capture options.
        assert not [x for x in logs if secret in x], f"{secret!r} logged"
    if not capture:
        texts = [s.attributes.get("db.query.text", "") for s in server_spans(spans)]
        assert "SELECT ? AS v, ?" in texts and "SELECT $1::text AS v" in texts, texts


# --------------------------------------------------------------------------
# Admin listener exposure


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # picks the outgoing interface; sends nothing
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


def test_admin_and_proxy_default_to_loopback(make_proxy):
    defaults = load_config(None, env={}, overrides={})
    host, port = defaults.admin_address
    assert (host, port) == ("127.0.0.1", 9187)
    assert defaults.listen_address[0] == "127.0.0.1"
    assert defaults.admin_token is None
    # The default host with a free port: bound to loopback only, really unreachable from elsewhere.
    proxy = make_proxy(admin_listen=f"{host}:0")
    with urllib.request.urlopen(proxy.admin_url + "/healthz", timeout=5) as resp:
        assert resp.status == 200
    addr = _non_loopback_address()
    if addr is not None:
        with pytest.raises(OSError):
            socket.create_connection((addr, proxy.admin.port), timeout=2).close()


def test_check_config_masks_secrets():
    result = CliRunner().invoke(
        cli_main, ["check-config", "--admin-token", TOKEN, "--stats-dsn", f"host=db password={PASSWORDS['scram_user']}"],
        env={"PGOTEL_CONFIG": ""},
    )
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output and PASSWORDS["scram_user"] not in result.output
    assert "admin_token" in result.output and "stats_dsn" in result.output
