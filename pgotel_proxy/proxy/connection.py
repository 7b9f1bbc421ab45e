"""One proxied client connection: start-up negotiation, then the byte relay between two transports.

Start-up (TLS negotiation on both legs, cancel requests, connecting upstream,
authentication up to the first ReadyForQuery) runs on the event loop, as a
coroutine over a small buffering protocol, then as the asyncio relay below.
At the first ReadyForQuery (``became_ready``) the session takes one of two
relay paths for the rest of its life:

* the pump (``_pump.c``, a thread moving bytes with epoll; ``_to_pump``):
  every session with sockets on both legs (TLS ones: see below) and nothing for the proxy to
  write into its streams, traced or not. For a traced session the pump frames
  the client's messages before it forwards them and logs what it relays; the
  event loop reads the log and feeds the session (``pump_observe``). A refused
  client chunk or the server's end hands the sockets back here for the
  proxy's last words (``pump_back``).
* the asyncio relay (``_FromClient`` / ``_FromServer``), Python protocols
  calling the same ``Session`` (compiled or not): TLS on Python's ssl module, WAL propagation and Flush phase timing (both
  splice messages of the proxy's own in at client message boundaries), a build
  without the compiled pump, a process short of descriptors. Its
  ``data_received`` does all the work synchronously, with no ``await``:

  * server → client: write first, then feed the session (relay first, observe
    second); only during authentication and while answers to injected
    messages are due are server bytes framed before they are forwarded
    (``Session.server_hold``);
  * client → server: framed before forwarding, because garbage must be refused
    with 08P01 rather than handed to Postgres, and because the proxy splices
    its own messages in at message boundaries;
  * backpressure: when one side's write buffer passes its high-water mark,
    reading from the other side pauses until it drains; the time the server's
    side is paused is the client's wait of the statement whose answer is due
    (``Session.client_waited``).

  An untraced session on this path stops observing and only forwards bytes.

A TLS leg goes to the pump too where TLS is the compiled one (``tls.py``,
``_tls.c``): its TLS connection is lent to the pump with its socket, and the
pump decrypts and encrypts there. With Python's ssl module (no compiled TLS)
TLS sessions take the asyncio relay.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from itertools import islice
from typing import TYPE_CHECKING

from ..protocol import ProtocolViolation, Session, parse_startup_packet, startup_packet_length
from ..protocol.messages import error_response
from ..protocol.pumplog import PUMP_LOG_CLIENT, PUMP_LOG_HANDBACK, PUMP_LOG_SERVER
from ..stats import STATS
from . import tls

if TYPE_CHECKING:
    from .server import ProxyServer

__all__ = ["ClientConnection", "ConnectionInfo"]

log = logging.getLogger("pgotel_proxy.proxy")

_time_ns = time.time_ns
# How long a statement's shape stays slow (the pump splits its phases) after an execution left
# its moving average at or above the threshold, unless an execution brings the average below
# it first (then at once): a rarely run slow statement stays split from one run to the next.
SLOW_SHAPE_FOR_NS = 60_000_000_000
# Adaptive splitting's moving average of a shape's duration: each execution's weight, and the
# most shapes remembered before the table starts over.
_SHAPE_WEIGHT = 0.125
_SHAPES_KEPT = 4096
# A shape whose mean falls below this fraction of the threshold (and that is not slow) leaves the table.
_FORGET_BELOW = 0.5
# Finished statements a connection holds for a collecting trace handle before it
# hands them over itself (the handle takes them at its own pace, see ProcessTracer).
# Small, so that a busy connection's records are packed while still in the CPU's
# cache (less CPU a traced transaction and a lower p99 than with larger batches);
# at light load the tracer's 50 ms collection comes first anyway.
_DELIVER_AT = 32
_SSL_REQUEST = struct.pack("!II", 8, 80877103)
# A pair the pump hands back (_pump.c): reason, errno, client fd, server fd, then the lengths of the
# chunk it did not forward and of what it kept for the server and for the client.
_BACK = struct.Struct("=iiiiIIII")
_BACK_VIOLATION = 1
_WRITE_HIGH = 1 << 20
_WRITE_LOW = 256 << 10


class _Inbox(asyncio.Protocol):
    """Buffers what a transport delivers during start-up, for ``read_exactly``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self._waiter: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def eof_received(self):
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc) -> None:
        self.eof = True
        self._wake()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.eof:
                raise ConnectionResetError("peer closed the connection during start-up")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def take(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data


class _Discard(asyncio.Protocol):
    """Client leg after the proxy's last ErrorResponse: swallow input until the client hangs up."""

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self):
        return False


class _Held(asyncio.Protocol):
    """A socket the pump handed back, paused until its relay protocol is set."""

    def connection_made(self, transport) -> None:
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:  # not while paused
        pass

    def eof_received(self):
        return False


class _Relay(asyncio.Protocol):
    """Base of both relay protocols: backpressure and teardown."""

    __slots__ = ("c",)

    def __init__(self, conn: "ClientConnection") -> None:
        self.c = conn

    def eof_received(self):
        return False  # close our side too; the peer is closed in connection_lost


class _FromClient(_Relay):
    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        c = self.c
        if c.observe:
            self.forward(data, _time_ns())
        else:
            c.upstream.write(data)

    def forward(self, data: bytes, now: int) -> None:
        """Frame ``data`` (received at ``now``), then forward it with what the session splices in."""
        c = self.c
        try:
            out = c.session.client_data(data, now)
        except ProtocolViolation as exc:
            c.violation(exc)
            return
        except Exception as exc:  # a bug in observation must not cost the client its traffic
            held = c.stop_observing("client", exc)
            out = held + data if held else None
        c.upstream.write(data if out is None else out)

    def pause_writing(self) -> None:
        # The client reads slower than the server answers: the server waits on it from here.
        c = self.c
        c.upstream.pause_reading()
        c.client_full_since = _time_ns()

    def resume_writing(self) -> None:
        c = self.c
        c.upstream.resume_reading()
        since, c.client_full_since = c.client_full_since, 0
        if since and c.observe:
            c.session.client_waited(_time_ns() - since)

    def connection_lost(self, exc) -> None:
        self.c.client_lost(exc)


class _FromServer(_Relay):
    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        c = self.c
        session = c.session
        if session.server_hold:
            out = session.server_filter(data, _time_ns())
            if out:
                c.client.write(out)
            if session.ready and not c.ready:
                c.became_ready()
        else:
            c.client.write(data)
            if c.observe:
                session.server_observe(data, _time_ns())
        if session.completed:
            if session.slow_texts is not None:
                c.scan_finished()
            if c.eager or len(session.completed) >= _DELIVER_AT:
                c.deliver()

    def pause_writing(self) -> None:
        self.c.client.pause_reading()

    def resume_writing(self) -> None:
        self.c.client.resume_reading()

    def connection_lost(self, exc) -> None:
        self.c.upstream_lost(exc)


class ConnectionInfo:
    """What the tracer may know about a connection (read-only by convention)."""

    __slots__ = ("peer", "upstream", "session", "tls")

    def __init__(self, peer: str, upstream: str, session: Session, tls: bool) -> None:
        self.peer = peer
        self.upstream = upstream
        self.session = session
        self.tls = tls

    @property
    def user(self) -> str | None:
        return self.session.startup_params.get("user")

    @property
    def database(self) -> str | None:
        p = self.session.startup_params
        return p.get("database") or p.get("user")


class ClientConnection:
    """A client connection and the upstream connection opened for it."""

    def __init__(self, server: "ProxyServer", peer: str) -> None:
        self.server = server
        self.peer = peer
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.session: Session | None = None
        self.observe = True
        self.ready = False
        self.tls = False
        # The certificate this client's TLS presents (the server's, read when the handshake was set up:
        # a reload of the certificates must not change it).
        self.client_cert_der: bytes | None = None
        self.trace = None  # the tracer's per-connection handle
        # Finished statements go to the tracer / WAL injector as they finish; not when
        # the trace handle collects them itself (``collects``) and nothing else wants them.
        self.eager = True
        self.wal = None  # otelwal injector (wal_propagation)
        self.closed: asyncio.Future | None = None
        self._cancel_key: tuple[int, bytes] | None = None
        self._closing = False
        self.pump_id: int | None = None  # relayed by the server's pump (_to_pump)
        self.tls_legs: tuple = (None, None)  # the client's and the server's TLS connections the pump was lent
        self.pump_observes = False  # ... which logs what it relays for this connection's session
        self.split_list = None  # the session's list of completed records last looked at for slow shapes,
        self.split_scanned = 0  # ... and how many of them
        self.client_full_since = 0  # when the write buffer to the client filled (reading the server paused)

    # ------------------------------------------------------------ start-up

    async def run(self, sock: socket.socket, direct_tls: bool) -> None:
        loop = asyncio.get_running_loop()
        srv = self.server
        cfg = srv.config
        inbox = _Inbox()
        try:
            if direct_tls:
                transport = await asyncio.wait_for(tls.accept_tls(sock, inbox, srv.client_tls), cfg.connect_timeout)
            else:
                transport, _ = await loop.connect_accepted_socket(lambda: inbox, sock)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("client %s: TLS handshake failed: %s", self.peer, exc)
            sock.close()
            return
        self.client = transport
        if direct_tls:
            self.tls = True
            self.client_cert_der = srv.client_cert_der
            sslobj = transport.get_extra_info("ssl_object")
            if sslobj is None or sslobj.selected_alpn_protocol() != "postgresql":
                # PostgreSQL demands ALPN "postgresql" for direct TLS; so do we.
                self._refuse("08P01", "direct TLS connection requires ALPN protocol \"postgresql\"")
                return
        try:
            packet = await asyncio.wait_for(self._negotiate(inbox), srv.startup_timeout)
        except ProtocolViolation as exc:
            STATS.protocol_violations += 1
            log.warning("client %s: bad start-up packet: %s", self.peer, exc)
            self._refuse(exc.sqlstate, str(exc))
            return
        except (ConnectionError, asyncio.TimeoutError, OSError) as exc:
            log.debug("client %s: gone during start-up: %r", self.peer, exc)
            self._close_transports()
            return
        if packet is None:
            return  # SSL/GSS refusal ended the conversation, or a cancel request was handled
        if srv.draining:
            STATS.connections_refused += 1
            self._refuse("57P03", "the proxy is shutting down")
            return
        if srv.active >= cfg.max_connections:
            STATS.connections_refused += 1
            log.warning("client %s: refused: max_connections (%d) reached", self.peer, cfg.max_connections)
            self._refuse("53300", "sorry, too many clients already")
            return
        srv.active += 1
        STATS.connections_active += 1
        try:
            await self._open_upstream(packet, inbox)
            if self.closed is not None:
                await self.closed
        finally:
            srv.active -= 1
            STATS.connections_active -= 1
            self._forget()

    async def _negotiate(self, inbox: _Inbox):
        """Read start-up packets until a StartupMessage; answer SSL/GSS requests and cancels."""
        srv = self.server
        for _ in range(4):
            head = await inbox.read_exactly(4)
            n = startup_packet_length(head, srv.config.max_startup_packet)
            raw = head + await inbox.read_exactly(n - 4)
            packet = parse_startup_packet(raw)
            if packet.kind == "startup":
                return packet
            if packet.kind == "cancel":
                await srv.forward_cancel(packet)
                self._close_transports()
                return None
            if packet.kind == "ssl" and srv.client_tls is not None and not self.tls:
                if inbox.buf:
                    # Bytes after SSLRequest before the handshake would be injectable plaintext.
                    raise ProtocolViolation("received unencrypted data after SSL request")
                self.client.write(b"S")
                transport = await tls.start_tls(self.client, inbox, srv.client_tls, server_side=True)
                inbox.transport = self.client = transport
                self.tls = True
                self.client_cert_der = srv.client_cert_der
                continue
            # GSSENCRequest, or SSLRequest without client TLS configured: refuse, the client goes on.
            self.client.write(b"N")
        raise ProtocolViolation("too many start-up negotiation packets")

    async def _open_upstream(self, packet, inbox: _Inbox) -> None:
        srv = self.server
        cfg = srv.config
        loop = asyncio.get_running_loop()
        up = _Inbox()
        try:
            if srv.upstream_path:
                transport, _ = await asyncio.wait_for(
                    loop.create_unix_connection(lambda: up, srv.upstream_path), cfg.connect_timeout
                )
            else:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: up, srv.upstream_host, srv.upstream_port), cfg.connect_timeout
                )
            self.upstream = transport
            if srv.upstream_tls is not None and not srv.upstream_path:
                transport.write(_SSL_REQUEST)
                answer = await asyncio.wait_for(up.read_exactly(1), cfg.connect_timeout)
                if answer == b"S":
                    transport = await asyncio.wait_for(
                        tls.start_tls(transport, up, srv.upstream_tls, server_side=False,
                                      server_hostname=srv.upstream_server_name),
                        cfg.connect_timeout,
                    )
                    up.transport = self.upstream = transport
                elif cfg.upstream_tls != "prefer":
                    raise ConnectionRefusedError(f"upstream {srv.upstream_label} does not accept TLS (upstream_tls={cfg.upstream_tls})")
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            STATS.upstream_errors += 1
            reason = "timeout" if isinstance(exc, asyncio.TimeoutError) else (str(exc) or exc.__class__.__name__)
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                log.error("client %s: cannot open upstream connection: %s", self.peer, reason)
                self._refuse("53300", "sorry, too many clients already", detail="the proxy ran out of file descriptors")
            else:
                log.warning("client %s: upstream %s unreachable: %s", self.peer, srv.upstream_label, reason)
                self._refuse("08001", f"pgotel-proxy could not connect to upstream server {srv.upstream_label}: {reason}")
            if self.upstream is not None:
                self.upstream.abort()
            return

        params = packet.params
        self.session = Session(
            max_message_size=cfg.max_message_size,
            capture_params=cfg.capture_parameters,
            flush_phases=cfg.phase_timing == "flush",
            slow_texts=srv.slow_texts if cfg.phase_timing == "wire" and cfg.phase_split_threshold > 0 else None,
            strip_scram_plus=not self._binding_passes(),
            protocol_version=packet.code,
            startup_params=params,
        )
        self.wal = srv.wal_injector(self.peer, params.get("application_name"))
        if self.wal is not None:
            self.session.injector = self.wal
            self.session.hold_first_ready = True
        self.closed = loop.create_future()
        for t in (self.client, self.upstream):
            t.set_write_buffer_limits(high=_WRITE_HIGH, low=_WRITE_LOW)
        self.upstream.write(packet.raw)
        client_rest = inbox.take()
        upstream_rest = up.take()
        self.client.set_protocol(_FromClient(self))
        self.upstream.set_protocol(_FromServer(self))
        if upstream_rest:
            self.upstream.get_protocol().data_received(upstream_rest)
        if client_rest:
            self.client.get_protocol().data_received(client_rest)
        if inbox.eof:
            self.client_lost(None)
        elif up.eof:
            self.upstream_lost(None)

    def _binding_passes(self) -> bool:
        """Whether SCRAM-SHA-256-PLUS may reach the client untouched.

        Channel binding (``tls-server-end-point``) is a hash of the server
        certificate the client saw. The client binds to what the proxy
        presented, the server to its own certificate: the two agree only when
        they are the very same certificate, and then binding verifies end to
        end, through the proxy. Otherwise the mechanism is removed from the
        offer: a client that chose it would fail the server's binding check.

        What removing it costs, and why the proxy cannot make up for it: libpq
        over TLS with ``channel_binding=prefer`` then answers with the GS2 flag
        ``y`` ("I can bind, I believe you cannot"), and a server that sees TLS
        on its own leg takes that for a downgrade and refuses the login
        ("SCRAM channel binding negotiation error"). Rewriting the flag to
        ``n`` is not possible: the client repeats it in its final message
        (``c=eSws``), the server insists that both agree, and the client's
        proof and the server's signature are computed over that final message,
        so changing ``c=`` fails the password check on the server and the
        signature check on the client. Only the client (``channel_binding=disable``),
        a plain client leg, or the upstream's certificate on the client leg
        avoids it; the server warns once at start-up (``warn_channel_binding``).
        """
        upstream_ssl = self.upstream.get_extra_info("ssl_object") if self.upstream is not None else None
        if not self.tls or upstream_ssl is None:
            return False
        der = upstream_ssl.getpeercert(binary_form=True)
        same = der is not None and der == self.client_cert_der
        srv = self.server
        if not same and srv.binding_check == "failed":
            # The start-up comparison could not reach the upstream: this session made it instead.
            srv.binding_check = "done"
            srv.warn_channel_binding()
        return same

    def _refuse(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        """Answer a connection we will not serve with a FATAL ErrorResponse and close it."""
        self._final_error(error_response(sqlstate, message, detail=detail))

    def _final_error(self, payload: bytes) -> None:
        """Send a last ErrorResponse and let go of the client leg without losing it.

        Closing a socket that still holds unread input makes the kernel reset the
        connection, and the reset can destroy the error before the client reads
        it (a client that sent garbage or an oversized message usually has more
        in flight). So: FIN after the error, discard what still arrives, close
        when the client hangs up or a second later.
        """
        t = self.client
        if t is None or t.is_closing():
            return
        self.client = None  # no longer relayed: upstream_lost / close leave it alone
        t.write(payload)
        if t.can_write_eof():
            t.write_eof()
            t.set_protocol(_Discard())
            t.resume_reading()
            asyncio.get_running_loop().call_later(1.0, t.close)
        else:
            t.close()

    # --------------------------------------------------------------- relay

    def became_ready(self) -> None:
        """Start-up is over (first ReadyForQuery): register the cancel key, open the trace handle."""
        self.ready = True
        s = self.session
        srv = self.server
        if s.backend_pid is not None and s.cancel_key is not None:
            self._cancel_key = (s.backend_pid, s.cancel_key)
            srv.cancel_keys[self._cancel_key] = self
        if self.wal is not None:
            # Ask whether emission is possible before the client is let go (its ReadyForQuery is held).
            self.upstream.write(self.wal.start(s))
        tracer = srv.tracer
        if tracer is not None and tracer.wants_connection(s):
            self.trace = tracer.open(ConnectionInfo(self.peer, srv.upstream_label, s, self.tls))
            self.eager = self.wal is not None or not getattr(self.trace, "collects", False)
            if self._splices_nothing():
                # The pump relays, the event loop observes what it relayed; else the asyncio relay stays.
                self._to_pump(observe=True)
        elif not s.flush_phases and self.wal is None:
            # Nothing to observe: from now on this connection is a plain byte relay.
            self.observe = False
            if s.at_client_boundary:
                self._to_pump()

    def _splices_nothing(self) -> bool:
        """Whether the proxy has nothing of its own to write into this session's streams from now on.

        Only then may the pump relay it: WAL propagation and Flush phase
        timing write messages in between the client's, which the pump does not.
        """
        s = self.session
        return self.wal is None and not s.flush_phases and s.at_client_boundary and not s.server_hold

    def _to_pump(self, observe: bool = False) -> bool:
        """Hand both sockets to the server's compiled pump (``_pump.c``); False when it cannot take them.

        It can when it was built, both transports are sockets (a TLS leg's
        transport the compiled TLS's, see ``tls.py``) and hold nothing unsent.
        A TLS leg's connection is lent to the pump with its socket, which
        decrypts and encrypts on its own thread from then on; what the
        connection still holds is read there first. The transports give their duplicated
        descriptors up and are closed; the pump relays on its own thread from
        the next byte on, and this connection ends when the pump says the pair
        ended (``pump_ended``) or when it is closed (``pump.close``).

        ``observe``: the session is traced. The pump frames the client's
        messages before it forwards them (what the codec would refuse, it does
        not forward) and logs every chunk it relays with its receive time; the
        event loop reads the log every few milliseconds and feeds the session
        (``pump_observe``): relay first, observe second, on another thread. A
        refused chunk or the server's end hands the pair back to the event
        loop (``pump_back``), which answers as the asyncio relay does (08P01,
        08006).
        """
        srv = self.server
        client, upstream = self.client, self.upstream
        legs = (tls.relayable(client), tls.relayable(upstream))
        if False in legs:  # TLS the pump cannot take (Python's ssl module)
            return False
        if client.get_write_buffer_size() or upstream.get_write_buffer_size():
            return False
        socks = (client.get_extra_info("socket"), upstream.get_extra_info("socket"))
        if any(sk is None or sk.type != socket.SOCK_STREAM for sk in socks):
            return False
        if not srv.fd_room(2):
            # The transports close their own descriptors only at the event loop's next
            # turn: until then the hand-over holds two more. Short of them, stay here.
            return False
        pump = srv.pump()
        if pump is None:
            return False
        fds: list[int] = []
        for t, leg in zip((client, upstream), legs):
            if leg is not None:
                t.hand_over()  # the TLS connection is the pump's from the add on: not read here any more
        try:
            for sk in socks:
                fds.append(os.dup(sk.fileno()))
            # The pump may read from now on; the event loop cannot before this callback returns.
            if observe:
                self.pump_id = pump.add(fds[0], fds[1], observe=True, max_message=self.session.max_message_size,
                                        tls_a=legs[0], tls_b=legs[1])
            else:
                self.pump_id = pump.add(fds[0], fds[1], tls_a=legs[0], tls_b=legs[1])
        except (OSError, RuntimeError, TypeError):
            for fd in fds:
                os.close(fd)
            for t, leg in zip((client, upstream), legs):
                if leg is not None:
                    t.hand_over(False)
            return False
        self.tls_legs = legs
        srv.pumped[self.pump_id] = self
        if observe:
            self.pump_observes = True
            srv.observed += 1
            srv.observe_soon()
        for t in (client, upstream):
            t.pause_reading()
            t.set_protocol(_Discard())
            t.abort()
        return True

    def pump_observe(self, kind: int, log: bytes, start: int, stop: int, ts: int) -> None:
        """Observe a chunk the pump relayed, ``log[start:stop]`` (kind PUMP_LOG_CLIENT or PUMP_LOG_SERVER)."""
        if not self.observe:
            return
        session = self.session
        try:
            if kind == PUMP_LOG_CLIENT:
                session.client_observe(log, start, stop, ts)  # nothing is spliced in on a pumped session
            else:
                session.server_observe(log, ts, start, stop)
        except Exception as exc:  # as in the asyncio relay: the bytes went on, observation stops
            self.stop_observing("client" if kind == PUMP_LOG_CLIENT else "server", exc)

    def pump_failed(self, kind: int, exc: BaseException) -> None:
        """Observing a chunk the pump relayed raised (protocol/pumplog.py): as pump_observe handles it."""
        self.stop_observing("client" if kind == PUMP_LOG_CLIENT else "server", exc)

    def stop_observing(self, stream: str, exc: BaseException) -> bytes:
        """Observation failed on ``stream``: the session stops observing, the relay goes on.

        Returns the client bytes the session held (not yet forwarded), for the caller to forward.
        """
        session = self.session
        held = session.take_held_client_bytes()
        session.desync(f"{stream} stream: {exc!r}")
        self.observe = False
        STATS.decode_desyncs += 1
        log.warning("client %s: observation stopped: %r", self.peer, exc)
        return held

    def pump_observed(self) -> None:
        """After a read of the log: hand over finished statements as ``_FromServer`` does."""
        s = self.session
        if s is None or not s.completed:
            return
        self.scan_finished()
        if self.eager or len(s.completed) >= _DELIVER_AT:
            self.deliver()

    def scan_finished(self) -> None:
        """Look at the statements finished since the last look, once each, before delivery
        (which may wait for more, or be the span process's own take): adaptive splitting."""
        session = self.session
        done = session.completed
        start = self.split_scanned if self.split_list is done else 0
        if start < len(done):
            self._mark_slow_shapes(done, start)
        session.looked_at_finished()
        self.split_list = done
        self.split_scanned = len(done)

    def pump_back(self, payload: bytes, ts: int) -> None:
        """The pump handed the pair back (a refused client chunk, or the server's end): relay on here."""
        srv = self.server
        if self.pump_id is not None:
            srv.unpump(self.pump_id)
            self.pump_id = None
        reason, err, fd_client, fd_server, n_chunk, n_to_server, n_to_client, _ = _BACK.unpack_from(payload)
        pos = _BACK.size
        chunk = payload[pos:pos + n_chunk]
        pos += n_chunk
        to_server = payload[pos:pos + n_to_server]
        to_client = payload[pos + n_to_server:pos + n_to_server + n_to_client]
        self.pump_observed()
        task = asyncio.get_running_loop().create_task(
            self._take_back(reason, err, fd_client, fd_server, chunk, ts, to_server, to_client))
        srv._tasks.add(task)
        task.add_done_callback(srv._tasks.discard)

    async def _take_back(self, reason: int, err: int, fd_client: int, fd_server: int, chunk: bytes, ts: int,
                         to_server: bytes, to_client: bytes) -> None:
        loop = asyncio.get_running_loop()
        socks = []
        try:
            for fd in (fd_client, fd_server):
                socks.append(socket.socket(fileno=fd))
        except OSError:
            for fd in (fd_client, fd_server)[len(socks):]:
                os.close(fd)
            for sk in socks:
                sk.close()
            self._finish()
            return
        client = upstream = None
        try:
            if not self._closing and not self.server.pump_stopped:
                client, _ = await loop.connect_accepted_socket(_Held, socks[0])
                if reason == _BACK_VIOLATION:
                    upstream, _ = await loop.connect_accepted_socket(_Held, socks[1])
        except (OSError, RuntimeError) as exc:
            log.debug("client %s: taking the relay back failed: %r", self.peer, exc)
        if client is None or self._closing or self.server.pump_stopped:
            for t in (client, upstream):
                if t is not None:
                    t.abort()
            for sk in socks:
                if sk.fileno() >= 0:
                    sk.close()
            self._finish()
            return
        # What the pump kept is as it goes on the wire (encrypted already for a TLS leg); the TLS
        # connections it was lent are the event loop's again, with what they still hold.
        tls_client, tls_server = self.tls_legs
        self.tls_legs = (None, None)
        if to_client:
            client.write(to_client)
        if tls_client is not None:
            client = tls.resume_tls(client, tls_client)
        self.client = client
        if reason != _BACK_VIOLATION:
            # The server ended (err: how): it gets nothing more; the client may get 08006.
            socks[1].close()
            client.set_protocol(_FromClient(self))
            self.upstream_lost(OSError(err, os.strerror(err)) if err else None)
            return
        if to_server:
            upstream.write(to_server)
        if tls_server is not None:
            upstream = tls.resume_tls(upstream, tls_server)
        self.upstream = upstream
        fc, fs = _FromClient(self), _FromServer(self)
        client.set_protocol(fc)
        upstream.set_protocol(fs)
        fc.forward(chunk, ts)  # the codec refuses it (08P01, the connection ends) or forwards it
        for t in (client, upstream):
            if not t.is_closing():
                t.resume_reading()

    def pump_ended(self, err: int) -> None:
        """The pump relayed this connection to its end (err: the first errno, 0 for an end of input)."""
        self.pump_id = None
        if err and err != errno.ECONNABORTED:
            log.debug("client %s: relay ended: %s", self.peer, os.strerror(err))
        self._finish()

    def deliver(self) -> None:
        done = self.session.take_completed()
        if self.wal is not None:
            self.wal.statements(done)
        if self.trace is not None:
            self.trace.statements(done)

    def _mark_slow_shapes(self, done: list, start: int) -> None:
        """Adaptive phase splitting: shapes of extended statements (``done[start:]``) whose typical
        duration is at least phase_split_threshold are slow for a while: the pump splits their
        phases (protocol/framing.py), and so do sessions on the asyncio path (``ProxyServer.slow_texts``).

        Typical: a moving average per shape (``ProxyServer.shape_durations``), so that one
        execution slowed by a busy machine does not split later executions of a fast shape
        (the next fast one ends the marking). The session has the longest of these statements
        (``Session.longest_done_ns``) and, while no shape has a mean, the ones as slow as the
        threshold (``Session.slow_done``, which it fills from the next statement on once
        ``slow_after_ns`` is the threshold): the only ones the loop would not skip.
        """
        srv = self.server
        session = self.session
        cfg = srv.config
        threshold = cfg.phase_split_threshold
        if threshold <= 0 or cfg.phase_timing != "wire":
            return
        pump = srv.running_pump()
        texts = srv.slow_texts
        slow_ns = threshold * 1e9
        durations = srv.shape_durations
        after_ns = int(slow_ns)
        listed = session.slow_after_ns == after_ns and not session.slow_done_full
        if not listed:
            session.slow_after_ns = after_ns  # (the threshold was set or changed: listed from now on)
        if session.longest_done_ns < slow_ns and not durations:
            return  # none as slow as the threshold, and no shape's mean to bring down: nothing to look at
        now = 0
        for rec in (session.slow_done if listed and not durations else islice(done, start, None)):
            sql = rec.sql
            if rec.protocol != "extended" or not sql or not rec.end_ns:
                continue  # not an execution (a Parse alone, say): nothing to split
            took = rec.end_ns - rec.start_ns
            # Faster than the threshold, an execution matters only to a shape with a mean. With
            # none (no shape slow lately, the common case) that costs no hash; with some, the
            # text's shape is looked up even when the text is new (a traceparent comment of its
            # own), so that fast executions bring a slow shape's mean down.
            if took < slow_ns and not durations:
                continue
            shape = texts.shape(sql)
            if took < slow_ns and shape not in durations:
                continue
            # From 0: one execution slowed by a busy machine moves the mean by an eighth of its
            # duration, a shape slow every time reaches the threshold at once if it took eight
            # times it, after a few executions if less.
            before = durations.get(shape, 0.0)
            mean = before + (took - before) * _SHAPE_WEIGHT
            if before < slow_ns and mean < slow_ns * _FORGET_BELOW:
                # Not slow, and well below the threshold: forgotten, so that a fast shape one
                # spike put here costs nothing again (no hash while the table is empty). Should
                # it turn slow, it starts from 0 as a new shape does.
                durations.pop(shape, None)
                continue
            if len(durations) >= _SHAPES_KEPT and shape not in durations:
                durations.clear()
            durations[shape] = mean
            if mean >= slow_ns:
                if not now:
                    now = _time_ns()
                expires = now + SLOW_SHAPE_FOR_NS
            elif before >= slow_ns:
                expires = 0  # fast again: no longer split
            else:
                continue
            texts.mark(shape, expires)
            if pump is not None:
                pump.mark_slow(shape, expires)

    def violation(self, exc: ProtocolViolation) -> None:
        STATS.protocol_violations += 1
        log.warning("client %s: protocol violation: %s; closing the connection", self.peer, exc)
        self._final_error(error_response(exc.sqlstate, str(exc)))
        self._close_transports()

    def client_lost(self, exc) -> None:
        if self.upstream is not None and not self.upstream.is_closing():
            # close() flushes what is buffered, then Postgres sees EOF and ends the backend.
            self.upstream.close()
        self._finish()

    def upstream_lost(self, exc) -> None:
        s = self.session
        if self.client is not None and not self.client.is_closing():
            if not self._closing and self.observe and s is not None and s.fatal is None and not s.client_terminated and s._sskip == 0 and not s._sbuf:
                # The server vanished without a word; tell the client why, at a message
                # boundary (only known while observing: a plain relay does not frame).
                STATS.upstream_errors += 1
                log.warning("client %s: upstream %s closed the connection unexpectedly", self.peer, self.server.upstream_label)
                self.client.write(error_response("08006", "upstream server closed the connection unexpectedly"))
            self.client.close()
        self._finish()

    def close(self, notify: bool = True) -> None:
        """Close both legs now (shutdown after the drain time)."""
        self._closing = True
        s = self.session
        if notify and self.client is not None and not self.client.is_closing() and s is not None and s.tx_status == "I" and not s.answers_due:
            self.client.write(error_response("57P01", "terminating connection: the proxy is shutting down"))
        self._close_transports()

    def _close_transports(self) -> None:
        self._closing = True
        if self.pump_id is not None:
            self.server.pump_close(self.pump_id)
            self.pump_id = None
        for t in (self.client, self.upstream):
            if t is not None and not t.is_closing():
                t.close()
        self._finish()

    def _finish(self) -> None:
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def _forget(self) -> None:
        if self._cancel_key is not None:
            self.server.cancel_keys.pop(self._cancel_key, None)
            self._cancel_key = None
        if self.session is not None and self.trace is not None:
            self.session.finish_all(_time_ns())
            if self.session.completed:
                self.deliver()
            self.trace.close()
            self.trace = None
