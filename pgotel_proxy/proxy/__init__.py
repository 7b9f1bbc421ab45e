"""Sockets, TLS, backpressure, cancel routing and graceful drain."""

from .server import ProxyServer, run, serve

__all__ = ["ProxyServer", "run", "serve"]
