"""The span process's work for statement records, measured without a server or a network.

This module owns a micro-benchmark of :meth:`pgotel_proxy.tracing.helper.SpanHelper.build`:
hand-overs of one connection's finished records, packed and unpacked as the
relay and the span process do (``protocol.records.pack`` /
``unpack``), built into encoded spans with the latency histograms on
or off, nothing exported. The records are pgbench ``-S`` statements whose
sqlcommenter ``traceparent`` is new in every statement (``--traceparent
new``, what instrumented applications send), the same in all of them
(``fixed``, what ``run.py`` sends), or absent (``none``: each statement a
new root at the sample rate of 1). Equal texts are one object, as the
relay's codec hands them over.

Usage::

    python bench/spanwork.py [--protocol extended|prepared|simple] [--histograms on|off]
                             [--traceparent new|fixed|none] [--batches 2000] [--records 32]
                             [--repeat 5]

It prints the best of ``--repeat`` timings in µs a record. On a shared
machine the timing is noisy; instruction counts are not: run it twice under
``valgrind --tool=callgrind`` with two ``--batches`` values and ``--repeat 1``,
and divide the difference of the totals by the difference of the records
(start-up cancels out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgotel_proxy.config import Config  # noqa: E402
from pgotel_proxy.protocol.events import Completion, Statement  # noqa: E402
from pgotel_proxy.protocol.records import pack as pack_records, unpack as unpack_records  # noqa: E402
from pgotel_proxy.tracing.helper import SpanHelper  # noqa: E402
from pgotel_proxy.tracing.process import _ChildInfo  # noqa: E402
from pgotel_proxy.tracing.spans import ConnState  # noqa: E402

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
BASE_ATTRS = {"db.system.name": "postgresql", "db.namespace": "bench", "server.address": "127.0.0.1",
              "server.port": 5432}


def hand_overs(protocol: str, traceparent: str, batches: int, per_batch: int) -> list[bytes]:
    """``batches`` packed hand-overs of ``per_batch`` records each."""
    out = []
    texts: dict[str, str] = {}  # equal texts are one object, as the relay's codec decodes them
    span = 0x1000
    # Wall-clock, as records carry it, an hour ahead: the histograms judge an exemplar's age by
    # its record's end, and a run slowed down by an instruction counter would otherwise find
    # every exemplar stale and build every record alone (in the proxy an exemplar is renewed
    # once in EXEMPLAR_MAX_AGE_NS per bucket: nothing a record).
    t = time.time_ns() + 3600 * 10**9
    for b in range(batches):
        records = []
        if traceparent == "session" and b == 0:  # the session carrier every statement after it joins
            rec = Statement("simple", f"SET pgotel.traceparent = '00-{TRACE_ID:032x}-{span:016x}-01'", start_ns=t,
                            end_ns=t + 10_000, status="ok", tx_status="I", results=[Completion(t + 9_000, "SET", 0)])
            records.append(rec)
            t += 100_000
        for i in range(per_batch):
            if traceparent in ("new", "app"):
                span += 1
            app = None
            if traceparent == "app":  # OpenTelemetry JS pg: a SET of application_name before each statement
                app = f"00-{TRACE_ID:032x}-{span:016x}-01"
                records.append(Statement("simple", f"SET application_name = '{app}'", start_ns=t, end_ns=t + 10_000,
                                         status="ok", tx_status="I", application_name=app,
                                         results=[Completion(t + 9_000, "SET", 0)]))
                t += 20_000
            comment = (f" /*traceparent='00-{TRACE_ID:032x}-{span:016x}-01'*/" if traceparent in ("new", "fixed")
                       else " /*application='shop',controller='users'*/" if traceparent == "tags" else "")
            aid = (span * 7919 + i) % 100000 + 1
            if protocol == "extended":
                sql = f"SELECT abalance FROM pgbench_accounts WHERE aid = $1{comment}"
                rec = Statement("extended", sql, start_ns=t, parse_start_ns=t, parse_end_ns=t + 20_000,
                                bind_start_ns=t + 1_000, bind_end_ns=t + 21_000, exec_start_ns=t + 2_000,
                                end_ns=t + 60_000, status="ok", tag="SELECT 1", rows=1, tx_status="I")
            elif protocol == "prepared":  # Bind and Execute of a statement parsed earlier (pgbench -M prepared)
                # (its text is the Parse's: a traceparent in it is the first one, whatever came since)
                sql = texts.setdefault("prepared", f"SELECT abalance FROM pgbench_accounts WHERE aid = $1{comment}")
                rec = Statement("extended", sql, statement_name="P0_1", start_ns=t, bind_start_ns=t,
                                bind_end_ns=t + 20_000, exec_start_ns=t + 1_000, end_ns=t + 60_000, status="ok",
                                tag="SELECT 1", rows=1, tx_status="I", reused=True)
            else:
                sql = f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}{comment}"
                rec = Statement("simple", sql, start_ns=t, end_ns=t + 60_000, status="ok", tx_status="I",
                                results=[Completion(t + 59_000, "SELECT 1", 1)])
            rec.sql = texts.setdefault(sql, sql)
            rec.application_name = app
            records.append(rec)
            t += 100_000
        out.append(pack_records(records))
    return out


def run(helper: SpanHelper, packed: list[bytes]) -> int:
    """Build every hand-over as the span process does (a fresh connection state); spans built."""
    state = ConnState(_ChildInfo(4242, "bench"), dict(BASE_ATTRS))
    built = 0
    for data in packed:
        spans: list = []
        helper.build(state, unpack_records(data), spans)
        built += len(spans)
    return built


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=("extended", "prepared", "simple"), default="extended")
    ap.add_argument("--histograms", choices=("on", "off"), default="on")
    ap.add_argument("--traceparent", choices=("new", "fixed", "none", "tags", "session", "app"), default="new",
                    help="in each statement's sqlcommenter comment, a new or the same one each time; none; "
                         "none but other tags in a comment (Rails' query log tags); "
                         "none in the statements and one session carrier (SET pgotel.traceparent) first; "
                         "or a new one in application_name, SET before each statement")
    ap.add_argument("--sample-rate", type=float, default=1.0,
                    help="the head sampler's rate for statements without a traceparent (--traceparent none)")
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--records", type=int, default=32, help="records a hand-over")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    config = Config(tracing=True, exporter="none", sample_rate=args.sample_rate, service_name="bench",
                    latency_histograms=args.histograms == "on")
    helper = SpanHelper(config, exporter=None)
    try:
        packed = hand_overs(args.protocol, args.traceparent, args.batches, args.records)
        run(helper, hand_overs(args.protocol, args.traceparent, 20, args.records))  # warm the caches
        best = float("inf")
        spans = 0
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            spans = run(helper, packed)
            best = min(best, time.perf_counter() - t0)
        n = args.batches * args.records
        print(f"{args.protocol} histograms={args.histograms} traceparent={args.traceparent} "
              f"sample rate {args.sample_rate:g}: "
              f"{n} records, {spans} spans, best {best / n * 1e6:.3f} µs a record")
    finally:
        helper.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
