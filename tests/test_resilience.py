"""Resilience under real faults: the proxy must never be the reason a query failed.

This module owns the fault scenarios that need a real process, a real server
or real resource limits rather than bad bytes (those live in ``test_faults``):

* a sick collector (down, slow, answering errors, blackholed): the relay's
  throughput and tail latency stay close to a healthy run measured in the same
  test, spans are dropped and counted, memory stays flat, shutdown keeps its
  deadline;
* PostgreSQL restarted under load: clear errors during the outage, new
  sessions once it is back, ``/readyz`` following, no proxy restart;
* a client that stops reading a huge result: bounded proxy memory,
  backpressure reaching the backend (``ClientWrite``), neighbours unaffected;
* thousands of connections against ``max_connections`` and against the
  process's file-descriptor limit: every refusal is an ErrorResponse 53300;
* client certificates replaced and reloaded on SIGHUP without dropping sessions.

Comparisons are ratios between runs in the same test, never absolute timings,
because the suite shares a small machine with other work.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import psycopg
import pytest

from pgotel_proxy.stats import STATS
from waiting import free_port as _free_port, wait_for as _wait_for
from rawpg import error_fields as _fields, message as _msg, startup_packet as _startup

# ---------------------------------------------------------------------------
# helpers








def _rss() -> int:
    """Resident set size of this process (the in-process proxy lives here), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")




def _p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]




def _backend_count(pg, app: str) -> int:
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        return c.execute("select count(*) from pg_stat_activity where application_name = %s", (app,)).fetchone()[0]


class _Cli:
    """The real ``pgotel-proxy run`` as a child process (for signals and resource limits)."""

    def __init__(self, args: list[str], nofile: int | None = None) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "pgotel_proxy", "run", "--listen", f"127.0.0.1:{self.port}", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGOTEL_", "OTEL_"))}

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=limits)
        self._err: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited: {self.stderr}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        _wait_for(up, timeout=20, what="the proxy to listen", interval=0.05)

    def _collect(self) -> None:
        for line in self.proc.stderr:
            self._err.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------
# a sick collector


def _workload(proxy, threads: int = 4, per_thread: int = 500) -> tuple[float, list[float]]:
    """Statements per second and per-statement latencies of ``threads`` psycopg sessions."""
    conns = [psycopg.connect(proxy.dsn(), autocommit=True) for _ in range(threads)]
    latencies: list[list[float]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []
    start = threading.Barrier(threads + 1)

    def run(conn, out: list[float]) -> None:
        try:
            start.wait()
            for _ in range(per_thread):
                t0 = time.perf_counter()
                conn.execute("SELECT 1")
                out.append(time.perf_counter() - t0)
        except BaseException as exc:  # reported below
            failures.append(exc)

    workers = [threading.Thread(target=run, args=(c, out)) for c, out in zip(conns, latencies)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join(120)
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    assert not failures, failures
    return threads * per_thread / elapsed, [x for out in latencies for x in out]


@pytest.mark.slow
@pytest.mark.parametrize("sickness", ["down", "slow", "error", "blackhole"])
def test_sick_collector(make_proxy, otlp, sickness):
    export_timeout, shutdown_timeout = 2.0, 1.0
    proxy = make_proxy(sample_rate=1.0, span_queue_size=2000, export_batch_size=200,
                       export_timeout=export_timeout, shutdown_timeout=shutdown_timeout)
    _workload(proxy, 2, 100)  # warm up: connections, caches, the exporter's session
    healthy, healthy_lat = _workload(proxy)
    proxy.flush()
    assert STATS.spans_exported > 0 and otlp.spans

    if sickness == "down":
        otlp.stop()
    else:
        otlp.delay = 5.0
        otlp.mode = sickness
    dropped = STATS.spans_dropped + STATS.statements_dropped
    sick, sick_lat = _workload(proxy)
    assert proxy.tracer._child_queue <= 2000  # the span process's export queue, as it last reported
    assert sick >= 0.6 * healthy, f"healthy {healthy:.0f}/s, sick collector ({sickness}) {sick:.0f}/s"
    p99_healthy, p99_sick = _p(healthy_lat, 0.99), _p(sick_lat, 0.99)
    assert p99_sick <= 3 * p99_healthy + 0.005, f"p99 healthy {p99_healthy * 1e3:.2f} ms, sick {p99_sick * 1e3:.2f} ms"

    # Memory stays flat while the collector stays sick: the queue is full and stays bounded.
    rss = _rss()
    for _ in range(3):
        _workload(proxy, 4, 500)
    grown = _rss() - rss
    assert grown < 30 << 20, f"RSS grew {grown >> 20} MB over 6000 statements with a sick collector"
    assert proxy.tracer._child_queue <= 2000
    assert proxy.tracer.queue_size_now() <= 2000 + 2000  # records not yet handed over, spans waiting
    # What found no room was dropped and counted: spans, or statements once the span process,
    # waiting for room in the export queue, let the relay's buffer for it fill.
    _wait_for(lambda: STATS.spans_dropped + STATS.statements_dropped > dropped, timeout=10,
              what="the spans a sick collector loses to be counted")

    # Shutdown gives up on the collector at its deadline, whatever the export timeout.
    t0 = time.monotonic()
    proxy.tracer.shutdown()
    took = time.monotonic() - t0
    assert took < shutdown_timeout + 0.5, f"shutdown took {took:.2f}s"


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_cli_exits_on_time_with_a_blackholed_collector(pg, otlp, protocol):
    """SIGTERM: drain, give up on the collector at shutdown_timeout, and the process really exits."""
    otlp.mode = "blackhole"
    endpoint = otlp.http_endpoint if protocol == "http/protobuf" else f"http://{otlp.grpc_endpoint}"
    cli = _Cli(["--upstream", f"{pg.host}:{pg.port}", "--upstream-tls", "disable", "--admin-listen", "",
                "--drain-timeout", "1", "--otlp-endpoint", endpoint, "--otlp-protocol", protocol,
                "--export-timeout", "30", "--shutdown-timeout", "1", "--export-interval", "0.05"])
    try:
        dsn = f"host=127.0.0.1 port={cli.port} user=postgres dbname=postgres sslmode=disable"
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(200):
                conn.execute("select 1")
        _wait_for(lambda: otlp.request_count("blackhole") > 0, timeout=5, what="an export to be stuck")
        t0 = time.monotonic()
        cli.proc.send_signal(signal.SIGTERM)
        code = cli.proc.wait(10)
        took = time.monotonic() - t0
        assert code == 0, cli.stderr
        # No session is open, so only the tracer's shutdown deadline counts (export_timeout is 30 s).
        assert took < 1.0 + 1.5, f"exit took {took:.2f}s"
        assert "not exported" in cli.stderr
    finally:
        cli.stop()


# ---------------------------------------------------------------------------
# a client that stops reading a huge result


def _select_latencies(conn, n: int = 100) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.execute("select 1")
        out.append(time.perf_counter() - t0)
    return out


def test_client_stops_reading_huge_result(pg, make_proxy):
    proxy = make_proxy()
    app = f"stall-{uuid.uuid4().hex[:8]}"
    other = psycopg.connect(proxy.dsn(application_name="stall-neighbour"), autocommit=True)
    side = psycopg.connect(pg.dsn(), autocommit=True)
    _select_latencies(other, 50)  # warm up
    before = _select_latencies(other)
    rss0 = _rss()

    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        sock.sendall(_startup(application_name=app))
        buf = b""
        while b"Z\x00\x00\x00\x05I" not in buf:
            chunk = sock.recv(4096)
            assert chunk, buf
            buf += chunk
        # About 1 GB of DataRows are due; the client reads 64 KB of them and then nothing.
        sock.sendall(_msg(b"Q", b"select repeat('x', 1000) from generate_series(1, 1000000)\x00"))
        got = 0
        while got < 64 << 10:
            got += len(sock.recv(65536))

        def backend_wait() -> str | None:
            row = side.execute("select wait_event from pg_stat_activity where application_name = %s", (app,)).fetchone()
            return row and row[0]

        # Backpressure reaches Postgres: its backend blocks writing to the proxy.
        _wait_for(lambda: backend_wait() == "ClientWrite", timeout=15, what="the backend to block in ClientWrite")
        during = _select_latencies(other)
        time.sleep(2)
        during += _select_latencies(other)
        assert backend_wait() == "ClientWrite"

        async def held() -> int:
            (conn,) = [c for c in proxy.server.connections if c.session and c.session.startup_params.get("application_name") == app]
            return conn.client.get_write_buffer_size() + conn.upstream.get_write_buffer_size()

        assert proxy.call(held()) < 4 << 20
        grown = _rss() - rss0
        assert grown < 20 << 20, f"RSS grew {grown >> 20} MB while a client did not read"
        # The neighbour did not notice.
        assert statistics.median(during) < 3 * statistics.median(before) + 0.002, (
            f"median select 1: {statistics.median(before) * 1e3:.2f} ms before, {statistics.median(during) * 1e3:.2f} ms during")
    finally:
        # Close with unread data: a reset, as a crashed client would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    _wait_for(lambda: _backend_count(pg, app) == 0, timeout=5, what="the backend to end")
    assert other.execute("select 2").fetchone() == (2,)
    other.close()
    side.close()


# ---------------------------------------------------------------------------
# thousands of connections against the limits


async def _attempt(port: int, app: str, outcomes: list, done: asyncio.Event, total: int, timeout: float) -> None:
    """Open, start up, wait for ReadyForQuery or an error; hold an accepted session until the wave is decided."""
    writer = None
    outcome = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(_startup(application_name=app))

        async def answer() -> str:
            while True:
                head = await reader.readexactly(5)
                body = await reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
                if head[:1] == b"Z":
                    return "ready"
                if head[:1] == b"E":
                    return _fields(body).get("C", "?")

        outcome = await asyncio.wait_for(answer(), timeout)
    except asyncio.TimeoutError:
        outcome = "hang"
    except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
        outcome = f"lost: {exc!r}"
    outcomes.append(outcome)
    if len(outcomes) == total:
        done.set()
    try:
        if outcome == "ready":
            await asyncio.wait_for(done.wait(), timeout)
            writer.write(_msg(b"X"))
            await writer.drain()
        if outcome == "53300":
            # The proxy closes after its error: nothing more may arrive.
            rest = await asyncio.wait_for(reader.read(), timeout)
            if rest:
                outcomes.append(f"bytes after 53300: {rest[:40]!r}")
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass
    finally:
        if writer is not None:
            writer.close()


def _wave(port: int, n: int, app: str, timeout: float = 20.0) -> list[str]:
    async def main() -> list[str]:
        outcomes: list[str] = []
        done = asyncio.Event()
        await asyncio.gather(*(_attempt(port, app, outcomes, done, n, timeout) for _ in range(n)))
        return outcomes

    return asyncio.run(main())


def test_two_thousand_connections_against_max_connections(pg, make_proxy):
    limit, waves, per_wave = 150, 4, 500
    proxy = make_proxy(max_connections=limit, tracing=False)
    app = f"burst-{uuid.uuid4().hex[:8]}"
    refused_before = STATS.connections_refused
    t0 = time.monotonic()
    for _ in range(waves):
        outcomes = _wave(proxy.port, per_wave, app)
        summary = {o: outcomes.count(o) for o in set(outcomes)}
        # Accepted sessions are held until every attempt of the wave has its answer,
        # so exactly `limit` get in and every other one is told why it did not.
        assert summary == {"ready": limit, "53300": per_wave - limit}, summary
        _wait_for(lambda: proxy.server.active == 0, timeout=10, what="every slot to free")
    assert time.monotonic() - t0 < 60
    assert STATS.connections_refused - refused_before == waves * (per_wave - limit)
    _wait_for(lambda: _backend_count(pg, app) == 0, timeout=10, what="the backends to end")
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("when", ["at-start", "lowered-while-running"])
def test_file_descriptor_limit(pg, when):
    """Clients beyond what RLIMIT_NOFILE allows get 53300, and the rest are served.

    The proxy runs in-process elsewhere; here it is the real CLI, with a limit of
    256 descriptors set before it starts (it keeps room for the upstream leg of
    every session it accepts) or lowered under it while it runs (it learns of
    the limit only from EMFILE: the reserve descriptor in the accept loop, the
    upstream connection that cannot be opened).
    """
    args = ["--upstream", f"{pg.host}:{pg.port}", "--upstream-tls", "disable", "--no-tracing",
            "--admin-listen", "", "--drain-timeout", "1"]
    cli = _Cli(args, nofile=256 if when == "at-start" else None)
    if when == "lowered-while-running":
        resource.prlimit(cli.proc.pid, resource.RLIMIT_NOFILE, (256, 256))
    try:
        app = f"fds-{uuid.uuid4().hex[:8]}"
        for _ in range(2):
            outcomes = _wave(cli.port, 400, app)
            summary = {o: outcomes.count(o) for o in set(outcomes)}
            # Never a reset or a hang: served, or told why not.
            assert set(summary) <= {"ready", "53300"}, summary
            if when == "at-start":
                # Two descriptors per session under a limit of 256: about a hundred get in.
                assert 80 <= summary.get("ready", 0) < 128, summary
            _wait_for(lambda: _backend_count(pg, app) == 0, timeout=10, what="the backends to end")
        # After the bursts the proxy serves as before.
        dsn = f"host=127.0.0.1 port={cli.port} user=postgres dbname=postgres sslmode=disable connect_timeout=5"
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        err = cli.stderr
        assert "Traceback" not in err, err
        if when == "at-start":
            assert "short of file descriptors" in err
            assert "cannot open upstream connection" not in err  # the room kept for upstream legs held
        else:
            assert "out of file descriptors: refused a connection" in err
            assert "cannot open upstream connection" in err
    finally:
        cli.stop()


# ---------------------------------------------------------------------------
# PostgreSQL restarted under load


# What a session may be told while its server restarts: Postgres' own words
# (57P01 terminating, 57P03 shutting down / starting up) or the proxy's
# (08001 cannot connect, 08006 upstream gone).
_OUTAGE_MESSAGES = (
    "terminating connection due to administrator command",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is not yet accepting connections",
    "pgotel-proxy could not connect to upstream server",
    "upstream server closed the connection unexpectedly",
)


@pytest.fixture(scope="module")
def own_pg(pg, certs):
    """A PostgreSQL server of this module's own, free to be restarted."""
    from pgserver import PgServer

    server = PgServer(pg.bin_dir, certs=certs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _readyz(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_postgres_restart_under_load(own_pg, make_proxy):
    proxy = make_proxy(upstream=f"{own_pg.host}:{own_pg.port}", connect_timeout=2)
    stop = threading.Event()
    results: list[list[tuple[float, str, str | None, str]]] = [[] for _ in range(4)]

    def client(out: list) -> None:
        conn = None
        notices: list[str] = []
        while not stop.is_set():
            try:
                if conn is None:
                    notices = []
                    conn = psycopg.connect(proxy.dsn(application_name="restart-load", connect_timeout=5), autocommit=True)
                    conn.add_notice_handler(lambda diag, seen=notices: seen.append(diag.sqlstate))
                conn.execute("select count(*) from generate_series(1, 100)")
                out.append((time.monotonic(), "ok", None, ""))
            except psycopg.OperationalError as exc:
                # A FATAL that arrives right behind a ReadyForQuery finds libpq idle: it goes to
                # the notice handler and the error is libpq's own "server closed the connection".
                state = exc.sqlstate or ("57P01" if "57P01" in notices else None)
                out.append((time.monotonic(), "error", state, str(exc)))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.02)
        if conn is not None:
            conn.close()

    probes: list[tuple[float, int]] = []

    def prober() -> None:
        while not stop.is_set():
            code = _readyz(proxy.admin_url)
            # Stamped when answered: a probe sent just before the restart may be answered during it.
            probes.append((time.monotonic(), code))
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(r,)) for r in results] + [threading.Thread(target=prober)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        t_down = time.monotonic()
        own_pg.restart()  # fast shutdown: backends are terminated, then a fresh postmaster
        t_up = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not any(t.is_alive() for t in threads)

    for out in results:
        # Working before, told why during the outage, working again after with a new session.
        assert any(kind == "ok" and ts < t_down for ts, kind, _, _ in out)
        errors = [(state, msg) for _, kind, state, msg in out if kind == "error"]
        assert errors, "a session went through a server restart without noticing"
        for state, msg in errors:
            assert state == "57P01" or any(m in msg for m in _OUTAGE_MESSAGES), (state, msg)
        assert any(kind == "ok" and ts > t_up for ts, kind, _, _ in out), out[-5:]
        last_error = max(ts for ts, kind, _, _ in out if kind == "error")
        assert last_error < t_up + 1.0, "errors went on after the server was back"

    # /readyz followed the server, and the same proxy served throughout.
    assert all(code == 200 for ts, code in probes if ts < t_down)
    assert any(code == 503 for ts, code in probes if t_down <= ts <= t_up), probes
    assert probes[-1][1] == 200
    assert _readyz(proxy.admin_url) == 200
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# ---------------------------------------------------------------------------
# certificates reloaded on SIGHUP


def _served_cert(port: int) -> bytes:
    """DER of the certificate the proxy presents after an SSLRequest."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(struct.pack("!II", 8, 80877103))
        assert raw.recv(1) == b"S"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the test compares the certificate itself
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def _file_cert(path: str) -> bytes:
    pem = open(path).read()
    first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return ssl.PEM_cert_to_DER_cert(first)


def test_tls_certificates_reload_on_sighup(pg, certs, tmp_path):
    from certs import make_certs

    cert, key = tmp_path / "proxy.crt", tmp_path / "proxy.key"
    shutil.copy(certs["proxy_cert"], cert)
    shutil.copy(certs["proxy_key"], key)
    cli = _Cli(["--upstream", f"{pg.host}:{pg.port}", "--upstream-tls", "disable", "--no-tracing",
                "--admin-listen", "", "--drain-timeout", "1", "--client-tls-cert", str(cert), "--client-tls-key", str(key)])
    base = f"host=localhost port={cli.port} user=postgres dbname=postgres sslmode=verify-full connect_timeout=5"
    try:
        assert _served_cert(cli.port) == _file_cert(certs["proxy_cert"])
        session = psycopg.connect(f"{base} sslrootcert={certs['ca']}", autocommit=True)
        assert session.pgconn.ssl_in_use
        session.execute("create temp table reload_keep (v int)")
        session.execute("insert into reload_keep values (1)")

        # A new pair from another CA replaces the files (renamed into place, as certificate managers do).
        fresh = make_certs(tmp_path / "fresh")
        for src, dst in ((fresh["proxy_cert"], cert), (fresh["proxy_key"], key)):
            shutil.copy(src, f"{dst}.new")
            os.replace(f"{dst}.new", dst)
        assert _served_cert(cli.port) == _file_cert(certs["proxy_cert"])  # nothing read before SIGHUP
        cli.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: _served_cert(cli.port) == _file_cert(fresh["proxy_cert"]), timeout=5,
                  what="the new certificate to be served")

        # The open session kept its TLS connection and its state.
        assert session.execute("select sum(v) from reload_keep").fetchone() == (1,)
        # New sessions verify against the new CA, and no longer against the old one.
        with psycopg.connect(f"{base} sslrootcert={fresh['ca']}") as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
            psycopg.connect(f"{base} sslrootcert={certs['ca']}")

        # A broken pair (key of another certificate) is refused and the served one stays.
        shutil.copy(certs["client_key"], f"{key}.new")
        os.replace(f"{key}.new", key)
        cli.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "reload failed" in cli.stderr, timeout=5, what="the failed reload to be logged")
        assert _served_cert(cli.port) == _file_cert(fresh["proxy_cert"])
        with psycopg.connect(f"{base} sslrootcert={fresh['ca']}") as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert session.execute("select sum(v) from reload_keep").fetchone() == (1,)
        session.close()
        assert cli.proc.poll() is None
    finally:
        cli.stop()


def test_failed_reload_keeps_every_old_setting(pg, certs, tmp_path):
    """A reload whose certificate does not load applies nothing of the new file, not just no certificate."""
    cert, key = tmp_path / "proxy.crt", tmp_path / "proxy.key"
    shutil.copy(certs["proxy_cert"], cert)
    shutil.copy(certs["proxy_key"], key)
    conf = tmp_path / "proxy.toml"
    settings = f'client_tls_cert = "{cert}"\nclient_tls_key = "{key}"\n'
    conf.write_text(settings + "max_connections = 5\n")
    cli = _Cli(["--config", str(conf), "--upstream", f"{pg.host}:{pg.port}", "--upstream-tls", "disable",
                "--no-tracing", "--admin-listen", "", "--drain-timeout", "1"])
    dsn = f"host=127.0.0.1 port={cli.port} user=postgres dbname=postgres sslmode=require connect_timeout=5"
    try:
        # The new file lowers the limit, and its key does not belong to the certificate.
        conf.write_text(settings + "max_connections = 1\n")
        shutil.copy(certs["client_key"], f"{key}.new")
        os.replace(f"{key}.new", key)
        cli.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "reload failed" in cli.stderr, timeout=5, what="the failed reload to be logged")
        with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
            assert a.execute("select 1").fetchone() == (1,)
            assert b.execute("select 2").fetchone() == (2,)
        assert _served_cert(cli.port) == _file_cert(certs["proxy_cert"])
    finally:
        cli.stop()


# ---------------------------------------------------------------------------
# tracing switch and sample rate reloaded on SIGHUP


def test_sighup_reloads_tracing_switch_and_sample_rate(pg, otlp, tmp_path):
    conf = tmp_path / "proxy.toml"
    conf.write_text("sample_rate = 1.0\ntracing = true\n")
    admin = _free_port()
    cli = _Cli([
        "--config", str(conf), "--upstream", f"{pg.host}:{pg.port}", "--upstream-tls", "disable",
        "--admin-listen", f"127.0.0.1:{admin}", "--otlp-endpoint", otlp.http_endpoint,
        "--export-interval", "0.05",
    ])

    def status() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
            return json.loads(r.read())

    try:
        _wait_for(lambda: _try(status), timeout=10, what="the admin endpoint")
        assert status()["sample_rate"] == 1.0 and status()["tracing"] is True
        conf.write_text("sample_rate = 0.25\ntracing = false\n")
        cli.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: status()["sample_rate"] == 0.25 and status()["tracing"] is False, timeout=10,
                  what="the reloaded settings")
        # with tracing off, statements leave no spans
        otlp.clear()
        with psycopg.connect(f"host=127.0.0.1 port={cli.port} user=postgres dbname=postgres sslmode=disable") as c:
            c.execute("SELECT 'after reload'")
        time.sleep(0.5)
        assert not [s for s in otlp.spans if s.kind == "SERVER"]
        # a bad file keeps the running settings
        conf.write_text("sample_rate = 7\n")
        cli.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "reload failed" in cli.stderr, timeout=10, what="the reload error in the log")
        assert status()["sample_rate"] == 0.25
        assert cli.proc.poll() is None
    finally:
        cli.stop()


def test_sighup_reloads_the_rule_for_slow_statements(pg, otlp, tmp_path):
    """always_trace_* apply from the reload on: a slow statement the sample rate leaves out is kept after it."""
    conf = tmp_path / "proxy.toml"
    conf.write_text("tracing = true\nsample_rate = 0.0\nalways_trace_slower_than = 0\n")
    cli = _Cli([
        "--config", str(conf), "--upstream", f"{pg.host}:{pg.port}", "--upstream-tls", "disable",
        "--admin-listen", "", "--otlp-endpoint", otlp.http_endpoint, "--export-interval", "0.05",
    ])
    dsn = f"host=127.0.0.1 port={cli.port} user=postgres dbname=postgres sslmode=disable"

    def kept() -> list:
        return [s for s in otlp.spans if s.kind == "SERVER" and s.attributes.get("pgotel.kept_because") == "slow"]

    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("SELECT pg_sleep(0.05)")
        time.sleep(0.5)
        assert not kept()  # no rule yet: the sample rate of 0 leaves it out
        conf.write_text("tracing = true\nsample_rate = 0.0\nalways_trace_slower_than = 0.02\n")
        cli.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "SIGHUP received" in cli.stderr, timeout=10, what="the reload in the log")
        time.sleep(0.3)  # the new rule reaches the span process with the next hand-over
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("SELECT pg_sleep(0.05)")
            c.execute("SELECT 1")  # fast: left out
        _wait_for(lambda: len(kept()) == 1, timeout=10, what="the slow statement kept after the reload")
        assert "pg_sleep" in kept()[0].name or "SELECT" in kept()[0].name
    finally:
        cli.stop()


def _try(fn):
    try:
        return fn()
    except OSError:
        return None
