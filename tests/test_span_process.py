"""Spans built and exported in the helper process (the one tracer).

Against a real PostgreSQL and the decoding OTLP receiver: the trace tree; counters from the helper show in the proxy's STATS; the
sample rate reaches it; a helper that stops reading (SIGSTOP), or dies
(SIGKILL), never holds the relay up, and statements it could not take are
counted; a dead helper is started again; shutdown exports what is left.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import psycopg
import pytest

from pgotel_proxy.config import Config
from pgotel_proxy.protocol.events import Completion, Statement
from pgotel_proxy.stats import STATS
from pgotel_proxy.tracing.process import ProcessTracer, pack_records, unpack_records
from test_tracing_control import metrics
from waiting import best_rate, free_port, wait_accepting, wait_for

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _helper_pid(proxy) -> int:
    tracer = proxy.tracer
    assert isinstance(tracer, ProcessTracer)
    assert tracer._proc is not None
    return tracer._proc.pid


def _run(proxy, n: int, conns: int = 1) -> float:
    """Statements per second over ``conns`` connections running ``n`` traced queries each."""
    errors: list[BaseException] = []

    def one() -> None:
        try:
            with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
                for i in range(n):
                    conn.execute(f"SELECT {i} /*traceparent='{TP}'*/")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(conns)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return n * conns / (time.perf_counter() - t0)


def test_records_survive_the_trip_to_the_helper():
    rec = Statement("simple", "SELECT 1; SELECT 2", start_ns=5, end_ns=9, status="ok", tx_status="I",
                    results=[Completion(7, "SELECT 1", 1), Completion(9, "SELECT 1", 1, {"C": "42P01", "M": "x"})],
                    error={"C": "42P01"}, params=["1", None], extra={"wal_lsn": "0/16B3748"})
    (back,) = unpack_records(pack_records([rec]))
    assert back.__class__ is Statement and all(
        getattr(back, f) == getattr(rec, f) for f in Statement.__slots__ if f != "results")
    assert [(c.end_ns, c.tag, c.rows, c.error) for c in back.results] == [
        (c.end_ns, c.tag, c.rows, c.error) for c in rec.results]


def test_trace_tree_and_counters_come_from_the_helper(make_proxy, otlp):
    proxy = make_proxy(sample_rate=1.0)
    pid = _helper_pid(proxy)
    assert pid != os.getpid()
    exported = STATS.spans_exported
    with psycopg.connect(proxy.dsn(application_name="shop"), autocommit=True) as conn:
        conn.execute(f"SELECT %s::int /*route='%%2Forders',traceparent='{TP}'*/", (7,))
    proxy.flush()
    spans = otlp.wait_for(lambda got: any(s.name == "SELECT" and s.trace_id == TP[3:35] for s in got))
    top = next(s for s in spans if s.name == "SELECT" and s.trace_id == TP[3:35])
    assert top.parent_span_id == TP[36:52]
    assert top.attributes["db.postgresql.application_name"] == "shop"
    assert top.attributes["pgotel.sqlcommenter.route"] == "/orders"
    assert "7" not in top.attributes["db.query.text"]  # literals stay masked
    children = sorted(s.name for s in spans if s.parent_span_id == top.span_id)
    assert children == ["parse+plan+execute"]  # one write, answered together
    # flush() returns once the helper reported its counters
    assert STATS.spans_exported >= exported + 2


def test_records_in_one_form_reach_the_helper(make_proxy, otlp, monkeypatch):
    """Statements go packed, with an error as without: all become spans."""
    from pgotel_proxy.tracing import process

    forms = []
    real = process.pack_records
    monkeypatch.setattr(process, "pack_records", lambda recs: forms.append(real(recs)) or forms[-1])
    proxy = make_proxy(sample_rate=1.0)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"SELECT 1 /*route='ok',traceparent='{TP}'*/")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute(f"SELECT * FROM no_such_table /*route='bad',traceparent='{TP}'*/")
        conn.execute(f"SELECT %s::int /*route='ext',traceparent='{TP}'*/", (3,))
    proxy.flush()
    routes = {"ok", "bad", "ext"}
    spans = otlp.wait_for(lambda got: routes <= {s.attributes.get("pgotel.sqlcommenter.route") for s in got})
    by_route = {s.attributes.get("pgotel.sqlcommenter.route"): s for s in spans}
    assert by_route["bad"].attributes["db.response.status_code"] == "42P01"
    assert by_route["ok"].attributes["db.response.returned_rows"] == 1
    assert {s.name for s in spans if s.parent_span_id == by_route["ext"].span_id} == {"parse+plan+execute"}
    assert forms and all(type(f) is bytes for f in forms)


def test_without_an_exporter_spans_are_built_in_the_helper_counted_and_dropped(make_proxy, otlp):
    """exporter = "none": the helper builds spans as for a collector (encoded, off the relay process), sends none."""
    proxy = make_proxy(sample_rate=1.0, exporter="none")
    assert _helper_pid(proxy) != os.getpid()
    started, exported = STATS.spans_started, STATS.spans_exported
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(5):
            conn.execute(f"SELECT %s::int /*traceparent='{TP}'*/", (i,))
    proxy.flush()
    assert STATS.spans_started - started == 5 * 2  # each statement and its parse+plan+execute (one write)
    assert STATS.spans_exported == exported
    time.sleep(0.2)
    assert otlp.request_count() == 0


def test_without_an_exporter_the_span_helper_builds_the_encoded_form():
    from types import SimpleNamespace

    from pgotel_proxy.tracing.helper import SpanHelper

    helper = SpanHelper(Config(exporter="none"))
    try:
        # SDK span objects cost tens of µs each: never built for nobody.
        assert helper.pipeline.exporter is None
        assert helper.builder.encode and helper.builder.bare
    finally:
        helper.shutdown()


def test_sample_rate_reaches_the_helper(make_proxy, otlp):
    proxy = make_proxy(sample_rate=1.0)
    proxy.tracer.set_sample_rate(0.0)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 'untraced-marker'")
        proxy.flush()
        proxy.tracer.set_sample_rate(1.0)
        conn.execute("SELECT 'traced-marker'")
    proxy.flush()
    spans = otlp.wait_for(lambda got: any("traced" in str(s.attributes.get("db.query.text", "")) or s.name == "SELECT"
                                          for s in got))
    texts = [s.attributes.get("db.postgresql.command_tag") for s in spans if s.name == "SELECT"]
    assert len(texts) == 1, texts  # only the statement run at rate 1.0


def test_a_stalled_helper_never_holds_the_relay(make_proxy, otlp):
    proxy = make_proxy(sample_rate=1.0)
    _run(proxy, 200)  # warm up
    healthy = _run(proxy, 1000, conns=2)
    pid = _helper_pid(proxy)
    dropped = STATS.statements_dropped
    os.kill(pid, signal.SIGSTOP)
    try:
        # The helper reads nothing: the socket, then the relay side's bounded
        # buffer fill; the relay keeps its pace and drops what has no room.
        import pgotel_proxy.tracing.process as proc_mod

        limit = proc_mod._MAX_OUT
        proc_mod._MAX_OUT = 64 << 10  # reach the bound within this test
        try:
            stalled = best_rate(lambda: _run(proxy, 3000, conns=2), 0.5 * healthy)
            assert len(proxy.tracer._out) <= (64 << 10) + (1 << 20)
            # what waits for the helper shows in /metrics
            assert 64 << 10 <= STATS.span_process_backlog_bytes <= (64 << 10) + (1 << 20)
            assert 64 << 10 <= metrics(proxy)["pgotel_span_process_backlog_bytes"] <= (64 << 10) + (1 << 20)
        finally:
            proc_mod._MAX_OUT = limit
        assert STATS.statements_dropped > dropped
        assert stalled >= 0.5 * healthy, f"healthy {healthy:.0f}/s, helper stalled {stalled:.0f}/s"
    finally:
        os.kill(pid, signal.SIGCONT)
    # Once it runs again, tracing goes on.
    otlp.clear()
    _run(proxy, 5)
    proxy.flush()
    otlp.wait_for(lambda got: sum(s.name == "SELECT" for s in got) >= 5)
    wait_for(lambda: STATS.span_process_backlog_bytes == 0, timeout=5, what="the backlog to be read")


def test_a_dead_helper_is_restarted(make_proxy, otlp, caplog):
    proxy = make_proxy(sample_rate=1.0)
    _run(proxy, 5)
    proxy.flush()
    old = _helper_pid(proxy)
    exported = STATS.spans_exported
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: proxy.tracer._sock is None or _helper_pid(proxy) != old, timeout=5)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")  # may be dropped while the helper is away: counted, never an error
        wait_for(lambda: proxy.tracer._proc.pid != old and proxy.tracer.accepting, timeout=10)
        otlp.clear()
        conn.execute(f"SELECT 'after-restart' /*traceparent='{TP}'*/")  # a session opened before the restart
    proxy.flush()
    spans = otlp.wait_for(lambda got: any(s.name == "SELECT" and s.trace_id == TP[3:35] for s in got))
    top = next(s for s in spans if s.name == "SELECT" and s.trace_id == TP[3:35])
    assert top.attributes["db.system.name"] == "postgresql"  # its connection attributes were announced again
    # counters do not go backwards across the restart
    assert STATS.spans_exported >= exported
    assert any("span process exited" in r.getMessage() for r in caplog.records)


def test_shutdown_exports_what_is_left_and_ends_the_helper(make_proxy, otlp):
    proxy = make_proxy(sample_rate=1.0, export_interval=30.0)  # nothing leaves before shutdown
    _run(proxy, 20)
    pid = _helper_pid(proxy)
    # The proxy's drain closes every connection before the tracer shuts down, and a closing
    # connection hands its statements over; here the test stands in for the drain.
    wait_for(lambda: not proxy.tracer._handles, timeout=5)
    t0 = time.monotonic()
    proxy.tracer.shutdown()
    assert time.monotonic() - t0 < proxy.config.shutdown_timeout + 1.5
    assert sum(s.name == "SELECT" for s in otlp.spans) == 20
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)


def test_sick_collector_drops_in_the_helper_and_keeps_the_relay_going(make_proxy, otlp):
    proxy = make_proxy(sample_rate=1.0, span_queue_size=500, export_batch_size=100, export_timeout=0.5,
                       shutdown_timeout=1.0)
    _run(proxy, 100)
    healthy = _run(proxy, 1000, conns=2)
    proxy.flush()
    otlp.mode = "blackhole"
    lost = STATS.spans_dropped + STATS.statements_dropped
    sick = best_rate(lambda: _run(proxy, 1000, conns=2), 0.5 * healthy)
    wait_for(lambda: STATS.spans_dropped + STATS.statements_dropped > lost, timeout=5)
    assert sick >= 0.5 * healthy, f"healthy {healthy:.0f}/s, sick collector {sick:.0f}/s"
    t0 = time.monotonic()
    proxy.tracer.shutdown()
    assert time.monotonic() - t0 < 1.0 + 2.0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_span_process_never_outlives_the_proxy(pg, otlp, sig):
    """SIGTERM: the proxy drains and stops its span process; SIGKILL: the span process
    sees its socket close, exports what it has and exits (no orphan in a container)."""
    import subprocess
    import sys

    port = free_port()
    cmd = [
        sys.executable, "-m", "pgotel_proxy", "run",
        "--listen", f"127.0.0.1:{port}", "--upstream", f"{pg.host}:{pg.port}", "--upstream-tls", "disable",
        "--drain-timeout", "1", "--tracing", "--sample-rate", "1", "--admin-listen", "",
        "--otlp-endpoint", otlp.http_endpoint, "--export-interval", "30", "--shutdown-timeout", "3",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGOTEL_", "OTEL_"))}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable connect_timeout=2"
    try:
        wait_accepting(dsn, proc)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as fh:
            children = [int(c) for c in fh.read().split()]
        assert len(children) == 1, children
        helper = children[0]
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(10):
                conn.execute(f"SELECT {i} /*traceparent='{TP}'*/")
        time.sleep(0.3)  # the records reach the span process (every 50 ms); export waits for the interval
        # The relay process keeps only the relay: span building and OTLP encoding
        # (protobuf's C module among them) live in the span process, the SQL parser too.
        def maps(pid: int) -> str:
            with open(f"/proc/{pid}/maps") as fh:
                return fh.read()

        wait_for(lambda: "_upb" in maps(helper), timeout=10, what="the span process to load its exporter")
        relay_maps = maps(proc.pid)
        assert "_upb" not in relay_maps and "pglast" not in relay_maps
        proc.send_signal(sig)
        proc.wait(timeout=10)

        def gone():
            try:
                os.kill(helper, 0)
            except ProcessLookupError:
                return True
            # a zombie until its parent is reaped counts as gone
            with open(f"/proc/{helper}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] == "Z"

        wait_for(gone, timeout=8, what="the span process to exit")
        # Either way, what it had was exported before it went.
        otlp.wait_for(lambda got: sum(s.name == "SELECT" for s in got) >= 10, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _scheduling(pid: int) -> set[tuple[int, int]]:
    """(policy, nice) of every thread of the process."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add((os.sched_getscheduler(int(tid)), os.getpriority(os.PRIO_PROCESS, int(tid))))
        except (ProcessLookupError, FileNotFoundError):
            pass  # a thread that ended in between
    return out


def _expected_scheduling(priority: str) -> tuple[int, int]:
    from pgotel_proxy.tracing.process import may_leave_idle

    nice = os.getpriority(os.PRIO_PROCESS, 0)
    if priority == "idle" and not may_leave_idle():
        priority = "low"  # the stand-in where lifting is not allowed
    return {"idle": (os.SCHED_IDLE, nice), "low": (os.SCHED_BATCH, max(10, nice)),
            "normal": (os.SCHED_OTHER, nice)}[priority]


@pytest.mark.parametrize("priority", ["idle", "low", "normal"])
def test_span_process_priority(make_proxy, priority):
    proxy = make_proxy(span_process_priority=priority)
    pid = _helper_pid(proxy)
    expected = _expected_scheduling(priority)
    # the helper sets it once it has read its settings; every thread it starts inherits it
    wait_for(lambda: _scheduling(pid) == {expected}, timeout=10, what=f"scheduling class {priority}")
    lifted = STATS.span_process_lifted
    _run(proxy, 5)  # and it still traces
    proxy.flush()
    if STATS.span_process_lifted == lifted:  # (on a machine busy all the time an idle helper is lifted)
        assert _scheduling(pid) == {expected}


def test_idle_means_low_where_the_helper_may_not_be_lifted(make_proxy, monkeypatch):
    from pgotel_proxy.tracing import process

    monkeypatch.setattr(process, "may_leave_idle", lambda: False)
    proxy = make_proxy(span_process_priority="idle")
    pid = _helper_pid(proxy)
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    wait_for(lambda: _scheduling(pid) == {(os.SCHED_BATCH, max(10, nice))}, timeout=10, what="low priority")


def test_a_helper_behind_is_lifted_out_of_the_idle_class_until_it_has_caught_up(make_proxy, otlp, monkeypatch):
    """A stopped helper stands in for one the idle class starves on a machine busy all the time."""
    from pgotel_proxy.tracing import process

    if not process.may_leave_idle():
        pytest.skip("lifting needs CAP_SYS_NICE or RLIMIT_NICE 20 (root has it)")
    monkeypatch.setattr(process, "_LIFT_AT", 64 << 10)
    proxy = make_proxy(sample_rate=1.0, span_process_priority="idle")
    pid = _helper_pid(proxy)
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    wait_for(lambda: _scheduling(pid) == {(os.SCHED_IDLE, nice)}, timeout=10, what="the idle class")
    lifted, dropped = STATS.span_process_lifted, STATS.statements_dropped
    otlp.clear()
    sent = 0
    os.kill(pid, signal.SIGSTOP)
    try:
        # The helper takes nothing: the socket fills, then the relay's buffer past _LIFT_AT.
        while STATS.span_process_lifted == lifted and sent < 40_000:
            _run(proxy, 1000, conns=2)
            sent += 2000
            time.sleep(0.1)  # a hand-over or two
        assert STATS.span_process_lifted == lifted + 1, f"not lifted after {sent} statements"
        assert len(proxy.tracer._out) > 64 << 10
        assert _scheduling(pid) == {(os.SCHED_OTHER, nice)}
    finally:
        os.kill(pid, signal.SIGCONT)
    proxy.flush(timeout=30)
    # Caught up: back in the idle class, and nothing was lost on the way.
    wait_for(lambda: _scheduling(pid) == {(os.SCHED_IDLE, nice)}, timeout=10, what="the idle class again")
    spans = otlp.wait_for(lambda got: sum(s.name == "SELECT" for s in got) >= sent, timeout=30)
    assert sum(s.name == "SELECT" for s in spans) == sent
    assert STATS.statements_dropped == dropped
    assert STATS.span_process_lifted == lifted + 1


def test_a_helper_that_stops_reporting_is_lifted_with_few_statements(make_proxy, otlp):
    """A quiet proxy never fills its buffer: a helper silent for a second is lifted all the same."""
    from pgotel_proxy.tracing import process

    if not process.may_leave_idle():
        pytest.skip("lifting needs CAP_SYS_NICE or RLIMIT_NICE 20 (root has it)")
    proxy = make_proxy(sample_rate=1.0, span_process_priority="idle")
    pid = _helper_pid(proxy)
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    wait_for(lambda: _scheduling(pid) == {(os.SCHED_IDLE, nice)}, timeout=10, what="the idle class")
    lifted = STATS.span_process_lifted
    otlp.clear()
    os.kill(pid, signal.SIGSTOP)  # what the idle class does to it on a machine busy all the time
    try:
        _run(proxy, 5)  # a few statements: the relay's buffer stays empty
        assert len(proxy.tracer._out) == 0
        wait_for(lambda: STATS.span_process_lifted > lifted, timeout=5, what="the lift")
        assert _scheduling(pid) == {(os.SCHED_OTHER, nice)}
    finally:
        os.kill(pid, signal.SIGCONT)
    proxy.flush(timeout=10)
    otlp.wait_for(lambda got: sum(s.name == "SELECT" for s in got) >= 5, timeout=10)
    # Reporting again and nothing waiting: back in the idle class at the next look.
    wait_for(lambda: _scheduling(pid) == {(os.SCHED_IDLE, nice)}, timeout=10, what="the idle class again")


def test_settle_gc_freezes_start_up_objects_and_raises_the_young_threshold():
    import subprocess
    import sys

    code = ("import gc; from pgotel_proxy.runtime import settle_gc, GC_THRESHOLD; settle_gc(); "
            "print(gc.get_freeze_count(), gc.get_threshold()[0] == GC_THRESHOLD)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > 1000 and out[1] == "True", out


def test_statements_of_one_send_keep_their_order_in_one_operation():
    """A connection's statements are handed over together, one with an error among them, in one packed batch."""
    from types import SimpleNamespace

    from pgotel_proxy.protocol.events import Completion, Statement
    from pgotel_proxy.tracing import process

    tracer = SimpleNamespace(enabled=True, accepting=True, _ops=[], _pending=0, _armed=True, _arm=lambda: None,
                             _sample_rate=1.0, _presample=True)
    session = SimpleNamespace(server_params={"application_name": "app"}, startup_params={})
    handle = process._Handle(tracer, 7, session, (process.OP_CONNECTION_OPENED,))
    records = [Statement("simple", f"SELECT {i}", start_ns=i, end_ns=i + 1, status="ok", tx_status="I",
                         results=[Completion(i + 1, "SELECT 1", 1)]) for i in range(5)]
    records[2].error = {"C": "42P01", "M": "no"}
    handle.statements(records)
    assert tracer._pending == 5
    assert [(op[0], op[1], op[2], op[3]) for op in tracer._ops] == [(process.OP_STATEMENTS_PACKED, 7, 5, "app")]
    back = process.unpack_records(tracer._ops[0][4])
    assert [r.sql for r in back] == [f"SELECT {i}" for i in range(5)]
    assert back[2].error == {"C": "42P01", "M": "no"}


@pytest.mark.parametrize("transaction_spans", [False, True])
def test_a_statement_that_cannot_be_built_leaves_no_partial_spans_and_stops_nothing(transaction_spans, caplog):
    from pgotel_proxy.protocol.events import Completion, Statement
    from pgotel_proxy.tracing.process import _ChildInfo
    from pgotel_proxy.tracing.spans import ConnState
    from pgotel_proxy.tracing.helper import SpanHelper

    class _Encoded:
        accepts_encoded = True

        def export(self, spans):
            return None

        def shutdown(self):
            pass

    config = Config(tracing=True, exporter="otlp", sample_rate=1.0, service_name="t",
                    transaction_spans=transaction_spans)
    tracer = SpanHelper(config, exporter=_Encoded())
    try:
        state = ConnState(_ChildInfo(1, "app"), {"db.system.name": "postgresql"})
        records = [Statement("simple", f"SELECT {i}", start_ns=10 * i + 1, end_ns=10 * i + 5, status="ok",
                             tx_status="I", results=[Completion(10 * i + 5, "SELECT 1", 1)]) for i in range(3)]
        real = tracer.builder._simple

        def flaky(conn, rec, out):
            real(conn, rec, out)  # its spans are appended, then it fails
            if rec.sql == "SELECT 1":
                raise RuntimeError("odd statement")

        tracer.builder._simple = flaky
        spans: list = []
        with caplog.at_level("ERROR", logger="pgotel_proxy.tracing"):
            tracer.build(state, records, spans)
        assert len(spans) == 4  # two statements, two spans each; none of the failed one
        assert "could not build a span" in caplog.text
    finally:
        tracer.shutdown()


def test_frames_reach_the_helper_whole_and_in_order_through_a_full_socket():
    """The relay side sends a frame straight to the socket when nothing waits, keeps what the socket
    does not take, and sends the rest before anything newer: the helper reads every frame, whole, in
    order, however the socket cut them."""
    import random
    import threading
    from types import SimpleNamespace

    from pgotel_proxy.tracing import process

    near, far = socket.socketpair()
    near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    near.setblocking(False)
    tracer = SimpleNamespace(_lock=threading.Lock(), _sock=near, _stopping=False, _restart_at=0.0, _ops=[],
                             _pending=0, _out=process._Outbox(), accepting=True, _may_lift=False)
    rnd = random.Random(5)
    sent, got, buf = [], [], bytearray()
    far.setblocking(False)
    try:
        for i in range(300):
            ops = [(process.OP_CONNECTION_CLOSED, i, rnd.randbytes(rnd.choice([1, 50, 3000, 70000])))]
            tracer._ops = ops
            process.ProcessTracer._send(tracer)
            sent.append(ops)
            if rnd.random() < 0.3:  # the helper reads a little now and then
                try:
                    buf += far.recv(rnd.choice([100, 5000, 100000]))
                except BlockingIOError:
                    pass
        far.setblocking(True)
        far.settimeout(5)
        while len(got) < len(sent):
            tracer._ops = []
            process.ProcessTracer._send(tracer)  # what waited goes out as the socket takes it
            try:
                buf += far.recv(1 << 20)
            except socket.timeout:
                break
            pos = 0
            while len(buf) - pos >= 4:
                (n,) = process._LEN.unpack_from(buf, pos)
                if len(buf) - pos - 4 < n:
                    break
                got.append(process.marshal.loads(bytes(buf[pos + 4:pos + 4 + n])))
                pos += 4 + n
            del buf[:pos]
    finally:
        near.close()
        far.close()
    assert [list(map(tuple, g)) for g in got] == sent
    assert not tracer._out


def test_the_span_process_receives_the_config_itself_without_secrets():
    """The helper rebuilds the proxy's Config from the first frame: every setting, the live sample rate, no secret
    but the stats DSN, whose side connections the helper opens (enrichment runs there)."""
    import marshal

    from pgotel_proxy.tracing.process import _child_config

    config = Config(service_name="orders", export_batch_size=100, span_queue_size=400, capture_parameters=True,
                    enrich_sources=["wait_events"], admin_token="hunter2", stats_dsn="host=db user=monitor",
                    sample_rate=0.5, log_format="json")
    data = marshal.loads(marshal.dumps(_child_config(config, sample_rate=0.25, priority="low")))
    received = Config.model_validate(data)
    assert received.admin_token is None and "hunter2" not in repr(data)
    assert received.stats_dsn.get_secret_value() == "host=db user=monitor"
    assert (received.sample_rate, received.span_process_priority, received.tracing) == (0.25, "low", True)
    expected = config.model_copy(update={"admin_token": None, "sample_rate": 0.25,
                                         "span_process_priority": "low"})
    assert received == expected
