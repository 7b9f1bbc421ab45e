"""The demo HTTP service: a small aiohttp app whose traces run from the handler down into PostgreSQL.

It is the application in the compose demo (``deploy/compose.yaml``) and in the
Kubernetes example, and it runs just as well on a laptop against a local
pgotel-proxy::

    DATABASE_URL='host=127.0.0.1 port=6432 user=postgres dbname=postgres' \\
    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 \\
    python examples/demo_app/app.py

What it owns:

* one OpenTelemetry SERVER span per HTTP request (context extracted from the
  incoming ``traceparent`` header, so a caller's trace continues here);
* psycopg instrumented by ``opentelemetry-instrumentation-psycopg`` with the
  sqlcommenter on, so each statement carries its CLIENT span's traceparent
  and pgotel-proxy can hang its statement spans under it;
* three routes that show the interesting shapes: ``GET /users/{id}`` (one
  parameterised SELECT), ``POST /orders`` (a transaction of two writes) and
  ``GET /report`` (a query that fails in the server with 22012).

Settings come from the environment only: ``DATABASE_URL`` (libpq DSN or URL),
``HOST`` / ``PORT`` to listen on (default 127.0.0.1:8080; 0 picks a free
port), and the standard ``OTEL_*`` variables for the exporter
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL``,
``OTEL_SERVICE_NAME``, ``OTEL_TRACES_EXPORTER=none`` ...).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from decimal import Decimal

import psycopg
from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
)
from opentelemetry.semconv.attributes.url_attributes import URL_PATH, URL_SCHEME
from opentelemetry.trace import SpanKind, Status, StatusCode

__all__ = ["create_app", "setup_tracing", "main"]

log = logging.getLogger("demo_app")

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id int PRIMARY KEY,
    name text NOT NULL,
    orders_placed int NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY,
    user_id int NOT NULL REFERENCES users,
    total numeric(12, 2) NOT NULL,
    placed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO users (id, name) SELECT g, 'user ' || g FROM generate_series(1, 1000) g
ON CONFLICT DO NOTHING;
"""

# Fails inside the executor (division by zero, SQLSTATE 22012), after parse and
# plan succeeded: the trace shows which phase broke.
# LEFT JOIN so there are groups to evaluate even before the first order.
REPORT_SQL = (
    "SELECT u.name, sum(o.total) / (count(*) - count(*)) AS spent_per_nothing "
    "FROM users u LEFT JOIN orders o ON o.user_id = u.id GROUP BY u.name"
)


def setup_tracing(service_name: str = "demo-app") -> TracerProvider:
    """A TracerProvider exporting over OTLP as the standard ``OTEL_*`` variables say.

    ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc`` picks the gRPC exporter, anything else
    OTLP/HTTP; ``OTEL_TRACES_EXPORTER=none`` records nothing (handy without a
    collector).
    """
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "none":
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
        if protocol.strip() == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        # The exporters read the endpoint, headers and timeout variables themselves.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        text=json.dumps(data, default=lambda v: str(v) if isinstance(v, Decimal) else v))


@web.middleware
async def _server_span(request: web.Request, handler) -> web.StreamResponse:
    """One SERVER span per request, named by its route template as HTTP semconv asks."""
    tracer: trace.Tracer = request.app["tracer"]
    info = request.match_info.route.resource
    route = info.canonical if info is not None else request.path
    attrs = {HTTP_REQUEST_METHOD: request.method, URL_PATH: request.path,
             URL_SCHEME: request.scheme, HTTP_ROUTE: route}
    parent = propagate.extract(request.headers)
    with tracer.start_as_current_span(f"{request.method} {route}", context=parent,
                                      kind=SpanKind.SERVER, attributes=attrs,
                                      record_exception=False, set_status_on_exception=False) as span:
        error_type = None
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        except psycopg.Error as exc:
            span.record_exception(exc)
            error_type = exc.sqlstate or type(exc).__qualname__
            response = _json({"error": str(exc).strip(), "sqlstate": exc.sqlstate}, 500)
        span.set_attribute(HTTP_RESPONSE_STATUS_CODE, response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute(ERROR_TYPE, error_type or str(response.status))
        if isinstance(response, web.HTTPException):
            raise response
        return response


async def _connect(app: web.Application) -> psycopg.AsyncConnection:
    # A connection per request keeps the demo obvious; a real service uses a pool.
    return await psycopg.AsyncConnection.connect(app["dsn"], application_name="demo-app")


async def get_user(request: web.Request) -> web.Response:
    try:
        user_id = int(request.match_info["id"])
    except ValueError:
        raise web.HTTPBadRequest(text="user id must be a number\n")
    async with await _connect(request.app) as conn:
        cur = await conn.execute(
            "SELECT id, name, orders_placed FROM users WHERE id = %s", (user_id,))
        row = await cur.fetchone()
    if row is None:
        raise web.HTTPNotFound(text=f"no user {user_id}\n")
    return _json({"id": row[0], "name": row[1], "orders_placed": row[2]})


async def place_order(request: web.Request) -> web.Response:
    body = await request.json() if request.can_read_body else {}
    user_id = int(body.get("user_id", 42))
    total = Decimal(str(body.get("total", "19.90")))
    async with await _connect(request.app) as conn:
        async with conn.transaction():
            cur = await conn.execute(
                "INSERT INTO orders (user_id, total) VALUES (%s, %s) RETURNING id", (user_id, total))
            (order_id,) = await cur.fetchone()  # type: ignore[misc]
            await conn.execute(
                "UPDATE users SET orders_placed = orders_placed + 1 WHERE id = %s", (user_id,))
    return _json({"id": order_id, "user_id": user_id, "total": total}, 201)


async def report(request: web.Request) -> web.Response:
    async with await _connect(request.app) as conn:
        cur = await conn.execute(REPORT_SQL)
        rows = await cur.fetchall()
    return _json([{"name": n, "spent_per_nothing": s} for n, s in rows])


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _init_schema(app: web.Application) -> None:
    # In compose the database may still be starting; keep trying for a while.
    deadline = asyncio.get_running_loop().time() + float(os.environ.get("DB_WAIT_SECONDS", "60"))
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(app["dsn"], autocommit=True,
                                                             application_name="demo-app") as conn:
                await conn.execute(SCHEMA)
            return
        except psycopg.OperationalError as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.info("database not reachable yet (%s); retrying", str(exc).strip())
            await asyncio.sleep(1)


def create_app(dsn: str, tracer_provider: TracerProvider) -> web.Application:
    """The aiohttp application; psycopg must already be instrumented (see :func:`main`)."""
    app = web.Application(middlewares=[_server_span])
    app["dsn"] = dsn
    app["tracer"] = tracer_provider.get_tracer("demo_app")
    app.router.add_get("/users/{id}", get_user)
    app.router.add_post("/orders", place_order)
    app.router.add_get("/report", report)
    app.router.add_get("/healthz", healthz)
    app.on_startup.append(_init_schema)
    return app


async def _serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
    # Parsed by tests/test_demo_app.py when PORT=0; keep the format.
    print(f"demo app listening on http://{bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dsn = os.environ.get("DATABASE_URL")
    if not dsn:
        print("demo app: set DATABASE_URL to a DSN pointing at pgotel-proxy, e.g. "
              "'host=127.0.0.1 port=6432 user=postgres dbname=postgres'", file=sys.stderr)
        return 2
    provider = setup_tracing()
    trace.set_tracer_provider(provider)
    # enable_commenter: every statement carries /*traceparent='00-...'*/ for the proxy.
    PsycopgInstrumentor().instrument(tracer_provider=provider, enable_commenter=True,
                                     skip_dep_check=True)
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8080"))
    try:
        asyncio.run(_serve(create_app(dsn, provider), host, port))
    finally:
        provider.shutdown()  # flushes the last batch
    return 0


if __name__ == "__main__":
    sys.exit(main())
