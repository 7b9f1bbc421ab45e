"""Statement records → ReadableSpans named and attributed by OpenTelemetry's database conventions.

Each statement becomes a SERVER span (the database side of the application's
CLIENT span) with INTERNAL children for the phases the wire shows:

* ``parse``   Parse → ParseComplete (parse, analyse, rewrite)
* ``plan``    Bind → BindComplete (Postgres plans at Bind)
* ``execute`` Execute → CommandComplete / PortalSuspended / error;
  for the simple protocol, Query → each statement's completion.

A phase's end is exact only when the server flushed right after it (a Flush or
Sync followed the request, or phase_timing = "flush" inserted one). Otherwise
Postgres held the answer until the batch ended, the span ends when it arrived,
and ``pgotel.timing.exact`` is false: its duration is an upper bound.
"""

from __future__ import annotations

import random
import re
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv._incubating.attributes.db_attributes import DB_RESPONSE_RETURNED_ROWS, DB_USER
from opentelemetry.semconv.attributes.db_attributes import (
    DB_COLLECTION_NAME,
    DB_NAMESPACE,
    DB_OPERATION_NAME,
    DB_QUERY_SUMMARY,
    DB_QUERY_TEXT,
    DB_RESPONSE_STATUS_CODE,
    DB_SYSTEM_NAME,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.network_attributes import NETWORK_PEER_ADDRESS, NETWORK_PEER_PORT
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from .. import __version__, sqlcomment
from ..protocol.events import Completion, Statement
from ..stats import STATS
from . import sqlinfo

__all__ = ["SpanBuilder", "ConnState", "ATTR"]

SCOPE = InstrumentationScope("pgotel_proxy", __version__)

# Project attributes: Postgres facts under db.postgresql., proxy facts under pgotel.
ATTR = {
    "backend_pid": "db.postgresql.backend_pid",
    "application_name": "db.postgresql.application_name",
    "statement_name": "db.postgresql.statement_name",
    "portal_name": "db.postgresql.portal_name",
    "command_tag": "db.postgresql.command_tag",
    "protocol": "db.postgresql.protocol",
    "copy": "db.postgresql.copy",
    "wal_lsn": "pgotel.wal.message_lsn",
    "tx_status": "db.postgresql.transaction_status",
    "exact": "pgotel.timing.exact",
    "status": "pgotel.statement.status",
    "reused": "pgotel.statement.prepared_earlier",
    "sqlcommenter": "pgotel.sqlcommenter.",
    "parameter": "db.query.parameter.",
}

_SET_RE = re.compile(
    r"^\s*(?:SET\s+(?P<scope>LOCAL\s+|SESSION\s+)?pgotel\.traceparent\s*(?:=|TO)\s*'(?P<value>[^']*)'"
    r"|(?P<reset>RESET\s+pgotel\.traceparent|RESET\s+ALL|DISCARD\s+ALL)"
    r"|SET\s+(?:LOCAL\s+|SESSION\s+)?pgotel\.traceparent\s*(?:=|TO)\s*DEFAULT)\s*;?\s*$",
    re.IGNORECASE,
)
_rand = random.Random()


def _new_id(bits: int) -> int:
    while True:
        v = _rand.getrandbits(bits)
        if v:
            return v


class ConnState:
    """What the builder remembers per connection: the session carrier (``SET pgotel.traceparent``)."""

    __slots__ = ("info", "carrier", "carrier_local", "saved", "base_attrs")

    def __init__(self, info: Any, base_attrs: dict) -> None:
        self.info = info
        self.carrier: sqlcomment.TraceContext | None = None
        self.carrier_local = False
        self.saved: tuple | None = None  # carrier before the first SET inside the open transaction
        self.base_attrs = base_attrs

    def observe_set(self, sql: str, rec_ok: bool, tx_status: str) -> None:
        """Apply a successful ``SET [LOCAL] pgotel.traceparent`` / ``RESET``; Postgres' transaction rules apply."""
        if not rec_ok or "pgotel" not in sql and "ALL" not in sql.upper():
            return
        m = _SET_RE.match(sql)
        if m is None:
            return
        if tx_status in ("T", "E") and self.saved is None:
            self.saved = (self.carrier, self.carrier_local)
        if m.group("value") is not None:
            ctx = sqlcomment.parse_traceparent(m.group("value"))
            local = bool(m.group("scope")) and m.group("scope").strip().upper() == "LOCAL"
            if local and tx_status == "I":
                return  # SET LOCAL outside a transaction block does nothing
            self.carrier = ctx
            self.carrier_local = local
        else:
            self.carrier = None
            self.carrier_local = False

    def forget(self) -> None:
        """Statements of this connection went unseen (tracing off, queue full): the carrier is unknown.

        Forgetting it may leave later statements without their context; keeping
        it could put them in a trace that is no longer theirs.
        """
        self.carrier = None
        self.carrier_local = False
        self.saved = None

    def end_of_statement(self, tx_status: str, tag: str | None) -> None:
        if tx_status != "I":
            return
        if self.saved is not None:
            if tag is None or not tag.startswith("COMMIT"):
                self.carrier, self.carrier_local = self.saved  # rolled back: SET is undone
            self.saved = None
        if self.carrier_local:
            self.carrier = None
            self.carrier_local = False


class SpanBuilder:
    """Builds spans for finished statement records (runs on the builder thread)."""

    def __init__(self, *, resource, sample_rate: float, capture_parameters: bool, capture_literals: bool) -> None:
        self.resource = resource
        self.sample_rate = sample_rate
        self.capture_parameters = capture_parameters
        self.capture_literals = capture_literals

    def build(self, conn: ConnState, rec: Statement, out: list) -> None:
        STATS.statements += 1
        if rec.protocol == "extended":
            self._extended(conn, rec, out)
        else:
            self._simple(conn, rec, out)

    # ------------------------------------------------------------- context

    def _context(self, conn: ConnState, comment) -> tuple[int, int | None, int, str | None] | None:
        """(trace_id, parent_span_id, flags, tracestate) for a sampled statement, None when not sampled."""
        ctx = comment.context if comment is not None else None
        if ctx is None:
            ctx = conn.carrier
        if ctx is not None:
            if not ctx.sampled:
                return None
            return ctx.trace_id, ctx.span_id, ctx.flags, ctx.tracestate
        rate = self.sample_rate
        if rate <= 0.0 or (rate < 1.0 and _rand.random() >= rate):
            return None
        return _new_id(128), None, 1, None

    # ------------------------------------------------------------ builders

    def _extended(self, conn: ConnState, rec: Statement, out: list) -> None:
        raw = rec.sql or ""
        # A statement prepared in an earlier batch must not reuse the traceparent frozen in its text.
        comment = sqlcomment.parse(raw) if raw and not rec.reused else None
        if comment is not None and comment.invalid_traceparent:
            STATS.sqlcomment_invalid_traceparent += 1
        text = comment.stripped_sql if comment is not None else raw
        info = sqlinfo.analyze(text) if text else None
        ok = rec.status == "ok"
        conn.observe_set(text, ok, rec.tx_status)
        ctx = self._context(conn, comment)
        if ctx is not None:
            trace_id, parent_id, flags, tracestate = ctx
            sid = _new_id(64)
            name = info.summary if info is not None else "postgresql"
            if rec.status == "prepared":
                name = f"PREPARE {name}"
            end = rec.end_ns or rec.bind_end_ns or rec.parse_end_ns or rec.start_ns
            attrs = self._attrs(conn, info, text, rec.tag, rec.rows, rec.error, comment)
            attrs[ATTR["protocol"]] = "extended"
            if rec.statement_name:
                attrs[ATTR["statement_name"]] = rec.statement_name
            if rec.portal:
                attrs[ATTR["portal_name"]] = rec.portal
            if rec.reused:
                attrs[ATTR["reused"]] = True
            if rec.copy:
                attrs[ATTR["copy"]] = rec.copy
            if rec.extra and "wal_lsn" in rec.extra:
                attrs[ATTR["wal_lsn"]] = rec.extra["wal_lsn"]
            if rec.status not in ("ok", "error"):
                attrs[ATTR["status"]] = rec.status
            if self.capture_parameters and rec.params:
                for i, p in enumerate(rec.params):
                    attrs[f"{ATTR['parameter']}{i + 1}"] = "NULL" if p is None else p
            span_ctx = _span_context(trace_id, sid, flags, tracestate)
            parent = _span_context(trace_id, parent_id, flags, tracestate, remote=True) if parent_id else None
            out.append(_span(name, span_ctx, parent, SpanKind.SERVER, rec.start_ns, end, attrs, self.resource, _status(rec.status, rec.error, attrs)))
            if rec.parse_start_ns and rec.parse_end_ns:
                out.append(self._phase("parse", trace_id, flags, tracestate, span_ctx, rec.parse_start_ns, rec.parse_end_ns, rec.parse_exact))
            if rec.bind_start_ns and rec.bind_end_ns:
                start = max(rec.bind_start_ns, rec.parse_end_ns)
                out.append(self._phase("plan", trace_id, flags, tracestate, span_ctx, start, rec.bind_end_ns, rec.bind_exact))
            if rec.exec_start_ns and rec.end_ns and rec.status != "skipped":
                start = max(rec.exec_start_ns, rec.bind_end_ns)
                out.append(self._phase("execute", trace_id, flags, tracestate, span_ctx, start, rec.end_ns, rec.exec_exact))
        conn.end_of_statement(rec.tx_status, rec.tag)

    def _simple(self, conn: ConnState, rec: Statement, out: list) -> None:
        raw = rec.sql or ""
        comment = sqlcomment.parse(raw) if raw else None
        if comment is not None and comment.invalid_traceparent:
            STATS.sqlcomment_invalid_traceparent += 1
        text = comment.stripped_sql if comment is not None else raw
        infos = sqlinfo.analyze_many(text) if text else []
        results: list[Completion] = rec.results or []
        if not results and rec.status == "incomplete":
            results = [Completion(rec.end_ns, None, 0, None)]
        start = rec.start_ns
        for i, res in enumerate(results):
            info = infos[i] if i < len(infos) else (infos[-1] if infos else None)
            stmt_text = _statement_text(info, text, len(infos))
            ok = res.error is None and rec.status != "incomplete"
            last = i == len(results) - 1
            tx = rec.tx_status if last else "T"
            conn.observe_set(stmt_text if info is None else _raw_piece(text, i, len(infos)) or stmt_text, ok, tx)
            ctx = self._context(conn, comment)
            if ctx is not None:
                trace_id, parent_id, flags, tracestate = ctx
                sid = _new_id(64)
                name = info.summary if info is not None else ("FUNCTION CALL" if rec.protocol == "function" else "postgresql")
                attrs = self._attrs(conn, info, stmt_text, res.tag, res.rows, res.error, comment)
                attrs[ATTR["protocol"]] = rec.protocol
                if rec.copy and last:
                    attrs[ATTR["copy"]] = rec.copy
                if last and rec.extra and "wal_lsn" in rec.extra:
                    attrs[ATTR["wal_lsn"]] = rec.extra["wal_lsn"]
                status = "error" if res.error else ("incomplete" if rec.status == "incomplete" and last else "ok")
                if status == "incomplete":
                    attrs[ATTR["status"]] = status
                span_ctx = _span_context(trace_id, sid, flags, tracestate)
                parent = _span_context(trace_id, parent_id, flags, tracestate, remote=True) if parent_id else None
                end = res.end_ns or rec.end_ns
                out.append(_span(name, span_ctx, parent, SpanKind.SERVER, start, end, attrs, self.resource, _status(status, res.error, attrs)))
                out.append(self._phase("execute", trace_id, flags, tracestate, span_ctx, start, end, True))
            start = res.end_ns or start
            if last:
                conn.end_of_statement(rec.tx_status, res.tag)

    # ------------------------------------------------------------- helpers

    def _attrs(self, conn: ConnState, info, text: str, tag, rows: int, error, comment) -> dict:
        attrs = dict(conn.base_attrs)
        if info is not None:
            attrs[DB_QUERY_SUMMARY] = info.summary
            attrs[DB_QUERY_TEXT] = text if self.capture_literals else info.sanitized
            if info.operation:
                attrs[DB_OPERATION_NAME] = info.operation
            if info.collection:
                attrs[DB_COLLECTION_NAME] = info.collection
        if tag:
            attrs[ATTR["command_tag"]] = tag
        if rows or tag and tag.split(" ", 1)[0] in ("SELECT", "FETCH", "MOVE"):
            attrs[DB_RESPONSE_RETURNED_ROWS] = rows
        if error:
            code = error.get("C")
            if code:
                attrs[DB_RESPONSE_STATUS_CODE] = code
                attrs[ERROR_TYPE] = code
        if comment is not None:
            prefix = ATTR["sqlcommenter"]
            for k, v in comment.tags.items():
                if k not in ("traceparent", "tracestate"):
                    attrs[prefix + k] = v
        session = conn.info.session
        if session.backend_pid is not None:
            attrs[ATTR["backend_pid"]] = session.backend_pid
        app = session.server_params.get("application_name") or session.startup_params.get("application_name")
        if app:
            attrs[ATTR["application_name"]] = app
        return attrs

    def _phase(self, name, trace_id, flags, tracestate, parent_ctx, start, end, exact) -> ReadableSpan:
        ctx = _span_context(trace_id, _new_id(64), flags, tracestate)
        return _span(name, ctx, parent_ctx, SpanKind.INTERNAL, start, max(start, end), {ATTR["exact"]: bool(exact)}, self.resource, _OK)


_OK = Status(StatusCode.UNSET)


def _status(status: str, error, attrs: dict) -> Status:
    if status == "error":
        msg = error.get("M", "") if error else ""
        if '"' in msg:
            msg = _redact_message(msg, error, attrs)
        return Status(StatusCode.ERROR, msg[:256])
    if status == "incomplete":
        return Status(StatusCode.ERROR, "connection closed before the statement completed")
    return _OK


_QUOTED = re.compile(r'"((?:[^"]|"")*)"')
_ERROR_NAME_FIELDS = "stcdn"  # schema, table, column, data type, constraint


def _redact_message(msg: str, error: dict, attrs: dict) -> str:
    """Hide the values Postgres quotes in error messages unless the span exports them anyway.

    Messages such as ``invalid input syntax for type integer: "s3cr3t"`` quote
    a literal or a parameter value. A quoted part stays only when it is a name
    (the error's own schema/table/column/type/constraint fields, or a word of
    the query text as exported) or a captured parameter value.
    """
    names = {error.get(k) for k in _ERROR_NAME_FIELDS}
    text = attrs.get(DB_QUERY_TEXT, "")
    prefix = ATTR["parameter"]
    params = {v for k, v in attrs.items() if k.startswith(prefix)}

    def repl(m: re.Match) -> str:
        value = m.group(1)
        if value in names or value in params:
            return m.group(0)
        if value and (f'"{value}"' in text or re.search(rf"(?<![\w$]){re.escape(value)}(?![\w$])", text)):
            return m.group(0)
        return '"?"'

    return _QUOTED.sub(repl, msg)


def _statement_text(info, text: str, count: int) -> str:
    if count <= 1 or info is None:
        return text
    return info.sanitized


def _raw_piece(text: str, i: int, count: int) -> str | None:
    if count <= 1:
        return text
    pieces = sqlinfo.split_statements(text) if hasattr(sqlinfo, "split_statements") else None
    if pieces and i < len(pieces):
        return pieces[i]
    return None


def _span_context(trace_id: int, span_id: int, flags: int, tracestate: str | None, remote: bool = False) -> SpanContext:
    ts = TraceState.from_header([tracestate]) if tracestate else None
    return SpanContext(trace_id, span_id, is_remote=remote, trace_flags=TraceFlags(flags & 0xFF), trace_state=ts)


def _span(name, ctx, parent, kind, start, end, attrs, resource, status) -> ReadableSpan:
    return ReadableSpan(
        name=name,
        context=ctx,
        parent=parent,
        resource=resource,
        attributes=attrs,
        kind=kind,
        status=status,
        start_time=start,
        end_time=end,
        instrumentation_scope=SCOPE,
    )
