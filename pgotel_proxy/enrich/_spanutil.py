"""Small helpers to make and amend ReadableSpans (they are immutable once built)."""

from __future__ import annotations

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

from .. import __version__
from ..tracing.sampling import rand  # seeded afresh in each forked worker

SCOPE = InstrumentationScope("pgotel_proxy", __version__)


def _new_span_id() -> int:
    while True:
        v = rand.getrandbits(64)
        if v:
            return v


def child_context(parent: SpanContext) -> SpanContext:
    """A fresh span context in the parent's trace."""
    return SpanContext(parent.trace_id, _new_span_id(), is_remote=False, trace_flags=parent.trace_flags, trace_state=parent.trace_state)


def make_span(name, ctx, parent, kind, start, end, attrs, resource, status=None) -> ReadableSpan:
    kw = {}
    if status is not None:
        kw["status"] = status
    return ReadableSpan(
        name=name, context=ctx, parent=parent, resource=resource, attributes=attrs, kind=kind,
        start_time=start, end_time=max(start, end), instrumentation_scope=SCOPE, **kw,
    )


def amend(span: ReadableSpan, *, attributes: dict | None = None, events: list[Event] | None = None,
          start: int | None = None, end: int | None = None, name: str | None = None,
          drop: tuple[str, ...] = (), links: list | None = None) -> ReadableSpan:
    """A copy of ``span`` with attributes added or dropped, events or links appended, times moved or a new name."""
    attrs = dict(span.attributes or {})
    if attributes:
        attrs.update(attributes)
    for key in drop:
        attrs.pop(key, None)
    evs = list(span.events or ())
    if events:
        evs.extend(events)
        evs.sort(key=lambda e: e.timestamp or 0)
    s = span.start_time if start is None else start
    e = span.end_time if end is None else end
    return ReadableSpan(
        name=span.name if name is None else name, context=span.context, parent=span.parent, resource=span.resource,
        attributes=attrs, events=evs, links=tuple(span.links or ()) + tuple(links or ()), kind=span.kind, status=span.status,
        start_time=s, end_time=max(s, e), instrumentation_scope=span.instrumentation_scope,
    )
