"""Faults and bad input against a real proxy and a real PostgreSQL, over real sockets.

Covers what a client or the network can do wrong: garbage after login, bad
start-up packets, an upstream that refuses or dies (politely with FATAL, or
abruptly with a TCP reset from a small forwarding proxy we can cut), clients
that vanish mid-COPY or holding a lock, drain on SIGTERM / SIGINT of the real
CLI, the connection limit, and CancelRequests with keys the proxy never issued.

Raw-socket helpers here speak just enough of the protocol to send exactly the
bytes a test needs, as the trust role ``postgres`` (no password exchange).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest

from pgotel_proxy.stats import STATS
from waiting import free_port, wait_accepting, wait_for
from rawpg import error_fields as _fields, message as _msg, startup_packet

# ---------------------------------------------------------------------------
# raw protocol helpers








class Raw:
    """A blocking protocol-3 connection for tests that need exact bytes."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.pid: int | None = None
        self.key: bytes | None = None

    def login(self, **params: str) -> "Raw":
        self.sock.sendall(startup_packet(**params))
        for typ, body in self.until_ready():
            if typ == "E":
                raise AssertionError(f"start-up failed: {_fields(body)}")
        return self

    def read(self) -> tuple[str, bytes]:
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack_from("!I", self.buf, 1)[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; buffered {self.buf[:40]!r}")
            self.buf += chunk
        n = 1 + struct.unpack_from("!I", self.buf, 1)[0]
        typ, body, self.buf = chr(self.buf[0]), self.buf[5:n], self.buf[n:]
        if typ == "K":
            self.pid, self.key = struct.unpack_from("!I", body)[0], body[4:]
        return typ, body

    def until_ready(self) -> list[tuple[str, bytes]]:
        got = []
        while True:
            typ, body = self.read()
            got.append((typ, body))
            if typ == "Z" or (typ == "E" and _fields(body).get("V") == "FATAL" and self.pid is None):
                return got

    def query(self, sql: str) -> list[tuple[str, bytes]]:
        self.sock.sendall(_msg(b"Q", sql.encode() + b"\x00"))
        return self.until_ready()

    def rest(self, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        """Every message until the peer closes; fails if it stays open past ``timeout``."""
        self.sock.settimeout(timeout)
        got = []
        while True:
            try:
                got.append(self.read())
            except EOFError:
                return got

    def reset(self) -> None:
        """Vanish abruptly: close with a TCP reset."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        try:
            self.sock.sendall(_msg(b"X"))
        except OSError:
            pass
        self.sock.close()


def errors(messages) -> list[dict[str, str]]:
    return [_fields(body) for typ, body in messages if typ == "E"]


def startup_error(port: int, packet: bytes | None = None) -> dict[str, str]:
    """The FATAL a server answers a start-up with (raw, so the SQLSTATE is visible)."""
    r = Raw(port)
    r.sock.sendall(packet if packet is not None else startup_packet())
    msgs = r.rest()
    r.sock.close()
    errs = errors(msgs)
    assert errs, msgs
    return errs[0]






def backends(pg, app: str) -> int:
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        return c.execute("select count(*) from pg_stat_activity where application_name = %s", (app,)).fetchone()[0]


class FaultProxy:
    """A TCP forwarder between pgotel-proxy and Postgres that can be cut with a reset."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            b = socket.create_connection(self.upstream)
            self.pairs.append((a, b))
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        socks = [a, b]
        try:
            while True:
                ready, _, _ = select.select(socks, [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            return

    def cut(self) -> None:
        """Reset every connection on both sides, as a dying host or firewall would."""
        for a, b in self.pairs:
            for s in (a, b):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.lsock.close()
        self.cut()


# ---------------------------------------------------------------------------
# bad input after login


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x01\x00\x00\x00\x08abcd", id="bad-type"),
        pytest.param(b"Q" + struct.pack("!i", -16), id="negative-length"),
        pytest.param(b"Q" + struct.pack("!i", 2), id="length-below-4"),
        pytest.param(b"Q" + struct.pack("!i", 0x7FFFFFFF), id="absurd-length"),
        pytest.param(b"Q" + struct.pack("!i", (1 << 20) + 100) + b"select '" + b"x" * 65536, id="over-max-message-size"),
    ],
)
def test_client_garbage_after_login(make_proxy, caplog, garbage):
    proxy = make_proxy(max_message_size=1 << 20)
    caplog.set_level(logging.INFO, logger="pgotel_proxy.proxy")
    other = Raw(proxy.port).login(application_name="bystander")
    bad = Raw(proxy.port).login(application_name="garbage")
    assert bad.query("select 1")[-1][0] == "Z"
    before = STATS.protocol_violations
    other.sock.sendall(_msg(b"Q", b"select pg_sleep(0.3), 42\x00"))  # in flight meanwhile
    bad.sock.sendall(garbage)
    msgs = bad.rest(timeout=5)
    assert [e["C"] for e in errors(msgs)] == ["08P01"]
    assert msgs[-1][0] == "E"  # and then the connection closed
    bad.sock.close()
    assert STATS.protocol_violations == before + 1
    lines = [r for r in caplog.records if r.name == "pgotel_proxy.proxy" and "protocol violation" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    # The bystander's query finishes and its session goes on.
    assert any(t == "D" and b"42" in b for t, b in other.until_ready())
    assert any(t == "D" for t, _ in other.query("select 2"))
    other.close()


@pytest.mark.parametrize(
    "packet,sqlstate",
    [
        pytest.param(struct.pack("!I", 20000) + b"\x00\x03\x00\x00" + b"x" * 100, "08P01", id="oversized"),
        pytest.param(struct.pack("!I", 4), "08P01", id="too-short"),
        pytest.param(struct.pack("!II", 16, 2 << 16) + b"user\x00x\x00\x00\x00", "0A000", id="protocol-2"),
        pytest.param(startup_packet()[:-1] + b"x", "08P01", id="no-terminator"),
    ],
)
def test_bad_startup_packet(proxy, packet, sqlstate):
    other = Raw(proxy.port).login()
    err = startup_error(proxy.port, packet)
    assert err["C"] == sqlstate and err["M"]
    assert any(t == "D" for t, _ in other.query("select 1"))
    other.close()


def test_truncated_startup_packet_is_closed(proxy):
    other = Raw(proxy.port).login()
    r = Raw(proxy.port)
    r.sock.sendall(startup_packet()[:12])
    r.sock.shutdown(socket.SHUT_WR)
    t0 = time.monotonic()
    assert r.rest(timeout=3) == []  # closed without a reply: the client is gone anyway
    assert time.monotonic() - t0 < 3
    r.sock.close()
    assert any(t == "D" for t, _ in other.query("select 1"))
    other.close()


# ---------------------------------------------------------------------------
# upstream faults


def test_upstream_refuses(make_proxy):
    port = free_port()  # nothing listens there
    proxy = make_proxy(upstream=f"127.0.0.1:{port}")
    before = STATS.upstream_errors
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(), connect_timeout=5)
    assert f"127.0.0.1:{port}" in str(info.value)
    # libpq keeps no result for start-up failures, so the SQLSTATE is read off the wire.
    err = startup_error(proxy.port)
    assert err["C"] == "08001" and f"127.0.0.1:{port}" in err["M"], err
    assert STATS.upstream_errors >= before + 2


@pytest.mark.parametrize("pumped", [False, True], ids=["asyncio", "pump"])
def test_backend_terminated_mid_query(pg, make_proxy, pumped):
    proxy = make_proxy()
    if not pumped:
        proxy.server._pump_failed = True  # the asyncio relay (as on TLS, or without the compiled pump)
    app = f"term-{uuid.uuid4().hex[:8]}"
    r = Raw(proxy.port).login(application_name=app)
    r.sock.sendall(_msg(b"Q", b"select pg_sleep(30)\x00"))
    with psycopg.connect(pg.dsn(), autocommit=True) as side:
        wait_for(lambda: side.execute(
            "select count(*) from pg_stat_activity where application_name = %s and state = 'active'", (app,)).fetchone()[0],
            what="the query to start")
        t0 = time.monotonic()
        side.execute("select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s", (app,))
    msgs = r.rest(timeout=5)
    assert time.monotonic() - t0 < 3
    # Postgres' own FATAL reaches the client, and nothing of the proxy's after it.
    assert [e["C"] for e in errors(msgs)] == ["57P01"]
    r.sock.close()
    wait_for(lambda: proxy.server.active == 0, what="connection count back to 0")


def test_backend_terminated_psycopg(pg, proxy):
    app = f"term-{uuid.uuid4().hex[:8]}"
    conn = psycopg.connect(proxy.dsn(application_name=app), autocommit=True)
    side = psycopg.connect(pg.dsn(), autocommit=True)

    def kill():
        wait_for(lambda: side.execute(
            "select count(*) from pg_stat_activity where application_name = %s and state = 'active'", (app,)).fetchone()[0])
        side.execute("select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s", (app,))

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("select pg_sleep(30)")
    assert time.monotonic() - t0 < 5
    assert info.value.sqlstate == "57P01"
    conn.close()
    # The FATAL may reach the client before pg_terminate_backend's own answer reaches
    # the killer: its connection closes only once that statement is done.
    killer.join(10)
    side.close()


@pytest.mark.parametrize("pumped", [False, True], ids=["asyncio", "pump"])
def test_upstream_reset_mid_query(pg, make_proxy, pumped):
    fault = FaultProxy((pg.host, pg.port))
    app = f"rst-{uuid.uuid4().hex[:8]}"
    try:
        proxy = make_proxy(upstream=f"127.0.0.1:{fault.port}")
        if not pumped:
            proxy.server._pump_failed = True
        conn = psycopg.connect(proxy.dsn(application_name=app), autocommit=True)
        assert conn.execute("select 1").fetchone() == (1,)
        threading.Timer(0.3, fault.cut).start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select pg_sleep(20)")
        assert time.monotonic() - t0 < 3
        assert info.value.sqlstate == "08006", str(info.value)
        conn.close()
        wait_for(lambda: proxy.server.active == 0 and not proxy.server.connections, what="no connections left")
    finally:
        fault.close()
        with psycopg.connect(pg.dsn(), autocommit=True) as side:
            side.execute("select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s", (app,))


# ---------------------------------------------------------------------------
# clients that vanish


def test_client_vanishes_mid_copy(pg, proxy):
    table = f"fault_copy_{uuid.uuid4().hex[:8]}"
    app = f"copy-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn(), autocommit=True) as side:
        side.execute(f"create table {table} (id int, t text)")
        r = Raw(proxy.port).login(application_name=app)
        r.sock.sendall(_msg(b"Q", f"copy {table} from stdin".encode() + b"\x00"))
        assert r.read()[0] == "G"
        r.sock.sendall(b"".join(_msg(b"d", f"{i}\tx\n".encode()) for i in range(1000)))
        time.sleep(0.1)
        assert backends(pg, app) == 1
        r.reset()
        wait_for(lambda: backends(pg, app) == 0, timeout=3, what="the backend to end")
        locks = side.execute(
            "select count(*) from pg_locks l join pg_class c on c.oid = l.relation where c.relname = %s", (table,)
        ).fetchone()[0]
        assert locks == 0
        assert side.execute(f"select count(*) from {table}").fetchone()[0] == 0
        side.execute(f"drop table {table}")


def test_client_vanishes_holding_row_lock(pg, proxy):
    table = f"fault_lock_{uuid.uuid4().hex[:8]}"
    app = f"lock-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn(), autocommit=True) as side:
        side.execute(f"create table {table} (id int primary key, v int)")
        side.execute(f"insert into {table} values (1, 0)")
        r = Raw(proxy.port).login(application_name=app)
        r.query(f"begin; select * from {table} where id = 1 for update")
        side.execute("set lock_timeout = '100ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            side.execute(f"update {table} set v = 1 where id = 1")
        r.reset()
        wait_for(lambda: backends(pg, app) == 0, timeout=3, what="the backend to end")
        side.execute("set lock_timeout = '2s'")
        assert side.execute(f"update {table} set v = 2 where id = 1").rowcount == 1
        side.execute(f"drop table {table}")


# ---------------------------------------------------------------------------
# drain, limits, cancel


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_then_exits(pg, sig):
    port = free_port()
    cmd = [
        sys.executable, "-m", "pgotel_proxy", "run",
        "--listen", f"127.0.0.1:{port}", "--upstream", f"{pg.host}:{pg.port}", "--upstream-tls", "disable",
        "--drain-timeout", "2", "--no-tracing", "--admin-listen", "",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGOTEL_")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable connect_timeout=2"

        wait_accepting(dsn, proc)
        conn = psycopg.connect(dsn)  # not autocommit: the session sits in a transaction
        assert conn.execute("select 1").fetchone() == (1,)
        t0 = time.monotonic()
        proc.send_signal(sig)
        # New connections are refused at once ...
        wait_for(lambda: _refused(port), timeout=1, what="the listener to close")
        # ... while the open session keeps working until the drain time is over ...
        assert conn.execute("select 2").fetchone() == (2,)
        time.sleep(0.5)
        assert conn.execute("select 3").fetchone() == (3,)
        # ... then it is closed and the process exits 0.
        code = proc.wait(timeout=2 + 5)
        assert code == 0, proc.stderr.read()
        assert time.monotonic() - t0 >= 1.9
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 4")
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return False
    except OSError:
        return True


def test_max_connections(make_proxy):
    proxy = make_proxy(max_connections=2)
    a = psycopg.connect(proxy.dsn())
    b = psycopg.connect(proxy.dsn())
    before = STATS.connections_refused
    err = startup_error(proxy.port)
    assert err["C"] == "53300", err
    with pytest.raises(psycopg.OperationalError, match="too many clients"):
        psycopg.connect(proxy.dsn())
    assert STATS.connections_refused == before + 2
    assert a.execute("select 1").fetchone() == (1,) and b.execute("select 1").fetchone() == (1,)
    a.close()
    wait_for(lambda: proxy.server.active < 2, what="a slot to free")
    psycopg.connect(proxy.dsn()).close()
    b.close()


def test_cancel_with_unknown_key_is_dropped(proxy):
    r = Raw(proxy.port).login()
    assert r.pid is not None and r.key is not None
    before = STATS.cancel_dropped
    r.sock.sendall(_msg(b"Q", b"select pg_sleep(0.8), 'done'\x00"))
    time.sleep(0.2)
    wrong = bytes(b ^ 0xFF for b in r.key)
    c = socket.create_connection(("127.0.0.1", proxy.port))
    c.sendall(struct.pack("!III", 12 + len(wrong), 80877102, r.pid) + wrong)
    c.settimeout(3)
    assert c.recv(100) == b""  # closed without an answer, as Postgres does
    c.close()
    msgs = r.until_ready()
    assert errors(msgs) == []  # not cancelled
    assert any(t == "D" and b"done" in b for t, b in msgs)
    assert STATS.cancel_dropped == before + 1
    r.close()
