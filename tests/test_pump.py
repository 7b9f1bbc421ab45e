"""The compiled relay of connections with nothing to observe (``proxy/_pump.c``).

First the pump alone, on socket pairs: bytes arrive whole and in order in
both directions whatever the chunk sizes and however slowly a side reads
(backpressure: a side that does not read stops the other side's reading, the
pump keeps at most one read's worth), the end of a pair is reported with
its cause, and ``close`` / ``stop`` end pairs at once. Then the proxy: its
untraced sessions go to the pump after start-up, relay large results and
COPY both ways through real PostgreSQL, and end cleanly when the client
goes, when the backend goes, and at shutdown; TLS sessions stay on the
asyncio relay.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
import threading
import time

import psycopg
import pytest

from pgotel_proxy.proxy import server as server_mod
from rawpg import RawConn, message
from waiting import wait_for

Pump = server_mod.Pump
pytestmark = pytest.mark.timeout(120)
needs_pump = pytest.mark.skipif(Pump is None, reason="compiled pump not built (or PGOTEL_PURE_PYTHON)")


def test_compiled_pump_is_built_where_ci_expects_it():
    # .ci/run sets this: a machine with a C compiler must not silently lose the pump.
    if os.environ.get("PGOTEL_EXPECT_COMPILED") and not os.environ.get("PGOTEL_PURE_PYTHON"):
        assert Pump is not None, "pgotel_proxy.proxy._pump was not built"


class _Harness:
    """A Pump and its notify eventfd; pairs of connected sockets whose middle ends it relays."""

    def __init__(self) -> None:
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.pump = Pump(self.efd)
        self.ended: dict[int, int] = {}

    def pair(self, rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket, int]:
        """(left, right, id): what left sends arrives at right and back, through the pump."""
        left, mid_a = socket.socketpair()
        mid_b, right = socket.socketpair()
        for s in (left, right, mid_a, mid_b):
            if rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
        for s in (mid_a, mid_b):
            s.setblocking(False)
        pid = self.pump.add(mid_a.detach(), mid_b.detach())
        return left, right, pid

    def wait_ended(self, pid: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while pid not in self.ended:
            assert time.monotonic() < deadline, f"pair {pid} not reported ended"
            select.select([self.efd], [], [], 0.1)
            try:
                os.eventfd_read(self.efd)
            except BlockingIOError:
                pass
            self.ended.update(self.pump.take_closed())
        return self.ended[pid]

    def close(self) -> None:
        self.pump.stop()
        os.close(self.efd)


@pytest.fixture
def harness():
    h = _Harness()
    yield h
    h.close()


def _recv_exactly(sock: socket.socket, n: int, timeout: float = 20.0) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(1 << 20, n - len(out)))
        assert chunk, f"end of input after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


@needs_pump
def test_bytes_arrive_whole_and_in_order_both_ways(harness):
    rnd = random.Random(7)
    left, right, pid = harness.pair(rcvbuf=8192)  # small socket buffers: many partial sends
    sent = {0: bytearray(), 1: bytearray()}
    got = {0: bytearray(), 1: bytearray()}
    ends = (left, right)
    errors: list[BaseException] = []

    def reader(side: int, total: int) -> None:
        try:
            sock = ends[1 - side]
            sock.settimeout(20)
            while len(got[side]) < total:
                if rnd.random() < 0.05:
                    time.sleep(0.01)  # a slow reader now and then: the pump must hold back
                chunk = sock.recv(rnd.choice([1, 100, 5000, 70000]))
                assert chunk
                got[side] += chunk
        except BaseException as exc:  # reported below
            errors.append(exc)

    for side in (0, 1):
        for _ in range(200):
            sent[side] += rnd.randbytes(rnd.choice([1, 7, 300, 4096, 65536, 200000]))
    threads = [threading.Thread(target=reader, args=(side, len(sent[side]))) for side in (0, 1)]
    for t in threads:
        t.start()
    for side in (0, 1):
        ends[side].sendall(sent[side])
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert got[0] == sent[0] and got[1] == sent[1]
    assert harness.pump.live == 1
    left.close()
    assert harness.wait_ended(pid) == 0  # an end of input
    right.settimeout(5)
    assert right.recv(10) == b""  # ... passed on: the other socket was closed
    assert harness.pump.live == 0


@needs_pump
def test_a_side_that_does_not_read_stops_the_other_sides_reading(harness):
    left, right, pid = harness.pair(rcvbuf=16384)
    left.setblocking(False)
    pushed = 0
    block = b"x" * 65536
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # right never reads: left's writes must stall
        try:
            pushed += left.send(block)
        except BlockingIOError:
            time.sleep(0.05)
            try:
                pushed += left.send(block)
            except BlockingIOError:
                break
    else:
        pytest.fail(f"{pushed} bytes went in and the sender never stalled")
    # What stalled is what the sockets hold and one read the pump keeps: far less than was offered.
    assert pushed < 4 << 20, pushed
    left.setblocking(True)
    assert _recv_exactly(right, pushed) == (block * (pushed // len(block) + 1))[:pushed]


@needs_pump
def test_end_of_input_is_passed_on_after_what_was_kept(harness):
    left, right, pid = harness.pair(rcvbuf=8192)
    data = os.urandom(3 << 20)
    t = threading.Thread(target=lambda: (left.sendall(data), left.close()))
    t.start()
    time.sleep(0.3)  # left has finished and closed while most of it still waits in the pump and sockets
    assert _recv_exactly(right, len(data)) == data
    t.join(10)
    right.settimeout(5)
    assert right.recv(1) == b""
    assert harness.wait_ended(pid) == 0


@needs_pump
def test_a_reset_ends_the_pair_with_its_error(harness):
    left, right, pid = harness.pair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    left.sendall(b"hello")
    assert _recv_exactly(right, 5) == b"hello"
    left.close()  # a Unix socket pair has no reset: its end of input
    err = harness.wait_ended(pid)
    assert err in (0, errno.ECONNRESET)  # end of input, or a reset
    right.settimeout(5)
    assert right.recv(1) == b""


@needs_pump
def test_close_and_stop_end_pairs_at_once(harness):
    a_left, a_right, a = harness.pair()
    b_left, b_right, b = harness.pair()
    harness.pump.close(a)
    assert harness.wait_ended(a) == errno.ECONNABORTED  # closed on request
    a_right.settimeout(5)
    assert a_right.recv(1) == b""
    b_left.sendall(b"still")
    assert _recv_exactly(b_right, 5) == b"still"  # the other pair is untouched
    harness.pump.close(-1)  # every pair
    assert harness.wait_ended(b) == errno.ECONNABORTED
    assert harness.pump.live == 0
    c_left, c_right, c = harness.pair()
    harness.pump.stop()
    c_right.settimeout(5)
    assert c_right.recv(1) == b""
    r, w = os.pipe()
    with pytest.raises(RuntimeError):
        harness.pump.add(r, w)
    os.close(r)
    os.close(w)


@needs_pump
def test_a_stop_right_after_an_add_closes_that_pair_too():
    """The add may still wait in the command queue when the thread ends: it is closed and reported all the same."""
    for _ in range(20):
        h = _Harness()
        try:
            others = [h.pair() for _ in range(20)]
            for _ in range(3000):  # keep the thread busy with commands while the add and the stop come
                h.pump.close(1 << 40)
            left, right, pid = h.pair()
            h.pump.stop()
            for _, other_right, _ in others:
                other_right.settimeout(5)
                assert other_right.recv(1) == b""
            right.settimeout(5)
            assert right.recv(1) == b""
            assert h.wait_ended(pid) == errno.ECONNABORTED
            assert h.pump.live == 0
            r, w = os.pipe()
            with pytest.raises(RuntimeError):
                h.pump.add(r, w)  # nothing would relay it: refused, the descriptors stay the caller's
            os.close(r)
            os.close(w)
        finally:
            h.close()


# --------------------------------------------------------------------------- the proxy


def _pumped(proxy, n: int = 1) -> list:
    def found() -> list | None:
        conns = [c for c in list(proxy.server.connections) if c.pump_id is not None]
        return conns if len(conns) >= n else None

    return wait_for(found, timeout=10, what="sessions handed to the pump")


@needs_pump
def test_untraced_sessions_go_to_the_pump_and_relay_whole_results(make_proxy, pg):
    proxy = make_proxy(tracing=False)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        (c,) = _pumped(proxy)
        assert proxy.server.pumped[c.pump_id] is c
        assert c.client.is_closing() and c.upstream.is_closing()  # the transports gave their sockets up
        big = conn.execute("SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400000) i").fetchone()[0]
        assert len(big) == 32 * 400000 and big.startswith("c4ca4238a0b923820dcc509a6f75849b")
        conn.execute("CREATE TEMP TABLE pumped (id int, v text)")
        rows = [(i, os.urandom(40).hex()) for i in range(50000)]
        with conn.cursor().copy("COPY pumped FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        back = conn.execute("SELECT id, v FROM pumped ORDER BY id").fetchall()
        assert back == rows
        backend = conn.info.backend_pid
    # The client left: the pump reports it, the session ends, the backend is gone.
    wait_for(lambda: not proxy.server.connections and not proxy.server.pumped, timeout=10, what="the session to end")
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        wait_for(lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)).fetchone(),
                 timeout=10, what="the backend to end")


@needs_pump
def test_many_sessions_at_once(make_proxy):
    proxy = make_proxy(tracing=False)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
                for j in range(50):
                    assert conn.execute("SELECT %s::int * 1000 + %s::int", (i, j)).fetchone() == (i * 1000 + j,)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    wait_for(lambda: not proxy.server.pumped, timeout=10, what="every pumped session to end")


@needs_pump
def test_a_terminated_backend_reaches_the_client(make_proxy, pg):
    proxy = make_proxy(tracing=False)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        _pumped(proxy)
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError, match="terminat"):  # Postgres' own FATAL, relayed
            conn.execute("SELECT 1")
    wait_for(lambda: not proxy.server.pumped, timeout=10, what="the pair to end")


@needs_pump
def test_a_client_that_vanishes_mid_result_ends_its_backend(make_proxy, pg):
    proxy = make_proxy(tracing=False)
    raw = RawConn("127.0.0.1", proxy.port, timeout=30)
    raw.startup(application_name="pump-vanish")
    _pumped(proxy)
    raw.send(message(b"Q", b"SELECT repeat('x', 1000) FROM generate_series(1, 1000000)\x00"))
    raw.sock.recv(1000)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.sock.close()  # a reset in the middle of the result
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        wait_for(lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pump-vanish'").fetchone(),
                 timeout=20, what="the backend to end")
    wait_for(lambda: not proxy.server.pumped, timeout=10, what="the pair to end")


@needs_pump
def test_shutdown_closes_pumped_sessions(make_proxy):
    proxy = make_proxy(tracing=False)
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        conn.execute("SELECT 1")
        _pumped(proxy)
        proxy.call(proxy.server.drain(0.2))  # what stop() and SIGTERM do first
        assert not proxy.server.connections and not proxy.server.pumped
        assert proxy.server._pump is None  # its thread ended
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()


@needs_pump
def test_tls_sessions_stay_on_the_asyncio_relay(make_proxy, certs):
    proxy = make_proxy(tracing=False, client_tls_cert=certs["proxy_cert"], client_tls_key=certs["proxy_key"])
    with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)
        (c,) = list(proxy.server.connections)
        assert c.pump_id is None and not proxy.server.pumped
        assert conn.execute("SELECT repeat('y', 300000)").fetchone()[0] == "y" * 300000
