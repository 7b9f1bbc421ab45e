"""The fast OTLP encoder (pgotel_proxy.tracing.otlp) against the SDK's own encoder, and its exporters on the wire.

Equivalence is checked on parsed messages: the same ReadableSpans encoded by
opentelemetry-exporter-otlp's ``encode_spans`` and by ours must give equal
``ExportTraceServiceRequest`` messages (field order on the wire may differ;
meaning may not). Exports go to the in-process receiver over real HTTP and
gRPC sockets, and through the proxy in front of the real PostgreSQL.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from pgotel_proxy.tracing import otlp as fast
from pgotel_proxy.tracing.export import make_exporter
from pgotel_proxy.tracing.spans import SCOPE


def ours(spans) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(fast.encode_request(spans))


def assert_same(spans) -> None:
    expected = sdk_encode_spans(spans)
    got = ours(spans)
    assert got == expected, f"ours:\n{got}\nSDK:\n{expected}"
    # A second encoding goes through the caches and must not differ.
    assert ours(spans) == expected
    assert fast.encode_spans(spans) == expected


def ctx(trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331, *, remote=False, sampled=True, state=None):
    return SpanContext(
        trace_id,
        span_id,
        is_remote=remote,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0),
        trace_state=TraceState(state) if state else None,
    )


RESOURCE = Resource.create({"service.name": "pgotel-test", "deployment.environment": "ci"})
EVERY_TYPE = {
    "str": "SELECT 1",
    "empty_str": "",
    "unicode": "naïve ☃ 表",
    "long": "SELECT " + "x, " * 2000 + "1",
    "bool_true": True,
    "bool_false": False,
    "int": 42,
    "zero": 0,
    "negative": -7,
    "int64_max": 2**63 - 1,
    "int64_min": -(2**63),
    "float": 1.5,
    "neg_zero": -0.0,
    "pos_zero": 0.0,
    "inf": math.inf,
    "bytes": b"\x00\xffpg",
    "str_list": ["a", "b", ""],
    "int_tuple": (1, 2, 3),
    "bool_list": [True, False],
    "float_list": [0.25, -1.0],
    "empty_list": [],
    "mapping": {"k": "v", "n": 1},
}


def test_every_field_and_attribute_type_equals_the_sdk_encoding():
    parent = ctx(span_id=0x1111111111111111, remote=True, state=[("vendor", "x:1"), ("pg", "y")])
    spans = [
        ReadableSpan(
            name="SELECT t",
            context=ctx(state=[("vendor", "x:1"), ("pg", "y")]),
            parent=parent,
            resource=RESOURCE,
            attributes=dict(EVERY_TYPE),
            events=(
                Event("notice", {"level": "WARNING", "n": 3}, timestamp=1_700_000_000_000_000_500),
                Event("bare", None, timestamp=1_700_000_000_000_000_600),
            ),
            links=(
                Link(ctx(trace_id=7, span_id=8, remote=True), {"pgotel.link": "transaction"}),
                Link(ctx(trace_id=9, span_id=10, sampled=False)),
            ),
            kind=SpanKind.SERVER,
            status=Status(StatusCode.ERROR, 'relation "t" does not exist'),
            start_time=1_700_000_000_000_000_000,
            end_time=1_700_000_000_000_900_000,
            instrumentation_scope=SCOPE,
        ),
        # local parent, unsampled flags, OK status with no description, no attributes
        ReadableSpan(
            name="parse",
            context=ctx(span_id=0x2222, sampled=False),
            parent=ctx(span_id=0x3333),
            resource=RESOURCE,
            kind=SpanKind.INTERNAL,
            status=Status(StatusCode.OK),
            start_time=1,
            end_time=2,
            instrumentation_scope=SCOPE,
        ),
    ]
    # a root of every other kind, the default (UNSET) status, attributes None
    for i, kind in enumerate((SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER)):
        spans.append(
            ReadableSpan(name=f"root{i}", context=ctx(span_id=0x100 + i), resource=RESOURCE, kind=kind,
                         start_time=10, end_time=20, instrumentation_scope=SCOPE)
        )
    assert_same(spans)


def test_grouping_by_resource_and_scope_as_the_sdk_groups():
    """Equal resources/scopes that are distinct objects share a group; unequal ones do not; order is first seen."""
    r1 = Resource.create({"service.name": "a"})
    r1_twin = Resource.create({"service.name": "a"})
    r2 = Resource({"service.name": "b"}, schema_url="https://opentelemetry.io/schemas/1.21.0")
    s1 = InstrumentationScope("lib", "1.0", "https://example.test/schema", {"scope.attr": True})
    s1_twin = InstrumentationScope("lib", "1.0", "https://example.test/schema", {"scope.attr": True})
    s2 = InstrumentationScope("other")
    plan = [(r2, s2), (r1, s1), (r1_twin, s1_twin), (r1, None), (r2, s2), (r1_twin, s2), (r1, s1)]
    spans = [
        ReadableSpan(name=f"s{i}", context=ctx(span_id=i + 1), resource=r, instrumentation_scope=s, start_time=i, end_time=i + 1)
        for i, (r, s) in enumerate(plan)
    ]
    assert_same(spans)
    request = ours(spans)
    assert [len(rs.scope_spans) for rs in request.resource_spans] == [1, 3]


def test_sdk_spans_with_limits_report_dropped_counts_as_the_sdk_does():
    """Live SDK spans (bounded attributes, events, links) with limits that drop some of each."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=RESOURCE,
        span_limits=SpanLimits(max_span_attributes=2, max_events=1, max_links=1, max_event_attributes=1,
                               max_link_attributes=1, max_attribute_length=4),
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("limits-test", "0.1")
    link_ctx = ctx(trace_id=5, span_id=6, remote=True)
    with tracer.start_as_current_span("outer", links=[Link(link_ctx, {"a": 1, "b": 2}), Link(link_ctx)]) as span:
        span.set_attributes({"x": "truncated value", "y": 2, "z": 3})
        span.add_event("e1", {"a": 1, "b": 2})
        span.add_event("e2")
        with tracer.start_as_current_span("inner", kind=SpanKind.CLIENT):
            pass
    spans = exporter.get_finished_spans()
    assert spans[1].dropped_attributes == 1 and spans[1].dropped_events == 1 and spans[1].dropped_links == 1
    assert_same(spans)
    assert ours(spans).resource_spans[0].scope_spans[0].spans[1].dropped_links_count == 1


def test_cached_attributes_keep_types_and_signs_apart():
    """1, True and 1.0 are equal dict keys, as are 0.0 and -0.0: the caches must not mix them up."""
    values = [1, True, 1.0, 0, False, 0.0, -0.0, "1", 1, True, -0.0, 0.0]
    spans = [
        ReadableSpan(name="v", context=ctx(span_id=i + 1), resource=RESOURCE, attributes={"v": v},
                     start_time=1, end_time=2, instrumentation_scope=SCOPE)
        for i, v in enumerate(values)
    ]
    assert_same(spans)
    got = [s.attributes[0].value for s in ours(spans).resource_spans[0].scope_spans[0].spans]
    assert [v.WhichOneof("value") for v in got] == [
        "int_value", "bool_value", "double_value", "int_value", "bool_value", "double_value", "double_value",
        "string_value", "int_value", "bool_value", "double_value", "double_value",
    ]
    assert math.copysign(1.0, got[6].double_value) == -1.0 and math.copysign(1.0, got[5].double_value) == 1.0


def test_an_unencodable_attribute_is_skipped_like_the_sdk_skips_it():
    span = ReadableSpan(name="big", context=ctx(), resource=RESOURCE, attributes={"ok": 1, "huge": 2**70, "after": "x"},
                        start_time=1, end_time=2, instrumentation_scope=SCOPE)
    assert_same([span])
    assert [kv.key for kv in ours([span]).resource_spans[0].scope_spans[0].spans[0].attributes] == ["ok", "after"]


def _as_sdk_spans(ops: list) -> list:
    """The ReadableSpans the span helper builds, for an SDK exporter, from the operations the relay handed over."""
    from pgotel_proxy.config import Config
    from pgotel_proxy.protocol.records import unpack as unpack_records
    from pgotel_proxy.tracing.helper import SpanHelper
    from pgotel_proxy.tracing.process import OP_CONNECTION_OPENED, OP_STATEMENTS_PACKED, _ChildInfo
    from pgotel_proxy.tracing.spans import ConnState

    kept = InMemorySpanExporter()
    helper = SpanHelper(Config(exporter="otlp"), exporter=kept)
    assert not helper.builder.encode  # an SDK exporter: span objects
    conns, spans = {}, []
    for op in ops:
        if op[0] == OP_CONNECTION_OPENED:
            conns[op[1]] = ConnState(_ChildInfo(op[3], op[4]), op[2])
        elif op[0] == OP_STATEMENTS_PACKED:
            app, records = op[3], unpack_records(op[4])
            if app is not None:
                conns[op[1]].info.session.server_params["application_name"] = app
            helper.build(conns[op[1]], records, spans, op[-1] is True)
    helper.export(spans)
    helper.shutdown()
    return list(kept.get_finished_spans())


def test_the_proxys_own_spans_encode_as_the_sdk_encodes_them(make_proxy, otlp):
    """Spans the builder made from real statements (extended, simple, errors, tracestate) through both encoders.

    The span process builds them; here the same builder builds them, as span objects,
    from the records the relay handed over.
    """
    import psycopg

    proxy = make_proxy()
    handed: list = []
    send = proxy.tracer._send

    def keep_and_send(*args, **kwargs):
        handed.extend(proxy.tracer._ops)
        send(*args, **kwargs)

    proxy.tracer._send = keep_and_send
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"SELECT %s::int /*traceparent='{tp}',tracestate='rojo%%3D00f067aa0ba902b7'*/", (1,))
        conn.execute("SELECT 1; SELECT 2", prepare=False)
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table_here")
        for _ in range(3):
            conn.execute("SELECT %s::text", ("x",), prepare=True)
    proxy.flush()
    captured = _as_sdk_spans(handed)
    assert len(captured) >= 10
    assert any(s.context.trace_state for s in captured)
    assert_same(captured)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=12),
        st.one_of(
            st.text(max_size=20),
            st.booleans(),
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.floats(allow_nan=False),
            st.binary(max_size=8),
            st.lists(st.text(max_size=5), max_size=3),
            st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3),
        ),
        max_size=8,
    ),
    st.text(max_size=30),
    st.integers(min_value=1, max_value=2**64 - 1),
)
def test_any_attributes_name_and_id_encode_as_the_sdk_encodes_them(attributes, name, span_id):
    span = ReadableSpan(name=name, context=ctx(span_id=span_id), parent=ctx(span_id=3, remote=True), resource=RESOURCE,
                        attributes=attributes, start_time=5, end_time=2**64 - 1, instrumentation_scope=SCOPE)
    assert_same([span, span])


# ------------------------------------------------------------- on the wire


def _spans_for_wire() -> list[ReadableSpan]:
    root = ctx(span_id=0xAAAA)
    return [
        ReadableSpan(name="SELECT wire", context=root, parent=ctx(span_id=0xBBBB, remote=True), resource=RESOURCE,
                     attributes={"db.system.name": "postgresql", "db.response.returned_rows": 3, "flag": True, "list": ["a", "b"]},
                     kind=SpanKind.SERVER, status=Status(StatusCode.ERROR, "boom"), start_time=1_000, end_time=5_000,
                     instrumentation_scope=SCOPE),
        ReadableSpan(name="execute", context=ctx(span_id=0xCCCC), parent=root, resource=RESOURCE,
                     attributes={"pgotel.timing.exact": False}, kind=SpanKind.INTERNAL, start_time=2_000, end_time=4_000,
                     instrumentation_scope=SCOPE),
    ]


def _check_received(otlp) -> None:
    spans = otlp.wait_for(lambda got: len(got) >= 2)
    by_name = {s.name: s for s in spans}
    top, child = by_name["SELECT wire"], by_name["execute"]
    assert top.kind == "SERVER" and top.status_code == "ERROR" and top.status_message == "boom"
    assert top.attributes == {"db.system.name": "postgresql", "db.response.returned_rows": 3, "flag": True, "list": ["a", "b"]}
    assert top.parent_span_id == f"{0xBBBB:016x}" and child.parent_span_id == f"{0xAAAA:016x}"
    assert child.attributes == {"pgotel.timing.exact": False}
    assert top.resource["service.name"] == "pgotel-test"


def test_http_exporter_sends_through_the_fast_path(otlp, monkeypatch):
    calls = []
    encode = fast.encode_request
    monkeypatch.setattr(fast, "encode_request", lambda spans, *head: calls.append(len(spans)) or encode(spans, *head))
    exporter = fast.HttpSpanExporter(endpoint=otlp.http_traces_url, timeout=5)
    assert exporter._fast, "the installed opentelemetry-exporter-otlp-proto-http no longer has the hook the fast path uses"
    assert exporter.export(_spans_for_wire()) is SpanExportResult.SUCCESS
    assert calls == [2]
    _check_received(otlp)
    exporter.shutdown()


def test_http_exporter_falls_back_to_the_parent_export(otlp, monkeypatch):
    """Without the client hook (another library version), the library's own export runs."""
    monkeypatch.setattr(fast, "encode_request", lambda *args: pytest.fail("fast path used"))
    exporter = fast.HttpSpanExporter(endpoint=otlp.http_traces_url, timeout=5)
    exporter._fast = False
    assert exporter.export(_spans_for_wire()) is SpanExportResult.SUCCESS
    _check_received(otlp)
    exporter.shutdown()


def test_http_exporter_keeps_the_librarys_env_handling(otlp, monkeypatch):
    """Endpoint and compression from the standard variables, failure reported when the collector rejects."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp.http_traces_url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    exporter = fast.HttpSpanExporter(timeout=5)
    assert exporter.export(_spans_for_wire()) is SpanExportResult.SUCCESS
    _check_received(otlp)
    otlp.mode = "error"
    assert exporter.export(_spans_for_wire()) is SpanExportResult.FAILURE
    exporter.shutdown()
    assert exporter.export(_spans_for_wire()) is SpanExportResult.FAILURE  # after shutdown, as the library


def test_http_exporter_reads_proxy_and_ca_variables_as_requests_does_but_once(otlp, monkeypatch):
    """The exporter's session merges the environment as requests does, then keeps the result."""
    import requests
    import requests.sessions

    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem")
    for url in ("http://collector:4318/v1/traces", "https://collector:4318/v1/traces"):
        for verify in (None, True, False):
            args = (url, {}, None, verify, None)
            assert fast.EnvOnceSession().merge_environment_settings(*args) == \
                requests.Session().merge_environment_settings(*args)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")

    # Through a proxy that is not there, the export fails: the variables are honoured ...
    exporter = fast.HttpSpanExporter(endpoint=otlp.http_traces_url, timeout=1)
    assert exporter.export(_spans_for_wire()) is SpanExportResult.FAILURE
    exporter.shutdown()
    # ... and NO_PROXY too; the environment is read once, not for every request.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    lookups = []
    real = requests.sessions.get_environ_proxies
    monkeypatch.setattr(requests.sessions, "get_environ_proxies", lambda *a, **k: lookups.append(a) or real(*a, **k))
    exporter = fast.HttpSpanExporter(endpoint=otlp.http_traces_url, timeout=5)
    for _ in range(3):
        assert exporter.export(_spans_for_wire()) is SpanExportResult.SUCCESS
    assert len(lookups) == 1
    exporter.shutdown()


def test_grpc_exporter_sends_our_encoding(otlp):
    exporter = fast.GrpcSpanExporter(endpoint=otlp.grpc_endpoint, insecure=True, timeout=5)
    request = exporter._translate_data(_spans_for_wire())
    assert request == sdk_encode_spans(_spans_for_wire())
    assert exporter.export(_spans_for_wire()) is SpanExportResult.SUCCESS
    _check_received(otlp)
    exporter.shutdown()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_proxy_exports_statements_over_both_protocols(make_proxy, otlp, protocol):
    import psycopg

    endpoint = otlp.http_endpoint if protocol == "http/protobuf" else "http://" + otlp.grpc_endpoint
    proxy = make_proxy(otlp_protocol=protocol, otlp_endpoint=endpoint)
    # (the span process builds its exporter with make_exporter: test_make_exporter_builds_the_fast_exporters)
    with psycopg.connect(proxy.dsn(application_name="enc"), autocommit=True) as conn:
        conn.execute("SELECT %s::int AS answer", (42,))
    proxy.flush()
    spans = otlp.wait_for(lambda got: any(s.name == "SELECT" for s in got) and len(got) >= 2)
    top = next(s for s in spans if s.name == "SELECT")
    assert top.attributes["db.system.name"] == "postgresql"
    assert top.attributes["db.postgresql.application_name"] == "enc"
    assert {s.name for s in spans if s.parent_span_id == top.span_id} == {"parse+plan+execute"}


def test_make_exporter_builds_the_fast_exporters():
    from pgotel_proxy.config import Config

    config = Config(exporter="otlp", otlp_protocol="grpc", otlp_endpoint="http://127.0.0.1:4317")
    assert type(make_exporter(config)) is fast.GrpcSpanExporter
    config = config.model_copy(update={"otlp_protocol": "http/protobuf"})
    assert type(make_exporter(config)) is fast.HttpSpanExporter

