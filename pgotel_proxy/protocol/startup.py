"""Start-up packets (F): the untyped messages a client sends before the typed stream begins.

A start-up packet is an int32 length (including itself) followed by an int32
code: a protocol version for StartupMessage, or one of the magic request codes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import ProtocolViolation
from .messages import CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE

__all__ = ["StartupPacket", "parse_startup_packet", "startup_packet_length", "encode_startup"]

_II = struct.Struct("!II")


@dataclass(frozen=True, slots=True)
class StartupPacket:
    """One decoded start-up packet."""

    kind: str  # "startup" | "ssl" | "gssenc" | "cancel"
    code: int
    params: dict[str, str] | None = None  # StartupMessage parameters
    cancel_pid: int | None = None
    cancel_key: bytes | None = None
    raw: bytes = b""

    @property
    def protocol_version(self) -> tuple[int, int]:
        return self.code >> 16, self.code & 0xFFFF


def startup_packet_length(head: bytes, max_len: int) -> int:
    """Validate the first four bytes of a start-up packet and return its total length."""
    (n,) = struct.unpack_from("!i", head, 0)
    if n < 8 or n > max_len:
        raise ProtocolViolation(f"invalid length of startup packet: {n}")
    return n


def parse_startup_packet(raw: bytes) -> StartupPacket:
    """Decode a whole start-up packet (length prefix included)."""
    n, code = _II.unpack_from(raw, 0)
    if code == SSL_REQUEST_CODE:
        return StartupPacket("ssl", code, raw=raw)
    if code == GSSENC_REQUEST_CODE:
        return StartupPacket("gssenc", code, raw=raw)
    if code == CANCEL_REQUEST_CODE:
        if n < 16 or n > 8 + 4 + 256:
            raise ProtocolViolation("invalid length of cancel request")
        (pid,) = struct.unpack_from("!I", raw, 8)
        return StartupPacket("cancel", code, cancel_pid=pid, cancel_key=bytes(raw[12:n]), raw=raw)
    major = code >> 16
    if major != 3:
        raise ProtocolViolation(f"unsupported frontend protocol {major}.{code & 0xFFFF}", "0A000")
    body = bytes(raw[8:n])
    if not body.endswith(b"\x00"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    params: dict[str, str] = {}
    items = body[:-1].split(b"\x00")
    if items and items[-1] == b"":
        items.pop()
    if len(items) % 2:
        raise ProtocolViolation("invalid startup packet layout: odd number of strings")
    for i in range(0, len(items), 2):
        params[items[i].decode("utf-8", "replace")] = items[i + 1].decode("utf-8", "replace")
    if "user" not in params:
        raise ProtocolViolation("no PostgreSQL user name specified in startup packet", "28000")
    return StartupPacket("startup", code, params=params, raw=raw)


def encode_startup(params: dict[str, str], code: int = 196608) -> bytes:
    """A whole StartupMessage (F)."""
    body = b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items()) + b"\x00"
    return _II.pack(len(body) + 8, code) + body
