"""The enrichment thread of the span process: probes the sources once, then follows the log and samples the statistics views.

It owns one thread with its own asyncio loop, the side connections
(psycopg, ``stats_dsn``), the shared state the span helper's
:class:`~.join.Joiner` reads (on the helper's reading thread), and the
per-source status that the helper reports to the relay process (admin
``/status``, the start-up line of :func:`pgotel_proxy.enrich.log_status`).

Wait events: every :data:`WAIT_SAMPLE_PERIOD` the backends of the proxy's
open connections (their pids came with the connections' records) that
pg_stat_activity shows ``active`` are sampled. A statement's span gets the
samples of its backend taken between ``wait_event_threshold`` after its
start and its end (its wire interval): statements shorter than the
threshold get none. A backend waiting on a ``Lock`` has its blockers read in
the same sample (:mod:`.locks`).

Sources and when each is on:

* ``auto_explain``: ``server_log`` is set (a file or the log directory), or
  ``server_log_via_sql`` with ``stats_dsn``;
* ``pg_stat_statements`` and ``wait_events``: ``stats_dsn`` is set;
* ``explain`` (:mod:`.explain`): ``stats_dsn`` is set and the
  ``auto_explain`` source is not on: left out of ``enrich_sources``, no
  server log configured, or its probe found the log or auto_explain
  unusable (then ``explain`` takes over). Both never run at once: a plan
  read from the log is the executed one, EXPLAIN's only an estimate.

A source that is configured but cannot work (module not loaded, extension
missing, privilege missing, log unreadable) is reported as
``unavailable: <reason>`` and the rest carries on without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from .join import Joiner
from .logformat import make_parser
from .explain import ExplainSource
from .locks import BLOCKERS_SQL, MAX_BLOCKERS, SessionStatements, blockers_from_rows
from .sessionfile import SHARED_ENV, open_shared
from .logsource import FileLogFollower, SqlLogFollower
from .pgstats import PGSS_QUERY, PgssWindows, WaitSamples
from .plans import parse_plan_message

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Enricher", "WAIT_SAMPLE_PERIOD"]

log = logging.getLogger("pgotel_proxy.enrich")

#: How often the open connections' active backends are sampled.
WAIT_SAMPLE_PERIOD = 0.1
#: Plans read but not yet taken by the span helper, at most.
MAX_PLAN_INBOX = 10000
_FILE_POLL = 0.05
_SQL_POLL = 0.2


class Enricher:
    """Server-side sources and the join, for one proxy."""

    def __init__(self, config: Config, backends: Callable[[], list[int]] = list, resource: Any = None) -> None:
        """``backends``: the backend pids of the proxy's open connections (whose wait events to sample)."""
        self.config = config
        self.backends = backends
        self.status: dict[str, str] = {}
        dsn = config.stats_dsn
        if hasattr(dsn, "get_secret_value"):
            dsn = dsn.get_secret_value()
        self._dsn = dsn
        self._wait_threshold_ns = int(config.wait_event_threshold * 1e9)
        sources = set(config.enrich_sources)
        want_log = config.server_log is not None or (config.server_log_via_sql and dsn)
        self.status["auto_explain"] = "starting" if want_log and "auto_explain" in sources else "off"
        self.status["pg_stat_statements"] = "starting" if dsn and "pg_stat_statements" in sources else "off"
        self.status["wait_events"] = "starting" if dsn and "wait_events" in sources else "off"
        want_explain = bool(dsn) and "explain" in sources
        self.status["explain"] = "starting" if want_explain and self.status["auto_explain"] == "off" else "off"
        # Explain takes over when the auto_explain source turns out unavailable.
        self._explain_fallback = want_explain and self.status["auto_explain"] == "starting"
        self.explain: ExplainSource | None = None
        if want_explain:
            self.explain = ExplainSource(
                min_duration=config.explain_min_duration, rate=config.explain_rate,
                cache_ttl=config.explain_cache_ttl, capture_parameters=config.capture_parameters,
                capture_literals=config.capture_query_literals,
            )
        self.plans: deque = deque()
        self.plans_dropped = 0
        self.plan_min_duration_ms: float | None = None
        self._pgss = PgssWindows()
        self._waits = WaitSamples()
        # The statement spans of the proxy's sessions by backend pid, where lock waits find their blockers'.
        self.sessions: SessionStatements | None = None
        if self.status["wait_events"] == "starting":
            self.sessions = SessionStatements(open_shared(os.environ.get(SHARED_ENV)))
        self.joiner = Joiner(self, join_timeout=config.join_timeout, resource=resource)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgotel-enrich", daemon=True)

    # ------------------------------------------------------------ Joiner facing (the helper's thread)

    def plans_enabled(self) -> bool:
        return self.status.get("auto_explain", "").startswith("ok")

    def pgss_enabled(self) -> bool:
        return self.status.get("pg_stat_statements", "").startswith("ok")

    def explain_enabled(self) -> bool:
        return self.status.get("explain", "").startswith("ok")

    def wait_samples(self, pid: int, start: int, end: int) -> list[tuple]:
        """Samples of backend ``pid`` while a statement of [start, end] ran past the threshold."""
        return self._waits.between(pid, start + self._wait_threshold_ns, end)

    def query_id_for(self, fingerprint: str | None) -> int | None:
        return self._pgss.by_fingerprint.get(fingerprint) if fingerprint else None

    def pgss_figures(self, query_id: int) -> dict | None:
        return self._pgss.figures.get(query_id)

    # ------------------------------------------------------------ span helper facing

    def statement(self, rec, spans: list) -> list:
        return self.joiner.statement(rec, spans)

    def plain(self, rec, pid) -> dict | None:
        return self.joiner.plain(rec, pid)

    def tick(self) -> list:
        return self.joiner.tick()

    def release_all(self) -> list:
        return self.joiner.release_all()

    def pending(self) -> int:
        return len(self.joiner)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Enricher":
        if all(v == "off" for v in self.status.values()):
            return self
        self._thread.start()
        return self

    def ready(self) -> bool:
        """Whether the start-up probes are done (or nothing is on)."""
        return self._ready.is_set() or all(v == "off" for v in self.status.values())

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Block until the start-up probes are done."""
        if not self._thread.is_alive() and not self._ready.is_set():
            return all(v == "off" for v in self.status.values())
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:  # the proxy must go on without enrichment
            log.exception("server-side enrichment stopped")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tasks = await self._probe()
        self._ready.set()
        if not tasks:
            return
        runners = [asyncio.create_task(t) for t in tasks]
        await self._stop.wait()
        for r in runners:
            r.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        for conn in self._conns:
            try:
                await conn.close()
            except Exception:
                pass

    # ------------------------------------------------------------ start-up probes

    async def _connect(self):
        import psycopg

        conn = await psycopg.AsyncConnection.connect(
            self._dsn, autocommit=True, connect_timeout=5, application_name="pgotel-proxy-enrich"
        )
        self._conns.append(conn)
        return conn

    async def _probe(self) -> list:
        self._conns: list = []
        st = self.status
        tasks = []
        conn = None
        if self._dsn:
            try:
                conn = await self._connect()
            except ImportError:
                reason = "unavailable: psycopg is not installed"
                for k in st:
                    if st[k] == "starting":
                        st[k] = reason
            except Exception as exc:
                reason = f"unavailable: cannot connect with stats_dsn: {_one_line(exc)}"
                for k in st:
                    if st[k] == "starting":
                        st[k] = reason
        privileged = False
        major = 0
        if conn is not None:
            cur = await conn.execute(
                "SELECT current_setting('server_version_num')::int,"
                " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
                " OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER')"
            )
            major, privileged = await cur.fetchone()
            major //= 10000
        if st["pg_stat_statements"] == "starting":
            st["pg_stat_statements"] = await self._probe_pgss(conn, privileged)
            if st["pg_stat_statements"].startswith("ok"):
                tasks.append(self._pgss_loop(await self._connect()))
        if st["wait_events"] == "starting":
            st["wait_events"] = "ok" if privileged else "ok (limited: the stats role lacks pg_read_all_stats, so other roles' sessions show no wait events)"
            tasks.append(self._wait_loop(await self._connect(), major))
        if st["auto_explain"] == "starting":
            st["auto_explain"], task = await self._probe_log(conn)
            if task is not None:
                tasks.append(task)
            elif self._explain_fallback and conn is not None:
                st["explain"] = "starting"
        if st["explain"] == "starting" and conn is not None:
            explain_conn = await self._connect()
            cur = await explain_conn.execute("SELECT current_database()")
            self.explain.database = (await cur.fetchone())[0]
            self.explain.major = major
            st["explain"] = "ok" if major >= 16 else (
                "ok (limited: before PostgreSQL 16 there is no GENERIC_PLAN, so statements with $n parameters "
                "are explained only with capture_parameters)")
            tasks.append(self.explain.run(explain_conn))
        return tasks

    async def _probe_pgss(self, conn, privileged: bool) -> str:
        import psycopg

        try:
            cur = await conn.execute(PGSS_QUERY + " LIMIT 1")
            await cur.fetchall()
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction):
            return "unavailable: the pg_stat_statements extension is not created in this database (CREATE EXTENSION pg_stat_statements)"
        except psycopg.errors.ObjectNotInPrerequisiteState:
            return "unavailable: pg_stat_statements is not in shared_preload_libraries"
        except psycopg.errors.UndefinedColumn:
            return "unavailable: pg_stat_statements 1.8 (PostgreSQL 13) or later is needed"
        except psycopg.Error as exc:
            return f"unavailable: {_one_line(exc)}"
        if not privileged:
            return "ok (limited: the stats role lacks pg_read_all_stats, so it sees only its own statements)"
        return "ok"

    async def _probe_log(self, conn):
        cfg = self.config
        fmt = cfg.server_log_format
        if conn is not None:
            # What the server will log, when we can ask: a disabled or filtered auto_explain explains missing plans.
            cur = await conn.execute(
                "SELECT current_setting('auto_explain.log_min_duration', true),"
                " current_setting('auto_explain.log_format', true),"
                " current_setting('auto_explain.log_analyze', true)"
            )
            min_dur, plan_fmt, analyze = await cur.fetchone()
            if min_dur is None:
                return "unavailable: auto_explain is not loaded (shared_preload_libraries)", None
            ms = _duration_ms(min_dur)
            if ms is None or ms < 0:
                return f"unavailable: auto_explain.log_min_duration is {min_dur} (disabled)", None
            if plan_fmt not in (None, "json", "text"):
                return f"unavailable: auto_explain.log_format is {plan_fmt}; json or text is read", None
            self.plan_min_duration_ms = ms
            if analyze == "off":
                log.info("auto_explain.log_analyze is off: plan nodes carry estimates only")
        if cfg.server_log_via_sql:
            if conn is None:
                return "unavailable: server_log_via_sql needs stats_dsn", None
            follower = SqlLogFollower(fmt)
            try:
                await follower.check(conn)
            except Exception as exc:
                return f"unavailable: cannot read the server log over SQL: {_one_line(exc)}", None
            return "ok", self._log_loop(follower, await self._connect())
        follower = FileLogFollower(cfg.server_log, fmt)
        try:
            follower.check()
        except OSError as exc:
            return f"unavailable: cannot read server log {cfg.server_log}: {exc.strerror or exc}", None
        return "ok", self._log_loop(follower, None)

    # ------------------------------------------------------------ loops

    def _push_entries(self, entries) -> None:
        inbox = self.plans
        for e in entries:
            if not e.message.startswith("duration: "):
                continue
            plan = parse_plan_message(e.message, e.time_ns, e.pid, e.query_id)
            if plan is None:
                continue
            if len(inbox) >= MAX_PLAN_INBOX:
                self.plans_dropped += 1
                continue
            inbox.append(plan)

    async def _log_loop(self, follower, conn) -> None:
        parser = make_parser(self.config.server_log_format, self.config.server_log_line_prefix)
        failing = False
        while True:
            try:
                data = follower.read() if conn is None else await follower.read(conn)
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("server log read failed, retrying: %s", _one_line(exc))
                failing = True
                data = b""
                await asyncio.sleep(1.0)
            if data:
                self._push_entries(parser.feed(data))
                continue
            flush = getattr(parser, "flush", None)
            if flush is not None:
                self._push_entries(flush())
            await asyncio.sleep(_FILE_POLL if conn is None else _SQL_POLL)

    async def _pgss_loop(self, conn) -> None:
        interval = self.config.stats_interval
        failing = False
        while True:
            try:
                cur = await conn.execute(PGSS_QUERY)
                rows = await cur.fetchall()
                new = self._pgss.update(rows)
                if new:
                    cur = await conn.execute(
                        "SELECT queryid, query FROM pg_stat_statements WHERE queryid = ANY(%s)", (new,)
                    )
                    self._pgss.add_texts(await cur.fetchall())
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("pg_stat_statements poll failed, retrying: %s", _one_line(exc))
                failing = True
            await asyncio.sleep(interval)

    async def _wait_loop(self, conn, major: int) -> None:
        qid = "query_id" if major >= 14 else "NULL::bigint"
        # pg_blocking_pids takes the lock manager's locks: asked only about backends waiting on a Lock.
        sql = (f"SELECT pid, wait_event_type, wait_event, {qid},"
               f" CASE WHEN wait_event_type = 'Lock' THEN (pg_blocking_pids(pid))[1:{MAX_BLOCKERS}] END"
               " FROM pg_stat_activity WHERE pid = ANY(%s) AND state = 'active'")
        waits = self._waits
        failing = False
        last_prune = 0
        while True:
            now = time.time_ns()
            due = self.backends()
            if due:
                try:
                    cur = await conn.execute(sql, (due,))
                    rows = await cur.fetchall()
                    ts = time.time_ns()
                    blockers = {}
                    wanted = {b for row in rows if row[4] for b in row[4] if b}
                    if wanted:
                        cur = await conn.execute(BLOCKERS_SQL, (sorted(wanted),))
                        blockers = blockers_from_rows(await cur.fetchall(), time.time_ns(), set(due))
                    for pid, wtype, wevent, query_id, blocked_by in rows:
                        if wevent is not None:
                            held = tuple(blockers[b] for b in blocked_by or () if b in blockers)
                            waits.add(pid, ts, wtype, wevent, query_id, held)
                    failing = False
                except Exception as exc:
                    if not failing:
                        log.warning("pg_stat_activity sample failed, retrying: %s", _one_line(exc))
                    failing = True
            if now - last_prune > 10_000_000_000:
                waits.prune(now)
                last_prune = now
            await asyncio.sleep(WAIT_SAMPLE_PERIOD)


def _duration_ms(text: str) -> float | None:
    """A duration setting as shown by current_setting ('0', '250ms', '1s', '-1') in milliseconds."""
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0, "min": 60000.0, "h": 3600000.0, "d": 86400000.0}
    t = text.strip()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):] or "ms"
    try:
        return float(num) * units[unit]
    except (ValueError, KeyError):
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().split("\n", 1)[0]
    return text or type(exc).__name__
