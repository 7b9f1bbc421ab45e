"""Export paths: OTLP over gRPC and HTTP, the standard OTEL_* variables, the console tree, a sick collector, shutdown.

The proxy runs in-process (``make_proxy``), so the OpenTelemetry environment
variables the exporters read are set with ``monkeypatch`` before it starts.
A sick collector is the in-process receiver in its ``error`` or ``blackhole``
mode, or stopped altogether: the relay must keep its pace while spans are
dropped (and counted) behind a small bounded queue.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from pgotel_proxy.config import Config
from pgotel_proxy.stats import STATS
from tracetree import assert_statement, comment, server_spans
from waiting import best_rate, wait_for

pytestmark = pytest.mark.timeout(90)


def _traced_statement(proxy, app) -> tuple:
    """One extended statement under an app span; returns the app context."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with app.span() as ctx:
            assert conn.execute(comment("SELECT %s::int + 1", ctx), (1,)).fetchone() == (2,)
    return ctx


def _assert_tree(otlp, ctx) -> list:
    spans = otlp.wait_for(
        lambda s: any(x.kind == "CLIENT" and x.trace_id == ctx.trace_id for x in s) and server_spans(s, ctx.trace_id)
    )
    (stmt,) = server_spans(spans, ctx.trace_id)
    assert_statement(spans, stmt, name="SELECT", phases=("parse+plan+execute",), parent=ctx.span_id)
    return spans


def test_grpc_exporter_delivers_the_tree(make_proxy, otlp, app):
    proxy = make_proxy(otlp_protocol="grpc", otlp_endpoint=f"http://{otlp.grpc_endpoint}")
    ctx = _traced_statement(proxy, app)
    proxy.flush()
    _assert_tree(otlp, ctx)
    assert otlp.request_count(transport="grpc") >= 1
    # The app exports over HTTP; the proxy's spans came only over gRPC.
    assert otlp.request_count(transport="http") >= 1


def test_standard_env_vars(make_proxy, otlp, app, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.http_endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "orders-db-proxy")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging,team=storage")
    proxy = make_proxy(otlp_endpoint=None)
    ctx = _traced_statement(proxy, app)
    proxy.flush()
    spans = _assert_tree(otlp, ctx)
    for s in spans:
        if s.scope == "pgotel_proxy":
            assert s.resource["service.name"] == "orders-db-proxy"
            assert s.resource["deployment.environment"] == "staging"
            assert s.resource["team"] == "storage"


def test_env_protocol_grpc(make_proxy, otlp, app, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{otlp.grpc_endpoint}")
    proxy = make_proxy(otlp_endpoint=None)
    ctx = _traced_statement(proxy, app)
    proxy.flush()
    _assert_tree(otlp, ctx)
    assert otlp.request_count(transport="grpc") >= 1


def test_service_name_option_beats_env(make_proxy, otlp, app, monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    proxy = make_proxy(service_name="from-config")
    ctx = _traced_statement(proxy, app)
    proxy.flush()
    spans = _assert_tree(otlp, ctx)
    assert {s.resource["service.name"] for s in spans if s.scope == "pgotel_proxy"} == {"from-config"}


def test_console_exporter_prints_a_tree(make_proxy, otlp, app, capfd):
    proxy = make_proxy(exporter="console")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with app.span() as ctx:
            conn.execute(comment("SELECT %s::int", ctx), (7,))
            conn.execute(comment("BEGIN; SELECT 1; COMMIT", ctx))
    proxy.flush()
    deadline = time.monotonic() + 5
    out = ""
    while time.monotonic() < deadline:
        out += capfd.readouterr().out  # (the span process prints on the stdout it inherits)
        if out.count("\n") >= 10:
            break
        time.sleep(0.05)
    lines = out.splitlines()
    assert f"trace {ctx.trace_id}" in lines, out
    # The statement and its phases, indented under it. Parse, Bind and Execute went in one
    # write: no boundary between them was observed, so one span holds all three, and its
    # end (Execute's answer, flushed at Sync) was.
    i = next(n for n, line in enumerate(lines) if line.startswith("  SELECT  "))
    assert [l.split()[0] for l in lines[i : i + 2]] == ["SELECT", "parse+plan+execute"], lines[i : i + 3]
    assert lines[i + 1].startswith("    ") and "exact=True" in lines[i + 1], lines[i : i + 3]
    assert not lines[i + 2].startswith("    "), lines[i : i + 3]
    for name in ("BEGIN", "COMMIT"):
        assert any(l.startswith(f"  {name}  ") for l in lines), out
    # Nothing went to the collector.
    assert not [s for s in otlp.spans if s.scope == "pgotel_proxy"]


# --------------------------------------------------------------------------
# a sick collector


def _workload(proxy, n_conns: int = 4, per_conn: int = 500) -> float:
    """Statements per second for ``n_conns`` connections each running ``per_conn`` simple queries."""
    conns = [psycopg.connect(proxy.dsn(), autocommit=True) for _ in range(n_conns)]
    errors: list[BaseException] = []
    start = threading.Barrier(n_conns + 1)

    def run(conn) -> None:
        try:
            start.wait()
            for i in range(per_conn):
                conn.execute("SELECT 1")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(60)
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    assert not errors, errors
    return n_conns * per_conn / elapsed


class _QueueWatch:
    """The largest length the span process's export queue reached while the block ran, as the process reported it."""

    def __init__(self, proxy) -> None:
        self.tracer = proxy.tracer
        self.max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.max = max(self.max, self.tracer._child_queue)
            time.sleep(0.001)

    def __enter__(self) -> "_QueueWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("sickness", ["blackhole", "error", "stopped"])
def test_sick_collector_never_slows_the_relay(make_proxy, otlp, sickness):
    proxy = make_proxy(span_queue_size=200, export_batch_size=50, export_timeout=0.5, shutdown_timeout=1.0)
    _workload(proxy, 2, 50)  # warm up: connections, caches
    healthy = _workload(proxy)
    proxy.flush()
    dropped_healthy = STATS.spans_dropped
    statements_dropped_healthy = STATS.statements_dropped

    if sickness == "stopped":
        otlp.stop()
    else:
        otlp.mode = sickness
    with _QueueWatch(proxy) as watch:
        sick = best_rate(lambda: _workload(proxy), 0.5 * healthy)
    max_queue = watch.max
    # Both runs traced 2000 statements (4000 spans); the sick one could export almost nothing.
    # The span process waits while the export queue is more than half full, so the loss shows
    # as spans with no room or that failed to export, counted as the span process reports them
    # (or as statements, 2 spans each, once the relay's buffer for it is full).
    def dropped_sick() -> int:
        return (STATS.spans_dropped - dropped_healthy
                + 2 * (STATS.statements_dropped - statements_dropped_healthy))

    wait_for(lambda: dropped_sick() >= 1000, timeout=30, what="the spans a sick collector loses to be counted")
    assert max_queue <= 200
    assert sick >= 0.5 * healthy, f"healthy {healthy:.0f}/s, sick collector {sick:.0f}/s"

    # Shutdown gives up on the sick collector within its deadline.
    t0 = time.monotonic()
    proxy.tracer.shutdown()
    assert time.monotonic() - t0 < 1.0 + 1.5


def test_a_slow_collector_makes_the_span_process_wait_rather_than_drop(make_proxy, otlp):
    """A burst larger than the export queue: the span process waits for room, records queue before it, nothing is lost."""
    # The counters are the process's: earlier tests' tracers must be gone (a span process's
    # reader still reporting).
    def others() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name == "pgotel-span-process"]

    wait_for(lambda: not others(), timeout=15, what="earlier tests' tracer threads to end")
    proxy = make_proxy(sample_rate=1.0, span_queue_size=400, export_batch_size=50)
    _workload(proxy, 1, 10)
    proxy.flush()
    otlp.clear()
    otlp.delay, otlp.mode = 0.05, "slow"  # 50 spans every 50 ms, at best
    spans_dropped, statements_dropped = STATS.spans_dropped, STATS.statements_dropped
    with _QueueWatch(proxy) as watch:
        _workload(proxy, 2, 150)  # 300 statements, 600 spans, at once
        proxy.flush(timeout=30)
    max_queue = watch.max
    assert (STATS.spans_dropped, STATS.statements_dropped) == (spans_dropped, statements_dropped)
    assert max_queue < 400  # past half the queue the span process waits: the queue never filled
    otlp.wait_for(lambda got: sum(s.name == "SELECT" for s in got) >= 300, timeout=30)


def test_collector_recovers(make_proxy, otlp, app):
    proxy = make_proxy(span_queue_size=200, export_batch_size=50, export_timeout=0.5)
    otlp.mode = "error"
    _workload(proxy, 1, 50)
    proxy.flush()
    failures = STATS.export_failures
    otlp.mode = "ok"
    ctx = _traced_statement(proxy, app)
    proxy.flush()
    _assert_tree(otlp, ctx)
    assert STATS.export_failures >= failures


def test_shutdown_flushes_buffered_spans(make_proxy, otlp, app):
    # A long interval: only the shutdown flush can deliver these spans.
    proxy = make_proxy(export_interval=60, shutdown_timeout=5)
    ctx = _traced_statement(proxy, app)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        for _ in range(20):
            conn.execute("SELECT 1")
    time.sleep(0.2)
    assert not [s for s in otlp.spans if s.scope == "pgotel_proxy"]
    t0 = time.monotonic()
    proxy.tracer.shutdown()
    assert time.monotonic() - t0 < 5
    spans = _assert_tree(otlp, ctx)
    mine = server_spans([s for s in spans if s.scope == "pgotel_proxy"])
    assert len(mine) == 21, otlp.dump()


def test_flush_waits_for_the_export_in_flight(make_proxy, otlp, app):
    # A collector that answers after 0.5 s: flush() must not return while the batch is on the wire.
    otlp.delay = 0.5
    otlp.mode = "slow"
    proxy = make_proxy()
    ctx = _traced_statement(proxy, app)
    proxy.flush()
    assert server_spans(otlp.spans, ctx.trace_id), "flush returned before its spans were exported"


def test_shutdown_deadline_beats_a_long_export_timeout(make_proxy, otlp):
    # export_timeout (10 s) is far beyond shutdown_timeout: shutdown still ends on time.
    proxy = make_proxy(export_timeout=10, shutdown_timeout=1.0)
    otlp.mode = "blackhole"
    dropped = STATS.spans_dropped
    _workload(proxy, 1, 30)
    time.sleep(0.2)  # an export starts (export_interval is 50 ms here) and sticks
    _workload(proxy, 1, 30)  # more spans queue behind the stuck export
    t0 = time.monotonic()
    proxy.tracer.shutdown()
    took = time.monotonic() - t0
    assert took < 1.0 + 0.5, f"shutdown took {took:.2f}s"
    # What could not be delivered is counted.
    assert STATS.spans_dropped - dropped >= 60


def _encoded_spans(count: int) -> list:
    """``count`` statements' encoded spans (4 each), as the span process builds them."""
    from opentelemetry.sdk.resources import Resource

    from pgotel_proxy.protocol.events import Statement
    from pgotel_proxy.tracing.spans import ConnState, SpanBuilder

    class _Session:
        backend_pid = 1
        server_params: dict = {}
        startup_params: dict = {}

    class _Info:
        session = _Session()

    builder = SpanBuilder(resource=Resource.create({"service.name": "split"}), sample_rate=1.0,
                          capture_parameters=False, capture_literals=False, encode=True)
    conn = ConnState(_Info(), {"db.system.name": "postgresql"})
    out: list = []
    for i in range(count):
        t = 1_000_000 + i * 1_000
        builder.build(conn, Statement("extended", f"SELECT {i} FROM t WHERE id = $1", start_ns=t, parse_start_ns=t,
                                      parse_end_ns=t + 10, bind_start_ns=t + 20, bind_end_ns=t + 30,
                                      exec_start_ns=t + 40, end_ns=t + 50, status="ok", tag="SELECT 1", rows=1,
                                      tx_status="I"), out)
    return out


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_a_batch_too_large_for_one_request_goes_in_parts(otlp, protocol, monkeypatch):
    """Every span arrives once, in several requests each under the limit; counted as exported."""
    from pgotel_proxy.tracing import otlp as otlp_mod
    from pgotel_proxy.tracing.export import ExportPipeline, make_exporter

    spans = _encoded_spans(300)
    whole = len(otlp_mod.encode_request(spans))
    monkeypatch.setattr(otlp_mod, "MAX_REQUEST_BYTES", whole // 5)
    endpoint = otlp.http_endpoint if protocol == "http/protobuf" else "http://" + otlp.grpc_endpoint
    exporter = make_exporter(Config(exporter="otlp", otlp_protocol=protocol, otlp_endpoint=endpoint,
                                    export_timeout=5.0))
    pipeline = ExportPipeline(exporter, queue_size=len(spans), batch_size=len(spans), interval=60.0)
    before = (STATS.spans_exported, STATS.spans_dropped, STATS.export_failures)
    otlp.reset_counts()
    try:
        pipeline.put(list(spans))
        assert pipeline.flush(10.0)
    finally:
        pipeline.shutdown(5.0)
    got = otlp.wait_for_spans(len(spans))
    assert len(got) == len(spans) and len({s.span_id for s in got}) == len(spans)
    assert otlp.request_count() >= 5
    assert (STATS.spans_exported - before[0], STATS.spans_dropped - before[1],
            STATS.export_failures - before[2]) == (len(spans), 0, 0)


def test_a_split_batch_that_fails_counts_its_spans_dropped_once(otlp, monkeypatch):
    from pgotel_proxy.tracing import otlp as otlp_mod
    from pgotel_proxy.tracing.export import ExportPipeline, make_exporter

    spans = _encoded_spans(100)
    monkeypatch.setattr(otlp_mod, "MAX_REQUEST_BYTES", len(otlp_mod.encode_request(spans)) // 3)
    exporter = make_exporter(Config(exporter="otlp", otlp_protocol="http/protobuf",
                                    otlp_endpoint=otlp.http_endpoint, export_timeout=0.5))
    # The collector refuses every other request: the parts it took count as exported, the rest as dropped.
    real_begin = otlp._begin_request
    seen = []

    def every_other(transport):
        seen.append(transport)
        otlp.mode = "error" if len(seen) % 2 else "ok"
        return real_begin(transport)

    monkeypatch.setattr(otlp, "_begin_request", every_other)
    before = (STATS.spans_exported, STATS.spans_dropped, STATS.export_failures)
    pipeline = ExportPipeline(exporter, queue_size=len(spans), batch_size=len(spans), interval=60.0)
    try:
        pipeline.put(list(spans))
        assert pipeline.flush(30.0)
    finally:
        pipeline.shutdown(5.0)
    exported, dropped = STATS.spans_exported - before[0], STATS.spans_dropped - before[1]
    assert exported + dropped == len(spans) and exported > 0 and dropped > 0, (exported, dropped)
    assert STATS.export_failures - before[2] == 1  # one batch, partly delivered
    assert len(otlp.spans) == exported and otlp.request_count(mode="error") >= 2


def test_spans_given_as_their_fields_alone_encode_as_the_tuples_do():
    """A builder that feeds one exporter hands it bare fields (SpanBuilder.bare); the request is the same."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.status import Status, StatusCode

    from pgotel_proxy.tracing import otlp as otlp_mod
    from pgotel_proxy.tracing.spans import SCOPE
    from test_span_encoding import RESOURCE

    head = (RESOURCE, SCOPE)
    fields = [otlp_mod.encode_span("SELECT", 1, i, None, False, None, SpanKind.SERVER, 10, 20, {"i": i},
                                   Status(StatusCode.UNSET)) for i in range(1, 6)]
    tuples = [(*head, f) for f in fields]
    assert otlp_mod.encode_request(fields, head) == otlp_mod.encode_request(tuples)
    # a mixed list still groups by head
    other = (Resource.create({"service.name": "another"}), None)
    mixed = fields[:2] + [(*other, fields[2])] + fields[3:]
    assert otlp_mod.encode_request(mixed, head) == otlp_mod.encode_request(tuples[:2] + [(*other, fields[2])] + tuples[3:])
    with pytest.raises(TypeError):
        otlp_mod.encode_request(fields)  # whose spans they are is not known
