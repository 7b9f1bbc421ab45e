"""``pgotel-proxy run --workers N``: the real CLI in a subprocess, forked workers, SO_REUSEPORT.

Covers connections spread over the workers, cancel requests routed to the
worker that owns the session, unknown cancel keys dropped once, metrics and
status summed over workers, POST /tracing reaching every worker, SIGTERM
drain, and a killed worker being restarted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
from waiting import free_port, wait_for

CANCEL_CODE = 80877102






class ProxyProcess:
    """``python -m pgotel_proxy run --workers N`` in front of the test server."""

    def __init__(self, pg, tmp: Path, *extra: str, workers: int = 2, otlp=None, listen_port: int | None = None) -> None:
        self.port = free_port() if listen_port is None else listen_port
        self.admin_port = free_port()
        self.tmp = tmp
        self.log_path = tmp / "proxy.log"
        cmd = [
            sys.executable, "-m", "pgotel_proxy", "run", "--workers", str(workers),
            "--listen", f"127.0.0.1:{self.port}", "--upstream", f"{pg.host}:{pg.port}",
            "--upstream-tls", "disable", "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--drain-timeout", "1", "--shutdown-timeout", "2",
        ]
        if otlp is not None:
            cmd += ["--otlp-endpoint", otlp.http_endpoint, "--export-interval", "0.05"]
        else:
            cmd += ["--exporter", "none"]
        cmd += list(extra)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGOTEL_", "OTEL_"))}
        env["TMPDIR"] = str(tmp)  # where the parent makes its private socket directory
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self._log)
        self.workers = workers

    def log(self) -> str:
        return self.log_path.read_text()

    def dsn(self, **params) -> str:
        p = {"host": "127.0.0.1", "port": self.port, "user": "postgres", "dbname": "postgres",
             "sslmode": "disable", "connect_timeout": 10}
        p.update(params)
        return " ".join(f"{k}={v}" for k, v in p.items())

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=3) as r:
            return r.read()

    def status(self) -> dict:
        return json.loads(self._get("/status"))

    def post_tracing(self, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/tracing", method="POST",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3) as r:
            return json.loads(r.read())

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in self._get("/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, name: str) -> float:
        return self.metrics()[f"pgotel_{name}"]

    def worker_pids(self) -> list[int | None]:
        return [w["pid"] for w in self.status()["workers"]]

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready():
            assert self.proc.poll() is None, self.log()
            try:
                pids = self.worker_pids()
                psycopg.connect(self.dsn()).close()
            except (OSError, psycopg.OperationalError):
                return False
            return all(pids) and len(set(pids)) == self.workers

        wait_for(ready, timeout, "the proxy and all its workers", interval=0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def proxy2(pg, tmp_path_factory):
    p = ProxyProcess(pg, tmp_path_factory.mktemp("workers"))
    try:
        p.wait_ready()
        yield p
    finally:
        code = p.stop()
        assert code == 0, p.log()


def per_worker(p: ProxyProcess, key: str) -> list[int]:
    return [w[key] for w in p.status()["workers"]]


# ---------------------------------------------------------------------------


def test_connections_spread_over_workers_and_metrics_add_up(proxy2):
    time.sleep(0.3)  # earlier connections published by every worker
    before_total = proxy2.metric("connections_accepted_total")
    before_each = per_worker(proxy2, "connections_accepted")
    before_statements = proxy2.metric("statements_total")
    n = 40
    for i in range(n):
        with psycopg.connect(proxy2.dsn(), autocommit=True) as conn:
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
    # Every connection counted once, whichever worker took it (the other
    # workers' slots are at most one publish interval old).
    wait_for(lambda: proxy2.metric("connections_accepted_total") == before_total + n, 5,
             f"connections_accepted_total to add up to {before_total} + {n}: "
             f"{proxy2.metric('connections_accepted_total')}, {proxy2.status()['workers']}")
    after_each = per_worker(proxy2, "connections_accepted")
    got = [a - b for a, b in zip(after_each, before_each)]
    assert sum(got) == n and all(g > 0 for g in got), got
    wait_for(lambda: proxy2.metric("statements_total") >= before_statements + n, 5, "statements from all workers")

    # A gauge summed over workers: sessions open right now.
    conns = [psycopg.connect(proxy2.dsn(), autocommit=True) for _ in range(12)]
    try:
        for c in conns:
            assert c.execute("select 1").fetchone() == (1,)
        wait_for(lambda: proxy2.metric("connections_active") == 12, 5, "12 active connections")
        assert proxy2.status()["connections_active"] == 12
        active = per_worker(proxy2, "connections_active")
        assert sum(active) == 12 and all(a > 0 for a in active), active
    finally:
        for c in conns:
            c.close()
    wait_for(lambda: proxy2.metric("connections_active") == 0, 5, "no active connection")


def _cancel_once(proxy: ProxyProcess, side: psycopg.Connection) -> float:
    """Start pg_sleep(10) through the proxy, cancel it; seconds from cancel() to the error."""
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    result: dict = {}

    def sleeper():
        try:
            conn.execute("select pg_sleep(10)")
            result["error"] = None
        except psycopg.Error as exc:
            result["error"] = exc
        result["t"] = time.monotonic()

    t = threading.Thread(target=sleeper)
    try:
        pid = conn.info.backend_pid
        t.start()
        wait_for(lambda: side.execute("select 1 from pg_stat_activity where pid = %s and state = 'active' "
                                      "and query like '%%pg_sleep%%'", (pid,)).fetchone(),
                 5, "pg_sleep to run")
        t0 = time.monotonic()
        conn.cancel()
        t.join(5)
        assert not t.is_alive(), "the query was not cancelled"
        assert isinstance(result["error"], psycopg.errors.QueryCanceled), result
        return result["t"] - t0
    finally:
        t.join(10)
        conn.close()


def test_cancel_reaches_the_session_whichever_worker_gets_it(proxy2, pg):
    before_forwarded = proxy2.metric("cancel_forwarded_total")
    before_dropped = proxy2.metric("cancel_dropped_total")
    before_routed = sum(per_worker(proxy2, "cancel_routed_in"))
    done = 0
    with psycopg.connect(pg.dsn(), autocommit=True) as side:
        # At least 10; more only in the unlikely case one path was never taken.
        for done in range(1, 41):
            took = _cancel_once(proxy2, side)
            assert took < 1.0, f"cancel {done} took {took:.2f}s"
            if done >= 10:
                time.sleep(0.3)  # one publish interval, so the routed count is current
                routed = sum(per_worker(proxy2, "cancel_routed_in")) - before_routed
                if 0 < routed < done:
                    break
    # Both paths taken: the worker the cancel reached owned the session, or a sibling did.
    assert 0 < routed < done, (routed, done)
    wait_for(lambda: proxy2.metric("cancel_forwarded_total") == before_forwarded + done, 5,
             "every cancel forwarded upstream once")
    assert per_worker(proxy2, "cancel_routed_out") and \
        sum(per_worker(proxy2, "cancel_routed_out")) >= routed
    assert proxy2.metric("cancel_dropped_total") == before_dropped


def _raw_cancel(port: int, pid: int, key: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack("!III", 12 + len(key), CANCEL_CODE, pid) + key)
        # The proxy closes the connection once it has dealt with the request.
        while s.recv(64):
            pass


def test_unknown_cancel_key_is_dropped_once_and_not_forwarded(proxy2):
    before_dropped = proxy2.metric("cancel_dropped_total")
    before_forwarded = proxy2.metric("cancel_forwarded_total")
    with psycopg.connect(proxy2.dsn(), autocommit=True) as conn:
        pid = conn.info.backend_pid
        box: dict = {}

        def sleeper():
            t0 = time.monotonic()
            box["row"] = conn.execute("select pg_sleep(0.8), 'done'").fetchone()
            box["took"] = time.monotonic() - t0

        t = threading.Thread(target=sleeper)
        t.start()
        n = 6
        # The real backend pid with a made-up secret: whichever worker gets it,
        # no worker owns this key, so it must not reach the server.
        for _ in range(n):
            _raw_cancel(proxy2.port, pid, os.urandom(4))
        t.join(5)
        assert box["row"] == ("", "done") and box["took"] >= 0.75, box
    wait_for(lambda: proxy2.metric("cancel_dropped_total") == before_dropped + n, 5, "6 drops")
    time.sleep(0.3)
    assert proxy2.metric("cancel_dropped_total") == before_dropped + n  # once each, not once per worker
    assert proxy2.metric("cancel_forwarded_total") == before_forwarded


def traffic(p: ProxyProcess, n: int = 20, **params) -> list[int]:
    """``n`` short sessions through ``p``; how many each worker took (all of them are counted)."""
    time.sleep(0.3)  # a publish interval: earlier connections counted in every slot
    before = per_worker(p, "connections_accepted")
    for _ in range(n):
        with psycopg.connect(p.dsn(**params), autocommit=True) as conn:
            conn.execute("select 1").fetchone()

    def counted():
        got = [a - b for a, b in zip(per_worker(p, "connections_accepted"), before)]
        return got if sum(got) == n else None

    return wait_for(counted, 5, f"{n} connections counted")


def wait_tracing(p: ProxyProcess, on: bool) -> None:
    wait_for(lambda: all(w["tracing"] is on for w in p.status()["workers"]), 5,
             f"every worker to have tracing {'on' if on else 'off'}")


def test_tracing_control_reaches_every_worker(pg, tmp_path, otlp):
    p = ProxyProcess(pg, tmp_path, otlp=otlp)
    try:
        p.wait_ready()

        def spans_of(app: str, spans=None) -> list:
            return [s for s in (spans if spans is not None else otlp.spans)
                    if s.attributes.get("db.postgresql.application_name") == app]

        on = f"on-{uuid.uuid4().hex[:6]}"
        spread = traffic(p, application_name=on)
        assert all(s > 0 for s in spread), spread
        otlp.wait_for(lambda spans: len(spans_of(on, spans)) >= 20, 5)
        wait_for(lambda: all(n > 0 for n in per_worker(p, "spans_exported")), 5, "spans from every worker")

        st = p.post_tracing({"enabled": False, "sample_rate": 0.5})
        assert st["tracing"] is False and st["sample_rate"] == 0.5
        wait_tracing(p, False)
        statements = per_worker(p, "statements")
        off = f"off-{uuid.uuid4().hex[:6]}"
        spread = traffic(p, application_name=off)
        assert all(s > 0 for s in spread), spread  # both workers served while off ...
        time.sleep(0.5)  # several export intervals
        assert spans_of(off) == []  # ... and neither traced
        assert per_worker(p, "statements") == statements

        p.post_tracing({"enabled": True, "sample_rate": 1.0})
        wait_tracing(p, True)
        again = f"again-{uuid.uuid4().hex[:6]}"
        spread = traffic(p, application_name=again)
        assert all(s > 0 for s in spread), spread
        otlp.wait_for(lambda spans: len(spans_of(again, spans)) >= 20, 5)
        wait_for(lambda: all(a > b for a, b in zip(per_worker(p, "statements"), statements)), 5,
                 "statements from every worker again")
    finally:
        assert p.stop() == 0, p.log()


def test_sigterm_drains_then_exits_zero(pg, tmp_path):
    p = ProxyProcess(pg, tmp_path)
    try:
        p.wait_ready()
        sock_dirs = list(tmp_path.glob("pgotel-proxy-*"))
        assert len(sock_dirs) == 1 and stat.S_IMODE(sock_dirs[0].stat().st_mode) == 0o700
        # the cancel sockets, and the span processes' shared session file (lock waits)
        assert sorted(x.name for x in sock_dirs[0].iterdir()) == ["sessions", "worker-0.sock", "worker-1.sock"]
        assert stat.S_IMODE((sock_dirs[0] / "sessions").stat().st_mode) == 0o600
        pids = p.worker_pids()
        conn = psycopg.connect(p.dsn())  # sits in a transaction during the drain
        assert conn.execute("select 1").fetchone() == (1,)
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)

        def refused():
            try:
                socket.create_connection(("127.0.0.1", p.port), timeout=0.5).close()
                return False
            except OSError:
                return True

        wait_for(refused, 2, "every worker to stop listening")
        assert conn.execute("select 2").fetchone() == (2,)
        assert p.proc.wait(10) == 0, p.log()
        assert time.monotonic() - t0 >= 0.9  # the drain time was waited for
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 3")
        conn.close()
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert list(tmp_path.glob("pgotel-proxy-*")) == []
        assert "all workers stopped" in p.log()
        assert "threads running before forking" not in p.log()  # the fork came first
    finally:
        p.stop()


def test_killed_worker_is_restarted(pg, tmp_path):
    p = ProxyProcess(pg, tmp_path)
    try:
        p.wait_ready()
        for _ in range(10):
            psycopg.connect(p.dsn()).close()
        wait_for(lambda: p.metric("connections_accepted_total") >= 11, 5, "counts published")
        old = p.worker_pids()
        accepted = p.metric("connections_accepted_total")

        # A worker without the admin listener.
        os.kill(old[1], signal.SIGKILL)
        wait_for(lambda: p.worker_pids()[1] not in (None, old[1]), 10, "worker 1 to come back")
        assert re.search(rf"worker 1 \(pid {old[1]}\) ended unexpectedly with signal SIGKILL: restarting it", p.log())
        # Its counters were kept when it died.
        assert p.metric("connections_accepted_total") >= accepted
        for _ in range(20):
            with psycopg.connect(p.dsn(), autocommit=True) as conn:
                assert conn.execute("select 42").fetchone() == (42,)

        # Worker 0 holds the admin listener: it comes back with it. Its counts
        # of the last publish interval die with it, so wait for them first.
        wait_for(lambda: p.metric("connections_accepted_total") >= accepted + 20, 5, "counts published")
        time.sleep(0.3)  # worker 0's own slot too (the admin reads its counts live)
        accepted = p.metric("connections_accepted_total")
        pids = p.worker_pids()
        os.kill(pids[0], signal.SIGKILL)

        def back():
            try:
                now = p.worker_pids()
            except OSError:
                return False
            return now[0] not in (None, pids[0]) and now[1] == pids[1]

        wait_for(back, 10, "worker 0 and the admin endpoint to come back", interval=0.1)
        for _ in range(20):
            with psycopg.connect(p.dsn(), autocommit=True) as conn:
                assert conn.execute("select 43").fetchone() == (43,)
        wait_for(lambda: p.metric("connections_accepted_total") >= accepted + 20, 5, "kept and new counts")
        assert p.stop() == 0, p.log()
    finally:
        p.stop()


def test_listen_port_zero_is_one_port_for_all_workers(pg, tmp_path):
    p = ProxyProcess(pg, tmp_path, listen_port=0)
    try:
        def ports():
            assert p.proc.poll() is None, p.log()
            found = re.findall(r"worker \d: listening on 127\.0\.0\.1:(\d+)", p.log())
            return found if len(found) == 2 else None

        found = wait_for(ports, 20, "two workers listening", interval=0.1)
        assert len(set(found)) == 1 and found[0] != "0", found
        p.port = int(found[0])
        for _ in range(10):
            with psycopg.connect(p.dsn(), autocommit=True) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
    finally:
        assert p.stop() == 0, p.log()


def test_sigterm_right_after_start_still_exits_zero(pg, tmp_path):
    # The workers get SIGTERM while still starting, before serve() has its
    # handlers: held back until then, not fatal.
    p = ProxyProcess(pg, tmp_path)
    try:
        wait_for(lambda: "worker 1 started" in p.log(), 10, "both workers forked", interval=0.005)
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(10) == 0, p.log()
        assert "ended with" not in p.log()
    finally:
        p.stop()


def test_listen_address_in_use_stops_before_forking(pg, tmp_path):
    with socket.socket() as taken:  # a listener without SO_REUSEPORT: no worker could bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        p = ProxyProcess(pg, tmp_path, listen_port=taken.getsockname()[1])
        try:
            assert p.proc.wait(20) == 2
            lines = p.log().splitlines()
            assert len(lines) == 1 and "--listen" in lines[0] and "in use" in lines[0], lines
        finally:
            p.stop()


def test_worker_failing_before_it_serves_stops_the_proxy(pg, tmp_path):
    # Worker 0 alone binds the Unix socket; a directory that does not exist fails it
    # at every start, after the parent's checks.
    p = ProxyProcess(pg, tmp_path, "--unix-socket", str(tmp_path / "missing" / ".s.PGSQL.5432"))
    try:
        assert p.proc.wait(20) == 1
        log = p.log()
        assert "cannot serve: unix_socket: cannot listen on" in log
        assert re.search(r"worker \d failed 3 times in a row before serving", log), log
        assert "Traceback" not in log
    finally:
        p.stop()


def test_sighup_settings_reach_restarted_workers(pg, tmp_path):
    conf = tmp_path / "proxy.toml"
    conf.write_text("tracing = true\n")
    p = ProxyProcess(pg, tmp_path, "--config", str(conf))
    try:
        p.wait_ready()
        first = sum(traffic(p))  # one statement a session
        conf.write_text("tracing = false\n")
        p.proc.send_signal(signal.SIGHUP)
        wait_tracing(p, False)
        # Each worker's span process reports its count four times a second, later when it is
        # behind (idle scheduling class): the first round is counted before the baseline.
        wait_for(lambda: sum(per_worker(p, "statements")) >= first, 10, "the first round's statements counted")
        before = per_worker(p, "statements")
        traffic(p)
        time.sleep(0.3)
        assert per_worker(p, "statements") == before

        # A worker started after the reload starts with tracing off too ...
        old = p.worker_pids()
        os.kill(old[1], signal.SIGKILL)
        wait_for(lambda: p.worker_pids()[1] not in (None, old[1]), 10, "worker 1 to come back")
        wait_tracing(p, False)
        assert traffic(p)[1] > 0
        time.sleep(0.3)
        assert per_worker(p, "statements")[1] == 0
        # ... yet it has a tracer, so POST /tracing can switch every worker back on.
        assert p.post_tracing({"enabled": True})["tracing"] is True
        wait_tracing(p, True)
        before = per_worker(p, "statements")
        traffic(p)
        wait_for(lambda: all(a > b for a, b in zip(per_worker(p, "statements"), before)), 5,
                 "statements from every worker")
    finally:
        assert p.stop() == 0, p.log()


def test_workers_draw_ids_of_their_own(pg, tmp_path, otlp):
    """Forked workers must not share the parent's random state: no trace or span id made twice.

    Each worker has its own span process, which draws the ids; the relay's own
    draws (pre-sampling) come from a generator seeded afresh in each fork.
    """
    p = ProxyProcess(pg, tmp_path, otlp=otlp)
    try:
        p.wait_ready()
        app = f"ids-{uuid.uuid4().hex[:6]}"
        spread = traffic(p, n=20, application_name=app)
        assert all(s > 0 for s in spread), spread

        def mine(spans=None) -> list:
            return [s for s in (spans if spans is not None else otlp.spans)
                    if s.attributes.get("db.postgresql.application_name") == app and s.parent_span_id is None]

        otlp.wait_for(lambda spans: len(mine(spans)) >= 20, 10)
        roots = mine()
        trace_ids = [s.trace_id for s in roots]
        assert len(set(trace_ids)) == len(trace_ids), sorted(trace_ids)
        ids = [s.span_id for s in otlp.spans]
        assert len(set(ids)) == len(ids)
    finally:
        p.stop()
