"""Soak: a mixed workload through the proxy, tracing every statement, for minutes; nothing may fail or grow.

This module owns the soak run (not a test, not run in CI). It starts a
throwaway PostgreSQL (:class:`pgserver.PgServer`), the proxy through its real
CLI (its own process, so ``/proc/<pid>`` is the proxy's alone) with tracing at
100 % exporting OTLP/HTTP to a checking receiver in a third process, and
drives, all on loopback, for ``--minutes`` (default 10):

* psycopg threads: simple and extended queries with sqlcommenter
  traceparents, transactions, ``executemany``, pipelines, COPY in and out,
  server-side cursors, a reconnect every few hundred iterations;
* asyncpg tasks on one event loop: parameterised fetches, prepared
  statements, transactions, reconnects;
* a pgbench process (TPC-B-like, prepared protocol, rate-limited).

Every 10 s it samples the RSS of the proxy and its span process, the proxy's
open file descriptors, its admin
metrics and the workload counters. At the end it prints a table and writes
JSON, and exits non-zero when:

* any transaction failed (psycopg, asyncpg or pgbench);
* any exported span is malformed (the receiver decodes the real protobuf and
  checks ids, parent links, names, kinds, timestamps and attribute types);
* RSS grew after warm-up by more than ``max(30 MB, 25 %)`` of its value at the
  end of warm-up (first ``--warmup`` minutes, default 2, or a fifth of short runs);
* open file descriptors grew after warm-up by more than 16.

Usage: ``python bench/soak.py [--minutes N] [--out FILE]``; run as root
(PostgreSQL runs as the unprivileged :data:`pgserver.TEST_OS_USER`).
``--sink`` is the receiver's own entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SAMPLE_EVERY = 10.0
RSS_GROWTH_MB = 30.0
RSS_GROWTH_RATIO = 0.25
FD_GROWTH = 16
DBNAME = "pgotel_soak"


# --------------------------------------------------------------------------
# The checking receiver (its own process: ``soak.py --sink``)


def _span_problems(span, seen_server: OrderedDict) -> list[str]:
    """What is wrong with one decoded span (empty when it is well-formed)."""
    bad = []
    if not re.fullmatch(r"[0-9a-f]{32}", span.trace_id) or int(span.trace_id, 16) == 0:
        bad.append(f"trace id {span.trace_id!r}")
    if not re.fullmatch(r"[0-9a-f]{16}", span.span_id) or int(span.span_id, 16) == 0:
        bad.append(f"span id {span.span_id!r}")
    if span.parent_span_id is not None and not re.fullmatch(r"[0-9a-f]{16}", span.parent_span_id):
        bad.append(f"parent id {span.parent_span_id!r}")
    if not span.name or len(span.name) > 255:
        bad.append(f"name {span.name[:40]!r}")
    if span.kind not in ("SERVER", "INTERNAL"):
        bad.append(f"kind {span.kind}")
    if not 0 < span.start_ns <= span.end_ns:
        bad.append(f"times {span.start_ns}..{span.end_ns}")
    if len(span.attributes) > 128:
        bad.append(f"{len(span.attributes)} attributes")
    for key, value in span.attributes.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):  # pgotel.phases
            continue
        if not isinstance(value, (str, bool, int, float)):
            bad.append(f"attribute {key} of type {type(value).__name__}")
        elif isinstance(value, str) and len(value) > 70_000:
            bad.append(f"attribute {key} of {len(value)} chars")
    if span.kind == "SERVER":
        for key in ("db.system.name", "db.namespace"):
            if not isinstance(span.attributes.get(key), str):
                bad.append(f"SERVER span without {key}")
    held = span.name.split("+")
    if span.kind == "INTERNAL" and all(p in ("parse", "plan", "execute") for p in held):
        if not isinstance(span.attributes.get("pgotel.timing.exact"), bool):
            bad.append("phase span without pgotel.timing.exact")
        if len(held) > 1 and span.attributes.get("pgotel.phases") != held:
            bad.append("phase span whose pgotel.phases is not its name's")
    if span.resource.get("service.name") in (None, ""):
        bad.append("no service.name")
    return bad


def sink_main() -> int:
    from otlp_receiver import OtlpReceiver

    class CheckingReceiver(OtlpReceiver):
        """Decodes every request, checks every span, keeps counts and a bounded window of ids."""

        def __init__(self) -> None:
            super().__init__(grpc_enabled=False)
            self.lock = threading.Lock()
            self.counts: Counter = Counter()
            self.names: Counter = Counter()
            self.examples: list[str] = []
            self.server_ids: OrderedDict = OrderedDict()  # (trace, span) of SERVER spans, bounded
            self.waiting: OrderedDict = OrderedDict()  # phase spans whose parent has not arrived yet

        def _store(self, spans) -> None:
            with self.lock:
                for s in spans:
                    if s.kind == "SERVER":
                        self.server_ids[(s.trace_id, s.span_id)] = None
                        if len(self.server_ids) > 500_000:
                            self.server_ids.popitem(last=False)
                for s in spans:
                    self.counts["spans"] += 1
                    self.counts[s.kind] += 1
                    if s.kind == "SERVER":
                        self.names[s.name.split(" ")[0]] += 1
                    bad = _span_problems(s, self.server_ids)
                    if s.kind == "INTERNAL" and s.parent_span_id is None:
                        bad.append("phase span without a parent")
                    if bad:
                        self.counts["malformed"] += 1
                        if len(self.examples) < 20:
                            self.examples.append(f"{s.describe()}: {', '.join(bad)}")
                    if s.kind == "INTERNAL" and s.parent_span_id is not None:
                        if (s.trace_id, s.parent_span_id) not in self.server_ids:
                            self.waiting[(s.trace_id, s.parent_span_id)] = s.name
                # A parent may arrive in a later request than its phase spans.
                for key in [k for k in self.waiting if k in self.server_ids]:
                    del self.waiting[key]
                while len(self.waiting) > 100_000:
                    self.waiting.popitem(last=False)
                    self.counts["orphans_forgotten"] += 1

        def report(self) -> dict[str, Any]:
            with self.lock:
                return {"counts": dict(self.counts), "names": dict(self.names.most_common(20)),
                        "orphans": len(self.waiting), "examples": list(self.examples),
                        "requests": self.request_counts}

    receiver = CheckingReceiver()
    receiver.start()
    print(f"ready {receiver.http_endpoint}", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "report":
                print(json.dumps(receiver.report()), flush=True)
    finally:
        receiver.stop()
    return 0


class Sink:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--sink"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            raise RuntimeError(f"receiver did not start: {line!r}")
        self.endpoint = line[1]

    def report(self) -> dict[str, Any]:
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(15)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


# --------------------------------------------------------------------------
# The proxy process and what /proc says about it


def rss_mb(pid: int) -> float:
    """Resident memory of the proxy and its live descendants (its span process), in MB."""
    from run import rss_kib

    return rss_kib(pid) / 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proxy_metrics(admin_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^pgotel_(\w+?)(?:_total)? ([0-9.eE+-]+)$", text, re.M)}


# --------------------------------------------------------------------------
# Workloads


def traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


class Tally:
    """Transactions done and failed per workload, shared by threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok: Counter = Counter()
        self.failed: Counter = Counter()
        self.errors: list[str] = []

    def done(self, who: str, n: int = 1) -> None:
        with self.lock:
            self.ok[who] += n

    def fail(self, who: str, exc: BaseException) -> None:
        with self.lock:
            self.failed[who] += 1
            if len(self.errors) < 20:
                self.errors.append(f"{who}: {type(exc).__name__}: {exc}")


def psycopg_worker(n: int, dsn: str, stop: threading.Event, tally: Tally, pause: float) -> None:
    import psycopg

    rnd = random.Random(n)
    conn = None
    i = 0
    while not stop.is_set():
        try:
            if conn is None or i % 300 == 0:
                if conn is not None:
                    conn.close()
                conn = psycopg.connect(dsn, autocommit=True, application_name=f"soak-psycopg-{n}")
            i += 1
            tp = traceparent()
            kind = i % 8
            if kind == 0:
                conn.execute(f"SELECT count(*) FROM soak_items /*traceparent='{tp}'*/").fetchone()
            elif kind == 1:
                conn.execute(f"SELECT id, v FROM soak_items WHERE id = %s /*traceparent='{tp}'*/",
                             (rnd.randint(1, 1000),)).fetchall()
            elif kind == 2:
                with conn.transaction():
                    conn.execute("UPDATE soak_items SET v = v || 'x' WHERE id = %s", (rnd.randint(1, 1000),))
                    conn.execute("INSERT INTO soak_log (who, note) VALUES (%s, %s)", (f"p{n}", "update"))
            elif kind == 3:
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO soak_log (who, note) VALUES (%s, %s)",
                                    [(f"p{n}", f"many {k}") for k in range(5)])
            elif kind == 4:
                with conn.pipeline():
                    for k in range(4):
                        conn.execute("SELECT %s::int * 2", (k,))
            elif kind == 5:
                with conn.cursor() as cur:
                    with cur.copy("COPY soak_log (who, note) FROM STDIN") as copy:
                        for k in range(20):
                            copy.write_row((f"p{n}", f"copy {k}"))
                    with cur.copy("COPY (SELECT * FROM soak_items LIMIT 200) TO STDOUT") as copy:
                        for _ in copy:
                            pass
            elif kind == 6:
                with conn.transaction(), conn.cursor(name=f"soak_cur_{n}") as cur:
                    cur.execute("SELECT g, md5(g::text) FROM generate_series(1, 500) g")
                    while cur.fetchmany(100):
                        pass
            else:
                conn.execute("SELECT pg_sleep(0.005), now()")
            # Trim the log now and then so the table does not grow for the whole run.
            if i % 500 == 0:
                conn.execute("DELETE FROM soak_log WHERE id < (SELECT max(id) - 20000 FROM soak_log)")
            tally.done("psycopg")
            time.sleep(pause)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            tally.fail("psycopg", exc)
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
            conn = None
            time.sleep(0.1)
    if conn is not None:
        conn.close()


async def asyncpg_task(n: int, port: int, stop: threading.Event, tally: Tally, pause: float) -> None:
    import asyncpg

    conn = None
    i = 0
    while not stop.is_set():
        try:
            if conn is None or i % 250 == 0:
                if conn is not None:
                    await conn.close()
                conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database=DBNAME,
                                             ssl=False)
                stmt = await conn.prepare("SELECT id, v FROM soak_items WHERE id = $1")
            i += 1
            kind = i % 4
            if kind == 0:
                await conn.fetch(f"SELECT $1::int + 1 AS x /*traceparent='{traceparent()}'*/", i)
            elif kind == 1:
                await stmt.fetchrow(i % 1000 + 1)
            elif kind == 2:
                async with conn.transaction():
                    await conn.execute("INSERT INTO soak_log (who, note) VALUES ($1, $2)", f"a{n}", "tx")
                    await conn.fetchval("SELECT count(*) FROM soak_items WHERE id < $1", 50)
            else:
                await conn.executemany("INSERT INTO soak_log (who, note) VALUES ($1, $2)",
                                       [(f"a{n}", f"m{k}") for k in range(3)])
            tally.done("asyncpg")
            await asyncio.sleep(pause)
        except Exception as exc:  # noqa: BLE001
            tally.fail("asyncpg", exc)
            if conn is not None:
                try:
                    await conn.close()
                except Exception:  # noqa: BLE001
                    pass
            conn = None
            await asyncio.sleep(0.1)
    if conn is not None:
        await conn.close()


def asyncpg_thread(tasks: int, port: int, stop: threading.Event, tally: Tally, pause: float) -> None:
    async def main() -> None:
        await asyncio.gather(*(asyncpg_task(k, port, stop, tally, pause) for k in range(tasks)))

    asyncio.run(main())


def pgbench_env() -> dict[str, str]:
    env = dict(os.environ, PGSSLMODE="disable", PGUSER="postgres")
    env.pop("PGPASSWORD", None)
    return env


# --------------------------------------------------------------------------
# The run


def prepare(pg) -> None:
    pg.psql(f"CREATE DATABASE {DBNAME}")
    pg.psql(
        "CREATE TABLE soak_items (id int PRIMARY KEY, v text);"
        "INSERT INTO soak_items SELECT g, 'v' || g FROM generate_series(1, 1000) g;"
        "CREATE TABLE soak_log (id bigserial PRIMARY KEY, who text, note text, at timestamptz DEFAULT now());",
        dbname=DBNAME,
    )
    subprocess.run(["pgbench", "-i", "-q", "-s", "2", "-h", pg.host, "-p", str(pg.port), DBNAME],
                   env=pgbench_env(), check=True, capture_output=True)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def judge(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Growth of RSS and fds after warm-up, against the stated bounds."""
    after = [s for s in samples if s["t"] >= warmup_s]
    if len(after) < 3:
        return {"ok": False, "why": "too few samples after warm-up"}
    base_rss = after[0]["rss_mb"]
    tail = after[-3:]
    end_rss = _median([s["rss_mb"] for s in tail])
    peak_rss = max(s["rss_mb"] for s in after)
    allowed = max(RSS_GROWTH_MB, RSS_GROWTH_RATIO * base_rss)
    base_fds = _median([s["fds"] for s in after[:3]])
    end_fds = _median([s["fds"] for s in tail])
    # Least-squares slope of RSS after warm-up, for the record.
    ts = [s["t"] for s in after]
    rs = [s["rss_mb"] for s in after]
    mt, mr = statistics.fmean(ts), statistics.fmean(rs)
    den = sum((t - mt) ** 2 for t in ts) or 1.0
    slope = sum((t - mt) * (r - mr) for t, r in zip(ts, rs)) / den * 60
    out = {
        "rss_after_warmup_mb": base_rss, "rss_end_mb": end_rss, "rss_peak_mb": peak_rss,
        "rss_growth_mb": end_rss - base_rss, "rss_allowed_growth_mb": allowed,
        "rss_slope_mb_per_min": slope,
        "fds_after_warmup": base_fds, "fds_end": end_fds, "fds_max": max(s["fds"] for s in after),
        "fds_allowed_growth": FD_GROWTH,
    }
    problems = []
    if end_rss - base_rss > allowed or peak_rss - base_rss > allowed:
        problems.append(f"RSS grew {max(end_rss, peak_rss) - base_rss:.1f} MB after warm-up (allowed {allowed:.1f})")
    if end_fds - base_fds > FD_GROWTH:
        problems.append(f"open fds grew from {base_fds:.0f} to {end_fds:.0f}")
    out["problems"] = problems
    out["ok"] = not problems
    return out


def run(args: argparse.Namespace) -> int:
    from pgserver import PgServer

    duration = args.minutes * 60
    warmup = args.warmup * 60 if args.warmup is not None else min(120.0, duration / 5)
    sink = Sink()
    pg = PgServer(settings={"max_connections": 200})
    pg.start()
    proxy = None
    stop = threading.Event()
    tally = Tally()
    threads: list[threading.Thread] = []
    pgbench = None
    samples: list[dict[str, Any]] = []
    try:
        prepare(pg)
        from run import free_port, stop_process, wait_port

        port, admin = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGOTEL_", "OTEL_"))}
        log_path = Path(tempfile.mkdtemp(prefix="pgotel-soak-")) / "proxy.log"
        proxy = subprocess.Popen(
            [sys.executable, "-m", "pgotel_proxy", "run", "--listen", f"127.0.0.1:{port}",
             "--upstream", f"{pg.host}:{pg.port}", "--upstream-tls", "disable",
             "--admin-listen", f"127.0.0.1:{admin}", "--tracing", "--sample-rate", "1",
             "--otlp-endpoint", sink.endpoint, "--log-level", "warning"],
            cwd=str(_ROOT), env=env, stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"))
        wait_port(port, 30, proxy)
        wait_port(admin, 30, proxy)
        dsn = f"host=127.0.0.1 port={port} user=postgres dbname={DBNAME} sslmode=disable"

        t0 = time.monotonic()
        for n in range(args.psycopg):
            threads.append(threading.Thread(target=psycopg_worker, args=(n, dsn, stop, tally, args.pause), daemon=True))
        threads.append(threading.Thread(target=asyncpg_thread, args=(args.asyncpg, port, stop, tally, args.pause * 2),
                                       daemon=True))
        for t in threads:
            t.start()
        pgbench = subprocess.Popen(
            ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-M", "prepared", "-c", "4", "-j", "2",
             "-R", str(args.pgbench_rate), "-T", str(int(duration)), DBNAME],
            env=pgbench_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        print(f"soak: {args.minutes} min, warm-up {warmup / 60:.1f} min, proxy pid {proxy.pid}", flush=True)
        header = f"{'t':>6} {'rss MB':>7} {'fds':>5} {'conns':>5} {'psycopg':>8} {'asyncpg':>8} {'failed':>6} {'spans':>9} {'dropped':>7}"
        print(header, flush=True)
        next_at = t0
        while True:
            now = time.monotonic()
            if proxy.poll() is not None:
                raise RuntimeError(f"the proxy exited with {proxy.returncode}; see {log_path}")
            if now >= next_at:
                m = proxy_metrics(admin)
                s = {"t": round(now - t0, 1), "rss_mb": round(rss_mb(proxy.pid), 1), "fds": open_fds(proxy.pid),
                     "connections": int(m.get("connections_active", 0)),
                     "psycopg": tally.ok["psycopg"], "asyncpg": tally.ok["asyncpg"],
                     "failed": sum(tally.failed.values()),
                     "spans_exported": int(m.get("spans_exported", 0)), "spans_dropped": int(m.get("spans_dropped", 0))}
                samples.append(s)
                print(f"{s['t']:>6.0f} {s['rss_mb']:>7.1f} {s['fds']:>5} {s['connections']:>5} {s['psycopg']:>8} "
                      f"{s['asyncpg']:>8} {s['failed']:>6} {s['spans_exported']:>9} {s['spans_dropped']:>7}", flush=True)
                next_at += SAMPLE_EVERY
            if now - t0 >= duration:
                break
            time.sleep(min(1.0, max(0.0, next_at - time.monotonic())))
        stop.set()
        for t in threads:
            t.join(30)
        out, err = pgbench.communicate(timeout=60)
        wall = time.monotonic() - t0
        tx = re.search(r"number of transactions actually processed: (\d+)", out)
        fl = re.search(r"number of failed transactions: (\d+)", out)
        tps = re.search(r"tps = ([0-9.]+)", out)
        lat = re.search(r"latency average = ([0-9.]+) ms", out)
        pgb = {"returncode": pgbench.returncode, "transactions": int(tx.group(1)) if tx else 0,
               "failed": int(fl.group(1)) if fl else (0 if pgbench.returncode == 0 else None),
               "tps": float(tps.group(1)) if tps else None,
               "latency_ms": float(lat.group(1)) if lat else None, "stderr": err[-1000:]}
        # Let the last spans reach the receiver.
        deadline = time.monotonic() + 60
        last = None
        while time.monotonic() < deadline:
            m = proxy_metrics(admin)
            key = (m.get("spans_exported"), m.get("spans_dropped"))
            if m.get("span_queue_size", 0) == 0 and key == last:
                break
            last = key
            time.sleep(1)
        final_metrics = proxy_metrics(admin)
        received = sink.report()
    finally:
        stop.set()
        if pgbench is not None and pgbench.poll() is None:
            pgbench.kill()
        if proxy is not None:
            from run import stop_process

            stop_process(proxy, timeout=30)
        pg.stop()
        sink.stop()

    verdict = judge(samples, warmup)
    problems = list(verdict["problems"])
    failed = dict(tally.failed)
    if pgb["failed"] is None or pgb["failed"] or pgb["returncode"] != 0:
        failed["pgbench"] = pgb["failed"] if pgb["failed"] is not None else -1
    if sum(failed.values()):
        problems.append(f"failed transactions: {failed}")
    if received["counts"].get("malformed", 0):
        problems.append(f"{received['counts']['malformed']} malformed spans")
    if received["orphans"]:
        problems.append(f"{received['orphans']} phase spans whose SERVER parent never arrived")
    if not received["counts"].get("spans"):
        problems.append("no spans received")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "minutes": args.minutes, "wall_s": round(wall, 1), "warmup_s": warmup,
        "workload": {"psycopg_threads": args.psycopg, "asyncpg_tasks": args.asyncpg,
                     "pgbench_clients": 4, "pgbench_rate": args.pgbench_rate, "pause_s": args.pause},
        "transactions": {"psycopg": tally.ok["psycopg"], "asyncpg": tally.ok["asyncpg"],
                         "pgbench": pgb["transactions"]},
        "failed": failed, "errors": tally.errors, "pgbench": pgb,
        "proxy_metrics": final_metrics, "receiver": received, "memory_and_fds": verdict,
        "samples": samples, "problems": problems, "ok": not problems,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    _summary(result)
    print(f"\nJSON: {args.out}\nproxy log: {log_path}")
    return 0 if result["ok"] else 1


def _summary(r: dict[str, Any]) -> None:
    v = r["memory_and_fds"]
    tx = r["transactions"]
    total = sum(tx.values())
    c = r["receiver"]["counts"]
    rows = [
        ("duration", f"{r['wall_s'] / 60:.1f} min (warm-up {r['warmup_s'] / 60:.1f} min)"),
        ("transactions", f"{total} (psycopg {tx['psycopg']}, asyncpg {tx['asyncpg']}, pgbench {tx['pgbench']}), "
                         f"{total / r['wall_s']:.0f}/s"),
        ("failed transactions", str(sum(r["failed"].values()))),
        ("spans received", f"{c.get('spans', 0)} ({c.get('SERVER', 0)} statement, {c.get('INTERNAL', 0)} phase)"),
        ("spans exported / dropped", f"{int(r['proxy_metrics'].get('spans_exported', 0))} / "
                                     f"{int(r['proxy_metrics'].get('spans_dropped', 0))}"),
        ("malformed spans", str(c.get("malformed", 0))),
        ("RSS after warm-up / end / peak", f"{v.get('rss_after_warmup_mb', 0):.1f} / {v.get('rss_end_mb', 0):.1f} / "
                                           f"{v.get('rss_peak_mb', 0):.1f} MB"),
        ("RSS growth (allowed)", f"{v.get('rss_growth_mb', 0):+.1f} MB ({v.get('rss_allowed_growth_mb', 0):.1f}), "
                                 f"slope {v.get('rss_slope_mb_per_min', 0):+.2f} MB/min"),
        ("open fds after warm-up / end / max", f"{v.get('fds_after_warmup', 0):.0f} / {v.get('fds_end', 0):.0f} / "
                                               f"{v.get('fds_max', 0)}"),
        ("verdict", "OK" if r["ok"] else "FAIL: " + "; ".join(r["problems"])),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, val in rows:
        print(f"{k:<{width}}  {val}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=None, help="minutes of warm-up (default: 2, or a fifth of the run)")
    p.add_argument("--psycopg", type=int, default=4, help="psycopg threads")
    p.add_argument("--asyncpg", type=int, default=8, help="asyncpg tasks")
    p.add_argument("--pgbench-rate", type=int, default=100, help="pgbench transactions per second")
    p.add_argument("--pause", type=float, default=0.005,
                   help="seconds each psycopg thread sleeps between transactions (asyncpg tasks: twice that); "
                        "the default keeps the span rate within what the exporter sustains")
    p.add_argument("--out", default=str(_ROOT / "bench" / "results" / f"soak-{datetime.date.today()}.json"))
    p.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sink:
        return sink_main()
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
