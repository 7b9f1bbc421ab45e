"""The proxy's configuration: one pydantic model and everything derived from it.

:class:`Config` is the single source of truth for every setting.  The CLI
flags (``pgotel_proxy.cli``), the ``PGOTEL_*`` environment variables, the
TOML config file and the configuration reference in the docs are all
generated from its fields, so none of them can drift from the others.

Precedence, highest first: command-line flags, environment variables, the
config file, the defaults declared here.

Conventions every derived surface follows:

* environment variable = ``PGOTEL_`` + field name upper-cased
  (``upstream_tls`` -> ``PGOTEL_UPSTREAM_TLS``);
* flag = ``--`` + field name with ``_`` -> ``-``; booleans get ``--x/--no-x``;
  list options are repeatable and also accept comma-separated values;
* TOML keys are the field names, at the top level of the file;
* an empty string for an optional setting means "unset".

:data:`OPTIONS` lists every option name.

Run ``python -m pgotel_proxy.config`` to print the Markdown reference.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from pgotel_proxy.hostport import parse_hostport

__all__ = [
    "ENV_PREFIX",
    "CONFIG_ENV",
    "GROUPS",
    "OPTIONS",
    "Config",
    "ConfigError",
    "load_config",
    "load_config_with_sources",
    "parse_hostport",
    "option_value",
    "env_name",
    "flag_name",
    "field_description",
    "field_group",
    "field_choices",
    "field_metavar",
    "is_bool_field",
    "is_list_field",
    "is_secret_field",
    "default_text",
    "dump_toml",
    "reference_markdown",
]

ENV_PREFIX = "PGOTEL_"
#: Environment variable naming the TOML config file (same as ``--config``).
CONFIG_ENV = "PGOTEL_CONFIG"

GROUPS: tuple[str, ...] = (
    "Network",
    "TLS",
    "Limits",
    "Tracing",
    "Export",
    "Admin",
    "Server-side enrichment",
    "WAL propagation",
    "Logging",
)

# sun_path in struct sockaddr_un is 108 bytes on Linux, one of them the NUL.
_UNIX_PATH_MAX = 107
_MIB = 1024 * 1024


class ConfigError(Exception):
    """A configuration problem, as one line: ``<field>: <what is wrong>``."""


def _opt(default: Any = None, *, group: str, description: str, metavar: str | None = None,
         **constraints: Any) -> Any:
    extra: dict[str, Any] = {"group": group}
    if metavar:
        extra["metavar"] = metavar
    if isinstance(default, list):
        return Field(default_factory=lambda: list(default), description=description,
                     json_schema_extra=extra, **constraints)
    return Field(default, description=description, json_schema_extra=extra, **constraints)


TLSMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]


# Spans per export request unless set. The OpenTelemetry SDK's batch processor
# sends 512 (an in-application default); a proxy exporting for a whole
# database sends more, and each request costs a fixed 0.4-0.7 ms of CPU
# (bench, 8 clients: 8192 instead of 2048 took about 1 us of export CPU off
# each traced statement). 8192 is also the Collector's batch processor
# default; a batch whose request would pass 4 MB goes in parts
# (otlp.MAX_REQUEST_BYTES), under the 4 MiB gRPC receivers accept.
DEFAULT_EXPORT_BATCH = 8192


class Config(BaseModel):
    """Every setting of the proxy.  Immutable; build it with :func:`load_config`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- Network -------------------------------------------------------------
    listen: str = _opt(
        "127.0.0.1:6432", group="Network", metavar="HOST:PORT",
        description="Address to accept PostgreSQL clients on, as host:port "
                    "(IPv6 in brackets: [::1]:6432). Port 0 picks a free port.")
    unix_socket: str | None = _opt(
        None, group="Network", metavar="PATH",
        description="Also accept clients on this Unix socket file, for example "
                    "/var/run/pgotel/.s.PGSQL.6432 (psql -h /var/run/pgotel -p 6432).")
    upstream: str = _opt(
        "127.0.0.1:5432", group="Network", metavar="HOST:PORT|PATH",
        description="PostgreSQL server to relay to: host:port, or the absolute path of "
                    "its Unix socket file, for example /var/run/postgresql/.s.PGSQL.5432.")
    connect_timeout: float = _opt(
        5.0, group="Network", metavar="SECONDS", gt=0, allow_inf_nan=False,
        description="Seconds to wait for the connection to the upstream server.")

    # -- TLS -----------------------------------------------------------------
    upstream_tls: TLSMode = _opt(
        "prefer", group="TLS",
        description="TLS towards the upstream server, as libpq's sslmode: 'prefer' tries TLS "
                    "and falls back to plain text, 'require' insists on TLS without checking "
                    "the certificate, 'verify-ca' checks the chain, 'verify-full' also the name. "
                    "verify-* without upstream_tls_ca use the system trust store.")
    upstream_tls_ca: Path | None = _opt(
        None, group="TLS", metavar="FILE",
        description="PEM file of CA certificates that upstream certificates must chain to "
                    "(verify-ca, verify-full). Unset: the system trust store.")
    upstream_tls_server_name: str | None = _opt(
        None, group="TLS", metavar="NAME",
        description="Name sent as SNI and checked against the upstream certificate with "
                    "verify-full. Unset: the host part of upstream.")
    upstream_tls_cert: Path | None = _opt(
        None, group="TLS", metavar="FILE",
        description="PEM client certificate presented to the upstream server; needs "
                    "upstream_tls_key.")
    upstream_tls_key: Path | None = _opt(
        None, group="TLS", metavar="FILE",
        description="PEM private key of upstream_tls_cert.")
    client_tls_cert: Path | None = _opt(
        None, group="TLS", metavar="FILE",
        description="PEM certificate (chain) the proxy presents to clients. With "
                    "client_tls_key the proxy terminates client TLS; without, it answers "
                    "'N' to SSLRequest and clients continue in plain text.")
    client_tls_key: Path | None = _opt(
        None, group="TLS", metavar="FILE",
        description="PEM private key of client_tls_cert.")
    client_tls_min_version: Literal["TLSv1.2", "TLSv1.3"] = _opt(
        "TLSv1.2", group="TLS",
        description="Oldest TLS version accepted from clients.")

    # -- Limits --------------------------------------------------------------
    drain_timeout: float = _opt(
        30.0, group="Limits", metavar="SECONDS", ge=0, allow_inf_nan=False,
        description="On shutdown, seconds to let open sessions finish before they are closed.")
    max_connections: int = _opt(
        10000, group="Limits", metavar="N", ge=1,
        description="Client connections served at the same time; further ones are refused.")
    max_message_size: int = _opt(
        256 * _MIB, group="Limits", metavar="BYTES", ge=1024, le=1024 * _MIB,
        description="Largest protocol message accepted from a client; a bigger one ends the "
                    "session with SQLSTATE 08P01 (protocol_violation).")
    max_startup_packet: int = _opt(
        10000, group="Limits", metavar="BYTES", ge=8, le=_MIB,
        description="Largest startup packet accepted from a client (PostgreSQL's own limit "
                    "is 10000).")
    workers: int = _opt(
        1, group="Limits", metavar="N", ge=1, le=1024,
        description="Worker processes sharing the listening sockets.")

    # -- Tracing -------------------------------------------------------------
    tracing: bool = _opt(
        True, group="Tracing",
        description="Turn statements into spans. Off: the proxy only relays bytes.")
    sample_rate: float = _opt(
        1.0, group="Tracing", metavar="RATIO", ge=0.0, le=1.0, allow_inf_nan=False,
        description="Fraction of new traces recorded, from 0 to 1.")
    phase_timing: Literal["wire", "flush"] = _opt(
        "wire", group="Tracing",
        description="How the parse, plan and execute spans are timed. 'wire': each phase ends when "
                    "its answer passes the proxy; when a driver sends Parse, Bind and Execute "
                    "together before one Sync, the server answers them together, and those phases "
                    "share one span (parse+plan+execute): no span claims a boundary the wire did not "
                    "show. 'flush': the proxy adds a Flush message after each Parse, Bind and Execute "
                    "that no Flush or Sync follows, so the server sends each answer at once and "
                    "phases whose answers arrive apart get a span each. Finer, and dearer: one more server write (and network "
                    "packet) per phase, and every session, traced or not, stays on the event loop "
                    "with its client messages read by the Python loop instead of the compiled "
                    "ones. The client receives the same bytes either way.")
    phase_split_threshold: float = _opt(
        0.005, group="Tracing", metavar="SECONDS", ge=0.0, allow_inf_nan=False,
        description="Adaptive phase splitting, for sessions the compiled relay observes with "
                    "phase_timing 'wire': when the moving average of a query text's shape "
                    "(comments left out; each execution weighs an eighth) reaches this long, the "
                    "shape is slow until an execution brings it below (or for a minute), and the relay adds a "
                    "Flush after each Parse, Bind and Execute of the batches that parse that shape "
                    "(or bind a statement prepared in such a batch), so their parse, plan and "
                    "execute spans show observed boundaries. Fast statements are left alone. The "
                    "client receives the same bytes either way. 0 turns it off.")
    transaction_spans: bool = _opt(
        False, group="Tracing",
        description="Group the statements of an explicit transaction under one span.")
    capture_parameters: bool = _opt(
        False, group="Tracing",
        description="Record bind parameter values on spans. Off by default: they may hold "
                    "personal data.")
    capture_query_literals: bool = _opt(
        False, group="Tracing",
        description="Keep literals in the recorded query text. Off by default: literals are "
                    "replaced by placeholders, as they may hold personal data.")
    always_trace_errors: bool = _opt(
        True, group="Tracing",
        description="Trace a statement that fails even when the sample rate or an unsampled parent (a "
                    "traceparent whose sampled flag is off) leaves it out: as a new root span, linked to the "
                    "parent's context when there is one (never a child in a trace the application did not "
                    "sample), with pgotel.kept_because = 'error'. At most always_trace_rate a second.")
    always_trace_slower_than: float = _opt(
        0.0, group="Tracing", metavar="SECONDS", ge=0.0, allow_inf_nan=False,
        description="Trace a statement that runs at least this long (from its first message to its answer, as "
                    "the proxy sees them) even when the sample rate or an unsampled parent leaves it out, as "
                    "always_trace_errors does failed ones (pgotel.kept_because = 'slow'). 0: off, since what "
                    "is slow depends on the workload.")
    always_trace_rate: float = _opt(
        100.0, group="Tracing", metavar="PER_SECOND", ge=0.0, allow_inf_nan=False,
        description="Most statements a second (a token bucket, per span process) that always_trace_errors and "
                    "always_trace_slower_than trace; those beyond are counted in "
                    "pgotel_statements_kept_over_rate_total. 0: none.")
    latency_histograms: bool = _opt(
        True, group="Tracing",
        description="Keep a latency histogram per statement shape (db.client.operation.duration, by "
                    "db.query.summary, db.operation.name, db.namespace and error.type) over every statement, "
                    "sampled or not, with exemplars of sampled ones; exported as OTLP metrics to the spans' "
                    "endpoint and on the admin /metrics. On, the relay hands every statement to the span "
                    "process, also those a sample rate below 1 does not trace.")
    latency_histogram_series: int = _opt(
        200, group="Tracing", metavar="N", ge=1, le=100_000,
        description="Most latency histogram series (shape, operation, database, error type), in the order they "
                    "first occur; statements of any other go to one series whose db.query.summary is 'other' "
                    "(counted in pgotel_latency_series_overflow_total).")
    latency_histogram_interval: float = _opt(
        10.0, group="Tracing", metavar="SECONDS", gt=0.0, le=3600.0, allow_inf_nan=False,
        description="Seconds between OTLP exports of the latency histograms.")
    # -- Export --------------------------------------------------------------
    exporter: Literal["otlp", "console", "none"] = _opt(
        "otlp", group="Export",
        description="Where spans go: an OTLP collector, stdout ('console'), or nowhere.")
    otlp_endpoint: str | None = _opt(
        None, group="Export", metavar="URL",
        description="Base URL of the OTLP collector, e.g. http://localhost:4318. Unset: the "
                    "standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variables apply.")
    otlp_protocol: Literal["http/protobuf", "grpc"] | None = _opt(
        None, group="Export",
        description="OTLP transport. Unset: OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf.")
    service_name: str | None = _opt(
        None, group="Export", metavar="NAME",
        description="service.name of the spans. Unset: OTEL_SERVICE_NAME, else pgotel-proxy.")
    span_process_priority: Literal["idle", "low", "normal"] = _opt(
        "idle", group="Export",
        description="CPU priority of the span process. idle (Linux SCHED_IDLE): it runs on CPU "
                    "time nobody else wants, so span work yields to queries; when it falls behind "
                    "(1 MiB of records waiting, or silent for a second) the proxy lifts it to an ordinary share until it has "
                    "caught up, where it may (CAP_SYS_NICE, as root); elsewhere idle means low. "
                    "low: SCHED_BATCH at nice 10, a small share it keeps on a busy machine. "
                    "normal: an ordinary share.")
    span_queue_size: int = _opt(
        32768, group="Export", metavar="N", ge=1,
        description="Spans buffered for export (four default batches); when full, new spans are "
                    "dropped (and counted).")
    export_batch_size: int = _opt(
        DEFAULT_EXPORT_BATCH, group="Export", metavar="N", ge=1,
        description="Most spans sent in one export request; at most span_queue_size (when not "
                    "set, the smaller of 8192 and span_queue_size). Each request has a fixed cost "
                    "(about 0.4-0.7 ms of CPU over HTTP): larger batches cost less per span.")
    export_interval: float = _opt(
        1.0, group="Export", metavar="SECONDS", gt=0, allow_inf_nan=False,
        description="Seconds between exports of buffered spans.")
    export_timeout: float = _opt(
        10.0, group="Export", metavar="SECONDS", gt=0, allow_inf_nan=False,
        description="Seconds one export request may take.")
    shutdown_timeout: float = _opt(
        5.0, group="Export", metavar="SECONDS", ge=0, allow_inf_nan=False,
        description="On shutdown, seconds allowed to flush the spans still buffered.")

    # -- Admin ---------------------------------------------------------------
    admin_listen: str | None = _opt(
        "127.0.0.1:9187", group="Admin", metavar="HOST:PORT",
        description="host:port of the HTTP admin endpoint (metrics, health). Empty disables it.")
    admin_token: SecretStr | None = _opt(
        None, group="Admin", metavar="TOKEN",
        description="Bearer token the admin endpoint requires. Prefer the environment "
                    "variable: flags show up in process listings.")

    # -- Server-side enrichment ----------------------------------------------
    server_log: Path | None = _opt(
        None, group="Server-side enrichment", metavar="FILE",
        description="PostgreSQL server log to follow for auto_explain plans: a log file, or the "
                    "log directory (the newest file is followed across rotations). Plans become "
                    "plan-node spans under the statements that caused them. Unset: no plans.")
    server_log_format: Literal["jsonlog", "csvlog", "stderr"] = _opt(
        "jsonlog", group="Server-side enrichment",
        description="log_destination format of server_log.")
    server_log_line_prefix: str = _opt(
        "%m [%p] ", group="Server-side enrichment", metavar="PREFIX",
        description="The server's log_line_prefix, needed to parse the 'stderr' format.")
    server_log_via_sql: bool = _opt(
        False, group="Server-side enrichment",
        description="Read the server log over SQL (pg_current_logfile and pg_read_binary_file on "
                    "stats_dsn; the role needs pg_read_server_files and pg_monitor) instead of from "
                    "the local file system.")
    stats_dsn: SecretStr | None = _opt(
        None, group="Server-side enrichment", metavar="DSN",
        description="Connection string of a monitoring session that polls pg_stat_statements, "
                    "samples wait events from pg_stat_activity (and reads the log with "
                    "server_log_via_sql). Least privilege: a role in pg_read_all_stats. "
                    "Unset: no server queries.")
    stats_interval: float = _opt(
        10.0, group="Server-side enrichment", metavar="SECONDS", gt=0, allow_inf_nan=False,
        description="Seconds between polls of pg_stat_statements; a span gets the figures of "
                    "the latest window in which its query ran.")
    wait_event_threshold: float = _opt(
        1.0, group="Server-side enrichment", metavar="SECONDS", ge=0, allow_inf_nan=False,
        description="Statements running longer than this get their wait events sampled.")
    join_timeout: float = _opt(
        2.0, group="Server-side enrichment", metavar="SECONDS", ge=0, allow_inf_nan=False,
        description="Seconds a statement's spans may wait for its plan (auto_explain or EXPLAIN) "
                    "before they are exported without it (counted), and a lock-waiting statement "
                    "for its blocker's statement span.")
    enrich_sources: list[Literal["auto_explain", "pg_stat_statements", "wait_events", "explain"]] = _opt(
        ["auto_explain", "pg_stat_statements", "wait_events", "explain"], group="Server-side enrichment",
        metavar="SOURCE",
        description="Server-side sources used when their settings allow: auto_explain (needs "
                    "server_log or server_log_via_sql), pg_stat_statements and wait_events (need "
                    "stats_dsn), explain (needs stats_dsn; used only where the auto_explain source is "
                    "not: left out, no server log configured, or the log unreadable). Leave one out "
                    "to switch it off (repeatable; comma-separated in the environment).")
    explain_min_duration: float = _opt(
        1.0, group="Server-side enrichment", metavar="SECONDS", ge=0, allow_inf_nan=False,
        description="explain source: statements running at least this long get their shape's "
                    "estimated plan, from EXPLAIN (FORMAT JSON) on the stats_dsn connection (never "
                    "ANALYZE; GENERIC_PLAN for $n parameters on PostgreSQL 16+, before 16 only with "
                    "capture_parameters).")
    explain_rate: float = _opt(
        2.0, group="Server-side enrichment", metavar="PER_SECOND", gt=0, allow_inf_nan=False,
        description="explain source: most EXPLAINs started per second; statements of shapes "
                    "refused leave without a plan (counted).")
    explain_cache_ttl: float = _opt(
        300.0, group="Server-side enrichment", metavar="SECONDS", ge=0, allow_inf_nan=False,
        description="explain source: seconds a shape's plan is reused before it is explained "
                    "again (a new plan that differs yields a 'plan changed' span event).")

    # -- WAL propagation -----------------------------------------------------
    wal_propagation: bool = _opt(
        False, group="WAL propagation",
        description="Write the trace context into the WAL of traced write transactions "
                    "(pg_logical_emit_message) so change-data-capture consumers can continue "
                    "the trace.")
    wal_message_prefix: str = _opt(
        "otelwal", group="WAL propagation", metavar="PREFIX", min_length=1,
        description="Prefix of those logical decoding messages.")
    wal_writing_functions: list[str] = _opt(
        [], group="WAL propagation", metavar="NAME",
        description="Functions whose calls count as writes for WAL propagation (repeatable; "
                    "comma-separated in the environment).")

    # -- Logging -------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = _opt(
        "info", group="Logging",
        description="Least severe log messages written.")
    log_format: Literal["text", "json"] = _opt(
        "text", group="Logging",
        description="Log lines on stderr as text or as JSON objects, one per line.")

    # -- validation ----------------------------------------------------------

    @field_validator("*", mode="before")
    @classmethod
    def _normalise_raw(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        return _normalise(info.field_name, value)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_hostport(value)
        return value.strip()

    @field_validator("admin_listen")
    @classmethod
    def _check_admin_listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parse_hostport(value)
        return value.strip()

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("/"):
            _check_unix_path(value)
            if os.path.isdir(value):
                raise ValueError(
                    f"{value} is a directory; give the socket file inside it, "
                    f"e.g. {value.rstrip('/')}/.s.PGSQL.5432")
            return value
        if "/" in value:
            raise ValueError(f"{value!r} is neither host:port nor an absolute socket path")
        _, port = parse_hostport(value)
        if port == 0:
            raise ValueError("port 0 is not a server port")
        return value

    @field_validator("unix_socket")
    @classmethod
    def _check_unix_socket(cls, value: str | None) -> str | None:
        if value is not None:
            _check_unix_path(value)
        return value

    @field_validator("upstream_tls_ca", "upstream_tls_cert", "upstream_tls_key",
                     "client_tls_cert", "client_tls_key")
    @classmethod
    def _check_readable_file(cls, value: Path | None) -> Path | None:
        # Checked now so that check-config catches a typo instead of the first handshake.
        if value is None:
            return None
        value = value.expanduser()
        if not value.exists():
            raise ValueError(f"no such file: {value}")
        if not value.is_file():
            raise ValueError(f"not a regular file: {value}")
        if not os.access(value, os.R_OK):
            raise ValueError(f"not readable: {value}")
        return value

    @field_validator("server_log")
    @classmethod
    def _expand_server_log(cls, value: Path | None) -> Path | None:
        # Not required to exist: the server may create or rotate it later.
        return None if value is None else value.expanduser()

    @field_validator("otlp_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value

    @field_validator("service_name", "upstream_tls_server_name", "wal_message_prefix")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        return None if value is None else value.strip() or None

    @model_validator(mode="before")
    @classmethod
    def _default_batch_within_queue(cls, data: Any) -> Any:
        """Without an export_batch_size of its own, a span queue smaller than the default batch sets it."""
        if isinstance(data, dict) and data.get("export_batch_size") is None:
            queue = data.get("span_queue_size")
            if isinstance(queue, str):  # from the environment
                queue = int(queue.strip()) if queue.strip().isdigit() else None
            if isinstance(queue, int) and not isinstance(queue, bool) and 1 <= queue < DEFAULT_EXPORT_BATCH:
                data = {**data, "export_batch_size": queue}
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        # Model-level messages start with the field to blame; ConfigError keeps that.
        for cert, key in (("client_tls_cert", "client_tls_key"),
                          ("upstream_tls_cert", "upstream_tls_key")):
            has_cert, has_key = getattr(self, cert) is not None, getattr(self, key) is not None
            if has_cert and not has_key:
                raise ValueError(f"{key}: required when {cert} is set")
            if has_key and not has_cert:
                raise ValueError(f"{cert}: required when {key} is set")
        if self.upstream_tls == "disable":
            for name in ("upstream_tls_ca", "upstream_tls_cert", "upstream_tls_server_name"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: set, but upstream_tls is 'disable'")
        if self.upstream_unix_path is not None and self.upstream_tls not in ("disable", "prefer"):
            raise ValueError(
                f"upstream_tls: {self.upstream_tls!r} cannot work over a Unix socket "
                "(PostgreSQL offers no TLS there); use 'disable' or 'prefer'")
        if self.export_batch_size > self.span_queue_size:
            raise ValueError(
                f"export_batch_size: {self.export_batch_size} exceeds span_queue_size "
                f"({self.span_queue_size})")
        if self.server_log_via_sql and self.stats_dsn is None:
            raise ValueError("stats_dsn: required when server_log_via_sql is on")
        if self.wal_message_prefix is None:
            raise ValueError("wal_message_prefix: must not be empty")
        return self

    # -- derived values ------------------------------------------------------

    @property
    def listen_address(self) -> tuple[str, int]:
        """``listen`` as (host, port); IPv6 hosts without brackets."""
        return parse_hostport(self.listen)

    @property
    def upstream_unix_path(self) -> str | None:
        """The upstream socket file, or None when upstream is host:port."""
        return self.upstream if self.upstream.startswith("/") else None

    @property
    def upstream_address(self) -> tuple[str, int] | None:
        """``upstream`` as (host, port), or None when it is a Unix socket."""
        return None if self.upstream_unix_path else parse_hostport(self.upstream)

    @property
    def upstream_server_name(self) -> str | None:
        """Name to send as SNI and verify: the explicit one, else the upstream host."""
        if self.upstream_tls_server_name:
            return self.upstream_tls_server_name
        address = self.upstream_address
        return address[0] if address else None

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """``admin_listen`` as (host, port), or None when the admin endpoint is off."""
        return parse_hostport(self.admin_listen) if self.admin_listen else None

    @property
    def client_tls_enabled(self) -> bool:
        """Whether the proxy terminates TLS from clients."""
        return self.client_tls_cert is not None and self.client_tls_key is not None

    def resolved_service_name(self, env: Mapping[str, str] = os.environ) -> str:
        """service_name, else OTEL_SERVICE_NAME, else ``pgotel-proxy``."""
        return self.service_name or env.get("OTEL_SERVICE_NAME", "").strip() or "pgotel-proxy"

    def resolved_otlp_protocol(self, env: Mapping[str, str] = os.environ) -> str:
        """otlp_protocol, else the OTEL_EXPORTER_OTLP_*PROTOCOL variables, else http/protobuf."""
        if self.otlp_protocol:
            return self.otlp_protocol
        for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            if env.get(var, "").strip():
                return env[var].strip()
        return "http/protobuf"


#: Every option by name: the fields of :class:`Config`. The flags, variables,
#: file keys and the reference are generated from this list.
OPTIONS: tuple[str, ...] = tuple(Config.model_fields)


def _normalise(name: str, value: Any) -> Any:
    """A raw value (environment, flag, file) in the shape the option's type expects."""
    if isinstance(value, str) and not value.strip() and _accepts_none(name):
        return None
    choices = field_choices(name)
    if choices and isinstance(value, str):
        # LOG_LEVEL=INFO and tlsv1.3 are obvious enough to accept.
        folded = {c.lower(): c for c in choices}
        return folded.get(value.strip().lower(), value)
    if is_list_field(name):
        # One shape for env ("a,b"), repeated flags (("a", "b,c")) and TOML lists.
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            out: list[Any] = []
            for item in items:
                if isinstance(item, str):
                    out.extend(p.strip() for p in item.split(",") if p.strip())
                else:
                    out.append(item)
            return out
    return value


# -- option metadata helpers ---------------------------------------------------

def _field(name: str) -> FieldInfo:
    """The pydantic field of an option."""
    return Config.model_fields[name]


def option_value(config: Config, name: str) -> Any:
    """The value of an option in ``config``."""
    return getattr(config, name)


def _annotation(name: str) -> Any:
    return _field(name).annotation


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _accepts_none(name: str) -> bool:
    return type(None) in _union_args(_annotation(name))


def _extra(name: str) -> dict[str, Any]:
    extra = _field(name).json_schema_extra
    return extra if isinstance(extra, dict) else {}


def env_name(name: str) -> str:
    """Environment variable of an option: ``PGOTEL_`` + the name upper-cased."""
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    """Command-line flag of an option (the positive form for booleans)."""
    return "--" + name.replace("_", "-")


def field_description(name: str) -> str:
    """What an option does, as the reference and ``--help`` say it."""
    return _field(name).description or ""


def field_group(name: str) -> str:
    """The help/reference section a field belongs to."""
    return str(_extra(name)["group"])


def field_choices(name: str) -> tuple[str, ...] | None:
    """Allowed values of a Literal field, else None."""
    for arg in _union_args(_annotation(name)):
        if typing.get_origin(arg) is Literal:
            return tuple(str(a) for a in typing.get_args(arg))
    return None


def field_metavar(name: str) -> str:
    """Placeholder for the value in help texts."""
    choices = field_choices(name)
    if choices:
        return "[" + "|".join(choices) + "]"
    return str(_extra(name).get("metavar") or "VALUE")


def is_bool_field(name: str) -> bool:
    return _annotation(name) is bool


def is_list_field(name: str) -> bool:
    return any(typing.get_origin(a) is list for a in _union_args(_annotation(name)))


def is_secret_field(name: str) -> bool:
    return SecretStr in _union_args(_annotation(name))


def default_text(name: str) -> str:
    """The default of a field as a short human-readable string."""
    value = _field(name).get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(value) if value else "none"
    if isinstance(value, int) and _extra(name).get("metavar") == "BYTES" and value % _MIB == 0:
        return f"{value} ({value // _MIB} MiB)"
    if isinstance(value, str) and (value != value.strip() or not value):
        return repr(value)
    return str(value)


def _check_unix_path(path: str) -> None:
    size = len(os.fsencode(path))
    if size > _UNIX_PATH_MAX:
        raise ValueError(
            f"socket path is {size} bytes; Unix socket paths are limited to {_UNIX_PATH_MAX}")


# -- loading -------------------------------------------------------------------

def _read_file(file: Path) -> dict[str, Any]:
    try:
        raw = Path(file).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"config: cannot read {file}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config: {file} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {file}: invalid TOML: {exc}") from None
    return _options(data, f" in {file}")


def _options(data: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Option name -> value from file keys or overrides, every name checked."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name not in OPTIONS:
            raise ConfigError(f"{name}: unknown option{where}{_suggest(name)}")
        out[name] = value
    return out


def _suggest(key: str) -> str:
    guess = difflib.get_close_matches(key.replace("-", "_").lower(), list(OPTIONS), n=1, cutoff=0.6)
    return f" (did you mean {guess[0]!r}?)" if guess else ""


def _describe(exc: ValidationError, sources: Mapping[str, str], values: Mapping[str, Any]) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    msg = str(first["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    loc = first["loc"]
    if loc:
        field = str(loc[0])
        text = f"{field}: {_lower_first(msg)}"
    else:
        text = msg
        field = msg.split(":", 1)[0]
    if field in sources:
        if loc and not is_secret_field(field):
            text += f" (got {_short(values[field])} from {sources[field]})"
        else:
            text += f" (from {sources[field]})"
    if len(errors) > 1:
        text += f" (+{len(errors) - 1} more)"
    return " ".join(text.split("\n"))


def _lower_first(msg: str) -> str:
    # pydantic says "Input should be ..."; after "field: " lower case reads better.
    return msg[:1].lower() + msg[1:] if msg[:2] != msg[:2].upper() else msg


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_config_with_sources(
    file: Path | str | None = None,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Any] = {},
    *,
    override_label: typing.Callable[[str], str] = lambda name: f"override {name}",
) -> tuple[Config, dict[str, str]]:
    """Like :func:`load_config`, also returning where each non-default value came from.

    The second item maps option names (:data:`OPTIONS`) to a label: the file
    name, the environment variable, or ``override_label(option)`` for overrides.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if file is None or str(file) == "":
        file = env.get(CONFIG_ENV, "").strip() or None
    if file is not None:
        for name, value in _read_file(Path(file)).items():
            values[name], sources[name] = value, str(file)
    for name in OPTIONS:
        var = env_name(name)
        if var in env:
            values[name], sources[name] = env[var], var
    for name, value in _options(overrides).items():
        values[name], sources[name] = value, override_label(name)
    try:
        config = Config.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources, values)) from None
    return config, sources


def load_config(
    file: Path | str | None = None,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Any] = {},
) -> Config:
    """Build the effective :class:`Config`: overrides > env > file > defaults.

    ``file`` is a TOML file with field names as top-level keys; when None,
    ``PGOTEL_CONFIG`` in ``env`` may name one.  ``env`` is searched for
    ``PGOTEL_<OPTION>`` variables; other variables are ignored.  ``overrides``
    maps option names to values (the CLI passes the flags given).  Raises
    :class:`ConfigError` with a one-line message on any problem.
    """
    return load_config_with_sources(file, env, overrides)[0]


# -- rendering -----------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return '"**********"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                         ("inf" if value > 0 else "-inf"))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def dump_toml(config: Config, sources: Mapping[str, str] | None = None) -> str:
    """The effective config as TOML text, secrets masked, unset options commented out.

    With ``sources`` each value set somewhere other than the defaults says where.
    """
    lines: list[str] = []
    for group in GROUPS:
        lines.append(f"# {group}")
        for name in OPTIONS:
            if field_group(name) != group:
                continue
            value = option_value(config, name)
            notes = []
            if value is not None and is_secret_field(name):
                notes.append("secret, masked")
            if sources and name in sources:
                notes.append(f"from {sources[name]}")
            if value is None and _field(name).default is not None:
                # Commenting it out would bring the default back; "" means unset.
                lines.append(f'{name} = ""  # unset' + (f"; {'; '.join(notes)}" if notes else ""))
            elif value is None:
                lines.append(f"# {name} is unset" + (f" ({'; '.join(notes)})" if notes else ""))
            else:
                note = f"  # {'; '.join(notes)}" if notes else ""
                lines.append(f"{name} = {_toml_value(value)}{note}")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """The configuration reference: one table per group, generated from :class:`Config`."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from pgotel_proxy/config.py by `python -m pgotel_proxy.config`;"
        " do not edit by hand. -->",
        "",
        "Every option can be given as a command-line flag, an environment variable or a key"
        " in the TOML config file (`--config FILE`, or `PGOTEL_CONFIG`). When an option is"
        " set in several places the flag wins over the environment, which wins over the"
        " file, which wins over the default. An empty value unsets an optional setting."
        " Boolean variables accept on/off, true/false, yes/no, 1/0; list variables are"
        " comma-separated. Relative paths are relative to the working directory.",
        "",
    ]
    for group in GROUPS:
        out += [f"## {group}", ""]
        out += ["| Option | Flag | Environment | Default | Description |",
                "|---|---|---|---|---|"]
        for name in OPTIONS:
            if field_group(name) != group:
                continue
            if is_bool_field(name):
                flag = f"`{flag_name(name)}` / `--no-{flag_name(name)[2:]}`"
            else:
                flag = f"`{flag_name(name)} {field_metavar(name)}`"
                if is_list_field(name):
                    flag += " (repeatable)"
            description = field_description(name)
            choices = field_choices(name)
            if choices:
                description += " One of " + ", ".join(f"`{c}`" for c in choices) + "."
            if is_secret_field(name):
                description += " Secret: never printed."
            out.append("| " + " | ".join(_md_cell(c) for c in (
                f"`{name}`", flag, f"`{env_name(name)}`", f"`{default_text(name)}`",
                description)) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown(), end="")
