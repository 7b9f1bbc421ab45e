"""Statement records → spans → OTLP, off the relay path."""

from __future__ import annotations

from typing import Any

__all__ = ["build_tracer"]


def build_tracer(config: Any, exporter: Any = None, *, in_process: bool = False):
    """The tracer for ``config``; None when tracing is off at start-up (the relay alone).

    ``exporter`` overrides the exporter the config names (embedding, tests);
    spans are then built on a thread of this process, as they are with
    ``in_process`` (the caller attaches server-side enrichment, which joins
    into the spans where they are built), the console exporter or
    ``span_process = false``; otherwise (the OTLP exporter, or none) in a
    helper process (:mod:`pgotel_proxy.tracing.process`).
    """
    if not getattr(config, "tracing", True):
        return None
    # exporter = "none" goes the same way as "otlp": spans are built as they would be
    # for a collector (and counted), then discarded, at the cost of tracing minus export.
    if exporter is None and not in_process and getattr(config, "span_process", False) \
            and getattr(config, "exporter", "otlp") in ("otlp", "none"):
        from .process import ProcessTracer

        return ProcessTracer(config)
    from .tracer import Tracer

    return Tracer.from_config(config, exporter=exporter)
