"""pgotel-proxy: an OpenTelemetry tracing proxy for PostgreSQL."""

__version__ = "0.1.0"
__all__ = ["__version__"]
