"""TLS for both legs: the contexts (client termination, upstream modes disable … verify-full) and the handshake.

One TLS implementation serves a session from its handshake to its last byte:
the compiled one (``_tls.c``, OpenSSL on memory BIOs) when it was built, else
Python's ssl module. The compiled one is what lets a TLS session move to the
pump (``_pump.c``) once its start-up is over: the pump borrows the session's
``_tls.Conn`` with its sockets and does the record I/O on its own thread.
Python's ssl objects cannot be handed over (their OpenSSL state is private), so
with Python's ssl module TLS sessions stay on the asyncio relay.

During start-up, and for sessions that stay on the asyncio relay, a compiled
connection is driven by :class:`TlsTransport`, an asyncio transport over the
socket's own transport (what asyncio's SSL transport is to ``ssl.SSLObject``).
``start_tls`` and ``accept_tls`` hide which implementation is in use.
"""

from __future__ import annotations

import asyncio
import ssl

from ..protocol._impl import PURE_PYTHON

__all__ = ["client_context", "upstream_context", "certificate_der", "start_tls", "accept_tls", "resume_tls",
           "TlsTransport", "COMPILED", "ALPN"]

ALPN = "postgresql"  # PostgreSQL 17 direct TLS requires this ALPN protocol

_tls = None
if not PURE_PYTHON:
    try:
        from . import _tls
    except ImportError:
        pass
#: Whether TLS is the compiled one (and TLS sessions may be relayed by the pump).
COMPILED = _tls is not None
_ALPN_WIRE = bytes([len(ALPN)]) + ALPN.encode("ascii")


def client_context(cert: str, key: str, min_version: str = "TLSv1.2"):
    """Server-side context for terminating client TLS (TLS 1.2+ by default, no compression, ALPN offered)."""
    if _tls is not None:
        return _tls.Context(True, min_version=min_version, cert=cert, key=key, alpn=_ALPN_WIRE)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols([ALPN])
    return ctx


def certificate_der(path: str) -> bytes:
    """The first certificate of a PEM file (the leaf of a chain), in DER.

    Channel binding (``tls-server-end-point``) hashes exactly this certificate.
    """
    with open(path, encoding="ascii", errors="replace") as fh:
        text = fh.read()
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise ssl.SSLError(f"no PEM certificate in {path}")
    return ssl.PEM_cert_to_DER_cert(text[begin : end + len("-----END CERTIFICATE-----")])


def upstream_context(mode: str, ca: str | None = None, cert: str | None = None, key: str | None = None):
    """Client-side context for the upstream leg, as libpq's sslmode would build it; None for disable.

    prefer / require encrypt without verifying (as libpq without a root
    certificate); verify-ca checks the chain against ``ca`` (else the system's
    roots); verify-full also the name (``upstream_server_name``, see ``start_tls``).
    """
    if mode == "disable":
        return None
    verify = mode in ("verify-ca", "verify-full")
    if _tls is not None:
        return _tls.Context(False, verify=verify, ca=ca, check_hostname=mode == "verify-full",
                            cert=cert if cert and key else None, key=key if cert and key else None, alpn=_ALPN_WIRE)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        ctx.check_hostname = mode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
        if ca:
            ctx.load_verify_locations(ca)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert and key:
        ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols([ALPN])
    return ctx


async def start_tls(transport: asyncio.Transport, protocol: asyncio.Protocol, ctx, *, server_side: bool,
                    server_hostname: str | None = None) -> asyncio.Transport:
    """TLS over an open connection (after SSLRequest): the TLS transport once the handshake is over.

    Raises OSError (``ssl.SSLError`` or ``_tls.TlsError``) when the handshake fails.
    """
    if _tls is None:
        return await asyncio.get_running_loop().start_tls(transport, protocol, ctx, server_side=server_side,
                                                          server_hostname=server_hostname)
    leg = _TlsLeg(_tls.Conn(ctx, server_hostname=None if server_side else server_hostname), protocol)
    transport.set_protocol(leg)
    leg.connection_made(transport)
    try:
        await leg.handshake
    except BaseException:
        transport.abort()
        raise
    return leg.transport


async def accept_tls(sock, protocol: asyncio.Protocol, ctx) -> asyncio.Transport:
    """A transport for an accepted socket whose first bytes are a TLS handshake (direct TLS)."""
    loop = asyncio.get_running_loop()
    if _tls is None:
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, ssl=ctx)
        return transport
    leg = _TlsLeg(_tls.Conn(ctx), protocol)
    raw, _ = await loop.connect_accepted_socket(lambda: leg, sock)
    try:
        await leg.handshake
    except BaseException:
        raw.abort()
        raise
    protocol.connection_made(leg.transport)
    return leg.transport


def resume_tls(transport: asyncio.Transport, conn) -> "TlsTransport":
    """A TLS transport for an established connection ``conn`` (a ``_tls.Conn`` the pump gave back).

    Its protocol is the one ``transport`` has; input ``conn`` still holds is
    read once reading is resumed.
    """
    leg = _TlsLeg(conn, transport.get_protocol(), established=True)
    leg.paused = not transport.is_reading()
    transport.set_protocol(leg)
    leg.raw = transport
    return leg.transport


def relayable(transport: asyncio.Transport):
    """The ``_tls.Conn`` of a TLS transport the pump may take (None: not TLS; False: TLS the pump cannot take)."""
    conn = transport.get_extra_info("ssl_object")
    if conn is None:
        return None
    return conn if isinstance(transport, TlsTransport) else False


class _TlsLeg(asyncio.Protocol):
    """The socket transport's protocol under a TlsTransport: ciphertext in and out, plaintext to ``app``."""

    __slots__ = ("conn", "app", "raw", "transport", "handshake", "paused", "handed_over", "error")

    def __init__(self, conn, app: asyncio.Protocol, established: bool = False) -> None:
        self.conn = conn
        self.app = app
        self.raw: asyncio.Transport | None = None
        self.transport = TlsTransport(self)
        self.handshake = asyncio.get_running_loop().create_future()
        if established:
            self.handshake.set_result(None)
        self.paused = False  # the app paused reading: plaintext stays in conn
        self.handed_over = False  # the pump relays: conn is not ours to touch
        self.error: OSError | None = None  # why the connection broke (a bad record, an alert)

    def connection_made(self, transport) -> None:
        self.raw = transport
        if not self.handshake.done():
            self._handshake()  # a client sends its hello now

    def _send(self, data: bytes) -> None:
        if data:
            self.raw.write(data)

    def _handshake(self) -> None:
        conn = self.conn
        try:
            done = conn.do_handshake()
        except OSError as exc:
            try:
                self._send(conn.take_out())  # the alert, for the peer to know why
            except OSError:
                pass
            self.handshake.set_exception(exc)
            return
        self._send(conn.take_out())
        if done:
            self.handshake.set_result(None)
            self.read_on()  # records that came with the handshake's last flight

    def data_received(self, data: bytes) -> None:
        if self.handed_over:
            return
        self.conn.feed(data)
        if self.handshake.done():
            self.read_on()
        else:
            self._handshake()

    def read_on(self) -> None:
        """Hand the plaintext decrypted so far to the app, until it pauses or the pump takes over."""
        conn = self.conn
        while not self.paused and not self.handed_over:
            try:
                data = conn.read()
            except OSError as exc:  # a bad record or an alert: the connection is broken
                self.error = exc
                self.raw.abort()  # connection_lost follows
                return
            if data is None:  # close_notify: the peer's end of input
                if not self.app.eof_received() and self.transport is not None:
                    self.transport.close()
                return
            if not data:
                break
            self.app.data_received(data)
        if not self.handed_over and not self.raw.is_closing():
            self._send(conn.take_out())  # what reading made to send (a key update's answer)

    def eof_received(self):
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionResetError("peer closed the connection during the TLS handshake"))
            return False
        if not self.handed_over and not self.paused:
            self.read_on()
        return self.app.eof_received()

    def connection_lost(self, exc) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionResetError("connection lost during the TLS handshake"))
        else:
            self.app.connection_lost(exc or self.error)
        self.transport = None  # the leg and its transport refer to each other: no cycle left for the collector

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()


class TlsTransport(asyncio.Transport):
    """The plaintext side of a compiled TLS connection, as an asyncio transport (see ``_TlsLeg``)."""

    def __init__(self, leg: _TlsLeg) -> None:
        super().__init__()
        self._leg = leg
        self._closing = False

    def get_extra_info(self, name, default=None):
        if name == "ssl_object":
            return self._leg.conn
        return self._leg.raw.get_extra_info(name, default)

    def write(self, data) -> None:
        if not self._closing:
            self._leg.raw.write(self._leg.conn.write(data))

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def is_closing(self) -> bool:
        return self._closing or self._leg.raw.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        leg = self._leg
        if not leg.handed_over and not leg.raw.is_closing():
            try:
                leg.raw.write(leg.conn.shutdown())  # close_notify, as asyncio's TLS transport sends
            except (OSError, RuntimeError):
                pass
        leg.raw.close()

    def abort(self) -> None:
        self._closing = True
        self._leg.raw.abort()

    def pause_reading(self) -> None:
        self._leg.paused = True
        self._leg.raw.pause_reading()

    def resume_reading(self) -> None:
        leg = self._leg
        if not leg.paused:
            return
        leg.paused = False
        leg.raw.resume_reading()
        if not leg.handed_over and leg.conn.has_input:
            asyncio.get_running_loop().call_soon(leg.read_on)

    def is_reading(self) -> bool:
        return not self._leg.paused and self._leg.raw.is_reading()

    def set_protocol(self, protocol) -> None:
        self._leg.app = protocol

    def get_protocol(self):
        return self._leg.app

    def get_write_buffer_size(self) -> int:
        return self._leg.raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._leg.raw.set_write_buffer_limits(high=high, low=low)

    def get_write_buffer_limits(self):
        return self._leg.raw.get_write_buffer_limits()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def hand_over(self, taken: bool = True) -> None:
        """The pump takes (or, ``taken=False``, did not take) the connection: stop touching it."""
        self._leg.handed_over = taken
