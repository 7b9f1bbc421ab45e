"""Multi-process mode, ``pgotel-proxy run --workers N``: the supervisor and each worker's link to it.

How it works (Linux):

* The parent process forks N workers before any event loop or thread exists,
  then only supervises: it forwards SIGTERM, SIGINT and SIGHUP to every worker,
  reaps them, restarts one that exits while the proxy is not shutting down (a
  warning says so; when one fails three times in a row before it serves, e.g.
  the port is taken, the whole proxy stops with exit code 1), and exits 0 once
  every worker has drained and exited 0. The modules workers need are imported
  before forking, so a restart takes milliseconds.
* Each worker runs the ordinary ``serve()``: its own listening socket bound
  with SO_REUSEPORT on the same address (the kernel spreads new connections over
  them), its own tracer and exporter. Only worker 0 binds the admin listener and
  the Unix socket (``unix_socket``): neither can be shared the same way.
* Cancel requests: a CancelRequest arrives at whichever worker the kernel
  picks, but only the worker that relayed the session's start-up knows its
  key. A worker that does not know the key offers the raw packet to its
  siblings over Unix datagram sockets in a private directory (mode 0700, made
  by the parent, removed at exit). The owner forwards it upstream and answers;
  when nobody owns the key it is dropped, never sent upstream, and counted
  once in ``cancel_dropped`` by the worker that received it.
* Metrics: the parent maps an anonymous shared memory area before forking.
  Every worker copies its counters into its own slot of it every 0.25 s; the
  admin endpoint (worker 0) sums the slots, so ``/metrics`` and ``/status``
  cover all workers, and ``/status`` lists each worker (pid, connections,
  statements). When a worker exits, the parent moves its last published
  counters into a "retired" row so totals do not go backwards on a restart;
  counts from its last 0.25 s are lost.
* Runtime control: ``POST /tracing`` writes a small control block (generation,
  enabled, sample rate) in the same area; every worker polls it and applies
  changes, and a restarted worker applies the latest one at start-up. On SIGHUP
  each worker reloads its configuration as in single-process mode, and the
  parent writes the reloaded tracing settings into the control block too, so
  later restarts agree with the running workers. Listen addresses, the admin
  address and the number of workers need a restart to change.
* Lock waits: a statement may wait on a lock a sibling worker's session holds,
  and each worker's span process knows only its own sessions. The parent makes
  a file in the private directory (``enrich/sessionfile.py``) where span
  processes ask each other about backend pids and answer with their sessions'
  latest statement spans; each worker finds it, and its own part of it, in
  the environment it passes on to its span process.

``workers = 1`` does not come here: ``run()`` keeps the single-process path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..config import ConfigError
from ..enrich import SHARED_ENV, SharedSessions
from ..hostport import format_hostport
from ..protocol import ProtocolViolation, parse_startup_packet
from ..stats import METRICS, STATS

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["run_workers", "SharedArea", "WorkerLink", "PUBLISH_INTERVAL"]

log = logging.getLogger("pgotel_proxy.workers")

#: Seconds between two copies of a worker's counters into the shared area.
PUBLISH_INTERVAL = 0.25

_NAMES = tuple(METRICS)
_COUNTERS = frozenset(n for n, (kind, _) in METRICS.items() if kind == "counter")

# Slot head: pid (0 = no worker running), tracing on (1) or off, cancels
# forwarded for siblings, cancels a sibling forwarded for us.
_HEAD = ("pid", "tracing", "cancel_routed_in", "cancel_routed_out")

# A worker that exits before it published anything never started serving
# (port taken, bad certificate ...): after this many in a row the proxy stops.
_START_FAILURES_BEFORE_GIVING_UP = 3
_RESTART_BACKOFF = 0.5

# Signals the supervisor forwards; a worker holds them until serve() handles them.
_HELD = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_SIGNALS = _HELD | {signal.SIGCHLD}

# Datagrams between workers: request = kind, id, origin worker, then the raw
# CancelRequest; reply = kind, id, answering worker, owned (1) or not (0).
_REQUEST = struct.Struct("=cQH")
_REPLY = struct.Struct("=cQHB")
# Their kinds (the first byte).
_CANCEL_REQUEST = b"Q"
_CANCEL_REPLY = b"R"


class SharedArea:
    """Anonymous shared mapping made by the parent before forking, seen by every worker.

    Layout, all native int64 except the sample rate (a double): the control
    block (generation, enabled, sample rate), the retired counters of workers
    that exited, then one slot per worker (:data:`_HEAD` then every metric).
    """

    _CONTROL = struct.Struct("=qqd")
    _CONTROL_SIZE = 64

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._values = struct.Struct(f"={len(_NAMES)}q")
        self._slot = struct.Struct(f"={len(_HEAD) + len(_NAMES)}q")
        self._retired_at = self._CONTROL_SIZE
        self._slots_at = self._retired_at + self._values.size
        size = self._slots_at + workers * self._slot.size
        # fd -1: an anonymous mapping, MAP_SHARED by default, so children see
        # each other's writes after fork.
        self.mm = mmap.mmap(-1, size)

    def close(self) -> None:
        self.mm.close()

    # control block ---------------------------------------------------------

    def write_control(self, enabled: bool, sample_rate: float) -> int:
        """Publish tracing settings for every worker; returns the new generation."""
        gen = self._CONTROL.unpack_from(self.mm, 0)[0] + 1
        # Values first, generation last: a reader that sees the new generation
        # sees the new values. Two writers at the same instant (POST /tracing
        # and a SIGHUP in the parent) could share a generation; they are rare
        # and both come from an operator, so no lock.
        struct.pack_into("=qd", self.mm, 8, int(enabled), float(sample_rate))
        struct.pack_into("=q", self.mm, 0, gen)
        return gen

    def read_control(self) -> tuple[int, bool, float]:
        gen, enabled, rate = self._CONTROL.unpack_from(self.mm, 0)
        return gen, bool(enabled), rate

    # worker slots ----------------------------------------------------------

    def write_slot(self, index: int, head: dict[str, int], snap: dict[str, int]) -> None:
        self._slot.pack_into(self.mm, self._slots_at + index * self._slot.size,
                             *(int(head[n]) for n in _HEAD), *(int(snap[n]) for n in _NAMES))

    def read_slot(self, index: int) -> dict[str, int]:
        raw = self._slot.unpack_from(self.mm, self._slots_at + index * self._slot.size)
        return dict(zip(_HEAD + _NAMES, raw))

    def retire(self, index: int) -> bool:
        """Parent, after reaping worker ``index``: keep its counters, forget its gauges, free the slot.

        Returns whether the worker had published at all, i.e. had started serving.
        """
        slot = self.read_slot(index)
        retired = self._values.unpack_from(self.mm, self._retired_at)
        total = [r + (slot[n] if n in _COUNTERS else 0) for r, n in zip(retired, _NAMES)]
        self._values.pack_into(self.mm, self._retired_at, *total)
        self._slot.pack_into(self.mm, self._slots_at + index * self._slot.size, *([0] * (len(_HEAD) + len(_NAMES))))
        return slot["pid"] != 0

    def totals(self, live_index: int | None = None, live: dict[str, int] | None = None) -> dict[str, int]:
        """Every metric summed over the retired row and all slots; ``live`` replaces slot ``live_index``."""
        out = dict(zip(_NAMES, self._values.unpack_from(self.mm, self._retired_at)))
        for i in range(self.workers):
            snap = live if i == live_index and live is not None else self.read_slot(i)
            for n in _NAMES:
                out[n] += snap[n]
        return out


class WorkerLink:
    """A worker's side of multi-process mode: publishes stats, applies control, routes cancels.

    Its log lines carry no worker number: every line a worker logs gets the
    ``worker N:`` prefix from the supervisor's fork.

    ``serve()`` attaches it to the :class:`~pgotel_proxy.proxy.server.ProxyServer`
    as ``server.worker_link``; the server asks it about cancel keys it does not
    know, and the admin endpoint asks it for totals.
    """

    def __init__(self, area: SharedArea, index: int, sock_dir: str) -> None:
        self.area = area
        self.index = index
        self.sock_dir = sock_dir
        self.server: Any = None
        self.tracer: Any = None
        self.routed_in = 0
        self.routed_out = 0
        self._sock: socket.socket | None = None
        self._seen_gen = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, set[int]]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None

    def path(self, index: int) -> str:
        return os.path.join(self.sock_dir, f"worker-{index}.sock")

    async def attach(self, server: Any, tracer: Any) -> None:
        loop = asyncio.get_running_loop()
        self.server, self.tracer = server, tracer
        server.worker_link = self
        path = self.path(self.index)
        try:
            os.unlink(path)  # left by this slot's previous worker if it was killed
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        self._sock = sock
        loop.add_reader(sock.fileno(), self._on_datagram)
        # A restarted worker takes over what POST /tracing set before it existed.
        self._apply_control()
        self.publish()
        self._ticker = loop.create_task(self._tick())

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        self.publish()
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path(self.index))
            except OSError:
                pass

    # stats and control -----------------------------------------------------

    def local_snapshot(self) -> dict[str, int]:
        snap = STATS.snapshot()
        if self.tracer is not None:
            snap["span_queue_size"] = self.tracer.queue_size_now()
        return snap

    def _head(self) -> dict[str, int]:
        return {"pid": os.getpid(), "tracing": int(self.tracer is not None and self.tracer.enabled),
                "cancel_routed_in": self.routed_in, "cancel_routed_out": self.routed_out}

    def publish(self) -> None:
        self.area.write_slot(self.index, self._head(), self.local_snapshot())

    def totals(self) -> dict[str, int]:
        """Metrics over all workers, this one's current to the moment."""
        return self.area.totals(self.index, self.local_snapshot())

    def workers_status(self) -> list[dict[str, Any]]:
        out = []
        for i in range(self.area.workers):
            slot = self.area.read_slot(i)
            if i == self.index:
                slot.update(self.local_snapshot(), **self._head())
            out.append({
                "worker": i,
                "pid": slot["pid"] or None,
                "tracing": bool(slot["tracing"]),
                "connections_accepted": slot["connections_accepted"],
                "connections_active": slot["connections_active"],
                "statements": slot["statements"],
                "spans_exported": slot["spans_exported"],
                "cancel_forwarded": slot["cancel_forwarded"],
                "cancel_routed_in": slot["cancel_routed_in"],
                "cancel_routed_out": slot["cancel_routed_out"],
            })
        return out

    def signals_ready(self) -> None:
        """serve() installed its signal handlers: let the signals the supervisor forwards in."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)

    def publish_control(self, enabled: bool, sample_rate: float) -> None:
        """Hand this worker's new tracing settings to its siblings."""
        self._seen_gen = self.area.write_control(enabled, sample_rate)

    def _apply_control(self) -> None:
        gen, enabled, rate = self.area.read_control()
        if gen == self._seen_gen:
            return
        self._seen_gen = gen
        if self.tracer is None:
            return  # tracing was off at start-up: nothing to switch
        if self.tracer.sample_rate != rate:
            self.tracer.set_sample_rate(rate)
        if self.tracer.enabled != enabled:
            self.tracer.set_enabled(enabled)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL)
            try:
                self.publish()
                self._apply_control()
            except Exception:
                log.exception("publishing stats failed")

    # cancel routing --------------------------------------------------------

    async def route_cancel(self, raw: bytes) -> bool:
        """Offer a CancelRequest this worker does not own to the others; True when one forwarded it."""
        sock = self._sock
        if sock is None or self.area.workers < 2:
            return False
        req = next(self._ids)
        msg = _REQUEST.pack(_CANCEL_REQUEST, req, self.index) + bytes(raw)
        asked: set[int] = set()
        for i in range(self.area.workers):
            if i == self.index:
                continue
            try:
                sock.sendto(msg, self.path(i))
                asked.add(i)
            except OSError as exc:
                # Not running (being restarted) or its queue is full: it cannot own the key now.
                log.debug("cannot offer a cancel request to worker %d: %s", i, exc)
        if not asked:
            return False
        fut = asyncio.get_running_loop().create_future()
        self._pending[req] = (fut, asked)
        # The owner answers after its upstream round trip: connect plus the server's close.
        timeout = 2 * float(self.server.config.connect_timeout) + 1.0
        try:
            owned = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            log.warning("no answer about a cancel request from worker(s) %s", ", ".join(map(str, sorted(asked))))
            return False
        finally:
            self._pending.pop(req, None)
        if owned:
            self.routed_out += 1
        return owned

    def _on_datagram(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(1024)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("sibling socket failed: %s", exc)
                return
            kind = data[:1]
            if kind == _CANCEL_REQUEST and len(data) > _REQUEST.size:
                self._on_request(data)
            elif kind == _CANCEL_REPLY and len(data) == _REPLY.size:
                _, req, who, owned = _REPLY.unpack(data)
                self._on_reply(req, who, bool(owned))

    def _on_request(self, data: bytes) -> None:
        _, req, origin = _REQUEST.unpack_from(data)
        raw = data[_REQUEST.size:]
        try:
            packet = parse_startup_packet(raw)
        except (ProtocolViolation, struct.error):
            self._reply(origin, req, False)
            return
        if packet.kind != "cancel" or (packet.cancel_pid, packet.cancel_key) not in self.server.cancel_keys:
            self._reply(origin, req, False)
            return
        task = asyncio.get_running_loop().create_task(self._forward_for(origin, req, raw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward_for(self, origin: int, req: int, raw: bytes) -> None:
        self.routed_in += 1
        try:
            await self.server.send_cancel(raw)
        finally:
            self._reply(origin, req, True)

    def _reply(self, origin: int, req: int, owned: bool) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(_REPLY.pack(_CANCEL_REPLY, req, self.index, int(owned)), self.path(origin))
        except OSError as exc:
            log.debug("cannot answer worker %d: %s", origin, exc)

    def _on_reply(self, req: int, who: int, owned: bool) -> None:
        entry = self._pending.get(req)
        if entry is None:
            return  # answered after the wait gave up
        fut, asked = entry
        if fut.done():
            return
        if owned:
            fut.set_result(True)
            return
        asked.discard(who)
        if not asked:
            fut.set_result(False)


# ---------------------------------------------------------------------------
# the parent



def _sessions_path(sock_dir: str) -> str:
    """The workers' shared session file (enrich/sessionfile.py)."""
    return os.path.join(sock_dir, "sessions")


def _for_worker(config: Config, index: int) -> Config:
    """Worker ``index``'s view of the config: the admin listener and Unix socket belong to worker 0."""
    if index == 0:
        return config
    return config.model_copy(update={"admin_listen": None, "unix_socket": None})


class _WorkerTag(logging.Filter):
    """Prefixes a worker's log lines with its index: N processes share one stderr."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.prefix = f"worker {index}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.msg.startswith(self.prefix):
            record.msg = self.prefix + record.msg
        return True


class _Slot:
    __slots__ = ("pid", "start_failures", "restart_at")

    def __init__(self) -> None:
        self.pid = 0
        self.start_failures = 0
        self.restart_at: float | None = None


class _Supervisor:
    def __init__(self, config: Config, reload: Callable[[], Config] | None, area: SharedArea, sock_dir: str,
                 keep: list[socket.socket]) -> None:
        self.base = config
        self.config = config
        self.reload = reload
        self.area = area
        self.sock_dir = sock_dir
        self.keep = keep  # sockets only the parent holds (a reserved port)
        self.slots = [_Slot() for _ in range(config.workers)]
        self.by_pid: dict[int, int] = {}
        self.stopping = False
        self.deadline = 0.0
        self.exit_code = 0
        self._old_mask: set[int] = set()

    def run(self) -> int:
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for i in range(len(self.slots)):
                self._spawn(i)
            while self.by_pid or (not self.stopping and any(s.restart_at is not None for s in self.slots)):
                info = signal.sigtimedwait(_SIGNALS, 0.2)
                if info is not None:
                    self._on_signal(info.si_signo)
                self._reap()
                self._restart_due()
                if self.stopping and self.by_pid and time.monotonic() > self.deadline:
                    log.error("workers still running after the drain and export time: killing %s",
                              ", ".join(map(str, sorted(self.by_pid))))
                    self._signal_all(signal.SIGKILL)
                    self.exit_code = 1
                    self.deadline = float("inf")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
        log.info("all workers stopped")
        return self.exit_code

    # -- signals

    def _on_signal(self, signo: int) -> None:
        if signo in (signal.SIGTERM, signal.SIGINT):
            if not self.stopping:
                log.info("%s received: stopping %d worker(s)", signal.Signals(signo).name, len(self.by_pid))
            self._stop(signo)
        elif signo == signal.SIGHUP:
            self._reload()
            self._signal_all(signo)

    def _reload(self) -> None:
        if self.reload is None:
            return
        try:
            new = self.reload()
        except Exception as exc:  # includes click's Exit after the config error it printed
            detail = "config error" if hasattr(exc, "exit_code") else exc
            log.error("reload failed in the supervisor (%s): restarted workers keep the old settings", detail)
            return
        base = self.base
        # ``tracing`` too: a worker started with tracing off has no tracer to
        # switch on later; the control block carries the reloaded on/off.
        self.config = new.model_copy(update={
            "listen": base.listen, "unix_socket": base.unix_socket,
            "admin_listen": base.admin_listen, "workers": base.workers, "tracing": base.tracing,
        })
        self.area.write_control(new.tracing, new.sample_rate)

    def _stop(self, signo: int) -> None:
        if not self.stopping:
            self.stopping = True
            cfg = self.config
            self.deadline = time.monotonic() + cfg.drain_timeout + cfg.shutdown_timeout + 10.0
        self._signal_all(signo)

    def _signal_all(self, signo: int) -> None:
        for pid in list(self.by_pid):
            try:
                os.kill(pid, signo)
            except ProcessLookupError:
                pass

    # -- children

    def _spawn(self, index: int) -> None:
        slot = self.slots[index]
        slot.restart_at = None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, measured by the tests from outside
            self._child(index)
        slot.pid = pid
        self.by_pid[pid] = index
        log.info("worker %d started (pid %d)", index, pid)

    def _child(self, index: int) -> None:
        code = 1
        try:
            # SIGTERM, SIGINT and SIGHUP stay blocked (pending, not lost) until
            # serve() has its handlers: their default action would kill the worker.
            signal.pthread_sigmask(signal.SIG_SETMASK, set(self._old_mask) | _HELD)
            for s in self.keep:
                s.close()
            for handler in logging.getLogger().handlers:
                handler.addFilter(_WorkerTag(index))
            # The span process (a child of this worker) publishes its sessions there.
            os.environ[SHARED_ENV] = f"{_sessions_path(self.sock_dir)}:{index}:{len(self.slots)}"
            from .server import run

            reload = self.reload
            worker_reload = (lambda: _for_worker(reload(), index)) if reload is not None else None
            link = WorkerLink(self.area, index, self.sock_dir)
            code = int(run(_for_worker(self.config, index), reload=worker_reload, worker=link) or 0)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except (OSError, ConfigError) as exc:  # listening address taken, certificate unreadable ...
            log.error("cannot serve: %s", exc)
        except BaseException:
            log.exception("stopped by an unexpected error")
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                # Never return into the parent's code (click, the supervisor loop).
                os._exit(code)

    def _reap(self) -> None:
        while self.by_pid:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.by_pid.pop(pid, None)
            if index is None:
                continue
            served = self.area.retire(index)
            slot = self.slots[index]
            slot.pid = 0
            code = os.waitstatus_to_exitcode(status)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if self.stopping:
                if code != 0:
                    self.exit_code = 1
                    log.warning("worker %d (pid %d) ended with %s", index, pid, how)
                else:
                    log.info("worker %d (pid %d) stopped", index, pid)
                continue
            slot.start_failures = 0 if served else slot.start_failures + 1
            if slot.start_failures >= _START_FAILURES_BEFORE_GIVING_UP:
                log.error("worker %d failed %d times in a row before serving (%s): stopping the proxy",
                          index, slot.start_failures, how)
                self.exit_code = 1
                self._stop(signal.SIGTERM)
                continue
            log.warning("worker %d (pid %d) ended unexpectedly with %s: restarting it", index, pid, how)
            slot.restart_at = time.monotonic() + (_RESTART_BACKOFF if slot.start_failures else 0.0)

    def _restart_due(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for i, slot in enumerate(self.slots):
            if slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(i)


def _fix_port(config: Config) -> tuple[Config, list[socket.socket]]:
    """With ``listen`` on port 0 every worker would get its own port: pick one and hold it.

    The parent keeps a bound (never listening) SO_REUSEPORT socket on it, so
    the port stays ours while workers restart; a socket that does not listen
    receives no connections.
    """
    host, port = config.listen_address
    if port != 0:
        return config, []
    family, _, _, _, addr = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    bound = sock.getsockname()
    return config.model_copy(update={"listen": format_hostport(bound[0], bound[1])}), [sock]


def _preload() -> None:
    """Import what every worker needs once, before forking.

    Workers then start (and restart) in milliseconds instead of a second, and
    share those pages with the parent. Nothing imported here starts a thread;
    ``run_workers`` checks. Exporter transports (gRPC) stay with the workers.
    """
    import importlib

    for name in ("uvloop", "pgotel_proxy.tracing.process", "pgotel_proxy.admin", "pgotel_proxy.enrich"):
        try:
            importlib.import_module(name)
        except ImportError as exc:  # pragma: no cover - optional pieces; the worker reports it
            log.debug("not preloaded: %s: %s", name, exc)


def run_workers(config: Config, reload: Callable[[], Config] | None = None) -> int:
    """Blocking entry point for ``workers > 1``: fork, supervise, return the exit code."""
    if not hasattr(socket, "SO_REUSEPORT") or not hasattr(signal, "sigtimedwait"):
        log.error("workers > 1 needs SO_REUSEPORT and sigtimedwait (Linux)")
        return 1
    _preload()
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if threads:
        # A forked child gets only the forking thread; locks those threads held stay held.
        log.warning("threads running before forking workers: %s", ", ".join(threads))
    config, keep = _fix_port(config)
    area = SharedArea(config.workers)
    sock_dir = tempfile.mkdtemp(prefix="pgotel-proxy-")  # mode 0700
    SharedSessions.create(_sessions_path(sock_dir), config.workers)
    parent = os.getpid()
    try:
        return _Supervisor(config, reload, area, sock_dir, keep).run()
    finally:
        if os.getpid() == parent:
            shutil.rmtree(sock_dir, ignore_errors=True)
            for s in keep:
                s.close()
            area.close()
