"""Side-connection samplers: pg_stat_statements window deltas and pg_stat_activity wait events.

Both run on the enrichment thread's event loop, in the span process, over their own psycopg
connection (``stats_dsn``). Least privilege: a role that is a member of
``pg_read_all_stats`` sees every session's wait events and every user's
pg_stat_statements entries; nothing else is needed (no superuser, no write).

pg_stat_statements: every ``stats_interval`` the counters are read; the
difference to the previous read, summed over users and databases sharing the
queryid, is that queryid's *window*. A span gets the figures of the latest
window in which its queryid ran (calls, mean plan and execution time, rows,
shared blocks hit/read, temp blocks, WAL bytes, window length), so the
figures describe the statement's recent behaviour, not that one execution.
The first read is the baseline and yields no window.

Matching a statement to a queryid, first that applies:

1. the queryid the server logged with the statement's auto_explain plan
   (jsonlog/csvlog ``query_id``, or ``%Q`` in log_line_prefix; PG 14+ with
   ``compute_query_id``);
2. ``pg_stat_activity.query_id`` seen while sampling its wait events;
3. the pglast fingerprint of the statement text, compared with the
   fingerprint of pg_stat_statements' normalised text. Fingerprints ignore
   constants and parameter numbers; when two queryids share one fingerprint
   (same text under different users or search paths) nothing is attached.
   Multi-statement simple queries are matched by rule 1 or 2 only.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from ..tracing import sqlinfo

__all__ = ["PgssWindows", "WaitSamples", "PGSS_FIELDS"]

log = logging.getLogger("pgotel_proxy.enrich")

# Counter columns read from pg_stat_statements (1.8+, PostgreSQL 13+).
PGSS_FIELDS = (
    "calls", "plans", "total_plan_time", "total_exec_time", "rows",
    "shared_blks_hit", "shared_blks_read", "temp_blks_read", "temp_blks_written", "wal_bytes",
)
PGSS_QUERY = (
    "SELECT userid, dbid, queryid, " + ", ".join(PGSS_FIELDS)
    + " FROM pg_stat_statements(false) WHERE queryid IS NOT NULL"
)
_MAX_FINGERPRINTS = 20000


class PgssWindows:
    """Per-queryid deltas between consecutive pg_stat_statements reads."""

    def __init__(self) -> None:
        self._prev: dict[tuple, tuple] | None = None
        self._prev_time = 0.0
        self.figures: dict[int, dict] = {}  # queryid → attributes of its latest active window
        self.by_fingerprint: dict[str, int | None] = {}
        self._known: set[int] = set()

    def update(self, rows: list[tuple], now: float | None = None) -> list[int]:
        """Take one read; returns queryids seen for the first time (whose text to fetch)."""
        now = time.monotonic() if now is None else now
        cur = {(r[0], r[1], r[2]): tuple(float(v or 0) for v in r[3:]) for r in rows}
        prev = self._prev
        if prev is not None:
            window = now - self._prev_time
            sums: dict[int, list[float]] = {}
            for key, vals in cur.items():
                old = prev.get(key)
                delta = vals if old is None else tuple(a - b for a, b in zip(vals, old))
                if delta[0] <= 0:
                    continue
                acc = sums.setdefault(key[2], [0.0] * len(delta))
                for i, d in enumerate(delta):
                    acc[i] += d
            for qid, d in sums.items():
                self.figures[qid] = _figures(d, window)
        self._prev = cur
        self._prev_time = now
        live = {k[2] for k in cur}
        for qid in [q for q in self.figures if q not in live]:
            del self.figures[qid]  # evicted from pg_stat_statements
        new = [q for q in live if q not in self._known]
        self._known = live
        return new

    def add_texts(self, rows: list[tuple]) -> None:
        """(queryid, normalised text) pairs → the fingerprint index."""
        index = self.by_fingerprint
        if len(index) > _MAX_FINGERPRINTS:
            index.clear()
        for qid, text in rows:
            fp = sqlinfo.fingerprint(text) if text else None
            if fp is None:
                continue
            if fp in index and index[fp] != qid:
                index[fp] = None  # ambiguous
            else:
                index[fp] = qid


def _figures(d, window: float) -> dict:
    calls, plans, plan_t, exec_t, rows, hit, read, tread, twritten, wal = d
    out = {
        "calls": int(calls),
        "mean_exec_time_ms": round(exec_t / calls, 4) if calls else 0.0,
        "rows": int(rows),
        "shared_blks_hit": int(hit),
        "shared_blks_read": int(read),
        "temp_blks_read": int(tread),
        "temp_blks_written": int(twritten),
        "wal_bytes": int(wal),
        "window_s": round(window, 3),
    }
    if plans > 0:  # only with pg_stat_statements.track_planning
        out["mean_plan_time_ms"] = round(plan_t / plans, 4)
    return out


class WaitSamples:
    """Wait events sampled per backend pid, bounded per pid and in age."""

    PER_PID = 2000
    MAX_AGE_NS = 120 * 1_000_000_000

    def __init__(self) -> None:
        self._by_pid: dict[int, deque] = {}

    def add(self, pid: int, ts: int, wtype: str | None, wevent: str | None, query_id: int | None,
            blockers: tuple = ()) -> None:
        """One sample; ``blockers``: the sessions blocking a Lock wait (``locks.Blocker``)."""
        dq = self._by_pid.get(pid)
        if dq is None:
            dq = self._by_pid[pid] = deque(maxlen=self.PER_PID)
        dq.append((ts, wtype, wevent, query_id, blockers))

    def between(self, pid: int, start: int, end: int) -> list[tuple]:
        dq = self._by_pid.get(pid)
        if not dq or start > end:  # (a statement shorter than the wait threshold: no walk through the samples)
            return []
        return [s for s in list(dq) if start <= s[0] <= end]

    def prune(self, now: int) -> None:
        for pid, dq in list(self._by_pid.items()):
            if not dq or dq[-1][0] < now - self.MAX_AGE_NS:
                self._by_pid.pop(pid, None)
