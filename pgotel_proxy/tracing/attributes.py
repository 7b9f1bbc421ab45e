"""The attributes every span of a connection carries.

A module of its own, light to import: the relay process of the span process
mode needs it for each new connection, and nothing else of span building
(no OpenTelemetry SDK, no SQL parser in the relay process).
"""

from __future__ import annotations

from opentelemetry.semconv._incubating.attributes.db_attributes import DB_USER
from opentelemetry.semconv.attributes.db_attributes import DB_NAMESPACE, DB_SYSTEM_NAME
from opentelemetry.semconv.attributes.network_attributes import NETWORK_PEER_ADDRESS, NETWORK_PEER_PORT
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT

from ..hostport import parse_hostport

__all__ = ["connection_attributes"]


def connection_attributes(info) -> dict:
    """The attributes every span of a connection carries (database, user, server, peer)."""
    host, port = _split(info.upstream)
    base = {DB_SYSTEM_NAME: "postgresql"}
    if info.database:
        base[DB_NAMESPACE] = info.database
    if info.user:
        base[DB_USER] = info.user
    if host:
        base[SERVER_ADDRESS] = host
        if port:
            base[SERVER_PORT] = port
    peer_host, peer_port = _split(info.peer)
    if peer_host and peer_host != "unix":
        base[NETWORK_PEER_ADDRESS] = peer_host
        if peer_port:
            base[NETWORK_PEER_PORT] = peer_port
    return base


def _split(label: str) -> tuple[str, int | None]:
    """A connection's peer or upstream label as (host, port); (label, None) for a socket path or "unix"."""
    try:
        return parse_hostport(label)
    except ValueError:
        return label, None
