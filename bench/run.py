"""Side-by-side benchmark: direct PostgreSQL, PgBouncer and pgotel-proxy, in one run.

This module owns the whole benchmark: a throwaway PostgreSQL (the test
fixture's :class:`PgServer`), a PgBouncer in session mode, the proxy started
through its real CLI in several configurations (:data:`PROXY_FLAGS`: tracing
off; tracing on at 100 % sampling exporting OTLP/HTTP to a decoding receiver
in another process, with two worker processes, with ``--phase-timing flush``),
and the measurements:

* pgbench, a ``-S`` equivalent whose SQL carries a sampled sqlcommenter
  traceparent, in simple / extended / prepared modes at 1, 8 and 32 clients,
  the targets interleaved within each cell so they share the machine's noise:
  tps, mean / p50 / p99 latency (from per-transaction logs), CPU of the middle
  process per transaction (utime + stime from ``/proc``), spans exported and
  dropped (from the proxy's admin ``/metrics``) and spans the receiver decoded;
* bulk relay: ``COPY ... TO STDOUT`` of a large table and a many-row SELECT;
* RSS per idle client connection with N connections open;
* optionally one sustained cell (prepared statements, one long pgbench run per
  target) and, for every traced proxy, what it counted over the whole run:
  each middle process is started once and kept through every round;
* optionally a slow-mix cell (``--slow-mix S``): the ``-S`` select mixed with a
  statement that takes tens of milliseconds to plan and execute, extended
  protocol, and per statement name how many statement spans the receiver got
  with parse, plan and execute split (each a span of its own, its end
  observed): what adaptive phase splitting shows under the defaults.

Every target can also run with TLS (:data:`TLS_SHAPES`): ``-tls`` on the
server leg only (the middle connects to PostgreSQL with ``sslmode=require``),
``-tls2`` on both legs (pgbench connects to the middle with TLS too). A
target's ratios are taken against the PgBouncer of its own shape.

Usage: ``python bench/run.py [--quick] [--out bench/results/<date>.json]``.
Results print as tables and are written as JSON. Run as root, PostgreSQL and
PgBouncer run as the unprivileged user :data:`pgserver.TEST_OS_USER`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import glob
import json
import logging
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT / "tests"))

from pgserver import TEST_OS_USER, PgServer  # noqa: E402

log = logging.getLogger("bench")

DBNAME = "pgotel_bench"
#: A fixed, sampled W3C traceparent: every benchmark statement is traced.
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
MODES = ("simple", "extended", "prepared")
CLIENTS = (1, 8, 32)
TARGETS = ("direct", "pgbouncer", "proxy-off", "proxy-on", "proxy-w2", "proxy-flush")
#: Targets not in the default set, named with --targets: head sampling at 1 % of root
#: statements, and the server-side join (wait events, pg_stat_statements, EXPLAIN).
EXTRA_TARGETS = ("proxy-1pct", "proxy-enrich")
#: Target-name suffixes for TLS (none: plain text). "-tls": middle -> PostgreSQL only
#: (sslmode=require, the certificate not checked, as PgBouncer's
#: server_tls_sslmode=require); "-tls2": pgbench -> middle as well. ``direct-tls``
#: (pgbench -> PostgreSQL with TLS) is the direct reference of both shapes.
TLS_SHAPES = ("-tls", "-tls2")
TLS_TARGETS = ("direct-tls", "pgbouncer-tls", "proxy-off-tls", "proxy-on-tls")
TLS2_TARGETS = ("pgbouncer-tls2", "proxy-off-tls2", "proxy-on-tls2")
#: Names ``--targets`` accepts for a whole set.
TARGET_SETS = {"plain": TARGETS, "tls": TLS_TARGETS, "tls2": TLS2_TARGETS}
#: Proxy configurations: target name -> extra CLI flags.
PROXY_FLAGS: dict[str, list[str]] = {
    "proxy-off": ["--no-tracing"],
    "proxy-on": ["--tracing", "--sample-rate", "1"],
    "proxy-flush": ["--tracing", "--sample-rate", "1", "--phase-timing", "flush"],
    # two worker processes (SO_REUSEPORT), each with its span process
    "proxy-w2": ["--tracing", "--sample-rate", "1", "--workers", "2"],
    # Statements without a traceparent (ROOT_SAMPLED): 1 % of them become traces; every one is
    # counted in the latency histograms, and failed or slow ones are kept (the defaults).
    "proxy-1pct": ["--tracing", "--sample-rate", "0.01", "--always-trace-slower-than", "0.1"],
    # The side connection with its defaults (STATS_DSN is replaced by the server's DSN): wait-event
    # sampling, pg_stat_statements where installed, EXPLAIN for shapes slower than explain_min_duration.
    "proxy-enrich": ["--tracing", "--sample-rate", "1", "--stats-dsn", "STATS_DSN"],
}
#: Configurations whose pgbench statements carry no traceparent: the proxy's head sampler decides.
ROOT_SAMPLED = frozenset({"proxy-1pct"})
#: The placeholder for the benchmark server's DSN in PROXY_FLAGS.
STATS_DSN = "STATS_DSN"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def split_target(name: str) -> tuple[str, str]:
    """``"proxy-on-tls2"`` -> ``("proxy-on", "-tls2")``: the configuration and its TLS shape."""
    for shape in TLS_SHAPES:
        if name.endswith(shape):
            return name[: -len(shape)], shape
    return name, ""


def references(name: str) -> tuple[str, str]:
    """Names of the direct and PgBouncer targets *name*'s ratios are taken against."""
    shape = split_target(name)[1]
    return ("direct-tls" if shape else "direct"), "pgbouncer" + shape


def check_target(name: str) -> None:
    base, shape = split_target(name)
    if base not in ("direct", "pgbouncer", *PROXY_FLAGS) or name == "direct-tls2":
        raise ValueError(f"unknown target {name!r}" + (" (direct-tls serves both TLS shapes)"
                                                        if name == "direct-tls2" else ""))


# --------------------------------------------------------------------------
# Small process helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (the proxy's span process, workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children", encoding="ascii") as fh:
                todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and its live descendants (all threads), in seconds.

    The traced proxy builds and exports spans in a helper process: its CPU is
    the proxy's CPU too.
    """
    total = 0
    for p in _descendants(pid):
        try:
            total += _ticks(f"/proc/{p}/stat")
        except OSError:
            continue  # exited in between
    return total / _CLK_TCK


def _ticks(path: str) -> int:
    """utime + stime, in clock ticks, of a /proc stat file (a process's, or one thread's)."""
    with open(path, encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    return int(fields[11]) + int(fields[12])


#: The parts of a proxy's CPU the benchmark tells apart (cpu_parts): the relay process's event
#: loop thread (its main thread), its pump thread (the compiled relay, named by _pump.c), its
#: other threads, and every process below it (the span process, or workers).
CPU_PARTS = ("loop", "pump", "other", "children")
PUMP_THREAD = "pgotel-pump"


def cpu_parts(pid: int) -> dict[str, float]:
    """utime + stime in seconds of each of :data:`CPU_PARTS` of the process ``pid`` (a proxy).

    "other" is the process's own figure less its loop and pump threads: threads that
    ended count there too, and the parts add up to :func:`cpu_seconds`.
    """
    parts = dict.fromkeys(CPU_PARTS, 0.0)
    try:
        total = _ticks(f"/proc/{pid}/stat")
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return parts
    for tid in tids:
        try:
            if tid == str(pid):
                part = "loop"
            else:
                with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8") as fh:
                    if fh.read().strip() != PUMP_THREAD:
                        continue  # counted in "other"
                part = "pump"
            parts[part] += _ticks(f"/proc/{pid}/task/{tid}/stat") / _CLK_TCK
        except OSError:
            continue  # ended in between
    parts["other"] = total / _CLK_TCK - parts["loop"] - parts["pump"]
    for child in _descendants(pid):
        if child != pid:
            try:
                parts["children"] += _ticks(f"/proc/{child}/stat") / _CLK_TCK
            except OSError:
                pass  # exited in between
    return parts


def rss_kib(pid: int) -> int:
    """Resident memory of the process and its live descendants."""
    total = 0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    if not total:
        raise RuntimeError(f"no VmRSS for {pid}")
    return total


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def raise_fd_limit(want: int) -> None:
    # Idle-connection runs hold thousands of sockets here and in children,
    # which inherit the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------
# The middle processes


@dataclass
class Target:
    """Somewhere pgbench can connect to; ``pid`` is the middle process, if any."""

    name: str
    port: int
    pid: int | None = None
    admin_port: int | None = None
    traced: bool = False
    #: libpq sslmode of the clients' leg (pgbench, psql)
    sslmode: str = "disable"

    def metrics(self) -> dict[str, float]:
        """The proxy's counters from its admin endpoint (empty for other targets)."""
        if self.admin_port is None:
            return {}
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for m in re.finditer(r"^pgotel_(\w+?)(?:_total)? ([0-9.eE+-]+)$", text, re.M):
            out[m.group(1)] = float(m.group(2))
        return out


def ensure_pgbouncer() -> str | None:
    """Path of the pgbouncer binary, installing the Debian package if missing (root only)."""
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    log.info("installing pgbouncer with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "pgbouncer"], env=env, check=False,
                   capture_output=True)
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None)


class PgBouncer:
    """PgBouncer in session mode in front of one database, run unprivileged when we are root."""

    def __init__(self, binary: str, pg: PgServer, max_clients: int, *, name: str = "pgbouncer",
                 server_tls: bool = False, client_tls: tuple[str, str] | None = None) -> None:
        """*server_tls*: ``server_tls_sslmode = require``; *client_tls*: (cert, key) it presents to clients."""
        self.binary = binary
        self.pg = pg
        self.name = name
        self.server_tls = server_tls
        self.client_tls = client_tls
        # Its own directory under the system temp dir: the unprivileged user
        # must reach it, which a caller's (per-user, 0700) temp dir may not allow.
        self.dir = Path(tempfile.mkdtemp(prefix="pgotel-bench-pgbouncer-", dir=tempfile.gettempdir()))
        self.max_clients = max_clients
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PgBouncer":
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "userlist.txt").write_text('"postgres" ""\n')
        tls = f"server_tls_sslmode = {'require' if self.server_tls else 'disable'}\n"
        if self.client_tls:
            # Copies in its own directory: it runs as another user and reads the key.
            shutil.copyfile(self.client_tls[0], self.dir / "client.crt")
            shutil.copyfile(self.client_tls[1], self.dir / "client.key")
            os.chmod(self.dir / "client.key", 0o600)
            tls += ("client_tls_sslmode = require\n"
                    f"client_tls_cert_file = {self.dir / 'client.crt'}\n"
                    f"client_tls_key_file = {self.dir / 'client.key'}\n")
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{DBNAME} = host={self.pg.host} port={self.pg.port} dbname={DBNAME}\n"
            f"postgres = host={self.pg.host} port={self.pg.port} dbname=postgres\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'userlist.txt'}\n"
            "pool_mode = session\n"
            f"max_client_conn = {self.max_clients + 100}\n"
            f"default_pool_size = {self.max_clients + 50}\n"
            f"max_db_connections = {self.max_clients + 50}\n"
            "ignore_startup_parameters = extra_float_digits,options,search_path\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            + tls
        )
        kw: dict[str, Any] = {}
        if os.geteuid() == 0:
            import pwd

            # pgbouncer refuses to run as root.
            owner = pwd.getpwnam(TEST_OS_USER)
            subprocess.run(["chown", "-R", f"{owner.pw_uid}:{owner.pw_gid}", str(self.dir)], check=True)
            os.chmod(self.dir, 0o755)
            kw.update(user=owner.pw_uid, group=owner.pw_gid, extra_groups=[])
        self.proc = subprocess.Popen(
            [self.binary, str(self.dir / "pgbouncer.ini")], cwd="/",
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "wb"), **kw)
        try:
            wait_port(self.port, proc=self.proc)
        except RuntimeError as exc:
            detail = ""
            for name in ("stderr.log", "pgbouncer.log"):
                path = self.dir / name
                if path.exists():
                    detail += path.read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"{exc}\n{detail}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def target(self) -> Target:
        return Target(self.name, self.port, self.proc.pid,
                      sslmode="require" if self.client_tls else "disable")


class ProxyProcess:
    """pgotel-proxy through its real CLI (``python -m pgotel_proxy run``)."""

    def __init__(self, name: str, pg: PgServer, workdir: Path, otlp_endpoint: str | None,
                 extra: list[str], *, upstream_tls: str = "disable",
                 client_tls: tuple[str, str] | None = None) -> None:
        """*upstream_tls*: its ``--upstream-tls``; *client_tls*: (cert, key) to terminate client TLS."""
        self.name = name
        self.client_tls = client_tls
        self.port = free_port()
        self.admin_port = free_port()
        self.log_path = workdir / f"{name}.log"
        self.args = [
            sys.executable, "-m", "pgotel_proxy", "run",
            "--listen", f"127.0.0.1:{self.port}",
            "--upstream", f"{pg.host}:{pg.port}",
            # Same as PgBouncer's server side (server_tls_sslmode): disable or require.
            "--upstream-tls", upstream_tls,
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--log-level", "warning",
            *(f"host={pg.host} port={pg.port} user=postgres dbname={DBNAME}" if arg == STATS_DSN else arg
              for arg in extra),
        ]
        if otlp_endpoint and "--tracing" in extra:
            self.args += ["--otlp-endpoint", otlp_endpoint]
        if client_tls:
            self.args += ["--client-tls-cert", client_tls[0], "--client-tls-key", client_tls[1]]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ProxyProcess":
        env = dict(os.environ)
        for key in [k for k in env if k.startswith(("PGOTEL_", "OTEL_"))]:
            del env[key]
        self.proc = subprocess.Popen(self.args, cwd=str(_ROOT), env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_path, "wb"))
        wait_port(self.port, timeout=30, proc=self.proc)
        wait_port(self.admin_port, timeout=30, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)

    @property
    def target(self) -> Target:
        return Target(self.name, self.port, self.proc.pid, self.admin_port,
                      traced="--tracing" in self.args, sslmode="require" if self.client_tls else "disable")


class OtlpSink:
    """``bench/otlp_sink.py`` in its own process: decodes and counts spans."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("otlp_sink.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            raise RuntimeError(f"OTLP sink did not start: {line!r}")
        self.endpoint = line[1]

    def _ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def count(self) -> int:
        return int(self._ask("count"))

    def phases_on(self) -> None:
        """From now on the sink also tallies statements by how their phases were split."""
        if self._ask("phases on").strip() != "ok":
            raise RuntimeError("OTLP sink did not take 'phases on'")

    def phases(self) -> dict[str, dict[str, int]]:
        """Per statement span name since :meth:`phases_on`: statements, split and joined (otlp_sink.PhaseTally)."""
        return json.loads(self._ask("phases"))

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def wait_export_idle(target: Target, timeout: float = 60.0) -> dict[str, float]:
    """Wait until the proxy has built and exported every span of the run; return its metrics.

    Idle means an empty queue and exported + dropped unchanged over three
    polls, so an export request in flight is waited for as well.
    """
    deadline = time.monotonic() + timeout
    last = None
    stable = 0
    while True:
        m = target.metrics()
        if not m:
            return m
        key = (m.get("spans_exported", 0), m.get("spans_dropped", 0), m.get("spans_started", 0))
        if m.get("span_queue_size", 0) == 0 and key == last:
            stable += 1
            if stable >= 3:
                return m
        else:
            stable = 0
        last = key
        if time.monotonic() > deadline:
            log.warning("%s: export still busy after %ss", target.name, timeout)
            return m
        time.sleep(0.2)


# --------------------------------------------------------------------------
# pgbench


def pgbench_env(sslmode: str = "disable") -> dict[str, str]:
    env = dict(os.environ, PGSSLMODE=sslmode, PGUSER="postgres")
    env.pop("PGPASSWORD", None)
    return env


def write_select_script(path: Path, accounts: int, traced: bool = True) -> Path:
    """The ``-S`` transaction; *traced*: with a sampled sqlcommenter traceparent, so every statement is sampled."""
    comment = f" /*traceparent='{TRACEPARENT}'*/" if traced else ""
    path.write_text(
        f"\\set aid random(1, {accounts})\n"
        f"SELECT abalance FROM pgbench_accounts WHERE aid = :aid{comment};\n"
    )
    return path


#: Settings of the benchmark database when a slow-mix cell runs (set before any connection, so that
#: PgBouncer's pooled server connections have them too): every join order of the slow statement's
#: ten-way join is searched, no genetic search. The -S select has no join, so no other cell changes.
SLOW_MIX_SETTINGS = {"join_collapse_limit": 20, "from_collapse_limit": 20, "geqo": "off"}
#: pgbench script weights of the slow mix: -S selects per slow statement.
SLOW_MIX_WEIGHTS = (20, 1)


def write_slow_script(path: Path, scale: int) -> Path:
    """The slow-mix statement, traced: a ten-way self-join of pgbench_branches planned exhaustively (tens of
    milliseconds with :data:`SLOW_MIX_SETTINGS`), then a 20 ms execution."""
    joins = " ".join(f"JOIN pgbench_branches b{i} ON b{i}.bid = b{i - 1}.bid" for i in range(1, 10))
    path.write_text(
        f"\\set bid random(1, {scale})\n"
        f"SELECT b0.bbalance, pg_sleep(0.02) FROM pgbench_branches b0 {joins} WHERE b0.bid = :bid"
        f" /*traceparent='{TRACEPARENT}'*/;\n"
    )
    return path


def latency_stats(prefix: Path) -> dict[str, Any]:
    """Mean, p50 and p99 (ms) from pgbench ``--log`` files ``<prefix>.<pid>[.<thread>]``; where the cell ran
    several scripts, the same of each script in ``by_script`` (in ``-f`` order)."""
    lats: list[int] = []
    of_script: dict[int, list[int]] = {}
    for name in glob.glob(f"{prefix}.*"):
        with open(name, encoding="ascii") as fh:
            for line in fh:
                parts = line.split()
                # client_id transaction_no time script_no time_epoch time_us: time is µs.
                if len(parts) >= 6 and parts[2].isdigit():
                    lats.append(int(parts[2]))
                    of_script.setdefault(int(parts[3]), []).append(int(parts[2]))
        os.unlink(name)
    stats = _latency_figures(lats)
    if len(of_script) > 1:
        stats["by_script"] = [_latency_figures(of_script.get(i, [])) for i in range(max(of_script) + 1)]
    return stats


def _latency_figures(lats: list[int]) -> dict[str, Any]:
    if not lats:
        return {"mean_ms": None, "p50_ms": None, "p99_ms": None, "logged": 0}
    lats.sort()
    n = len(lats)
    return {
        "mean_ms": sum(lats) / n / 1000,
        "p50_ms": lats[n // 2] / 1000,
        "p99_ms": lats[min(n - 1, int(n * 0.99))] / 1000,
        "logged": n,
    }


def check_server_tls(target: Target) -> None:
    """Fail unless the server connection behind *target* uses TLS exactly when its shape says so.

    The client leg needs no check (sslmode=require fails without TLS); the
    server leg could fall back to plain text unnoticed, and the cells would
    then compare something else than they say.
    """
    cmd = ["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(target.port), "-d", DBNAME,
           "-c", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"]
    res = subprocess.run(cmd, env=pgbench_env(target.sslmode), capture_output=True, text=True)
    want = "t" if split_target(target.name)[1] else "f"
    if res.returncode != 0 or res.stdout.strip() != want:
        raise RuntimeError(f"{target.name}: server connection TLS is {res.stdout.strip() or '?'}, "
                           f"expected {want}: {res.stderr.strip()}")


def run_pgbench(target: Target, *, script: Path | list[tuple[Path, int]], mode: str, clients: int, duration: float,
                logdir: Path) -> dict[str, Any]:
    """One pgbench cell against one target, with the middle process's CPU over it.

    *script*: one pgbench script, or (script, weight) pairs that pgbench picks from at random.
    """
    prefix = logdir / f"pgb-{target.name}-{mode}-{clients}"
    scripts = [str(script)] if isinstance(script, Path) else [f"{path}@{weight}" for path, weight in script]
    cmd = [
        "pgbench", "-n", "-h", "127.0.0.1", "-p", str(target.port),
        "-M", mode, "-c", str(clients), "-j", str(min(2, clients)),
        "-T", str(max(1, int(round(duration)))), *(a for f in scripts for a in ("-f", f)),
        "--log", f"--log-prefix={prefix}", DBNAME,
    ]
    before_m = target.metrics()
    parts0 = cpu_parts(target.pid) if target.admin_port is not None else None  # (a proxy: it has the admin port)
    cpu0 = cpu_seconds(target.pid) if target.pid else None
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=pgbench_env(target.sslmode), capture_output=True, text=True, cwd=str(logdir))
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"pgbench against {target.name} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    # Tracing work continues after the last answer; it belongs to this cell.
    after_m = wait_export_idle(target) if target.traced else target.metrics()
    cpu1 = cpu_seconds(target.pid) if target.pid else None
    parts1 = cpu_parts(target.pid) if parts0 is not None else None
    out = res.stdout
    tx = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    m = re.search(r"number of failed transactions: (\d+)", out)
    failed = int(m.group(1)) if m else 0
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    if m is None:  # pgbench prints no rates when no transaction finished in time
        raise RuntimeError(f"pgbench against {target.name}: no tps in its output:\n{out[-2000:]}{res.stderr[-2000:]}")
    tps = float(m.group(1))
    row: dict[str, Any] = {
        "target": target.name, "mode": mode, "clients": clients,
        "tps": tps, "transactions": tx, "failed": failed, "wall_s": wall,
    }
    row.update(latency_stats(prefix))
    if cpu0 is not None and tx:
        row["cpu_s"] = cpu1 - cpu0
        row["cpu_us_per_tx"] = (cpu1 - cpu0) / tx * 1e6
    else:
        row["cpu_s"] = row["cpu_us_per_tx"] = None
    if parts1 is not None and tx:
        for part in CPU_PARTS:
            # (the process's figure and its threads' are rounded to clock ticks each: "other", their
            # difference, can come out a tick below 0)
            row[f"cpu_{part}_us_per_tx"] = max(0.0, parts1[part] - parts0[part]) / tx * 1e6
    if after_m:
        for key in ("spans_exported", "spans_dropped", "statements_dropped", "statements", "spans_started"):
            row[key] = int(after_m.get(key, 0) - before_m.get(key, 0))
    return row


# --------------------------------------------------------------------------
# Data


def psql(pg: PgServer, sql: str, db: str = DBNAME) -> str:
    return pg.psql(sql, dbname=db)


def prepare_data(pg: PgServer, *, scale: int, bulk_mb: int, select_rows: int) -> dict[str, Any]:
    """pgbench tables, the COPY table (~bulk_mb of COPY text) and the many-row SELECT table."""
    if psql(pg, f"SELECT 1 FROM pg_database WHERE datname = '{DBNAME}'", db="postgres").strip() != "1":
        psql(pg, f"CREATE DATABASE {DBNAME}", db="postgres")
    t0 = time.monotonic()
    subprocess.run(
        ["pgbench", "-i", "-q", "-s", str(scale), "-h", str(pg.socket_dir), "-p", str(pg.port), DBNAME],
        env=pgbench_env(), check=True, capture_output=True,
    )
    # ~200 bytes of COPY text per row: id, tab, 192 hex characters, newline.
    bulk_rows = max(1, bulk_mb * 1_000_000 // 200)
    psql(pg, "DROP TABLE IF EXISTS bench_bulk, bench_rows")
    psql(pg, "CREATE TABLE bench_bulk AS SELECT g AS id, repeat(md5(g::text), 6) AS payload "
             f"FROM generate_series(1, {bulk_rows}) g")
    psql(pg, "CREATE TABLE bench_rows AS SELECT g AS id, g % 1000 AS n, md5(g::text) AS t "
             f"FROM generate_series(1, {select_rows}) g")
    psql(pg, "VACUUM ANALYZE bench_bulk")
    psql(pg, "VACUUM ANALYZE bench_rows")
    # Bytes the server sends for the SELECT: one DataRow per row (type, length,
    # column count, then a length and the text of each column), text format.
    select_bytes = int(psql(pg, "SELECT coalesce(sum(7 + 12 + length(id::text) + length(n::text) + length(t)), 0) "
                                "FROM bench_rows").strip())
    log.info("data ready in %.1fs: scale %s, %s bulk rows, %s select rows",
             time.monotonic() - t0, scale, bulk_rows, select_rows)
    return {"scale": scale, "accounts": scale * 100_000, "bulk_rows": bulk_rows,
            "select_rows": select_rows, "select_wire_bytes": select_bytes}


# --------------------------------------------------------------------------
# Bulk relay


def copy_out(target: Target, count_bytes: bool = False) -> dict[str, Any]:
    """``COPY bench_bulk TO STDOUT`` through *target* with psql; output discarded (or counted)."""
    cmd = ["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(target.port), "-d", DBNAME,
           "-c", "COPY bench_bulk TO STDOUT"]
    cpu0 = cpu_seconds(target.pid) if target.pid else None
    t0 = time.perf_counter()
    nbytes = None
    if count_bytes:
        with subprocess.Popen(cmd, env=pgbench_env(target.sslmode), stdout=subprocess.PIPE) as proc:
            nbytes = 0
            while chunk := proc.stdout.read(1 << 20):
                nbytes += len(chunk)
        rc = proc.returncode
    else:
        rc = subprocess.run(cmd, env=pgbench_env(target.sslmode), stdout=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"COPY through {target.name} failed ({rc})")
    cpu1 = cpu_seconds(target.pid) if target.pid else None
    return {"wall_s": wall, "bytes": nbytes, "cpu_s": None if cpu0 is None else cpu1 - cpu0}


def select_all(target: Target, script: Path, logdir: Path) -> dict[str, Any]:
    """One SELECT of every row of bench_rows through *target*: pgbench (libpq) reads and discards."""
    cmd = ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(target.port), "-c", "1", "-t", "1",
           "-f", str(script), DBNAME]
    cpu0 = cpu_seconds(target.pid) if target.pid else None
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=pgbench_env(target.sslmode), capture_output=True, text=True, cwd=str(logdir))
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"SELECT through {target.name} failed:\n{res.stderr[-2000:]}")
    m = re.search(r"latency average = ([0-9.]+) ms", res.stdout)
    cpu1 = cpu_seconds(target.pid) if target.pid else None
    return {"wall_s": float(m.group(1)) / 1000 if m else wall,
            "cpu_s": None if cpu0 is None else cpu1 - cpu0}


def run_bulk(targets: list[Target], data: dict[str, Any], repeat: int, logdir: Path) -> list[dict[str, Any]]:
    copy_bytes = copy_out(targets[0], count_bytes=True)["bytes"]
    select_script = logdir / "select_all.sql"
    select_script.write_text("SELECT id, n, t FROM bench_rows;\n")
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(repeat):
        for t in targets:  # interleaved, like the pgbench cells
            samples.setdefault(("copy", t.name), []).append(copy_out(t))
            samples.setdefault(("select", t.name), []).append(select_all(t, select_script, logdir))
            log.info("bulk %-12s copy %.2fs select %.2fs", t.name, samples[("copy", t.name)][-1]["wall_s"],
                     samples[("select", t.name)][-1]["wall_s"])
    rows = []
    for (kind, name), runs in samples.items():
        best = min(runs, key=lambda r: r["wall_s"])
        nbytes = copy_bytes if kind == "copy" else data["select_wire_bytes"]
        rows.append({
            "test": kind, "target": name, "bytes": nbytes, "wall_s": best["wall_s"],
            "mb_per_s": nbytes / best["wall_s"] / 1e6,
            "cpu_s_per_gb": None if best["cpu_s"] is None else best["cpu_s"] / (nbytes / 1e9),
            "runs_wall_s": [r["wall_s"] for r in runs],
        })
    speed = {(r["test"], r["target"]): r["mb_per_s"] for r in rows}
    for r in rows:
        direct, bouncer = references(r["target"])
        r["x_direct"] = r["mb_per_s"] / speed[(r["test"], direct)] if (r["test"], direct) in speed else None
        r["x_pgbouncer"] = (r["mb_per_s"] / speed[(r["test"], bouncer)]
                            if (r["test"], bouncer) in speed else None)
    return rows


# --------------------------------------------------------------------------
# Idle connections


async def _hold_connections(port: int, n: int, pid: int, settle: float) -> dict[str, Any]:
    import asyncpg

    async def connect():
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database=DBNAME,
                                     ssl=False, statement_cache_size=0, timeout=60)
        # One round trip, so PgBouncer really pairs the client with a server connection.
        await conn.execute("SELECT 1")
        return conn

    warm = await connect()
    await warm.close()
    await asyncio.sleep(settle)
    base = rss_kib(pid)
    sem = asyncio.Semaphore(32)

    async def one():
        async with sem:
            return await connect()

    conns = await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(settle)
    held = rss_kib(pid)
    await asyncio.gather(*(c.close() for c in conns))
    return {"connections": n, "rss_base_kib": base, "rss_held_kib": held,
            "kib_per_connection": (held - base) / n}


def idle_rss(starters: dict[str, Any], n: int, settle: float = 1.0) -> list[dict[str, Any]]:
    """RSS per idle connection, each target a FRESH process from ``starters[name]()``.

    A process that already served the pgbench cells has freed heap to hand
    out again, which would hide what a connection costs; and PgBouncer keeps
    its server connections pooled after its clients leave, which would use
    up max_connections for the next target.
    """
    rows = []
    for name, start in starters.items():
        middle = start()
        t = middle.target
        try:
            row = asyncio.run(_hold_connections(t.port, n, t.pid, settle))
        except Exception as exc:  # one failed target must not lose the whole run's results
            log.error("idle connections through %s failed: %r", t.name, exc)
            row = {"connections": n, "error": repr(exc)}
        finally:
            middle.stop()
        row["target"] = t.name
        rows.append(row)
        log.info("idle %s: %s", t.name, row)
        time.sleep(settle)  # let the backends of the closed connections exit
    return rows


# --------------------------------------------------------------------------
# Report


def add_ratios(cells: list[dict[str, Any]]) -> None:
    """Each cell's ratios to direct and to PgBouncer in the same mode, clients and round.

    The references are those of the cell's TLS shape (:func:`references`):
    ``proxy-on-tls`` is held to ``pgbouncer-tls`` and ``direct-tls``.
    """
    by_key: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    for c in cells:
        by_key.setdefault((c["mode"], c["clients"], c.get("round", 0)), {})[c["target"]] = c
    for group in by_key.values():
        for c in group.values():
            direct, bouncer = (group.get(ref) for ref in references(c["target"]))
            c["tps_x_direct"] = c["tps"] / direct["tps"] if direct and direct["tps"] else None
            c["tps_x_pgbouncer"] = c["tps"] / bouncer["tps"] if bouncer and bouncer["tps"] else None
            c["cpu_x_pgbouncer"] = (
                c["cpu_us_per_tx"] / bouncer["cpu_us_per_tx"]
                if bouncer and c.get("cpu_us_per_tx") is not None and bouncer.get("cpu_us_per_tx")
                else None)
            if direct and c["clients"] == 1 and direct.get("p50_ms") is not None and c.get("p50_ms") is not None:
                c["added_p50_us"] = (c["p50_ms"] - direct["p50_ms"]) * 1000
                c["added_p99_us"] = (c["p99_ms"] - direct["p99_ms"]) * 1000


#: Figures of a cell that combine_rounds gives as medians over the rounds; ratios are
#: taken within a round first (each against its neighbour cells), then their median.
_MEDIAN_KEYS = ("tps", "mean_ms", "p50_ms", "p99_ms", "cpu_us_per_tx", "tps_x_direct", "tps_x_pgbouncer",
                "cpu_x_pgbouncer", "added_p50_us", "added_p99_us", *(f"cpu_{part}_us_per_tx" for part in CPU_PARTS))
#: Counts that add up over the rounds.
_SUM_KEYS = ("transactions", "failed", "logged", "cpu_s", "wall_s", "spans_exported", "spans_dropped",
             "statements_dropped", "statements", "spans_started", "spans_received")


def _median(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def combine_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per mode, clients and target from several rounds of the same cells.

    Noise on a shared machine moves a 10 s cell by several per cent either
    way, and it moves neighbouring cells together more than cells minutes
    apart: so each round's ratios are taken first (add_ratios), and a cell
    reports their median, with the range over the rounds beside it
    (``*_range``). Counts (transactions, spans) are the sums over the rounds,
    and ``cpu_us_total_per_tx`` is the CPU of all rounds over their transactions.
    """
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["clients"], r["target"]), []).append(r)
    out = []
    for (mode, clients, target), rs in groups.items():
        cell: dict[str, Any] = {"target": target, "mode": mode, "clients": clients, "rounds": len(rs)}
        for key in _MEDIAN_KEYS:
            values = [r[key] for r in rs if r.get(key) is not None]
            cell[key] = _median(values) if values else None
            if key.startswith(("tps", "cpu_x")) and values:
                cell[key + "_range"] = [min(values), max(values)]
        for key in _SUM_KEYS:
            values = [r[key] for r in rs if r.get(key) is not None]
            cell[key] = sum(values) if values else None
        if cell["cpu_s"] is not None and cell["transactions"]:
            cell["cpu_us_total_per_tx"] = cell["cpu_s"] / cell["transactions"] * 1e6
        out.append(cell)
    return out


def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _range(pair: list[float] | None) -> str:
    return "-" if not pair else f"{pair[0]:.2f}–{pair[1]:.2f}"


def _cell_table(cells: list[dict[str, Any]], ranged: bool) -> list[str]:
    """The pgbench cells as rows of text: figures, ratios, spans and drops."""
    head = (f"{'mode':<9}{'cl':>3} {'target':<15}{'tps':>9}{'×dir':>6}{'×pgb':>6}"
            f"{'mean ms':>9}{'p99 ms':>8}{'cpu µs/tx':>10}{'×pgb':>6}{'spans/tx':>9}{'exp':>9}{'drop':>7}{'st.drop':>8}")
    if ranged:
        head += f"{'tps ×pgb range':>16}{'cpu ×pgb range':>16}"
    lines = [head, "-" * len(head)]
    for c in cells:
        spans_tx = (c["spans_exported"] / c["transactions"]
                    if c.get("spans_exported") is not None and c["transactions"] else None)
        lines.append(
            f"{c['mode']:<9}{c['clients']:>3} {c['target']:<15}{c['tps']:>9.0f}"
            f"{_f(c.get('tps_x_direct'), '.2f'):>6}{_f(c.get('tps_x_pgbouncer'), '.2f'):>6}"
            f"{_f(c.get('mean_ms'), '.3f'):>9}{_f(c.get('p99_ms'), '.3f'):>8}"
            f"{_f(c.get('cpu_us_per_tx'), '.1f'):>10}{_f(c.get('cpu_x_pgbouncer'), '.2f'):>6}"
            f"{_f(spans_tx, '.2f'):>9}{_f(c.get('spans_exported'), 'd'):>9}{_f(c.get('spans_dropped'), 'd'):>7}"
            f"{_f(c.get('statements_dropped'), 'd'):>8}"
            + (f"{_range(c.get('tps_x_pgbouncer_range')):>16}{_range(c.get('cpu_x_pgbouncer_range')):>16}"
               if ranged else ""))
    return lines


def format_tables(results: dict[str, Any]) -> str:
    lines = []
    ranged = any(c.get("tps_x_pgbouncer_range") for c in results["pgbench"])
    if ranged:
        rounds = max(c.get("rounds", 1) for c in results["pgbench"])
        lines.append(f"medians of {rounds} interleaved rounds; ranges: tps ×pgb and cpu ×pgb over the rounds")
    if results["pgbench"]:
        lines += _cell_table(results["pgbench"], ranged)
    added = [c for c in results["pgbench"]
             if c.get("added_p50_us") is not None and not c["target"].startswith("direct")]
    if added:
        lines += ["", "latency added over direct (of the same TLS shape) at 1 client (µs)",
                  f"{'mode':<9} {'target':<15}{'p50':>8}{'p99':>8}"]
        for c in added:
            lines.append(f"{c['mode']:<9} {c['target']:<15}{c['added_p50_us']:>8.0f}{c['added_p99_us']:>8.0f}")
    split = [(c, "") for c in results["pgbench"] if c.get("cpu_loop_us_per_tx") is not None]
    split += [(c, " (sustained)") for c in results.get("sustained", []) if c.get("cpu_loop_us_per_tx") is not None]
    if split:
        lines += ["", "the proxies' CPU by part (µs a transaction, medians): the event loop (reading the pump's log, "
                      "packing records), the pump thread (the compiled relay), other threads, the processes below "
                      "(the span process; workers)",
                  f"{'mode':<9}{'cl':>3} {'target':<27}{'loop':>7}{'pump':>7}{'other':>7}{'below':>7}{'total':>7}"]
        for c, cell in split:
            lines.append(f"{c['mode']:<9}{c['clients']:>3} {c['target'] + cell:<27}"
                         + "".join(f"{_f(c.get(f'cpu_{part}_us_per_tx'), '.2f'):>7}" for part in CPU_PARTS)
                         + f"{_f(c.get('cpu_us_per_tx'), '.2f'):>7}")
    if results.get("sustained"):
        first = results["sustained"][0]
        lines += ["", f"sustained cell: {first['mode']}, {first['clients']} clients, "
                      f"{results['options']['sustained']:g} s per target"]
        lines += _cell_table(results["sustained"], False)
    if results.get("slow_mix"):
        first = results["slow_mix"][0]
        weights = results.get("slow_mix_weights", SLOW_MIX_WEIGHTS)
        lines += ["", f"slow-mix cell: {first['mode']}, {first['clients']} clients, "
                      f"{results['options']['slow_mix']:g} s per target, -S select : slow statement = "
                      f"{weights[0]} : {weights[1]}"]
        lines += _cell_table(results["slow_mix"], False)
        lines += ["", "latency by statement in the slow-mix cell (ms)",
                  f"{'target':<15} {'statement':<12}{'count':>8}{'mean':>9}{'p50':>9}{'p99':>9}"]
        for c in results["slow_mix"]:
            for label, r in zip(("-S select", "slow"), c.get("by_script", [])):
                lines.append(f"{c['target']:<15} {label:<12}{r['logged']:>8d}{_f(r['mean_ms'], '.3f'):>9}"
                             f"{_f(r['p50_ms'], '.3f'):>9}{_f(r['p99_ms'], '.3f'):>9}")
        lines += ["", "statement spans the receiver got in the slow-mix cell, by name (split: parse, plan and "
                      "execute each a span of its own, exact; joined: one span held several phases)",
                  f"{'target':<15} {'statement':<28}{'spans':>8}{'split':>8}{'joined':>8}"]
        for c in results["slow_mix"]:
            for name, r in sorted(c.get("phases_by_statement", {}).items()):
                lines.append(f"{c['target']:<15} {name:<28}{r['statements']:>8d}{r['split']:>8d}{r['joined']:>8d}")
    if results.get("proxies"):
        lines += ["", "traced proxies over the whole run (warm-up, every round, the sustained and slow-mix cells); "
                      f"spans the receiver decoded: {results.get('spans_received_total', '-')}",
                  "(kept: failed or slow statements traced whatever the sampling; explains: EXPLAINs the "
                  "side connection ran / failed / skipped, e.g. for $n parameters before PostgreSQL 16)",
                  f"{'target':<15}{'alive':>6}{'statements':>12}{'st.drop':>9}{'spans exp':>11}{'drop':>8}"
                  f"{'kept':>7}{'explains':>14}"]
        for r in results["proxies"]:
            explains = f"{r.get('explains_run', 0)}/{r.get('explains_failed', 0)}/{r.get('explains_skipped', 0)}"
            lines.append(f"{r['target']:<15}{'yes' if r['alive'] else 'NO':>6}{r['statements']:>12d}"
                         f"{r['statements_dropped']:>9d}{r['spans_exported']:>11d}{r['spans_dropped']:>8d}"
                         f"{r.get('statements_kept', 0):>7d}{explains:>14}")
    if results.get("bulk"):
        lines += ["", f"{'bulk':<7} {'target':<15}{'MB':>8}{'MB/s':>9}{'×dir':>6}{'×pgb':>6}{'cpu s/GB':>10}"]
        for r in results["bulk"]:
            lines.append(f"{r['test']:<7} {r['target']:<15}{r['bytes'] / 1e6:>8.0f}{r['mb_per_s']:>9.0f}"
                         f"{_f(r['x_direct'], '.2f'):>6}{_f(r.get('x_pgbouncer'), '.2f'):>6}"
                         f"{_f(r['cpu_s_per_gb'], '.2f'):>10}")
    if results.get("idle"):
        lines += ["", f"{'idle':<7} {'target':<15}{'conns':>6}{'base MiB':>10}{'held MiB':>10}{'KiB/conn':>10}"]
        for r in results["idle"]:
            if "error" in r:
                lines.append(f"{'':<7} {r['target']:<15} failed: {r['error']}")
                continue
            lines.append(f"{'':<7} {r['target']:<15}{r['connections']:>6}{r['rss_base_kib'] / 1024:>10.1f}"
                         f"{r['rss_held_kib'] / 1024:>10.1f}{r['kib_per_connection']:>10.1f}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), "")
    except OSError:
        pass
    pgb = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    try:
        pgb_version = subprocess.run([pgb, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        pgb_version = None
    return {
        "cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
        "python": platform.python_version(), "pgbouncer": pgb_version,
        # Other work on the machine during the run shows here.
        "loadavg_at_end": os.getloadavg(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


# --------------------------------------------------------------------------
# Orchestration


@dataclass
class Options:
    duration: float = 10.0
    modes: tuple[str, ...] = MODES
    clients: tuple[int, ...] = CLIENTS
    targets: tuple[str, ...] = TARGETS
    scale: int = 10
    bulk_mb: int = 1000
    select_rows: int = 5_000_000
    bulk_repeat: int = 2
    idle_conns: int = 1000
    idle_settle: float = 1.0
    warmup: float = 2.0
    rounds: int = 1
    #: seconds of the sustained prepared-statement cell after the rounds (0: none)
    sustained: float = 0.0
    sustained_clients: int = 8
    #: seconds of the slow-mix cell after the sustained one (0: none)
    slow_mix: float = 0.0
    slow_mix_clients: int = 4
    workdir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def proxy_totals(proxies: list[ProxyProcess]) -> list[dict[str, Any]]:
    """What each traced proxy counted since it started, and whether it is still the same process."""
    out = []
    for p in proxies:
        t = p.target
        if not t.traced:
            continue
        alive = p.proc.poll() is None
        m = wait_export_idle(t) if alive else {}
        out.append({"target": t.name, "pid": t.pid, "alive": alive,
                    **{key: int(m.get(key, 0)) for key in ("statements", "statements_dropped", "spans_started",
                                                           "spans_exported", "spans_dropped", "statements_kept",
                                                           "explains_run", "explains_failed", "explains_skipped")}})
    return out


def run_bench(pg: PgServer, opts: Options) -> dict[str, Any]:
    """Every measurement against an already running *pg*; returns the results document."""
    raise_fd_limit(max(4096, 3 * opts.idle_conns + 512))
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="pgotel-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_at_start = os.getloadavg()
    # The SELECT table serves the bulk test only.
    data = prepare_data(pg, scale=opts.scale, bulk_mb=opts.bulk_mb, select_rows=opts.select_rows if opts.bulk_mb else 0)
    for name, value in SLOW_MIX_SETTINGS.items() if opts.slow_mix > 0 else ():
        psql(pg, f"ALTER DATABASE {DBNAME} SET {name} = {value}")
    traced_script = write_select_script(workdir / "select_traced.sql", data["accounts"])
    slow_script = write_slow_script(workdir / "slow_traced.sql", data["scale"])
    root_script = write_select_script(workdir / "select_root.sql", data["accounts"], traced=False)

    def script_of(target: Target) -> Path:
        return root_script if split_target(target.name)[0] in ROOT_SAMPLED else traced_script

    sink: OtlpSink | None = None
    bouncers: list[PgBouncer] = []
    proxies: list[ProxyProcess] = []
    targets: list[Target] = []
    for name in opts.targets:
        check_target(name)
    if any(split_target(name)[1] for name in opts.targets) and not pg.ssl:
        raise RuntimeError("TLS targets need PostgreSQL with TLS (trustme installed, a server built with OpenSSL)")
    # What the middles present to clients on the "-tls2" shape: the test CA's proxy certificate.
    client_tls = (pg.certs["proxy_cert"], pg.certs["proxy_key"]) if pg.ssl else None
    try:
        for name in opts.targets:
            base, shape = split_target(name)
            if base == "direct":
                targets.append(Target(name, pg.port, sslmode="require" if shape else "disable"))
            elif base == "pgbouncer":
                binary = ensure_pgbouncer()
                if binary is None:
                    log.warning("pgbouncer not available: skipping %s", name)
                    continue
                bouncer = PgBouncer(binary, pg, max(64, opts.idle_conns), name=name, server_tls=bool(shape),
                                    client_tls=client_tls if shape == "-tls2" else None).start()
                bouncers.append(bouncer)
                targets.append(bouncer.target)
            else:
                if sink is None and "--tracing" in PROXY_FLAGS[base]:
                    sink = OtlpSink()
                p = ProxyProcess(name, pg, workdir, sink.endpoint if sink else None, PROXY_FLAGS[base],
                                 upstream_tls="require" if shape else "disable",
                                 client_tls=client_tls if shape == "-tls2" else None).start()
                proxies.append(p)
                targets.append(p.target)
        for t in targets:
            check_server_tls(t)
        # Warm every path once (connection set-up, imports, caches) outside the measurements.
        for t in targets if opts.warmup > 0 else ():
            run_pgbench(t, script=script_of(t), mode="prepared", clients=2, duration=opts.warmup, logdir=workdir)
        rounds = []
        for rnd in range(opts.rounds):
            # Each round starts the order of targets one further along, so that no
            # target always follows the same one (a cell can inherit its predecessor's
            # leftovers: dirty caches, a span process still exporting, TCP TIME_WAITs).
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)] if targets else []
            for mode in opts.modes:
                for clients in opts.clients:
                    for t in order:
                        spans0 = sink.count() if sink and t.traced else None
                        row = run_pgbench(t, script=script_of(t), mode=mode, clients=clients,
                                          duration=opts.duration, logdir=workdir)
                        if spans0 is not None and row.get("spans_exported") is not None:
                            row["spans_received"] = sink.count() - spans0
                        row["round"] = rnd
                        rounds.append(row)
                        log.info("%-8s %2d %-12s %8.0f tps  cpu/tx %s µs%s", mode, clients, t.name, row["tps"],
                                 _f(row.get("cpu_us_per_tx"), ".1f"),
                                 f"  (round {rnd + 1}/{opts.rounds})" if opts.rounds > 1 else "")
        add_ratios(rounds)
        cells = combine_rounds(rounds) if opts.rounds > 1 else rounds
        sustained = []
        for t in targets if opts.sustained > 0 else ():
            # One long cell per target on the processes that served every round:
            # a span process that falls behind shows as drops here.
            spans0 = sink.count() if sink and t.traced else None
            row = run_pgbench(t, script=script_of(t), mode="prepared", clients=opts.sustained_clients,
                              duration=opts.sustained, logdir=workdir)
            if spans0 is not None and row.get("spans_exported") is not None:
                row["spans_received"] = sink.count() - spans0
            sustained.append(row)
            log.info("sustained %-15s %8.0f tps  cpu/tx %s µs  dropped %s statements, %s spans", t.name,
                     row["tps"], _f(row.get("cpu_us_per_tx"), ".1f"), row.get("statements_dropped", "-"),
                     row.get("spans_dropped", "-"))
        add_ratios(sustained)
        slow_mix = []
        for t in targets if opts.slow_mix > 0 else ():
            if sink and t.traced:
                sink.phases_on()
            row = run_pgbench(t, script=[(script_of(t), SLOW_MIX_WEIGHTS[0]), (slow_script, SLOW_MIX_WEIGHTS[1])],
                              mode="extended", clients=opts.slow_mix_clients, duration=opts.slow_mix, logdir=workdir)
            if sink and t.traced:
                row["phases_by_statement"] = sink.phases()
            slow_mix.append(row)
            log.info("slow mix %-15s %8.0f tps  split %s", t.name, row["tps"],
                     {k: f"{v['split']}/{v['statements']}" for k, v in row.get("phases_by_statement", {}).items()})
        add_ratios(slow_mix)
        whole_run = proxy_totals(proxies)
        spans_received_total = sink.count() if sink else None
        bulk = run_bulk(targets, data, opts.bulk_repeat, workdir) if opts.bulk_mb else []
        for p in proxies:
            p.stop()
        for bouncer in bouncers:
            bouncer.stop()
        starters: dict[str, Any] = {}
        for name in ("proxy-off", "proxy-on"):
            if name in opts.targets:
                starters[name] = functools.partial(
                    lambda name: ProxyProcess(name, pg, workdir, sink.endpoint if sink else None,
                                              PROXY_FLAGS[name]).start(), name)
        if "pgbouncer" in [b.name for b in bouncers]:
            starters["pgbouncer"] = lambda: PgBouncer(bouncers[0].binary, pg, opts.idle_conns).start()
        idle = idle_rss(starters, opts.idle_conns, opts.idle_settle) if opts.idle_conns else []
    finally:
        for p in proxies:
            p.stop()
        for bouncer in bouncers:
            bouncer.stop()
        if sink is not None:
            sink.stop()
        if opts.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "started": started.isoformat(timespec="seconds"),
        "machine": {**machine(), "loadavg_at_start": load_at_start},
        "postgres_major": pg.major,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()
                    if k not in ("workdir", "extra")},
        "data": data,
        "pgbench": cells,
        # every cell of every round as measured (``pgbench`` holds their medians when rounds > 1)
        **({"pgbench_rounds": rounds} if opts.rounds > 1 else {}),
        "sustained": sustained,
        "slow_mix": slow_mix,
        **({"slow_mix_weights": list(SLOW_MIX_WEIGHTS)} if slow_mix else {}),
        # each traced proxy's own counters over everything it served, and the receiver's total
        "proxies": whole_run,
        "spans_received_total": spans_received_total,
        "bulk": bulk,
        "idle": idle,
    }


def parse_args(argv: list[str] | None) -> tuple[Options, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s cells, fewer cells, smaller bulk data")
    ap.add_argument("--out", type=Path, help="JSON results file (default bench/results/<date>.json)")
    ap.add_argument("--duration", type=float, help="seconds per pgbench cell (default 10, quick 2)")
    ap.add_argument("--modes", help="comma-separated: simple,extended,prepared")
    ap.add_argument("--clients", help="comma-separated client counts (default 1,8,32)")
    sets = ", ".join(f"{k} ({','.join(v)})" for k, v in TARGET_SETS.items())
    ap.add_argument("--targets", help=f"comma-separated targets: {','.join(TARGETS)}, any of them but direct "
                                      "with -tls (TLS to PostgreSQL) or -tls2 (TLS on both legs), direct-tls; "
                                      f"or a set: {sets} (default: plain)")
    ap.add_argument("--scale", type=int, help="pgbench scale (default 10)")
    ap.add_argument("--bulk-mb", type=int, help="size of the COPY table in MB of COPY text "
                                                 "(default 1000, quick 300; 0 skips bulk)")
    ap.add_argument("--select-rows", type=int, help="rows of the bulk SELECT (default 5M, quick 1M)")
    ap.add_argument("--idle-conns", type=int, help="idle connections for the RSS test (default 1000, 0 skips)")
    ap.add_argument("--rounds", type=int, help="run every cell this many times, interleaved, and report medians "
                                                "of the per-round ratios with their range (default 1; 0: none, "
                                                "for the sustained or slow-mix cell alone)")
    ap.add_argument("--sustained", type=float, help="after the rounds, one cell of this many seconds per target, "
                                                    "prepared statements (default 0: none)")
    ap.add_argument("--sustained-clients", type=int, help="clients of the sustained cell (default 8)")
    ap.add_argument("--slow-mix", type=float, help="after the sustained cell, one cell of this many seconds per target: "
                                                   "the -S select mixed with a statement slow to plan and execute, "
                                                   "extended protocol, phase splits counted (default 0: none)")
    ap.add_argument("--slow-mix-clients", type=int, help="clients of the slow-mix cell (default 4)")
    ap.add_argument("--keep", type=Path, help="keep logs and pgbench files in this directory")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    opts = Options()
    if args.quick:
        opts.duration, opts.clients, opts.modes = 2.0, (1, 32), ("simple", "prepared")
        opts.bulk_mb, opts.select_rows, opts.bulk_repeat, opts.warmup = 300, 1_000_000, 1, 1.0
    if args.duration is not None:
        opts.duration = args.duration
    if args.modes:
        opts.modes = tuple(m.strip() for m in args.modes.split(","))
        bad = set(opts.modes) - set(MODES)
        if bad:
            ap.error(f"unknown modes {sorted(bad)}")
    if args.clients:
        opts.clients = tuple(int(c) for c in args.clients.split(","))
    if args.targets:
        names: list[str] = []
        for t in (t.strip() for t in args.targets.split(",")):
            names += [n for n in TARGET_SETS.get(t, (t,)) if n not in names]
        opts.targets = tuple(names)
        for name in opts.targets:
            try:
                check_target(name)
            except ValueError as exc:
                ap.error(str(exc))
    for name in ("scale", "bulk_mb", "select_rows", "idle_conns", "rounds", "sustained", "sustained_clients",
                 "slow_mix", "slow_mix_clients"):
        if getattr(args, name) is not None:
            setattr(opts, name, getattr(args, name))
    if opts.rounds < 0:
        ap.error("--rounds must not be negative")
    opts.workdir = args.keep
    return opts, args


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    for tool in ("pgbench", "psql"):
        if not shutil.which(tool):
            print(f"bench: {tool} not found on PATH", file=sys.stderr)
            return 2
    # Room for the idle-connection test, plus what pgbench and the tools use.
    settings = {
        "max_connections": max(300, opts.idle_conns + 100),
        # The test fixture logs a plan for every statement; a benchmark must not.
        "auto_explain.log_min_duration": -1,
        "auto_explain.log_analyze": False,
        "shared_buffers": "512MB",
    }
    # TLS targets need the server's TLS; plain runs keep the default (on where the build has it).
    with PgServer(settings=settings, ssl=True if any(split_target(t)[1] for t in opts.targets) else None) as pg:
        results = run_bench(pg, opts)
    print(format_tables(results))
    out = args.out or _ROOT / "bench" / "results" / f"{results['started'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
