"""PostgreSQL wire messages for tests: builders of whole messages, frontend and backend, and a splitter.

The one place the tests spell out protocol bytes. Builders are named as the
messages in the "Message Formats" chapter of the PostgreSQL documentation and
return whole messages (type byte, int32 length, body); where
:mod:`pgotel_proxy.protocol.messages` already encodes a message, it is used.
Text arguments may be ``str`` (encoded as UTF-8) or ``bytes`` (sent as they
are, for tests that send invalid encodings).
"""

from __future__ import annotations

import struct

from pgotel_proxy.protocol.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    typed_message,
)

__all__ = [
    "AUTH_OK", "BIND_COMPLETE", "CLOSE_COMPLETE", "COPY_DONE", "EMPTY_QUERY", "FLUSH", "GSSENC_REQUEST",
    "NO_DATA", "PARSE_COMPLETE", "PORTAL_SUSPENDED", "SSL_REQUEST", "SYNC", "TERMINATE",
    "AuthSASL", "BackendKeyData", "Bind", "CancelRequest", "Close", "CommandComplete", "CopyData",
    "CopyFail", "CopyInResponse", "CopyOutResponse", "DataRow", "Describe", "ErrorResponse", "Execute",
    "FunctionCall", "FunctionCallResponse", "NoticeResponse", "Notification", "ParameterDescription",
    "ParameterStatus", "Parse", "Query", "ReadyForQuery", "RowDescription", "StartupMessage",
    "cstr", "fields", "message", "split",
]

_I = struct.Struct("!I")
_H = struct.Struct("!H")
_i = struct.Struct("!i")


def _bytes(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


def message(typ: str | bytes, body: bytes = b"") -> bytes:
    """A whole typed message: type byte, int32 length, body."""
    return typed_message(_bytes(typ)[0], body)


def cstr(text: str | bytes) -> bytes:
    """A NUL-terminated string."""
    return _bytes(text) + b"\x00"


def fields(**values: str) -> bytes:
    """The field list of an ErrorResponse or NoticeResponse, in the order given: ``fields(S="ERROR", C="42P01")``."""
    return b"".join(code.encode() + cstr(value) for code, value in values.items()) + b"\x00"


def _values(values) -> bytes:
    """A count of values, then each as int32 length (-1 for NULL) and bytes, as Bind and DataRow carry them."""
    return _H.pack(len(values)) + b"".join(_i.pack(-1) if v is None else _i.pack(len(v)) + v for v in values)


# ---------------------------------------------------------------------------
# Before a session: messages with no type byte (F)


def StartupMessage(user: str = "postgres", database: str = "postgres", code: int = PROTOCOL_3_0, **extra: str) -> bytes:
    """StartupMessage (F): protocol version and parameters."""
    params = {"user": user, "database": database, **extra}
    body = b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return struct.pack("!II", len(body) + 8, code) + body


def CancelRequest(pid: int, key: bytes) -> bytes:
    """CancelRequest (F): process id and secret key (4 bytes, or up to 256 from protocol 3.2)."""
    return struct.pack("!III", 12 + len(key), CANCEL_REQUEST_CODE, pid) + key


SSL_REQUEST = struct.pack("!II", 8, SSL_REQUEST_CODE)
GSSENC_REQUEST = struct.pack("!II", 8, GSSENC_REQUEST_CODE)


# ---------------------------------------------------------------------------
# Frontend (F)


def Query(sql: str | bytes) -> bytes:
    return message(b"Q", cstr(sql))


def Parse(sql: str | bytes, name: str = "", types: tuple[int, ...] = ()) -> bytes:
    return message(b"P", cstr(name) + cstr(sql) + _H.pack(len(types)) + b"".join(_I.pack(t) for t in types))


def Bind(stmt: str = "", portal: str = "", params: tuple[bytes | None, ...] = (), fmts: tuple[int, ...] = ()) -> bytes:
    """Bind (F) with parameter format codes ``fmts`` and no result format codes."""
    body = cstr(portal) + cstr(stmt) + _H.pack(len(fmts)) + b"".join(_H.pack(f) for f in fmts)
    return message(b"B", body + _values(params) + _H.pack(0))


def Describe(kind: str | bytes = b"P", name: str = "") -> bytes:
    return message(b"D", _bytes(kind) + cstr(name))


def Execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(b"E", cstr(portal) + _i.pack(max_rows))


def Close(kind: str | bytes, name: str) -> bytes:
    return message(b"C", _bytes(kind) + cstr(name))


def FunctionCall(oid: int, *args: bytes, arg_formats: tuple[int, ...] = (), result_format: int = 0) -> bytes:
    body = _I.pack(oid) + _H.pack(len(arg_formats)) + b"".join(_H.pack(f) for f in arg_formats)
    body += _H.pack(len(args)) + b"".join(_i.pack(len(a)) + a for a in args)
    return message(b"F", body + _H.pack(result_format))


def CopyData(data: bytes) -> bytes:
    return message(b"d", data)


def CopyFail(why: str) -> bytes:
    return message(b"f", cstr(why))


SYNC = message(b"S")
FLUSH = message(b"H")
COPY_DONE = message(b"c")
TERMINATE = message(b"X")


# ---------------------------------------------------------------------------
# Backend (B)

PARSE_COMPLETE = message(b"1")
BIND_COMPLETE = message(b"2")
CLOSE_COMPLETE = message(b"3")
NO_DATA = message(b"n")
PORTAL_SUSPENDED = message(b"s")
EMPTY_QUERY = message(b"I")
AUTH_OK = message(b"R", _I.pack(0))


def AuthSASL(*mechs: str) -> bytes:
    return message(b"R", _I.pack(10) + b"".join(cstr(m) for m in mechs) + b"\x00")


def BackendKeyData(pid: int, key: bytes) -> bytes:
    return message(b"K", _I.pack(pid) + key)


def ParameterStatus(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def ReadyForQuery(status: str = "I") -> bytes:
    return message(b"Z", status.encode())


def RowDescription(*names: str, type_oid: int = 25, type_size: int = -1) -> bytes:
    """RowDescription (B): one column per name, all of one type, text format, no table."""
    column = struct.pack("!IhIhih", 0, 0, type_oid, type_size, -1, 0)
    return message(b"T", _H.pack(len(names)) + b"".join(cstr(n) + column for n in names))


def DataRow(*values: bytes | None) -> bytes:
    return message(b"D", _values(values))


def CommandComplete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


def ErrorResponse(code: str, text: str = "boom", severity: str = "ERROR") -> bytes:
    return message(b"E", fields(S=severity, V=severity, C=code, M=text))


def NoticeResponse(text: str = "hello", code: str = "00000") -> bytes:
    return message(b"N", fields(S="NOTICE", V="NOTICE", C=code, M=text))


def Notification(pid: int, channel: str, payload: str) -> bytes:
    return message(b"A", _I.pack(pid) + cstr(channel) + cstr(payload))


def ParameterDescription(*oids: int) -> bytes:
    return message(b"t", _H.pack(len(oids)) + b"".join(_I.pack(o) for o in oids))


def CopyInResponse(ncols: int = 1) -> bytes:
    return message(b"G", b"\x00" + _H.pack(ncols) + b"\x00\x00" * ncols)


def CopyOutResponse(ncols: int = 1) -> bytes:
    return message(b"H", b"\x00" + _H.pack(ncols) + b"\x00\x00" * ncols)


def FunctionCallResponse(value: bytes) -> bytes:
    return message(b"V", _i.pack(len(value)) + value)


# ---------------------------------------------------------------------------
# Reading


def split(stream: bytes, start: int = 0) -> list[tuple[str, bytes]]:
    """The typed messages of ``stream`` from ``start`` as ``(type, body)`` pairs; a cut-off last one is left out."""
    out = []
    pos = start
    while pos + 5 <= len(stream):
        (length,) = _I.unpack_from(stream, pos + 1)
        end = pos + 1 + length
        if end > len(stream):
            break
        out.append((chr(stream[pos]), bytes(stream[pos + 5 : end])))
        pos = end
    return out
