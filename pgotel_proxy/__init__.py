"""pgotel-proxy: an OpenTelemetry tracing proxy for PostgreSQL."""

from .protocol import _impl  # noqa: F401  (first: PGOTEL_PURE_PYTHON decides how compiled modules load)

__version__ = "0.1.0"
__all__ = ["__version__"]
