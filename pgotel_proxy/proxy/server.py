"""The listening side: accept loop, cancel routing, graceful drain, and ``run(config)`` for the CLI.

Connections are accepted by our own loop rather than ``create_server`` because
the first byte decides how a connection starts: 0x16 is a TLS ClientHello
(PostgreSQL 17 direct TLS), anything else a start-up packet. We peek at it
before handing the socket to a transport.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import struct
from typing import TYPE_CHECKING, Any, Callable

from ..config import ConfigError
from ..hostport import format_hostport
from ..listen import bind_tcp, check_addresses
from ..protocol._impl import PURE_PYTHON
from ..protocol.framing import SlowTexts
from ..protocol.messages import error_response
from ..protocol.pumplog import observe_log
from ..stats import STATS
from ..protocol.pumplog import PUMP_LOG_HANDBACK
from .connection import ClientConnection
from .tls import certificate_der, client_context, start_tls, upstream_context

if TYPE_CHECKING:
    from ..config import Config

Pump = None
if not PURE_PYTHON:
    try:  # the compiled relay of unobserved connections (_pump.c)
        from ._pump import Pump
    except (ImportError, AttributeError):  # not built, or the codec's framing it imports is not compiled
        pass

def _resume(conn: ClientConnection, kind: int, log: bytes, at: int | BaseException, stop: int, ts: int) -> None:
    """One record of the pump's log, ``log[at:stop]``, for Python (observe_log leaves it here)."""
    if kind == PUMP_LOG_HANDBACK:
        conn.pump_back(log[at:stop], ts)
    elif isinstance(at, BaseException):
        conn.pump_failed(kind, at)
    else:
        conn.pump_observe(kind, log, at, stop, ts)
#: How often the event loop reads the pump's log while observed sessions are pumped (it is
#: also woken when the log passes 1 MiB, and when a pair is handed back or ends).
OBSERVE_INTERVAL = 0.005
#: The log's bound: past it, observed pairs stop reading until the event loop caught up.
PUMP_LOG_LIMIT = 16 << 20

__all__ = ["ProxyServer", "run"]

log = logging.getLogger("pgotel_proxy.proxy")

# Descriptors kept free beyond two per session: the reserve descriptor, admin
# requests, cancel forwarding, the exporter's and enrichment's sockets, log files.
_FD_HEADROOM = 16
_FD_DIR = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"


class ProxyServer:
    """Listens, accepts, and owns every :class:`ClientConnection`."""

    def __init__(self, config: Config, tracer: Any = None) -> None:
        self.config = config
        self.tracer = tracer
        self.startup_timeout = max(config.connect_timeout, 10.0)
        self.connections: set[ClientConnection] = set()
        self.cancel_keys: dict[tuple[int, bytes], ClientConnection] = {}
        self.active = 0
        self.draining = False
        self.listen_addresses: list[str] = []
        self._listeners: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task] = []
        self._tasks: set[asyncio.Task] = set()
        self._reserve_fd: int | None = None
        self.worker_link = None  # multi-process mode: this worker's WorkerLink (workers.py)
        self.pumped: dict[int, ClientConnection] = {}  # connections the pump relays, by pair id
        # Adaptive phase splitting (ClientConnection._mark_slow_shapes): the moving average of
        # each statement shape's duration in ns, and the slow shapes for the sessions that splice
        # their own Flushes (the asyncio path; the pump has its own table), with each text's shape.
        self.shape_durations: dict[int, float] = {}
        self.slow_texts = SlowTexts()
        self.observed = 0  # of them, those whose chunks the pump logs for observation
        self.pump_stopped = False  # the pump was stopped for good (the end of a drain)
        self._observe_timer: asyncio.TimerHandle | None = None
        self._pump = None
        self._pump_fd: int | None = None
        self._pump_failed = Pump is None
        self._fd_limit: int | None = None
        self._fd_base = 0
        self.upstream_path: str | None = config.upstream_unix_path
        if self.upstream_path is not None:
            self.upstream_host, self.upstream_port = "", 0
            self.upstream_label = self.upstream_path
        else:
            self.upstream_host, self.upstream_port = config.upstream_address
            self.upstream_label = format_hostport(self.upstream_host, self.upstream_port)
        self.upstream_server_name = config.upstream_server_name
        self.client_tls = None
        self.client_cert_der: bytes | None = None  # the certificate client TLS presents (channel binding)
        if config.client_tls_cert and config.client_tls_key:
            self.client_tls = client_context(str(config.client_tls_cert), str(config.client_tls_key), config.client_tls_min_version)
            self.client_cert_der = certificate_der(str(config.client_tls_cert))
        # The start-up comparison of the two legs' certificates (check_channel_binding): None when
        # this process does not make it, else "pending", "done" or "failed" (a session makes it then).
        self.binding_check: str | None = None
        self.upstream_tls = None
        if not self.upstream_path:
            self.upstream_tls = upstream_context(
                config.upstream_tls,
                _str(config.upstream_tls_ca),
                _str(config.upstream_tls_cert),
                _str(config.upstream_tls_key),
            )

    def wal_injector(self, peer: str, startup_application_name: str | None = None):
        """The otelwal injector for a new session (``wal_propagation``), else None.

        ``startup_application_name`` is the StartupMessage's, a context channel's
        session default.

        Made here, where the proxy is put together, so that the connection code
        knows only the session's injector interface (``Session.injector``).
        """
        cfg = self.config
        if not cfg.wal_propagation:
            return None
        from ..wal import WalInjector

        return WalInjector(cfg.wal_message_prefix, cfg.wal_writing_functions, peer=peer,
                           startup_application_name=startup_application_name)

    def reload_tls(self) -> None:
        """Re-read certificates (SIGHUP); open sessions keep the context they started with.

        Both contexts are built before either is replaced: when one fails to
        load, nothing changes.
        """
        cfg = self.config
        client_tls = upstream_tls = client_der = None
        if cfg.client_tls_cert and cfg.client_tls_key:
            client_tls = client_context(str(cfg.client_tls_cert), str(cfg.client_tls_key), cfg.client_tls_min_version)
            client_der = certificate_der(str(cfg.client_tls_cert))
        if not self.upstream_path:
            upstream_tls = upstream_context(cfg.upstream_tls, _str(cfg.upstream_tls_ca), _str(cfg.upstream_tls_cert), _str(cfg.upstream_tls_key))
        self.client_tls, self.upstream_tls, self.client_cert_der = client_tls, upstream_tls, client_der

    # ------------------------------------------------------------ listening

    async def start(self) -> None:
        cfg = self.config
        host, port = cfg.listen_address
        sock = bind_tcp("listen", host, port, reuse_port=cfg.workers > 1 and hasattr(socket, "SO_REUSEPORT"))
        sock.listen(1024)
        sock.setblocking(False)
        self._listeners.append(sock)
        bound = sock.getsockname()
        self.listen_addresses.append(format_hostport(bound[0], bound[1]))
        if cfg.unix_socket:
            path = str(cfg.unix_socket)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            usock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                usock.bind(path)
            except OSError as exc:
                usock.close()
                raise ConfigError(f"unix_socket: cannot listen on {path}: {exc.strerror or exc}") from None
            os.chmod(path, 0o777)
            usock.listen(1024)
            usock.setblocking(False)
            self._listeners.append(usock)
            self.listen_addresses.append(path)
        self._open_reserve()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._fd_limit = None if soft == resource.RLIM_INFINITY else soft
        self._fd_base = _open_fds() or 0
        loop = asyncio.get_running_loop()
        for ls in self._listeners:
            self._accept_tasks.append(loop.create_task(self._accept_loop(ls)))
        log.info("listening on %s, upstream %s", ", ".join(self.listen_addresses), self.upstream_label)

    # ----------------------------------------------------- channel binding

    def check_channel_binding(self) -> asyncio.Task | None:
        """With TLS on both legs, compare the two certificates once, in the background.

        SCRAM-SHA-256-PLUS passes through only when the proxy presents the
        upstream's own certificate (see ``ClientConnection._open_upstream``);
        otherwise libpq's defaults cannot log in with SCRAM, and the operator
        is told so once (``warn_channel_binding``). Called once per proxy (by
        worker 0 only): the other workers would repeat the same line.
        """
        if self.client_tls is None or self.upstream_tls is None:
            return None
        self.binding_check = "pending"
        task = asyncio.get_running_loop().create_task(self._probe_upstream_certificate())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _probe_upstream_certificate(self) -> None:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.upstream_host, self.upstream_port), self.config.connect_timeout)
            writer.write(struct.pack("!II", 8, 80877103))  # SSLRequest
            if await asyncio.wait_for(reader.readexactly(1), self.config.connect_timeout) != b"S":
                self.binding_check = "done"  # the upstream leg is plain text: nothing to bind
                return
            transport = await asyncio.wait_for(
                start_tls(writer.transport, writer.transport.get_protocol(), self.upstream_tls, server_side=False,
                          server_hostname=self.upstream_server_name),
                self.config.connect_timeout)
            der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            transport.abort()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, EOFError) as exc:
            log.debug("channel binding: could not read the upstream certificate at start-up: %r", exc)
            self.binding_check = "failed"
            return
        finally:
            if writer is not None:
                writer.close()
        self.binding_check = "done"
        if der != self.client_cert_der:
            self.warn_channel_binding()

    def warn_channel_binding(self) -> None:
        """The two legs present different certificates: say what that costs SCRAM clients, and the ways out."""
        log.warning(
            "client TLS and upstream TLS are both on, and the certificate the proxy presents to clients is not "
            "the upstream's: SCRAM-SHA-256-PLUS (channel binding) is removed from the server's offer, and libpq "
            "clients with their defaults (channel_binding=prefer) fail against SCRAM roles with 'SCRAM channel "
            "binding negotiation error'. Fixes: channel_binding=disable in the clients' connection settings; or "
            "run the proxy as a sidecar without client TLS (clients on localhost or a Unix socket); or present "
            "the upstream's own certificate and key as client_tls_cert / client_tls_key, and channel binding "
            "works end to end")

    @property
    def port(self) -> int:
        return self._listeners[0].getsockname()[1]

    def _open_reserve(self) -> None:
        # One spare descriptor, given up when accept() hits EMFILE so the client can be told why.
        try:
            self._reserve_fd = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            self._reserve_fd = None

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    await self._refuse_for_fds(lsock)
                    continue
                if lsock.fileno() < 0:
                    return
                log.error("accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            STATS.connections_accepted += 1
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = format_hostport(addr[0], addr[1])
            else:
                peer = "unix"
            if self._short_of_fds():
                # Answered here and closed at once: a refused client must not hold a
                # descriptor that an accepted session needs for its upstream connection.
                log.error("client %s: refused: the proxy is short of file descriptors", peer)
                _refuse_now(conn)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._handle(conn, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _short_of_fds(self) -> bool:
        """Whether a client just accepted would leave no descriptor for its upstream connection.

        Such a client is refused to keep room for those already accepted:
        otherwise a burst of clients takes every descriptor and none of them can
        open its upstream connection.
        """
        return not self.fd_room(1)

    def fd_room(self, need: int) -> bool:
        """Whether ``need`` more descriptors leave room for the upstream legs still to come and the headroom."""
        limit = self._fd_limit
        if limit is None:
            return True
        # Listing the descriptors costs O(open descriptors): only past half the limit. The
        # estimate (four per session: its two legs, and two more for a session handed to the
        # pump until its transports have closed their own) misses refused clients whose legs
        # are still closing.
        if self._fd_base + 4 * len(self._tasks) < limit // 2:
            return True
        used = _open_fds()
        if used is None:
            return False  # not even a descriptor left to list the descriptors with
        # Accepted, their upstream descriptor still to come (a session counted active may still be
        # connecting: only an upstream transport says the descriptor is taken).
        waiting = len(self._tasks) - sum(1 for c in self.connections if c.upstream is not None)
        return used + waiting + need + _FD_HEADROOM <= limit

    async def _refuse_for_fds(self, lsock: socket.socket) -> None:
        if self._reserve_fd is None:
            STATS.connections_refused += 1
            await asyncio.sleep(0.05)
            return
        os.close(self._reserve_fd)
        self._reserve_fd = None
        try:
            conn, _ = lsock.accept()
            _refuse_now(conn)
        except OSError:
            await asyncio.sleep(0.01)
        finally:
            log.error("out of file descriptors: refused a connection")
            self._open_reserve()

    async def _handle(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        direct_tls = False
        if self.client_tls is not None:
            try:
                first = await asyncio.wait_for(_peek(loop, sock), self.startup_timeout)
            except (asyncio.TimeoutError, OSError):
                sock.close()
                return
            direct_tls = first == b"\x16"
        conn = ClientConnection(self, peer)
        self.connections.add(conn)
        try:
            await conn.run(sock, direct_tls)
        except Exception:
            log.exception("client %s: connection failed", peer)
            conn.close(notify=False)
        finally:
            self.connections.discard(conn)

    # ---------------------------------------------------------------- pump

    def pump(self):
        """The compiled relay (the pump), started on first use; None where it was not built or cannot start."""
        if self._pump is None and not self._pump_failed and not self.draining:
            fd = None
            try:
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._pump = Pump(fd, log_limit=PUMP_LOG_LIMIT)
                asyncio.get_running_loop().add_reader(fd, self._pump_ended)
            except (OSError, RuntimeError) as exc:
                log.warning("compiled relay unavailable, relaying in Python: %s", exc)
                self._pump_failed = True
                if self._pump is not None:
                    self._pump.stop()
                    self._pump = None
                if fd is not None:
                    os.close(fd)
                return None
            self._pump_fd = fd
        return self._pump

    def running_pump(self):
        """The pump if it was started (None otherwise; unlike ``pump()`` this never starts it)."""
        return self._pump

    def pump_close(self, pair: int) -> None:
        """End a pair the pump relays now (its connection is closing)."""
        self.unpump(pair)
        if self._pump is not None:
            self._pump.close(pair)

    def _pump_ended(self) -> None:
        try:
            os.eventfd_read(self._pump_fd)
        except BlockingIOError:
            pass
        self._end_pairs(self._pump)

    def unpump(self, pair: int):
        """The connection of a pair the pump no longer relays (None if already gone)."""
        conn = self.pumped.pop(pair, None)
        if conn is not None and conn.pump_observes:
            conn.pump_observes = False
            self.observed -= 1
        return conn

    def observe_now(self) -> None:
        """Feed the sessions what the pump relayed for them so far (before a flush or a scrape)."""
        if self._pump is not None and self.observed:
            self._observe_log(self._pump)

    def observe_soon(self) -> None:
        """Read the pump's log within OBSERVE_INTERVAL (an observed session is pumped)."""
        if self._observe_timer is None:
            self._observe_timer = asyncio.get_running_loop().call_later(OBSERVE_INTERVAL, self._observe_tick)

    def _observe_tick(self) -> None:
        self._observe_timer = None
        if self._pump is not None:
            self._observe_log(self._pump)
        if self.observed:
            self.observe_soon()

    def _observe_log(self, pump) -> None:
        """Feed what the pump relayed for observed sessions to their sessions, in order."""
        data = pump.take_log()
        if not data:
            return
        touched = observe_log(data, self.pumped, _resume)
        for conn in touched.values():
            conn.pump_observed()

    def _end_pairs(self, pump) -> None:
        """End the connections of the pairs ``pump`` reported ended (after what they relayed was observed)."""
        self._observe_log(pump)
        for pair, err in pump.take_closed():
            conn = self.unpump(pair)
            if conn is not None:
                conn.pump_ended(err)

    def stop_pump(self) -> None:
        """End the pump's thread; pairs it still relays are closed."""
        pump, self._pump = self._pump, None
        if pump is None:
            return
        fd, self._pump_fd = self._pump_fd, None
        try:
            asyncio.get_running_loop().remove_reader(fd)
        except RuntimeError:
            pass
        self.pump_stopped = True
        if self._observe_timer is not None:
            self._observe_timer.cancel()
            self._observe_timer = None
        pump.stop()
        self._end_pairs(pump)
        os.close(fd)

    # -------------------------------------------------------------- cancel

    async def forward_cancel(self, packet) -> None:
        """Send a client's CancelRequest to the backend it names, if this proxy issued that key.

        With several workers, a key this one did not issue may belong to a
        sibling's session: the worker link offers it to them. An unknown key is
        dropped (and counted) here, by the worker the client reached.
        """
        key = (packet.cancel_pid, packet.cancel_key)
        if key not in self.cancel_keys:
            link = self.worker_link
            if link is not None and await link.route_cancel(packet.raw):
                return
            STATS.cancel_dropped += 1
            log.info("cancel request for unknown backend key (pid %s) dropped", packet.cancel_pid)
            return
        await self.send_cancel(packet.raw)

    async def send_cancel(self, raw: bytes) -> None:
        """Forward a CancelRequest for one of this process's sessions to the upstream server."""
        try:
            if self.upstream_path:
                reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.upstream_path), self.config.connect_timeout)
            else:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.upstream_host, self.upstream_port), self.config.connect_timeout
                )
            writer.write(raw)
            await writer.drain()
            # The server closes without answering once it has processed the request.
            await asyncio.wait_for(reader.read(), self.config.connect_timeout)
            writer.close()
            STATS.cancel_forwarded += 1
        except (OSError, asyncio.TimeoutError) as exc:
            STATS.upstream_errors += 1
            log.warning("could not forward cancel request to %s: %s", self.upstream_label, exc)

    # ------------------------------------------------------------ shutdown

    async def stop_accepting(self) -> None:
        self.draining = True
        for t in self._accept_tasks:
            t.cancel()
        for s in self._listeners:
            if s.family == socket.AF_UNIX:
                try:
                    os.unlink(s.getsockname())
                except OSError:
                    pass
            s.close()
        self._listeners.clear()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, wait up to ``timeout`` for sessions to end, then close the rest."""
        await self.stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.connections)
        if left:
            log.info("drain time over: closing %d open session(s)", len(left))
        for conn in left:
            conn.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        self.stop_pump()
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    fut = loop.create_future()
    fd = sock.fileno()

    def readable() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await fut
    finally:
        loop.remove_reader(fd)
    return sock.recv(1, socket.MSG_PEEK)


def _refuse_now(conn: socket.socket) -> None:
    """Answer 53300 (out of file descriptors) on a just-accepted socket and close it."""
    STATS.connections_refused += 1
    try:
        conn.setblocking(False)
        try:
            # The start-up packet is usually here already; closing with it unread would
            # send a reset, which can destroy the error before the client reads it.
            conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            pass
        conn.setblocking(True)
        conn.settimeout(0.2)
        conn.sendall(error_response("53300", "sorry, too many clients already", detail="the proxy ran out of file descriptors"))
    except OSError:
        pass
    conn.close()


def _open_fds() -> int | None:
    """Descriptors this process has open; None when they cannot be listed (EMFILE)."""
    try:
        return len(os.listdir(_FD_DIR))
    except OSError:
        return None


def _str(v) -> str | None:
    return None if v is None else str(v)


async def serve(
    config: Config, ready: asyncio.Future | None = None, reload: Callable[[], Config] | None = None, worker: Any = None,
    settle_gc: bool = False,
) -> int:
    """Run the proxy until SIGTERM / SIGINT, then drain and return the exit code.

    ``settle_gc`` (the CLI's processes): tune the garbage collector once
    started (runtime.settle_gc); a proxy embedded in another program leaves
    that program's collector alone.

    SIGHUP calls ``reload`` for a fresh config and applies what can change
    without a restart: certificates (new sessions only), tracing on/off, the
    sample ratio and the rule for failed and slow statements (``always_trace_*``). ``worker`` is the WorkerLink of a worker process (workers.py).
    """
    from ..enrich import attach as attach_enrichment
    from ..tracing import build_tracer

    loop = asyncio.get_running_loop()
    tracer = build_tracer(config)
    server = ProxyServer(config, tracer)

    attach_enrichment(config, server, tracer)  # sets server.source_status, which the span process reports
    admin = None
    await server.start()
    if worker is None or worker.index == 0:
        server.check_channel_binding()
    if worker is not None:
        await worker.attach(server, tracer)  # before the admin: it reads totals through server.worker_link
    if config.admin_listen:
        from ..admin import AdminServer

        admin = AdminServer(config, server, tracer)
        await admin.start()
    stop = asyncio.Event()

    def on_signal(signame: str) -> None:
        log.info("%s received: draining for up to %ss", signame, config.drain_timeout)
        stop.set()

    def on_hup() -> None:
        log.info("SIGHUP received: reloading")
        old = server.config
        try:
            new = reload() if reload is not None else old
            server.config = new
            # Certificates first: if they do not load, none of the new settings applies.
            server.reload_tls()
        except Exception as exc:
            server.config = old
            log.error("reload failed, keeping the old settings: %s", exc)
            return
        if tracer is not None and new is not old:
            tracer.set_sample_rate(new.sample_rate)
            tracer.set_keep_rule(new)
            tracer.set_enabled(new.tracing)

    for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        loop.add_signal_handler(sig, on_signal, name)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if worker is not None:
        worker.signals_ready()  # signals held back since the fork now reach these handlers
    if ready is not None and not ready.done():
        ready.set_result(server)
    if settle_gc:
        from ..runtime import settle_gc as _settle

        _settle()
    await stop.wait()
    await server.drain(config.drain_timeout)
    if admin is not None:
        await admin.stop()
    if tracer is not None:
        await loop.run_in_executor(None, tracer.shutdown)
    if worker is not None:
        await worker.close()  # last: the final counters include the spans exported at shutdown
    log.info("stopped")
    return 0


def run(config: Config, reload: Callable[[], Config] | None = None, worker: Any = None) -> int:
    """Blocking entry point for the CLI: uvloop when available; ``workers > 1`` forks workers first.

    A listen address in use raises :class:`ConfigError` before anything starts.
    """
    if worker is None:
        check_addresses(config)
    if worker is None and config.workers > 1:
        from .workers import run_workers

        return run_workers(config, reload)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(serve(config, reload=reload, worker=worker, settle_gc=True))
    return uvloop.run(serve(config, reload=reload, worker=worker, settle_gc=True))
