"""Statement records → spans → OTLP, off the relay path."""

from __future__ import annotations

from typing import Any

__all__ = ["build_tracer"]


def build_tracer(config: Any, exporter: Any = None):
    """The tracer for ``config``; None when tracing is off at start-up (the relay alone).

    ``exporter`` overrides the exporter the config names (embedding, tests).
    """
    if not getattr(config, "tracing", True):
        return None
    from .tracer import Tracer

    return Tracer.from_config(config, exporter=exporter)
