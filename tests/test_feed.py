"""The compiled relay step (protocol._core.Feed): traced connections relay through it, and what it
does not take (bytes split across reads, garbage, COPY, errors) reaches the Python path unchanged.

With ``experimental.traced_pump`` the compiled pump relays traced connections it can take (no TLS, nothing to
splice in) and the Feed is not used (tests/test_pump.py); these tests check that the Feed is in use
otherwise (the pump off too, as on a TLS session or a build without it) and drive its hand-overs on
purpose, the split-message one through the pump as well.
"""

from __future__ import annotations

import struct
import time

import psycopg
import pytest

from pgotel_proxy.proxy import connection
from pgotel_proxy.proxy import server as proxy_server
from rawpg import RawConn, message

pytestmark = pytest.mark.skipif(connection.Feed is None, reason="compiled codec not built (or PGOTEL_PURE_PYTHON)")

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _protocols(proxy) -> list:
    conns = list(proxy.server.connections)
    return [(c.client.get_protocol(), c.upstream.get_protocol()) for c in conns if c.client is not None]


def test_traced_connections_relay_through_the_feed(make_proxy, otlp):
    proxy = make_proxy(sample_rate=1.0)
    proxy.server._pump_failed = True  # as on a TLS session or without the compiled pump
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(3):
            assert conn.execute(f"SELECT %s::int + 1 /*traceparent='{TP}'*/", (i,)).fetchone() == (i + 1,)
        (pair,) = _protocols(proxy)
        assert [type(p) for p in pair] == [connection._FedClient, connection._FedServer]
        assert all(type(p.data_received) is connection.Feed for p in pair)
    proxy.flush()
    spans = otlp.wait_for(lambda got: sum("execute" in s.name.split("+") for s in got) >= 3)
    assert sum(s.kind == "SERVER" for s in spans) >= 3


def test_untraced_connections_keep_the_plain_relay_without_the_pump(make_proxy):
    proxy = make_proxy(tracing=False)
    proxy.server._pump_failed = True  # as without the compiled pump (tests/test_pump.py tests it)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        (pair,) = _protocols(proxy)
        assert [type(p) for p in pair] == [connection._Plain, connection._Plain]
        # each side's data_received writes to the other transport (a compiled Sender on these plain
        # sockets): no Python step between them
        assert all(type(p.data_received) is connection.Sender for p in pair)
        big = conn.execute("SELECT repeat('x', 200000)").fetchone()[0]  # many reads each way
        assert big == "x" * 200000


@pytest.mark.parametrize("pumped", [False, True], ids=["feed", "pump"])
def test_messages_split_across_reads_and_odd_messages_go_through_python(make_proxy, otlp, pumped):
    """Each message cut in two: the Feed leaves the held part to Python; results and spans as whole.

    The same through the pump, which frames the client's messages across its reads itself.
    """
    proxy = make_proxy(sample_rate=1.0, experimental={"traced_pump": pumped})
    if not pumped:
        proxy.server._pump_failed = True
    elif proxy_server.Pump is None:
        pytest.skip("compiled pump not built")
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
            (conn,) = proxy.server.connections
            assert conn.pump_observes is pumped
        # An extended batch in one write with an error in the middle: the compiled loop stops at the
        # error's answer, Python takes over, then the Feed again.
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
