"""Fuzz targets: one function per parser the proxy feeds untrusted input to.

Each target takes one ``bytes`` input and either returns or raises
:class:`AssertionError` (an invariant broke) or any other exception (a parser
raised something it must not). The same functions serve the coverage-guided
runs (``run.py``, atheris/libFuzzer) and the bounded replay in CI
(``test_fuzz.py``), so a corpus file means the same thing to both.

Input layouts (the first byte or two steer options so one corpus covers them):

* ``client``  – ``mode`` byte, then client bytes after the start-up packet.
  Bit 0: ``flush_phases``; bits 1-7: chunk size selector. Fed to
  ``Session.client_data``. Only :class:`ProtocolViolation` (08P01) may come
  out; without ``flush_phases`` what is forwarded must be exactly what came in.
* ``server``  – ``mode`` byte, big-endian uint16 ``k``, ``k`` client bytes
  (fed first, so requests are pending), then server bytes (start-up answers
  included). Bit 0: hold mode (``server_filter``) instead of
  ``server_observe``; bit 1: ``strip_scram_plus``; bits 2-7: chunk size
  selector. Nothing may come out; in hold mode without SCRAM stripping the
  forwarded bytes plus what is still held must equal the input.
* ``startup`` – a start-up packet as a client sends it (length prefix
  included). Only :class:`ProtocolViolation` may come out of
  ``startup_packet_length`` / ``parse_startup_packet``; decoded parameters
  survive an encode/parse round trip.
* ``sqlcomment`` – UTF-8 text (invalid sequences become lone surrogates, as
  a careless decoder might hand over); ``sqlcomment.parse`` must not reach its
  catch-all, tags stay within the documented caps and are encodable.
* ``sqlinfo`` – UTF-8 text as above; ``analyze``/``analyze_many`` must not log
  (their catch-alls log), summaries stay within 255 characters, every string
  is encodable (an unencodable attribute would break the OTLP export).

Every target is also bounded in time per input (checked by the callers) and
checks buffer and queue bounds after each chunk.
"""

from __future__ import annotations

import logging
import struct
from typing import Callable

from pgotel_proxy import sqlcomment
from pgotel_proxy.protocol import ProtocolViolation, Session, encode_startup, parse_startup_packet, startup_packet_length
from pgotel_proxy.tracing import sqlinfo

__all__ = ["TARGETS", "MAX_INPUT", "watch_logs"]

OBSERVE_LIMIT = 1024
MAX_PENDING = 64
MAX_MESSAGE = 1 << 16
MAX_STARTUP = 10000
# Largest input a run generates (libFuzzer -max_len); corpus files stay below it.
MAX_INPUT = 1 << 14
_CHUNKS = (0, 1, 2, 3, 5, 7, 13, 64, 4096)


def _chunks(data: bytes, selector: int):
    size = _CHUNKS[selector % len(_CHUNKS)]
    if size == 0 or size >= len(data):
        if data:
            yield data
        return
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _bounds(s: Session) -> None:
    assert len(s._cbuf) <= OBSERVE_LIMIT + 5, len(s._cbuf)
    assert len(s._sbuf) <= OBSERVE_LIMIT + 5, len(s._sbuf)
    assert len(s._pending) <= MAX_PENDING + 1, len(s._pending)
    assert len(s._prepared) <= 10_000 and len(s._portals) <= 10_000


def _session(**kw) -> Session:
    return Session(observe_limit=OBSERVE_LIMIT, max_pending=MAX_PENDING, max_message_size=MAX_MESSAGE, **kw)


def target_client(data: bytes) -> None:
    if not data:
        return
    mode, stream = data[0], data[1:]
    flush = bool(mode & 1)
    s = _session(flush_phases=flush)
    out: list[bytes] = []
    fed = 0
    for piece in _chunks(stream, mode >> 1):
        try:
            r = s.client_data(piece, fed)
        except ProtocolViolation as exc:
            assert exc.sqlstate == "08P01", exc.sqlstate
            return  # the proxy answers 08P01 and closes: nothing more is read
        fed += len(piece)
        out.append(piece if r is None else r)
        _bounds(s)
        # Statements finish only on server answers: the client side alone completes nothing.
        assert not s.completed
    if not flush:
        # Relay transparency: every byte forwarded once, in order; the rest is held.
        assert b"".join(out) + s._cbuf == stream


def target_server(data: bytes) -> None:
    if len(data) < 3:
        return
    mode = data[0]
    (k,) = struct.unpack_from("!H", data, 1)
    client, stream = data[3 : 3 + k], data[3 + k :]
    hold, strip = bool(mode & 1), bool(mode & 2)
    s = _session(strip_scram_plus=strip)
    try:
        s.client_data(client, 0)
    except ProtocolViolation:
        return  # that connection would be closed before any server byte is read
    out: list[bytes] = []
    now = 1
    for piece in _chunks(stream, mode >> 2):
        now += 1
        if hold and s.server_hold:
            out.append(s.server_filter(piece, now))
        else:
            s.server_observe(piece, now)
            out.append(piece)
        _bounds(s)
        for rec in s.take_completed():
            assert rec.status in ("ok", "error", "skipped", "suspended", "incomplete", "prepared"), rec.status
    s.finish_all(now + 1)
    s.take_completed()
    if not strip:
        sent = b"".join(out)
        held = s._sbuf[s._sfwd :] if s.out_of_sync is None else b""
        assert sent + held == stream, (len(sent), len(held), len(stream), s.out_of_sync)


def target_startup(data: bytes) -> None:
    if len(data) < 4:
        return
    try:
        n = startup_packet_length(data[:4], MAX_STARTUP)
    except ProtocolViolation as exc:
        assert exc.sqlstate == "08P01"
        return
    assert 8 <= n <= MAX_STARTUP
    if len(data) < n:
        return  # the proxy would wait for the rest (bounded by its start-up timeout)
    raw = data[:n]
    try:
        packet = parse_startup_packet(raw)
    except ProtocolViolation as exc:
        assert exc.sqlstate in ("08P01", "0A000", "28000"), exc.sqlstate
        return
    assert packet.kind in ("startup", "ssl", "gssenc", "cancel")
    assert packet.raw == raw
    if packet.kind == "cancel":
        assert packet.cancel_pid is not None and 0 <= len(packet.cancel_key) <= 256
    if packet.kind == "startup":
        params = packet.params
        assert "user" in params
        for key, value in params.items():
            assert isinstance(key, str) and isinstance(value, str)
            key.encode("utf-8")
            value.encode("utf-8")
        if all("\x00" not in k + v for k, v in params.items()):
            again = parse_startup_packet(encode_startup(params, packet.code))
            assert again.params == params


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def target_sqlcomment(data: bytes) -> None:
    sql = _text(data)
    for max_len in (8192, 64):
        c = sqlcomment.parse(sql, max_len=max_len)
        if c is None:
            continue
        # (Tags may be empty: a pair list whose pairs were all over the caps is still
        # recognised and stripped, by design.)
        assert len(c.tags) <= sqlcomment._MAX_TAGS + len(sqlcomment._CONTEXT_KEYS)
        for key, value in c.tags.items():
            assert key and len(key) <= sqlcomment._MAX_KEY_LEN
            assert len(value) <= sqlcomment._MAX_VALUE_LEN
            key.encode("utf-8")
            value.encode("utf-8")
        assert len(c.stripped_sql) < len(sql)
        if c.context is not None:
            assert sqlcomment.parse_traceparent(c.context.traceparent()) is not None
            assert c.context.trace_id and c.context.span_id
            assert c.context.tracestate is None or len(c.context.tracestate) <= sqlcomment._MAX_TRACESTATE_LEN
        assert c.invalid_traceparent == ("traceparent" in c.tags and c.context is None)


def _check_info(info: sqlinfo.SqlInfo, sql: str) -> None:
    assert len(info.summary) <= sqlinfo.MAX_SUMMARY_CHARS, info.summary
    for text in (info.summary, info.operation or "", info.collection or "", info.sanitized):
        assert isinstance(text, str)
        text.encode("utf-8")
    assert len(info.sanitized) <= 3 * min(len(sql), sqlinfo.FALLBACK_MAX_CHARS) + 8, (len(info.sanitized), len(sql))
    assert info.statement_count >= 0


def target_sqlinfo(data: bytes) -> None:
    sql = _text(data)
    info = sqlinfo.analyze(sql)
    _check_info(info, sql)
    many = sqlinfo.analyze_many(sql)
    for one in many:
        _check_info(one, sql)
    if len(many) > 1:
        assert info.statement_count == len(many)
    sqlinfo.fingerprint(sql)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "client": target_client,
    "server": target_server,
    "startup": target_startup,
    "sqlcomment": target_sqlcomment,
    "sqlinfo": target_sqlinfo,
}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# The parsers' catch-alls log; a record from them means a bug was swallowed.
_WATCHED = ("pgotel_proxy.sqlcomment", "pgotel_proxy.tracing.sqlinfo")


def watch_logs() -> Callable[[], list[str]]:
    """Collect every record the parsers log; return a function that takes and clears them.

    The returned function has a ``close()`` attribute that detaches the handler
    and restores the loggers' levels.
    """
    handler = _Records()
    saved = {}
    for name in _WATCHED:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)

    def take() -> list[str]:
        got = [f"{r.name}: {r.getMessage()}" for r in handler.records]
        handler.records.clear()
        return got

    def close() -> None:
        for name, level in saved.items():
            logger = logging.getLogger(name)
            logger.removeHandler(handler)
            logger.setLevel(level)

    take.close = close  # type: ignore[attr-defined]
    return take
