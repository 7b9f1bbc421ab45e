"""Binding the proxy's TCP listeners, where a bind that fails is a configuration error.

The relay's listener (``listen``) and the admin endpoint's (``admin_listen``)
are bound here, so that an address in use is answered as every other
configuration problem is: one line naming the option, exit status 2 — not a
traceback, and not a worker dying at its first bind.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

from .config import ConfigError
from .hostport import format_hostport

if TYPE_CHECKING:
    from .config import Config

__all__ = ["bind_tcp", "check_addresses"]


def bind_tcp(option: str, host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not listening yet); ``ConfigError`` naming ``option`` if it cannot be."""
    label = format_hostport(host or "*", port)
    flag = "--" + option.replace("_", "-")
    try:
        family, _, _, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"{option}: cannot resolve {label}: {exc.strerror or exc} ({flag})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        what = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc.strerror or exc}"
        raise ConfigError(f"{option}: {label} {what} ({flag})") from None
    return sock


def check_addresses(config: Config) -> None:
    """Bind each fixed listen address once and let it go: one that is taken is a ``ConfigError``.

    Called before the proxy starts (and before ``--workers`` fork). Port 0
    (any free port) needs no check.
    """
    for option, address in (("listen", config.listen_address), ("admin_listen", config.admin_address)):
        if address is not None and address[1] != 0:
            bind_tcp(option, *address).close()
