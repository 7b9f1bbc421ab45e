"""The relay's tracing work for the pump's log, measured without a server, a pump or a network.

This module owns a micro-benchmark of what the event loop does for traced
sessions on the pump: a log as the pump writes it (``protocol/pumplog.py``'s
layout: both directions of several connections, interleaved), fed to the
connections' sessions by ``observe_log``, their finished statements taken
and packed for the span process (``protocol.records.pack``). The transactions
are pgbench ``-S`` statements with a sqlcommenter ``traceparent``: ``prepared``
(Bind, Execute, Sync of a statement parsed once, pgbench ``-M prepared``) or
``simple`` (one Query with a new literal each time).

Usage::

    python bench/relaywork.py [--protocol prepared|simple] [--connections 8]
                              [--transactions 25] [--reads 400] [--repeat 5]

``--transactions`` is per connection and per read of the log (8 × 25 is about
what 40,000 transactions a second leave in the pump's log between two reads
5 ms apart). It prints the best of ``--repeat`` timings in µs a transaction,
for observing alone and with the packing. On a shared machine the timing is
noisy; instruction counts are not: run it twice under ``valgrind
--tool=callgrind`` with two ``--reads`` values and ``--repeat 1``, and divide
the difference of the totals by the difference of the transactions.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgotel_proxy.protocol.messages import typed_message  # noqa: E402
from pgotel_proxy.protocol.pumplog import LOG_HEAD, PUMP_LOG_CLIENT, PUMP_LOG_SERVER, observe_log  # noqa: E402
from pgotel_proxy.protocol.records import pack as pack_records  # noqa: E402
from pgotel_proxy.protocol.session import Session  # noqa: E402

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SQL = f"SELECT abalance FROM pgbench_accounts WHERE aid = $1 /*traceparent='{TRACEPARENT}'*/"


def message(kind: bytes, body: bytes) -> bytes:
    return typed_message(kind[0], body)


READY = message(b"Z", b"I")
ROW_DESCRIPTION = message(b"T", b"\0\1abalance\0" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))  # one int4 column, abalance


def prepare_bytes() -> tuple[bytes, bytes]:
    """The client's Parse + Describe + Sync of the prepared statement, and the server's answers."""
    client = (message(b"P", b"P0_1\0" + SQL.encode() + b"\0\0\0") + message(b"D", b"SP0_1\0")
              + message(b"S", b""))
    server = (message(b"1", b"") + message(b"t", struct.pack("!hi", 1, 23))
              + ROW_DESCRIPTION + READY)
    return client, server


def transaction_bytes(protocol: str, aid: int) -> tuple[bytes, bytes]:
    """One transaction: what the client sent and what the server answered."""
    row = message(b"D", struct.pack("!hi", 1, 4) + b"1234")
    done = message(b"C", b"SELECT 1\0")
    if protocol == "prepared":
        value = str(aid).encode()
        client = (message(b"B", b"\0P0_1\0" + struct.pack("!hhi", 0, 1, len(value)) + value + struct.pack("!h", 0))
                  + message(b"E", b"\0" + struct.pack("!i", 0)) + message(b"S", b""))
        return client, message(b"2", b"") + row + done + READY
    text = SQL.replace("$1", str(aid))
    client = message(b"Q", text.encode() + b"\0")
    return client, ROW_DESCRIPTION + row + done + READY


class Connection:
    """What ``observe_log`` reads of a connection: whether it observes, and its session."""

    __slots__ = ("observe", "session")

    def __init__(self) -> None:
        self.observe = True
        self.session = Session()


def entry(pair: int, kind: int, data: bytes, ts: int) -> bytes:
    return LOG_HEAD.pack(pair, kind, len(data), ts) + data


def _resume(conn, kind, log, at, stop, ts) -> None:
    raise RuntimeError(f"relaywork: the log was handed back to Python ({at!r})")


def setup(protocol: str, connections: int, transactions: int) -> tuple[dict, bytes]:
    """Connections past their first ReadyForQuery (and the Parse, for prepared), and one read's log."""
    conns = {pair: Connection() for pair in range(connections)}
    ts = time.time_ns()
    start = b"".join(entry(pair, PUMP_LOG_SERVER, READY, ts) for pair in conns)
    if protocol == "prepared":
        client, server = prepare_bytes()
        start += b"".join(entry(pair, PUMP_LOG_CLIENT, client, ts) + entry(pair, PUMP_LOG_SERVER, server, ts + 1000)
                          for pair in conns)
    observe_log(start, conns, _resume)
    for conn in conns.values():
        conn.session.take_completed()
    log = bytearray()
    for k in range(transactions):
        for pair in conns:
            ts += 10_000
            client, server = transaction_bytes(protocol, (k * 7919 + pair) % 100_000 + 1)
            log += entry(pair, PUMP_LOG_CLIENT, client, ts) + entry(pair, PUMP_LOG_SERVER, server, ts + 5_000)
    return conns, bytes(log)


def one_read(conns: dict, log: bytes, pack: bool) -> int:
    """Observe one read of the log; take (and pack) the finished statements; the statements taken."""
    observe_log(log, conns, _resume)
    taken = 0
    for conn in conns.values():
        done = conn.session.take_completed()
        taken += len(done)
        if pack:
            pack_records(done)
    return taken


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=("prepared", "simple"), default="prepared")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--transactions", type=int, default=25, help="per connection and read of the log")
    ap.add_argument("--reads", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    conns, log = setup(args.protocol, args.connections, args.transactions)
    per_read = args.connections * args.transactions
    if one_read(conns, log, True) != per_read:
        raise SystemExit("relaywork: a transaction did not finish as one statement")
    for pack in (False, True):
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for _ in range(args.reads):
                one_read(conns, log, pack)
            best = min(best, time.perf_counter() - t0)
        what = "observe + take + pack" if pack else "observe + take"
        print(f"{args.protocol}: {args.reads * per_read} transactions, {what}: "
              f"best {best / (args.reads * per_read) * 1e6:.3f} µs a transaction")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
