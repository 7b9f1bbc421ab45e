"""Lock waits' blockers (enrich/locks.py, enrich/sessionfile.py) in memory: matching, the shared file, the join's wait."""

from __future__ import annotations

import time
from collections import deque

from opentelemetry.trace import SpanContext, SpanKind

from pgotel_proxy.enrich._spanutil import child_context, make_span
from pgotel_proxy.enrich.join import Joiner
from pgotel_proxy.enrich.locks import Blocker, SessionStatements, blocker_summary, blockers_from_rows, current_statement
from pgotel_proxy.enrich.sessionfile import Entry, SharedSessions, open_shared

MS = 1_000_000


def entry(start_ms: int, end_ms: int, span_id: int = 0, summary: str = "S") -> Entry:
    return Entry(0xAB, span_id or start_ms + 1, 1, start_ms * MS, end_ms * MS, summary)


def blocker(state: str, query_ms: int | None, xact_ms: int | None = None, pid: int = 9) -> Blocker:
    return Blocker(pid, "app", state, "UPDATE t", None if xact_ms is None else xact_ms * MS,
                   None if query_ms is None else query_ms * MS)


def test_summary_of_an_outside_query_keeps_no_literal():
    assert blocker_summary("UPDATE accounts SET secret = 'hunter2' WHERE id = 42") == "UPDATE accounts"
    assert blocker_summary("<insufficient privilege>") is None
    assert blocker_summary("") is None


def test_idle_blocker_is_at_the_last_statement_it_ran():
    entries = [entry(0, 5, summary="BEGIN"), entry(10, 20, summary="SELECT t"), entry(900, 910, summary="COMMIT")]
    found, target = current_statement(entries, blocker("idle in transaction", 10, 0), at_ns=500 * MS)
    assert (found.summary, target) == ("SELECT t", "statement")


def test_active_blocker_is_at_the_statement_running_at_the_sample():
    # The previous statement ended within the slack of the next one's start: still not the current one.
    entries = [entry(0, 100, summary="UPDATE t"), entry(110, 1200, summary="SELECT")]
    assert current_statement(entries, blocker("active", 112, 0), at_ns=500 * MS)[0].summary == "SELECT"
    # Its span is not built yet: the transaction's latest known span stands in.
    found, target = current_statement(entries[:1], blocker("active", 112, 0), at_ns=500 * MS)
    assert (found.summary, target) == ("UPDATE t", "transaction")
    # ... but never a span of an earlier transaction.
    assert current_statement(entries[:1], blocker("active", 300, 200), at_ns=500 * MS) == (None, "")


def test_a_sibling_answers_what_it_was_asked_about(tmp_path):
    path = str(tmp_path / "sessions")
    SharedSessions.create(path, 2)
    owner = SessionStatements(open_shared(f"{path}:0:2"))
    asker = SessionStatements(open_shared(f"{path}:1:2"))
    for i in range(6):
        owner.note(4242, span(4242, f"S{i} " + "x" * 200, i * 10 * MS, (i * 10 + 5) * MS))
    owner.answer()
    idle = Blocker(4242, "app", "idle in transaction", "S5", 0, 50 * MS)
    assert asker.shared.lookup(4242) is None  # nothing published unasked
    assert asker.entries(idle) == (None, [])  # ... so the asker asks
    owner.answer()
    in_proxy, found = asker.entries(idle)
    assert in_proxy is True
    assert [e.start_ns // MS for e in found] == [20, 30, 40, 50]  # the last HISTORY of them
    assert all(len(e.summary.encode()) <= SharedSessions.SUMMARY_BYTES for e in found)
    assert current_statement(found, idle, at_ns=100 * MS)[0].start_ns == 50 * MS
    # A new statement is published at the next tick; an unknown pid stays unanswered.
    owner.note(4242, span(4242, "COMMIT", 60 * MS, 61 * MS))
    owner.answer()
    assert [e.summary for e in asker.shared.lookup(4242)][-1] == "COMMIT"
    stranger = Blocker(7, None, "active", None, None, None)
    assert asker.entries(stranger) == (None, [])  # asked; the owner has not answered yet
    owner.answer()
    assert asker.entries(stranger) == (False, [])  # answered, and nobody had it
    # A restarted span process of worker 0 starts from an empty region.
    assert open_shared(f"{path}:0:2") is not None and asker.shared.lookup(4242) is None


def test_answers_are_bounded_the_oldest_slot_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(SharedSessions, "SLOTS", 2)
    path = str(tmp_path / "sessions")
    SharedSessions.create(path, 2)
    mine, sibling = open_shared(f"{path}:0:2"), open_shared(f"{path}:1:2")
    for pid in (1, 2, 3):
        mine.publish(pid, [entry(0, 1)])
    assert sibling.lookup(1) is None and sibling.lookup(2) and sibling.lookup(3)
    for pid in range(100, 100 + SharedSessions.ASKS + 1):
        ticket = sibling.ask(pid)
    assert ticket == SharedSessions.ASKS + 1
    # a ring: the first ask was overwritten
    assert mine.asks() == [(1, ticket, set(range(101, 101 + SharedSessions.ASKS)))]
    assert not sibling.answered(ticket)
    mine.mark_seen(1, ticket)
    assert sibling.answered(ticket)


class Sources:
    """The Joiner's view of the enrichment thread: wait samples with a blocker, and the sessions' statements."""

    plans: deque = deque()
    plan_min_duration_ms = 0

    def __init__(self, samples) -> None:
        self.samples = samples
        self.sessions = SessionStatements()

    def plans_enabled(self):
        return False

    def pgss_enabled(self):
        return False

    def wait_samples(self, pid, start, end):
        return self.samples if pid == 5 else []


def span(pid: int, name: str, start: int, end: int):
    ctx = child_context(SpanContext(0xC0FFEE + start, 0x77, False))
    server = make_span(name, ctx, None, SpanKind.SERVER, start, end,
                       {"db.postgresql.backend_pid": pid, "db.query.summary": name}, None)
    return server


def test_waiter_waits_for_its_proxy_blockers_span_then_links_to_it():
    now = time.time_ns()
    holder = Blocker(77, "holder", "active", "SELECT", now - 1000 * MS, now - 500 * MS, own=True)
    src = Sources([(now - 100 * MS, "Lock", "transactionid", None, (holder,))])
    j = Joiner(src, join_timeout=5.0)
    waiter = span(5, "UPDATE t", now - 400 * MS, now)
    assert j.statement(None, [waiter]) == []  # the blocker's running statement is not known yet
    assert len(j) == 1 and j.tick() == []
    sleeping = span(77, "SELECT", now - 500 * MS, now - 10 * MS)
    assert j.statement(None, [sleeping]) == [sleeping]
    (out,) = j.tick()
    assert out.attributes["pgotel.lock.blocker.backend_pid"] == 77
    assert out.attributes["pgotel.lock.blocker.in_proxy"] is True
    assert out.attributes["pgotel.lock.blocker.query.summary"] == "SELECT"
    assert out.attributes["pgotel.lock.blocker.transaction.duration"] == 0.9
    assert [link.context.span_id for link in out.links] == [sleeping.context.span_id]
    assert out.links[0].attributes["pgotel.lock.link_target"] == "statement"
    assert len(j) == 0


def test_waiter_leaves_without_a_link_when_its_blockers_span_never_comes():
    now = time.time_ns()
    holder = Blocker(77, "holder", "active", "SELECT", now - 1000 * MS, now - 500 * MS, own=True)
    outsider = Blocker(12, "batch", "idle in transaction", "DELETE t", now - 2000 * MS, now - 2000 * MS)
    src = Sources([(now - 100 * MS, "Lock", "transactionid", None, (holder, outsider))])
    j = Joiner(src, join_timeout=0.05)
    assert j.statement(None, [span(5, "UPDATE t", now - 400 * MS, now)]) == []
    time.sleep(0.06)
    (out,) = j.tick()
    assert out.attributes["pgotel.lock.blockers"] == 2
    assert out.attributes["pgotel.lock.blocker.backend_pid"] == 77
    assert not out.links


def test_outside_blocker_alone_makes_no_one_wait():
    now = time.time_ns()
    outsider = Blocker(12, "batch", "idle in transaction", "DELETE t", now - 2000 * MS, now - 2000 * MS)
    src = Sources([(now - 100 * MS, "Lock", "transactionid", None, (outsider,))])
    j = Joiner(src, join_timeout=5.0)
    (out,) = j.statement(None, [span(5, "UPDATE t", now - 400 * MS, now)])
    assert out.attributes["pgotel.lock.blocker.in_proxy"] is False
    assert out.attributes["pgotel.lock.blocker.application_name"] == "batch"
    assert out.attributes["pgotel.lock.blocker.query.summary"] == "DELETE t"
    assert any(e.name == "db.postgresql.wait" for e in out.events)


def test_blocker_rows_become_instants_and_hide_a_carried_traceparent():
    carried = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    rows = [(7, carried, "active", "SELECT 1", 2.0, 0.5), (8, "", None, None, None, None)]
    got = blockers_from_rows(rows, now_ns=10_000 * MS)
    got = blockers_from_rows(rows, now_ns=10_000 * MS, own={8})
    assert got[7] == Blocker(7, None, "active", "SELECT", 8_000 * MS, 9_500 * MS, own=False)
    assert got[8] == Blocker(8, None, None, None, None, None, own=True)


def test_a_siblings_old_span_under_a_reused_pid_is_not_the_blocker(tmp_path):
    path = str(tmp_path / "sessions")
    SharedSessions.create(path, 2)
    mine, sibling = open_shared(f"{path}:0:2"), open_shared(f"{path}:1:2")
    mine.publish(31, [entry(100, 110, summary="SELECT old")])  # a session of worker 0, since closed
    sessions = SessionStatements(sibling)
    reused = Blocker(31, "batch", "idle in transaction", "DELETE t", 5_000 * MS, 5_000 * MS)
    assert sessions.entries(reused) == (None, [])
    mine.mark_seen(1, 1)
    assert sessions.entries(reused) == (False, [])
    mine.publish(31, [entry(100, 110), entry(5_000, 5_010, summary="DELETE t")])  # ... or of worker 0 after all
    in_proxy, found = sessions.entries(reused)
    assert in_proxy and [e.summary for e in found] == ["DELETE t"]


def test_with_siblings_an_unknown_blocker_waits_for_their_answer_only(tmp_path):
    path = str(tmp_path / "sessions")
    SharedSessions.create(path, 2)
    now = time.time_ns()
    outsider = Blocker(12, "batch", "idle in transaction", "DELETE t", now - 2000 * MS, now - 2000 * MS)
    src = Sources([(now - 100 * MS, "Lock", "transactionid", None, (outsider,))])
    src.sessions = SessionStatements(open_shared(f"{path}:0:2"))
    sibling = open_shared(f"{path}:1:2")
    j = Joiner(src, join_timeout=5.0)
    assert j.statement(None, [span(5, "UPDATE t", now - 400 * MS, now)]) == []
    assert j.tick() == []
    (asked,) = sibling.asks()
    assert asked[2] == {12}
    SessionStatements(sibling).answer()  # the sibling's tick: not one of its sessions
    (out,) = j.tick()
    assert out.attributes["pgotel.lock.blocker.in_proxy"] is False and not out.links


def test_blocker_statement_without_a_span_links_to_its_transaction_with_its_own_summary():
    now = time.time_ns()
    # Its UPDATE (the statement at the sample) was not sampled: only the transaction's first statement has a span.
    holder = Blocker(77, "holder", "idle in transaction", "UPDATE t", now - 1000 * MS, now - 600 * MS, own=True)
    src = Sources([(now - 100 * MS, "Lock", "transactionid", None, (holder,))])
    j = Joiner(src, join_timeout=0.05)
    first = span(77, "SELECT t", now - 1000 * MS, now - 990 * MS)
    j.statement(None, [first])
    assert j.statement(None, [span(5, "UPDATE t", now - 400 * MS, now)]) == []
    time.sleep(0.06)
    (out,) = j.tick()
    assert out.attributes["pgotel.lock.blocker.query.summary"] == "UPDATE t"
    assert [link.context.span_id for link in out.links] == [first.context.span_id]
    assert out.links[0].attributes["pgotel.lock.link_target"] == "transaction"
