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
* end of input → it stops and exits.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import otlp_receiver  # noqa: E402
from otlp_receiver import OtlpReceiver  # noqa: E402


def _count_spans(request) -> list:
    """One placeholder per span of an already parsed ``ExportTraceServiceRequest``."""
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
            if line.strip() == "count":
                print(receiver.received, flush=True)
    finally:
        receiver.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
