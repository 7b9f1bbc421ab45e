"""A small asyncio PostgreSQL client for the logical replication walsender.

psycopg cannot drive START_REPLICATION's CopyBoth mode, so the CDC consumer
speaks the protocol itself with the project's codec (``protocol.startup``,
``protocol.messages``): start-up with ``replication=database``, optional TLS
(sslmode as libpq spells it), authentication (trust, cleartext password, MD5,
SCRAM-SHA-256 without channel binding), simple queries for the replication
commands, then CopyBoth: CopyData in both directions.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import struct
from urllib.parse import parse_qsl, unquote, urlsplit

from ..protocol.kinds import (
    BACKEND_AUTHENTICATION,
    BACKEND_BACKEND_KEY_DATA,
    BACKEND_COMMAND_COMPLETE,
    BACKEND_COPY_BOTH_RESPONSE,
    BACKEND_COPY_DATA,
    BACKEND_COPY_DONE,
    BACKEND_DATA_ROW,
    BACKEND_ERROR_RESPONSE,
    BACKEND_NOTICE_RESPONSE,
    BACKEND_PARAMETER_STATUS,
    BACKEND_READY_FOR_QUERY,
    FRONTEND_COPY_DATA,
    FRONTEND_PASSWORD,
)
from ..protocol.messages import (
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    decode_error_fields,
    decode_sasl_mechanisms,
    query_message,
    typed_message,
)
from ..protocol.startup import encode_startup
from .scram import ScramClient

__all__ = ["PgError", "ReplicationConnection", "parse_dsn"]

_I = struct.Struct("!I")
_i = struct.Struct("!i")
_MAX_MESSAGE = 1 << 30


class PgError(Exception):
    """An ErrorResponse from the server, or a connection that cannot be made."""

    def __init__(self, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.fields = fields or {}

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")


def parse_dsn(dsn: str) -> dict[str, str]:
    """libpq connection string (``key=value ...`` or a ``postgresql://`` URL) → parameters."""
    dsn = dsn.strip()
    if dsn.startswith(("postgresql://", "postgres://")):
        u = urlsplit(dsn)
        out: dict[str, str] = {}
        if u.hostname:
            out["host"] = unquote(u.hostname)
        if u.port:
            out["port"] = str(u.port)
        if u.username:
            out["user"] = unquote(u.username)
        if u.password:
            out["password"] = unquote(u.password)
        if u.path and u.path != "/":
            out["dbname"] = unquote(u.path[1:])
        out.update(dict(parse_qsl(u.query)))
        return out
    out = {}
    i, n = 0, len(dsn)
    while i < n:
        while i < n and dsn[i].isspace():
            i += 1
        if i >= n:
            break
        eq = dsn.find("=", i)
        if eq < 0:
            raise ValueError(f"missing '=' after {dsn[i:]!r} in connection string")
        key = dsn[i:eq].strip()
        i = eq + 1
        while i < n and dsn[i].isspace():
            i += 1
        val = []
        if i < n and dsn[i] == "'":
            i += 1
            while i < n and dsn[i] != "'":
                if dsn[i] == "\\" and i + 1 < n:
                    i += 1
                val.append(dsn[i])
                i += 1
            if i >= n:
                raise ValueError("unterminated quoted value in connection string")
            i += 1
        else:
            while i < n and not dsn[i].isspace():
                if dsn[i] == "\\" and i + 1 < n:
                    i += 1
                val.append(dsn[i])
                i += 1
        out[key] = "".join(val)
    return out


class ReplicationConnection:
    """One connection; use :meth:`connect`, then :meth:`query` / :meth:`start_replication`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.params: dict[str, str] = {}
        self.backend_pid: int | None = None
        self.notices: list[dict[str, str]] = []

    # ------------------------------------------------------------ start-up

    @classmethod
    async def connect(cls, dsn: str | dict, *, replication: str | None = "database", timeout: float = 10.0) -> "ReplicationConnection":
        p = parse_dsn(dsn) if isinstance(dsn, str) else dict(dsn)
        host = p.get("host") or os.environ.get("PGHOST") or "localhost"
        port = int(p.get("port") or os.environ.get("PGPORT") or 5432)
        user = p.get("user") or os.environ.get("PGUSER") or os.environ.get("USER") or "postgres"
        password = p.get("password") or os.environ.get("PGPASSWORD")
        dbname = p.get("dbname") or os.environ.get("PGDATABASE") or user
        sslmode = p.get("sslmode") or "prefer"

        async def _open():
            if host.startswith("/"):
                r, w = await asyncio.open_unix_connection(os.path.join(host, f".s.PGSQL.{port}"))
                return r, w
            r, w = await asyncio.open_connection(host, port)
            if sslmode != "disable":
                w.write(struct.pack("!II", 8, SSL_REQUEST_CODE))
                await w.drain()
                answer = await r.readexactly(1)
                if answer == b"S":
                    await w.start_tls(_ssl_context(sslmode, p.get("sslrootcert")), server_hostname=host)
                elif sslmode in ("require", "verify-ca", "verify-full"):
                    w.close()
                    raise PgError(f"server at {host}:{port} does not accept TLS (sslmode={sslmode})")
            return r, w

        reader, writer = await asyncio.wait_for(_open(), timeout)
        conn = cls(reader, writer)
        startup = {"user": user, "database": dbname, "application_name": p.get("application_name", "pgotel-cdc")}
        if replication:
            startup["replication"] = replication
        writer.write(encode_startup(startup, PROTOCOL_3_0))
        try:
            await asyncio.wait_for(conn._authenticate(user, password), timeout)
        except BaseException:
            writer.close()
            raise
        return conn

    async def _authenticate(self, user: str, password: str | None) -> None:
        scram: ScramClient | None = None
        while True:
            typ, body = await self.read_message()
            if typ == BACKEND_AUTHENTICATION:
                code = _I.unpack_from(body, 0)[0]
                if code == 0:
                    continue
                if code in (3, 5, 10) and password is None:
                    raise PgError(f"the server asks for a password for user {user!r} and none was given")
                if code == 3:
                    self._send(FRONTEND_PASSWORD, password.encode() + b"\x00")
                elif code == 5:
                    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
                    self._send(FRONTEND_PASSWORD, b"md5" + outer.encode() + b"\x00")
                elif code == 10:
                    mechs = decode_sasl_mechanisms(body, 4, len(body))
                    if ScramClient.mechanism not in mechs:
                        raise PgError(f"no supported SASL mechanism among {mechs}")
                    scram = ScramClient(password)
                    first = scram.first()
                    self._send(FRONTEND_PASSWORD, ScramClient.mechanism.encode() + b"\x00" + _i.pack(len(first)) + first)
                elif code == 11 and scram is not None:
                    self._send(FRONTEND_PASSWORD, scram.final(body[4:]))
                elif code == 12 and scram is not None:
                    scram.verify(body[4:])
                else:
                    raise PgError(f"unsupported authentication request {code}")
                await self.writer.drain()
            elif typ == BACKEND_BACKEND_KEY_DATA:
                self.backend_pid = _I.unpack_from(body, 0)[0]
            elif typ == BACKEND_READY_FOR_QUERY:
                return
            elif typ == BACKEND_ERROR_RESPONSE:
                fields = decode_error_fields(body, 0, len(body))
                raise PgError(fields.get("M", "connection refused"), fields)
            # ParameterStatus, NoticeResponse, NegotiateProtocolVersion: handled in read_message / ignored

    # ----------------------------------------------------------- messages

    def _send(self, kind: int, body: bytes) -> None:
        self.writer.write(typed_message(kind, body))

    async def read_message(self) -> tuple[int, bytes]:
        """Next server message that is not ParameterStatus or a notice: its type byte (``BACKEND_*``) and body."""
        while True:
            head = await self.reader.readexactly(5)
            length = _I.unpack_from(head, 1)[0]
            if length < 4 or length > _MAX_MESSAGE:
                raise PgError(f"bad message length {length} from the server")
            body = await self.reader.readexactly(length - 4)
            typ = head[0]
            if typ == BACKEND_PARAMETER_STATUS:
                parts = body.split(b"\x00")
                if len(parts) >= 2:
                    self.params[parts[0].decode("utf-8", "replace")] = parts[1].decode("utf-8", "replace")
                continue
            if typ == BACKEND_NOTICE_RESPONSE:
                if len(self.notices) < 100:
                    self.notices.append(decode_error_fields(body, 0, len(body)))
                continue
            return typ, body

    async def query(self, sql: str) -> list[tuple]:
        """Run a simple Query (also a replication command); its rows as tuples of text (None for NULL)."""
        self.writer.write(query_message(sql))
        await self.writer.drain()
        rows: list[tuple] = []
        error = None
        while True:
            typ, body = await self.read_message()
            if typ == BACKEND_DATA_ROW:
                rows.append(_data_row(body))
            elif typ == BACKEND_ERROR_RESPONSE:
                error = decode_error_fields(body, 0, len(body))
            elif typ == BACKEND_READY_FOR_QUERY:
                if error is not None:
                    raise PgError(error.get("M", "query failed"), error)
                return rows

    async def start_replication(self, command: str) -> None:
        """Send START_REPLICATION ...; return once the server is in CopyBoth mode."""
        self.writer.write(query_message(command))
        await self.writer.drain()
        while True:
            typ, body = await self.read_message()
            if typ == BACKEND_COPY_BOTH_RESPONSE:
                return
            if typ == BACKEND_ERROR_RESPONSE:
                fields = decode_error_fields(body, 0, len(body))
                # The server follows with ReadyForQuery; read it so the connection stays usable.
                try:
                    await asyncio.wait_for(self.read_message(), 5)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    pass
                raise PgError(fields.get("M", "START_REPLICATION failed"), fields)

    async def read_copy(self) -> bytes | None:
        """Next CopyData payload of the stream; None when the server ended it."""
        while True:
            typ, body = await self.read_message()
            if typ == BACKEND_COPY_DATA:
                return body
            if typ == BACKEND_COPY_DONE or typ == BACKEND_COMMAND_COMPLETE or typ == BACKEND_READY_FOR_QUERY:
                return None
            if typ == BACKEND_ERROR_RESPONSE:
                fields = decode_error_fields(body, 0, len(body))
                raise PgError(fields.get("M", "replication stream failed"), fields)

    def send_copy(self, payload: bytes) -> None:
        self._send(FRONTEND_COPY_DATA, payload)

    async def drain(self) -> None:
        await self.writer.drain()

    async def close(self) -> None:
        try:
            if not self.writer.is_closing():
                self.writer.write(b"X\x00\x00\x00\x04")
                self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (OSError, asyncio.TimeoutError, ConnectionError, ssl.SSLError):
            pass


def _data_row(body: bytes) -> tuple:
    n = struct.unpack_from("!h", body, 0)[0]
    pos = 2
    out = []
    for _ in range(n):
        ln = _i.unpack_from(body, pos)[0]
        pos += 4
        if ln < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + ln].decode("utf-8", "replace"))
            pos += ln
    return tuple(out)


def _ssl_context(sslmode: str, rootcert: str | None) -> ssl.SSLContext:
    if sslmode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=rootcert)
        ctx.check_hostname = sslmode == "verify-full"
        return ctx
    # prefer / require: encryption without verification, as libpq does without a root cert.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
