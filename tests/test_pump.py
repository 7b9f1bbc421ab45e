"""The compiled relay (``proxy/_pump.c``): of connections with nothing to observe, and of traced ones.

First the pump alone, on socket pairs: bytes arrive whole and in order in
both directions whatever the chunk sizes and however slowly a side reads
(backpressure: a side that does not read stops the other side's reading, the
pump keeps at most one read's worth), the end of a pair is reported with
its cause, and ``close`` / ``stop`` end pairs at once. Then the proxy: its
untraced sessions go to the pump after start-up, relay large results and
COPY both ways through real PostgreSQL, and end cleanly when the client
goes, when the backend goes, and at shutdown; TLS sessions stay on the
asyncio relay. Last, observed pairs (traced sessions): the log holds what was
relayed, in order, with receive times; a client chunk the codec would refuse
is not forwarded and the pair is handed back, as it is when the server ends;
the log's bound stops reading until it is taken; and through the proxy,
traced sessions are observed from the log, a traced COPY larger than the
bound arrives whole with its span, and garbage gets the proxy's 08P01. The
time the server's side waited for a client that did not read is logged after
the chunk the client could not take.
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
from pgotel_proxy.proxy.tls import COMPILED as COMPILED_TLS
from rawpg import RawConn, message
from waiting import wait_for

Pump = server_mod.Pump
pytestmark = pytest.mark.timeout(120)
needs_pump = pytest.mark.skipif(Pump is None, reason="compiled pump not built (or PGOTEL_PURE_PYTHON)")


def test_compiled_pump_is_built_where_ci_expects_it():
    # .ci/run sets this: a machine with a C compiler must not silently lose the pump.
    if os.environ.get("PGOTEL_EXPECT_COMPILED") and not os.environ.get("PGOTEL_PURE_PYTHON"):
        assert Pump is not None, "pgotel_proxy.proxy._pump was not built"
        assert COMPILED_TLS, "pgotel_proxy.proxy._tls was not built (TLS sessions would stay off the pump)"


class _Harness:
    """A Pump and its notify eventfd; pairs of connected sockets whose middle ends it relays."""

    def __init__(self, **pump_options) -> None:
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.pump = Pump(self.efd, **pump_options)
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
@pytest.mark.parametrize("legs", ["client", "upstream", "both"])
def test_tls_sessions_relay_on_the_pump(make_proxy, certs, legs):
    """A TLS session goes to the pump with its TLS connections, which decrypt and encrypt there."""
    if not COMPILED_TLS:
        pytest.skip("compiled TLS not built")
    config = {"tracing": False}
    if legs in ("client", "both"):
        config.update(client_tls_cert=certs["proxy_cert"], client_tls_key=certs["proxy_key"])
    if legs in ("upstream", "both"):
        config.update(upstream_tls="require")
    proxy = make_proxy(**config)
    sslmode = "require" if legs != "upstream" else "disable"
    with psycopg.connect(proxy.dsn(sslmode=sslmode), autocommit=True) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)
        (c,) = list(proxy.server.connections)
        _pumped(proxy)
        tls_client, tls_server = c.tls_legs
        assert (tls_client is not None) == (legs != "upstream") and (tls_server is not None) == (legs != "client")
        assert all(leg.lent for leg in c.tls_legs if leg is not None)
        ssl_in_use = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
        assert ssl_in_use == (legs != "client")
        # Large results both ways: records split across reads, the pump's buffers kept and drained.
        assert conn.execute("SELECT repeat('y', 3000000)").fetchone()[0] == "y" * 3000000
        big = "z" * 2_000_000
        assert conn.execute("SELECT length(%s::text)", (big,)).fetchone() == (2_000_000,)
    wait_for(lambda: not proxy.server.pumped, timeout=10, what="the pair to end")


# ---------------------------------------------------------------- observed pairs (traced sessions)

_HEAD = struct.Struct("=qiiq")
_BACK = struct.Struct("=iiiiIIII")


def _observed_pair(harness, max_message: int = 1 << 20):
    client, mid_a = socket.socketpair()
    mid_b, server = socket.socketpair()
    for s in (mid_a, mid_b):
        s.setblocking(False)
    pid = harness.pump.add(mid_a.detach(), mid_b.detach(), observe=True, max_message=max_message)
    return client, server, pid


def _entries(log: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(log):
        pid, kind, n, ts = _HEAD.unpack_from(log, pos)
        out.append((pid, kind, ts, log[pos + 24:pos + 24 + n]))
        pos += 24 + n
    assert pos == len(log)
    return out


def _log_until(harness, pred, timeout: float = 10.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while not pred(got):
        assert time.monotonic() < deadline, f"log never complete: {got[-3:]}"
        got += _entries(harness.pump.take_log())
        time.sleep(0.005)
    return got


@needs_pump
def test_an_observed_pair_logs_what_it_relays_in_order_with_receive_times(harness):
    client, server, pid = _observed_pair(harness)
    rnd = random.Random(3)
    stream = b"".join(message(b"Q", b"SELECT %d\x00" % i) for i in range(300))
    t0 = time.time_ns()
    pos = 0
    while pos < len(stream):  # cut anywhere, message heads included
        n = rnd.choice([1, 2, 3, 5, 17, 400])
        client.sendall(stream[pos:pos + n])
        pos += n
        answer = os.urandom(rnd.choice([1, 90, 3000]))  # server bytes are not framed by the pump
        server.sendall(answer)
        assert _recv_exactly(client, len(answer)) == answer
    assert _recv_exactly(server, len(stream)) == stream
    t1 = time.time_ns()
    log = _log_until(harness, lambda got: sum(len(e[3]) for e in got if e[1] == 0) >= len(stream))
    assert {e[0] for e in log} == {pid}
    assert b"".join(e[3] for e in log if e[1] == 0) == stream
    times = [e[2] for e in log]
    assert times == sorted(times) and t0 <= times[0] and times[-1] <= t1
    assert harness.pump.take_log() == b""  # taken once


@needs_pump
def test_an_observed_pair_logs_how_long_the_server_waited_on_the_client(harness):
    client, server, pid = _observed_pair(harness)
    data = os.urandom(4 << 20)  # far more than the client's socket holds
    sender = threading.Thread(target=server.sendall, args=(data,))
    sender.start()
    time.sleep(0.5)  # the client does not read: the pump stops reading the server
    reading = time.time_ns()
    assert _recv_exactly(client, len(data)) == data
    sender.join(10)
    log = _log_until(harness, lambda got: sum(len(e[3]) for e in got if e[1] == 1) == len(data))
    time.sleep(0.05)
    log += _entries(harness.pump.take_log())
    assert {e[1] for e in log} == {1, 3}
    waits = [(i, e[2], struct.unpack("=q", e[3])[0]) for i, e in enumerate(log) if e[1] == 3]
    # Each wait is logged when it ended, after the server chunk whose bytes the client could not take.
    for i, end, waited in waits:
        assert i > 0 and log[i - 1][1] == 1 and log[i - 1][2] <= end - waited and waited > 0
    assert waits[0][1] >= reading and waits[0][2] >= 0.4e9, waits[:3]
    assert sum(w for _, _, w in waits) < time.time_ns() - reading + 0.5e9
    # A client that keeps up: nothing but the chunks.
    for _ in range(50):
        server.sendall(b"x" * 3000)
        assert _recv_exactly(client, 3000) == b"x" * 3000
    log = _log_until(harness, lambda got: sum(len(e[3]) for e in got) == 50 * 3000)
    assert {e[1] for e in log} == {1}


@needs_pump
@pytest.mark.parametrize("bad", [b"\x01\x00\x00\x00\x05x", message(b"Q", b"x" * 70000), b"Q\x00\x00\x00\x02"],
                         ids=["type", "too-long", "too-short"])
def test_an_observed_pair_refuses_a_bad_client_chunk_and_hands_the_pair_back(harness, bad):
    client, server, pid = _observed_pair(harness, max_message=65536)
    good = message(b"Q", b"SELECT 1\x00")
    client.sendall(good)
    assert _recv_exactly(server, len(good)) == good
    client.sendall(good[:3])  # a head split between reads: framed across them
    time.sleep(0.05)
    client.sendall(good[3:] + bad)
    log = _log_until(harness, lambda got: any(e[1] == 2 for e in got))
    back = next(e for e in log if e[1] == 2)
    reason, err, fd_c, fd_s, n_chunk, n_srv, n_cli, _ = _BACK.unpack_from(back[3])
    assert reason == 1 and len(good) - 3 < n_chunk <= len(good) - 3 + len(bad)
    # the refused read, whole (at most the pump's 64 KiB chunk of what was sent)
    assert back[3][_BACK.size:_BACK.size + n_chunk] == (good[3:] + bad)[:n_chunk]
    # Nothing of the refused chunk went on (not even its good message), and the pump let go of the pair.
    server.settimeout(0.3)
    assert server.recv(100) == good[:3]
    with pytest.raises(socket.timeout):
        server.recv(100)
    assert harness.pump.live == 0 and harness.pump.take_closed() == []
    # The descriptors are the caller's now, still connected.
    os.write(fd_c, b"answer")
    assert _recv_exactly(client, 6) == b"answer"
    os.close(fd_c)
    os.close(fd_s)


@needs_pump
def test_an_observed_pair_is_handed_back_when_the_server_ends(harness):
    client, server, pid = _observed_pair(harness)
    server.sendall(b"last words")
    assert _recv_exactly(client, 10) == b"last words"
    server.close()
    log = _log_until(harness, lambda got: any(e[1] == 2 for e in got))
    assert [e[1] for e in log] == [1, 2] and log[0][3] == b"last words"
    reason, err, fd_c, fd_s, *_ = _BACK.unpack_from(log[1][3])
    assert reason == 2 and err == 0
    assert harness.pump.live == 0
    os.write(fd_c, b"08006")  # the client leg is still there for the proxy's own last word
    assert _recv_exactly(client, 5) == b"08006"
    os.close(fd_c)
    os.close(fd_s)


@needs_pump
def test_an_observed_pair_waits_for_its_log_to_be_taken():
    h = _Harness(log_limit=64 << 10)
    pump = h.pump
    try:
        client, server, pid = _observed_pair(h, max_message=8 << 20)
        data = message(b"d", os.urandom(4 << 20))  # one large COPY message
        sender = threading.Thread(target=client.sendall, args=(data,))
        sender.start()
        server.setblocking(False)
        got = bytearray()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # nobody takes the log: the relay stalls near its bound
            try:
                got += server.recv(1 << 20)
            except BlockingIOError:
                time.sleep(0.02)
        assert len(got) < 1 << 20, len(got)
        logged = bytearray()
        server.setblocking(True)
        server.settimeout(0.05)
        deadline = time.monotonic() + 20
        while len(got) < len(data):  # taking the log lets it go on, in steps
            assert time.monotonic() < deadline
            logged += b"".join(e[3] for e in _entries(pump.take_log()))
            try:
                got += server.recv(1 << 20)
            except socket.timeout:
                pass
        sender.join(10)
        logged += b"".join(e[3] for e in _entries(pump.take_log()))
        assert bytes(got) == data and bytes(logged) == data
    finally:
        h.close()


@needs_pump
def test_traced_sessions_go_to_the_pump_and_are_observed(make_proxy, otlp):
    proxy = make_proxy(sample_rate=1.0)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute(f"SELECT %s::int /*traceparent='{tp}'*/", (5,)).fetchone() == (5,)
        (c,) = _pumped(proxy)
        assert c.pump_observes and proxy.server.observed == 1
        big = conn.execute(f"SELECT repeat('z', 3000000) /*route='big',traceparent='{tp}'*/").fetchone()[0]
        assert big == "z" * 3000000
    wait_for(lambda: not proxy.server.pumped and proxy.server.observed == 0, timeout=10, what="the session to end")
    proxy.flush()
    spans = otlp.wait_for(lambda got: any(s.attributes.get("pgotel.sqlcommenter.route") == "big" for s in got))
    (stmt,) = [s for s in spans if s.attributes.get("pgotel.sqlcommenter.route") == "big"]
    assert stmt.attributes["db.response.returned_rows"] == 1
    assert {s.name for s in spans if s.parent_span_id == stmt.span_id} >= {"execute"}


@needs_pump
def test_a_traced_copy_larger_than_the_log_bound_is_observed_whole(make_proxy, otlp, monkeypatch):
    monkeypatch.setattr(server_mod, "PUMP_LOG_LIMIT", 64 << 10)
    proxy = make_proxy(sample_rate=1.0)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        (c,) = _pumped(proxy)
        assert c.pump_observes
        out = bytearray()
        with conn.cursor().copy(f"COPY (SELECT i, md5(i::text) FROM generate_series(1, 60000) i) TO STDOUT "
                                f"/*route='copy-out',traceparent='{tp}'*/") as copy:
            for chunk in copy:
                out += chunk
        assert out.count(b"\n") == 60000 and out.startswith(b"1\tc4ca4238a0b923820dcc509a6f75849b\n")
    proxy.flush()
    spans = otlp.wait_for(lambda got: any(s.attributes.get("pgotel.sqlcommenter.route") == "copy-out" for s in got))
    (stmt,) = [s for s in spans if s.attributes.get("pgotel.sqlcommenter.route") == "copy-out"]
    assert stmt.attributes["db.postgresql.command_tag"] == "COPY 60000"


@needs_pump
def test_garbage_from_a_traced_client_gets_the_proxys_08p01_and_never_reaches_postgres(make_proxy, pg):
    from pgotel_proxy.stats import STATS
    proxy = make_proxy(sample_rate=1.0)
    before = STATS.protocol_violations
    raw = RawConn("127.0.0.1", proxy.port, timeout=10)
    raw.startup(application_name="pump-garbage")
    assert [t for t, _ in raw.query("SELECT 1")] == ["T", "D", "C", "Z"]
    (c,) = _pumped(proxy)
    assert c.pump_observes
    raw.send(message(b"Q", b"SELECT 2\x00") + b"\x07garbage")  # a good message, then garbage, one write
    msgs = []
    with pytest.raises(ConnectionError):
        while True:
            msgs.append(raw.read_message())
    assert [t for t, _ in msgs] == ["E"], msgs  # not even SELECT 2 went on
    fields = dict((b[:1].decode(), b[1:].decode()) for b in msgs[0][1].split(b"\x00") if b)
    assert fields["C"] == "08P01" and "invalid frontend message type 7" in fields["M"]
    assert STATS.protocol_violations == before + 1
    wait_for(lambda: not proxy.server.connections and proxy.server.observed == 0, timeout=10, what="the session to end")
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:  # its backend was let go, cleanly
        wait_for(lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pump-garbage'")
                 .fetchone(), timeout=10, what="the backend to end")


@needs_pump
def test_a_failure_in_observing_a_pumped_session_stops_observation_not_the_relay(make_proxy, monkeypatch):
    from pgotel_proxy.protocol.session import Session
    from pgotel_proxy.proxy import connection as connection_mod
    from pgotel_proxy.stats import STATS

    class FailingSession(Session):
        """A session with a bug planted in its own method (the compiled Session's methods are fixed)."""

        def server_observe(self, data, now, start=0, stop=-1):
            if b"observer-bug" in data[start:stop]:
                raise RuntimeError("observer bug")
            return super().server_observe(data, now, start, stop)

    monkeypatch.setattr(connection_mod, "Session", FailingSession)
    proxy = make_proxy(sample_rate=1.0)
    before = STATS.decode_desyncs
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        (c,) = _pumped(proxy)
        assert c.pump_observes and c.observe
        assert conn.execute("SELECT 'observer-bug'").fetchone() == ("observer-bug",)
        proxy.flush()  # the log is read: observation fails on that answer
        assert not c.observe and STATS.decode_desyncs == before + 1
        assert c.session.out_of_sync
        for i in range(20):  # the session goes on, relayed, no longer observed
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        assert proxy.server.pumped.get(c.pump_id) is c


def _both_tls(certs) -> dict:
    return {"client_tls_cert": certs["proxy_cert"], "client_tls_key": certs["proxy_key"], "upstream_tls": "require"}


def _client_tls_context():
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@needs_pump
def test_garbage_over_tls_to_a_traced_pumped_session_gets_08p01_over_tls(make_proxy, pg, certs):
    """The pump hands a TLS pair back with its TLS connections: the proxy's 08P01 reaches the client encrypted."""
    if not COMPILED_TLS:
        pytest.skip("compiled TLS not built")
    proxy = make_proxy(sample_rate=1.0, **_both_tls(certs))
    raw = RawConn("127.0.0.1", proxy.port, timeout=10, tls=_client_tls_context())
    raw.startup(application_name="pump-tls-garbage")
    assert [t for t, _ in raw.query("SELECT 1")] == ["T", "D", "C", "Z"]
    (c,) = _pumped(proxy)
    assert c.pump_observes and all(leg is not None and leg.lent for leg in c.tls_legs)
    # A large good message first, so that records and reads do not line up, then garbage.
    raw.send(message(b"Q", b"SELECT length('" + b"q" * 200000 + b"')\x00"))
    assert [t for t, _ in raw.query("SELECT 2")][-1] == "Z"
    raw.send(message(b"Q", b"SELECT 3\x00") + b"\x07garbage")
    msgs = []
    with pytest.raises((ConnectionError, OSError)):
        while True:
            msgs.append(raw.read_message())
    assert [t for t, _ in msgs if t == "E"] == ["E"], msgs
    fields = dict((b[:1].decode(), b[1:].decode()) for b in [m for m in msgs if m[0] == "E"][0][1].split(b"\x00") if b)
    assert fields["C"] == "08P01" and "invalid frontend message type 7" in fields["M"]
    wait_for(lambda: not proxy.server.connections and proxy.server.observed == 0, timeout=10, what="the session to end")
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        wait_for(lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pump-tls-garbage'")
                 .fetchone(), timeout=10, what="the backend to end")


@needs_pump
@pytest.mark.parametrize("traced", [False, True])
def test_a_terminated_backend_reaches_a_tls_client(make_proxy, pg, certs, traced):
    if not COMPILED_TLS:
        pytest.skip("compiled TLS not built")
    config = {"sample_rate": 1.0} if traced else {"tracing": False}
    proxy = make_proxy(**config, **_both_tls(certs))
    with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        (c,) = _pumped(proxy)
        assert c.pump_observes == traced
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError, match="terminat"):  # Postgres' own FATAL, relayed
            conn.execute("SELECT 1")
    wait_for(lambda: not proxy.server.pumped and not proxy.server.connections, timeout=10, what="the pair to end")
