"""Helpers for asserting the trace trees the proxy exports.

This module owns the application side of the tests' traces: an
OpenTelemetry SDK tracer that creates CLIENT spans and exports them to the
same in-process receiver as the proxy, the sqlcommenter comment such an
application appends to its SQL, and small checks over the received spans
(:class:`otlp_receiver.Span`).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from otlp_receiver import OtlpReceiver, Span

__all__ = [
    "AppContext",
    "AppTracer",
    "comment",
    "random_traceparent",
    "server_spans",
    "children",
    "assert_statement",
    "held_phases",
    "assert_nested",
    "attribute_values",
]

PHASES = ("parse", "plan", "execute")


@dataclass(frozen=True)
class AppContext:
    """The ids of an application span, as hex, and its W3C traceparent."""

    trace_id: str
    span_id: str
    traceparent: str


class AppTracer:
    """An application's own tracer, exporting its CLIENT spans to ``receiver``."""

    def __init__(self, receiver: OtlpReceiver, service: str = "tracing-test-app") -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.http_traces_url)))
        self.tracer = self.provider.get_tracer("pgotel-tests")

    @contextmanager
    def span(self, name: str = "app.query", sampled: bool = True) -> Iterator[AppContext]:
        """A CLIENT span around the block; yields its context (the traceparent to put in SQL)."""
        span = self.tracer.start_span(name, kind=SpanKind.CLIENT)
        ctx = span.get_span_context()
        flags = "01" if sampled else "00"
        tp = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{flags}"
        try:
            yield AppContext(f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", tp)
        finally:
            span.end()

    def shutdown(self) -> None:
        self.provider.shutdown()


def random_traceparent(sampled: bool = True) -> AppContext:
    """A context that no span of ours owns (stands for an upstream caller's)."""
    trace_id = secrets.token_hex(16)
    span_id = secrets.token_hex(8)
    return AppContext(trace_id, span_id, f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}")


def comment(sql: str, ctx: AppContext, **tags: str) -> str:
    """``sql`` with a trailing sqlcommenter comment, as opentelemetry's sqlcommenter writes it."""
    items = dict(tags, traceparent=ctx.traceparent)
    body = ",".join(f"{k}='{v}'" for k, v in sorted(items.items()))
    return f"{sql} /*{body}*/"


def collect(proxy, otlp, pred, timeout: float = 10.0):
    """Flush the proxy, then wait until the received spans satisfy ``pred``."""
    proxy.flush()
    return otlp.wait_for(pred, timeout)


def server_spans(spans: list[Span], trace_id: str | None = None) -> list[Span]:
    """SERVER spans (one per statement), optionally of one trace, by start time."""
    return sorted(
        (s for s in spans if s.kind == "SERVER" and (trace_id is None or s.trace_id == trace_id)),
        key=lambda s: s.start_ns,
    )


def held_phases(span: Span) -> list[str]:
    """The phases a phase span holds: ``parse+plan+execute`` holds three, ``plan`` one."""
    return span.name.split("+")


def children(spans: list[Span], parent: Span) -> list[Span]:
    return sorted(
        (s for s in spans if s.trace_id == parent.trace_id and s.parent_span_id == parent.span_id),
        key=lambda s: (s.start_ns, PHASES.index(held_phases(s)[0]) if held_phases(s)[0] in PHASES else 9),
    )


def assert_nested(parent: Span, child: Span) -> None:
    assert parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns, (
        f"{child.name} [{child.start_ns}, {child.end_ns}] is outside "
        f"{parent.name} [{parent.start_ns}, {parent.end_ns}]"
    )


def assert_statement(spans: list[Span], span: Span, *, name: str, phases: tuple[str, ...], parent: str | None) -> list[Span]:
    """One statement's subtree: its name, kind, parent, and exactly ``phases`` as INTERNAL children.

    A child holding several phases (their boundary was not observed) is named by
    them joined with "+" and lists them in ``pgotel.phases``; children follow
    one another without overlapping, in wire order.
    """
    assert span.name == name, span.describe()
    assert span.kind == "SERVER"
    assert span.parent_span_id == parent
    assert span.scope == "pgotel_proxy"
    kids = children(spans, span)
    assert [k.name for k in kids] == list(phases), [k.describe() for k in kids]
    held = []
    for k in kids:
        assert k.kind == "INTERNAL"
        assert isinstance(k.attributes.get("pgotel.timing.exact"), bool)
        assert_nested(span, k)
        if len(held_phases(k)) > 1:
            assert k.attributes["pgotel.phases"] == held_phases(k), k.describe()
        else:
            assert "pgotel.phases" not in k.attributes, k.describe()
        held += held_phases(k)
    assert held == [p for p in PHASES if p in held], [k.describe() for k in kids]
    for a, b in zip(kids, kids[1:]):
        assert a.end_ns <= b.start_ns, [k.describe() for k in kids]
    return kids


def attribute_values(spans: list[Span]) -> list[str]:
    """Every exported string that could carry data: attribute values, status messages, event attributes."""
    out: list[str] = []
    for s in spans:
        out.extend(str(v) for v in s.attributes.values())
        out.append(s.status_message)
        for e in s.events:
            out.extend(str(v) for v in e.attributes.values())
    return out
