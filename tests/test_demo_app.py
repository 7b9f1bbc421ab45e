"""The demo app (examples/demo_app/app.py) run for real: subprocess, real proxy, real PostgreSQL, real OTLP.

Each test starts the app exactly as docs/deploy.md tells people to
(``python examples/demo_app/app.py`` with ``DATABASE_URL`` and the standard
``OTEL_*`` variables), pointed at a ``make_proxy()`` proxy in front of the
``pg`` fixture, with both the app and the proxy exporting to the in-process
``otlp`` receiver.  The assertions are about the trace tree people will see in
Jaeger: HTTP SERVER span → psycopg CLIENT span → proxy statement span →
parse / plan / execute.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.instrumentation.psycopg")

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "demo_app" / "app.py"
STARTUP_TIMEOUT = 30.0


class DemoApp:
    """A running demo app subprocess and a tiny HTTP client for it."""

    def __init__(self, proc: subprocess.Popen, base_url: str) -> None:
        self.proc = proc
        self.base_url = base_url

    def request(self, method: str, path: str, body: dict | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read())


def _decode(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


@contextmanager
def run_demo_app(dsn: str, otel_env: dict[str, str]) -> Iterator[DemoApp]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({
        "DATABASE_URL": dsn,
        "HOST": "127.0.0.1",
        "PORT": "0",
        "OTEL_SERVICE_NAME": "demo-app",
        # Export quickly so the test does not wait for the default 5 s batch delay.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "DB_WAIT_SECONDS": "10",
    })
    env.update(otel_env)
    proc = subprocess.Popen([sys.executable, str(APP)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        base_url = None
        while base_url is None:
            try:
                line = lines.get(timeout=STARTUP_TIMEOUT)
            except queue.Empty:
                pytest.fail("demo app did not start:\n" + "".join(seen))
            if line is None:
                pytest.fail(f"demo app exited with {proc.wait()}:\n" + "".join(seen))
            seen.append(line)
            if line.startswith("demo app listening on "):
                base_url = line.split(" on ", 1)[1].strip()
        yield DemoApp(proc, base_url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def demo_db(pg) -> str:
    """A fresh database for the app's tables, so other tests' ``users`` tables cannot clash."""
    import psycopg

    name = "demo_app_test"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return name


def _service(span) -> str:
    return span.resource.get("service.name", "")


def _stack(otlp, route: str, client_prefix: str, timeout: float = 15.0):
    """Wait for HTTP span → CLIENT span → proxy statement span → phases; return the four levels."""

    def found(spans):
        for server in spans:
            if server.name != route or server.kind != "SERVER" or _service(server) != "demo-app":
                continue
            for client in _children(spans, server):
                if client.kind != "CLIENT" or not client.name.startswith(client_prefix):
                    continue
                for stmt in _children(spans, client):
                    if _service(stmt) == "pgotel-proxy" and stmt.kind == "SERVER":
                        phases = _children(spans, stmt)
                        if phases and phases[-1].name.split("+")[-1] == "execute":
                            return server, client, stmt, phases
        return None

    spans = otlp.wait_for(found, timeout)
    return found(spans)


def _children(spans, parent):
    return sorted((s for s in spans if s.trace_id == parent.trace_id
                   and s.parent_span_id == parent.span_id), key=lambda s: s.start_ns)


def test_routes_trace_from_http_handler_down_to_statement_phases(make_proxy, otlp, demo_db):
    proxy = make_proxy()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.http_endpoint,
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    with run_demo_app(proxy.dsn(dbname=demo_db), env) as app:
        status, body = app.request("GET", "/users/42")
        assert (status, body) == (200, {"id": 42, "name": "user 42", "orders_placed": 0})
        status, order = app.request("POST", "/orders", {"user_id": 7, "total": "12.50"})
        assert status == 201, order
        assert order["user_id"] == 7 and order["total"] == "12.50"
        status, body = app.request("GET", "/users/7")
        assert (status, body["orders_placed"]) == (200, 1)  # the transaction committed
        status, body = app.request("GET", "/report")
        assert status == 500
        assert body["sqlstate"] == "22012", body
        status, _ = app.request("GET", "/users/999999")
        assert status == 404

    # GET /users/{id}: parameterised SELECT, extended protocol.
    server, client, stmt, phases = _stack(otlp, "GET /users/{id}", "SELECT")
    assert server.parent_span_id is None
    assert server.attributes["http.route"] == "/users/{id}"
    assert server.attributes["http.response.status_code"] == 200
    assert server.status_code != "ERROR"
    assert stmt.trace_id == server.trace_id
    assert stmt.attributes["db.system.name"] == "postgresql"
    assert stmt.attributes["db.postgresql.application_name"] == "demo-app"
    # Parse, Bind and Execute in one write, answered together: one span holds the three phases.
    assert [p.name for p in phases] == ["parse+plan+execute"], otlp.tree(server.trace_id)
    # The nesting is also a timeline: each level lies inside its parent.
    assert server.start_ns <= client.start_ns <= stmt.start_ns
    assert stmt.end_ns <= client.end_ns + 5_000_000  # clocks agree; 5 ms slack for export rounding

    # POST /orders: both writes of the transaction under the one request span.
    order_server, _, insert, insert_phases = _stack(otlp, "POST /orders", "INSERT")
    assert order_server.attributes["http.response.status_code"] == 201
    assert [p.name for p in insert_phases] == ["parse+plan+execute"]
    _, _, update, _ = _stack(otlp, "POST /orders", "UPDATE")
    assert update.trace_id == insert.trace_id == order_server.trace_id

    # GET /report: the server-side error is visible at every level.
    rep_server, rep_client, rep_stmt, rep_phases = _stack(otlp, "GET /report", "SELECT")
    assert rep_server.status_code == "ERROR"
    assert rep_server.attributes["http.response.status_code"] == 500
    assert rep_server.attributes["error.type"] == "22012"
    assert rep_client.status_code == "ERROR"
    assert rep_stmt.status_code == "ERROR"
    assert rep_stmt.attributes["db.response.status_code"] == "22012"
    assert rep_phases[-1].name.split("+")[-1] == "execute"

    # 404 is the caller's problem, not a server error.
    missing = [s for s in otlp.spans if s.name == "GET /users/{id}"
               and s.attributes.get("http.response.status_code") == 404]
    assert missing and missing[0].status_code != "ERROR"


def test_incoming_traceparent_continues_through_app_and_proxy_over_grpc(make_proxy, otlp, demo_db):
    # In compose the proxy exports OTLP/gRPC and the app OTLP/HTTP; the first
    # test covers HTTP, here both speak gRPC so the app's gRPC path runs too.
    grpc_url = f"http://{otlp.grpc_endpoint}"
    proxy = make_proxy(otlp_endpoint=grpc_url, otlp_protocol="grpc")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": grpc_url,
           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller_span = "00f067aa0ba902b7"
    with run_demo_app(proxy.dsn(dbname=demo_db), env) as app:
        status, _ = app.request("GET", "/users/5",
                                headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"})
        assert status == 200

    server, client, stmt, phases = _stack(otlp, "GET /users/{id}", "SELECT")
    assert server.trace_id == caller_trace
    assert server.parent_span_id == caller_span
    assert stmt.trace_id == caller_trace
    assert [p.name for p in phases] == ["parse+plan+execute"]
    assert otlp.request_count(transport="grpc") >= 2  # one batch from the app, one from the proxy


def test_without_database_url_it_says_what_to_set():
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run([sys.executable, str(APP)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert "DATABASE_URL" in done.stderr


def test_pgotel_proxy_demo_workload_shows_observed_phases_and_claims_no_other(make_proxy, otlp, demo_db):
    """``pgotel-proxy demo``'s workload, through a proxy with the defaults the demo runs with.

    The slow statement's first run is answered all at once (one ``parse+plan+execute``
    span); its shape is then slow, and every later run gets exact, non-zero parse, plan
    and execute spans. No statement has a phase span followed by another unless the
    boundary between them was observed.
    """
    from opentelemetry.sdk.trace import TracerProvider

    from pgotel_proxy.demo import SLOW_RUNS, _workload
    from tracetree import assert_statement, children, collect, held_phases

    assert SLOW_RUNS >= 2
    proxy = make_proxy()
    names = _workload(proxy.dsn(dbname=demo_db), TracerProvider().get_tracer("demo-test"))
    assert names.count("GET /users/{id}/network") == SLOW_RUNS

    def slow(spans):
        return sorted((s for s in spans if s.kind == "SERVER" and "JOIN users u9" in s.attributes.get("db.query.text", "")),
                      key=lambda s: s.start_ns)

    spans = collect(proxy, otlp, lambda got: len(slow(got)) == SLOW_RUNS and all(children(got, s) for s in slow(got)))
    statements = [s for s in spans if s.kind == "SERVER" and s.scope == "pgotel_proxy"]
    assert len(statements) >= 5 + SLOW_RUNS
    for stmt in statements:
        kids = assert_statement(spans, stmt, name=stmt.name, phases=tuple(k.name for k in children(spans, stmt)),
                                parent=stmt.parent_span_id)
        # A span followed by another claims the boundary between them: only an observed one.
        assert all(k.attributes["pgotel.timing.exact"] for k in kids[:-1]), [k.describe() for k in kids]
        assert [p for k in kids for p in held_phases(k)] in (["execute"], ["parse", "plan", "execute"]), stmt.describe()
    first, *later = slow(spans)
    assert_statement(spans, first, name=first.name, phases=("parse+plan+execute",), parent=None)
    for network in later:
        parse, plan, execute = assert_statement(spans, network, name=network.name, phases=("parse", "plan", "execute"),
                                                parent=None)
        for phase in (parse, plan, execute):
            assert phase.attributes["pgotel.timing.exact"] is True and phase.end_ns > phase.start_ns, phase.describe()
        assert execute.end_ns - execute.start_ns >= 35_000_000  # the 40 ms execution
