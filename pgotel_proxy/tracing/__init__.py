"""Statement records → spans → OTLP, off the relay path, in the span process."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["build_tracer"]


def build_tracer(config: Config):
    """The tracer for ``config``; None when tracing is off at start-up (the relay alone).

    Spans are built, enriched and exported in a helper process
    (:mod:`pgotel_proxy.tracing.process`), whatever the exporter: OTLP, the
    console tree (printed on the proxy's stdout, which the helper inherits)
    or none (spans built and counted, then discarded, at the cost of tracing
    minus export).
    """
    if not config.tracing:
        return None
    from .process import ProcessTracer

    return ProcessTracer(config)
