"""Trace context out of an otelwal message's content, however a CDC tool delivers it.

pgoutput hands over the raw bytes; wal2json prints them as text; Debezium puts
them base64-encoded (``binary.handling.mode=bytes``, the default) or hex. All of
them are accepted: plain JSON, base64 of JSON, hex of JSON (with or without a
``\\x`` prefix). Any role may call ``pg_logical_emit_message``, so the content
is untrusted: anything malformed or oversized yields None, is counted
(``wal_carrier_*`` in :data:`pgotel_proxy.stats.STATS`), and never raises.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..stats import STATS

__all__ = ["extract", "extract_carrier", "MAX_CONTENT"]

log = logging.getLogger("pgotel_proxy.wal")

#: Longer content is not examined (the proxy writes well under 1 KiB).
MAX_CONTENT = 8192


_PROPAGATOR = TraceContextTextMapPropagator()
_HEX = re.compile(r"(?:\\x)?([0-9a-fA-F]{2})+")
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def _text(content) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, (bytes, bytearray, memoryview)):
        try:
            return bytes(content).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def _json_carrier(text: str) -> dict[str, str] | None:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    tp = doc.get("traceparent")
    if not isinstance(tp, str) or len(tp) > 128:
        return None
    carrier = {"traceparent": tp}
    ts = doc.get("tracestate")
    if isinstance(ts, str) and len(ts) <= 512:
        carrier["tracestate"] = ts
    return carrier


def extract_carrier(content) -> dict[str, str] | None:
    """The ``{"traceparent", "tracestate"}`` carrier in ``content``, or None (counted)."""
    try:
        size = len(content)
    except TypeError:
        STATS.wal_carrier_malformed += 1
        return None
    if size > MAX_CONTENT * 2 + 2:  # hex doubles the size
        STATS.wal_carrier_oversized += 1
        return None
    text = _text(content)
    if text is None:
        STATS.wal_carrier_malformed += 1
        return None
    text = text.strip()
    carrier = None
    if text.startswith("{"):
        carrier = _json_carrier(text) if len(text) <= MAX_CONTENT else None
    elif _HEX.fullmatch(text) and (text.startswith("\\x") or len(text) % 2 == 0):
        try:
            raw = binascii.unhexlify(text[2:] if text.startswith("\\x") else text)
            carrier = _json_carrier(raw.decode("utf-8"))
        except (binascii.Error, UnicodeDecodeError):
            carrier = None
    if carrier is None and not text.startswith("{") and _B64.fullmatch(text):
        try:
            raw = base64.b64decode(text, validate=True)
            carrier = _json_carrier(raw.decode("utf-8")) if raw[:1] == b"{" else None
        except (binascii.Error, UnicodeDecodeError, ValueError):
            carrier = None
    if carrier is None:
        STATS.wal_carrier_malformed += 1
    return carrier


def extract(content) -> Context | None:
    """An OpenTelemetry Context (remote parent) from otelwal ``content``; None when there is none.

    ``content`` may be bytes or str: plain JSON, base64 or hex of it.
    """
    try:
        carrier = extract_carrier(content)
        if carrier is None:
            return None
        ctx = _PROPAGATOR.extract(carrier)
        if not trace.get_current_span(ctx).get_span_context().is_valid:
            STATS.wal_carrier_malformed += 1
            return None
        STATS.wal_carrier_extracted += 1
        return ctx
    except Exception:  # noqa: BLE001 - hostile input must never stop a consumer
        STATS.wal_carrier_malformed += 1
        log.debug("otelwal content could not be read", exc_info=True)
        return None
