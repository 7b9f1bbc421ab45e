"""The ``pgotel-proxy cdc`` command: consume a pgoutput slot and continue otelwal traces.

It needs none of the proxy's settings, so it declares its own few options.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import click
from pydantic import ValidationError

from pgotel_proxy.cli import configure_logging, main
from pgotel_proxy.config import Config

__all__ = ["cdc"]

log = logging.getLogger("pgotel_proxy.wal")


@main.command()
@click.option("--dsn", required=True, envvar="PGOTEL_CDC_DSN",
              help="Connection string (key=value or postgresql:// URL) of a role with REPLICATION. [env: PGOTEL_CDC_DSN]")
@click.option("--slot", required=True, help="Logical replication slot (pgoutput).")
@click.option("--publication", "publications", required=True, multiple=True,
              help="Publication to stream (repeatable).")
@click.option("--create-slot", is_flag=True, help="Create the slot if it does not exist.")
@click.option("--prefix", default="otelwal", show_default=True, help="Prefix of the logical messages carrying trace context.")
@click.option("--otlp-endpoint", default=None,
              help="OTLP endpoint for the spans; 'console' prints them; default: the OTEL_EXPORTER_OTLP_* environment.")
@click.option("--otlp-protocol", type=click.Choice(["http/protobuf", "grpc"]), default="http/protobuf", show_default=True)
@click.option("--service-name", default="pgotel-cdc", show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
def cdc(dsn: str, slot: str, publications: tuple[str, ...], create_slot: bool, prefix: str,
        otlp_endpoint: str | None, otlp_protocol: str, service_name: str, log_level: str) -> None:
    """Stream a logical replication slot; emit a CONSUMER span for each transaction that carried an otelwal message."""
    configure_logging(log_level)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from pgotel_proxy.tracing.export import make_exporter
    from pgotel_proxy.wal import CdcConsumer

    if otlp_endpoint and otlp_endpoint != "console" and "://" not in otlp_endpoint:
        # host:port, as gRPC endpoints are often written: plain text, as without a scheme before.
        otlp_endpoint = "http://" + otlp_endpoint
    try:
        export = Config(
            exporter="console" if otlp_endpoint == "console" else "otlp",
            otlp_endpoint=None if otlp_endpoint == "console" else otlp_endpoint,
            otlp_protocol=otlp_protocol,
        )
    except ValidationError as exc:
        raise click.BadParameter(str(exc.errors(include_url=False)[0]["msg"]).removeprefix("Value error, "),
                                param_hint="--otlp-endpoint") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(make_exporter(export)))
    consumer = CdcConsumer(dsn, slot, list(publications), create_slot=create_slot, prefix=prefix, tracer_provider=provider)

    async def _run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(consumer.run())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(consumer.stop()))
        await task

    code = 0
    try:
        asyncio.run(_run())
    except Exception as exc:  # noqa: BLE001 - one line for the operator, not a traceback
        log.error("cdc: %s", exc)
        code = 1
    finally:
        provider.shutdown()
        log.info("cdc: %s", consumer.stats)
    raise SystemExit(code)
