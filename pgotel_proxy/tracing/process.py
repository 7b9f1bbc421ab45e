"""The one tracer: spans built, enriched and exported in a helper process; the relay's interpreter only records.

Why: in one process, the builder and export threads share the interpreter lock
with the relay. Every time the relay thread blocks in a system call, a
builder thread takes the lock and keeps it for up to the switch interval, so
under load the relay waits milliseconds for its next message, which shows in
queries' tail latency, and the hand-overs themselves cost CPU.
So the relay process keeps only the compact statement records the protocol
layer fills anyway. Every 50 ms
(``_SEND_INTERVAL``; 0.5 s after a look that found nothing) it takes the
records each connection finished since the last look, packs them (one call
per connection), and writes them, as one frame, to a helper process over a
socket pair. The helper
(``python -m pgotel_proxy.tracing.process``) runs
:class:`~pgotel_proxy.tracing.helper.SpanHelper`: sqlcommenter parsing, SQL
summaries, span building (straight into OTLP bytes), server-side enrichment
when it is configured (:mod:`pgotel_proxy.enrich`: the side connections, the
log follower and the join run there), batching and export (OTLP, or the
console tree printed on the stdout it inherits), on its own core. The relay
process never imports the OpenTelemetry SDK, protobuf, psycopg or the SQL
parser.

This module owns both halves of the hand-over: the relay side
(:class:`ProcessTracer`: the per-connection handles, pre-sampling, the
bounded outgoing buffer, gap marking and the drop count, each in one place)
and the helper's main loop (:func:`child_main`).

Frames, both directions: 4-byte little-endian length, then ``marshal`` data.

* relay → helper: the configuration first (the proxy's :class:`~pgotel_proxy.config.Config`
  as plain values, secrets left out but the stats DSN that enrichment's side
  connections need; the helper validates it back into a ``Config``), then
  lists of operations in order, each a tuple whose first element names it
  (the ``OP_*`` constants below):
  ``(OP_CONNECTION_OPENED, conn, base_attrs, backend_pid,
  startup_application_name)`` a connection opened;
  ``(OP_STATEMENTS_PACKED, conn, count, application_name, packed, drawn)``
  finished statements in the records' compact form (``protocol/records.py``,
  ``protocol.records.pack``), which carries every field of every
  record; ``drawn``: the relay's draw kept these new roots (below a sample
  rate of 1 the relay draws for the roots it can tell, ``sampling.Presampler``,
  and what its draw leaves out is never handed over; not while latency
  histograms, which count every statement, are on);
  ``(OP_STATEMENTS_UNSEEN, conn)`` statements of that connection went unseen;
  ``(OP_CONNECTION_CLOSED, conn)`` it closed; ``(OP_SAMPLE_RATE, rate)`` new
  sample rate; ``(OP_KEEP_RULE, errors, slower_than_ns, rate)`` new rule for
  failed and slow statements (``always_trace_*``); ``(OP_FLUSH, seq)`` flush and answer; ``(OP_STOP, deadline)``
  build and export what is left by that wall-clock time, then exit.
* helper → relay, every 0.25 s and on flush: ``{"stats": {...}, "queue": n,
  "flushed": seq}``, with ``"sources": {...}, "sources_ready": bool`` when
  enrichment is configured, and ``"latency": [...]`` (the latency histograms'
  snapshot, ``histograms.LatencyHistograms.snapshot``) when they changed since
  the last report. The helper's counters (spans built, exported, dropped,
  export failures, enrichment joins and timeouts) and the histograms are what
  ``/metrics`` shows; the sources' status is the admin ``/status``'s.

Server-side enrichment in the helper: it knows each connection's backend pid
from the connection-opened operation, so its wait-event sampler asks pg_stat_activity
about the open connections' backends (``state = 'active'``) and the join
takes the samples of a statement's backend within its wire interval when the
statement's record arrives (``enrich.enricher``).

Bounds and failure: the relay side never blocks. Frames the helper has not
read yet wait in an outgoing buffer of at most ``_MAX_OUT`` bytes; beyond it
statements are dropped and counted in ``statements_dropped`` (and the helper
told to forget the session carriers it may have missed). When the helper
dies, an error is logged, statements are dropped while it is away, and it is
started again after a second; a helper whose parent vanished (its socket
closed) exports what it has and exits. SIGINT and SIGTERM are ignored by the
helper: the proxy's shutdown tells it to stop, within ``shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from itertools import islice
from typing import Any

from ..config import Config, is_secret_field
from ..protocol.records import pack as pack_records, unpack as unpack_records
from .attributes import connection_attributes
from ..stats import SPAN_PROCESS_COUNTERS, STATS
from .sampling import Presampler

__all__ = ["ProcessTracer", "SourceStatus", "CHILD_COUNTERS"]

log = logging.getLogger("pgotel_proxy.tracing")

# Operations, relay -> helper: the first element of each tuple (see the module docstring).
# The values are what goes over the socket (marshal data, one short string each).
OP_CONNECTION_OPENED = "o"
OP_STATEMENTS_PACKED = "p"
OP_STATEMENTS_UNSEEN = "g"
OP_CONNECTION_CLOSED = "x"
OP_SAMPLE_RATE = "r"
OP_KEEP_RULE = "k"
OP_FLUSH = "f"
OP_STOP = "s"

#: Counters the helper owns (stats.py marks them); the relay process shows the helper's values.
CHILD_COUNTERS = SPAN_PROCESS_COUNTERS
_MAX_OUT = 16 << 20  # bytes of frames the helper has not read yet
_SEND_INTERVAL = 0.05  # seconds records wait on the relay side, at most (fewer, larger hand-overs cost less CPU; no query waits for them)
_IDLE_INTERVAL = 0.5  # ... when the last look found nothing: an idle proxy wakes twice a second
_REPORT_INTERVAL = 0.25
_RESTART_DELAY = 1.0
_EXIT_MARGIN = 0.1  # seconds of a helper's shutdown deadline left for its last report and its exit
_EXIT_GRACE = 0.25  # seconds past the shutdown deadline the relay waits for the helper to exit
_ENRICH_TICK = 0.02  # seconds the helper waits for input before it releases enriched spans whose wait is over
_LIFT_AT = 1 << 20  # bytes of records the helper has not taken: it is behind (about 10,000 statements)
_STARVED_AFTER = 1.0  # seconds without a report (it reports every _REPORT_INTERVAL): it gets no CPU
_LOW_NICE = 10  # span_process_priority = "low"
_LEN = struct.Struct("<I")
_MAX_FRAME = 256 << 20

def _frame(obj: Any) -> bytes:
    data = marshal.dumps(obj)
    return _LEN.pack(len(data)) + data


def _read_frames(sock: socket.socket, buf: bytearray) -> list | None:
    """Block for at least one frame; the frames read (None at end of input)."""
    while True:
        frames = []
        pos = 0
        # marshal reads each frame where it lies (a slice of the buffer would copy it twice);
        # the view is released before the buffer shrinks
        with memoryview(buf) as view:
            while len(buf) - pos >= 4:
                (n,) = _LEN.unpack_from(buf, pos)
                if n > _MAX_FRAME:
                    raise ValueError(f"frame of {n} bytes")
                if len(buf) - pos - 4 < n:
                    break
                with view[pos + 4:pos + 4 + n] as frame:
                    frames.append(marshal.loads(frame))
                pos += 4 + n
        if pos:
            del buf[:pos]
        if frames:
            return frames
        chunk = sock.recv(1 << 20)
        if not chunk:
            return None
        buf += chunk


# ------------------------------------------------------------------ relay side


class _Outbox:
    """Frames the helper has not taken yet: the buffers themselves, in order, and their size.

    Sending takes them with one ``sendmsg`` (a frame's header and data, and
    whatever waited before them) and keeps only views of what the socket did
    not take. Nothing is copied into one growing buffer: a bytearray's growing
    and shrinking cost the relay page faults at every send the socket took in
    part (0.14-0.17 a transaction at 8 clients, simple statements).
    """

    __slots__ = ("_parts", "_size")
    _IOV = 64  # buffers given to one sendmsg (the kernel's limit is 1024)

    def __init__(self) -> None:
        self._parts: deque[memoryview] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        if data:
            self._parts.append(memoryview(data))
            self._size += len(data)

    def send(self, sock: socket.socket) -> int:
        """Send what the socket takes now; the bytes sent (its exceptions propagate, nothing sent then)."""
        parts = self._parts
        n = sock.sendmsg(list(islice(parts, self._IOV)))
        self._size -= n
        left = n
        while left:
            first = parts[0]
            if len(first) <= left:
                left -= len(first)
                parts.popleft()
            else:
                parts[0] = first[left:]
                left = 0
        return n


class _Handle:
    """Per-connection handle given to the proxy (the relay side of one session).

    ``collects``: the connection may leave finished statements in its
    session's ``completed`` list; the tracer takes them at its next send
    (every ``_SEND_INTERVAL`` while statements finish), all of one connection
    packed in one call, instead of one hand-over per transaction. The
    connection still hands them over itself when it closes, when a WAL
    injector wants them as they finish, or when it holds ``_DELIVER_AT``.
    """

    __slots__ = ("tracer", "conn_id", "session", "open_op", "gap", "pre")
    collects = True

    def __init__(self, tracer: "ProcessTracer", conn_id: int, session: Any, open_op: tuple) -> None:
        self.tracer = tracer
        self.conn_id = conn_id
        self.session = session
        self.open_op = open_op
        self.gap = False
        self.pre = Presampler(session.startup_params.get("application_name"))

    def statements(self, records: list) -> None:
        t = self.tracer
        if not t.enabled or not t.accepting:
            if t.enabled:
                STATS.statements_dropped += len(records)
            if not self.gap:
                self.gap = True
                t._ops.append((OP_STATEMENTS_UNSEEN, self.conn_id))
            return
        self.gap = False
        app = self.session.server_params.get("application_name")
        rate = t._sample_rate
        if rate < 1.0 and t._presample:
            # New roots the sample rate leaves out stop here (sampling.Presampler).
            drawn, records, left_out = self.pre.split(records, rate, t._keep_slow_ns, t._keep_errors)
            if left_out:
                t._left_out += left_out
                STATS.statements += left_out
            if drawn:
                self._hand(t, app, drawn, True)
        if records:
            self._hand(t, app, records, False)
        t._arm()  # (sooner, when only an idle look was set)

    def _hand(self, t, app, records: list, drawn: bool) -> None:
        t._ops.append((OP_STATEMENTS_PACKED, self.conn_id, len(records), app, pack_records(records), drawn))
        t._pending += len(records)

    def close(self) -> None:
        t = self.tracer
        t._handles.pop(self.conn_id, None)
        t._ops.append((OP_CONNECTION_CLOSED, self.conn_id))
        if not t._armed:
            t._arm()


class SourceStatus:
    """The relay process's view of the helper's server-side sources (admin ``/status``).

    ``status`` is updated in place from the helper's reports; the start-up
    line that sums it up is logged here, in the proxy's log, once the first
    helper's probes are done.
    """

    def __init__(self) -> None:
        self.status: dict[str, str] = {}
        self._ready = threading.Event()
        self._logged = False

    def update(self, status: dict, ready: bool) -> None:
        self.status.update(status)
        if ready and not self._logged:
            self._logged = True
            from ..enrich import log_status

            log_status(self.status)
        if ready:
            self._ready.set()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Block until the helper's start-up probes are done (tests)."""
        return self._ready.wait(timeout)


class ProcessTracer:
    """The tracer the proxy talks to: records handed to the span process (module docstring)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.enabled = config.tracing
        self._sample_rate = config.sample_rate
        # the relay draws for new roots (sampling.Presampler) unless transaction spans need every
        # statement, or the latency histograms count every statement (tracing/histograms.py)
        self._presample = not config.transaction_spans and not config.latency_histograms
        self._keep_errors = False
        self._keep_slow_ns = 0
        self._keep_relay_side(config)
        #: the span process's latest latency histograms (histograms.LatencyHistograms.snapshot), for /metrics
        self.latency: list = []
        self._left_out = 0  # statements the relay's draw left out (part of STATS.statements)
        self.shutdown_timeout = config.shutdown_timeout
        self.sources = SourceStatus()  # server-side enrichment's sources, as the helper reports them
        self.accepting = False  # a helper is running and the outgoing buffer has room
        self._ops: list = []
        self._pending = 0  # statements in _ops
        self._armed = False
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handles: dict[int, _Handle] = {}
        self._next_conn = 0
        self._lock = threading.Lock()  # one writer at a time: the loop's timer, or shutdown/flush
        self._out = _Outbox()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._restart_at = 0.0
        self._child_queue = 0
        # Counts before this tracer (an earlier tracer of the process) and of helpers
        # that exited: the helper's counts add to them, so counters never go down.
        self._base = {name: getattr(STATS, name) for name in CHILD_COUNTERS}
        self._last = dict.fromkeys(CHILD_COUNTERS, 0)
        self._child_dropped = 0
        self._flush_seq = 0
        self._flushed = 0
        self._flush_cond = threading.Condition()
        self._priority = config.span_process_priority
        self._lifted = False  # the helper was lifted out of the idle class to catch up
        self._reported = time.monotonic()  # when the helper last reported (its reader thread sets it)
        self._may_lift = self._priority == "idle" and may_leave_idle()
        if self._priority == "idle" and not self._may_lift:
            log.info("the span process may not be lifted out of the idle scheduling class when it falls "
                     "behind (no CAP_SYS_NICE, RLIMIT_NICE below 20): it runs at low priority instead")
        self._start_child()

    # -------------------------------------------------------------- helper

    def _start_child(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        settings = _child_config(self.config, sample_rate=self._sample_rate, priority="idle" if self._may_lift else (
            "low" if self._priority == "idle" else self._priority))
        self._lifted = False
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pgotel_proxy.tracing.process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
            )
        except OSError as exc:
            log.error("could not start the span process: %s; statements are not traced until it runs", exc)
            ours.close()
            theirs.close()
            self._restart_at = time.monotonic() + _RESTART_DELAY
            return
        theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._out = _Outbox()
        self._out.append(_frame(settings))
        try:  # the settings now, so that the helper sets itself up before the first records
            self._out.send(ours)
        except OSError:
            pass  # left in _out: the next send takes it
        # Sessions already open are announced again, so the new helper knows them.
        self._ops = [h.open_op for h in self._handles.values()] + self._ops
        self._last = dict.fromkeys(CHILD_COUNTERS, 0)
        self._child_dropped = 0
        self.accepting = True
        # The reader has its own socket object with a timeout: a blocking one
        # would clear O_NONBLOCK on the shared file and block the relay's sends.
        reader_sock = ours.dup()
        reader_sock.settimeout(_STARVED_AFTER)
        self._reported = time.monotonic()
        self._reader = threading.Thread(target=self._read_loop, args=(reader_sock, ours, self._proc),
                                        name="pgotel-span-process", daemon=True)
        self._reader.start()

    def _read_loop(self, rsock: socket.socket, sock: socket.socket, proc: subprocess.Popen) -> None:
        buf = bytearray()
        try:
            while True:
                try:
                    frames = _read_frames(rsock, buf)
                except TimeoutError:
                    if proc.poll() is not None:
                        break
                    self._starving(sock)
                    continue
                except (OSError, ValueError):
                    frames = None
                if frames is None:
                    break
                for msg in frames:
                    self._report(msg)
        finally:
            rsock.close()
            self._child_gone(sock, proc)

    def _starving(self, sock: socket.socket) -> None:
        """No report for ``_STARVED_AFTER``: the helper gets no CPU (or hangs); lift it (see ``_lift``).

        With few statements the relay's buffer never grows, so its size alone
        would leave an idle-class helper without CPU on a busy machine for as
        long as the machine stays busy, and its spans (and a flush) with it.
        """
        with self._lock:
            if not (self._may_lift and not self._lifted and self._sock is sock):
                return
            self._lift(True)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._arm, _IDLE_INTERVAL)  # a look that puts it back
            except RuntimeError:
                pass

    def _report(self, msg: dict) -> None:
        self._reported = time.monotonic()
        stats = msg.get("stats") or {}
        for name in CHILD_COUNTERS:
            value = stats.get(name, 0)
            self._last[name] = value
            setattr(STATS, name, self._base[name] + value)
        STATS.statements += self._left_out  # observed here, never handed over
        self._child_queue = msg.get("queue", 0)
        latency = msg.get("latency")
        if latency is not None:
            self.latency = latency
        sources = msg.get("sources")
        if sources is not None:
            self.sources.update(sources, bool(msg.get("sources_ready")))
        dropped = msg.get("dropped", 0)
        if dropped > self._child_dropped:  # statements the helper's own bounded queue refused
            STATS.statements_dropped += dropped - self._child_dropped
        self._child_dropped = dropped
        seq = msg.get("flushed")
        if seq is not None:
            with self._flush_cond:
                self._flushed = max(self._flushed, seq)
                self._flush_cond.notify_all()

    def _child_gone(self, sock: socket.socket, proc: subprocess.Popen) -> None:
        with self._lock:
            if self._sock is sock:
                self.accepting = False
                self._sock = None
                self._out = _Outbox()
                STATS.span_process_backlog_bytes = 0
                for name in CHILD_COUNTERS:
                    self._base[name] += self._last[name]
                    self._last[name] = 0
                self._child_queue = 0
        try:
            code = proc.wait(self.shutdown_timeout + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        try:
            sock.close()
        except OSError:
            pass
        with self._flush_cond:
            self._flush_cond.notify_all()
        if not self._stopping:
            log.error("the span process exited (code %s); statements are not traced until it is back", code)
            self._restart_at = time.monotonic() + _RESTART_DELAY
            loop = self._loop
            if loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self._arm)
                except RuntimeError:
                    pass

    # -------------------------------------------------------- relay facing

    @property
    def sample_rate(self) -> float:
        return self._sample_rate

    def set_sample_rate(self, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("sample rate must be between 0 and 1")
        self._sample_rate = rate
        self._ops.append((OP_SAMPLE_RATE, rate))
        self._send_soon()
        log.info("sample rate set to %s", rate)

    def _keep_relay_side(self, config: Config) -> None:
        # failed and slow statements the draw leaves out go to the span process all the same
        # (sampling.keep_reason), unless the rule can keep none
        keeping = config.always_trace_rate > 0
        self._keep_errors = keeping and config.always_trace_errors
        self._keep_slow_ns = int(config.always_trace_slower_than * 1e9) if keeping else 0

    def set_keep_rule(self, config: Config) -> None:
        """Apply ``config``'s ``always_trace_*`` rule (a reload): here for the relay's draw, and in the span process."""
        self._keep_relay_side(config)
        self._ops.append((OP_KEEP_RULE, config.always_trace_errors, int(config.always_trace_slower_than * 1e9),
                          config.always_trace_rate))
        self._send_soon()

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        log.info("tracing %s", "enabled" if enabled else "disabled")

    def queue_size_now(self) -> int:
        return self._pending + self._child_queue

    def wants_connection(self, session) -> bool:
        return True

    def open(self, info) -> _Handle:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._next_conn += 1
        conn_id = self._next_conn
        session = info.session
        op = (OP_CONNECTION_OPENED, conn_id, connection_attributes(info), session.backend_pid,
              session.startup_params.get("application_name"))
        handle = _Handle(self, conn_id, session, op)
        self._handles[conn_id] = handle
        self._ops.append(op)
        self._arm()
        return handle

    # ------------------------------------------------ sending (event loop)

    def _arm(self, delay: float = _SEND_INTERVAL) -> None:
        """Look again within ``delay`` (sooner than an idle look already set, if that is later)."""
        loop = self._loop
        if loop is None:
            return
        due = loop.time() + delay
        if self._armed:
            if self._due <= due or self._timer is None:
                return
            self._timer.cancel()  # statements came in while an idle look was set
        self._armed = True
        self._due = due
        self._timer = loop.call_later(delay, self._tick)

    def _send_soon(self) -> None:
        loop = self._loop
        if loop is None:
            self._send()
            return
        try:
            loop.call_soon_threadsafe(self._tick_now)
        except RuntimeError:  # the loop is closed
            self._collect()
            self._send()

    def _tick_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._tick()

    def _collect(self) -> int:
        """Take the statements the open connections finished since the last send (see ``_Handle``)."""
        n = 0
        for h in list(self._handles.values()):
            done = h.session.completed
            if done:
                n += len(done)
                h.statements(h.session.take_completed())
        return n

    def _tick(self) -> None:
        self._armed = False
        self._timer = None
        busy = self._collect()
        self._send()
        if busy or self._out or self._ops or (self._sock is None and not self._stopping):
            self._arm()
        elif self._handles or self._lifted:
            self._arm(_IDLE_INTERVAL)  # connections open but quiet (or a lifted helper to put back): look less often

    def _send(self, blocking_until: float | None = None) -> None:
        with self._lock:
            if self._sock is None and not self._stopping and time.monotonic() >= self._restart_at:
                self._start_child()
            ops, self._ops = self._ops, []
            pending, self._pending = self._pending, 0
            sock = self._sock
            if sock is None:
                STATS.statements_dropped += pending
                return
            out = self._out
            if ops:
                if len(out) > _MAX_OUT:
                    self._drop(ops)
                else:
                    try:
                        data = marshal.dumps(ops)
                    except ValueError:  # a value marshal cannot write: should not happen
                        log.exception("could not hand records to the span process")
                        self._drop(ops)
                    else:
                        out.append(_LEN.pack(len(data)))
                        out.append(data)
            while out:
                try:
                    if blocking_until is not None:
                        sock.settimeout(max(0.001, blocking_until - time.monotonic()))
                    out.send(sock)
                except (BlockingIOError, InterruptedError):
                    break
                except (socket.timeout, OSError):  # OSError: the helper is gone, its reader thread says so
                    break
                finally:
                    if blocking_until is not None:
                        sock.setblocking(False)
            self.accepting = len(out) <= _MAX_OUT
            STATS.span_process_backlog_bytes = len(out)
            if self._may_lift:
                if not self._lifted and len(out) > _LIFT_AT:
                    self._lift(True)
                elif self._lifted and not out and time.monotonic() - self._reported < 2 * _REPORT_INTERVAL:
                    self._lift(False)

    def _lift(self, up: bool) -> None:
        """Move the helper's threads out of the idle class while it is behind, and back.

        In the idle class the helper runs only on CPU time nobody else wants,
        which is what span work should cost, as long as there is such time.
        On a machine busy all the time it gets none, and statements would be
        dropped once the outgoing buffer is full. So when more than
        ``_LIFT_AT`` bytes of records wait for it, or it sent no report for
        ``_STARVED_AFTER`` (``_starving``), its threads get an ordinary share
        (counted in ``span_process_lifted``) until the buffer is empty and
        its reports come again. Only a process allowed to raise a priority (CAP_SYS_NICE, or
        RLIMIT_NICE of 20) may do this; elsewhere the helper runs at "low"
        instead (see ``may_leave_idle``).
        """
        proc = self._proc
        if proc is None:
            return
        policy = os.SCHED_OTHER if up else os.SCHED_IDLE
        try:
            tids = os.listdir(f"/proc/{proc.pid}/task")
        except OSError:
            return  # gone: its reader thread says so
        try:
            for tid in tids:
                try:
                    os.sched_setscheduler(int(tid), policy, os.sched_param(0))
                except ProcessLookupError:
                    pass  # a thread that ended in between
        except PermissionError as exc:
            log.warning("could not lift the span process out of the idle scheduling class (%s); "
                        "statements are dropped while it cannot keep up", exc)
            self._may_lift = False
            return
        self._lifted = up
        if up:
            STATS.span_process_lifted += 1
            log.debug("span process behind by %d bytes: lifted out of the idle class", len(self._out))

    def _drop(self, ops: list) -> None:
        """Statements that cannot be handed over: counted; connection events still go."""
        keep = []
        for op in ops:
            if op[0] == OP_STATEMENTS_PACKED:
                STATS.statements_dropped += op[2]
                h = self._handles.get(op[1])
                if h is not None and not h.gap:
                    h.gap = True
                    keep.append((OP_STATEMENTS_UNSEEN, op[1]))
            else:
                keep.append(op)
        if keep:
            self._ops[:0] = keep

    # ----------------------------------------------- control (any thread)

    def flush(self, timeout: float = 5.0) -> None:
        """Hand over everything recorded so far and wait until the helper built and exported it."""
        deadline = time.monotonic() + timeout
        self._flush_seq += 1
        seq = self._flush_seq
        self._ops.append((OP_FLUSH, seq))
        self._send_soon()
        with self._flush_cond:
            while self._flushed < seq and self._sock is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._flush_cond.wait(min(left, 0.05))
                if self._loop is None or not self._loop.is_running():
                    self._collect()
                    self._send(blocking_until=deadline)

    def shutdown(self) -> None:
        """Send what is left, let the helper export it, all within ``shutdown_timeout``."""
        deadline = time.monotonic() + self.shutdown_timeout
        self._stopping = True
        with self._lock:
            if self._may_lift and not self._lifted:
                # Its deadline runs from now: an idle-class helper on a busy machine would
                # not even read the request to stop in time.
                self._lift(True)
        if self._loop is None or not self._loop.is_running():
            self._collect()
        self._ops.append((OP_STOP, time.time() + self.shutdown_timeout))
        self._send(blocking_until=deadline)
        proc, reader = self._proc, self._reader
        if proc is not None:
            try:
                # A helper that read the request to stop in time is done by the deadline (it keeps
                # _EXIT_MARGIN to exit); one still behind on its input when it passes is stopped.
                proc.wait(max(0.0, deadline - time.monotonic()) + _EXIT_GRACE)
            except subprocess.TimeoutExpired:
                log.warning("shutdown: the span process did not finish within %ss", self.shutdown_timeout)
                proc.kill()
                proc.wait()
        if reader is not None:
            reader.join(2.0)


def _child_config(config: Config, *, sample_rate: float, priority: str) -> dict:
    """The helper's configuration as plain values (marshal-able): the proxy's, with what is live now.

    ``sample_rate`` may have changed at runtime since ``config`` was loaded;
    ``priority`` is the scheduling class the helper is to take (the configured
    one, or its stand-in where the proxy may not lift an idle helper). The
    helper only traces, so tracing is on. Secrets stay in the relay process,
    but for the stats DSN when enrichment is on: the helper opens its side
    connections.
    """
    from ..enrich import enabled as enrichment_enabled

    secrets = {name for name in Config.model_fields if is_secret_field(name)}
    data = config.model_dump(mode="json", exclude=secrets)
    data.update(tracing=True, sample_rate=sample_rate, span_process_priority=priority)
    if enrichment_enabled(config) and config.stats_dsn is not None:
        data["stats_dsn"] = config.stats_dsn.get_secret_value()
    return data


# ----------------------------------------------------------------- helper side


class _ChildInfo:
    """What the span builder reads of a connection, as the relay announced it."""

    __slots__ = ("session",)

    def __init__(self, backend_pid, startup_app) -> None:
        self.session = _ChildSession(backend_pid, startup_app)


class _ChildSession:
    __slots__ = ("backend_pid", "server_params", "startup_params")

    def __init__(self, backend_pid, startup_app) -> None:
        self.backend_pid = backend_pid
        self.server_params: dict = {}
        self.startup_params = {"application_name": startup_app} if startup_app else {}


def may_leave_idle() -> bool:
    """Whether this process may move a thread out of Linux's idle scheduling class.

    Leaving SCHED_IDLE asks the kernel for nice 0, which needs CAP_SYS_NICE
    or an RLIMIT_NICE of at least 20. Root has the capability; a container
    running as another user, or with its capabilities dropped, has neither.
    """
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
        if soft == resource.RLIM_INFINITY or soft >= 20:
            return True
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 23 & 1)  # CAP_SYS_NICE
    except (ImportError, AttributeError, OSError, ValueError):
        pass
    return False


def _take_priority(priority: str) -> None:
    """The span process's CPU priority, taken before it starts any thread (threads inherit it).

    ``idle`` (SCHED_IDLE): span work is background work. Under the normal
    policy, a burst of span building shares a core with the relay, the
    client or PostgreSQL for a scheduler slice, which shows in a query's
    latency; an idle-class process is preempted as soon as one of them
    wakes. On a machine busy all the time it gets no CPU at all: the relay
    then lifts it out of the class while it is behind (``ProcessTracer._lift``),
    when the proxy may.

    ``low`` (SCHED_BATCH at nice 10): a small share that it keeps when the
    machine is busy (so it keeps up where the idle class, without lifting,
    would get nothing and drop statements), and no preemption of others when
    it wakes.
    The default's stand-in where lifting is not allowed.

    ``normal``: an ordinary share.
    """
    try:
        if priority == "idle":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        elif priority == "low":
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, 0, max(_LOW_NICE, os.getpriority(os.PRIO_PROCESS, 0)))
    except (AttributeError, OSError) as exc:  # not Linux, or refused by a sandbox
        log.info("span process: could not take the %s scheduling priority (%s); running at normal priority",
                 priority, exc)


def child_main(fd: int) -> int:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    buf = bytearray()
    first = _read_frames(sock, buf)
    if not first:
        return 0
    config = Config.model_validate(first.pop(0))
    from ..logsetup import configure_logging

    configure_logging(config.log_level, config.log_format)
    _take_priority(config.span_process_priority)
    from .helper import SpanHelper
    from .spans import ConnState

    # No builder thread: this thread reads and builds, the export thread exports.
    helper = SpanHelper(config)
    conns: dict[int, ConnState] = {}
    # Backend pid of each open connection: the wait-event sampler's list (read from its thread).
    backends: dict[int, int] = {}
    from ..enrich import enabled as enrichment_enabled

    enricher = None
    if enrichment_enabled(config):
        from ..enrich import start_enricher

        enricher = start_enricher(config, helper, lambda: list(backends.values()))
    build = helper.build
    pipeline = helper.pipeline
    send_lock = threading.Lock()
    done = threading.Event()
    flushed: list = []
    reported = [-1]  # the histograms' change count last reported: an unchanged state is not sent again

    def report(extra: dict | None = None) -> None:
        msg = {"stats": {n: getattr(STATS, n) for n in CHILD_COUNTERS}, "queue": helper.queue_size_now(),
               "dropped": STATS.statements_dropped}
        latency = helper.latency
        if latency is not None and latency.changes != reported[0]:
            reported[0] = latency.changes
            msg["latency"] = latency.snapshot()
        if enricher is not None:
            msg["sources"] = dict(enricher.status)
            msg["sources_ready"] = enricher.ready()
        if extra:
            msg.update(extra)
        with send_lock:
            try:
                sock.sendall(_frame(msg))
            except OSError:
                pass

    def reporter() -> None:
        while not done.wait(_REPORT_INTERVAL):
            report()

    threading.Thread(target=reporter, name="pgotel-report", daemon=True).start()
    # Every span here is a tuple that lives until its batch is exported, so with the
    # default thresholds the collector walks each several times, and with it all the
    # SDK's and parser's objects (runtime.settle_gc): a cost paid on every statement.
    from ..runtime import settle_gc

    settle_gc()
    # Statements waiting for their plans leave when their wait is over, input or not:
    # with an enricher, input is waited for _ENRICH_TICK at a time (a poll, not a socket
    # timeout, which would make the reporter's sends non-blocking too).
    readable = None
    if enricher is not None:
        import select

        readable = select.poll()
        readable.register(sock, select.POLLIN)
    pending = first
    stop = False
    stop_by = None  # wall-clock deadline of the proxy's shutdown
    while not stop:
        if pending is None:
            if readable is not None and not readable.poll(_ENRICH_TICK * 1000):
                helper.tick()
                continue
            try:
                pending = _read_frames(sock, buf)
            except (OSError, ValueError) as exc:
                log.error("span process: bad input from the proxy: %s", exc)
                pending = None
            if pending is None:
                break  # the proxy is gone: export what we have
        for ops in pending:
            spans: list = []
            for op in ops:
                kind = op[0]
                if kind == OP_STATEMENTS_PACKED:
                    state = conns.get(op[1])
                    if state is None:
                        continue
                    app, records = op[3], unpack_records(op[4])
                    if app is not None:
                        state.info.session.server_params["application_name"] = app
                    build(state, records, spans, op[-1] is True)
                    if len(spans) >= pipeline.batch_size:  # a large frame goes in parts too
                        helper.export(spans)
                        spans = []
                elif kind == OP_CONNECTION_OPENED:
                    _, conn_id, base, pid, app = op
                    conns[conn_id] = ConnState(_ChildInfo(pid, app), base)
                    if pid is not None:
                        backends[conn_id] = pid
                elif kind == OP_CONNECTION_CLOSED:
                    backends.pop(op[1], None)
                    state = conns.pop(op[1], None)
                    if state is not None:
                        helper.close(state, spans)
                elif kind == OP_STATEMENTS_UNSEEN:
                    state = conns.get(op[1])
                    if state is not None:
                        state.forget()
                elif kind == OP_SAMPLE_RATE:
                    helper.set_sample_rate(op[1])
                elif kind == OP_KEEP_RULE:
                    helper.builder.set_keep_rule(op[1], op[2], op[3])
                elif kind == OP_FLUSH:
                    flushed.append(op[1])
                elif kind == OP_STOP:
                    stop = True
                    stop_by = op[1]
            # Each frame's spans go to the export queue before the next frame is built:
            # frames that waited together (this process runs on idle CPU) never arrive
            # at the queue as one burst larger than its room.
            helper.export(spans)
        pending = None
        helper.tick()
        if flushed:
            helper.flush(helper.shutdown_timeout)
            report({"flushed": flushed[-1]})
            flushed.clear()
    # Within the proxy's deadline, whenever the request to stop was read (less a moment to exit).
    helper.shutdown(helper.shutdown_timeout if stop_by is None else stop_by - time.time() - _EXIT_MARGIN)
    done.set()
    report()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(int(sys.argv[1])))
