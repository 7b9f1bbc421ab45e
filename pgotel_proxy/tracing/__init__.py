"""Statement records → spans → OTLP, off the relay path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["build_tracer"]


def build_tracer(config: Config, exporter: Any = None):
    """The tracer for ``config``; None when tracing is off at start-up (the relay alone).

    ``exporter`` overrides the exporter the config names (embedding, tests);
    spans are then built on a thread of this process, as they are with
    server-side enrichment, the console exporter or ``experimental.span_process = false``;
    otherwise (the OTLP exporter, or none) in a helper process
    (:mod:`pgotel_proxy.tracing.process`).
    """
    if not config.tracing:
        return None
    # exporter = "none" goes the same way as "otlp": spans are built as they would be
    # for a collector (and counted), then discarded, at the cost of tracing minus export.
    if exporter is None and config.experimental.span_process and config.exporter in ("otlp", "none"):
        from ..enrich import enabled as enrichment_enabled

        if not enrichment_enabled(config):
            from .process import ProcessTracer

            return ProcessTracer(config)
    from .tracer import Tracer

    return Tracer.from_config(config, exporter=exporter)
