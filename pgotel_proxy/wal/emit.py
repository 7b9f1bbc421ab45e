"""otelwal emission: the rules that put a traced write transaction's context into the WAL.

A :class:`WalInjector` is attached to one proxied :class:`~pgotel_proxy.protocol.Session`
(``session.injector``) and decides, synchronously and before the client's bytes are
forwarded, where to splice ``pg_logical_emit_message(true, '<prefix>', '{"traceparent": ...}')``
into the client's stream so that it runs inside the client's own transaction, before
its commit:

* explicit transaction block (``T``): a simple Query in front of the client's
  ``COMMIT`` / ``END`` (simple Query), or Parse/Bind/Execute/Close in front of the
  first message of an extended ``COMMIT``; only when nothing is in flight, so the
  known transaction status is the true one, and never in a failed transaction;
* autocommit simple Query whose statements write: the emit becomes the first
  statement of the same Query (one implicit transaction) and its answers, up to
  its CommandComplete, are removed;
* autocommit extended batch that writes: Parse/Bind/Execute/Close of a named
  statement and portal ``pgotel_otelwal_<n>`` just before the client's Sync.

Only transactions that write (INSERT, UPDATE, DELETE, MERGE, COPY FROM, SELECT
INTO or a data-modifying WITH, and calls of the configured functions) with a
SAMPLED context get a message: a sqlcommenter ``traceparent`` on the writing
statement, else the session's context channels (``pgotel.traceparent``,
``pg_tracing.trace_context``, ``application_name`` from the start-up message or
a ``SET``), followed by :class:`~pgotel_proxy.tracing.carrier.SessionCarrier`,
the same rules and order the span builder uses. The first such statement's
context is the one written. Statement text without ``traceparent`` while no
channel holds a context is never parsed: untraced traffic costs a substring test.

Every answer the injected messages cause is removed by the session, so the client
receives the bytes it would have received without emission. An error they cause is
passed to the client instead (its transaction is then lost, and it must know) and
emission stops for the session.

The emission check: the injector asks the server once per session whether
emission is possible (the function exists, may be executed, wal_level is
logical, not a standby); if not, emission is off for that session with one log
line and ``wal_emission_disabled`` counted. The check is part of the connection
set-up: it is sent on the session's own connection right after the server's
first ReadyForQuery, and the client's first ReadyForQuery is held until it is
answered, so a client's first request always finds the check settled. That
costs one round trip to the server once per connection, and nothing per
statement. A side connection would save no time (it must itself be opened and
authenticated) and could not give the right answer: the privilege belongs to
the session's role, and the proxy holds no password to log in as it. The
messages of the start-up itself (password, SASL, GSS) are not requests and are
not looked at. Decisions are taken only when nothing is in flight, so never
while the check is: a client that sends requests before its first
ReadyForQuery gets no message for those.

Not covered (no message, the transaction is untouched): writes whose Query or
batch is pipelined behind unanswered requests while in autocommit, an explicit
COMMIT sent while other requests are in flight, and a carrier ``SET`` still in
flight when the write is sent.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from functools import lru_cache

from .. import sqlcomment
from ..protocol.events import Statement
from ..protocol.kinds import (
    FRONTEND_BIND,
    FRONTEND_CLOSE,
    FRONTEND_COPY_DONE,
    FRONTEND_COPY_FAIL,
    FRONTEND_EXECUTE,
    FRONTEND_PARSE,
    FRONTEND_QUERY,
    FRONTEND_SYNC,
    TARGET_STATEMENT,
)
from ..protocol.messages import query_message, typed_message
from ..stats import STATS
from ..tracing.carrier import SessionCarrier
from ..tracing.sampling import may_set_carrier
from ..tracing.sqlscan import guess_many

__all__ = ["WalInjector", "CHECK_SQL", "emit_sql", "carrier_json"]

log = logging.getLogger("pgotel_proxy.wal")

_UINT16 = struct.Struct("!H")
_UINT32 = struct.Struct("!I")

#: One row, one boolean column: can this session emit messages that logical decoding will see?
CHECK_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_proc"
    " WHERE proname = 'pg_logical_emit_message' AND pronamespace = 'pg_catalog'::regnamespace"
    " AND pg_catalog.has_function_privilege(oid, 'EXECUTE'))"
    " AND pg_catalog.current_setting('wal_level') = 'logical'"
    " AND NOT pg_catalog.pg_is_in_recovery()"
)

_EMIT_PARAM_SQL = "SELECT pg_catalog.pg_logical_emit_message(true, $1::text, $2::text)"

# Statement kinds for the transaction bookkeeping.
_TX_BEGIN = frozenset(("BEGIN", "START TRANSACTION", "START"))
_TX_END = frozenset(("COMMIT", "END", "ROLLBACK", "ABORT", "PREPARE TRANSACTION", "COMMIT PREPARED", "ROLLBACK PREPARED"))
_TX_COMMIT = frozenset(("COMMIT", "END"))
_TX_OTHER = frozenset(("SAVEPOINT", "RELEASE", "RELEASE SAVEPOINT", "ROLLBACK TO", "SET TRANSACTION"))
_WRITE_OPS = frozenset(("INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "SELECT", "WITH", "VALUES", "TABLE"))
_LEAD = re.compile(r"\s*(?:/\*.*?\*/\s*)*([A-Za-z]+)", re.S)


def _quote(text: str) -> str:
    # E'' strings treat backslashes the same whatever standard_conforming_strings says.
    return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def carrier_json(traceparent: str, tracestate: str | None) -> str:
    """The message content: the W3C carrier as a JSON object."""
    doc = {"traceparent": traceparent}
    if tracestate:
        doc["tracestate"] = tracestate
    return json.dumps(doc, separators=(",", ":"))


def emit_sql(prefix: str, content: str) -> str:
    """The emit statement with its arguments as literals (simple protocol)."""
    return f"SELECT pg_catalog.pg_logical_emit_message(true, {_quote(prefix)}, {_quote(content)})"


def _read_statements(sql: str) -> tuple[tuple[str, bool], ...]:
    return tuple(((info.operation or "").upper(), info.is_write) for info in guess_many(sql))


_read_cached = lru_cache(maxsize=1024)(_read_statements)
_CACHE_MAX_CHARS = 4096  # longer texts are read every time: the cache stays small


def _statements(sql: str) -> tuple[tuple[str, bool], ...]:
    """(operation upper-cased, writes) per statement of ``sql``.

    Read without a parser (tracing.sqlscan): this runs in the relay, which
    never loads pglast. Commit texts and an application's traced writes
    repeat, hence the cache.
    """
    return _read_cached(sql) if len(sql) <= _CACHE_MAX_CHARS else _read_statements(sql)


class WalInjector:
    """Per-session otelwal emission decisions; see the module docstring."""

    def __init__(self, prefix: str = "otelwal", writing_functions=(), *, peer: str = "",
                 startup_application_name: str | None = None) -> None:
        self.prefix = prefix
        self.peer = peer
        names = [re.escape(f.strip()) for f in writing_functions if f and f.strip()]
        self._func_re = re.compile(r"(?<![\w$])(?:\"?\w+\"?\.)?\"?(?:" + "|".join(names) + r")\"?\s*\(", re.I) if names else None
        # "checking" until the server answered CHECK_SQL, then "on" or "off".
        self.state = "checking"
        self._check = {}
        self._carrier = SessionCarrier(startup_application_name)
        self._tx_ctx: tuple[str, str | None] | None = None  # context of the open transaction's first traced write
        self._batch_open = False
        self._batch_first = False  # the message being looked at is the first of its batch
        self._batch_idle_tx = ""  # tx status when the batch began with nothing in flight, else ""
        self._n = 0

    # ------------------------------------------------------------ start-up

    def start(self, session) -> bytes:
        """The check query to send upstream when the session becomes ready (its answer is removed)."""
        holder = Statement("simple", None)
        holder.results = []
        holder.extra = self._check
        session.inject_request("query", holder)
        return query_message(CHECK_SQL)

    def _enabled(self) -> bool:
        state = self.state
        if state == "checking":
            ok = self._check.get("row") == "t"
            self.state = state = "on" if ok else "off"
            if not ok:
                self._disable("pg_logical_emit_message is not usable for this session (no privilege, "
                              "wal_level is not logical, or a standby)")
        return state == "on"

    def _disable(self, why: str) -> None:
        self.state = "off"
        STATS.wal_emission_disabled += 1
        log.warning("client %s: otelwal emission off for this session: %s", self.peer, why)

    def injected_error(self, session, fields: dict) -> None:
        """An emission failed on the server (the client has been told): stop for this session."""
        if self.state == "on":
            self._disable(f"the server refused the emit: {fields.get('C', '')} {fields.get('M', '')}")

    # --------------------------------------------------- carrier (SET ...)

    def statements(self, records) -> None:
        """Finished records of this session, in order: follow the context channels they set."""
        carrier = self._carrier
        for rec in records:
            extra = rec.extra
            if extra is not None and "row" in extra:
                # The emit's answer (pg_logical_emit_message returns the message's LSN).
                extra["wal_lsn"] = extra.pop("row")
                extra.pop("position_shift", None)
            sql = rec.sql or ""
            if rec.protocol == "simple":
                results = rec.results or []
                tag = results[-1].tag if results else None
                if sql and may_set_carrier(sql):
                    c = sqlcomment.parse(sql)
                    text = c.stripped_sql if c is not None else sql
                    pieces = [p for p in text.split(";") if p.strip()] or [text]
                    for i, res in enumerate(results):
                        piece = pieces[i] if i < len(pieces) else pieces[-1]
                        tx = rec.tx_status if i == len(results) - 1 else "T"
                        carrier.observe_set(piece, res.error is None and rec.status == "ok", tx)
                carrier.end_of_statement(rec.tx_status, tag)
            else:
                if sql and not rec.reused and may_set_carrier(sql):
                    c = sqlcomment.parse(sql)
                    carrier.observe_set(c.stripped_sql if c is not None else sql, rec.status == "ok", rec.tx_status)
                carrier.end_of_statement(rec.tx_status, rec.tag)

    # ------------------------------------------------------------ decisions

    def _context(self, sql: str, comment_ok: bool) -> tuple[str, str | None] | None:
        """The sampled context a statement carries: its own traceparent comment, else the carrier."""
        if comment_ok and "traceparent" in sql:
            c = sqlcomment.parse(sql)
            if c is not None and c.context is not None:
                ctx = c.context
                if not ctx.sampled:
                    return None
                ts = ctx.tracestate or c.tags.get("tracestate")
                return ctx.traceparent(), ts if ts and sqlcomment.valid_tracestate(ts) else None
        ctx = self._carrier.carrier
        if ctx is not None and ctx.sampled:
            return ctx.traceparent(), ctx.tracestate
        return None

    def _classify(self, sql: str) -> list[str]:
        """One word per statement: "begin", "end", "commit", "other_tx", "write" or ""."""
        stripped = sql
        if "/*" in sql:
            c = sqlcomment.parse(sql)
            if c is not None:
                stripped = c.stripped_sql
        out = []
        func_re = self._func_re
        for op, is_write in _statements(stripped):
            if op in _TX_BEGIN:
                out.append("begin")
            elif op in _TX_COMMIT:
                out.append("commit")
            elif op in _TX_END:
                out.append("end")
            elif op in _TX_OTHER or op.startswith("ROLLBACK"):
                out.append("other_tx")
            elif is_write and op in _WRITE_OPS:
                out.append("write")
            elif func_re is not None and func_re.search(stripped):
                out.append("write")
            else:
                out.append("")
        return out

    def _is_commit(self, sql: str | None) -> bool:
        if not sql:
            return False
        m = _LEAD.match(sql)
        if m is None or m.group(1).upper() not in ("COMMIT", "END"):
            return False
        kinds = self._classify(sql)
        return kinds == ["commit"]

    def before(self, session, typ: int, buf, start: int, end: int):
        """Called by the session for every whole client message; see ``Session.inject_request``."""
        if not session.ready:
            # Password, SASL or GSS answers of the start-up: not requests, and no batch opens with them.
            return None
        if typ == FRONTEND_COPY_DONE or typ == FRONTEND_COPY_FAIL:
            return None  # CopyDone / CopyFail belong to the Query that started the COPY
        if not self._batch_open:
            self._batch_open = self._batch_first = True
            self._batch_idle_tx = session.tx_status if not session.answers_due else ""
            if self._batch_idle_tx == "I":
                self._tx_ctx = None  # whatever was open before has ended
        else:
            self._batch_first = False
        if typ == FRONTEND_QUERY:
            self._batch_open = False
            return self._on_query(session, buf, start, end)
        if typ == FRONTEND_SYNC:
            self._batch_open = False
            return self._on_sync(session)
        if (
            (typ == FRONTEND_PARSE or typ == FRONTEND_BIND)
            and self._batch_first
            and self._tx_ctx is not None
            and self._batch_idle_tx == "T"
        ):
            return self._on_extended_commit(session, typ, buf, start, end)
        return None

    def _on_query(self, session, buf, start: int, end: int):
        idle_tx = self._batch_idle_tx
        has_tp = buf.find(b"traceparent", start, end) >= 0
        if not has_tp and self._carrier.carrier is None and self._tx_ctx is None:
            return None  # the hot path: untraced, nothing open
        sql = bytes(buf[start : end - 1]).decode("utf-8", "replace")
        if self._tx_ctx is not None and idle_tx == "T" and self._is_commit(sql):
            ctx, self._tx_ctx = self._tx_ctx, None
            if not self._enabled():
                return None
            extra: dict = {}
            holder = Statement("simple", None)
            holder.results = []
            holder.extra = extra
            session.inject_request("query", holder, errors_pass=True)
            STATS.wal_messages_emitted += 1
            return query_message(emit_sql(self.prefix, carrier_json(*ctx))), None, extra
        ctx = self._context(sql, True)
        if ctx is None and self._tx_ctx is None:
            return None
        kinds = self._classify(sql)
        if idle_tx == "I" and ctx is not None and "write" in kinds and not any(
            k in ("begin", "commit", "end", "other_tx") for k in kinds
        ):
            # One implicit transaction: the emit goes first, inside it.
            if not self._enabled():
                return None
            head = emit_sql(self.prefix, carrier_json(*ctx)) + ";"
            # Error positions in the client's text move by the length of ours (in characters).
            extra = {"position_shift": len(head)}
            holder = Statement("simple", None)
            holder.extra = extra
            session.inject_request("prefix", holder, errors_pass=True)
            STATS.wal_messages_emitted += 1
            return b"", query_message(head + sql), extra
        self._follow(kinds, ctx)
        return None

    def _follow(self, kinds: list[str], ctx) -> None:
        """Transaction bookkeeping for statements that were not given a message now."""
        for k in kinds:
            if k == "begin" or k == "commit" or k == "end":
                self._tx_ctx = None
            elif k == "write" and ctx is not None and self._tx_ctx is None:
                self._tx_ctx = ctx

    def _on_sync(self, session):
        batch = session.current_batch
        if not batch or (self._carrier.carrier is None and self._tx_ctx is None
                         and not any(r.sql and "traceparent" in r.sql for r in batch)):
            return None
        first_ctx = None
        last_write = None
        txctl = False
        for rec in batch:
            if not rec.exec_start_ns or not rec.sql:
                continue
            kinds = self._classify(rec.sql)
            ctx = self._context(rec.sql, not rec.reused) if "write" in kinds else None
            if any(k in ("begin", "commit", "end", "other_tx") for k in kinds):
                txctl = True
            if "write" in kinds and ctx is not None:
                last_write = rec
                if first_ctx is None:
                    first_ctx = ctx
            self._follow(kinds, ctx)
        if first_ctx is None or txctl or self._batch_idle_tx != "I":
            return None
        self._tx_ctx = None
        if not self._enabled():
            return None
        extra: dict = {}
        last_write.extra = extra
        STATS.wal_messages_emitted += 1
        return self._extended_emit(session, first_ctx, extra), None, None

    def _on_extended_commit(self, session, typ: int, buf, start: int, end: int):
        if typ == FRONTEND_PARSE:
            name_end = buf.index(0, start)
            q_end = buf.index(0, name_end + 1)
            sql = bytes(buf[name_end + 1 : q_end]).decode("utf-8", "replace")
        else:
            portal_end = buf.index(0, start)
            stmt = bytes(buf[portal_end + 1 : buf.index(0, portal_end + 1)]).decode("utf-8", "replace")
            sql = session.prepared_text(stmt)
        if not self._is_commit(sql):
            return None
        ctx, self._tx_ctx = self._tx_ctx, None
        if not self._enabled():
            return None
        extra: dict = {}
        STATS.wal_messages_emitted += 1
        return self._extended_emit(session, ctx, extra), None, extra

    def _extended_emit(self, session, ctx, extra: dict) -> bytes:
        """Parse/Bind/Execute/Close of a statement and portal of our own; their answers are removed."""
        self._n += 1
        name = f"pgotel_otelwal_{self._n}".encode()
        params = [self.prefix.encode(), carrier_json(*ctx).encode()]
        parse = typed_message(FRONTEND_PARSE, name + b"\x00" + _EMIT_PARAM_SQL.encode() + b"\x00" + _UINT16.pack(0))
        bind_body = [name + b"\x00", name + b"\x00", _UINT16.pack(0), _UINT16.pack(len(params))]
        for p in params:
            bind_body.append(_UINT32.pack(len(p)) + p)
        bind_body.append(_UINT16.pack(0))
        bind = typed_message(FRONTEND_BIND, b"".join(bind_body))
        execute = typed_message(FRONTEND_EXECUTE, name + b"\x00" + _UINT32.pack(0))
        close = typed_message(FRONTEND_CLOSE, bytes((TARGET_STATEMENT,)) + name + b"\x00")
        holder = Statement("extended", None)
        holder.extra = extra
        session.inject_request("parse", None, errors_pass=True)
        session.inject_request("bind", None, errors_pass=True)
        session.inject_request("execute", holder, errors_pass=True)
        session.inject_request("close", None, errors_pass=True)
        return parse + bind + execute + close
