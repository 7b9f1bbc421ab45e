"""Shared pytest fixtures.

This module owns the session-wide fixtures every test module may use; it is
grouped by subject so each part of the suite can add its own section:

* TLS material (``certs``) from :mod:`certs`;
* PostgreSQL: ``pg_versions`` (every server build found) and ``pg`` (one
  running throwaway server, see :mod:`pgserver`);
* tiers: every test module's ``unit`` / ``component`` / ``clients`` marker,
  from the one table :data:`TIERS` (see tests/README.md).

The default major for ``pg`` is ``$PGOTEL_TEST_PG_MAJOR`` if set, else the
highest Debian-packaged one, else the highest found.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# gRPC's fork handlers run in every child this process forks (initdb, psql, the
# proxy under test) once a gRPC channel has lived here (the gRPC exporter tests);
# a child has been seen to crash in them before its exec. The tests fork, never to
# keep using gRPC in the child.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest
from hypothesis import settings as _hyp_settings

# In CI the property tests replay a fixed set of examples: a red build must come
# from a change, never from a newly drawn example. Locally they explore freely.
_hyp_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")

from certs import make_certs
from pgserver import PgServer, find_versions

__all__ = ["TIERS", "default_pg_major"]


# --------------------------------------------------------------------------
# Tiers

#: Every test module, by path under tests/, in exactly one tier:
#: ``unit``: no PostgreSQL and no sockets (codec, sqlcommenter, shapes, OTLP
#: encoding, config, CLI parsing ...); ``component``: the proxy, a real
#: PostgreSQL or the OTLP receiver, over real sockets; ``clients``: real
#: drivers and tools (psycopg, asyncpg, pg8000, psql, pgbench, an instrumented
#: app) through the proxy. A test of a module missing here fails: place it.
TIERS: dict[str, tuple[str, ...]] = {
    "unit": (
        "fuzz/test_fuzz.py",
        "test_cli.py",
        "test_config.py",
        "test_docs.py",
        "test_framing.py",
        "test_enrich_joiner.py",
        "test_enrich_locks.py",
        "test_enrich_sources.py",
        "test_hostport.py",
        "test_kinds.py",
        "test_otlp_compiled.py",
        "test_protocol_fuzz.py",
        "test_protocol_session.py",
        "test_records.py",
        "test_scan.py",
        "test_session_compiled.py",
        "test_shape.py",
        "test_span_encoding.py",
        "test_sqlcomment.py",
        "test_stats.py",
        "test_tiers.py",
        "test_tls_compiled.py",
    ),
    "component": (
        "test_always_trace.py",
        "test_background.py",
        "test_client_wire.py",
        "test_collector_interop.py",
        "test_deploy.py",
        "test_enrich_explain.py",
        "test_enrich_join.py",
        "test_enrich_logs.py",
        "test_export.py",
        "test_faults.py",
        "test_hostile.py",
        "test_latency_histograms.py",
        "test_layers.py",
        "test_lock_waits.py",
        "test_otlp_encoding.py",
        "test_otlp_receiver.py",
        "test_pgserver.py",
        "test_phase_split.py",
        "test_pump.py",
        "test_relay_paths.py",
        "test_resilience.py",
        "test_sampling.py",
        "test_security.py",
        "test_span_process.py",
        "test_sqlinfo.py",
        "test_tracing.py",
        "test_tracing_control.py",
        "test_tracing_cost.py",
        "test_tracing_tx.py",
        "test_transparency.py",
        "test_wal_consumer.py",
        "test_wal_emit.py",
        "test_workers.py",
    ),
    "clients": (
        "test_bench_smoke.py",
        "test_channels.py",
        "test_clients.py",
        "test_demo_app.py",
        "test_node_writers.py",
        "test_tls_auth.py",
        "test_versions.py",
    ),
}

_TESTS_DIR = Path(__file__).resolve().parent
_TIER_OF = {module: tier for tier, modules in TIERS.items() for module in modules}


def _module_path(item: pytest.Item) -> str:
    path = Path(item.fspath).resolve()
    return path.relative_to(_TESTS_DIR).as_posix() if path.is_relative_to(_TESTS_DIR) else str(path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = _TIER_OF.get(_module_path(item))
        # An unplaced module is selected by every tier's run, so that it fails in each.
        for marker in (tier,) if tier else TIERS:
            item.add_marker(marker)


def pytest_runtest_setup(item: pytest.Item) -> None:
    module = _module_path(item)
    if module not in _TIER_OF:
        pytest.fail(f"{module} is in no tier: add it to TIERS in tests/conftest.py", pytrace=False)


# --------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths of a throwaway CA and of server, proxy and client certificates."""
    return make_certs(tmp_path_factory.mktemp("certs"))


# --------------------------------------------------------------------------
# PostgreSQL


def default_pg_major(versions: dict[int, str]) -> int | None:
    """The major the ``pg`` fixture runs, or None when no server is installed."""
    wanted = os.environ.get("PGOTEL_TEST_PG_MAJOR")
    if wanted:
        return int(wanted)
    debian = [m for m, path in versions.items() if path.startswith("/usr/lib/postgresql/")]
    if debian:
        return max(debian)
    return max(versions) if versions else None


@pytest.fixture(scope="session")
def pg_versions() -> dict[int, str]:
    """``{major: bin_dir}`` for every usable PostgreSQL server build."""
    return find_versions()


@pytest.fixture(scope="session")
def pg(pg_versions: dict[int, str], certs: dict[str, str]) -> Iterator[PgServer]:
    """A running throwaway PostgreSQL server shared by the whole session.

    It uses the session CA, so one ``sslrootcert`` verifies both the server
    and the proxy. Tests may add objects but must not change server-wide
    settings; those that need to should start their own :class:`PgServer`.
    """
    major = default_pg_major(pg_versions)
    if major is None:
        pytest.skip("no PostgreSQL server installed (run .ci/install-postgres)")
    if major not in pg_versions:
        pytest.fail(
            f"PGOTEL_TEST_PG_MAJOR={major} but only {sorted(pg_versions)} are installed",
            pytrace=False,
        )
    server = PgServer(pg_versions[major], certs=certs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------
# OTLP receiver and proxy

from otlp_receiver import OtlpReceiver  # noqa: E402
from proxyctl import RunningProxy  # noqa: E402


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    """A fresh in-process OTLP receiver (HTTP and gRPC) per test."""
    receiver = OtlpReceiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture
def make_proxy(pg: PgServer, otlp: OtlpReceiver):
    """Factory: ``make_proxy(**config_overrides)`` starts a proxy in front of ``pg`` exporting to ``otlp``."""
    started: list[RunningProxy] = []

    def factory(**overrides) -> RunningProxy:
        overrides.setdefault("upstream", f"{pg.host}:{pg.port}")
        overrides.setdefault("otlp_endpoint", otlp.http_endpoint)
        proxy = RunningProxy(**overrides)
        proxy.start()
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()


@pytest.fixture
def app(otlp):
    """The application's own tracer: its CLIENT spans reach ``otlp`` beside the proxy's."""
    from tracetree import AppTracer

    tracer = AppTracer(otlp)
    yield tracer
    tracer.shutdown()


@pytest.fixture
def proxy(make_proxy) -> RunningProxy:
    """A proxy with the default configuration in front of ``pg``."""
    return make_proxy()
