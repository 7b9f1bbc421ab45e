"""A tiny blocking PostgreSQL wire client for tests that need exact protocol bytes.

Drivers hide what some tests must see or send themselves: FunctionCall (F),
a StartupMessage for protocol 3.2, the length of the BackendKeyData key, a
CancelRequest carrying a long key, the SQLSTATE of a start-up failure. This
module owns just enough of a client for that, over a plain TCP socket, for
roles that need no password (trust); the messages come from :mod:`wire`.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading

from pgotel_proxy.protocol.messages import PROTOCOL_3_0, PROTOCOL_3_2
from wire import SSL_REQUEST as _SSL_REQUEST, CancelRequest, FunctionCall, message
from wire import StartupMessage as startup_packet

__all__ = [
    "PROTOCOL_3_0",
    "PROTOCOL_3_2",
    "RawConn",
    "RecordingTee",
    "error_fields",
    "message",
    "send_cancel",
    "startup_packet",
]


def error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse / NoticeResponse body, keyed by their one-letter codes."""
    out: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


class RawConn:
    """One connection speaking the protocol by hand; messages are ``(type, body)`` pairs."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None,
                 server_hostname: str = "localhost") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            # SSLRequest, then the handshake (the server must answer "S").
            self.sock.sendall(_SSL_REQUEST)
            answer = self.sock.recv(1)
            if answer != b"S":
                self.sock.close()
                raise ConnectionError(f"SSLRequest refused: {answer!r}")
            self.sock = tls.wrap_socket(self.sock, server_hostname=server_hostname)
        self._buf = b""
        self.backend_pid: int | None = None
        self.cancel_key: bytes | None = None
        self.params: dict[str, str] = {}

    def close(self) -> None:
        try:
            self.sock.sendall(b"X\x00\x00\x00\x04")
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> "RawConn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"server closed the connection (buffered: {self._buf!r})")
            self._buf += chunk

    def read_message(self) -> tuple[str, bytes]:
        self._fill(5)
        typ = chr(self._buf[0])
        (length,) = struct.unpack_from("!I", self._buf, 1)
        self._fill(1 + length)
        body = self._buf[5 : 1 + length]
        self._buf = self._buf[1 + length :]
        return typ, body

    def read_until_ready(self) -> list[tuple[str, bytes]]:
        """Messages up to and including ReadyForQuery; stops early at a FATAL start-up error."""
        got = []
        while True:
            typ, body = self.read_message()
            got.append((typ, body))
            if typ == "K":
                self.backend_pid = struct.unpack_from("!I", body)[0]
                self.cancel_key = body[4:]
            elif typ == "S":
                name, value = body.split(b"\x00")[:2]
                self.params[name.decode()] = value.decode()
            elif typ == "Z":
                return got
            elif typ == "E" and self.backend_pid is None:
                return got

    def send_startup(self, user: str = "postgres", database: str = "postgres", code: int = PROTOCOL_3_0,
                     **extra: str) -> None:
        self.send(startup_packet(user, database, code, **extra))

    def startup(self, user: str = "postgres", database: str = "postgres", code: int = PROTOCOL_3_0,
                **extra: str) -> list[tuple[str, bytes]]:
        """StartupMessage, then everything up to ReadyForQuery (roles without a password only)."""
        self.send_startup(user, database, code, **extra)
        return self.read_until_ready()

    def query(self, sql: str) -> list[tuple[str, bytes]]:
        self.send(message(b"Q", sql.encode() + b"\x00"))
        return self.read_until_ready()

    def send_function_call(self, oid: int, args: list[bytes], result_format: int = 1) -> None:
        """FunctionCall (F): every argument in binary format."""
        self.send(FunctionCall(oid, *args, arg_formats=(1,), result_format=result_format))


def send_cancel(host: str, port: int, pid: int, key: bytes, timeout: float = 10.0) -> bytes:
    """Send a CancelRequest on a new connection; return what came back (normally nothing)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(CancelRequest(pid, key))
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk


class RecordingTee:
    """Forwards one TCP connection to ``upstream`` and records both directions in arrival order."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.steps: list[tuple[str, bytes]] = []  # ("c" | "s", chunk)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        a, _ = self.lsock.accept()
        b = socket.create_connection(self.upstream)
        with a, b:
            open_ = {a, b}
            while open_:
                ready, _, _ = select.select(list(open_), [], [], 5)
                if not ready:
                    return
                for s in ready:
                    data = s.recv(65536)
                    other = b if s is a else a
                    if not data:
                        open_.discard(s)
                        try:
                            other.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    self.steps.append(("c" if s is a else "s", data))
                    other.sendall(data)

    def join(self) -> None:
        self._thread.join(10)
        self.lsock.close()

    def client_bytes(self) -> bytes:
        return b"".join(d for side, d in self.steps if side == "c")
