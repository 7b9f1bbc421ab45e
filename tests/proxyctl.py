"""Runs a real pgotel-proxy (server, tracer, admin) on its own event-loop thread for tests and benchmarks.

The proxy gets its own uvloop loop in a background thread, exactly as the CLI
runs it, so synchronous drivers (psycopg, pg8000, psql) and asyncio drivers
(asyncpg) in the test process talk to it over real sockets.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import uvloop

from pgotel_proxy.config import load_config
from pgotel_proxy.proxy.server import ProxyServer
from pgotel_proxy.tracing import build_tracer

__all__ = ["RunningProxy"]


class RunningProxy:
    """A started proxy. ``config`` overrides go through the real config model."""

    def __init__(self, **overrides: Any) -> None:
        settings = {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "export_interval": 0.05,
            "upstream_tls": "disable",
        }
        settings.update(overrides)
        self.config = load_config(None, env={}, overrides=settings)
        self.loop = uvloop.new_event_loop()
        self.server: ProxyServer | None = None
        self.tracer = None
        self.admin = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="proxy-loop", daemon=True)

    def start(self) -> "RunningProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(15)
        return self

    async def _start(self) -> None:
        self.tracer = build_tracer(self.config)
        self.server = ProxyServer(self.config, self.tracer)
        await self.server.start()
        if self.config.admin_listen:
            from pgotel_proxy.admin import AdminServer

            self.admin = AdminServer(self.config, self.server, self.tracer)
            await self.admin.start()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin.port}"

    def dsn(self, user: str = "postgres", dbname: str = "postgres", **params: Any) -> str:
        parts = {"host": "127.0.0.1", "port": str(self.port), "user": user, "dbname": dbname}
        parts.setdefault("sslmode", "disable")
        parts.update({k: str(v) for k, v in params.items()})
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every finished statement has been built and exported."""
        if self.tracer is not None:
            self.tracer.flush(timeout)

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

    def __enter__(self) -> "RunningProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
