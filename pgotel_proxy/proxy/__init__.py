"""Sockets, TLS, backpressure, cancel routing and graceful drain."""

from .server import ProxyServer, run, serve, split_hostport

__all__ = ["ProxyServer", "run", "serve", "split_hostport"]
