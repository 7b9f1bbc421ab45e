"""Tests for the in-process OTLP receiver, driven by the real OpenTelemetry SDK exporters.

Everything here goes over real sockets: spans are produced by the SDK, encoded
and sent by the stock OTLP HTTP/gRPC exporters, and decoded by the receiver.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

try:
    from tests.otlp_receiver import OtlpReceiver, Span
except ImportError:  # tests/ is not a package: pytest puts it on sys.path itself
    from otlp_receiver import OtlpReceiver, Span

SCOPE = "pgotel-proxy.tests.receiver"
SERVICE = "otlp-receiver-test"


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


def make_exporter(receiver: OtlpReceiver, transport: str, timeout: float = 5, gzip_it=False):
    if transport == "http":
        return HttpSpanExporter(
            endpoint=f"{receiver.http_endpoint}/v1/traces",
            timeout=timeout,
            compression=HttpCompression.Gzip if gzip_it else None,
        )
    return GrpcSpanExporter(
        endpoint=receiver.grpc_endpoint,
        insecure=True,
        timeout=timeout,
        compression=grpc.Compression.Gzip if gzip_it else None,
    )


def make_provider(exporter) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
    return provider


def emit_tree(provider: TracerProvider) -> dict:
    """A session -> query -> parse tree with typed attributes, events, a link and an error."""
    tracer = provider.get_tracer(SCOPE)
    with tracer.start_as_current_span("unrelated", kind=SpanKind.PRODUCER) as other:
        pass
    with tracer.start_as_current_span(
        "pg.session",
        kind=SpanKind.SERVER,
        attributes={
            "db.system": "postgresql",
            "net.peer.port": 54321,
            "ratio": 0.25,
            "tls": True,
            "params": ["a", "b"],
            "sizes": [1, 2, 3],
        },
    ) as root:
        with tracer.start_as_current_span(
            "SELECT",
            kind=SpanKind.CLIENT,
            links=[Link(other.get_span_context(), {"why": "caused-by"})],
        ) as query:
            query.set_attribute("db.statement", "SELECT 1")
            query.add_event("rows", {"count": 7, "last": False})
            with tracer.start_as_current_span("parse") as parse:
                parse.set_attribute("parser", "pglast")
            query.set_status(Status(StatusCode.ERROR, "relation does not exist"))
    return {
        "trace_id": format(root.get_span_context().trace_id, "032x"),
        "root": format(root.get_span_context().span_id, "016x"),
        "query": format(query.get_span_context().span_id, "016x"),
        "parse": format(parse.get_span_context().span_id, "016x"),
        "other_trace": format(other.get_span_context().trace_id, "032x"),
        "other": format(other.get_span_context().span_id, "016x"),
    }


def finished_spans(n: int = 1, name: str = "probe"):
    """ReadableSpans to feed straight to an exporter's export()."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer(SCOPE)
    for i in range(n):
        with tracer.start_as_current_span(f"{name}-{i}"):
            pass
    return memory.get_finished_spans()


def timed_export(exporter, spans):
    t0 = time.monotonic()
    result = exporter.export(spans)
    return result, time.monotonic() - t0


# ---------------------------------------------------------------------------
# decoding whole trees


@pytest.mark.parametrize(
    "transport,gzip_it",
    [("http", False), ("http", True), ("grpc", False), ("grpc", True)],
)
def test_tree_round_trips_through_real_exporter(receiver, transport, gzip_it):
    provider = make_provider(make_exporter(receiver, transport, gzip_it=gzip_it))
    try:
        ids = emit_tree(provider)
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()

    receiver.wait_for_spans(4, timeout=10)
    assert receiver.request_count(mode="ok", transport=transport) >= 1
    assert receiver.request_count(transport="grpc" if transport == "http" else "http") == 0

    tree = receiver.trace(ids["trace_id"])
    assert [s.name for s in tree] == ["pg.session", "SELECT", "parse"], receiver.tree(ids["trace_id"])

    root = receiver.one("pg.session")
    assert root.span_id == ids["root"]
    assert root.parent_span_id is None and root.is_root
    assert root.kind == "SERVER"
    assert root.attributes == {
        "db.system": "postgresql",
        "net.peer.port": 54321,
        "ratio": 0.25,
        "tls": True,
        "params": ["a", "b"],
        "sizes": [1, 2, 3],
    }
    assert type(root.attributes["net.peer.port"]) is int
    assert type(root.attributes["ratio"]) is float
    assert type(root.attributes["tls"]) is bool
    assert root.status_code == "UNSET"
    assert root.resource["service.name"] == SERVICE
    assert root.scope == SCOPE
    assert root.end_ns >= root.start_ns > 0
    assert root.duration_ms >= 0

    query = receiver.one("SELECT")
    assert query.span_id == ids["query"]
    assert query.parent_span_id == ids["root"]
    assert query.kind == "CLIENT"
    assert query.attributes == {"db.statement": "SELECT 1"}
    assert query.status_code == "ERROR"
    assert query.status_message == "relation does not exist"
    assert [(e.name, e.attributes) for e in query.events] == [("rows", {"count": 7, "last": False})]
    assert query.start_ns <= query.events[0].time_ns <= query.end_ns
    assert len(query.links) == 1
    link = query.links[0]
    assert (link.trace_id, link.span_id) == (ids["other_trace"], ids["other"])
    assert link.attributes == {"why": "caused-by"}

    parse = receiver.one("parse")
    assert parse.parent_span_id == ids["query"]
    assert parse.kind == "INTERNAL"
    assert receiver.children(root) == [query]
    assert receiver.children(query) == [parse]
    assert receiver.children(parse) == []

    other = receiver.one("unrelated")
    assert other.kind == "PRODUCER"
    assert other.trace_id == ids["other_trace"] != ids["trace_id"]


def test_base_endpoint_env_var_gets_v1_traces_appended(receiver, monkeypatch):
    # The proxy is configured with OTEL_EXPORTER_OTLP_ENDPOINT; http_endpoint must fit it.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.http_endpoint)
    for var in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        monkeypatch.delenv(var, raising=False)
    exporter = HttpSpanExporter(timeout=5)
    try:
        assert exporter.export(finished_spans(2)) == SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    assert sorted(s.name for s in receiver.spans) == ["probe-0", "probe-1"]


def test_tree_rendering_and_wait_for_failure_message(receiver):
    provider = make_provider(make_exporter(receiver, "http"))
    try:
        ids = emit_tree(provider)
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()
    receiver.wait_for_spans(4)

    lines = receiver.tree(ids["trace_id"]).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("  pg.session [SERVER]")
    assert lines[1].startswith("    SELECT [CLIENT]") and "ERROR(relation does not exist)" in lines[1]
    assert lines[2].startswith("      parse [INTERNAL]") and "parser='pglast'" in lines[2]
    assert "net.peer.port=54321" in lines[0] and "..." in lines[0]  # 6 attrs, 4 shown

    t0 = time.monotonic()
    with pytest.raises(AssertionError) as info:
        receiver.wait_for(lambda spans: any(s.name == "never" for s in spans), timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2
    message = str(info.value)
    assert "received 4 span(s)" in message
    assert "pg.session [SERVER]" in message and "unrelated [PRODUCER]" in message

    with pytest.raises(AssertionError, match="expected exactly one span 'nope'"):
        receiver.one("nope")

    receiver.clear()
    assert receiver.spans == []
    assert receiver.request_count() >= 1  # counters survive clear()


def test_wait_for_returns_as_soon_as_spans_arrive(receiver):
    exporter = make_exporter(receiver, "grpc")
    spans = finished_spans(3)
    found: list[list[Span]] = []
    waiter = threading.Thread(target=lambda: found.append(receiver.wait_for_spans(3, timeout=10)))
    waiter.start()
    try:
        time.sleep(0.1)
        assert exporter.export(spans) == SpanExportResult.SUCCESS
    finally:
        waiter.join(10)
        exporter.shutdown()
    assert len(found) == 1 and len(found[0]) == 3


async def test_usable_from_async_tests(receiver):
    # The receiver owns its threads, so a running event loop neither helps nor hinders it.
    provider = make_provider(make_exporter(receiver, "http"))
    try:
        tracer = provider.get_tracer(SCOPE)
        with tracer.start_as_current_span("async-parent"):
            await asyncio.sleep(0)
            with tracer.start_as_current_span("async-child"):
                await asyncio.sleep(0.01)
        spans = await asyncio.to_thread(receiver.wait_for_spans, 2, 10)
    finally:
        provider.shutdown()
    parent = next(s for s in spans if s.name == "async-parent")
    assert [c.name for c in receiver.children(parent)] == ["async-child"]


# ---------------------------------------------------------------------------
# sick collector modes


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_error_mode_fails_export_quickly_then_recovers(receiver, transport):
    exporter = make_exporter(receiver, transport, timeout=1)
    try:
        receiver.mode = "error"
        result, elapsed = timed_export(exporter, finished_spans(1, "lost"))
        assert result == SpanExportResult.FAILURE
        assert elapsed < 3, f"error mode should fail fast, took {elapsed:.2f}s"
        assert receiver.request_count(mode="error", transport=transport) >= 1
        assert receiver.spans == []

        receiver.mode = "ok"
        result, _ = timed_export(exporter, finished_spans(1, "kept"))
        assert result == SpanExportResult.SUCCESS
        assert [s.name for s in receiver.spans] == ["kept-0"]
    finally:
        exporter.shutdown()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_blackhole_mode_times_out_then_ok_works_again(receiver, transport):
    exporter = make_exporter(receiver, transport, timeout=1)
    try:
        receiver.mode = "blackhole"
        result, elapsed = timed_export(exporter, finished_spans(1, "swallowed"))
        assert result == SpanExportResult.FAILURE
        # It failed by running out of time, not by being refused.
        assert 0.8 <= elapsed < 4, f"blackhole export took {elapsed:.2f}s"
        assert receiver.request_counts["blackhole"] >= 1

        receiver.mode = "ok"
        result, _ = timed_export(exporter, finished_spans(1, "after"))
        assert result == SpanExportResult.SUCCESS
        assert [s.name for s in receiver.wait_for_spans(1)] == ["after-0"]
    finally:
        exporter.shutdown()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_slow_mode_delays_the_answer(receiver, transport):
    receiver.mode = "slow"
    receiver.delay = 0.4
    exporter = make_exporter(receiver, transport, timeout=5)
    try:
        result, elapsed = timed_export(exporter, finished_spans(1, "late"))
        assert result == SpanExportResult.SUCCESS
        assert elapsed >= 0.4
        assert [s.name for s in receiver.spans] == ["late-0"]
        assert receiver.request_count(mode="slow", transport=transport) == 1
    finally:
        exporter.shutdown()

    receiver.delay = 3
    impatient = make_exporter(receiver, transport, timeout=0.5)
    try:
        result, elapsed = timed_export(impatient, finished_spans(1, "too-late"))
        assert result == SpanExportResult.FAILURE
        assert elapsed < 2.5
    finally:
        impatient.shutdown()


def test_invalid_mode_is_rejected():
    r = OtlpReceiver()
    with pytest.raises(ValueError):
        r.mode = "flaky"
    with pytest.raises(ValueError):
        OtlpReceiver(mode="down")


# ---------------------------------------------------------------------------
# raw HTTP protocol details


def _post(url: str, body: bytes, headers: dict[str, str]):
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type"), err.read()


def _request_bytes(name: str) -> bytes:
    request = trace_service_pb2.ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id = bytes(range(1, 17))
    span.span_id = bytes(range(1, 9))
    span.name = name
    span.start_time_unix_nano = 1_000_000
    span.end_time_unix_nano = 3_500_000
    return request.SerializeToString()


def test_raw_http_gzip_and_error_answers(receiver):
    url = receiver.http_endpoint + "/v1/traces"
    status, ctype, body = _post(
        url,
        gzip.compress(_request_bytes("hand-made")),
        {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
    )
    assert status == 200 and ctype == "application/x-protobuf"
    trace_service_pb2.ExportTraceServiceResponse().ParseFromString(body)
    span = receiver.one("hand-made")
    assert span.trace_id == "0102030405060708090a0b0c0d0e0f10"
    assert span.span_id == "0102030405060708"
    assert span.kind == "UNSPECIFIED" and span.duration_ms == 2.5

    assert _post(url, b"\xff\xff\xff", {"Content-Type": "application/x-protobuf"})[0] == 400
    assert _post(url, b"{}", {"Content-Type": "application/json"})[0] == 415
    assert _post(receiver.http_endpoint + "/v1/logs", b"", {})[0] == 404
    receiver.mode = "error"
    assert _post(url, _request_bytes("x"), {"Content-Type": "application/x-protobuf"})[0] == 503
    assert len(receiver.spans) == 1


def test_raw_http_chunked_body(receiver):
    """A body sent in chunks, without Content-Length, as OpenTelemetry JS's exporter sends it."""
    import http.client

    body = _request_bytes("in-chunks")
    conn = http.client.HTTPConnection("127.0.0.1", receiver.http_port, timeout=5)
    try:
        conn.request("POST", "/v1/traces", body=iter([body[:7], body[7:]]),
                     headers={"Content-Type": "application/x-protobuf"}, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 200, response.read()
    finally:
        conn.close()
    assert receiver.one("in-chunks").span_id == "0102030405060708"


# ---------------------------------------------------------------------------
# lifecycle


def _receiver_threads() -> list[str]:
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("otlp-receiver") or "process_request_thread" in t.name
    ]


def _can_bind(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_stop_releases_held_requests_ports_and_threads():
    receiver = OtlpReceiver(mode="blackhole").start()
    http_port, grpc_port = receiver.http_port, receiver.grpc_port
    assert not _can_bind(http_port) and not _can_bind(grpc_port)

    # Leave one HTTP request parked in the blackhole so stop() has to free it.
    exporter = make_exporter(receiver, "http", timeout=0.5)
    try:
        assert exporter.export(finished_spans()) == SpanExportResult.FAILURE
    finally:
        exporter.shutdown()
    assert any("process_request_thread" in name for name in _receiver_threads())

    # And one gRPC call whose caller is still waiting: stop() must end it.
    outcome: list[BaseException] = []

    def patient_call():
        with grpc.insecure_channel(receiver.grpc_endpoint) as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            try:
                stub.Export(trace_service_pb2.ExportTraceServiceRequest(), timeout=30)
            except grpc.RpcError as err:
                outcome.append(err)

    caller = threading.Thread(target=patient_call)
    caller.start()
    deadline = time.monotonic() + 5
    while receiver.request_count(transport="grpc") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert receiver.request_count(mode="blackhole", transport="grpc") == 1
    assert caller.is_alive()

    t0 = time.monotonic()
    receiver.stop()
    assert time.monotonic() - t0 < 3
    caller.join(5)
    assert not caller.is_alive()
    assert len(outcome) == 1 and outcome[0].code() != grpc.StatusCode.OK
    assert _receiver_threads() == []
    assert _can_bind(http_port) and _can_bind(grpc_port)
    receiver.stop()  # idempotent


def test_receivers_are_independent_and_start_fast():
    t0 = time.monotonic()
    with OtlpReceiver() as a, OtlpReceiver() as b:
        assert time.monotonic() - t0 < 2
        assert len({a.http_port, a.grpc_port, b.http_port, b.grpc_port}) == 4
        exporter = make_exporter(b, "grpc")
        try:
            assert exporter.export(finished_spans(1, "for-b")) == SpanExportResult.SUCCESS
        finally:
            exporter.shutdown()
        assert [s.name for s in b.spans] == ["for-b-0"]
        assert a.spans == [] and a.request_count() == 0
    assert not a.running and not b.running
