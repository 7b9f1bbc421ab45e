"""Run a whole pgotel-proxy (server, tracer, admin) on a background thread with its own event loop.

For embedding: tests, benchmarks and ``pgotel-proxy demo`` use it, and so can
an application's own integration tests. The proxy is the same code the CLI
runs; only the loop lives on a thread instead of the main one.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .config import load_config
from .proxy.server import ProxyServer
from .tracing import build_tracer

__all__ = ["BackgroundProxy"]


def _conninfo_value(value: str) -> str:
    """Quote a libpq keyword/value connection string value when it needs it."""
    if value and not any(c in value for c in " '\\\t\n"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


class BackgroundProxy:
    """A proxy started from config overrides (validated by the real config model).

    ``overrides`` are config fields (``exporter="console"``, ``otlp_endpoint``:
    spans are built and exported by the span process, so they leave the way
    the config says, never as objects in this process).
    """

    def __init__(self, env: dict | None = None, **overrides: Any) -> None:
        settings: dict[str, Any] = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
        settings.update(overrides)
        self.config = load_config(None, env=env if env is not None else {}, overrides=settings)
        self.loop = _new_loop()
        self.server: ProxyServer | None = None
        self.tracer = None
        self.admin = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="pgotel-proxy-loop", daemon=True)

    def start(self) -> "BackgroundProxy":
        self._thread.start()
        self.call(self._start(), 15)
        return self

    async def _start(self) -> None:
        from .enrich import attach as attach_enrichment

        self.tracer = build_tracer(self.config)
        self.server = ProxyServer(self.config, self.tracer)

        self.enricher = attach_enrichment(self.config, self.server, self.tracer)  # the sources' status view
        await self.server.start()
        self.server.check_channel_binding()
        if self.config.admin_listen:
            from .admin import AdminServer

            self.admin = AdminServer(self.config, self.server, self.tracer)
            await self.admin.start()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin.port}"

    def dsn(self, user: str = "postgres", dbname: str = "postgres", **params: Any) -> str:
        """A libpq connection string pointing at the proxy (sslmode=disable unless given)."""
        parts = {"host": "127.0.0.1", "port": str(self.port), "user": user, "dbname": dbname, "sslmode": "disable"}
        parts.update({k: str(v) for k, v in params.items()})
        return " ".join(f"{k}={_conninfo_value(v)}" for k, v in parts.items())

    def call(self, coro, timeout: float = 30):
        """Run a coroutine on the proxy's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every finished statement has been built and exported."""
        if self.server is not None:
            # what the pump relayed is observed every few ms: now, so that it counts as finished
            self.call(self._observe_now(), timeout)
        if self.tracer is not None:
            self.tracer.flush(timeout)

    async def _observe_now(self) -> None:
        self.server.observe_now()

    def stop(self, drain: float = 1.0) -> None:
        if self.server is not None:
            self.call(self.server.drain(drain))
        if self.admin is not None:
            self.call(self.admin.stop())
        if self.tracer is not None:
            self.tracer.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def __enter__(self) -> "BackgroundProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
