"""The one host:port parser (pgotel_proxy.hostport): every accepted and refused form, and its users."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgotel_proxy import config as config_mod
from pgotel_proxy.config import Config
from pgotel_proxy.hostport import format_hostport, parse_hostport
from pgotel_proxy.tracing.attributes import connection_attributes

# text -> (host, port), or None where the text is refused.
TABLE = [
    ("127.0.0.1:6432", ("127.0.0.1", 6432)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("localhost:0", ("localhost", 0)),
    ("db-1.example.com:5432", ("db-1.example.com", 5432)),
    (" db-1.example.com:5432 ", ("db-1.example.com", 5432)),
    ("postgres_primary:5432", ("postgres_primary", 5432)),
    ("host:65535", ("host", 65535)),
    ("[::1]:6432", ("::1", 6432)),
    ("[::]:0", ("::", 0)),
    ("[fe80::1%eth0]:5432", ("fe80::1%eth0", 5432)),
    ("", None),
    (":5432", None),            # no host
    ("host", None),             # no port: every address names its port
    ("host:", None),
    ("host:-1", None),
    ("host:65536", None),
    ("host:５４", None),         # digits, but not ASCII ones
    ("a b:1", None),
    ("-host:1", None),
    ("::1:5432", None),         # IPv6 without brackets is ambiguous
    ("[::1]6432", None),
    ("[::1:6432", None),
    ("[::1]", None),
    ("[nothost]:1", None),
    ("/var/run/postgresql/.s.PGSQL.5432", None),  # a socket path is not an address
    ("unix", None),
]


@pytest.mark.parametrize("text,expected", TABLE)
def test_parse_hostport(text: str, expected: tuple[str, int] | None) -> None:
    if expected is None:
        with pytest.raises(ValueError):
            parse_hostport(text)
    else:
        assert parse_hostport(text) == expected


@pytest.mark.parametrize("host,port,text", [
    ("127.0.0.1", 6432, "127.0.0.1:6432"),
    ("db.example.com", 5432, "db.example.com:5432"),
    ("::1", 6432, "[::1]:6432"),
    ("fe80::1%eth0", 0, "[fe80::1%eth0]:0"),
])
def test_format_hostport(host: str, port: int, text: str) -> None:
    assert format_hostport(host, port) == text
    assert parse_hostport(text) == (host, port)


@given(st.ip_addresses(), st.integers(0, 65535))
def test_addresses_round_trip(address, port: int) -> None:
    assert parse_hostport(format_hostport(str(address), port)) == (str(address), port)


def test_the_config_uses_the_same_parser() -> None:
    assert config_mod.parse_hostport is parse_hostport
    config = Config(listen="[::1]:0", upstream="db.example.com:5433", admin_listen="127.0.0.1:9999")
    assert config.listen_address == ("::1", 0)
    assert config.upstream_address == ("db.example.com", 5433)
    assert config.admin_address == ("127.0.0.1", 9999)
    assert Config(upstream="/tmp/.s.PGSQL.5432").upstream_address is None


@pytest.mark.parametrize("peer,upstream,expected", [
    ("127.0.0.1:40000", "127.0.0.1:5432",
     {"network.peer.address": "127.0.0.1", "network.peer.port": 40000,
      "server.address": "127.0.0.1", "server.port": 5432}),
    (format_hostport("::1", 40000), format_hostport("::1", 5432),
     {"network.peer.address": "::1", "network.peer.port": 40000, "server.address": "::1", "server.port": 5432}),
    ("unix", "/var/run/postgresql/.s.PGSQL.5432",
     {"server.address": "/var/run/postgresql/.s.PGSQL.5432"}),
])
def test_span_attributes_split_the_labels_the_proxy_writes(peer: str, upstream: str, expected: dict) -> None:
    info = SimpleNamespace(peer=peer, upstream=upstream, database="", user="")
    attributes = connection_attributes(info)
    got = {k: v for k, v in attributes.items() if k.startswith(("network.", "server."))}
    assert got == expected
