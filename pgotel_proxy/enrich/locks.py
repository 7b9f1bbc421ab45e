"""Lock waits with their cause: who blocked a statement, and the blocker's span when it is a session of this proxy.

Runs in the span process. The wait-event sampler (:mod:`.enricher`) asks
``pg_blocking_pids`` about every sampled backend waiting on a ``Lock`` (at
most :data:`MAX_BLOCKERS` each) and reads the blockers' rows of
pg_stat_activity in the same sample: application name, state, the query
summarised (:func:`blocker_summary`: ``db.query.summary``, never the text or
its literals), how long its transaction and its current (or last) query have
been open. Those :class:`Blocker` records ride on the wait sample.

When the waiting statement's spans are finished (:mod:`.join`), each blocker
is looked up among the proxy's own sessions by backend pid
(:class:`SessionStatements`): the statement spans the span process built
recently, per backend. The blocker's statement *at the sample* is the one
that started at the server's ``query_start`` (within
:data:`MATCH_SLACK_NS`, :func:`current_statement`): the statement it was
running, or the last one it ran when it sat ``idle in transaction``. The
waiting statement's span gets a link to it; when that statement has no span
(not sampled, or not built yet when the wait is over), the link goes to the
latest span of the blocker's open transaction (``pgotel.lock.link_target =
transaction``), else there is no link. A waiter whose proxy blocker's span is not there yet waits for it at
most ``join_timeout`` (its records may come a moment after the waiter's).

Several workers (``--workers N``): each worker has its own span process, so a
blocker may be a session of a sibling. The parent makes one shared file
(:mod:`.sessionfile`, in the workers' private directory) and tells each
worker where it is and which part is its own through the environment. A blocker is a session of this proxy when it was an open
connection of this worker at the sample, or when a sibling published a span
of its open transaction. Siblings publish only what they are asked about: a
span process that meets a blocker it does not know asks, and the waiting
statement waits for every sibling's answer (their next tick), at most
``join_timeout``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple

from opentelemetry.semconv.attributes.db_attributes import DB_QUERY_SUMMARY
from opentelemetry.trace import TraceFlags

from ..tracing import sqlinfo
from ..tracing.carrier import _APP, channel_context
from ..tracing.otlp import encoded_span_facts
from .sessionfile import Entry, SharedSessions

__all__ = [
    "ATTR", "Blocker", "MAX_BLOCKERS", "SessionStatements", "blocker_summary", "blockers_from_rows",
    "blocker_attributes", "current_statement", "BLOCKERS_SQL",
]

#: Blockers kept per waiting backend and sample (pg_blocking_pids' first ones).
MAX_BLOCKERS = 8
#: Distance between the server's query_start and a statement's wire interval still taken as that statement.
MATCH_SLACK_NS = 50_000_000

ATTR = {
    "blockers": "pgotel.lock.blockers",
    "pid": "pgotel.lock.blocker.backend_pid",
    "application_name": "pgotel.lock.blocker.application_name",
    "summary": "pgotel.lock.blocker.query.summary",
    "state": "pgotel.lock.blocker.state",
    "transaction_duration": "pgotel.lock.blocker.transaction.duration",
    "in_proxy": "pgotel.lock.blocker.in_proxy",
    "link_target": "pgotel.lock.link_target",
}

#: The blockers' rows, read in the wait sample that saw them wait (ages in seconds, by the server's clock).
BLOCKERS_SQL = (
    "SELECT pid, application_name, state, query,"
    " extract(epoch FROM clock_timestamp() - xact_start)::float8,"
    " extract(epoch FROM clock_timestamp() - query_start)::float8"
    " FROM pg_stat_activity WHERE pid = ANY(%s)"
)


class Blocker(NamedTuple):
    """One session that blocked a sampled backend, as pg_stat_activity showed it at the sample."""

    pid: int
    application_name: str | None
    state: str | None
    summary: str | None  #: db.query.summary of its current or last query (no literals)
    xact_start_ns: int | None  #: its transaction's start, on the proxy's clock
    query_start_ns: int | None  #: its current or last query's start, on the proxy's clock
    own: bool = False  #: an open connection of this span process's worker at the sample


def blocker_summary(query: str | None) -> str | None:
    """The ``db.query.summary`` of a pg_stat_activity query text; None when the text is hidden or empty."""
    if not query or query.startswith("<"):  # "<insufficient privilege>", "<command string not enabled>"
        return None
    return sqlinfo.analyze(query).summary or None


def blockers_from_rows(rows: list[tuple], now_ns: int, own: frozenset | set = frozenset()) -> dict[int, Blocker]:
    """BLOCKERS_SQL rows, their ages turned into instants of the proxy's clock; ``own``: this worker's open backends."""
    out = {}
    for pid, app, state, query, xact_age, query_age in rows:
        if app and len(app) >= 55 and channel_context(_APP, app) is not None:
            app = None  # a traceparent carried as application_name: context, not a name
        out[pid] = Blocker(
            pid, app or None, state, blocker_summary(query),
            now_ns - int(xact_age * 1e9) if xact_age is not None else None,
            now_ns - int(query_age * 1e9) if query_age is not None else None,
            pid in own,
        )
    return out


# ------------------------------------------------------------------ the sessions' statement spans

class SessionStatements:
    """The latest statement spans of the span process's sessions, by backend pid; bounded.

    ``shared``: the file shared with the sibling workers (:class:`SharedSessions`), or None.
    """

    PER_PID = 16
    MAX_PIDS = 4096

    def __init__(self, shared: SharedSessions | None = None) -> None:
        self._by_pid: dict[int, deque] = {}
        self._answered: dict[int, Entry] = {}  # pid → latest entry published for a sibling
        self._tickets: dict[tuple, int] = {}  # (pid, transaction start) asked about → its ticket
        self.shared = shared

    def note(self, pid: int, span: Any) -> None:
        """Remember the statement span ``span`` (a ReadableSpan) of backend ``pid`` (every statement: kept cheap)."""
        ctx = span.context
        self.note_entry(pid, Entry(ctx.trace_id, ctx.span_id, ctx.trace_flags, span.start_time, span.end_time,
                                   span.attributes.get(DB_QUERY_SUMMARY) or span.name))

    def note_encoded(self, pid: int, field: bytes) -> None:
        """``note`` for a statement span encoded (an encoded ScopeSpans.spans field, otlp.encode_span's).

        Kept as its bytes: they are read into an :class:`Entry` only when a
        lock wait asks for the backend's spans (``_read``), which few do.
        """
        self.note_entry(pid, field)

    @staticmethod
    def _read(noted) -> list[Entry]:
        """The entries of one backend's noted spans, encoded ones read (those that do not read are left out)."""
        out = []
        for e in list(noted):
            if type(e) is bytes:
                facts = encoded_span_facts(e)
                if facts is None:
                    continue
                trace_id, span_id, start, end, name = facts
                # Sampled: the builder builds no other span (an encoded span carries no trace flags).
                e = Entry(trace_id, span_id, TraceFlags.SAMPLED, start, end, name)
            out.append(e)
        return out

    def note_entry(self, pid: int, entry: Entry | bytes) -> None:
        """Remember a statement span of backend ``pid``: its facts, or its encoded field."""
        by_pid = self._by_pid
        dq = by_pid.get(pid)
        if dq is None:
            if len(by_pid) >= self.MAX_PIDS:
                del by_pid[next(iter(by_pid))]  # the longest known goes; it comes back at its next statement
            dq = by_pid[pid] = deque(maxlen=self.PER_PID)
        dq.append(entry)

    def answer(self) -> None:
        """Publish the latest statement spans of the sessions the siblings asked about (the helper's ticks)."""
        shared = self.shared
        if shared is None:
            return
        answered = self._answered
        for worker, count, pids in shared.asks():
            for pid in pids:
                dq = self._by_pid.get(pid)
                if dq and answered.get(pid) is not dq[-1]:
                    shared.publish(pid, self._read(dq))
                    if len(answered) >= self.MAX_PIDS:
                        answered.clear()
                    answered[pid] = dq[-1]
            shared.mark_seen(worker, count)

    def entries(self, blocker: Blocker) -> tuple[bool | None, list[Entry]]:
        """(whether ``blocker`` is a session of this proxy, None until the siblings answered; its statement spans).

        A session of this worker: it was one of its open connections at the
        sample. A sibling's: the sibling published a span of the blocker's
        open transaction (an older span under its pid may be of a closed
        session whose pid the server gave to another).
        """
        if blocker.own:
            return True, self._read(self._by_pid.get(blocker.pid, ()))
        shared = self.shared
        if shared is None:
            return False, []
        found = shared.lookup(blocker.pid)
        xs = blocker.xact_start_ns
        if found and xs is not None:
            found = [e for e in found if e.start_ns >= xs - MATCH_SLACK_NS]
        if found:
            return True, found
        key = (blocker.pid, xs)
        ticket = self._tickets.get(key)
        if ticket is None:
            if len(self._tickets) >= self.MAX_PIDS:
                self._tickets.clear()
            self._tickets[key] = shared.ask(blocker.pid)
            return None, []
        return (False if shared.answered(ticket) else None), []


def current_statement(entries: list[Entry], blocker: Blocker, at_ns: int) -> tuple[Entry | None, str]:
    """The blocker's statement span at the sample taken at ``at_ns``: (entry, "statement"), else (entry, "transaction"), else (None, "").

    Its statement is the latest that started by the server's ``query_start``
    and, when the blocker was ``active``, still ran at the sample; when it was
    idle in its transaction, had ended by the sample.
    """
    qs = blocker.query_start_ns
    if qs is not None:
        active = blocker.state == "active"
        best = None
        for e in entries:
            if e.start_ns - MATCH_SLACK_NS > qs or (e.end_ns < at_ns if active else e.end_ns + MATCH_SLACK_NS < qs):
                continue
            if best is None or e.start_ns > best.start_ns:
                best = e
        if best is not None:
            return best, "statement"
    xs = blocker.xact_start_ns
    if xs is not None:
        inside = [e for e in entries if e.start_ns >= xs - MATCH_SLACK_NS and e.start_ns <= at_ns]
        if inside:
            return max(inside, key=lambda e: e.start_ns), "transaction"
    return None, ""


# ------------------------------------------------------------------ attributes and links

def blocker_attributes(blocker: Blocker, in_proxy: bool, entry: Entry | None, at_ns: int) -> dict:
    """The attributes naming ``blocker`` as seen in the sample at ``at_ns``; ``entry``: its statement's span, if known."""
    attrs: dict[str, Any] = {ATTR["pid"]: blocker.pid, ATTR["in_proxy"]: in_proxy}
    if blocker.application_name:
        attrs[ATTR["application_name"]] = blocker.application_name
    if blocker.state:
        attrs[ATTR["state"]] = blocker.state
    summary = entry.summary if entry is not None else blocker.summary
    if summary:
        attrs[ATTR["summary"]] = summary
    if blocker.xact_start_ns is not None:
        attrs[ATTR["transaction_duration"]] = round(max(0, at_ns - blocker.xact_start_ns) / 1e9, 6)
    return attrs
