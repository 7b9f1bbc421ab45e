"""Statement records → spans → OTLP, off the relay path."""

from __future__ import annotations

from typing import Any

__all__ = ["build_tracer"]


def build_tracer(config: Any, exporter: Any = None):
    """The tracer for ``config``; None when tracing is off at start-up (the relay alone).

    ``exporter`` overrides the exporter the config names (embedding, tests);
    spans are then built on a thread of this process, as they are with
    server-side enrichment, the console exporter or ``span_process = false``;
    otherwise in a helper process (:mod:`pgotel_proxy.tracing.process`).
    """
    if not getattr(config, "tracing", True):
        return None
    if exporter is None and getattr(config, "span_process", False) and getattr(config, "exporter", "otlp") == "otlp":
        from ..enrich import enabled as enrichment_enabled

        if not enrichment_enabled(config):
            from .process import ProcessTracer

            return ProcessTracer(config)
    from .tracer import Tracer

    return Tracer.from_config(config, exporter=exporter)
