"""Server-side truth joined into spans: auto_explain plans, pg_stat_statements windows, wait events.

All of it runs in the span process (:mod:`pgotel_proxy.tracing.process`):
:func:`start_enricher` opens the side connections and the log follower
there, and the span helper passes each statement's spans through
:meth:`~.enricher.Enricher.statement` and polls
:meth:`~.enricher.Enricher.tick`. The relay process only learns the sources'
status from the helper's reports (:func:`attach`, :func:`log_status`).
Nothing here runs on the relay path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

# The workers' shared session file (lock waits across workers): the parent of the
# workers (proxy/workers.py) creates it; standard library only.
from .sessionfile import SHARED_ENV, SharedSessions

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["SHARED_ENV", "SharedSessions", "attach", "enabled", "log_status", "start_enricher"]

log = logging.getLogger("pgotel_proxy.enrich")


def enabled(config: Config) -> bool:
    """Whether any server-side source is configured."""
    return config.server_log is not None or config.stats_dsn is not None


def attach(config: Config, server: Any, tracer: Any):
    """Show the span process's sources for ``server``; their status view, or None when nothing is configured.

    Sets ``server.source_status`` (shown by the admin ``/status``) to the
    per-source status dict the helper's reports keep up to date. The view's
    ``wait_ready(timeout)`` blocks until the helper's start-up probes are done.
    """
    if tracer is None or not enabled(config):
        return None
    server.source_status = tracer.sources.status
    return tracer.sources


def start_enricher(config: Any, helper: Any, backends: Callable[[], list[int]]):
    """Start enrichment in the span process and hook it into ``helper`` (a tracing.helper.SpanHelper).

    ``backends`` lists the backend pids of the proxy's open connections: the
    sessions whose wait events are sampled. The helper stops the enricher on
    shutdown.
    """
    from .enricher import Enricher

    enricher = Enricher(config, backends=backends, resource=helper.builder.resource)
    enricher.start()
    helper.enricher = enricher
    return enricher


def log_status(status: dict) -> None:
    """The start-up line that sums up the sources' status, once (a warning when one is unavailable)."""
    line = ", ".join(f"{k} {v}" for k, v in status.items())
    if any(v.startswith("unavailable") for v in status.values()):
        log.warning("server-side enrichment: %s", line)
    else:
        log.info("server-side enrichment: %s", line)
