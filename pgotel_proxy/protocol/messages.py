"""The few message decoders the tracer needs, and encoders for what the proxy says itself.

Names follow the "Message Formats" chapter of the PostgreSQL documentation;
(F) marks frontend messages, (B) backend ones; the type bytes are named in
:mod:`.kinds`. Decoders take the buffer and the payload bounds (after type
byte and length) so nothing is copied before it is known to be needed.
"""

from __future__ import annotations

import struct

from .kinds import (
    BACKEND_AUTHENTICATION,
    BACKEND_ERROR_RESPONSE,
    FRONTEND_FLUSH,
    FRONTEND_QUERY,
    FRONTEND_SYNC,
)

__all__ = [
    "SSL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "CANCEL_REQUEST_CODE",
    "PROTOCOL_3_0",
    "PROTOCOL_3_2",
    "cstring",
    "decode_error_fields",
    "decode_parse",
    "decode_bind",
    "decode_sasl_mechanisms",
    "encode_sasl_mechanisms",
    "error_response",
    "query_message",
    "typed_message",
    "FLUSH",
    "SYNC",
]

_UINT32 = struct.Struct("!I")
_INT32 = struct.Struct("!i")
_UINT16 = struct.Struct("!H")

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3_0 = 196608
PROTOCOL_3_2 = 196610

FLUSH = bytes((FRONTEND_FLUSH, 0, 0, 0, 4))
SYNC = bytes((FRONTEND_SYNC, 0, 0, 0, 4))


def cstring(buf, start: int) -> tuple[str, int]:
    """Decode a NUL-terminated string at ``start``; return it and the offset after the NUL."""
    end = buf.index(0, start) if isinstance(buf, (bytes, bytearray)) else bytes(buf).index(0, start)
    if end == start:  # the unnamed statement or portal, the most common name
        return "", end + 1
    return bytes(buf[start:end]).decode("utf-8", "replace"), end + 1


def decode_parse(buf, start: int, end: int) -> tuple[str, str]:
    """Parse (F): statement name and query text."""
    name, pos = cstring(buf, start)
    query, _ = cstring(buf, pos)
    return name, query


def decode_bind(buf, start: int, end: int, want_params: bool = False):
    """Bind (F): portal name, statement name, and (only when asked) the parameter values.

    Parameter values are returned as text when their format is text, else as a
    hex string; None for SQL NULL.
    """
    portal, pos = cstring(buf, start)
    stmt, pos = cstring(buf, pos)
    if not want_params:
        return portal, stmt, None
    (nfmt,) = _UINT16.unpack_from(buf, pos)
    pos += 2
    fmts = [_UINT16.unpack_from(buf, pos + 2 * i)[0] for i in range(nfmt)]
    pos += 2 * nfmt
    (nparams,) = _UINT16.unpack_from(buf, pos)
    pos += 2
    params: list[str | None] = []
    for i in range(nparams):
        (ln,) = _INT32.unpack_from(buf, pos)
        pos += 4
        if ln < 0:
            params.append(None)
            continue
        raw = bytes(buf[pos : pos + ln])
        pos += ln
        fmt = fmts[0] if nfmt == 1 else (fmts[i] if i < nfmt else 0)
        params.append(raw.decode("utf-8", "replace") if fmt == 0 else "\\x" + raw.hex())
    return portal, stmt, params


def decode_error_fields(buf, start: int, end: int) -> dict[str, str]:
    """ErrorResponse / NoticeResponse (B): field code letter -> value."""
    fields: dict[str, str] = {}
    pos = start
    while pos < end and buf[pos] != 0:
        code = chr(buf[pos])
        value, pos = cstring(buf, pos + 1)
        fields[code] = value
    return fields


def decode_sasl_mechanisms(buf, start: int, end: int) -> list[str]:
    """AuthenticationSASL (B) payload after the int32 code: the list of mechanism names."""
    mechs = []
    pos = start
    while pos < end and buf[pos] != 0:
        m, pos = cstring(buf, pos)
        mechs.append(m)
    return mechs


def encode_sasl_mechanisms(mechs: list[str]) -> bytes:
    """A whole AuthenticationSASL (B) message offering ``mechs``."""
    body = _UINT32.pack(10) + b"".join(m.encode() + b"\x00" for m in mechs) + b"\x00"
    return typed_message(BACKEND_AUTHENTICATION, body)


def error_response(sqlstate: str, message: str, severity: str = "FATAL", detail: str | None = None) -> bytes:
    """A whole ErrorResponse (B) message, as the proxy sends it on its own behalf."""
    parts = [
        b"S" + severity.encode() + b"\x00",
        b"V" + severity.encode() + b"\x00",
        b"C" + sqlstate.encode() + b"\x00",
        b"M" + message.encode("utf-8", "replace") + b"\x00",
    ]
    if detail:
        parts.append(b"D" + detail.encode("utf-8", "replace") + b"\x00")
    body = b"".join(parts) + b"\x00"
    return typed_message(BACKEND_ERROR_RESPONSE, body)


def typed_message(kind: int, body: bytes) -> bytes:
    """A whole typed message of either direction: type byte (a :mod:`.kinds` name), int32 length, body."""
    return bytes((kind,)) + _UINT32.pack(len(body) + 4) + body


def query_message(sql: str) -> bytes:
    """Query (F)."""
    return typed_message(FRONTEND_QUERY, sql.encode() + b"\x00")
