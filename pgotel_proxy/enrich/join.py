"""The bounded time-window join of statement spans with server-side records (runs in the span process).

The span helper (``tracing.helper``) hands each statement record's freshly built spans to
:meth:`Joiner.statement`. A statement whose plan auto_explain will log (a
SELECT/INSERT/UPDATE/DELETE/MERGE that completed, on a backend we know, with
the auto_explain source up) waits for it at most ``join_timeout`` seconds;
everything else leaves at once. Plans may arrive before their statement (the
server logs at ExecutorEnd, before the client sees ReadyForQuery), so
unmatched plans wait too, for a while, in a bounded buffer.

Join rule for a plan and a statement, all of:

* same backend pid (the log line's pid, the span's ``db.postgresql.backend_pid``);
* the plan's ``Query Text`` equals the statement text the client sent (for
  the extended protocol the Parse text, for the simple protocol the whole
  Query string). A sqlcommenter traceparent in that text makes it unique per
  request: that is the exact join; without one, identical statements on one
  backend are told apart by time;
* the log timestamp lies within the statement's wire interval widened by
  :data:`CLOCK_SKEW_NS` (log timestamps have millisecond precision and come
  from the server's clock); the closest to the statement's end wins.

Where no auto_explain log is read, the ``explain`` source (:mod:`.explain`)
gives estimated plans instead: a statement that qualifies (see there) takes
its shape's cached plan at once, or waits at most ``join_timeout`` for an
EXPLAIN on the side connection; refused or failed, it leaves without one.
Its plan nodes become spans like auto_explain's, marked
``pgotel.plan.estimated``, each as long as the ``execute`` span.

Plan changes: the statement span of a joined plan (either source) carries
the plan's hash (node kinds, relations, indexes; not costs), and a
``plan changed`` event when its shape's previous plan hashed otherwise.

pg_stat_statements figures and wait events never make a span wait: they are
attached from what the side connections collected so far. Lock waits
(:mod:`.locks`): a statement whose samples show a blocker that is a session of
this proxy gets a link to the blocker's statement span; when that span is not
known yet, the statement waits for it at most ``join_timeout``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import StatusCode

from ..stats import STATS
from ..tracing import sqlinfo
from ..tracing.spans import ATTR as SPAN_ATTR
from ._spanutil import amend, child_context, make_span
from .explain import explainable, plan_hash
from .locks import ATTR as LOCK_ATTR, MAX_BLOCKERS, blocker_attributes, current_statement
from .plans import Plan, node_spans

__all__ = ["Joiner", "CLOCK_SKEW_NS", "ATTR", "PLAN_CHANGED"]

log = logging.getLogger("pgotel_proxy.enrich")

#: Tolerance between the proxy's clock and the server's log timestamps.
CLOCK_SKEW_NS = 250_000_000

ATTR = {
    "backend_pid": "db.postgresql.backend_pid",
    "command_tag": "db.postgresql.command_tag",
    "exact": "pgotel.timing.exact",
    "phases": "pgotel.phases",
    "timing_source": "pgotel.timing.source",
    "query_id": "db.postgresql.query_id",
    "execution_time": "db.postgresql.execution_time_ms",
    "planning_time": "db.postgresql.planning_time_ms",
    "plan_missing": "pgotel.enrich.plan_missing",
    "wait_event_type": "db.postgresql.wait_event_type",
    "wait_event": "db.postgresql.wait_event",
    "wait_samples": "pgotel.wait.samples",
    "pgss": "db.postgresql.pgss.",
    "plan_hash": "db.postgresql.plan.hash",
    "previous_plan_hash": "db.postgresql.plan.previous_hash",
    "namespace": "db.namespace",
}

#: Name of the span event a statement gets when its shape's plan differs from the previous one.
PLAN_CHANGED = "plan changed"
#: Shapes whose last plan hash is remembered at most.
MAX_PLAN_HASHES = 10000

_PLANNED_TAGS = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE"))


class _Pending:
    __slots__ = ("spans", "server", "pid", "text", "start", "end", "deadline", "done")

    def __init__(self, spans, server, pid, text, deadline) -> None:
        self.spans = spans
        self.server = server
        self.pid = pid
        self.text = text
        self.start = server.start_time
        self.end = server.end_time
        self.deadline = deadline
        self.done = False


class Joiner:
    """Holds statements waiting for their plans and plans waiting for their statements, both bounded."""

    def __init__(self, sources: Any, *, join_timeout: float, resource=None, max_pending: int = 10000, max_plans: int = 10000) -> None:
        self.sources = sources
        self.join_timeout_ns = int(join_timeout * 1e9)
        self.resource = resource
        self.max_pending = max_pending
        self.max_plans = max_plans
        self._pending: deque[_Pending] = deque()
        self._by_pid: dict[int, list[_Pending]] = {}
        self._plans: deque[tuple[int, Plan]] = deque()  # (arrival monotonic ns, plan)
        self._plans_by_pid: dict[int, list[Plan]] = {}
        self._plan_ttl_ns = self.join_timeout_ns + 2 * CLOCK_SKEW_NS + 1_000_000_000
        # Statements waiting for their shape's EXPLAIN: (deadline, shape, group, pid, text).
        self._explain_wait: deque[tuple[int, str, list, Any, str]] = deque()
        self._plan_hashes: OrderedDict[str, str] = OrderedDict()
        # Statements blocked by a proxy session whose statement span is not known yet:
        # (deadline, group, pid, text, counted, query_id).
        self._lock_wait: deque[tuple] = deque()

    def __len__(self) -> int:
        """Statements still waiting (finished ones may linger in the deque until they reach its front)."""
        return sum(len(v) for v in self._by_pid.values()) + len(self._explain_wait) + len(self._lock_wait)

    # ------------------------------------------------------------ tracer facing

    def statement(self, rec: Any, spans: list[ReadableSpan]) -> list[ReadableSpan]:
        """Spans of one statement record → the spans that may leave now (the rest are held)."""
        out: list[ReadableSpan] = []
        now = time.monotonic_ns()
        self._take_plans(now, out)
        text = (getattr(rec, "sql", None) or "").strip()
        groups = _groups(spans)
        sessions = getattr(self.sources, "sessions", None)
        for group in groups:
            server = group[0]
            pid = (server.attributes or {}).get(ATTR["backend_pid"])
            if sessions is not None and pid is not None:
                sessions.note(pid, server)
            if self._expects_plan(rec, group, pid):
                p = _Pending(group, server, pid, text, now + self.join_timeout_ns)
                plan = self._find_plan(p)
                if plan is not None:
                    out.extend(self._finish(p, plan))
                    continue
                while self._pending and self._pending[0].done:
                    self._pending.popleft()
                if len(self._pending) >= self.max_pending:
                    # Full: the oldest leaves now, without its plan, rather than memory growing.
                    out.extend(self._expire(self._pending.popleft()))
                self._pending.append(p)
                self._by_pid.setdefault(pid, []).append(p)
            elif len(groups) == 1 and self._wants_explain(rec, group, text, now, out):
                continue
            else:
                out.extend(self._finish_plain(group, pid, text))
        return out

    def plain(self, rec: Any, pid: int | None) -> dict | None:
        """What the join would add to the statement span of ``rec`` when it adds attributes only, else None.

        None: the statement needs :meth:`statement` and its spans as
        ReadableSpans: it may wait for a plan (the auto_explain source is up;
        or EXPLAIN may be asked for it: it is text at least the explain
        source's minimum long), its backend was sampled while it ran past the
        wait threshold (wait events, lock blockers), or it is not one
        statement (a simple Query of several). The tests are wider than
        :meth:`statement`'s: what they let through has nothing but
        pg_stat_statements' figures and the query id to be joined, which
        this returns (possibly empty), counted as a join when there are
        figures. Its spans may then be built encoded; the caller notes its
        statement span for lock waits (``sources.sessions``).
        """
        src = self.sources
        results = rec.results
        if rec.protocol not in ("extended", "simple") or (rec.protocol == "simple" and (not results or len(results) > 1)):
            return None
        if pid is not None and src.plans_enabled():
            return None
        start = rec.start_ns
        # the latest time the record holds: its statement span ends no later
        end = max(rec.end_ns, rec.bind_end_ns, rec.parse_end_ns, rec.exec_start_ns, start)
        if results:
            end = max(end, max(r.end_ns for r in results))
        text = (rec.sql or "").strip()
        explain = getattr(src, "explain", None)
        if (explain is not None and text and end - start >= explain.min_duration_ns
                and getattr(src, "explain_enabled", lambda: False)()):
            return None
        if pid is not None and src.wait_samples(pid, start, end):
            return None
        attrs: dict[str, Any] = {}
        if text and src.pgss_enabled():
            query_id = src.query_id_for(sqlinfo.fingerprint(text))
            if query_id is not None:
                attrs[ATTR["query_id"]] = query_id
                figures = src.pgss_figures(query_id)
                if figures:
                    STATS.enrich_joined += 1
                    for k, v in figures.items():
                        attrs[ATTR["pgss"] + k] = v
        return attrs

    def tick(self) -> list[ReadableSpan]:
        """Match newly read plans and release statements whose wait is over."""
        out: list[ReadableSpan] = []
        now = time.monotonic_ns()
        self._take_plans(now, out)
        q = self._pending
        while q and (q[0].done or q[0].deadline <= now):
            p = q.popleft()
            if not p.done:
                out.extend(self._expire(p))
        self._take_explains(now, out, release=False)
        self._take_lock_waits(now, out, release=False)
        sessions = getattr(self.sources, "sessions", None)
        if sessions is not None:
            sessions.answer()  # what the sibling workers asked about their lock waits
        plans = self._plans
        while plans and plans[0][0] + self._plan_ttl_ns <= now:
            _, plan = plans.popleft()
            self._drop_plan(plan)
        return out

    def release_all(self) -> list[ReadableSpan]:
        """Everything still held (shutdown)."""
        out: list[ReadableSpan] = []
        self._take_plans(time.monotonic_ns(), out)
        while self._pending:
            p = self._pending.popleft()
            if not p.done:
                out.extend(self._expire(p))
        self._take_explains(time.monotonic_ns(), out, release=True)
        self._take_lock_waits(time.monotonic_ns(), out, release=True)
        return out

    # ------------------------------------------------------------ matching

    def _expects_plan(self, rec, group, pid) -> bool:
        src = self.sources
        if not src.plans_enabled() or pid is None:
            return False
        if rec.status not in ("ok",) and getattr(rec, "protocol", "") == "extended":
            return False
        server = group[0]
        if server.status.status_code == StatusCode.ERROR:
            return False
        tag = (server.attributes or {}).get(ATTR["command_tag"]) or ""
        if tag.split(" ", 1)[0] not in _PLANNED_TAGS:
            return False
        if _index(group, "execute") is None:
            return False
        min_ms = src.plan_min_duration_ms
        if min_ms and (server.end_time - server.start_time) < min_ms * 1_000_000:
            return False
        return True

    @staticmethod
    def _fits(p: _Pending, plan: Plan) -> bool:
        if plan.pid != p.pid:
            return False
        if p.text and plan.query_text.strip() != p.text:
            return False
        return p.start - CLOCK_SKEW_NS <= plan.time_ns <= p.end + CLOCK_SKEW_NS

    def _find_plan(self, p: _Pending) -> Plan | None:
        best = None
        for plan in self._plans_by_pid.get(p.pid, ()):
            if self._fits(p, plan) and (best is None or abs(plan.time_ns - p.end) < abs(best.time_ns - p.end)):
                best = plan
        if best is not None:
            self._drop_plan(best)
        return best

    def _take_plans(self, now: int, out: list) -> None:
        inbox = self.sources.plans
        while inbox:
            plan = inbox.popleft()
            best = None
            for p in self._by_pid.get(plan.pid, ()):
                if not p.done and self._fits(p, plan) and (best is None or abs(plan.time_ns - p.end) < abs(plan.time_ns - best.end)):
                    best = p
            if best is not None:
                out.extend(self._finish(best, plan))
                continue
            if len(self._plans) >= self.max_plans:
                _, old = self._plans.popleft()
                self._drop_plan(old)
            self._plans.append((now, plan))
            self._plans_by_pid.setdefault(plan.pid, []).append(plan)

    def _drop_plan(self, plan: Plan) -> None:
        lst = self._plans_by_pid.get(plan.pid)
        if lst is None:
            return
        try:
            lst.remove(plan)
        except ValueError:
            return
        if not lst:
            del self._plans_by_pid[plan.pid]

    def _unindex(self, p: _Pending) -> None:
        p.done = True
        lst = self._by_pid.get(p.pid)
        if lst is not None:
            try:
                lst.remove(p)
            except ValueError:
                pass
            if not lst:
                del self._by_pid[p.pid]

    # ------------------------------------------------------------ estimated plans (explain source)

    def _wants_explain(self, rec, group, text: str, now: int, out: list) -> bool:
        """Whether the statement goes the explain way (then it is in ``out`` or waiting); False: the plain way."""
        explain = getattr(self.sources, "explain", None)
        if explain is None or not text or not getattr(self.sources, "explain_enabled", lambda: False)():
            return False
        server = group[0]
        attrs = server.attributes or {}
        if server.status.status_code == StatusCode.ERROR or (server.end_time - server.start_time) < explain.min_duration_ns:
            return False
        if (attrs.get(ATTR["command_tag"]) or "").split(" ", 1)[0] not in _PLANNED_TAGS or _index(group, "execute") is None:
            return False
        if not explainable(text) or (explain.database and attrs.get(ATTR["namespace"]) not in (None, explain.database)):
            STATS.explains_skipped += 1
            return False
        shape = sqlinfo.fingerprint(text) or text
        cached = explain.lookup(shape)
        if cached is not None:
            out.extend(self._finish_explained(group, attrs.get(ATTR["backend_pid"]), text, shape, cached))
            return True
        params = explain.how(text, getattr(rec, "params", None))
        if params is False:
            STATS.explains_skipped += 1  # $n parameters, no GENERIC_PLAN and no captured values
            return False
        if not explain.request(shape, text, params):
            return False
        if len(self._explain_wait) >= self.max_pending:
            _, _, old, old_pid, old_text = self._explain_wait.popleft()
            out.extend(self._finish_plain(old, old_pid, old_text))
        self._explain_wait.append((now + self.join_timeout_ns, shape, group, attrs.get(ATTR["backend_pid"]), text))
        return True

    def _take_explains(self, now: int, out: list, release: bool) -> None:
        """Release the statements whose shape's EXPLAIN is done, or whose wait is over."""
        if not self._explain_wait:
            return
        explain = self.sources.explain
        keep: deque = deque()
        for item in self._explain_wait:
            deadline, shape, group, pid, text = item
            cached = explain.lookup(shape)
            if cached is not None:
                out.extend(self._finish_explained(group, pid, text, shape, cached))
            elif release or deadline <= now:
                STATS.enrich_timeouts += 1
                out.extend(self._finish_plain(group, pid, text))
            else:
                keep.append(item)
        self._explain_wait = keep

    def _finish_explained(self, group: list, pid, text: str, shape: str, cached) -> list[ReadableSpan]:
        if cached.root is None:
            return self._finish_plain(group, pid, text)
        group = list(group)
        group[0] = self._with_plan_hash(group[0], shape, cached.hash)
        execute = group[_index(group, "execute")]
        group.extend(node_spans(cached.root, execute, self.resource or group[0].resource, estimated=True))
        return self._finish_plain(group, pid, text, counted=True)

    def _with_plan_hash(self, server: ReadableSpan, shape: str | None, digest: str | None) -> ReadableSpan:
        """The statement span with its plan's hash, and a ``plan changed`` event when its shape's last plan differs."""
        if not digest:
            return server
        events = []
        if shape:
            hashes = self._plan_hashes
            previous = hashes.pop(shape, None)
            hashes[shape] = digest
            if len(hashes) > MAX_PLAN_HASHES:
                hashes.popitem(last=False)
            if previous is not None and previous != digest:
                STATS.plan_changes += 1
                events.append(Event(PLAN_CHANGED, attributes={ATTR["plan_hash"]: digest, ATTR["previous_plan_hash"]: previous},
                                    timestamp=server.start_time))
        return amend(server, attributes={ATTR["plan_hash"]: digest}, events=events)

    # ------------------------------------------------------------ releasing

    def _expire(self, p: _Pending) -> list[ReadableSpan]:
        self._unindex(p)
        STATS.enrich_timeouts += 1
        group = list(p.spans)
        group[0] = amend(group[0], attributes={ATTR["plan_missing"]: True})
        return self._finish_plain(group, p.pid, p.text, counted=False)

    def _finish(self, p: _Pending, plan: Plan) -> list[ReadableSpan]:
        self._unindex(p)
        group = list(p.spans)
        server = group[0]
        exec_ms = plan.execution_ms if plan.execution_ms is not None else plan.duration_ms
        exec_ns = int(exec_ms * 1_000_000)
        s_attrs: dict[str, Any] = {ATTR["execution_time"]: exec_ms}
        if plan.planning_ms is not None:
            s_attrs[ATTR["planning_time"]] = plan.planning_ms
        if plan.query_id:
            s_attrs[ATTR["query_id"]] = plan.query_id
        group[0] = self._with_plan_hash(amend(server, attributes=s_attrs), sqlinfo.fingerprint(p.text) if p.text else None,
                                        plan_hash(plan.root))
        i_exec = _index(group, "execute")
        if i_exec is not None:
            execute = group[i_exec]
            held = execute.name.split("+")
            if len(held) > 1:
                # The wire showed no boundary before the execution (BindComplete came with the
                # results): split the execution off where the executor's own time says.
                src = {ATTR["timing_source"]: "auto_explain"}
                cut = max(execute.start_time, execute.end_time - exec_ns)
                before = held[:-1]
                early_attrs = {**src, ATTR["exact"]: False}
                if plan.planning_ms is not None and "plan" in before:
                    early_attrs[ATTR["planning_time"]] = plan.planning_ms
                if len(before) > 1:
                    early_attrs[ATTR["phases"]] = tuple(before)
                first_row = SPAN_ATTR["first_row"]
                early = amend(execute, attributes=early_attrs, end=cut, name="+".join(before),
                              drop=(first_row,) if len(before) > 1 else (ATTR["phases"], first_row))
                exec_attrs = {k: v for k, v in (execute.attributes or {}).items() if k != ATTR["phases"]}
                exec_attrs.update(src)
                if first_row in exec_attrs:
                    # an offset from the start of the span holding execute: from the cut now
                    exec_attrs[first_row] = max(0.0, exec_attrs[first_row] - (cut - execute.start_time) / 1e6)
                execute = make_span("execute", child_context(execute.parent), execute.parent, execute.kind, cut,
                                    execute.end_time, exec_attrs, execute.resource)
                group[i_exec:i_exec + 1] = [early, execute]
            if plan.root:
                group.extend(node_spans(plan.root, execute, self.resource or server.resource))
        return self._finish_plain(group, p.pid, p.text, counted=True, query_id=plan.query_id)

    def _finish_plain(self, group: list, pid, text: str, counted: bool = False, query_id: int | None = None,
                      lock_deadline: int | None = None) -> list[ReadableSpan]:
        """Attach wait events, lock blockers and pg_stat_statements figures, count, return.

        Only a statement blocked by a proxy session whose statement span is not
        known yet waits (``_lock_wait``, until ``lock_deadline``): then nothing is returned.
        """
        server = group[0]
        src = self.sources
        attrs: dict[str, Any] = {}
        events: list[Event] = []
        links: list[Link] = []
        joined = counted
        if pid is not None:
            samples = src.wait_samples(pid, server.start_time, server.end_time)
            if samples:
                lock_attrs, links, wait_ns = self._lock_cause(samples)
                now = time.monotonic_ns()
                if lock_deadline is None:
                    lock_deadline = now + wait_ns
                if wait_ns and now < lock_deadline and len(self._lock_wait) < self.max_pending:
                    self._lock_wait.append((lock_deadline, group, pid, text, counted, query_id))
                    return []
                attrs.update(lock_attrs)
                events = _wait_events(samples)
                joined = True
                if query_id is None:
                    query_id = next((s[3] for s in samples if s[3]), None)
        figures = None
        if src.pgss_enabled():
            if query_id is None and text and sum(1 for s in group if s.kind == SpanKind.SERVER) == 1:
                query_id = src.query_id_for(sqlinfo.fingerprint(text))
            if query_id is not None:
                figures = src.pgss_figures(query_id)
        if query_id is not None and ATTR["query_id"] not in (server.attributes or {}):
            attrs[ATTR["query_id"]] = query_id
        if figures:
            joined = True
            for k, v in figures.items():
                attrs[ATTR["pgss"] + k] = v
        if attrs or events or links:
            group[0] = amend(server, attributes=attrs, events=events, links=links)
        if joined:
            STATS.enrich_joined += 1
        return group

    # ------------------------------------------------------------ lock waits (locks.py)

    def _lock_cause(self, samples: list[tuple]) -> tuple[dict, list[Link], int]:
        """(attributes, links, how long to wait for a blocker's span: 0 when nothing is missing) of a statement's samples."""
        seen: dict[int, tuple] = {}
        for sample in samples:
            for blocker in sample[4] if len(sample) > 4 else ():
                if blocker.pid not in seen and len(seen) < MAX_BLOCKERS:
                    seen[blocker.pid] = (blocker, sample[0])
        if not seen:
            return {}, [], 0
        sessions = getattr(self.sources, "sessions", None)
        attrs: dict[str, Any] = {LOCK_ATTR["blockers"]: len(seen)}
        links: list[Link] = []
        wait_ns = 0
        for i, (blocker, at) in enumerate(seen.values()):
            in_proxy, entries = sessions.entries(blocker) if sessions is not None else (blocker.own, [])
            entry, target = current_statement(entries, blocker, at) if entries else (None, "")
            if in_proxy is None or (in_proxy and target != "statement"):
                wait_ns = self.join_timeout_ns  # the siblings' answer, or a span not built yet
            # its statement's summary: from the span that ran it, else as pg_stat_activity showed it
            named = blocker_attributes(blocker, bool(in_proxy), entry if target == "statement" else None, at)
            if i == 0:
                attrs.update(named)
            if entry is not None:
                named[LOCK_ATTR["link_target"]] = target
                ctx = SpanContext(entry.trace_id, entry.span_id, False, TraceFlags(entry.flags))
                links.append(Link(ctx, named))
        return attrs, links, wait_ns

    def _take_lock_waits(self, now: int, out: list, release: bool) -> None:
        """Release the statements waiting for their blockers' spans: found, or their wait is over."""
        waiting, self._lock_wait = self._lock_wait, deque()
        for deadline, group, pid, text, counted, query_id in waiting:
            out.extend(self._finish_plain(group, pid, text, counted, query_id, lock_deadline=0 if release else deadline))


def _groups(spans: list[ReadableSpan]) -> list[list[ReadableSpan]]:
    """Split a record's spans into statements: a SERVER span followed by its phase children."""
    groups: list[list[ReadableSpan]] = []
    for s in spans:
        if s.kind == SpanKind.SERVER or not groups:
            groups.append([s])
        else:
            groups[-1].append(s)
    return groups


def _index(group: list, phase: str) -> int | None:
    """The index of the child span holding ``phase`` (alone, or with others: ``plan+execute``)."""
    for i, s in enumerate(group):
        if i and phase in s.name.split("+"):
            return i
    return None


def _wait_events(samples: list[tuple]) -> list[Event]:
    """One event per run of identical samples, at the first sample's time."""
    out: list[Event] = []
    prev = None
    count = 0
    first_ts = 0
    for ts, wtype, wevent, *_ in samples:
        key = (wtype, wevent)
        if key != prev:
            if prev is not None:
                out.append(_wait_event(prev, first_ts, count))
            prev, count, first_ts = key, 0, ts
        count += 1
    if prev is not None:
        out.append(_wait_event(prev, first_ts, count))
    return out


def _wait_event(key, ts, count) -> Event:
    wtype, wevent = key
    attrs = {ATTR["wait_event_type"]: wtype or "CPU", ATTR["wait_event"]: wevent or "running", ATTR["wait_samples"]: count}
    return Event("db.postgresql.wait", attributes=attrs, timestamp=ts)
