"""The two relay paths: which sessions take which, and that both relay and observe the same bytes.

After start-up a session is relayed either by the compiled pump (``proxy/_pump.c``), traced or
not, or by the asyncio protocols of ``proxy/connection.py`` (``_FromClient`` / ``_FromServer``):
with Flush phase timing, WAL propagation or TLS on a leg without the compiled TLS (the proxy
writes into the stream, or the pump cannot read it), and wherever the pump was not built
(``PGOTEL_PURE_PYTHON``); TLS sessions on the pump are tested in tests/test_pump.py. These
tests pin that choice and drive both paths with messages split across reads, an error in the
middle of an extended batch, and a large result; tests/test_pump.py tests the pump itself.
"""

from __future__ import annotations

import struct
import time

import psycopg
import pytest

from pgotel_proxy.proxy import connection
from pgotel_proxy.proxy import server as proxy_server
from rawpg import RawConn, message

needs_pump = pytest.mark.skipif(proxy_server.Pump is None, reason="compiled pump not built (or PGOTEL_PURE_PYTHON)")

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _only_connection(proxy) -> connection.ClientConnection:
    (conn,) = proxy.server.connections
    return conn


def _path(conn: connection.ClientConnection) -> str:
    if conn.pump_id is not None:
        return "observed pump" if conn.pump_observes else "pump"
    protocols = (type(conn.client.get_protocol()), type(conn.upstream.get_protocol()))
    assert protocols == (connection._FromClient, connection._FromServer), protocols
    return "asyncio" if conn.observe else "asyncio, not observing"


def _start(proxy, pumped: bool) -> None:
    if not pumped:
        proxy.server._pump_failed = True  # as without the compiled pump, or on a TLS session
    elif proxy_server.Pump is None:
        pytest.skip("compiled pump not built")


@needs_pump
@pytest.mark.parametrize(("overrides", "path"), [
    ({"sample_rate": 1.0}, "observed pump"),
    ({"tracing": False}, "pump"),
    ({"sample_rate": 1.0, "phase_timing": "flush"}, "asyncio"),
    ({"sample_rate": 1.0, "wal_propagation": True}, "asyncio"),
], ids=["traced", "untraced", "flush-phases", "wal-propagation"])
def test_sessions_the_pump_can_take_go_to_it_the_others_stay_on_asyncio(make_proxy, overrides, path):
    proxy = make_proxy(**overrides)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute(f"SELECT 41 + 1 /*traceparent='{TP}'*/").fetchone() == (42,)
        assert _path(_only_connection(proxy)) == path


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "untraced"])
def test_without_the_pump_every_session_relays_on_asyncio(make_proxy, traced):
    proxy = make_proxy(sample_rate=1.0) if traced else make_proxy(tracing=False)
    proxy.server._pump_failed = True
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        assert _path(_only_connection(proxy)) == ("asyncio" if traced else "asyncio, not observing")
        big = conn.execute("SELECT repeat('x', 200000)").fetchone()[0]  # many reads each way
        assert big == "x" * 200000


@pytest.mark.parametrize("pumped", [False, True], ids=["asyncio", "pump"])
def test_messages_split_across_reads_and_an_error_mid_batch_on_both_paths(make_proxy, otlp, pumped):
    """Each message cut in two, then an extended batch failing in the middle: results and spans as whole."""
    proxy = make_proxy(sample_rate=1.0)
    _start(proxy, pumped)
    with RawConn("127.0.0.1", proxy.port, timeout=30) as raw:
        raw.startup()
        for i in range(5):
            sql = f"SELECT {i} AS n /*route='split{i}',traceparent='{TP}'*/".encode() + b"\x00"
            data = message(b"Q", sql)
            cut = 3 + i * 7 % (len(data) - 4)
            raw.send(data[:cut])
            time.sleep(0.02)  # two reads on the proxy's side
            raw.send(data[cut:])
            msgs = raw.read_until_ready()
            assert [t for t, _ in msgs] == ["T", "D", "C", "Z"], msgs
            assert msgs[1][1].endswith(str(i).encode())
            assert _path(_only_connection(proxy)) == ("observed pump" if pumped else "asyncio")
        # The server skips to Sync after the error; the codec pairs what follows all the same.
        batch = (message(b"P", b"\x00SELECT 1/0\x00\x00\x00") + message(b"B", b"\x00\x00" + struct.pack("!hhh", 0, 0, 0))
                 + message(b"E", b"\x00" + struct.pack("!i", 0)) + message(b"S"))
        raw.send(batch)
        msgs = raw.read_until_ready()
        assert [t for t, _ in msgs] == ["1", "E", "Z"], msgs
        assert [t for t, _ in raw.query(f"SELECT 'after' /*route='after',traceparent='{TP}'*/")] == ["T", "D", "C", "Z"]
    proxy.flush()
    routes = {f"split{i}" for i in range(5)} | {"after"}
    spans = otlp.wait_for(lambda got: routes <= {s.attributes.get("pgotel.sqlcommenter.route") for s in got})
    by_route = {s.attributes.get("pgotel.sqlcommenter.route"): s for s in spans}
    assert all(by_route[r].attributes["db.response.returned_rows"] == 1 for r in routes)
    assert any(s.attributes.get("db.response.status_code") == "22012" for s in spans)
