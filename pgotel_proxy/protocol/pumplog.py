"""The compiled pump's observation log, read: its layout on the Python side and its reader.

The pump (proxy/_pump.c) relays traced connections on its own thread and
appends what it relayed to a log, which the event loop takes every few
milliseconds and feeds to the connections' sessions here. The layout is
``pgotel_proxy/_pumplog.h`` for the C writer and :data:`LOG_HEAD` with the
``PUMP_LOG_*`` kinds here (tests/test_kinds.py holds the two equal).

An entry: a head (pair id int64, kind int32, length int32, receive time in ns
int64, native byte order), then ``length`` bytes. Parsing a buffer is all this
module does (no I/O); the connections it is given are duck-typed: ``observe``
and ``session`` are read, everything else goes to ``resume``.
"""

from __future__ import annotations

import struct

try:
    import cython
except ImportError:  # no Cython: the module runs interpreted
    from ._nocython import cython

from .session import Session

__all__ = ["LOG_HEAD", "PUMP_LOG_CLIENT", "PUMP_LOG_SERVER", "PUMP_LOG_HANDBACK", "PUMP_LOG_CLIENT_WAIT", "observe_log"]

#: The head of an entry: pair id, kind, length, receive time (ns), native byte order.
LOG_HEAD = struct.Struct("=qiiq")
PUMP_LOG_CLIENT = 0  # bytes the client sent, already forwarded
PUMP_LOG_SERVER = 1  # bytes the server sent, already forwarded
PUMP_LOG_HANDBACK = 2  # the pair is handed back to the event loop
PUMP_LOG_CLIENT_WAIT = 3  # the server's side was not read while the client's socket was full: ns (int64)
#: What follows a PUMP_LOG_CLIENT_WAIT head: the wait in ns, native byte order.
CLIENT_WAIT = struct.Struct("=q")

def observe_log(log: bytes, pumped: dict, resume) -> dict:
    """Feed the pump's log to the sessions of the connections in ``pumped`` (pair id -> connection), in order.

    A client or server chunk of a connection that still observes goes to its
    session in place (``client_observe`` / ``server_observe`` over the range);
    when that raises, ``resume(conn, kind, log, exc, stop, ts)``. A pair handed
    back (PUMP_LOG_HANDBACK) goes to ``resume(conn, kind, log, start, stop, ts)``.
    A client wait (PUMP_LOG_CLIENT_WAIT) goes to ``session.client_waited``.
    Entries of pairs not in ``pumped`` are skipped. Returns the connections fed
    (pair id -> connection), for the caller to hand their finished statements
    on; a pair handed back is left out (its hand-back does that itself).
    Raises ValueError for a truncated entry.
    """
    touched: dict = {}
    # pair id -> (connection, its session while it observes, else None), read at the pair's
    # first entry of this call; dropped after a hand-back or a failure, which may change them.
    # A pair has many entries a call (each chunk of the last few milliseconds): one look-up
    # an entry instead of the connection's two attributes and two dicts.
    seen: dict = {}
    pos, end = 0, len(log)
    head = LOG_HEAD.unpack_from
    # The kinds as locals: compiled, C ints compared as such (the module's names are
    # Python ints, looked up and made again at every comparison otherwise).
    client_kind, handback_kind, wait_kind = PUMP_LOG_CLIENT, PUMP_LOG_HANDBACK, PUMP_LOG_CLIENT_WAIT
    while pos < end:
        if end - pos < 24:
            raise ValueError("observe_log: a truncated record")
        if cython.compiled:  # the head as the pump wrote it (native byte order, unaligned)
            p = PyBytes_AS_STRING(log) + pos
            memcpy(cython.address(pair64), p, 8)
            memcpy(cython.address(kind32), p + 8, 4)
            memcpy(cython.address(length32), p + 12, 4)
            memcpy(cython.address(ts64), p + 16, 8)
            pair, kind, length, ts = pair64, kind32, length32, ts64  # (pair and ts made Python ints once)
        else:
            pair, kind, length, ts = head(log, pos)
        pos += 24
        if length < 0 or length > end - pos:
            raise ValueError("observe_log: a truncated record")
        stop = pos + length
        known = seen.get(pair)
        if known is None:
            conn = pumped.get(pair)
            if conn is None:
                pos = stop
                continue
            known = seen[pair] = (conn, conn.session if conn.observe else None)
            # (a pair with only a client wait here is handed on too: it finds nothing finished)
            touched[pair] = conn
        conn, session = known
        if kind == handback_kind:
            touched.pop(pair, None)
            del seen[pair]
            resume(conn, kind, log, pos, stop, ts)
        elif kind == wait_kind:
            if session is not None and length == 8:
                if cython.compiled:
                    memcpy(cython.address(waited64), PyBytes_AS_STRING(log) + pos, 8)
                    waited = waited64
                else:
                    (waited,) = CLIENT_WAIT.unpack_from(log, pos)
                session.client_waited(waited)
        elif session is not None:
            try:
                if cython.compiled and isinstance(session, Session):  # the methods called directly
                    if kind == client_kind:
                        cython.cast(Session, session).client_observe(log, pos, stop, ts)
                    else:
                        cython.cast(Session, session).server_observe(log, ts, pos, stop)
                elif kind == client_kind:
                    session.client_observe(log, pos, stop, ts)
                else:
                    session.server_observe(log, ts, pos, stop)
            except Exception as exc:
                del seen[pair]
                resume(conn, kind, log, exc, stop, ts)
        pos = stop
    return touched
