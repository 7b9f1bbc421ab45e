"""The few message decoders the tracer needs, and encoders for what the proxy says itself.

Names follow the "Message Formats" chapter of the PostgreSQL documentation;
(F) marks frontend messages, (B) backend ones; the type bytes are named in
:mod:`.kinds`. Decoders take the buffer and the payload bounds (after type
byte and length) so nothing is copied before it is known to be needed.
"""

from __future__ import annotations

import struct

try:
    import cython
except ImportError:  # no Cython: the module runs interpreted
    from ._nocython import cython

from .kinds import (
    BACKEND_AUTHENTICATION,
    BACKEND_ERROR_RESPONSE,
    FRONTEND_FLUSH,
    FRONTEND_QUERY,
    FRONTEND_SYNC,
    FRONTEND_TYPES,
)

__all__ = [
    "SSL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "CANCEL_REQUEST_CODE",
    "PROTOCOL_3_0",
    "PROTOCOL_3_2",
    "FRONTEND_TABLE",
    "HEAD_OK",
    "BAD_TYPE",
    "BAD_LENGTH",
    "header_refused",
    "be32",
    "cstring",
    "text",
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


#: FRONTEND_TYPES by type byte: 1 for a frontend message type, else 0.
FRONTEND_TABLE = bytes(1 if i in FRONTEND_TYPES else 0 for i in range(256))
if cython.compiled:  # the same table as C bytes, for the pump's thread (no Python object there)
    for _i in range(256):
        _frontend[_i] = FRONTEND_TABLE[_i]

# What header_refused answers: a client message's type byte must be one of FRONTEND_TYPES and its
# length (which counts itself) between 4 and the configured maximum, else the client gets 08P01.
HEAD_OK = 0
BAD_TYPE = 1  # not a frontend message type
BAD_LENGTH = 2  # a length below 4 or above the maximum


def header_refused(typ: int, length: int, limit: int) -> int:
    """HEAD_OK, or why a client message of type byte ``typ`` and ``length`` is refused (``limit``: the maximum).

    (The answers are written as numbers: compiled, this runs without the GIL.)
    """
    if cython.compiled:
        if typ < 0 or typ > 255 or not _frontend[typ]:
            return 1  # BAD_TYPE
    elif not FRONTEND_TABLE[typ]:
        return 1  # BAD_TYPE
    if length < 4 or length > limit:
        return 2  # BAD_LENGTH
    return 0  # HEAD_OK


def be32(buf: bytes, pos: int) -> int:
    """The unsigned big-endian 32-bit integer at ``buf[pos:pos + 4]`` (the caller made sure it is there)."""
    if cython.compiled:
        p = cython.cast(cython.p_uchar, PyBytes_AS_STRING(buf)) + pos
        return ((cython.cast(cython.uint, p[0]) << 24) | (cython.cast(cython.uint, p[1]) << 16)
                | (cython.cast(cython.uint, p[2]) << 8) | p[3])
    return _UINT32.unpack_from(buf, pos)[0]


# Texts that repeat on the wire (statement texts of Parse and Query, statement and
# portal names, command tags) decoded once: a repeat comes back as the same str, so
# its hash is computed once wherever it is a key, and records.pack sends it once a
# batch. Only ASCII texts are kept (they decode alike as UTF-8 and as ASCII), of at
# most _TEXT_MAX bytes. Compiled: a direct-mapped table matched on the raw bytes
# (no allocation for a hit: an ASCII str's characters are its bytes, compared in place);
# interpreted: a dict by the bytes, emptied when full.
_TEXT_SLOTS = 512
_TEXT_MAX = 4096
_text_str: list = [None] * _TEXT_SLOTS  # compiled: the text in each slot
_texts: dict = {}  # interpreted: bytes -> text
_HASH_SEED = 0x9E3779B97F4A7C15  # compiled: the slot's hash (64-bit, wrapping)
_HASH_PRIME = 0x100000001B3
_HASH_MIX = 0xFF51AFD7ED558CCD  # compiled: the last mixing step's (MurmurHash3's fmix64)


def text(buf: bytes, start: int, end: int) -> str:
    """``buf[start:end]`` decoded as UTF-8 (each bad byte replaced), the same str for a repeated ASCII text."""
    size = end - start
    if size <= 0:
        return ""
    if size > _TEXT_MAX:
        return buf[start:end].decode("utf-8", "replace")
    if cython.compiled:
        p = cython.cast(cython.p_uchar, PyBytes_AS_STRING(buf)) + start
        # The slot: a hash of the first 24 and the last 40 bytes (where texts of one statement
        # differ: a literal, a comment's ids), 8 bytes a step, then mixed so that every byte
        # moves the bits that pick the slot.
        h = cython.cast(cython.ulonglong, size) * _HASH_SEED
        head = size if size < 24 else 24
        tail = size - 40 if size - 40 > head else head
        i = 0
        while i < size:
            if i == head:
                i = tail  # (the middle is skipped)
            window_end = head if i < head else size
            if i + 8 <= window_end:
                memcpy(cython.address(word), p + i, 8)
                h = (h ^ word) * _HASH_PRIME
                i += 8
            else:
                h = (h ^ p[i]) * _HASH_PRIME
                i += 1
        h ^= h >> 33
        h *= _HASH_MIX
        h ^= h >> 33
        slot = cython.cast(cython.Py_ssize_t, h % _TEXT_SLOTS)
        value = _text_str[slot]
        if value is not None and len(value) == size and memcmp(PyUnicode_1BYTE_DATA(value), p, size) == 0:
            return value
        # (decoded in place: no bytes made)
        value = PyUnicode_DecodeUTF8(cython.cast(cython.p_char, p), size, "replace")
        if PyUnicode_IS_ASCII(value):  # (then its length is size: one character a byte)
            _text_str[slot] = value
        return value
    raw = buf[start:end]
    value = _texts.get(raw)
    if value is None:
        value = raw.decode("utf-8", "replace")
        if len(value) == size and value.isascii():
            if len(_texts) >= _TEXT_SLOTS:
                _texts.clear()
            _texts[raw] = value
    return value


def nul_at(buf, start: int) -> int:
    """The offset of the NUL that ends the string at ``start`` (ValueError when there is none)."""
    if type(buf) is bytes:
        data = buf
        if cython.compiled:
            if start < 0 or start >= len(data):
                raise ValueError("no NUL after a string")
            base = PyBytes_AS_STRING(data)
            nul = cython.cast(cython.p_char, memchr(base + start, 0, len(data) - start))
            if nul == cython.NULL:
                raise ValueError("no NUL after a string")
            return nul - base
        end = data.find(0, start)
        if end < 0:
            raise ValueError("no NUL after a string")
        return end
    return buf.index(0, start) if isinstance(buf, bytearray) else bytes(buf).index(0, start)


def cstring_text(buf, start: int, end: int) -> str:
    """The string ``buf[start:end]`` that :func:`nul_at` found: "" for the unnamed statement or
    portal (the most common name), the same str for a repeated ASCII text."""
    if end == start:
        return ""
    if type(buf) is bytes:
        return text(buf, start, end)
    return bytes(buf[start:end]).decode("utf-8", "replace")


def cstring(buf, start: int) -> tuple[str, int]:
    """Decode a NUL-terminated string at ``start``; return it and the offset after the NUL."""
    end = nul_at(buf, start)
    return cstring_text(buf, start, end), end + 1


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
    pos = nul_at(buf, start)
    portal = cstring_text(buf, start, pos)
    pos += 1
    stmt_end = nul_at(buf, pos)
    stmt = cstring_text(buf, pos, stmt_end)
    pos = stmt_end + 1
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
