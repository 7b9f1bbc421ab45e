"""A counting OTLP/HTTP receiver in its own process, for the benchmark.

This module owns the collector stand-in the traced proxy exports to during a
benchmark run. It is the test suite's :class:`OtlpReceiver` (real protobuf
decoding of every request) except that decoded spans are counted and then
forgotten: a run exports millions of spans, and keeping them would only
measure this process's memory.

Decoding stops at the parsed protobuf message: turning every span into the
test receiver's Python records cost about 12 µs per span, which on a 2-core
machine made the sink, not the proxy, the bottleneck of traced cells (its
slow answers filled the proxy's export queue, spans were dropped, and dropped
spans are never encoded, so the proxy's CPU per transaction was understated).

It runs as a separate process so that its CPU is not charged to the proxy.
Protocol on stdin/stdout, one line each way:

* it prints ``ready <http endpoint>`` once listening;
* ``count`` → the number of spans decoded so far;
* ``phases on`` → ``ok``; from then on it also looks at each span's phases
  (:class:`PhaseTally`), for one benchmark cell;
* ``phases`` → what it saw since ``phases on``, as one line of JSON; it stops
  looking and forgets it;
* end of input → it stops and exits.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import otlp_receiver  # noqa: E402
from otlp_receiver import OtlpReceiver  # noqa: E402


#: The phases a statement span's children can hold (a child holding several is named "parse+plan+execute").
PHASES = frozenset({"parse", "plan", "bind", "execute"})
EXACT = "pgotel.timing.exact"
SPAN_KIND_SERVER = 2


class PhaseTally:
    """Which statements had their phases split: parse, plan and execute each a span of its own with an
    observed end (``pgotel.timing.exact``), counted by statement span name.

    Kept only while a cell asks for it: it remembers every statement span and phase span of the
    cell until the counts are taken (children and their statement may arrive in different requests).
    """

    def __init__(self) -> None:
        self.on = False
        self.lock = threading.Lock()
        self.names: dict[bytes, str] = {}  # statement span id -> its name
        self.exact: dict[bytes, set[str]] = {}  # statement span id -> its phases in spans of their own, exact
        self.joined: dict[bytes, int] = {}  # statement span id -> its children holding several phases

    def look(self, request) -> None:
        with self.lock:
            for rs in request.resource_spans:
                for scope in rs.scope_spans:
                    for s in scope.spans:
                        if s.kind == SPAN_KIND_SERVER:
                            self.names[s.span_id] = s.name
                            continue
                        held = s.name.split("+")
                        if not s.parent_span_id or not PHASES.issuperset(held):
                            continue
                        if len(held) > 1:
                            self.joined[s.parent_span_id] = self.joined.get(s.parent_span_id, 0) + 1
                        elif any(kv.key == EXACT and kv.value.bool_value for kv in s.attributes):
                            self.exact.setdefault(s.parent_span_id, set()).add(s.name)

    def take(self) -> dict[str, dict[str, int]]:
        """Per statement name: statements, split (exact parse, plan and execute spans), joined (a span held
        several phases); and stop."""
        with self.lock:
            out: dict[str, dict[str, int]] = {}
            for span_id, name in self.names.items():
                row = out.setdefault(name, {"statements": 0, "split": 0, "joined": 0})
                row["statements"] += 1
                row["split"] += {"parse", "plan", "execute"} <= self.exact.get(span_id, set())
                row["joined"] += span_id in self.joined
            self.on = False
            self.names, self.exact, self.joined = {}, {}, {}
            return out


TALLY = PhaseTally()


def _count_spans(request) -> list:
    """One placeholder per span of an already parsed ``ExportTraceServiceRequest``."""
    if TALLY.on:
        TALLY.look(request)
    return [None] * sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)


# The receiver's transports parse each request, then hand it to decode_request;
# in this process (and only here) that step just counts.
otlp_receiver.decode_request = _count_spans
# Keep-alive, as every OTLP collector does: the test receiver answers in
# HTTP/1.0 (one request per connection, so that stopping it never waits for an
# idle socket), which would charge the proxy a TCP connection per export.
# Stopping the sink may then wait up to the handler's timeout for idle sockets.
otlp_receiver._HttpHandler.protocol_version = "HTTP/1.1"


class CountingReceiver(OtlpReceiver):
    """Parses like the test receiver, keeps only a count."""

    def __init__(self) -> None:
        super().__init__(grpc_enabled=False)
        self.received = 0
        self._count_lock = threading.Lock()

    def _store(self, spans) -> None:
        with self._count_lock:
            self.received += len(spans)


def main() -> int:
    receiver = CountingReceiver()
    receiver.start()
    print(f"ready {receiver.http_endpoint}", flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "count":
                print(receiver.received, flush=True)
            elif command == "phases on":
                TALLY.on = True
                print("ok", flush=True)
            elif command == "phases":
                print(json.dumps(TALLY.take()), flush=True)
    finally:
        receiver.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
