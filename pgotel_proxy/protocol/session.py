"""Per-connection protocol state: framing of both directions and request/response pairing.

A :class:`Session` is fed the bytes of one client connection after start-up:
``client_data`` for what the client sent (before it is forwarded, so the proxy
can refuse garbage and splice in messages of its own), and ``server_observe`` /
``server_filter`` for what the server sent. It never touches a socket.

Pairing follows the protocol chapter: every frontend message that gets an
answer is queued; answers pop the queue in order. Parse→ParseComplete,
Bind→BindComplete, Describe→(ParameterDescription) RowDescription|NoData,
Execute→CommandComplete|PortalSuspended|EmptyQueryResponse|ErrorResponse,
Close→CloseComplete, Sync/Query/FunctionCall→ReadyForQuery. After an error in
extended mode the server skips everything up to Sync; those requests are
marked skipped. Asynchronous messages (NoticeResponse, NotificationResponse,
ParameterStatus) may arrive at any time and pop nothing.

Finished :class:`Statement` records collect in ``completed`` when the
ReadyForQuery that closes their batch arrives; the caller takes them.

Anything unexpected from the server puts the session *out of sync*:
observation stops for this connection (``out_of_sync`` says why) and bytes
keep flowing untouched. Only client-side framing errors raise
:class:`ProtocolViolation`, which the proxy answers with 08P01.
"""

from __future__ import annotations

import struct

try:
    import cython
except ImportError:  # no Cython: the module runs interpreted
    from ._nocython import cython

from .errors import ProtocolViolation
from .events import Statement, new_completion, new_statement
from .kinds import (
    BACKEND_AUTHENTICATION,
    BACKEND_BACKEND_KEY_DATA,
    BACKEND_BIND_COMPLETE,
    BACKEND_CLOSE_COMPLETE,
    BACKEND_COMMAND_COMPLETE,
    BACKEND_COPY_BOTH_RESPONSE,
    BACKEND_COPY_DATA,
    BACKEND_COPY_IN_RESPONSE,
    BACKEND_COPY_OUT_RESPONSE,
    BACKEND_DATA_ROW,
    BACKEND_EMPTY_QUERY_RESPONSE,
    BACKEND_ERROR_RESPONSE,
    BACKEND_NO_DATA,
    BACKEND_NOTICE_RESPONSE,
    BACKEND_NOTIFICATION_RESPONSE,
    BACKEND_PARAMETER_STATUS,
    BACKEND_PARSE_COMPLETE,
    BACKEND_PORTAL_SUSPENDED,
    BACKEND_READY_FOR_QUERY,
    BACKEND_ROW_DESCRIPTION,
    FRONTEND_BIND,
    FRONTEND_CLOSE,
    FRONTEND_COPY_DATA,
    FRONTEND_COPY_DONE,
    FRONTEND_COPY_FAIL,
    FRONTEND_DESCRIBE,
    FRONTEND_EXECUTE,
    FRONTEND_FLUSH,
    FRONTEND_FUNCTION_CALL,
    FRONTEND_PARSE,
    FRONTEND_PASSWORD,
    FRONTEND_QUERY,
    FRONTEND_SYNC,
    FRONTEND_TERMINATE,
    TARGET_STATEMENT,
)
from .scan import run_end
from .messages import (
    BAD_TYPE,
    FLUSH,
    be32,
    cstring,
    cstring_text,
    nul_at,
    decode_bind,
    decode_error_fields,
    decode_parse,
    decode_sasl_mechanisms,
    encode_sasl_mechanisms,
    header_refused,
    text,
)

__all__ = ["Session"]

_unpack_I = struct.Struct("!I").unpack_from
_unpack_i = struct.Struct("!i").unpack_from
_unpack_h = struct.Struct("!h").unpack_from

# Request kinds in the pending queue.
_PARSE, _BIND, _DESCRIBE, _EXECUTE, _CLOSE, _SYNC, _QUERY, _FUNC = range(8)
_SYNC_LIKE = (_SYNC, _QUERY, _FUNC)
# An injected statement placed in front of the client's own statements inside one
# Query message: its answers end at its CommandComplete, not at ReadyForQuery.
_PREFIX = 8

# Most statements ``slow_done`` holds between two looks (a reader that never looks costs no more).
_SLOW_DONE_MAX = 256

# Third element of a pending entry: False for the client's requests, else who sent it.
INJECTED = 1  # the proxy: every answer is removed
INJECTED_ERRORS_PASS = 2  # the proxy, but an ErrorResponse reaches the client (its transaction is lost)


class _Due:
    """The requests whose answers the server still owes, oldest first: (kind, record, injected) each.

    A list read from ``head``: the entries before it are answered. A queue that
    empties (every ReadyForQuery of a client that waits for its answers) starts
    over; a long pipeline drops its answered half in one go. Compiled, its
    methods are C calls on a list, where a deque's are Python method calls by name.
    """

    def __init__(self) -> None:
        self.items: list = []
        self.head = 0

    def size(self) -> int:
        return len(self.items) - self.head

    def __len__(self) -> int:
        return self.size()

    def __iter__(self):
        return iter(self.items[self.head:])

    def push(self, entry: tuple) -> None:
        self.items.append(entry)

    def front(self):
        """The oldest entry, or None."""
        return self.items[self.head] if self.head < len(self.items) else None

    def second(self):
        """The entry after the oldest, or None."""
        return self.items[self.head + 1] if self.head + 1 < len(self.items) else None

    def pop(self) -> tuple:
        """The oldest entry, taken off (there is one)."""
        items = self.items
        entry = items[self.head]
        self.head += 1
        if self.head == len(items):
            items.clear()
            self.head = 0
        elif self.head >= 1024 and 2 * self.head >= len(items):
            del items[: self.head]
            self.head = 0
        return entry

    def clear(self) -> None:
        self.items.clear()
        self.head = 0


# Server messages that may arrive at any time and answer no request.
_ASYNC_SERVER = frozenset((BACKEND_NOTICE_RESPONSE, BACKEND_NOTIFICATION_RESPONSE, BACKEND_PARAMETER_STATUS))


def _shift_position(buf, start: int, end: int, typ: int, shift: int) -> bytes | None:
    """ErrorResponse / NoticeResponse with its Position field moved back by ``shift`` characters."""
    parts = []
    pos = start
    changed = False
    while pos < end and buf[pos] != 0:
        nul = buf.index(0, pos + 1)
        field = bytes(buf[pos:nul])
        if field[:1] == b"P" and field[1:].isdigit() and int(field[1:]) > shift:
            field = b"P" + str(int(field[1:]) - shift).encode()
            changed = True
        parts.append(field + b"\x00")
        pos = nul + 1
    if not changed:
        return None
    body = b"".join(parts) + b"\x00"
    return bytes((typ,)) + struct.pack("!I", len(body) + 4) + body


class Session:
    """Protocol state of one proxied connection (after the start-up packet)."""

    __slots__ = (
        "max_message_size",
        "observe_limit",
        "max_pending",
        "capture_params",
        "flush_phases",
        "slow_texts",
        "_split_batch",
        "strip_scram_plus",
        "protocol_version",
        "startup_params",
        "server_params",
        "application_name",
        "backend_pid",
        "cancel_key",
        "tx_status",
        "ready",
        "authenticated",
        "fatal",
        "out_of_sync",
        "completed",
        "longest_done_ns",
        "slow_after_ns",
        "slow_done",
        "slow_done_full",
        "_pending",
        "_batch",
        "_batch_parsed",
        "_prev_parsed",
        "_prepared",
        "_portals",
        "_skipping",
        "_rows",
        "_first_row_ns",
        "_cbuf",
        "_cskip",
        "_sbuf",
        "_sfwd",
        "_sskip",
        "_injected_pending",
        "injector",
        "hold_first_ready",
        "_held_ready",
        "_shifted",
        "_last_kind",
        "_last_rec",
        "_query_rec",
        "_copy_in_ext",
        "client_terminated",
        "messages_in",
        "messages_out",
    )

    def __init__(
        self,
        *,
        max_message_size: int = 256 << 20,
        observe_limit: int = 1 << 20,
        max_pending: int = 100_000,
        capture_params: bool = False,
        flush_phases: bool = False,
        slow_texts=None,
        strip_scram_plus: bool = False,
        protocol_version: int = 196608,
        startup_params: dict[str, str] | None = None,
    ) -> None:
        self.max_message_size = max_message_size
        # Messages larger than this are relayed without being decoded (their
        # statement gets no text); it bounds what one connection buffers.
        self.observe_limit = observe_limit
        self.max_pending = max_pending
        self.capture_params = capture_params
        self.flush_phases = flush_phases
        # Adaptive phase splitting where this session splices the Flushes itself (framing.SlowTexts;
        # None: never). _split_batch: the batch up to the next Sync runs a slow shape.
        self.slow_texts = slow_texts
        self._split_batch = False
        self.strip_scram_plus = strip_scram_plus
        self.protocol_version = protocol_version
        self.startup_params = startup_params or {}
        self.server_params: dict[str, str] = {}
        # server_params["application_name"] as the server last reported it; stamped on
        # each record its batch finishes (Statement.application_name)
        self.application_name: str | None = None
        self.backend_pid: int | None = None
        self.cancel_key: bytes | None = None
        self.tx_status = ""
        self.ready = False  # first ReadyForQuery seen: start-up is over
        self.authenticated = False
        self.fatal: dict[str, str] | None = None  # an ErrorResponse no request was waiting for
        self.out_of_sync: str | None = None
        self.completed: list[Statement] = []
        # The longest first-message-to-last-answer time of a statement put in ``completed``
        # since the caller last set it to 0: a reader that looks for slow statements
        # (adaptive phase splitting) skips the records when none was slow.
        self.longest_done_ns = 0
        # ... and, when ``slow_after_ns`` is set, those of them that took at least that long, in
        # order (at most _SLOW_DONE_MAX; ``slow_done_full`` says some were left out), so that it
        # looks at those alone when it has nothing else to look for.
        self.slow_after_ns = 0
        self.slow_done: list[Statement] = []
        self.slow_done_full = False
        self._pending = _Due()
        self._batch: list[Statement] = []
        self._batch_parsed: dict[str, Statement] = {}
        # The statements the batch just before the current one parsed and did not bind: the
        # first execution of one in the current batch is the request its Parse belonged to
        # (drivers that prepare in one round trip and execute in the next).
        self._prev_parsed: dict[str, Statement] = {}
        self._prepared: dict[str, str | None] = {}
        self._portals: dict[str, Statement] = {}
        self._skipping = False
        self._rows = 0
        # when the first row (DataRow, or CopyData of COPY TO) of the result in flight arrived; 0 none yet
        self._first_row_ns = 0
        self._cbuf = b""  # held (not yet forwarded) start of a partial client message
        self._cskip = 0  # bytes of a passed-through client message still to come
        self._sbuf = b""  # partial server message
        self._sfwd = 0  # how many leading bytes of _sbuf were already forwarded
        self._sskip = 0  # bytes of a skipped server message still to come
        self._injected_pending = 0
        # Optional object that may splice messages into the client stream (see
        # "Injection" below); None costs one attribute test per client message.
        self.injector = None
        # Keep the first ReadyForQuery back until the proxy's own start-up
        # requests are answered (the client must not start before they are).
        self.hold_first_ready = False
        self._held_ready: bytes | None = None
        # Client Queries in flight that carry a statement of the proxy's in front:
        # their error positions must be moved back (extra["position_shift"]).
        self._shifted = 0
        self._last_kind = -1
        self._last_rec: Statement | None = None
        self._query_rec: Statement | None = None
        self._copy_in_ext = False  # COPY FROM STDIN via Execute: the server ignores Sync until it ends
        # The client sent Terminate: the server closing the connection next is expected.
        self.client_terminated = False
        self.messages_in = 0
        self.messages_out = 0

    # ------------------------------------------------------------------ state

    @property
    def server_hold(self) -> bool:
        """True while server bytes must go through ``server_filter`` before they are forwarded.

        That is during start-up (authentication messages may be rewritten) and
        while answers to messages the proxy injected are due (they are removed).
        """
        return (
            not self.ready or self._injected_pending > 0 or self._held_ready is not None or self._shifted > 0
        ) and self.out_of_sync is None

    def desync(self, reason: str) -> None:
        """Stop observing this connection; bytes keep flowing."""
        if self.out_of_sync is None:
            self.out_of_sync = reason
            self._pending.clear()
            self._portals.clear()
            self._prepared.clear()
            self._batch_parsed.clear()
            self._prev_parsed.clear()

    # What other layers read (the queue, batch and buffers stay private), none of
    # which is on the per-message path.

    @property
    def answers_due(self) -> bool:
        """Whether a request sent upstream (the client's or the proxy's) still waits for its answer."""
        return self._pending.size() > 0

    @property
    def at_client_boundary(self) -> bool:
        """Whether the client's bytes so far end on a message boundary (nothing held, nothing to skip)."""
        return not self._cbuf and not self._cskip

    @property
    def current_batch(self) -> list[Statement]:
        """The extended-protocol statements the client sent since its last Sync (not a copy)."""
        return self._batch

    def prepared_text(self, name: str) -> str | None:
        """The text of the client's prepared statement ``name`` ("" is the unnamed one), or None."""
        return self._prepared.get(name)

    def take_held_client_bytes(self) -> bytes:
        """The start of a partial client message held back (not yet forwarded); the session holds none after.

        For a caller that stops observing: it forwards these itself.
        """
        held, self._cbuf = self._cbuf, b""
        return held

    def client_waited(self, ns: int) -> None:
        """The relay stopped reading the server for ``ns`` while the client's write buffer was full:
        the wait of the statement whose answer is due (none due: nobody's)."""
        for kind, rec, injected in self._pending:
            if rec is not None and not injected and (kind == _EXECUTE or kind == _QUERY or kind == _FUNC):
                rec.client_wait_ns += ns
                return

    def take_completed(self) -> list[Statement]:
        done = self.completed
        self.completed = []
        self.slow_done = []
        self.slow_done_full = False
        return done

    def looked_at_finished(self) -> None:
        """The reader of ``longest_done_ns`` and ``slow_done`` looked: both start over."""
        self.longest_done_ns = 0
        if self.slow_done:
            self.slow_done = []
        self.slow_done_full = False

    def finish_all(self, now: int) -> None:
        """The connection ended: whatever was in flight is complete as "incomplete"."""
        seen = set()
        for kind, rec, _inj in self._pending:
            if rec is not None and kind != _SYNC and id(rec) not in seen:
                seen.add(id(rec))
                if rec.status == "pending":
                    rec.status = "incomplete"
                    rec.end_ns = now
        for rec in self._batch:
            if rec.status == "pending":
                rec.status = "incomplete"
                rec.end_ns = now
        ended = [r for r in self._batch if r.status != "prepared" or r.parse_end_ns]
        self._note_longest(ended)
        self.completed.extend(ended)
        self._batch = []
        self._pending.clear()

    # ------------------------------------------------------------ client side

    def client_data(self, data: bytes, now: int) -> bytes | None:
        """Frame client bytes. Return None to forward ``data`` as is, else the bytes to forward instead.

        Raises ProtocolViolation for garbage; the caller answers 08P01 and closes.
        """
        return self._client_data(data, now, 0, len(data), True)

    def client_observe(self, data: bytes, start: int, stop: int, now: int) -> None:
        """Frame client bytes another relay already forwarded (the pump): ``data[start:stop]``, in place.

        Raises as client_data does.
        """
        self._client_data(data, now, start, stop, False)

    def _client_data(self, data: bytes, now: int, start: int, stop: int, splice: bool) -> bytes | None:
        """Frame ``data[start:stop]``; what it returns (for client_data) covers ``data[:stop]``.

        ``splice``: this session may write Flushes in (``flush_phases``, adaptive splitting);
        not for bytes another relay forwarded already, which hold that relay's own.
        """
        if start < 0 or stop > len(data) or start > stop:
            raise ValueError("client bytes: a range outside the buffer")
        held = self._cbuf
        if held:
            data = held + data[start:stop]
            start, stop = 0, len(data)
            self._cbuf = b""
        n = stop
        pos = start
        if self._cskip:
            if self._cskip >= n - pos:
                self._cskip -= n - pos
                return data if held else None
            pos += self._cskip
            self._cskip = 0
        out: list | None = None
        seg = 0  # start of the not-yet-emitted segment (only used when out is not None)
        observing = self.out_of_sync is None
        limit = self.max_message_size
        while pos < n:
            if n - pos < 5:
                self._cbuf = data[pos:n]
                break
            if cython.compiled:  # int32, big-endian, signed (a negative length is reported as such)
                typ = cython.cast(cython.p_uchar, PyBytes_AS_STRING(data))[pos]
                length = cython.cast(cython.int, be32(data, pos + 1))
            else:
                typ = data[pos]
                length = _unpack_i(data, pos + 1)[0]
            refused = header_refused(typ, length, limit)
            if refused:  # not HEAD_OK
                if refused == BAD_TYPE:
                    raise ProtocolViolation(f"invalid frontend message type {typ}")
                raise ProtocolViolation(f"invalid message length {length} for message type {chr(typ)!r}")
            mend = pos + 1 + length
            self.messages_in += 1
            if typ == FRONTEND_TERMINATE:
                self.client_terminated = True
            if mend > n:
                if typ == FRONTEND_COPY_DATA or length > self.observe_limit or not observing:
                    # Relay without holding: COPY data, huge messages, or nothing to decode.
                    if observing and typ != FRONTEND_COPY_DATA:
                        self._client_message(typ, None, 0, 0, now)
                    self._cskip = mend - n
                    pos = n
                else:
                    self._cbuf = data[pos:n]
                break
            if observing and typ != FRONTEND_COPY_DATA:
                inj = self.injector
                if inj is not None:
                    res = inj.before(self, typ, data, pos + 5, mend)
                    if res is not None:
                        before, replace, extra = res
                        if out is None:
                            out = []
                        out.append(data[seg:pos])
                        out.append(before)
                        if replace is not None:
                            out.append(replace)
                            seg = mend
                        else:
                            seg = pos
                try:
                    self._client_message(typ, data, pos + 5, mend, now)
                except Exception as exc:
                    # Well framed but undecodable: observation stops, the bytes still go through.
                    self.desync(f"client stream: {exc!r}")
                observing = self.out_of_sync is None
                if inj is not None and res is not None and extra is not None and self._last_rec is not None:
                    self._last_rec.extra = extra
                    if "position_shift" in extra:
                        self._shifted += 1
                if observing and splice and self._splits(typ, now):
                    nxt = data[mend] if mend < n else -1
                    if nxt != FRONTEND_FLUSH and nxt != FRONTEND_SYNC:
                        if out is None:
                            out = []
                        out.append(data[seg:mend])
                        out.append(FLUSH)
                        seg = mend
                        self._mark_flushed()
            pos = mend
        if self._cbuf:
            end = n - len(self._cbuf)
        else:
            end = n
        if out is not None:
            out.append(data[seg:end])
            return b"".join(out)
        if held or end != n:
            return data[:end]
        return None

    def _splits(self, typ: int, now: int) -> bool:
        """Whether a Flush goes after this client message (just accounted): a Parse, Bind or
        Execute with ``flush_phases``, or of a batch that runs a slow shape (adaptive splitting,
        the pump's rule in framing.py: decided at the batch's Parse, or at a Bind of a statement
        prepared before)."""
        if typ == FRONTEND_SYNC:
            self._split_batch = False
            return False
        if typ != FRONTEND_PARSE and typ != FRONTEND_BIND and typ != FRONTEND_EXECUTE:
            return False
        if self.flush_phases:
            return True
        if self.slow_texts is None:
            return False
        if not self._split_batch and typ != FRONTEND_EXECUTE:
            rec = self._last_rec
            if rec is not None and rec.sql and self.slow_texts.slow(rec.sql, now):
                self._split_batch = True
        return self._split_batch

    def _mark_flushed(self) -> None:
        """The server will flush right after the last queued request: its answer time is exact."""
        rec = self._last_rec
        if rec is None:
            return
        k = self._last_kind
        if k == _PARSE:
            rec.parse_exact = True
        elif k == _BIND:
            rec.bind_exact = True
        elif k == _EXECUTE:
            rec.exec_exact = True

    def _queue(self, kind: int, rec: Statement | None) -> None:
        pending = self._pending
        if pending.size() >= self.max_pending:
            self.desync("too many requests in flight")
            return
        pending.push((kind, rec, False))
        self._last_kind = kind
        self._last_rec = rec

    def _client_message(self, typ: int, buf, start: int, end: int, now: int) -> None:
        """Account one whole client message (``buf`` is None when it was too large to decode)."""
        if typ == FRONTEND_QUERY:
            sql = None if buf is None else text(buf, start, end - 1)
            rec = new_statement("simple", sql, now)
            rec.exec_start_ns = now
            rec.exec_exact = True
            rec.results = []
            # The server ends an open extended batch at a Query as at a Sync (it closes the
            # implicit transaction): a later Bind runs a statement prepared in an earlier batch.
            self._batch_parsed.clear()
            self._prev_parsed.clear()
            self._queue(_QUERY, rec)
            return
        if typ == FRONTEND_SYNC or typ == FRONTEND_FLUSH:
            self._mark_flushed()
            if typ == FRONTEND_SYNC:
                batch = self._batch
                self._batch = []
                self._next_batch()
                self._skipping = False
                self._queue(_SYNC, batch)
                self._last_rec = None
            return
        if typ in (
            FRONTEND_CLOSE,
            FRONTEND_TERMINATE,
            FRONTEND_COPY_FAIL,
            FRONTEND_COPY_DONE,
            FRONTEND_PASSWORD,
            FRONTEND_COPY_DATA,
        ):
            if self._copy_in_ext and (typ == FRONTEND_COPY_DONE or typ == FRONTEND_COPY_FAIL):
                self._copy_in_ended()
            if typ == FRONTEND_CLOSE and buf is not None:
                # Close (F): 'S' statement or 'P' portal.
                which = buf[start]
                name = text(buf, start + 1, end - 1)
                if which == TARGET_STATEMENT:
                    self._prepared.pop(name, None)
                else:
                    self._portals.pop(name, None)
            if typ == FRONTEND_CLOSE and not self._skipping:
                self._queue(_CLOSE, None)
            return
        if self._skipping:
            # The server is discarding everything up to Sync after an error.
            if typ == FRONTEND_PARSE or typ == FRONTEND_BIND or typ == FRONTEND_EXECUTE:
                rec = self._extended_rec(typ, buf, start, end, now)
                if rec is not None and rec.status == "pending":
                    rec.status = "skipped"
                    rec.end_ns = now
            return
        if typ == FRONTEND_PARSE or typ == FRONTEND_BIND or typ == FRONTEND_EXECUTE:
            rec = self._extended_rec(typ, buf, start, end, now)
            self._queue(_PARSE if typ == FRONTEND_PARSE else _BIND if typ == FRONTEND_BIND else _EXECUTE, rec)
        elif typ == FRONTEND_DESCRIBE:
            self._queue(_DESCRIBE, None)
        elif typ == FRONTEND_FUNCTION_CALL:
            rec = new_statement("function", None, now)
            rec.exec_start_ns = now
            rec.exec_exact = True
            rec.results = []
            self._queue(_FUNC, rec)

    def _next_batch(self) -> None:
        """A Sync ended the batch: what it parsed is the next batch's ``_prev_parsed``."""
        prev = self._prev_parsed
        if prev:
            prev.clear()
        if self._batch_parsed:
            self._prev_parsed, self._batch_parsed = self._batch_parsed, prev

    def _copy_in_ended(self) -> None:
        """The client ended a COPY FROM STDIN that an Execute started (CopyDone or CopyFail).

        The server ignores Sync while in copy-in mode, and libpq sends one right
        after Execute and another after CopyDone: the Syncs queued since the
        Execute get no ReadyForQuery of their own, so their statements join the
        batch that the client's next Sync closes.
        """
        self._copy_in_ext = False
        pending = self._pending
        if not any(k == _SYNC and not inj for k, _r, inj in pending):
            return
        kept = _Due()
        moved: list[Statement] = []
        for entry in pending:
            if entry[0] == _SYNC and not entry[2]:
                moved.extend(entry[1])
            else:
                kept.push(entry)
        self._pending = kept
        self._batch = moved + self._batch

    def _extended_rec(self, typ: int, buf, start: int, end: int, now: int) -> Statement | None:
        """Find or make the Statement a Parse / Bind / Execute belongs to."""
        batch = self._batch
        if typ == FRONTEND_PARSE:
            if buf is None:
                name, sql = "", None
            else:
                name, sql = decode_parse(buf, start, end)
            rec = new_statement("extended", sql, now)
            rec.statement_name = name
            rec.parse_start_ns = now
            rec.status = "prepared"
            prepared = self._prepared
            if name and len(prepared) >= 10_000 and name not in prepared:
                del prepared[next(iter(prepared))]
            prepared[name] = sql
            self._batch_parsed[name] = rec
            batch.append(rec)
            return rec
        if typ == FRONTEND_BIND:
            if buf is None:
                portal, stmt, params = "", "", None
            else:
                portal, stmt, params = decode_bind(buf, start, end, self.capture_params)
            parsed = self._batch_parsed.get(stmt)
            rec = parsed
            if rec is None or rec.bind_start_ns:
                if parsed is None and self._prev_parsed:
                    # Its Parse came in the batch right before, unbound: this first execution
                    # is that request's, and so is its comment. Later ones are not.
                    before = self._prev_parsed.pop(stmt, None)
                    if before is not None and not before.bind_start_ns and before.sql == self._prepared.get(stmt):
                        parsed = before
                # Bound again in the Parse's own batch (executemany) is not "prepared earlier".
                rec = new_statement("extended", self._prepared.get(stmt), now)
                rec.statement_name = stmt
                rec.reused = parsed is None
                batch.append(rec)
            rec.status = "pending"
            rec.portal = portal
            rec.bind_start_ns = now
            rec.params = params
            portals = self._portals
            if len(portals) >= 10_000 and portal not in portals:
                del portals[next(iter(portals))]
            portals[portal] = rec
            return rec
        # Execute
        if buf is None or buf[start] == 0:
            portal = ""
        else:
            portal = cstring_text(buf, start, nul_at(buf, start))
        rec = self._portals.get(portal)
        if rec is None or rec.exec_start_ns:
            old = rec
            rec = new_statement("extended", old.sql if old is not None else None, now)
            rec.reused = True
            if old is not None:
                rec.statement_name = old.statement_name
            rec.portal = portal
            self._portals[portal] = rec
            batch.append(rec)
        rec.status = "pending"
        rec.exec_start_ns = now
        return rec

    # ------------------------------------------------------------ server side

    def server_observe(self, data: bytes, now: int, start: int = 0, stop: int = -1) -> None:
        """Feed server bytes that were already forwarded to the client: ``data[start:stop]`` (-1: to the end).

        The range lets the pump's log be read in place: the common chunk is
        observed without a copy of its own.
        """
        if self.out_of_sync is None:
            try:
                self._server(data, now, None, start, len(data) if stop < 0 else stop)
            except Exception as exc:  # never let observation break the relay
                self.desync(f"server stream: {exc!r}")

    def server_filter(self, data: bytes, now: int) -> bytes:
        """Feed server bytes that are NOT yet forwarded; return what to forward (see ``server_hold``)."""
        out: list = []
        try:
            self._server(data, now, out, 0, len(data))
        except Exception as exc:
            self.desync(f"server stream: {exc!r}")
            if self._held_ready is not None:
                out.append(self._held_ready)
                self._held_ready = None
            # Everything not yet forwarded goes out untouched from here on.
            rest = self._sbuf[self._sfwd :]
            self._sbuf = b""
            self._sfwd = 0
            out.append(rest)
        return b"".join(out)

    def _server(self, data: bytes, now: int, out: list | None, start: int, stop: int) -> None:
        """Frame server bytes ``data[start:stop]`` (a range only with ``out`` None: a filter forwards from 0)."""
        if start < 0 or stop > len(data) or start > stop:
            raise ValueError("server bytes: a range outside the buffer")
        sbuf = self._sbuf
        fwd = 0
        if sbuf:
            fwd = self._sfwd
            data = sbuf + data[start:stop]
            start, stop = 0, len(data)
            self._sbuf = b""
            self._sfwd = 0
        n = stop
        pos = start
        skip = self._sskip
        if skip:
            if skip >= n - pos:
                self._sskip = skip - (n - pos)
                if out is not None:
                    out.append(data[fwd:] if fwd else data)
                return
            pos += skip
            self._sskip = 0
            if out is not None:
                out.append(data[fwd:pos])
        while pos < n:
            if n - pos < 5:
                break
            if cython.compiled:
                typ = cython.cast(cython.p_uchar, PyBytes_AS_STRING(data))[pos]
                mend = pos + 1 + be32(data, pos + 1)
            else:
                typ = data[pos]
                mend = pos + 1 + _unpack_I(data, pos + 1)[0]
            if out is None and (typ == BACKEND_DATA_ROW or typ == BACKEND_COPY_DATA):
                # Already forwarded: a run of DataRows (a large result is millions of
                # them; each is only counted) or of CopyData (COPY TO STDOUT,
                # replication streams: relayed, never held or decoded, so a large row
                # costs no re-joining of chunks), stepped over in one call.
                mend, count = run_end(data, pos, n, typ)
                if typ == BACKEND_DATA_ROW:
                    self._rows += count
                if not self._first_row_ns:
                    self._first_row_ns = now
                if mend > n:
                    self._sskip = mend - n
                    pos = n
                    break
                pos = mend
                continue
            if typ == BACKEND_DATA_ROW:
                if out is not None and self._suppressing():
                    # Answer to the proxy's own request: held until whole, read, removed.
                    if mend > n:
                        break
                    self._rows += 1
                    self._capture_row(data, pos + 5, mend)
                    pos = mend
                    continue
                # DataRow: counted, never decoded.
                self._rows += 1
                if not self._first_row_ns:
                    self._first_row_ns = now
                if mend > n:
                    if out is not None and not self._suppressing():
                        out.append(data[max(pos, fwd) :])
                    self._sskip = mend - n
                    pos = n
                    break
                if out is not None and not self._suppressing():
                    out.append(data[max(pos, fwd) : mend])
                pos = mend
                continue
            if mend > n:
                if mend - pos > self.observe_limit:
                    # Too big to hold: forward and skip it undecoded.
                    if out is not None:
                        out.append(data[max(pos, fwd) :])
                    self._server_message(typ, None, 0, 0, now)
                    self._sskip = mend - n
                    pos = n
                break
            self.messages_out += 1
            if out is None:
                self._server_message(typ, data, pos + 5, mend, now)
            else:
                suppress = (
                    self._suppressing()
                    and typ not in _ASYNC_SERVER
                    and not (typ == BACKEND_ERROR_RESPONSE and self._pending.front()[2] == INJECTED_ERRORS_PASS)
                )
                first = not self.ready
                try:
                    replacement = self._server_message(typ, data, pos + 5, mend, now)
                except Exception:
                    # Nothing of this chunk from here on is forwarded yet: it goes out as it is
                    # (the caller stops observing).
                    out.append(data[max(pos, fwd) :])
                    raise
                if typ == BACKEND_READY_FOR_QUERY and first and self.hold_first_ready and self.ready:
                    self.hold_first_ready = False
                    self._held_ready = bytes(data[pos:mend])
                    suppress = True
                if not suppress:
                    if replacement is not None:
                        out.append(replacement)
                    else:
                        out.append(data[max(pos, fwd) : mend])
                if (
                    typ == BACKEND_READY_FOR_QUERY
                    and self._held_ready is not None
                    and self._injected_pending == 0
                    and not first
                ):
                    out.append(self._held_ready)
                    self._held_ready = None
                if not self.server_hold:
                    if self._held_ready is not None:  # observation stopped: let the client go on
                        out.append(self._held_ready)
                        self._held_ready = None
                    # Hold mode just ended: forward the rest now and keep observing it.
                    pos = mend
                    if pos < n:
                        out.append(data[max(pos, fwd) :])
                        fwd = n
                    out = None
                    continue
            pos = mend
        if pos < n:
            self._sbuf = data[pos:n]
            if out is None:
                self._sfwd = n - pos  # forwarded already (relay first)
            else:
                self._sfwd = max(0, fwd - pos)

    def _suppressing(self) -> bool:
        front = self._pending.front()
        return front is not None and bool(front[2])

    def _capture_row(self, buf, start: int, end: int) -> None:
        """Keep the first column of a row answering an injected request whose record asks for it."""
        rec = self._pending.front()[1]
        extra = rec.extra if rec is not None else None
        if extra is None or end - start < 6 or _unpack_h(buf, start)[0] < 1:
            return
        ln = _unpack_i(buf, start + 2)[0]
        if ln < 0 or start + 6 + ln > end:
            extra["row"] = None
        else:
            extra["row"] = bytes(buf[start + 6 : start + 6 + ln]).decode("utf-8", "replace")

    def _pop(self, expect: int):
        pending = self._pending
        front = pending.front()
        if front is None:
            self.desync(f"answer without a request (expected kind {expect})")
            return None
        kind, rec, injected = front
        if kind != expect:
            self.desync(f"answer of kind {expect} while kind {kind} was due")
            return None
        pending.pop()
        if injected:
            self._injected_pending -= 1
        return rec

    def _server_message(self, typ: int, buf, start: int, end: int, now: int) -> bytes | None:
        """Account one whole server message; may return a replacement for it (hold mode only)."""
        if typ == BACKEND_COMMAND_COMPLETE:
            tag = None
            if buf is not None:
                tag = text(buf, start, end - 1)
                if not tag.isascii():  # a command tag is ASCII: anything else is decoded as such
                    tag = bytes(buf[start : end - 1]).decode("ascii", "replace")
            front = self._pending.front()
            if front is not None and front[0] == _QUERY:
                rec = front[1]
                rows = self._rows
                self._rows = 0
                if rec.results is not None:
                    rec.results.append(new_completion(now, tag, rows))
                if not rec.first_row_ns:
                    rec.first_row_ns = self._first_row_ns
                self._first_row_ns = 0
                return None
            if front is not None and front[0] == _PREFIX:
                self._pending.pop()
                self._injected_pending -= 1
                self._rows = 0
                self._first_row_ns = 0
                return None
            rec = self._pop(_EXECUTE)
            if rec is not None:
                rec.tag = tag
                rec.rows = self._rows
                rec.first_row_ns = self._first_row_ns
                rec.end_ns = now
                rec.status = "ok"
            self._rows = 0
            self._first_row_ns = 0
            return None
        if typ == BACKEND_READY_FOR_QUERY:
            self._ready_for_query(buf[start] if buf is not None else 0, now)
            return None
        if typ == BACKEND_PARSE_COMPLETE:
            rec = self._pop(_PARSE)
            if rec is not None:
                rec.parse_end_ns = now
            return None
        if typ == BACKEND_BIND_COMPLETE:
            rec = self._pop(_BIND)
            if rec is not None:
                rec.bind_end_ns = now
            return None
        if typ == BACKEND_ROW_DESCRIPTION or typ == BACKEND_NO_DATA:
            front = self._pending.front()
            if front is not None and front[0] == _DESCRIBE:
                self._pop(_DESCRIBE)
            return None
        if typ == BACKEND_ERROR_RESPONSE or typ == BACKEND_NOTICE_RESPONSE:
            front = self._pending.front()
            shift = 0
            if self._shifted and front is not None and buf is not None:
                if front[0] == _PREFIX and self._pending.size() > 1:
                    front = self._pending.second()  # a parse error of the whole text: nothing ran
                if front[0] == _QUERY and not front[2] and front[1].extra:
                    shift = front[1].extra.get("position_shift", 0)
            if typ == BACKEND_ERROR_RESPONSE:
                self._error(decode_error_fields(buf, start, end) if buf is not None else {}, now)
            return _shift_position(buf, start, end, typ, shift) if shift else None
        if typ == BACKEND_PORTAL_SUSPENDED or typ == BACKEND_EMPTY_QUERY_RESPONSE:
            front = self._pending.front()
            if typ == BACKEND_EMPTY_QUERY_RESPONSE and front is not None and front[0] == _QUERY:
                front[1].results.append(new_completion(now, None, 0))
                return None
            rec = self._pop(_EXECUTE)
            if rec is not None:
                rec.end_ns = now
                rec.rows = self._rows
                rec.first_row_ns = self._first_row_ns
                rec.status = "suspended" if typ == BACKEND_PORTAL_SUSPENDED else "ok"
            self._rows = 0
            self._first_row_ns = 0
            return None
        if typ == BACKEND_CLOSE_COMPLETE:
            self._pop(_CLOSE)
            return None
        if typ == BACKEND_COPY_IN_RESPONSE or typ == BACKEND_COPY_OUT_RESPONSE or typ == BACKEND_COPY_BOTH_RESPONSE:
            front = self._pending.front()
            if front is not None and front[1] is not None and front[0] in (_QUERY, _EXECUTE):
                if typ == BACKEND_COPY_IN_RESPONSE:
                    front[1].copy = "in"
                elif typ == BACKEND_COPY_OUT_RESPONSE:
                    front[1].copy = "out"
                else:
                    front[1].copy = "both"
                if typ == BACKEND_COPY_IN_RESPONSE and front[0] == _EXECUTE:
                    self._copy_in_ext = True
            return None
        if typ == BACKEND_BACKEND_KEY_DATA:
            if buf is not None:
                self.backend_pid = _unpack_I(buf, start)[0]
                self.cancel_key = bytes(buf[start + 4 : end])
            return None
        if typ == BACKEND_PARAMETER_STATUS:
            if buf is not None:
                raw = bytes(buf[start:end]).split(b"\x00")
                if len(raw) >= 2 and len(self.server_params) < 256:
                    name, value = raw[0].decode("utf-8", "replace"), raw[1].decode("utf-8", "replace")
                    self.server_params[name] = value
                    if name == "application_name":
                        self.application_name = value
            return None
        if typ == BACKEND_AUTHENTICATION:
            if buf is not None:
                code = _unpack_I(buf, start)[0]
                if code == 0:
                    self.authenticated = True
                elif code == 10 and self.strip_scram_plus:
                    mechs = decode_sasl_mechanisms(buf, start + 4, end)
                    kept = [m for m in mechs if not m.endswith("-PLUS")]
                    if kept != mechs and kept:
                        return encode_sasl_mechanisms(kept)
            return None
        if typ == BACKEND_COPY_DATA:
            # (Observed without a filter, CopyData never gets here: _server steps over it.)
            if not self._first_row_ns:
                self._first_row_ns = now
            return None
        # NoticeResponse, NotificationResponse, CopyDone, ParameterDescription,
        # FunctionCallResponse, NegotiateProtocolVersion, and anything newer: relayed,
        # nothing to account.
        return None

    def _error(self, fields: dict[str, str], now: int) -> None:
        if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
            # The server ends the session after this, whatever request it answers.
            self.fatal = fields
        pending = self._pending
        front = pending.front()
        if front is None:
            # FATAL outside any request (start-up failure, admin shutdown).
            self.fatal = fields
            return
        kind, rec, _inj = front
        if _inj == INJECTED_ERRORS_PASS and kind != _PREFIX and self.injector is not None:
            # (A prefix shares its Query with the client's text: its errors are the client's.)
            self.injector.injected_error(self, fields)
        if kind == _PREFIX:
            # The statement put in front of the client's failed: so does the client's Query.
            pending.pop()
            self._injected_pending -= 1
            self._rows = 0
            self._first_row_ns = 0
            front = pending.front()
            if front is None:
                return
            kind, rec, _inj = front
        if kind == _QUERY or kind == _FUNC:
            rows = self._rows
            self._rows = 0
            rec.results.append(new_completion(now, None, rows, fields))
            if not rec.first_row_ns:
                rec.first_row_ns = self._first_row_ns
            self._first_row_ns = 0
            return
        if kind == _SYNC:
            # The Sync itself failed: committing the implicit transaction (a deferred
            # constraint). Its ReadyForQuery follows; the batch's last statement gets the error.
            for r in reversed(rec):
                if r.exec_start_ns:
                    r.status = "error"
                    r.error = fields
                    break
            return
        # Extended protocol: the failing request, then everything up to Sync is skipped.
        pending.pop()
        if _inj:
            self._injected_pending -= 1
        if rec is not None and kind != _SYNC:
            if kind == _PARSE:
                rec.parse_end_ns = now
            elif kind == _BIND:
                rec.bind_end_ns = now
            rec.status = "error"
            rec.error = fields
            rec.end_ns = now
            rec.rows = self._rows
            rec.first_row_ns = self._first_row_ns
        self._rows = 0
        self._first_row_ns = 0
        front = pending.front()
        while front is not None and front[0] != _SYNC:
            k, r, inj = pending.pop()
            if inj:
                self._injected_pending -= 1
            if r is not None and r.status in ("pending", "prepared"):
                r.status = "skipped"
                r.end_ns = now
            front = pending.front()
        if front is None:
            self._skipping = True

    def _ready_for_query(self, status: int, now: int) -> None:
        self.tx_status = chr(status) if status else ""
        first = not self.ready
        self.ready = True
        self._copy_in_ext = False
        if first:
            # It ends start-up; requests a client pipelined behind its start-up packet
            # are answered after it.
            return
        pending = self._pending
        done = None
        while pending.size() > 0:
            kind, rec, inj = pending.pop()
            if inj:
                self._injected_pending -= 1
            if kind == _SYNC:
                done = rec  # the batch list
                break
            if kind == _QUERY or kind == _FUNC:
                query = rec
                if self._shifted and not inj and query.extra and "position_shift" in query.extra:
                    self._shifted -= 1
                query.end_ns = now
                failed = False
                for c in query.results:
                    if c.error:
                        failed = True
                        break
                query.status = "error" if failed else "ok"
                done = () if inj else (query,)
                break
            if rec is not None and rec.status == "pending":
                rec.status = "skipped"
                rec.end_ns = now
        if done:
            tx = self.tx_status
            app = self.application_name
            for item in done:
                item.tx_status = tx
                item.application_name = app
                if item.status == "pending":
                    item.status = "skipped"
                    item.end_ns = now
            self._note_longest(done)
            self.completed.extend(done)
        if self.tx_status == "I" and self._portals:
            # Named portals die with their transaction.
            self._portals.clear()

    def _note_longest(self, done) -> None:
        """``longest_done_ns`` over the statements of ``done`` that ended, and ``slow_done``."""
        longest = self.longest_done_ns
        slow_after = self.slow_after_ns
        for rec in done:
            if rec.end_ns:
                end, start = rec.end_ns, rec.start_ns  # (compiled: C integers, subtracted as such)
                took = end - start
                if took > longest:
                    longest = took
                if slow_after and took >= slow_after:
                    if len(self.slow_done) < _SLOW_DONE_MAX:
                        self.slow_done.append(rec)
                    else:
                        self.slow_done_full = True
        self.longest_done_ns = longest

    # -------------------------------------------------------------- injection

    def inject_request(self, kind: str, rec: Statement | None = None, *, errors_pass: bool = False) -> None:
        """Note that the proxy itself sent a request whose answers must not reach the client.

        ``kind`` is "query" (a simple Query: answers up to its ReadyForQuery are
        removed), "prefix" (a statement the proxy put in front of the client's
        own inside the client's next Query: answers up to its CommandComplete
        are removed) or "parse" / "bind" / "execute" / "close" (extended
        messages inside the client's batch, answered before the client's own).
        A DataRow answering it is decoded into ``rec.extra["row"]`` (first
        column, text) when ``rec.extra`` is a dict. With ``errors_pass`` an
        ErrorResponse it causes reaches the client (the client's transaction
        is lost with it, the client must learn that) and the injector's
        ``injected_error`` is told.

        Injection: ``Session.injector``, when set, is called synchronously for
        every whole client message before it is accounted and forwarded, as
        ``injector.before(session, type_byte, buf, start, end)`` (payload
        bounds). It returns None, or ``(before, replace, extra)``: bytes to
        send ahead of the message, bytes to send instead of it (or None to
        send it unchanged; the message is still accounted as the client sent
        it), and a dict to set as the ``extra`` of the client's record. It has
        called ``inject_request`` for every answer ``before``/``replace`` cause.
        """
        k = {"query": _QUERY, "prefix": _PREFIX, "parse": _PARSE, "bind": _BIND, "execute": _EXECUTE, "close": _CLOSE}[kind]
        if k == _QUERY and rec is None:
            rec = new_statement("simple", None, 0)
            rec.results = []
        self._pending.push((k, rec, INJECTED_ERRORS_PASS if errors_pass else INJECTED))
        self._injected_pending += 1

    def take_held_ready(self) -> bytes | None:
        """The held first ReadyForQuery, when nothing the proxy injected is due any more."""
        held = self._held_ready
        if held is None or self._injected_pending:
            return None
        self._held_ready = None
        return held


#: True when this module was compiled by Cython (see protocol/_impl.py).
COMPILED: bool = cython.compiled
