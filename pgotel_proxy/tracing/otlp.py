"""The fast OTLP encoding path: ReadableSpans → ``ExportTraceServiceRequest`` and the exporters that use it.

opentelemetry-exporter-otlp's encoder costs tens of µs per span in pure
Python (a message object built per attribute, per value and per span, a generic
``isinstance`` ladder per value, ``Resource`` hashed through ``json.dumps``
once per span to group spans). The proxy's spans share one resource and one
scope, and their attributes repeat (the connection's base attributes,
statement texts, command tags), so :func:`encode_request` here:

* groups spans by the identity of their resource and scope (merging groups
  whose resources or scopes are equal but distinct objects, as the SDK's
  hashing does), so nothing is hashed per span;
* encodes each resource and scope once per object;
* encodes attributes, statuses and names with the generated classes and keeps
  the encoded bytes of recent ones, so a repeated attribute costs a dict
  look-up;
* writes a span's fixed scalar fields (ids, kind, times, flags) straight in
  the wire format and joins the pieces into the serialized request (protobuf
  fields may come in any order, and repeated fields append).

The output means exactly what the SDK encoder's output means (the tests
compare the parsed messages). :class:`HttpSpanExporter` and
:class:`GrpcSpanExporter` subclass the library's exporters, so endpoint,
headers, compression, TLS, timeouts, retries and the ``OTEL_EXPORTER_OTLP_*``
variables stay theirs; only the encoding step is ours.
"""

from __future__ import annotations

import logging
import os
import struct
from itertools import repeat
from operator import attrgetter, is_, itemgetter
from collections.abc import Mapping, Sequence
from typing import Any

import requests

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as _GrpcExporter
from opentelemetry.exporter.otlp.proto.http import trace_exporter as _http
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, SpanFlags, Status
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind, TraceState

from ..protocol._impl import PURE_PYTHON

__all__ = ["encode_request", "encode_spans", "HttpSpanExporter", "GrpcSpanExporter"]

log = logging.getLogger("pgotel_proxy.otlp")

_KIND = {
    SpanKind.INTERNAL: Span.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: Span.SPAN_KIND_SERVER,
    SpanKind.CLIENT: Span.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: Span.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: Span.SPAN_KIND_CONSUMER,
}
# Enum members are singletons; their Python-level __hash__ is slow enough to show.
_KIND_BY_ID = {id(k): v for k, v in _KIND.items()}
_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = _HAS_IS_REMOTE | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK

# Encoded ``attributes`` fields by (key, type, value), for the pairs that repeat.
# Bounded: cleared when full, so a stream of unique values (row counts,
# parameters) costs one dict insert each; fields over 2 KiB (long statement
# texts) are not kept, so the cache stays under about 16 MiB with its keys.
_KV_CACHE: dict[tuple, bytes] = {}
_KV_CACHE_MAX = 4096
_KV_FIELD_MAX = 2048
# Not floats: 0.0 and -0.0 are equal keys but different values.
_CACHEABLE = frozenset((str, bool, int))
_STATUS_CACHE: dict[tuple, bytes] = {}
_STATUS_BY_ID: dict[int, tuple[Any, bytes]] = {}  # (object, field), as the resource cache

# Encoded resource / scope headers by identity; the object is kept with its
# bytes so that its id cannot be reused by another object while cached.
_RESOURCE_CACHE: dict[int, tuple[Any, bytes]] = {}
_SCOPE_CACHE: dict[int, tuple[Any, bytes]] = {}
_OBJECT_CACHE_MAX = 64

# Field tags (field number << 3 | wire type 2) of the length-delimited fields
# assembled here: Span.attributes (9), Span.status (15),
# ScopeSpans.spans (2), ResourceSpans.scope_spans (2),
# ExportTraceServiceRequest.resource_spans (1).
_TAG_ATTRIBUTE = b"\x4a"
_TAG_STATUS = b"\x7a"
_TAG_SPAN = b"\x12"
_TAG_SCOPE_SPANS = b"\x12"
_TAG_RESOURCE_SPANS = b"\x0a"
# Span's scalar fields: trace_id (1), span_id (2), trace_state (3),
# parent_span_id (4), name (5) length-delimited; then kind (6) varint,
# start (7) and end (8) fixed64, flags (16) fixed32 (a two-byte tag).
_TAG_TRACE_ID = b"\x0a\x10"
_TAG_SPAN_ID = b"\x12\x08"
_TAG_TRACE_STATE = b"\x1a"
_TAG_PARENT_ID = b"\x22\x08"
_TAG_NAME = b"\x2a"
# (kind's values are all below 128: one varint byte)
_TAIL = struct.Struct("<BBBQBQBBI")
_NAME_CACHE: dict[str, bytes] = {}


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _value(value: Any) -> AnyValue:
    t = type(value)
    if t is str:
        return AnyValue(string_value=value)
    if t is bool:
        return AnyValue(bool_value=value)
    if t is int:
        return AnyValue(int_value=value)
    if t is float:
        return AnyValue(double_value=value)
    # Rarer types, in the SDK encoder's order (subclasses included).
    if value is None:
        return AnyValue()
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, Sequence):
        return AnyValue(array_value=ArrayValue(values=[_value(v) for v in value]))
    if isinstance(value, Mapping):
        return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=str(k), value=_value(v)) for k, v in value.items()]))
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _key_values(attributes: Mapping | None) -> list[KeyValue]:
    """Attributes as KeyValue messages (for the rare parts: events, links, resource, scope)."""
    out = []
    for key, value in (attributes or {}).items():
        try:
            out.append(KeyValue(key=key, value=_value(value)))
        except Exception as exc:  # as the SDK encoder: one bad attribute does not lose the rest
            log.exception("Failed to encode key %s: %s", key, exc)
    return out


def _encode_kv(key: str, value: Any) -> bytes | None:
    """One encoded ``Span.attributes`` field; None (logged) for a value OTLP cannot carry."""
    try:
        return _field(_TAG_ATTRIBUTE, KeyValue(key=key, value=_value(value)).SerializePartialToString())
    except Exception as exc:  # an int beyond 64 bits, an unknown type
        log.exception("Failed to encode key %s: %s", key, exc)
        return None


def _attribute_fields_py(attributes: Mapping) -> bytes:
    """A span's attributes as encoded ``Span.attributes`` fields."""
    cache = _KV_CACHE
    parts = []
    for key, value in attributes.items():
        t = type(value)
        ck = (key, t, value) if t in _CACHEABLE else None
        field = cache.get(ck) if ck is not None else None
        if field is None:
            field = _encode_kv(key, value)
            if field is None:
                continue
            if ck is not None and len(field) <= _KV_FIELD_MAX:
                if len(cache) >= _KV_CACHE_MAX:
                    cache.clear()
                cache[ck] = field
        parts.append(field)
    return b"".join(parts)


def _attribute_fields_c(attributes: Mapping) -> bytes:
    if type(attributes) is not dict:
        return _attribute_fields_py(attributes)
    return _c_attribute_fields(attributes, _KV_CACHE, _encode_kv, _KV_CACHE_MAX, _KV_FIELD_MAX)


def _span_field_py(trace_id: int, span_id: int, parent_id: int | None, trace_state: bytes, name_field: bytes,
                   kind: int, start: int, end: int, flags: int, attrs: bytes, status: bytes, rare: bytes) -> bytes:
    """One span as an encoded ``ScopeSpans.spans`` field, from its parts."""
    parts = [_TAG_TRACE_ID, trace_id.to_bytes(16, "big"), _TAG_SPAN_ID, span_id.to_bytes(8, "big")]
    if trace_state:
        parts += (_TAG_TRACE_STATE, _varint(len(trace_state)), trace_state)
    if parent_id is not None:
        parts += (_TAG_PARENT_ID, parent_id.to_bytes(8, "big"))
    parts.append(name_field)
    parts.append(_TAIL.pack(0x30, kind, 0x39, start, 0x41, end, 0x85, 0x01, flags))
    parts += (attrs, status, rare)
    body = b"".join(parts)
    return _TAG_SPAN + _varint(len(body)) + body


def _status_field(status: Any) -> bytes:
    # By identity first: most spans share a few Status objects, and reading
    # an enum's .value is slow next to a dict look-up.
    hit = _STATUS_BY_ID.get(id(status))
    if hit is not None and hit[0] is status:
        return hit[1]
    key = (status.status_code.value, status.description)
    field = _STATUS_CACHE.get(key)
    if field is None:
        field = _field(_TAG_STATUS, Status(code=key[0], message=key[1]).SerializePartialToString())
        if len(_STATUS_CACHE) >= _KV_CACHE_MAX:
            _STATUS_CACHE.clear()
        _STATUS_CACHE[key] = field
    if len(_STATUS_BY_ID) >= _OBJECT_CACHE_MAX:
        _STATUS_BY_ID.clear()
    _STATUS_BY_ID[id(status)] = (status, field)
    return field


def _resource_head(resource: Any) -> bytes:
    """ResourceSpans' fields other than scope_spans, encoded once per resource object."""
    hit = _RESOURCE_CACHE.get(id(resource))
    if hit is not None and hit[0] is resource:
        return hit[1]
    head = ResourceSpans(
        resource=PbResource(attributes=_key_values(resource.attributes)), schema_url=resource.schema_url
    ).SerializePartialToString()
    if len(_RESOURCE_CACHE) >= _OBJECT_CACHE_MAX:
        _RESOURCE_CACHE.clear()
    _RESOURCE_CACHE[id(resource)] = (resource, head)
    return head


def _scope_head(scope: Any) -> bytes:
    """ScopeSpans' fields other than spans, encoded once per scope object."""
    hit = _SCOPE_CACHE.get(id(scope))
    if hit is not None and hit[0] is scope:
        return hit[1]
    if scope is None:
        msg = ScopeSpans(scope=InstrumentationScope())
    else:
        msg = ScopeSpans(
            scope=InstrumentationScope(name=scope.name, version=scope.version, attributes=_key_values(scope.attributes)),
            schema_url=scope.schema_url,
        )
    head = msg.SerializePartialToString()
    if len(_SCOPE_CACHE) >= _OBJECT_CACHE_MAX:
        _SCOPE_CACHE.clear()
    _SCOPE_CACHE[id(scope)] = (scope, head)
    return head


# ReadableSpan's fields in one C call; its properties copy events and links
# into tuples and wrap attributes on every access. The public names are the
# fallback for span classes built differently.
_FIELDS = ("context", "parent", "name", "kind", "start_time", "end_time", "attributes", "events", "links", "status")
_PRIVATE = attrgetter(*("_" + f for f in _FIELDS))
_PUBLIC = attrgetter(*_FIELDS)


def _span(s: ReadableSpan) -> bytes:
    """One span as an encoded ``ScopeSpans.spans`` field.

    The fixed scalar fields (ids, name, kind, times, flags) are written
    directly in the wire format, which is a third of the cost of building a
    ``Span`` message for them; everything with structure (attributes, status,
    events, links) is encoded by the generated classes.
    """
    try:
        ctx, parent, name, kind, start, end, attributes, events, links, status = _PRIVATE(s)
    except AttributeError:
        ctx, parent, name, kind, start, end, attributes, events, links, status = _PUBLIC(s)
    ts = ctx.trace_state
    # an empty TraceState encodes as no field, as the SDK's "" does
    trace_state = _trace_state_bytes(ts) if ts else b""
    name_field = _NAME_CACHE.get(name)
    if name_field is None:
        name_field = _name_field(name)
    rare = b""
    if events or links or type(attributes) is not dict and attributes is not None or type(events) is not tuple or type(links) is not tuple:
        rare = _rare_fields(s, attributes, events, links)
    return _span_field(
        ctx.trace_id, ctx.span_id,
        parent.span_id if parent else None,  # as the SDK: no parent, no parent id
        trace_state, name_field, _KIND_BY_ID[id(kind)], start or 0, end or 0,
        _IS_REMOTE if parent is not None and parent.is_remote else _HAS_IS_REMOTE,
        _attribute_fields(attributes) if attributes else b"",
        _status_field(status) if status is not None else b"",
        rare,
    )


def _name_field(name: str) -> bytes:
    data = name.encode()
    field = _TAG_NAME + _varint(len(data)) + data
    if len(_NAME_CACHE) >= _KV_CACHE_MAX:
        _NAME_CACHE.clear()
    _NAME_CACHE[name] = field
    return field


def _rare_fields(s: ReadableSpan, attributes: Any, events: Any, links: Any) -> bytes:
    """Events, links and dropped counts, which the proxy's own spans rarely have."""
    kw: dict[str, Any] = {}
    if events:
        kw["events"] = [
            Span.Event(
                name=e.name,
                time_unix_nano=e.timestamp,
                attributes=_key_values(e.attributes),
                dropped_attributes_count=e.dropped_attributes,
            )
            for e in events
        ]
    if links:
        kw["links"] = [
            _link(link.context.trace_id, link.context.span_id, link.context.is_remote,
                  _key_values(link.attributes), link.dropped_attributes)
            for link in links
        ]
    # Plain dicts and tuples (what the builder makes) drop nothing; the SDK's
    # bounded containers say how much they dropped.
    if attributes is not None and type(attributes) is not dict:
        kw["dropped_attributes_count"] = s.dropped_attributes
    if type(events) is not tuple:
        kw["dropped_events_count"] = s.dropped_events
    if type(links) is not tuple:
        kw["dropped_links_count"] = s.dropped_links
    return Span(**kw).SerializePartialToString()


def _link(trace_id: int, span_id: int, remote: bool, attributes: list, dropped: int) -> Span.Link:
    return Span.Link(
        trace_id=trace_id.to_bytes(16, "big"),
        span_id=span_id.to_bytes(8, "big"),
        attributes=attributes,
        dropped_attributes_count=dropped,
        flags=_IS_REMOTE if remote else _HAS_IS_REMOTE,
    )


_TRACE_STATES: dict[str, TraceState] = {}
_TRACE_STATE_BYTES: dict[str, bytes] = {}


def parse_trace_state(header: str) -> TraceState:
    """The parsed tracestate header (invalid entries dropped); applications send the same few again and again."""
    ts = _TRACE_STATES.get(header)
    if ts is None:
        ts = TraceState.from_header([header])
        if len(_TRACE_STATES) >= 1024:
            _TRACE_STATES.clear()
        _TRACE_STATES[header] = ts
    return ts


def _trace_state_bytes(ts: TraceState) -> bytes:
    return ",".join([f"{k}={v}" for k, v in ts.items()]).encode()


def trace_state_field(header: str | None) -> bytes:
    """A tracestate header as the encoded ``Span.trace_state`` value; b"" for none."""
    return _trace_state_field(header) if header else b""


def _trace_state_field(header: str) -> bytes:
    """A tracestate header as the SDK would carry it: parsed, joined again."""
    data = _TRACE_STATE_BYTES.get(header)
    if data is None:
        data = _trace_state_bytes(parse_trace_state(header))
        if len(_TRACE_STATE_BYTES) >= 1024:
            _TRACE_STATE_BYTES.clear()
        _TRACE_STATE_BYTES[header] = data
    return data


def span_parts(name: str, kind: SpanKind, attributes: dict | None, status: Any) -> tuple[bytes, int, bytes, bytes]:
    """The encoded parts of a span that depend on its name, kind, attributes and status only.

    Spans of the same statement shape share them: the span builder keeps them
    and passes them to :func:`encode_span_parts` with each span's ids and times.
    """
    name_field = _NAME_CACHE.get(name)
    if name_field is None:
        name_field = _name_field(name)
    return (name_field, _KIND_BY_ID[id(kind)], _attribute_fields(attributes) if attributes else b"",
            _status_field(status) if status is not None else b"")


def encode_span_parts(parts: tuple[bytes, int, bytes, bytes], trace_id: int, span_id: int, parent_id: int | None,
                      parent_remote: bool, tracestate: str | None, start: int, end: int, rare: bytes = b"") -> bytes:
    """One span as the encoded ``ScopeSpans.spans`` field, from :func:`span_parts` and its ids and times."""
    name_field, kind, attrs, status = parts
    return _span_field(
        trace_id, span_id, parent_id or None,
        _trace_state_field(tracestate) if tracestate else b"",
        name_field, kind, start or 0, end or 0,
        _IS_REMOTE if parent_id and parent_remote else _HAS_IS_REMOTE,
        attrs, status, rare,
    )


def _local_children_py(out: list, head: tuple, trace_id: int, parent_id: int, trace_state: bytes, flags: int,
                       *groups) -> None:
    for i in range(0, len(groups), 4):
        name_field, kind, attrs, status = groups[i]
        field = _span_field(trace_id, groups[i + 1], parent_id, trace_state, name_field, kind,
                            groups[i + 2], groups[i + 3], flags, attrs, status, b"")
        out.append(field if head is None else (*head, field))


def encode_children(out: list, head: tuple, trace_id: int, parent_id: int, tracestate: str | None, *groups) -> None:
    """Local children of ``parent_id``, one per (parts, span_id, start, end) in ``groups`` (flattened).

    Appends ``(*head, field)`` (``field`` alone when ``head`` is None) to ``out`` for each: the spans of
    :func:`encode_span_parts` with ``parent_remote`` false, in one call.
    """
    _local_children(out, head, trace_id, parent_id, _trace_state_field(tracestate) if tracestate else b"",
                    _HAS_IS_REMOTE, *groups)


def encode_span(name: str, trace_id: int, span_id: int, parent_id: int | None, parent_remote: bool,
                tracestate: str | None, kind: SpanKind, start: int, end: int, attributes: dict | None,
                status: Any, links: Sequence[tuple] = ()) -> bytes:
    """One span, from its parts, as the encoded ``ScopeSpans.spans`` field :func:`_span` makes of a ReadableSpan.

    For the span builder (``SpanBuilder.encode``): the same bytes without the
    span, context and status objects. ``links`` are (trace_id, span_id, ...)
    of local spans, with no attributes.
    """
    rare = b""
    if links:
        rare = Span(links=[_link(link[0], link[1], False, [], 0) for link in links]).SerializePartialToString()
    return encode_span_parts(span_parts(name, kind, attributes, status), trace_id, span_id, parent_id,
                             parent_remote, tracestate, start, end, rare)


def encode_request(spans: Sequence[ReadableSpan | tuple | bytes], head: tuple | None = None) -> bytes:
    """The serialized OTLP ``ExportTraceServiceRequest`` for ``spans``.

    Means what the SDK encoder's request means: same resource and scope
    grouping, same spans, same field values. A span may also come already
    encoded, as (resource, scope, :func:`encode_span`'s bytes), or as the bytes
    alone when ``head`` is their (resource, scope): a span builder that feeds
    one exporter (``SpanBuilder.bare``) makes no tuple a span.
    """
    if spans:
        first = type(spans[0])
        if first is bytes and head is not None:
            try:
                return _one_request(head[0], head[1], spans)
            except TypeError:  # not all bytes: grouped below
                pass
        elif first is tuple:
            fields = _one_pair(spans)
            if fields is not None:
                return _one_request(spans[0][0], spans[0][1], fields)
    # resource groups in first-seen order: [resource, [[scope, [span field, ...]], ...]]
    groups: list[list] = []
    by_pair: dict[tuple[int, int], list] = {}
    last_key = None
    bucket: list = []
    for s in spans:
        if type(s) is tuple:
            resource, scope, field = s
            scope = scope or None
        elif type(s) is bytes:
            if head is None:
                raise TypeError("encode_request: spans given as bytes need their (resource, scope) head")
            resource, scope, field = head[0], head[1] or None, s
        else:
            resource = s.resource
            scope = s.instrumentation_scope or None
            field = None
        key = (id(resource), id(scope))
        if key != last_key:
            bucket = by_pair.get(key)
            if bucket is None:
                bucket = by_pair[key] = _bucket(groups, resource, scope)
            last_key = key
        bucket.append(_span(s) if field is None else field)
    out = []
    for resource, scopes in groups:
        body = [_resource_head(resource)]
        for scope, fields in scopes:
            body.append(_field(_TAG_SCOPE_SPANS, _scope_head(scope) + b"".join(fields)))
        out.append(_field(_TAG_RESOURCE_SPANS, b"".join(body)))
    return b"".join(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


_FIXED64 = struct.Struct("<Q")


def encoded_span_facts(field: bytes) -> tuple | None:
    """(trace_id, span_id, start ns, end ns, name) of an encoded ScopeSpans.spans field (encode_span's).

    None when the bytes are not such a field or lack a trace or span id.
    Missing times read as 0, a missing name as "". The walk stops at the
    first field past the end time: the span encoders of this module write
    the Span's fields in their numbers' order, attributes (9) and the rest
    after these.
    """
    try:
        _, pos = _read_varint(field, 0)  # the field's tag
        size, pos = _read_varint(field, pos)
        end = pos + size
        if end > len(field):
            return None
        trace_id = span_id = None
        start_ns = end_ns = 0
        name = ""
        while pos < end:
            tag = field[pos]  # (the tags of fields 1 to 15 are one byte; 16 and up end the walk)
            number, wire = tag >> 3, tag & 7
            if number > 8 or tag >= 0x80:
                break
            pos += 1
            if wire == 2:
                size = field[pos]
                if size < 0x80:
                    pos += 1
                else:
                    size, pos = _read_varint(field, pos)
                if number == 1:
                    trace_id = int.from_bytes(field[pos:pos + size], "big")
                elif number == 2:
                    span_id = int.from_bytes(field[pos:pos + size], "big")
                elif number == 5:
                    name = field[pos:pos + size].decode("utf-8", "replace")
                pos += size
            elif wire == 1:
                if number == 7:
                    start_ns = _FIXED64.unpack_from(field, pos)[0]
                elif number == 8:
                    end_ns = _FIXED64.unpack_from(field, pos)[0]
                pos += 8
            elif wire == 0:
                _, pos = _read_varint(field, pos)
            elif wire == 5:
                pos += 4
            else:
                return None
    except (IndexError, TypeError, struct.error):
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, start_ns, end_ns, name


def with_attributes(field: bytes, attributes: Mapping) -> bytes:
    """An encoded ScopeSpans.spans field with ``attributes`` added to its span.

    Their Span.attributes fields go after the span's own fields (a repeated
    field's items may come anywhere in a message), and the field's length is
    framed again. An empty mapping gives ``field`` itself.
    """
    extra = _attribute_fields(attributes) if attributes else b""
    if not extra:
        return field
    _, pos = _read_varint(field, 0)
    size, body = _read_varint(field, pos)
    return field[:pos] + _varint(size + len(extra)) + field[body:] + extra


def _one_request(resource: Any, scope: Any, fields: Sequence[bytes]) -> bytes:
    """The request for encoded span fields of one resource and scope (TypeError if one is not bytes).

    One join, one copy of the spans: a request is often larger than the
    allocator's mmap threshold, where each fresh copy costs page faults.
    """
    resource_head, scope_head = _resource_head(resource), _scope_head(scope or None)
    scope_len = len(scope_head) + sum(map(len, fields))  # a non-bytes field makes the join below raise
    scope_tag = _TAG_SCOPE_SPANS + _varint(scope_len)
    parts = [_TAG_RESOURCE_SPANS, _varint(len(resource_head) + len(scope_tag) + scope_len), resource_head,
             scope_tag, scope_head]
    parts += fields
    return b"".join(parts)


_first, _second, _third = itemgetter(0), itemgetter(1), itemgetter(2)


def _one_pair(spans: Sequence) -> list[bytes] | None:
    """The span fields, when every span is encoded and all share one resource and one scope object.

    That is every batch of the span process (one builder); checked and
    gathered without a Python step per span. None otherwise.
    """
    resource, scope = spans[0][0], spans[0][1]
    try:
        if all(map(is_, map(_first, spans), repeat(resource))) and all(map(is_, map(_second, spans), repeat(scope))):
            return list(map(_third, spans))
    except (TypeError, IndexError, KeyError):  # a ReadableSpan among them
        pass
    return None


def encode_spans(spans: Sequence[ReadableSpan], head: tuple | None = None) -> ExportTraceServiceRequest:
    """The OTLP request for ``spans`` as a message (for gRPC): :func:`encode_request`, parsed (by protobuf's C parser)."""
    return ExportTraceServiceRequest.FromString(encode_request(spans, head))


def _bucket(groups: list, resource: Any, scope: Any) -> list:
    """The span list for a (resource, scope) pair not seen yet in this batch by identity.

    Equal resources (and scopes) that are distinct objects share a group, as
    they do in the SDK encoder, which groups by hash and equality. This runs
    once per distinct pair per batch, not per span.
    """
    for group in groups:
        if group[0] is resource or group[0] == resource:
            scopes = group[1]
            break
    else:
        scopes = []
        groups.append([resource, scopes])
    for entry in scopes:
        if entry[0] is scope or entry[0] == scope:
            return entry[1]
    entry = [scope, []]
    scopes.append(entry)
    return entry[1]


#: The largest request sent whole: a larger batch goes in halves (``export_counted``).
#: gRPC servers refuse messages over 4 MiB unless configured otherwise (the
#: Collector's OTLP receiver among them); this stays under it for both protocols.
MAX_REQUEST_BYTES = 4_000_000


def _halves(exporter: Any, spans: Sequence, size: int) -> int | None:
    """Spans delivered when ``spans`` (``size`` bytes encoded) must go in halves; None when it goes whole."""
    if size <= MAX_REQUEST_BYTES or len(spans) < 2:
        return None
    half = len(spans) // 2
    return exporter.export_counted(spans[:half]) + exporter.export_counted(spans[half:])


class GrpcSpanExporter(_GrpcExporter):
    """The library's OTLP/gRPC span exporter with :func:`encode_spans` as its encoder."""

    accepts_encoded = True  # spans may come as encode_span's bytes (SpanBuilder.encode)
    encoded_head: tuple | None = None  # (resource, scope) of spans given as bytes alone (SpanBuilder.bare)
    _encoded: tuple | None = None  # (spans, request bytes) export_counted encoded for export

    def export_counted(self, spans: Sequence) -> int:
        """Export, in halves while a request would exceed :data:`MAX_REQUEST_BYTES`; the spans delivered."""
        data = encode_request(spans, self.encoded_head)
        split = _halves(self, spans, len(data))
        if split is not None:
            return split
        self._encoded = (spans, data)
        try:
            return len(spans) if self.export(spans) is SpanExportResult.SUCCESS else 0
        finally:
            self._encoded = None

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        encoded = self._encoded
        if encoded is not None and encoded[0] is data:
            return ExportTraceServiceRequest.FromString(encoded[1])
        return encode_spans(data, self.encoded_head)


# With one of these set, the library loads a session from a credential provider plugin.
_CREDENTIAL_PROVIDER_VARS = ("OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
                             "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER")


class EnvOnceSession(requests.Session):
    """A requests session that reads the environment's proxy and CA settings once per URL.

    requests looks them up again for every request (``HTTPS_PROXY``,
    ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``, ...: a scan of the whole environment,
    a cost paid on every request). The
    exporter posts to one URL with the same arguments every time, so the result
    is kept: variables changed after the first export are not seen (the proxy
    reads its environment at start-up anyway).
    """

    def __init__(self) -> None:
        super().__init__()
        self._merged: dict[tuple, dict] = {}

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[override]
        try:
            key = (url, tuple(sorted(proxies.items())) if proxies else None, stream, verify, cert,
                   self.trust_env, self.verify, self.cert, self.stream, tuple(sorted(self.proxies.items())))
            hash(key)
        except TypeError:  # unhashable settings: no memo
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        merged = self._merged.get(key)
        if merged is None:
            merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if len(self._merged) >= 16:
                self._merged.clear()
            self._merged[key] = merged
        return dict(merged)


class HttpSpanExporter(_http.OTLPSpanExporter):
    """The library's OTLP/HTTP span exporter with :func:`encode_spans` as its encoder.

    ``export`` repeats the parent's few steps around the encoder (size limit,
    the exporter's own metrics, ``self._client.export``); if the installed
    version is built differently, the parent's ``export`` runs unchanged.
    """

    accepts_encoded = True  # spans may come as encode_span's bytes (SpanBuilder.encode)
    encoded_head: tuple | None = None  # (resource, scope) of spans given as bytes alone (SpanBuilder.bare)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("session") is None and not any(os.environ.get(v) for v in _CREDENTIAL_PROVIDER_VARS):
            kwargs["session"] = EnvOnceSession()
        super().__init__(*args, **kwargs)
        self._fast = callable(getattr(getattr(self, "_client", None), "export", None)) and hasattr(self, "_metrics")

    def export_counted(self, spans: Sequence) -> int:
        """Export, in halves while a request would exceed :data:`MAX_REQUEST_BYTES`; the spans delivered."""
        if not self._fast or self._shutdown:
            return len(spans) if self.export(spans) is SpanExportResult.SUCCESS else 0
        try:
            data = encode_request(spans, self.encoded_head)
        except Exception:
            data = None  # export() logs it and fails
        if data is not None:
            split = _halves(self, spans, len(data))
            if split is not None:
                return split
        return len(spans) if self.export(spans, data) is SpanExportResult.SUCCESS else 0

    def export(self, spans: Sequence[ReadableSpan], data: bytes | None = None) -> SpanExportResult:
        """``data``: the request already encoded (``export_counted``)."""
        if not self._fast or self._shutdown:
            return super().export(spans)
        with self._metrics.export_operation(len(spans)) as result:
            if data is None:
                try:
                    data = encode_request(spans, self.encoded_head)
                except Exception as exc:
                    log.error("Failed to encode span batch: %s", exc)
                    result.error = exc
                    return SpanExportResult.FAILURE
            limit = getattr(self, "_max_request_size", 0)
            too_large = getattr(_http, "_is_request_too_large", None)
            if too_large is not None and too_large(data, limit):
                log.warning("Dropping span batch: serialized size %s bytes exceeds max_request_size %s bytes", len(data), limit)
                error_type = getattr(_http, "RequestPayloadTooLargeError", ValueError)
                result.error = error_type(f"Serialized span request size {len(data)} bytes exceeds max_request_size {limit} bytes.")
                return SpanExportResult.FAILURE
            outcome = self._client.export(data)
            if not outcome.success:
                result.error = outcome.error
                code = getattr(outcome, "status_code", None)
                result.error_attrs = {"http.response.status_code": code} if code is not None else None
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


# The byte-assembling half in C when it was built (_otlpenc.c), else Python;
# PGOTEL_PURE_PYTHON=1 forces Python. Tests compare the two.
COMPILED = False
# statement_spans(out, head, parts, phase_parts, rec, trace_id, parent_id, trace_state_field, PARENT_FLAGS,
# CHILD_FLAGS, getrandbits): a kept extended statement's span and phases in one call (see _otlpenc.c);
# simple_spans(...): the same for a kept simple statement (its span and its execute child).
# None without the compiled module, and the span builder takes its Python steps instead.
# kept_run(...): the spans of a run of records whose shapes are kept (SpanBuilder.kept).
# phase_groups(rec): the phase spans of an extended statement (spans._phase_groups).
statement_spans = simple_spans = kept_run = phase_groups = None
configure_records = None
PARENT_FLAGS, CHILD_FLAGS = _IS_REMOTE, _HAS_IS_REMOTE
_span_field = _span_field_py
_attribute_fields = _attribute_fields_py
_local_children = _local_children_py
if not PURE_PYTHON:
    try:
        from ._otlpenc import attribute_fields as _c_attribute_fields, span_field as _span_field  # noqa: F811
        from ._otlpenc import local_children as _local_children  # noqa: F811

        _attribute_fields = _attribute_fields_c
        COMPILED = True
    except ImportError:
        pass
    else:
        try:  # a build older than statement_spans still serves the rest
            from ._otlpenc import configure as configure_records, kept_run, simple_spans, statement_spans  # noqa: F811
            from ._otlpenc import phase_groups  # noqa: F811
        except ImportError:
            pass
