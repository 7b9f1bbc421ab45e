"""Shared pytest fixtures.

This module owns the session-wide fixtures every test module may use; it is
grouped by subject so each part of the suite can add its own section:

* TLS material (``certs``) from :mod:`certs`;
* PostgreSQL: ``pg_versions`` (every server build found) and ``pg`` (one
  running throwaway server, see :mod:`pgserver`).

The default major for ``pg`` is ``$PGOTEL_TEST_PG_MAJOR`` if set, else the
highest Debian-packaged one, else the highest found.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

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

__all__ = ["default_pg_major"]


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
