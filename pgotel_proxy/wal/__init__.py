"""Trace context through the WAL.

Emission (the proxy side, :mod:`.emit`): inside traced write transactions the
proxy writes ``pg_logical_emit_message(true, 'otelwal', '{"traceparent": ...}')``.

Consumption (this package's API): :class:`CdcConsumer` streams a pgoutput slot
and continues those traces with CONSUMER spans; :func:`extract` turns an
otelwal message's content, as wal2json or Debezium deliver it, into an
OpenTelemetry Context for users of those tools. OpenTelemetry is imported only
when these names are first used, so the proxy's start-up does not pay for it.
"""

from __future__ import annotations

__all__ = ["CdcConsumer", "TransactionInfo", "extract", "extract_carrier", "WalInjector"]


def __getattr__(name: str):
    if name in ("CdcConsumer", "TransactionInfo"):
        from . import consumer

        return getattr(consumer, name)
    if name in ("extract", "extract_carrier"):
        from . import carrier

        return getattr(carrier, name)
    if name == "WalInjector":
        from .emit import WalInjector

        return WalInjector
    raise AttributeError(name)
