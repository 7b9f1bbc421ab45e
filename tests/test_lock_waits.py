"""Lock waits with their cause (enrich/locks.py), against the real test server with psycopg.

A session holds a row lock in an open transaction, another one's UPDATE waits
on it for longer than the wait sampling's threshold, then the first commits:
the waiting statement's exported span names the blocker, and links to the
blocker's statement span when the blocker is a session of the proxy — of the
same worker or, with ``--workers 2``, of a sibling.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from tracetree import comment, random_traceparent
from waiting import wait_for

LOCK = "pgotel.lock."
HOLD_SECONDS = 1.2


@pytest.fixture(scope="module")
def lock_rows(pg):
    pg.psql(
        "DROP TABLE IF EXISTS lock_rows;"
        "CREATE TABLE lock_rows (id int PRIMARY KEY, note text);"
        "INSERT INTO lock_rows VALUES (1, 'a'), (2, 'b');"
    )


def sampling_proxy(make_proxy, pg, **overrides):
    overrides.setdefault("stats_dsn", pg.dsn())
    overrides.setdefault("enrich_sources", ["wait_events"])
    overrides.setdefault("wait_event_threshold", 0.2)
    overrides.setdefault("join_timeout", 2.0)
    # The sampler runs in the span process: on a busy test machine the idle class would starve it.
    overrides.setdefault("span_process_priority", "normal")
    proxy = make_proxy(**overrides)
    assert proxy.enricher.wait_ready(15)
    return proxy


def server_span(spans, trace_id):
    found = [s for s in spans if s.trace_id == trace_id and s.kind == "SERVER"]
    assert len(found) == 1, found
    return found[0]


def wait_behind(holder: psycopg.Connection, waiter_dsn: str, waiter_sql: str, release_after: float = HOLD_SECONDS):
    """Run ``waiter_sql`` on a new connection while ``holder``'s transaction is open; commit it after a while."""
    release = threading.Timer(release_after, holder.commit)
    release.start()
    started = time.monotonic()
    with psycopg.connect(waiter_dsn, autocommit=True) as conn:
        conn.execute(waiter_sql)
    waited = time.monotonic() - started
    release.join()
    return waited


def test_blocker_in_the_proxy_is_linked_with_its_statement(make_proxy, pg, otlp, lock_rows):
    proxy = sampling_proxy(make_proxy, pg)
    held, waiting = random_traceparent(), random_traceparent()
    with psycopg.connect(proxy.dsn(application_name="holder-app")) as holder:
        holder_pid = holder.info.backend_pid
        holder.execute(comment("SELECT note FROM lock_rows WHERE id = 1 FOR UPDATE", held)).fetchall()
        waited = wait_behind(holder, proxy.dsn(), comment("UPDATE lock_rows SET note = 'z' WHERE id = 1", waiting))
    assert waited >= HOLD_SECONDS - 0.2

    spans = otlp.wait_for(lambda ss: any(s.trace_id == waiting.trace_id and s.kind == "SERVER" for s in ss))
    stmt = server_span(spans, waiting.trace_id)
    blocker = server_span(spans, held.trace_id)
    assert any(e.attributes.get("db.postgresql.wait_event_type") == "Lock" for e in stmt.events), stmt
    a = stmt.attributes
    assert a[LOCK + "blockers"] == 1
    assert a[LOCK + "blocker.backend_pid"] == holder_pid
    assert a[LOCK + "blocker.in_proxy"] is True
    assert a[LOCK + "blocker.application_name"] == "holder-app"
    assert a[LOCK + "blocker.state"] == "idle in transaction"
    assert a[LOCK + "blocker.query.summary"] == blocker.attributes["db.query.summary"] == "SELECT lock_rows"
    # Its transaction was open at least from the SELECT to the sample past the threshold.
    assert 0.2 <= a[LOCK + "blocker.transaction.duration"] < HOLD_SECONDS + 1
    assert [(link.trace_id, link.span_id) for link in stmt.links] == [(blocker.trace_id, blocker.span_id)]
    link = stmt.links[0]
    assert link.attributes[LOCK + "link_target"] == "statement"
    assert link.attributes[LOCK + "blocker.backend_pid"] == holder_pid


def test_blocker_running_a_statement_is_linked_to_that_statement(make_proxy, pg, otlp, lock_rows):
    """The blocker's statement at the sample is still running: the waiter waits for its span."""
    proxy = sampling_proxy(make_proxy, pg)
    first, sleeping, waiting = random_traceparent(), random_traceparent(), random_traceparent()
    with psycopg.connect(proxy.dsn()) as holder:
        holder.execute(comment("UPDATE lock_rows SET note = 'h' WHERE id = 2", first))
        # The lock is held while the holder runs its next statement, then released at once.
        sleeper = threading.Thread(target=lambda: (holder.execute(comment("SELECT pg_sleep(1.5)", sleeping)),
                                                   holder.commit()))
        sleeper.start()
        time.sleep(0.1)
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute(comment("UPDATE lock_rows SET note = 'w' WHERE id = 2", waiting))
        sleeper.join()
    spans = otlp.wait_for(lambda ss: any(s.trace_id == waiting.trace_id and s.kind == "SERVER" for s in ss))
    stmt = server_span(spans, waiting.trace_id)
    sleep_span = server_span(spans, sleeping.trace_id)
    assert stmt.attributes[LOCK + "blocker.state"] == "active"
    assert stmt.attributes[LOCK + "blocker.query.summary"] == "SELECT"
    assert [(link.trace_id, link.span_id) for link in stmt.links] == [(sleep_span.trace_id, sleep_span.span_id)]
    assert stmt.links[0].attributes[LOCK + "link_target"] == "statement"


def test_blocker_outside_the_proxy_is_named_without_its_literals(make_proxy, pg, otlp, lock_rows):
    proxy = sampling_proxy(make_proxy, pg)
    waiting = random_traceparent()
    with psycopg.connect(pg.dsn(), application_name="batch-job") as holder:
        holder_pid = holder.info.backend_pid
        holder.execute("SELECT note FROM lock_rows WHERE id = 1 AND note <> 'secret-literal' FOR UPDATE").fetchall()
        wait_behind(holder, proxy.dsn(), comment("UPDATE lock_rows SET note = 'y' WHERE id = 1", waiting))
    spans = otlp.wait_for(lambda ss: any(s.trace_id == waiting.trace_id and s.kind == "SERVER" for s in ss))
    stmt = server_span(spans, waiting.trace_id)
    a = stmt.attributes
    assert a[LOCK + "blocker.backend_pid"] == holder_pid
    assert a[LOCK + "blocker.in_proxy"] is False
    assert a[LOCK + "blocker.application_name"] == "batch-job"
    assert a[LOCK + "blocker.query.summary"] == "SELECT lock_rows"
    assert not stmt.links
    assert not any("secret-literal" in str(v) for v in a.values())


def test_short_statements_and_other_waits_name_no_blocker(make_proxy, pg, otlp, lock_rows):
    proxy = sampling_proxy(make_proxy, pg)
    ctx = random_traceparent()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(comment("SELECT pg_sleep(0.6)", ctx))
    spans = otlp.wait_for(lambda ss: any(s.trace_id == ctx.trace_id and s.kind == "SERVER" for s in ss))
    stmt = server_span(spans, ctx.trace_id)
    assert any(e.attributes.get("db.postgresql.wait_event") == "PgSleep" for e in stmt.events), stmt
    assert not any(k.startswith(LOCK) for k in stmt.attributes) and not stmt.links


def test_blocker_of_a_sibling_worker_is_linked(pg, tmp_path, otlp, lock_rows):
    from test_workers import ProxyProcess, per_worker

    p = ProxyProcess(pg, tmp_path, "--stats-dsn", pg.dsn(), "--enrich-sources", "wait_events",
                     "--wait-event-threshold", "0.2", "--join-timeout", "2",
                     "--span-process-priority", "normal", otlp=otlp)
    conns: list[psycopg.Connection] = []
    try:
        p.wait_ready()
        # Each worker's span process samples once its side connection is up, and says so.
        wait_for(lambda: p.log().count("wait_events ok") == 2, 15, "both workers sampling wait events")
        time.sleep(0.3)  # a publish interval: the ready probe's connection is counted

        def worker_of_new_connection() -> tuple[psycopg.Connection, int]:
            before = per_worker(p, "connections_accepted")
            conn = psycopg.connect(p.dsn())
            conns.append(conn)
            grew = wait_for(lambda: [i for i, (a, b) in enumerate(zip(per_worker(p, "connections_accepted"), before)) if a > b],
                            5, "the new connection counted")
            return conn, grew[0]

        holder, holder_worker = worker_of_new_connection()
        for _ in range(40):
            conn, worker = worker_of_new_connection()
            if worker != holder_worker:
                break
        else:
            pytest.fail("no connection reached the second worker")
        held, waiting = random_traceparent(), random_traceparent()
        holder.execute(comment("SELECT note FROM lock_rows WHERE id = 1 FOR UPDATE", held)).fetchall()
        release = threading.Timer(HOLD_SECONDS, holder.commit)
        release.start()
        conn.autocommit = True
        conn.execute(comment("UPDATE lock_rows SET note = 'x' WHERE id = 1", waiting))
        release.join()
        spans = otlp.wait_for(lambda ss: any(s.trace_id == waiting.trace_id and s.kind == "SERVER" for s in ss)
                              and any(s.trace_id == held.trace_id for s in ss), 10)
        stmt = server_span(spans, waiting.trace_id)
        blocker = server_span(spans, held.trace_id)
        assert stmt.attributes.get(LOCK + "blocker.backend_pid") == holder.info.backend_pid, stmt
        assert stmt.attributes[LOCK + "blocker.in_proxy"] is True
        assert stmt.attributes[LOCK + "blocker.query.summary"] == "SELECT lock_rows"
        assert [(link.trace_id, link.span_id) for link in stmt.links] == [(blocker.trace_id, blocker.span_id)]
    finally:
        for c in conns:
            c.close()
        assert p.stop() == 0, p.log()
