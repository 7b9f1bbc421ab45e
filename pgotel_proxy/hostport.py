"""Network addresses as text: the one ``host:port`` parser and its inverse.

Every layer that reads or writes an address as text uses these two: the
config model to check ``listen``, ``upstream`` and ``admin_listen``, the
proxy and the admin endpoint to bind and connect, the span attributes to
split the peer and server labels. Stdlib only, so that any layer may import
it.

Accepted forms: ``host:port`` (a name or an IPv4 address) and
``[v6addr]:port``; the port is always given, 0 to 65535 (0: any free port,
for listeners). IPv6 addresses must be bracketed because their colons are
otherwise ambiguous. Unix socket paths are not addresses here: the config
tells them apart (``upstream`` starting with ``/``) before parsing.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["parse_hostport", "format_hostport"]

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


def parse_hostport(text: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6addr]:port`` into (host, port); ValueError if malformed.

    Surrounding white space is ignored; the host of a bracketed address is
    returned without its brackets.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected host:port, got {type(text).__name__}")
    value = text.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = value[1:end], value[end + 1:]
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected :port after ']'")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} is not host:port (no port)")
        if ":" in host:
            raise ValueError(f"{text!r}: put IPv6 addresses in brackets, e.g. [::1]:6432")
        if not host:
            raise ValueError(f"{text!r}: the host is empty")
        if not _HOSTNAME_RE.match(host):
            raise ValueError(f"{text!r}: {host!r} is not a valid host name or address")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{text!r}: port {port} is out of range (0-65535)")
    return host, port


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets: what :func:`parse_hostport` reads back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
