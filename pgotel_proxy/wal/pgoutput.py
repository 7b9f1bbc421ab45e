"""pgoutput logical replication stream, decoded sans-IO.

Two layers, named as in the "Streaming Replication Protocol" and "Logical
Replication Message Formats" chapters of the PostgreSQL documentation:

* :func:`decode_copy_data` reads one CopyData payload of the replication
  stream: XLogData ('w') carrying a pgoutput message, or a primary keepalive
  ('k'). :func:`standby_status_update` encodes the reply ('r').
* :func:`decode_message` reads one pgoutput message: Begin, Commit, Origin,
  Relation, Type, Insert, Update, Delete, Truncate, Message. Streaming and
  two-phase messages (protocol 2+, only when asked for) come back as
  :class:`Unknown`.

Every decoder raises :class:`DecodeError` (never anything else) on truncated
or malformed input; nothing here does I/O.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

__all__ = [
    "DecodeError",
    "XLogData",
    "Keepalive",
    "Begin",
    "Commit",
    "Origin",
    "Relation",
    "Column",
    "TypeInfo",
    "Insert",
    "Update",
    "Delete",
    "Truncate",
    "LogicalMessage",
    "Unknown",
    "decode_copy_data",
    "decode_message",
    "standby_status_update",
    "lsn_to_str",
    "str_to_lsn",
    "pg_time_to_ns",
    "now_pg_time",
]

# Replication timestamps are microseconds since 2000-01-01 00:00:00 UTC.
PG_EPOCH_UNIX_S = 946684800

_q = struct.Struct("!q")
_Q = struct.Struct("!Q")
_i = struct.Struct("!i")
_I = struct.Struct("!I")
_h = struct.Struct("!h")
_QQq = struct.Struct("!QQq")
_Qq = struct.Struct("!Qq")

# Streaming replication messages: the first byte of a CopyData payload.
XLOG_DATA = ord("w")
PRIMARY_KEEPALIVE = ord("k")
STANDBY_STATUS_UPDATE = ord("r")

# pgoutput messages: the first byte of an XLogData's data.
PGOUTPUT_BEGIN = "B"
PGOUTPUT_COMMIT = "C"
PGOUTPUT_ORIGIN = "O"
PGOUTPUT_RELATION = "R"
PGOUTPUT_TYPE = "Y"
PGOUTPUT_INSERT = "I"
PGOUTPUT_UPDATE = "U"
PGOUTPUT_DELETE = "D"
PGOUTPUT_TRUNCATE = "T"
PGOUTPUT_MESSAGE = "M"

# TupleData: what precedes a tuple in Insert/Update/Delete, and each column's kind.
TUPLE_NEW = ord("N")
TUPLE_KEY = ord("K")
TUPLE_OLD = ord("O")
COLUMN_NULL = ord("n")
COLUMN_UNCHANGED_TOAST = ord("u")
COLUMN_TEXT = ord("t")
COLUMN_BINARY = ord("b")


class DecodeError(ValueError):
    """Truncated or malformed replication data."""


def lsn_to_str(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def str_to_lsn(text: str) -> int:
    hi, sep, lo = text.strip().partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def pg_time_to_ns(us: int) -> int:
    return (us + PG_EPOCH_UNIX_S * 1_000_000) * 1000


def now_pg_time() -> int:
    return time.time_ns() // 1000 - PG_EPOCH_UNIX_S * 1_000_000


# ---------------------------------------------------------------- stream layer


@dataclass(frozen=True, slots=True)
class XLogData:
    """XLogData (B): WAL data starting at ``start`` (one pgoutput message)."""

    start: int
    end: int
    send_time: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Primary keepalive message (B); ``reply`` asks for a status update now."""

    end: int
    send_time: int
    reply: bool


def decode_copy_data(payload: bytes) -> XLogData | Keepalive | None:
    """One CopyData payload of START_REPLICATION; None for a kind this module does not know."""
    if not payload:
        raise DecodeError("empty CopyData")
    kind = payload[0]
    try:
        if kind == XLOG_DATA:
            start, end, t = _QQq.unpack_from(payload, 1)
            return XLogData(start, end, t, bytes(payload[25:]))
        if kind == PRIMARY_KEEPALIVE:
            end, t = _Qq.unpack_from(payload, 1)
            if len(payload) < 18:
                raise DecodeError("truncated keepalive")
            return Keepalive(end, t, payload[17] != 0)
    except struct.error as exc:
        raise DecodeError(f"truncated replication message: {exc}") from None
    return None


def standby_status_update(written: int, flushed: int, applied: int, reply: bool = False, clock: int | None = None) -> bytes:
    """Standby status update (F) payload, to be sent inside CopyData."""
    sent = now_pg_time() if clock is None else clock
    return bytes((STANDBY_STATUS_UPDATE,)) + struct.pack("!QQQqB", written, flushed, applied, sent, 1 if reply else 0)


# -------------------------------------------------------------- pgoutput layer


@dataclass(frozen=True, slots=True)
class Begin:
    """Begin: ``final_lsn`` is the commit record's LSN."""

    final_lsn: int
    commit_time: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """Commit: ``end_lsn`` is where a consumer resumes after this transaction."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True, slots=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    flags: int  # 1: part of the replica identity key
    name: str
    type_oid: int
    typmod: int


@dataclass(frozen=True, slots=True)
class Relation:
    relid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]

    @property
    def qualified(self) -> str:
        return f"{self.namespace}.{self.name}" if self.namespace else self.name


@dataclass(frozen=True, slots=True)
class TypeInfo:
    oid: int
    namespace: str
    name: str


# A tuple: one entry per column: bytes (text or binary value), None (NULL) or
# Ellipsis (an unchanged TOASTed value the server did not send).
Tuple = tuple


@dataclass(frozen=True, slots=True)
class Insert:
    relid: int
    new: Tuple


@dataclass(frozen=True, slots=True)
class Update:
    relid: int
    old: Tuple | None  # key ('K') or whole old row ('O'), when the replica identity sends it
    new: Tuple


@dataclass(frozen=True, slots=True)
class Delete:
    relid: int
    old: Tuple


@dataclass(frozen=True, slots=True)
class Truncate:
    options: int  # 1 CASCADE, 2 RESTART IDENTITY
    relids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """Message: what ``pg_logical_emit_message`` wrote; content is raw bytes (untrusted)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Unknown:
    kind: str
    data: bytes


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes, pos: int = 1) -> None:
        self.buf = buf
        self.pos = pos

    def _take(self, n: int) -> int:
        p = self.pos
        if p + n > len(self.buf):
            raise DecodeError("truncated pgoutput message")
        self.pos = p + n
        return p

    def u8(self) -> int:
        return self.buf[self._take(1)]

    def i16(self) -> int:
        return _h.unpack_from(self.buf, self._take(2))[0]

    def i32(self) -> int:
        return _i.unpack_from(self.buf, self._take(4))[0]

    def u32(self) -> int:
        return _I.unpack_from(self.buf, self._take(4))[0]

    def u64(self) -> int:
        return _Q.unpack_from(self.buf, self._take(8))[0]

    def i64(self) -> int:
        return _q.unpack_from(self.buf, self._take(8))[0]

    def string(self) -> str:
        end = self.buf.find(b"\x00", self.pos)
        if end < 0:
            raise DecodeError("unterminated string in pgoutput message")
        s = self.buf[self.pos : end].decode("utf-8", "replace")
        self.pos = end + 1
        return s

    def raw(self, n: int) -> bytes:
        if n < 0:
            raise DecodeError("negative length in pgoutput message")
        p = self._take(n)
        return self.buf[p : p + n]

    def tuple(self) -> Tuple:
        n = self.i16()
        if n < 0:
            raise DecodeError("negative column count")
        out = []
        for _ in range(n):
            kind = self.u8()
            if kind == COLUMN_NULL:
                out.append(None)
            elif kind == COLUMN_UNCHANGED_TOAST:
                out.append(...)
            elif kind == COLUMN_TEXT or kind == COLUMN_BINARY:
                out.append(self.raw(self.i32()))
            else:
                raise DecodeError(f"unknown tuple column kind {kind!r}")
        return tuple(out)


def decode_message(data: bytes):
    """One pgoutput message (the payload of an XLogData)."""
    if not data:
        raise DecodeError("empty pgoutput message")
    kind = chr(data[0])
    r = _Reader(data)
    if kind == PGOUTPUT_BEGIN:
        return Begin(r.u64(), r.i64(), r.u32())
    if kind == PGOUTPUT_COMMIT:
        return Commit(r.u8(), r.u64(), r.u64(), r.i64())
    if kind == PGOUTPUT_ORIGIN:
        return Origin(r.u64(), r.string())
    if kind == PGOUTPUT_RELATION:
        relid = r.u32()
        ns = r.string()
        name = r.string()
        ident = chr(r.u8())
        n = r.i16()
        if n < 0:
            raise DecodeError("negative column count")
        cols = tuple(Column(r.u8(), r.string(), r.u32(), r.i32()) for _ in range(n))
        return Relation(relid, ns, name, ident, cols)
    if kind == PGOUTPUT_TYPE:
        return TypeInfo(r.u32(), r.string(), r.string())
    if kind == PGOUTPUT_INSERT:
        relid = r.u32()
        if r.u8() != TUPLE_NEW:
            raise DecodeError("Insert without a new tuple")
        return Insert(relid, r.tuple())
    if kind == PGOUTPUT_UPDATE:
        relid = r.u32()
        tag = r.u8()
        old = None
        if tag == TUPLE_KEY or tag == TUPLE_OLD:
            old = r.tuple()
            tag = r.u8()
        if tag != TUPLE_NEW:
            raise DecodeError("Update without a new tuple")
        return Update(relid, old, r.tuple())
    if kind == PGOUTPUT_DELETE:
        relid = r.u32()
        tag = r.u8()
        if tag != TUPLE_KEY and tag != TUPLE_OLD:
            raise DecodeError("Delete without an old tuple")
        return Delete(relid, r.tuple())
    if kind == PGOUTPUT_TRUNCATE:
        n = r.i32()
        if n < 0:
            raise DecodeError("negative relation count")
        opts = r.u8()
        return Truncate(opts, tuple(r.u32() for _ in range(n)))
    if kind == PGOUTPUT_MESSAGE:
        flags = r.u8()
        lsn = r.u64()
        prefix = r.string()
        content = r.raw(r.i32())
        return LogicalMessage(bool(flags & 1), lsn, prefix, content)
    return Unknown(kind, bytes(data))
