"""Server-side truth joined into spans: auto_explain plans, pg_stat_statements windows, wait events.

The proxy wires it with :func:`attach` where it builds the tracer; the
tracer's builder thread passes each statement's spans through
:meth:`Enricher.statement` and polls :meth:`Enricher.tick`. Nothing here runs
on the relay path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["attach", "enabled"]


def enabled(config: Config) -> bool:
    """Whether any server-side source is configured."""
    return config.server_log is not None or config.stats_dsn is not None


def attach(config: Config, server: Any, tracer: Any):
    """Start enrichment for ``server`` and hook it into ``tracer``; None when nothing is configured.

    Sets ``server.source_status`` (shown by the admin ``/status``) to the live
    per-source status dict. The tracer stops the enricher on shutdown.
    """
    if tracer is None or not enabled(config):
        return None
    from .enricher import Enricher

    enricher = Enricher(config, server, resource=getattr(tracer.builder, "resource", None))
    server.source_status = enricher.status
    enricher.start()
    tracer.enricher = enricher
    return enricher
