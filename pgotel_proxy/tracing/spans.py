"""Statement records → spans named and attributed by OpenTelemetry's database conventions.

The span builder runs in the span process only (``tracing.helper.SpanHelper``
drives it there); the relay process never imports this module. It makes
ReadableSpans for an SDK exporter and for the enricher, or each span's
encoded OTLP field for the exporters of ``otlp.py``.

Each statement becomes a SERVER span (the database side of the application's
CLIENT span) with INTERNAL children for the phases the wire shows:

* ``parse``   Parse → ParseComplete (parse, analyse, rewrite)
* ``plan``    Bind → BindComplete (Postgres plans at Bind)
* ``execute`` Execute → CommandComplete / PortalSuspended / error;
  for the simple protocol, Query → each statement's completion.

A boundary between two phases is observed only when the server flushed right
after the earlier one (a Flush or Sync followed the request, or phase_timing =
"flush" inserted one) and its answer arrived on its own. Phases whose boundary
was not observed share one span over their joint interval, named by the phases
it holds (``parse+plan+execute`` for a Parse, Bind, Execute, Sync batch
answered together) and listing them in ``pgotel.phases``; no span claims a
boundary the wire did not show. ``pgotel.timing.exact`` says whether a phase
span's end was observed. The span holding execute carries
``pgotel.execute.first_row_offset_ms`` when rows came: how long after its
start the first DataRow (or CopyData of COPY TO) arrived, and
``pgotel.client_wait_ms`` when the relay stopped reading the server because the
client did not read its answer fast enough.

A statement's parent, first found wins: its own sqlcommenter comment (a
Parse's comment for the executions of its batch, and for the first execution
in the batch right after it, which the codec marks not ``reused``); then the
session's context channels (:data:`CHANNELS`, followed by :class:`ConnState`
with Postgres' rules for settings): ``SET pgotel.traceparent``, then
pg_tracing's ``SET pg_tracing.trace_context``, then ``application_name`` when
it holds a traceparent (start-up value or ``SET``); then the transaction span
(``transaction_spans``); else the statement is a new root under the sample
rate. A setting made only to carry context outranks one that also names
something. An ``application_name`` that is a traceparent is context, never
``db.postgresql.application_name``, which is the value each statement ran
under (``Statement.application_name``).

A statement that failed or was slow (``sampling.keep_reason``) and that its
parent's sampled flag or the sample rate leaves out is kept all the same: as
a new root with a link to the parent's context (when there is one) and
``pgotel.kept_because``, at most ``keep_rate`` a second.
"""

from __future__ import annotations

import re
import time
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv._incubating.attributes.db_attributes import DB_RESPONSE_RETURNED_ROWS
from opentelemetry.semconv.attributes.db_attributes import (
    DB_COLLECTION_NAME,
    DB_OPERATION_NAME,
    DB_QUERY_SUMMARY,
    DB_QUERY_TEXT,
    DB_RESPONSE_STATUS_CODE,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from .. import __version__, sqlcomment
from ..shape import blank_code, statement_key
from ..protocol.events import COMPLETION_LAYOUT, STATEMENT_LAYOUT, Completion, Statement
from ..stats import STATS
from . import otlp, sqlinfo
from .carrier import _APP, CHANNELS, SessionCarrier, channel_context
from .sampling import keep_reason, may_set_carrier, rand as _rand

__all__ = ["SpanBuilder", "ConnState", "ATTR", "CHANNELS", "channel_context"]

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
    "tx_statements": "db.postgresql.transaction.statements",
    "tx_outcome": "db.postgresql.transaction.outcome",
    "tx_status": "db.postgresql.transaction_status",
    "exact": "pgotel.timing.exact",
    "phases": "pgotel.phases",
    "first_row": "pgotel.execute.first_row_offset_ms",
    "client_wait": "pgotel.client_wait_ms",
    "status": "pgotel.statement.status",
    "reused": "pgotel.statement.prepared_earlier",
    "kept_because": "pgotel.kept_because",
    "sqlcommenter": "pgotel.sqlcommenter.",
    "parameter": "db.query.parameter.",
}


def _new_id(bits: int) -> int:
    while True:
        v = _rand.getrandbits(bits)
        if v:
            return v


class ConnState(SessionCarrier):
    """What the builder remembers per connection: the session carrier, and what building needs."""

    __slots__ = ("info", "base_attrs", "tx_records", "tx_parent", "shapes", "presampled")

    def __init__(self, info: Any, base_attrs: dict) -> None:
        startup = getattr(getattr(info, "session", None), "startup_params", None) or {}
        super().__init__(startup.get("application_name"))
        self.info = info
        self.base_attrs = base_attrs
        # transaction_spans: records of the open transaction, built when it ends
        self.tx_records: list | None = None
        # ... and while they are built, the transaction span statements without context join
        self.tx_parent: tuple | None = None
        # encoded statement spans: what repeats between executions of one statement shape (_SHAPE_KEY)
        self.shapes: dict[tuple, tuple] = {}
        # the records being built were drawn by the relay's Presampler: their roots are kept
        self.presampled = False


_SHAPES_MAX = 256  # statement shapes remembered per connection
_CONTEXT_TAGS = ("traceparent", "tracestate")


def _other_tags(comment) -> tuple:
    """The sqlcommenter tags of a comment other than the trace context, as a key."""
    if comment is None:
        return ()
    tags = comment.tags
    if len(tags) == 1 and "traceparent" in tags:
        return ()
    return tuple(kv for kv in tags.items() if kv[0] not in _CONTEXT_TAGS)



def _span_name(info, protocol: str) -> str:
    """A statement span's name: the query summary, else the operation, else the system.

    Text the SQL parser rejects (``selec 1``) has an empty summary; the span
    still needs a low-cardinality name.
    """
    if info is not None and info.summary:
        return info.summary
    if info is not None and info.operation:
        return info.operation
    return "FUNCTION CALL" if protocol == "function" else "postgresql"

class SpanBuilder:
    """Builds spans for finished statement records (in the span process, on its reading thread)."""

    def __init__(
        self,
        *,
        resource,
        sample_rate: float,
        capture_parameters: bool,
        capture_literals: bool,
        transaction_spans: bool = False,
        max_transaction_statements: int = 1000,
        encode: bool = False,
        keep_errors: bool = False,
        keep_slower_than_ns: int = 0,
        keep_rate: float = 0.0,
    ) -> None:
        self.resource = resource
        self.sample_rate = sample_rate
        self.capture_parameters = capture_parameters
        self.capture_literals = capture_literals
        self.transaction_spans = transaction_spans
        self.max_transaction_statements = max_transaction_statements
        # False: ReadableSpans, for any SDK exporter and for the enricher.
        # True: each span as (resource, scope, encoded OTLP Span field), for
        # the exporters of otlp.py (``accepts_encoded``): no span, context or
        # status objects are made, and the export thread only joins bytes.
        self.encode = encode
        self._head = (resource, SCOPE)
        # With encode: True appends each span's field alone, for an exporter told the head
        # (otlp exporters' encoded_head); no (resource, scope, field) tuple a span.
        self._out_head: tuple | None = self._head
        # Failed (keep_errors) and slow (keep_slower_than_ns) statements that the sample
        # rate or an unsampled parent leaves out are kept as new roots, up to keep_rate a
        # second: a token bucket holding one second's worth (one token at least).
        self.set_keep_rule(keep_errors, keep_slower_than_ns, keep_rate)
        # the record being built is one the rule may keep: its spans are built in full (no kept shape)
        self._keep_record = False
        # (reason, carried context or None) of the root _context just kept by the rule
        self._kept: tuple | None = None
        # A text's shape key (shape.statement_key): the span helper gives the ones the
        # latency histograms computed for the same records (shape.StatementKeys).
        self.statement_key = statement_key

    def set_keep_rule(self, errors: bool, slower_than_ns: int, rate: float) -> None:
        """The rule for failed and slow statements (``always_trace_*``); a reload sets it anew."""
        self.keep_errors = errors
        self.keep_slow_ns = slower_than_ns
        self.keep_rate = rate
        self._keeping = rate > 0 and (errors or slower_than_ns > 0)
        self._keep_burst = max(1.0, rate)
        self._keep_tokens = self._keep_burst
        self._keep_at = time.monotonic()

    @property
    def bare(self) -> bool:
        return self._out_head is None

    @bare.setter
    def bare(self, bare: bool) -> None:
        self._out_head = None if bare else self._head

    def _item(self, field: bytes):
        """An encoded span as ``out`` holds it (see :attr:`bare`)."""
        return field if self._out_head is None else (self.resource, SCOPE, field)

    def build(self, conn: ConnState, rec: Statement, out: list) -> list[tuple[Statement, int, int]]:
        """Append the spans of ``rec`` (or of the transaction it ends) to ``out``.

        Returns which record each appended run of spans belongs to, as
        (record, start, end) indexes into ``out``, for the enricher.
        """
        STATS.statements += 1
        if self.transaction_spans and (conn.tx_records is not None or rec.tx_status in ("T", "E")):
            # Inside a transaction block: held until it ends, so that the transaction
            # span knows its context, its end and its outcome.
            if conn.tx_records is None:
                conn.tx_records = []
            conn.tx_records.append(rec)
            if rec.tx_status == "I" or len(conn.tx_records) >= self.max_transaction_statements:
                return self._transaction(conn, out)
            return []
        start = len(out)
        self.one(conn, rec, out)
        return [(rec, start, len(out))]

    def flush_connection(self, conn: ConnState, out: list) -> list[tuple[Statement, int, int]]:
        """The connection ended: build what a still-open transaction held."""
        if conn.tx_records:
            return self._transaction(conn, out)
        return []

    def kept(self, conn: ConnState, records: list, i: int, stop: int, out: list,
             marks: list | None = None) -> tuple[int, BaseException | None]:
        """Spans of ``records[i:stop]`` in one compiled call while their shapes are kept (``otlp.kept_run``).

        Returns the index of the first record left for :meth:`one` (a shape not kept
        yet, a context the compiled loop does not take, a statement the keep rule keeps
        when it is not sampled, ``stop``) and, when building that
        record failed, its error (its spans are not in ``out``). The spans and the ids
        drawn are what :meth:`one` would make, the sample rate's draw for new roots
        included. It runs only where a kept statement's context is the same all run long:
        no transaction span, no ``SET`` waiting for its transaction's end (a statement that
        may set a carrier is never kept, so a session carrier holds until the Python steps
        see one). ``marks``: where the spans of each record it built start in
        ``out`` (``len(out)`` before the record; a record not sampled has none), appended.
        """
        if (otlp.kept_run is None or not self.encode or conn.tx_parent is not None
                or conn.saved is not None or conn.carrier_local or type(records) is not list):
            return i, None
        rate = 1.0 if conn.presampled else self.sample_rate
        opts = ((1 if rate >= 1.0 else 0) | (0 if self.capture_literals else 2)
                | (4 if self.capture_parameters else 0))
        ctx = conn.carrier
        carrier = (None if ctx is None else
                   (ctx.trace_id, ctx.span_id, ctx.sampled, otlp.trace_state_field(ctx.tracestate)))
        i, parsed, error = otlp.kept_run(out, self._out_head, records, i, stop, conn.shapes, self._app_key(conn, None),
                                         _PHASE_GROUPS, _PHASE_PARTS["execute"][1], otlp.PARENT_FLAGS,
                                         otlp.CHILD_FLAGS, _rand.getrandbits, _rand.random, rate,
                                         self.statement_key, opts, self.keep_slow_ns if self._keeping else 0,
                                         carrier, app_key, marks)
        if parsed:
            STATS.sqlcomment_parsed += parsed
        return i, error

    def one(self, conn: ConnState, rec: Statement, out: list) -> None:
        """Append the spans of ``rec`` alone: :meth:`build` without transaction spans, groups or counting."""
        self._keep_record = self._keeping and keep_reason(rec, self.keep_slow_ns, self.keep_errors) is not None
        self._kept = None
        if rec.protocol == "extended":
            self._extended(conn, rec, out)
        else:
            self._simple(conn, rec, out)

    def _each(self, conn: ConnState, records: list, out: list) -> list[tuple[Statement, int, int]]:
        groups = []
        for rec in records:
            start = len(out)
            self.one(conn, rec, out)
            groups.append((rec, start, len(out)))
        return groups

    def _transaction(self, conn: ConnState, out: list) -> None:
        """One span for a BEGIN … COMMIT/ROLLBACK block; statements without a context of their own join it.

        Its parent is the first context carried by a statement of the block (a
        sqlcommenter comment, else the session carrier at its start); without
        any, it is a root under the sample rate. Statements that carry their own
        context keep their parent (the application's CLIENT span) and get a link
        to the transaction span.
        """
        records = conn.tx_records or []
        conn.tx_records = None
        ctx = None
        for rec in records:
            raw = rec.sql or ""
            if raw and not (rec.protocol == "extended" and rec.reused) and "/*" in raw:
                c = sqlcomment.parse(raw)
                if c is not None and c.context is not None:
                    ctx = c.context
                    break
        if ctx is None:
            ctx = conn.carrier
        if ctx is not None and not ctx.sampled:
            return self._each(conn, records, out)
        if ctx is not None:
            trace_id, parent_id, flags, tracestate = ctx.trace_id, ctx.span_id, ctx.flags, ctx.tracestate
        else:
            rate = self.sample_rate
            if rate <= 0.0 or (rate < 1.0 and _rand.random() >= rate):
                return self._each(conn, records, out)
            trace_id, parent_id, flags, tracestate = _new_id(128), None, 1, None
        tx_id = _new_id(64)
        # Statements without a context of their own join the transaction span;
        # those with one get a link to it (_links).
        conn.tx_parent = (trace_id, tx_id, flags, tracestate)
        try:
            groups = self._each(conn, records, out)
        finally:
            conn.tx_parent = None
        start = min(r.start_ns for r in records if r.start_ns) if any(r.start_ns for r in records) else 0
        end = max(r.end_ns for r in records)
        last = records[-1]
        tag = _last_tag(last)
        attrs = dict(conn.base_attrs)
        attrs[ATTR["tx_statements"]] = len(records)
        if tag:
            attrs[ATTR["tx_outcome"]] = tag.split(" ", 1)[0]
        failed = any(r.tx_status == "E" for r in records)
        open_ = last.tx_status != "I"
        if open_:
            attrs[ATTR["status"]] = "open"  # connection ended, or too many statements to hold
        status = Status(StatusCode.ERROR, "the transaction failed and was rolled back") if failed else _OK
        self._emit(out, "transaction", trace_id, tx_id, parent_id, True, flags, tracestate, _INTERNAL,
                   start, max(start, end), attrs, status)
        return groups

    # ------------------------------------------------------------- context

    def _context(self, conn: ConnState, comment, keep: str | None = None
                 ) -> tuple[int, int | None, int, str | None] | None:
        """(trace_id, parent_span_id, flags, tracestate) for a sampled statement, None when not sampled.

        ``keep``: why the statement is kept when left out (``sampling.keep_reason``); then
        it is a new root (:meth:`_keep_root`), within the rate bound.
        """
        ctx = comment.context if comment is not None else None
        if ctx is None:
            ctx = conn.carrier
        if ctx is None and conn.tx_parent is not None:
            return conn.tx_parent
        if ctx is not None:
            if not ctx.sampled:
                return self._keep_root(keep, ctx) if keep is not None else None
            return ctx.trace_id, ctx.span_id, ctx.flags, ctx.tracestate
        rate = 1.0 if conn.presampled else self.sample_rate
        if rate <= 0.0 or (rate < 1.0 and _rand.random() >= rate):
            return self._keep_root(keep, None) if keep is not None else None
        return _new_id(128), None, 1, None

    def _key_context(self, conn: ConnState, q: tuple, tracestate: str | None):
        """:meth:`_context` for a statement of a kept shape keyed by ``q`` (shape.statement_key):
        its own traceparent with the shape's ``tracestate``, else the connection's context or a
        new root; a comment's parse is counted as the full path counts it (kept_run does the same)."""
        if q[1]:
            STATS.sqlcomment_parsed += 1
            return (q[1], q[2], q[3], tracestate) if q[3] & 1 else None
        if q[4] == _KEY_TAGS:
            STATS.sqlcomment_parsed += 1
        return self._context(conn, None)

    def _keep_root(self, reason: str, carried) -> tuple | None:
        """A new root for a statement the rule keeps, or None past ``keep_rate`` a second (counted).

        Never a child of ``carried``: the application did not sample that trace, and a
        span inside it would be an orphan there. The span links to it (:meth:`_take_kept`).
        """
        now = time.monotonic()
        tokens = min(self._keep_burst, self._keep_tokens + (now - self._keep_at) * self.keep_rate)
        self._keep_at = now
        if tokens < 1.0:
            self._keep_tokens = tokens
            STATS.statements_kept_over_rate += 1
            return None
        self._keep_tokens = tokens - 1.0
        STATS.statements_kept += 1
        link = (carried.trace_id, carried.span_id, carried.flags, carried.tracestate) if carried is not None else None
        self._kept = (reason, link)
        return _new_id(128), None, 1, None

    def _take_kept(self, conn: ConnState, parent_id, attrs: dict) -> tuple:
        """The links of a statement span; marks a root the rule kept (``pgotel.kept_because``)."""
        links = _links(conn, parent_id)
        kept = self._kept
        if kept is not None:
            self._kept = None
            attrs[ATTR["kept_because"]] = kept[0]
            if kept[1] is not None:
                links = links + (kept[1],)
        return links

    def _reason(self, failed: bool, start: int, end: int) -> str | None:
        """Why the rule keeps one statement of the record being built, or None."""
        if not self._keep_record:
            return None
        if failed and self.keep_errors:
            return "error"
        if self.keep_slow_ns and start and end - start >= self.keep_slow_ns:
            return "slow"
        return None

    # ------------------------------------------------------------ builders

    def _extended(self, conn: ConnState, rec: Statement, out: list) -> None:
        shape = keyed = None
        if (self.encode and rec.status == "ok" and conn.tx_parent is None and not rec.extra and not rec.copy
                and not (self.capture_parameters and rec.params) and not self._keep_record):
            # A statement shape seen before on this connection (same text, tag, row count,
            # names): its comment, name and attributes are what they were, encoded once.
            # A text with its own traceparent is keyed without it (shape.statement_key, as
            # simple statements are): applications send a new traceparent, so a new text,
            # with every execution.
            q = (self.statement_key(rec.sql) if not rec.reused and not self.capture_literals and rec.sql
                 else None)
            if q is not None:
                shape = (q[0], None, rec.tag, rec.rows, rec.statement_name, rec.portal, self._app_key(conn, rec))
                hit = conn.shapes.get(shape)
                if hit is not None:
                    ctx = self._key_context(conn, q, hit[1])
                    if ctx is not None:
                        self._kept_extended(out, rec, hit[0], *ctx)
                    conn.end_of_statement(rec.tx_status, rec.tag)
                    return
                keyed = (shape, q, (STATS.sqlcomment_oversized, STATS.sqlcomment_malformed))
            else:
                shape = (rec.sql, rec.reused, rec.tag, rec.rows, rec.statement_name, rec.portal, self._app_key(conn, rec))
                hit = conn.shapes.get(shape)
                if hit is not None:
                    comment, parts = hit[0], hit[1]
                    if comment is not None and comment.invalid_traceparent:
                        STATS.sqlcomment_invalid_traceparent += 1
                    ctx = self._context(conn, comment)
                    if ctx is not None:
                        self._kept_extended(out, rec, parts, *ctx)
                    conn.end_of_statement(rec.tx_status, rec.tag)
                    return
        raw = rec.sql or ""
        # A statement prepared in an earlier batch must not reuse the traceparent frozen in its text.
        comment = sqlcomment.parse(raw) if raw and not rec.reused else None
        if comment is not None and comment.invalid_traceparent:
            STATS.sqlcomment_invalid_traceparent += 1
        text = comment.stripped_sql if comment is not None else raw
        ok = rec.status == "ok"
        conn.observe_set(text, ok, rec.tx_status)
        ctx = self._context(conn, comment, self._reason(rec.status == "error", rec.start_ns, rec.end_ns))
        if ctx is not None:
            # Analysed only when sampled: an unsampled statement costs its comment parse alone.
            info = sqlinfo.analyze(text) if text else None
            trace_id, parent_id, flags, tracestate = ctx
            sid = _rand.getrandbits(64) or _new_id(64)
            name = _span_name(info, rec.protocol)
            if rec.status == "prepared":
                name = f"PREPARE {name}"
            end = rec.end_ns or rec.bind_end_ns or rec.parse_end_ns or rec.start_ns
            attrs = self._attrs(conn, rec, info, text, rec.tag, rec.rows, rec.error, comment)
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
            links = self._take_kept(conn, parent_id, attrs)
            status = _status(rec.status, rec.error, attrs)
            self._emit(out, name, trace_id, sid, parent_id, True, flags, tracestate, _SERVER, rec.start_ns, end,
                       attrs, status, links)
            if shape is not None and not may_set_carrier(text):
                parts = otlp.span_parts(name, _SERVER, attrs, status)
                if keyed is None:
                    self._keep_shape(conn, shape, (comment, parts, _kept_context(comment)))
                elif _keyed_comment(keyed, raw, comment):
                    kept_ts = _tracestate_of(comment)
                    self._keep_shape(conn, shape, (parts, kept_ts, otlp.trace_state_field(kept_ts)))
            self._phases(out, rec, trace_id, flags, tracestate, sid)
        conn.end_of_statement(rec.tx_status, rec.tag)

    def _kept_extended(self, out, rec: Statement, parts: tuple, trace_id, parent_id, flags, tracestate) -> None:
        """An extended statement of a kept shape: its span from the kept parts, and its phases."""
        if otlp.statement_spans is not None and not rec.client_wait_ns:
            # compiled: the same spans, ids drawn in the same order (a client's wait, rare, is
            # the Python steps' alone)
            otlp.statement_spans(out, self._out_head, parts, _PHASE_GROUPS, rec, trace_id, parent_id,
                                 otlp.trace_state_field(tracestate), otlp.PARENT_FLAGS, otlp.CHILD_FLAGS,
                                 _rand.getrandbits)
            return
        sid = _rand.getrandbits(64) or _new_id(64)
        end = rec.end_ns or rec.bind_end_ns or rec.parse_end_ns or rec.start_ns
        out.append(self._item(otlp.encode_span_parts(
            parts, trace_id, sid, parent_id, True, tracestate, rec.start_ns, end)))
        self._phases(out, rec, trace_id, flags, tracestate, sid)

    @staticmethod
    def _keep_shape(conn: ConnState, key: tuple, value: tuple) -> None:
        shapes = conn.shapes
        if len(shapes) >= _SHAPES_MAX:
            shapes.clear()  # crude but bounded; refilled by the shapes in use
        shapes[key] = value

    def _phases(self, out, rec: Statement, trace_id, flags, tracestate, sid) -> None:
        """The phase spans of an extended-protocol statement (:func:`_phase_groups`)."""
        groups = _phase_groups(rec)
        first_row, client_wait = rec.first_row_ns, rec.client_wait_ns
        if not self.encode:
            for mask, exact, start, end in groups:
                attrs = _phase_attrs(mask, exact, start, first_row, client_wait)
                self._emit(out, "+".join(_PHASE_NAMES[mask]), trace_id, _new_id(64), sid, False, flags, tracestate,
                           _INTERNAL, start, end, attrs, _OK)
            return
        # The same spans encoded in one call; ids drawn in the same order as above.
        fields: list = []
        for mask, exact, start, end in groups:
            parts = (_PHASE_GROUPS[mask][exact] if not ((first_row or client_wait) and mask & 4)
                     else _group_parts(mask, exact, start, first_row, client_wait))
            fields += (parts, _rand.getrandbits(64) or _new_id(64), start, end)
        if fields:
            otlp.encode_children(out, self._out_head, trace_id, sid, tracestate, *fields)

    def _simple(self, conn: ConnState, rec: Statement, out: list) -> None:
        raw = rec.sql or ""
        results: list[Completion] = rec.results or []
        keyed = None  # (key, statement_key's answer, sqlcomment counts before the parse)
        setter = None  # the key of a statement that may set a context channel
        if (self.encode and not self.capture_literals and len(results) == 1 and rec.status == "ok"
                and rec.protocol == "simple" and results[0].error is None and not rec.copy and not rec.extra
                and conn.tx_parent is None and not self._keep_record):
            # One statement with values inline, and a traceparent, other tags or no comment:
            # a text of a shape seen before on this connection is spanned from its key alone
            # (shape.statement_key), without parsing its comment or its SQL again.
            q = self.statement_key(raw)
            if q is not None:
                res = results[0]
                key = (q[0], res.tag, res.rows, self._app_key(conn, rec))
                hit = conn.shapes.get(key)
                if hit is not None:
                    self._kept_simple(out, conn, rec, res, hit[0], self._key_context(conn, q, hit[1]))
                    return
                keyed = (key, q, (STATS.sqlcomment_oversized, STATS.sqlcomment_malformed))
            elif "/*" not in raw and may_set_carrier(raw):
                # A statement that may set a context channel, without a comment (OpenTelemetry
                # JS's pg sends SET application_name = '00-…' before each statement): its
                # span is its shape's too, and the channel is set from its own text each time.
                code = blank_code(raw)
                if code is not None:
                    res = results[0]
                    setter = (_SETTER, code, res.tag, res.rows, self._app_key(conn, rec))
                    hit = conn.shapes.get(setter)
                    if hit is not None:
                        conn.observe_set(raw, True, rec.tx_status)
                        self._kept_simple(out, conn, rec, res, hit, self._context(conn, None))
                        return
        comment = sqlcomment.parse(raw) if raw else None
        if comment is not None and comment.invalid_traceparent:
            STATS.sqlcomment_invalid_traceparent += 1
        text = comment.stripped_sql if comment is not None else raw
        infos = sqlinfo.analyze_many(text) if text else []
        shape = None
        if (self.encode and not self.capture_literals and len(infos) == 1 and len(results) == 1
                and rec.status == "ok" and rec.protocol == "simple" and results[0].error is None and not rec.copy
                and not rec.extra and conn.tx_parent is None and not may_set_carrier(text)
                and not self._keep_record):
            # One statement of a shape seen before on this connection: values inline
            # differ, but its analysis (shared by shape), and so its name and
            # attributes, do not: encoded once.
            res, info = results[0], infos[0]
            shape = (id(info), res.tag, res.rows, _other_tags(comment), self._app_key(conn, rec))
            hit = conn.shapes.get(shape)
            if hit is not None and hit[0] is info:
                self._kept_simple(out, conn, rec, res, hit[1], self._context(conn, comment))
                return
        if not results and rec.status == "incomplete":
            results = [Completion(rec.end_ns, None, 0, None)]
        row_result = _first_row_result(rec, results)
        # the client's wait: on the statement whose rows were flowing, else the last
        wait_result = row_result if row_result >= 0 else len(results) - 1
        start = rec.start_ns
        for i, res in enumerate(results):
            info = infos[i] if i < len(infos) else (infos[-1] if infos else None)
            stmt_text = _statement_text(info, text, len(infos))
            ok = res.error is None and rec.status != "incomplete"
            last = i == len(results) - 1
            tx = rec.tx_status if last else "T"
            conn.observe_set(stmt_text if info is None else _raw_piece(text, i, len(infos)) or stmt_text, ok, tx)
            ctx = self._context(conn, comment, self._reason(res.error is not None, start, res.end_ns or rec.end_ns))
            if ctx is not None:
                trace_id, parent_id, flags, tracestate = ctx
                sid = _rand.getrandbits(64) or _new_id(64)
                name = _span_name(info, rec.protocol)
                attrs = self._attrs(conn, rec, info, stmt_text, res.tag, res.rows, res.error, comment)
                attrs[ATTR["protocol"]] = rec.protocol
                if rec.copy and last:
                    attrs[ATTR["copy"]] = rec.copy
                if last and rec.extra and "wal_lsn" in rec.extra:
                    attrs[ATTR["wal_lsn"]] = rec.extra["wal_lsn"]
                status = "error" if res.error else ("incomplete" if rec.status == "incomplete" and last else "ok")
                if status == "incomplete":
                    attrs[ATTR["status"]] = status
                end = res.end_ns or rec.end_ns
                links = self._take_kept(conn, parent_id, attrs)
                span_status = _status(status, res.error, attrs)
                self._emit(out, name, trace_id, sid, parent_id, True, flags, tracestate, _SERVER, start, end,
                           attrs, span_status, links)
                if setter is not None and len(infos) == 1:
                    self._keep_shape(conn, setter, otlp.span_parts(name, _SERVER, attrs, span_status))
                if shape is not None:
                    parts = otlp.span_parts(name, _SERVER, attrs, span_status)
                    self._keep_shape(conn, shape, (info, parts))
                    if keyed is not None and _keyed_comment(keyed, raw, comment):
                        # (the comment's tracestate: the span's own, from a session carrier, is not kept)
                        kept_ts = _tracestate_of(comment)
                        self._keep_shape(conn, keyed[0], (parts, kept_ts, otlp.trace_state_field(kept_ts)))
                self._phase(out, "execute", trace_id, flags, tracestate, sid, start, end, True,
                            rec.first_row_ns if i == row_result else 0, rec.client_wait_ns if i == wait_result else 0)
            start = res.end_ns or start
            if last:
                conn.end_of_statement(rec.tx_status, res.tag)

    def _kept_simple(self, out, conn: ConnState, rec: Statement, res: Completion, parts: tuple, ctx) -> None:
        """A simple statement of a kept shape: its span from the kept parts, and its execute phase."""
        if ctx is not None:
            trace_id, parent_id, flags, tracestate = ctx
            start, end = rec.start_ns, res.end_ns or rec.end_ns
            first_row = rec.first_row_ns if _first_row_result(rec, [res]) == 0 else 0
            if otlp.simple_spans is not None and not rec.client_wait_ns:
                # compiled: the same two spans, ids drawn in the same order (no client's wait)
                otlp.simple_spans(out, self._out_head, parts, _PHASE_PARTS["execute"][1], trace_id, parent_id,
                                  otlp.trace_state_field(tracestate), otlp.PARENT_FLAGS, otlp.CHILD_FLAGS,
                                  _rand.getrandbits, start, end, first_row)
                conn.end_of_statement(rec.tx_status, res.tag)
                return
            sid = _rand.getrandbits(64) or _new_id(64)
            out.append(self._item(otlp.encode_span_parts(
                parts, trace_id, sid, parent_id, True, tracestate, start, end)))
            self._phase(out, "execute", trace_id, flags, tracestate, sid, start, end, True, first_row,
                        rec.client_wait_ns)
        conn.end_of_statement(rec.tx_status, res.tag)

    # ------------------------------------------------------------- helpers

    def _attrs(self, conn: ConnState, rec: Statement, info, text: str, tag, rows: int, error, comment) -> dict:
        attrs = dict(conn.base_attrs)
        if info is not None:
            if info.summary:
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
        app = self._app(conn, rec)
        if app and not _holds_context(app):
            attrs[ATTR["application_name"]] = app
        return attrs

    @staticmethod
    def _app(conn: ConnState, rec: Statement | None) -> str | None:
        """The application_name a statement ran under: what its record says, else the connection's.

        Kept shapes are keyed by :meth:`_app_key`'s form of it.
        """
        app = rec.application_name if rec is not None else None
        if app is None:
            session = conn.info.session
            app = session.server_params.get("application_name") or session.startup_params.get("application_name")
        return app

    @classmethod
    def _app_key(cls, conn: ConnState, rec: Statement | None) -> str | None:
        """:meth:`_app` as a key of kept shapes (:func:`app_key`)."""
        return app_key(cls._app(conn, rec))

    def _phase(self, out, name, trace_id, flags, tracestate, parent_id, start, end, exact, first_row=0,
               client_wait=0) -> None:
        """One phase span; ``first_row``: the first row's arrival, ``client_wait``: the client's wait
        (execute only), 0 for none."""
        if self.encode:
            parts = (_PHASE_PARTS[name][1 if exact else 0] if not (first_row or client_wait)
                     else _group_parts(_PHASE_MASKS[name], bool(exact), start, first_row, client_wait))
            out.append(self._item(otlp.encode_span_parts(
                parts, trace_id, _rand.getrandbits(64) or _new_id(64),
                parent_id, False, tracestate, start, max(start, end))))
            return
        self._emit(out, name, trace_id, _new_id(64), parent_id, False, flags, tracestate, _INTERNAL,
                   start, max(start, end), _phase_attrs(_PHASE_MASKS[name], bool(exact), start, first_row, client_wait),
                   _OK)

    def _emit(self, out, name, trace_id, span_id, parent_id, parent_remote, flags, tracestate, kind,
              start, end, attrs, status, links=()) -> None:
        """Append one span, as a ReadableSpan or encoded (``encode``): the one place spans are made.

        ``links`` are (trace_id, span_id, flags, tracestate) of local spans.
        """
        if self.encode:
            out.append(self._item(otlp.encode_span(
                name, trace_id, span_id, parent_id, parent_remote, tracestate, kind, start, end, attrs, status, links)))
            return
        ctx = _span_context(trace_id, span_id, flags, tracestate)
        parent = _span_context(trace_id, parent_id, flags, tracestate, remote=parent_remote) if parent_id else None
        if links:
            links = tuple(Link(_span_context(*link)) for link in links)
        out.append(_span(name, ctx, parent, kind, start, end, attrs, self.resource, status, links))


_OK = Status(StatusCode.UNSET)
_INTERNAL = SpanKind.INTERNAL
_SERVER = SpanKind.SERVER


def _kept_context(comment) -> tuple | bool | None:
    """A kept extended statement's context as the compiled loop (``otlp.kept_run``) takes it.

    ``(trace_id, span_id, trace_state_field)`` for a sampled context, ``()`` for an
    unsampled one (no spans), ``False`` for none (a new root under the sample rate: the
    loop runs only on connections without a carrier or transaction parent), ``None`` when
    the Python steps must see the statement (an invalid traceparent is counted there).
    """
    if comment is None:
        return False
    if comment.invalid_traceparent:
        return None
    ctx = comment.context
    if ctx is None:
        return False
    if not ctx.sampled:
        return ()
    return (ctx.trace_id, ctx.span_id, otlp.trace_state_field(ctx.tracestate))


def _tracestate_of(comment) -> str | None:
    """The tracestate a parsed comment carries with its context (None without either)."""
    return comment.context.tracestate if comment is not None and comment.context is not None else None


def _keyed_comment(keyed: tuple, raw: str, comment) -> bool:
    """Whether the comment found in ``raw`` is the one its statement key stands for.

    The key (shape.statement_key) found the traceparent where a parse would; this checks
    that the full parse agrees (the tag, the context) and counted nothing as malformed or
    oversized, so that a statement spanned from the key alone misses no counter either.
    A key of a text without a comment (trace id 0) stands for no comment; one of a comment
    without a traceparent (value start _KEY_TAGS), for a parsed comment without a context.
    """
    _, (_, trace_id, span_id, flags, vs), counts = keyed
    clean = counts == (STATS.sqlcomment_oversized, STATS.sqlcomment_malformed)
    if not trace_id:
        if vs == _KEY_TAGS:
            return (comment is not None and comment.context is None and not comment.invalid_traceparent
                    and "traceparent" not in comment.tags and clean)
        return comment is None and clean
    ctx = comment.context if comment is not None else None
    return (ctx is not None and not comment.invalid_traceparent
            and (ctx.trace_id, ctx.span_id, ctx.flags) == (trace_id, span_id, flags)
            and comment.tags.get("traceparent") == raw[vs:vs + 55]
            and counts == (STATS.sqlcomment_oversized, STATS.sqlcomment_malformed))


#: shape.statement_key's value start for a text whose comment holds tags but no traceparent.
_KEY_TAGS = -2

#: The first item of the kept-shape key of a statement that may set a context channel (SpanBuilder._simple).
_SETTER = "may set a channel"


def _holds_context(app: str) -> bool:
    """Whether an application_name is a traceparent: context (a channel), not a name."""
    if len(app) < 55 or app[2:3] != "-":
        return False
    held = _CONTEXT_APPS.get(app)
    if held is None:
        # A statement's value is asked for several times (its attributes, its shape's
        # key, the compiled loop's key): parsed once.
        if len(_CONTEXT_APPS) >= 64:
            _CONTEXT_APPS.clear()
        held = _CONTEXT_APPS[app] = channel_context(_APP, app) is not None
    return held


#: _holds_context's answers for the last application_names that looked like a traceparent.
_CONTEXT_APPS: dict[str, bool] = {}


def app_key(app: str | None) -> str | None:
    """An application_name as a key of kept shapes: None for one that holds a context.

    Such a value is no name (no attribute, see ``SpanBuilder._attrs``), so the shapes
    of statements under it are those without a name; applications that set a new
    traceparent in application_name before each statement (OpenTelemetry JS's pg
    instrumentation) keep hitting them. The compiled loop (``otlp.kept_run``) calls
    this for each new value a record carries.
    """
    return None if app is not None and _holds_context(app) else app


def _links(conn: ConnState, parent_id: int | None) -> tuple:
    """A statement inside a transaction span whose context is its own links to the transaction span."""
    tx = conn.tx_parent
    if tx is None or parent_id is None or parent_id == tx[1]:
        return ()
    return (tx,)
_EXACT = ATTR["exact"]
_PHASES = ATTR["phases"]
# A run of phases as a bit mask (parse 1, plan 2, execute 4) -> the names it holds, in wire order.
_PHASE_NAMES: tuple[tuple[str, ...], ...] = tuple(
    tuple(name for bit, name in ((1, "parse"), (2, "plan"), (4, "execute")) if mask & bit) for mask in range(8))
_SINGLE_PHASES = frozenset((1, 2, 4))


_PHASE_MASKS = {"parse": 1, "plan": 2, "execute": 4}
_FIRST_ROW = ATTR["first_row"]
_CLIENT_WAIT = ATTR["client_wait"]


def _phase_attrs(mask: int, exact: bool, start: int = 0, first_row: int = 0, client_wait: int = 0) -> dict[str, Any]:
    """A phase span's attributes; a span holding execute gets the first row's offset from its start
    and the client's wait. (The compiled encoder appends the first row's offset to the pre-encoded
    others, so it comes after them here too; a record with a client's wait is never its.)"""
    attrs: dict[str, Any] = {_EXACT: exact}
    if mask not in _SINGLE_PHASES:
        attrs[_PHASES] = _PHASE_NAMES[mask]
    if mask & 4:
        if first_row:
            attrs[_FIRST_ROW] = max(0, first_row - start) / 1e6
        if client_wait:
            attrs[_CLIENT_WAIT] = client_wait / 1e6
    return attrs


def _group_parts(mask: int, exact: bool, start: int = 0, first_row: int = 0, client_wait: int = 0) -> tuple:
    return otlp.span_parts("+".join(_PHASE_NAMES[mask]), _INTERNAL,
                           _phase_attrs(mask, exact, start, first_row, client_wait), _OK)


def _first_row_result(rec: Statement, results: list) -> int:
    """Which of a simple Query's results its first row belongs to: the first that returned rows
    (or copied out); -1 for none. (The compiled loop, ``otlp.kept_run``, asks the same of a
    lone result: rows.)"""
    if rec.first_row_ns:
        for i, res in enumerate(results):
            if res.rows or rec.copy in ("out", "both") and (res.tag or "").startswith("COPY"):
                return i
    return -1


# Encoded parts of the phase spans by mask: (inexact, exact); index 0 unused.
# _phase_groups and otlp.statement_spans index it so.
_PHASE_GROUPS: tuple = (None,) + tuple(
    (_group_parts(mask, False), _group_parts(mask, True)) for mask in range(1, 8))
# name -> (inexact, exact), for the lone execute of simple statements
_PHASE_PARTS: dict[str, tuple[tuple, tuple]] = {"parse": _PHASE_GROUPS[1], "plan": _PHASE_GROUPS[2],
                                                "execute": _PHASE_GROUPS[4]}
# The first row's attribute of the value 0.0: the compiled encoder writes each offset over it.
_FIRST_ROW_FIELD = otlp.span_parts("execute", _INTERNAL, {_FIRST_ROW: 0.0}, None)[2]
if otlp.statement_spans is not None:
    otlp.configure_records(Statement, Completion, STATEMENT_LAYOUT, COMPLETION_LAYOUT, _FIRST_ROW_FIELD)


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


def _phase_groups_py(rec: Statement) -> list[tuple[int, bool, int, int]]:
    """The phase spans of an extended-protocol statement: (mask, exact, start, end) each.

    The twin of the compiled rule (``_otlpenc.c``'s ``group_phases``, which the
    compiled span loop applies), for a build without it: :data:`_phase_groups`
    is the one or the other, and tests/test_otlp_compiled.py holds them equal.

    A boundary between two phases counts as observed only when the server
    flushed right after the earlier phase's answer (``*_exact``) and that
    answer arrived in an earlier read than the next phase's: answers that the
    proxy read together (the server held them back, the proxy was busy, the
    network coalesced them) carry one arrival time, which is no boundary.
    Phases whose boundary was not observed make one span over their joint
    interval (``parse+plan+execute``, mask 7); ``exact`` says whether its end
    was observed (its start is the statement's start or an observed boundary).
    Masks: parse 1, plan 2, execute 4 (:data:`_PHASE_NAMES`).
    """
    parse_start, parse_end, bind_end, end = rec.parse_start_ns, rec.parse_end_ns, rec.bind_end_ns, rec.end_ns
    later = bind_end or end
    parse_seen = rec.parse_exact and (not later or parse_end < later)
    bind_seen = rec.bind_exact and (not end or bind_end < end)
    phases = []  # (bit, start, end, end observed)
    if parse_start and parse_end:
        phases.append((1, parse_start, parse_end, parse_seen))
    if rec.bind_start_ns and bind_end:
        phases.append((2, rec.bind_start_ns if rec.bind_start_ns > parse_end else parse_end, bind_end, bind_seen))
    if rec.exec_start_ns and end and rec.status != "skipped":
        phases.append((4, rec.exec_start_ns if rec.exec_start_ns > bind_end else bind_end, end, rec.exec_exact))
    groups = []
    mask = first = 0
    for bit, start, stop, seen in phases:
        if not mask:
            first = start
        mask |= bit
        if seen:
            groups.append((mask, True, first, stop if stop > first else first))
            mask = 0
    if mask:
        groups.append((mask, False, first, stop if stop > first else first))
    return groups


_phase_groups = _phase_groups_py
if otlp.phase_groups is not None:
    _phase_groups = otlp.phase_groups


def _span_context(trace_id: int, span_id: int, flags: int, tracestate: str | None, remote: bool = False) -> SpanContext:
    ts = otlp.parse_trace_state(tracestate) if tracestate else _NO_TRACE_STATE
    valid = 0 < trace_id <= _TRACE_ID_MAX and 0 < span_id <= _SPAN_ID_MAX
    return _new_context(SpanContext, (trace_id, span_id, remote, _FLAGS[flags & 0xFF], ts, valid))


# SpanContext is a tuple subclass whose __new__ validates and fills defaults on
# every call; the builder's ids are already valid, so it builds the tuple
# directly, once checked (below) to be what SpanContext(...) builds.
_new_context = tuple.__new__
_TRACE_ID_MAX = 2**128 - 1
_SPAN_ID_MAX = 2**64 - 1
_FLAGS = tuple(TraceFlags(i) for i in range(256))
_NO_TRACE_STATE = SpanContext(1, 1, False).trace_state
def _by_constructor(cls, fields: tuple) -> SpanContext:
    return cls(fields[0], fields[1], is_remote=fields[2], trace_flags=fields[3], trace_state=fields[4])


def _checked_context_builder() -> None:
    global _new_context
    sample = SpanContext(7, 9, True, TraceFlags(1), TraceState([("k", "v")]))
    try:
        same = tuple(sample) == tuple(tuple.__new__(SpanContext, (7, 9, True, TraceFlags(1), sample.trace_state, True)))
    except TypeError:
        same = False
    if not same:  # another API version lays SpanContext out differently
        _new_context = _by_constructor


_checked_context_builder()


def _span(name, ctx, parent, kind, start, end, attrs, resource, status, links=()) -> ReadableSpan:
    return ReadableSpan(
        name=name,
        context=ctx,
        parent=parent,
        resource=resource,
        attributes=attrs,
        links=links,
        kind=kind,
        status=status,
        start_time=start,
        end_time=end,
        instrumentation_scope=SCOPE,
    )


def _last_tag(rec: Statement) -> str | None:
    if rec.protocol == "extended":
        return rec.tag
    results = rec.results or []
    return results[-1].tag if results else None
