"""The join rules and bounds of :class:`pgotel_proxy.enrich.join.Joiner`, driven with spans and plans in memory."""

from __future__ import annotations

import time
from collections import deque
from types import SimpleNamespace

from opentelemetry.trace import SpanContext, SpanKind

from pgotel_proxy.enrich._spanutil import child_context, make_span
from pgotel_proxy.enrich.join import CLOCK_SKEW_NS, Joiner
from pgotel_proxy.enrich.plans import Plan
from pgotel_proxy.stats import STATS


class Sources:
    """What the Joiner reads from the enrichment thread: here only plans, no statistics."""

    def __init__(self) -> None:
        self.plans: deque = deque()
        self.plan_min_duration_ms = 0

    def plans_enabled(self):
        return True

    def pgss_enabled(self):
        return False

    def wait_samples(self, pid, start, end):
        return []


def statement(pid: int, sql: str, start: int, end: int):
    root = SpanContext(0xABC, 0x1234 + start % 1000, False)
    ctx = child_context(root)
    server = make_span("SELECT t", ctx, None, SpanKind.SERVER, start, end,
                       {"db.postgresql.backend_pid": pid, "db.postgresql.command_tag": "SELECT 1"}, None)
    execute = make_span("execute", child_context(ctx), ctx, SpanKind.INTERNAL, start, end, {"pgotel.timing.exact": True}, None)
    return SimpleNamespace(sql=sql, status="ok", protocol="simple"), [server, execute]


def plan(pid: int, sql: str, at: int) -> Plan:
    return Plan(at, pid, 0.5, sql, {"Node Type": "Seq Scan", "Relation Name": "t", "Actual Total Time": 0.4, "Actual Loops": 1})


def test_join_needs_same_pid_same_text_and_time_window():
    src = Sources()
    j = Joiner(src, join_timeout=5.0)
    now = time.time_ns()
    rec, spans = statement(7, "SELECT 1 FROM t", now, now + 1_000_000)
    assert j.statement(rec, spans) == []
    src.plans.extend([
        plan(8, "SELECT 1 FROM t", now),  # other backend
        plan(7, "SELECT 2 FROM t", now),  # other text
        plan(7, "SELECT 1 FROM t", now + 2 * CLOCK_SKEW_NS),  # too late
    ])
    assert j.tick() == []
    src.plans.append(plan(7, "SELECT 1 FROM t", now + 1_000_000))
    out = j.tick()
    assert [s.name for s in out] == ["SELECT t", "execute", "Seq Scan t"]
    assert len(j) == 0


def test_plan_logged_before_its_statement_arrives_is_kept():
    src = Sources()
    j = Joiner(src, join_timeout=5.0)
    now = time.time_ns()
    src.plans.append(plan(3, "SELECT 1 FROM t", now + 500_000))
    assert j.tick() == []
    rec, spans = statement(3, "SELECT 1 FROM t", now, now + 1_000_000)
    assert [s.name for s in j.statement(rec, spans)] == ["SELECT t", "execute", "Seq Scan t"]


def test_full_pending_evicts_the_oldest_waiting_statement_once():
    # Regression: a joined statement still at the front of the queue was released a second time
    # (and counted as a timeout) when the queue was full.
    src = Sources()
    j = Joiner(src, join_timeout=60.0, max_pending=2)
    now = time.time_ns()
    released = []
    before = STATS.enrich_timeouts
    recs = [statement(1, f"SELECT {i} FROM t", now + i * 10_000_000, now + i * 10_000_000 + 1_000_000) for i in range(4)]
    released += j.statement(*recs[0])
    released += j.statement(*recs[1])
    # The plan is taken by the next statement() call itself, which then finds the queue "full".
    src.plans.append(plan(1, "SELECT 0 FROM t", now + 1_000_000))
    released += j.statement(*recs[2])
    ids = [s.context.span_id for s in released]
    assert len(ids) == len(set(ids)) == 3
    assert STATS.enrich_timeouts == before
    released += j.statement(*recs[3])  # full: statement 1 leaves without its plan
    assert STATS.enrich_timeouts == before + 1
    assert released[-2].attributes["pgotel.enrich.plan_missing"] is True
    assert released[-2].attributes["db.postgresql.backend_pid"] == 1
    assert len(j) == 2
    assert len(j.release_all()) == 4


def test_a_plan_splits_the_execution_off_a_child_holding_several_phases():
    """The wire showed no boundary inside parse+plan+execute; the executor's time from the log does."""
    src = Sources()
    j = Joiner(src, join_timeout=5.0)
    now = time.time_ns()
    rec, (server, _) = statement(5, "SELECT 1 FROM t", now, now + 2_000_000)
    ctx = server.context
    merged = make_span("parse+plan+execute", child_context(ctx), ctx, SpanKind.INTERNAL, now, now + 2_000_000,
                       {"pgotel.timing.exact": True, "pgotel.phases": ("parse", "plan", "execute"),
                        "pgotel.execute.first_row_offset_ms": 1.8}, None)
    src.plans.append(plan(5, "SELECT 1 FROM t", now + 1_000_000))  # the executor took 0.5 ms
    out = j.statement(rec, [server, merged])
    assert [s.name for s in out] == ["SELECT t", "parse+plan", "execute", "Seq Scan t"]
    early, execute = out[1], out[2]
    assert (early.start_time, early.end_time) == (now, now + 1_500_000)
    assert (execute.start_time, execute.end_time) == (now + 1_500_000, now + 2_000_000)
    assert early.context.span_id == merged.context.span_id and execute.context.span_id != merged.context.span_id
    assert execute.parent.span_id == early.parent.span_id == ctx.span_id
    assert early.attributes["pgotel.phases"] == ("parse", "plan")
    assert early.attributes["pgotel.timing.exact"] is False  # its end is the server's figure, not the wire's
    assert execute.attributes["pgotel.timing.exact"] is True and "pgotel.phases" not in execute.attributes
    assert early.attributes["pgotel.timing.source"] == execute.attributes["pgotel.timing.source"] == "auto_explain"
    assert out[3].parent.span_id == execute.context.span_id
    # The first row's offset moves with the start of the span holding execute.
    assert "pgotel.execute.first_row_offset_ms" not in early.attributes
    assert abs(execute.attributes["pgotel.execute.first_row_offset_ms"] - 0.3) < 1e-9


def test_auto_explain_plan_of_another_shape_than_last_time_yields_plan_changed():
    src = Sources()
    j = Joiner(src, join_timeout=5.0)
    names = []
    for i, root in enumerate(({"Node Type": "Seq Scan", "Relation Name": "t"},
                              {"Node Type": "Seq Scan", "Relation Name": "t", "Total Cost": 9.0},  # same plan, dearer
                              {"Node Type": "Index Scan", "Relation Name": "t", "Index Name": "t_a"})):
        now = time.time_ns()
        rec, spans = statement(5, f"SELECT a FROM t WHERE a = {i}", now, now + 1_000_000)
        src.plans.append(Plan(now + 500_000, 5, 0.5, rec.sql, root))
        out = j.statement(rec, spans)
        names.append([e.name for e in out[0].events])
        hashes = out[0].attributes["db.postgresql.plan.hash"], [dict(e.attributes) for e in out[0].events]
    assert names == [[], [], ["plan changed"]]
    digest, events = hashes
    assert events[0]["db.postgresql.plan.hash"] == digest != events[0]["db.postgresql.plan.previous_hash"]


def test_explain_requests_past_the_rate_are_refused_and_counted():
    from pgotel_proxy.enrich.explain import ExplainSource

    src = ExplainSource(min_duration=0.0, rate=1.0, cache_ttl=60.0, capture_parameters=False, capture_literals=False)
    before = STATS.explains_rate_limited
    assert src.request("a", "SELECT 1", ())
    assert src.request("a", "SELECT 1", ())  # already asked: no second EXPLAIN
    assert not src.request("b", "SELECT 2", ())
    assert STATS.explains_rate_limited == before + 1
    assert list(src._requests) == [("a", "SELECT 1", None)]
    assert src.how("SELECT $1", ("1",)) is False  # before 16, parameters not captured
    src.major = 16
    assert src.how("SELECT $1", None) == ()


# ------------------------------------------------- statements the join only adds attributes to


class PgssSources(Sources):
    """No plan source; pg_stat_statements knows every text; backend 9 was sampled waiting."""

    def __init__(self) -> None:
        super().__init__()
        from pgotel_proxy.enrich.locks import SessionStatements

        self.sessions = SessionStatements()

    def plans_enabled(self):
        return False

    def pgss_enabled(self):
        return True

    def query_id_for(self, fingerprint):
        return 42 if fingerprint else None

    def pgss_figures(self, query_id):
        return {"calls": 7}

    def wait_samples(self, pid, start, end):
        return [(start + 1, "Lock", "relation", None)] if pid == 9 else []


def _enriched_spans(plain: bool, pid: int) -> tuple[list, PgssSources]:
    """The spans the span helper builds for extended statements with a join over PgssSources, decoded.

    ``plain``: the join may say what it adds (Joiner.plain), else every statement takes the full join.
    """
    from pgotel_proxy.config import Config
    from pgotel_proxy.protocol.events import Statement
    from pgotel_proxy.tracing import otlp
    from pgotel_proxy.tracing.helper import SpanHelper
    from pgotel_proxy.tracing.process import _ChildInfo
    from pgotel_proxy.tracing.spans import ConnState

    src = PgssSources()
    j = Joiner(src, join_timeout=5.0)
    enricher = SimpleNamespace(statement=j.statement, tick=j.tick, release_all=j.release_all, pending=lambda: len(j),
                               sessions=src.sessions, stop=lambda timeout: None)
    if plain:
        enricher.plain = j.plain
    helper = SpanHelper(Config(exporter="none", sample_rate=1.0, latency_histograms=False), exporter=None)
    helper.enricher = enricher
    try:
        state = ConnState(_ChildInfo(pid, "app"), {"db.system.name": "postgresql"})
        t = 1_800_000_000 * 10**9  # the same records in every call
        built: list = []
        for batch in range(3):  # the first builds each shape, the next are spanned from it
            records = []
            for i in range(4):
                # (the third not sampled: no spans, between records with spans in one compiled run)
                tp = f"00-{0xABC + batch:032x}-{0x1000 + i:016x}-{'00' if i == 2 else '01'}"
                records.append(Statement("extended", f"SELECT abalance FROM t WHERE aid = $1 /*traceparent='{tp}'*/",
                                         start_ns=t, parse_start_ns=t, parse_end_ns=t + 20_000, bind_start_ns=t + 1_000,
                                         bind_end_ns=t + 21_000, exec_start_ns=t + 2_000, end_ns=t + 60_000,
                                         status="ok", tag="SELECT 1", rows=1, tx_status="I"))
                t += 100_000
            helper.build(state, records, built)
        built += j.release_all()
    finally:
        helper.shutdown()
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest.FromString(otlp.encode_request(built))
    return [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans], src, built


def _without_ids(span) -> tuple:
    attrs = sorted((kv.key, str(kv.value)) for kv in span.attributes)
    return span.name, span.kind, span.start_time_unix_nano, span.end_time_unix_nano, tuple(attrs), len(span.events)


def test_statements_the_join_only_adds_figures_to_are_built_encoded_with_the_same_spans():
    encoded, src, built = _enriched_spans(plain=True, pid=7)
    full, _, full_built = _enriched_spans(plain=False, pid=7)
    assert all(type(s) is tuple for s in built)  # encoded, none made as a ReadableSpan
    assert not any(type(s) is tuple for s in full_built)
    assert sorted(map(_without_ids, encoded)) == sorted(map(_without_ids, full))
    servers = [s for s in encoded if s.kind == s.SPAN_KIND_SERVER]
    assert len(servers) == 9
    for s in servers:
        attrs = {kv.key: kv.value for kv in s.attributes}
        assert attrs["db.postgresql.query_id"].int_value == 42 and attrs["db.postgresql.pgss.calls"].int_value == 7
    # each statement span is noted for lock waits, as the full join notes them
    noted = src.sessions.entries(SimpleNamespace(own=True, pid=7))[1]
    assert [(e.trace_id, e.span_id, e.start_ns, e.end_ns, e.summary) for e in noted] == [
        (int.from_bytes(s.trace_id, "big"), int.from_bytes(s.span_id, "big"), s.start_time_unix_nano,
         s.end_time_unix_nano, s.name) for s in servers]
    assert {e.flags for e in noted} == {1}


def test_a_statement_whose_backend_was_sampled_waiting_takes_the_full_join():
    encoded, _, built = _enriched_spans(plain=True, pid=9)
    assert not any(type(s) is tuple for s in built)
    assert all(len(s.events) == 1 for s in encoded if s.kind == s.SPAN_KIND_SERVER)
