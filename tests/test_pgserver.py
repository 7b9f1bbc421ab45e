"""Tests of the throwaway PostgreSQL test server (tests/pgserver.py).

They check, against real servers, what the rest of the suite relies on:
every password method and TLS verification, the preloaded libraries and
logical WAL, the logs, restarts, and that every installed major starts.
"""

from __future__ import annotations

import json
import subprocess
import time

import psycopg
import pytest

from certs import make_certs
from pgserver import USERS, PgServer

SMOKE_MAJORS = range(13, 19)


def _alive(pid: int) -> bool:
    """True unless *pid* is gone or a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _one(dsn: str, sql: str):
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        return conn.execute(sql).fetchone()


def test_superuser_over_tcp_is_trusted(pg: PgServer) -> None:
    user, addr, port = _one(
        pg.dsn(sslmode="disable"),
        "SELECT current_user, inet_server_addr()::text, inet_server_port()",
    )
    assert (user, port) == ("postgres", pg.port)
    assert addr.startswith("127.0.0.1")


def test_superuser_over_unix_socket(pg: PgServer) -> None:
    assert _one(pg.dsn(host=str(pg.socket_dir)), "SELECT inet_server_addr() IS NULL") == (True,)


def test_scram_user_with_verify_full(pg: PgServer) -> None:
    row = _one(
        pg.dsn("scram_user", sslmode="verify-full", sslrootcert=pg.ca_path),
        "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    assert row == ("scram_user", True)


def test_verify_full_rejects_a_foreign_ca(pg: PgServer, tmp_path) -> None:
    other_ca = make_certs(tmp_path)["ca"]
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        _one(pg.dsn("scram_user", sslmode="verify-full", sslrootcert=other_ca), "SELECT 1")


@pytest.mark.parametrize("user", ["scram_user", "md5_user", "password_user"])
@pytest.mark.parametrize("sslmode", ["disable", "require"])
def test_password_users(pg: PgServer, user: str, sslmode: str) -> None:
    assert _one(pg.dsn(user, sslmode=sslmode), "SELECT current_user") == (user,)


@pytest.mark.parametrize("user", ["scram_user", "md5_user", "password_user"])
def test_password_users_need_their_password(pg: PgServer, user: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _one(pg.dsn(user, password="wrong", sslmode="disable"), "SELECT 1")


def test_stored_password_kinds(pg: PgServer) -> None:
    rows = dict(
        line.split("|")
        for line in pg.psql(
            "SELECT rolname, left(rolpassword, 3) FROM pg_authid WHERE rolname LIKE '%\\_user'"
        ).split()
    )
    assert rows["md5_user"] == "md5"
    assert rows["scram_user"] == "SCR"
    assert set(rows) == set(USERS)


def test_preload_and_wal_settings(pg: PgServer) -> None:
    with psycopg.connect(pg.dsn()) as conn:

        def show(name: str) -> str:
            return conn.execute(f"SHOW {name}").fetchone()[0]

        assert show("shared_preload_libraries") == "pg_stat_statements,auto_explain"
        assert show("wal_level") == "logical"
        assert show("ssl") == "on"
        assert show("password_encryption") == "scram-sha-256"
        assert int(show("max_connections")) == 300
        if pg.major >= 14:
            assert show("compute_query_id") == "on"


def test_pg_stat_statements_records_queries(pg: PgServer) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        assert conn.execute(
            "SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'"
        ).fetchone() == (1,)
        # A table of its own: pg_stat_statements keeps the text of the first query
        # with a given queryid, and column aliases are not part of the queryid, so
        # "SELECT 4242 AS marker" could be filed under another test's SELECT.
        conn.execute("CREATE TABLE IF NOT EXISTS pgserver_marker (x int)")
        conn.execute("SELECT x FROM pgserver_marker")
        calls = conn.execute(
            "SELECT sum(calls) FROM pg_stat_statements WHERE query LIKE '%FROM pgserver_marker%'"
        ).fetchone()[0]
    assert calls is not None and calls >= 1


def test_replication_user_can_open_a_replication_connection(pg: PgServer) -> None:
    dsn = pg.dsn("repl_user", replication="database")
    with psycopg.connect(dsn, autocommit=True) as conn:
        # IDENTIFY_SYSTEM only answers on a walsender connection.
        row = conn.execute("IDENTIFY_SYSTEM").fetchone()
    assert row[0].isdigit()


def test_auto_explain_writes_readable_logs(pg: PgServer) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("SELECT count(*) AS pgserver_log_marker FROM generate_series(1, 3)")
    files = pg.log_files()
    assert files, f"no log files in {pg.log_dir}"
    text = ""
    for _ in range(50):  # the logging collector writes asynchronously
        text = "".join(f.read_text(errors="replace") for f in pg.log_files())
        if "pgserver_log_marker" in text and "Plan" in text:
            break
        time.sleep(0.1)
    assert "pgserver_log_marker" in text and "Plan" in text
    if pg.major >= 15:
        line = next(line for line in text.splitlines() if "pgserver_log_marker" in line)
        assert "message" in json.loads(line)


def test_psql_helper_reports_errors(pg: PgServer) -> None:
    assert pg.psql("SELECT 40 + 2").strip() == "42"
    with pytest.raises(subprocess.CalledProcessError):
        pg.psql("SELECT * FROM no_such_table")


def test_server_cert_names_localhost(pg: PgServer) -> None:
    # verify-full via the name rather than the address, as the proxy will.
    dsn = pg.dsn("scram_user", host="localhost", sslmode="verify-full", sslrootcert=pg.ca_path)
    assert _one(dsn, "SELECT current_user") == ("scram_user",)


def test_restart_keeps_data_and_port() -> None:
    with PgServer(settings={"max_connections": 20}) as server:
        port = server.port
        server.psql("CREATE TABLE survivor (v int); INSERT INTO survivor VALUES (7)")
        started = server.psql("SELECT pg_postmaster_start_time()")
        server.restart()
        assert server.is_running()
        assert server.port == port
        assert server.psql("SELECT v FROM survivor").strip() == "7"
        assert server.psql("SELECT pg_postmaster_start_time()") != started
        assert server.psql("SHOW max_connections").strip() == "20"
        base = server.base_dir
    assert not base.exists()
    assert not server.is_running()


def test_stop_is_idempotent_and_cleans_up() -> None:
    server = PgServer().start()
    pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    base = server.base_dir
    server.stop()
    server.stop()
    assert not base.exists()
    assert not _alive(pid)


@pytest.mark.smoke
@pytest.mark.parametrize("major", SMOKE_MAJORS, ids=[f"pg{m}" for m in SMOKE_MAJORS])
def test_every_major_starts(major: int, pg_versions: dict[int, str]) -> None:
    if major not in pg_versions:
        pytest.skip(f"PostgreSQL {major} not installed (.ci/install-postgres --all-versions)")
    with PgServer(pg_versions[major]) as server:
        assert server.major == major
        version = _one(server.dsn(), "SELECT version()")[0]
        assert version.startswith(f"PostgreSQL {major}.")
        row = _one(
            server.dsn(sslmode="verify-full", sslrootcert=server.ca_path),
            "SELECT current_setting('shared_preload_libraries'), current_setting('wal_level')",
        )
        assert row == ("pg_stat_statements,auto_explain", "logical")
        assert _one(server.dsn("scram_user", sslmode="require"), "SELECT current_user") == (
            "scram_user",
        )
        assert server.log_files(), "no server log written"
