"""Reading auto_explain output: the three log formats, text plans, rotation, reading over SQL.

The format tests use logs written by a real server that logs every entry
three ways at once (stderr with a log_line_prefix, csvlog, jsonlog) with
text-format plans, so each parser is checked against the others and
against EXPLAIN.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import psycopg
import pytest

from pgotel_proxy.enrich.logformat import CsvlogParser, JsonlogParser, StderrParser, parse_timestamp
from pgotel_proxy.enrich.logsource import FileLogFollower
from pgotel_proxy.enrich.plans import parse_plan_message, plan_shape
from pgserver import PgServer
from tracetree import comment, random_traceparent

PREFIX = "%m [%p] %Q %q%u@%d/%a "
QUERY = (
    "SELECT a.id, b.id\nFROM logfmt a JOIN logfmt b ON b.id = a.id + 1\n"
    "WHERE a.id < 50 ORDER BY 1"
)


@pytest.fixture(scope="module")
def textpg(pg_versions, certs):
    major = max(pg_versions)
    if major < 15:
        pytest.skip("jsonlog needs PostgreSQL 15")
    server = PgServer(pg_versions[major], certs=certs, settings={
        "log_destination": "stderr,csvlog,jsonlog",
        "log_line_prefix": PREFIX,
        "auto_explain.log_format": "text",
    })
    server.start()
    server.psql("CREATE TABLE logfmt (id int PRIMARY KEY); INSERT INTO logfmt SELECT generate_series(1, 500); ANALYZE logfmt")
    try:
        yield server
    finally:
        server.stop()


def _plans(parser, path):
    entries = []
    data = path.read_bytes()
    # Odd chunk sizes: records are cut anywhere, as a tail of a growing file would be.
    for i in range(0, len(data), 777):
        entries += parser.feed(data[i : i + 777])
    entries += getattr(parser, "flush", lambda: [])()
    return [(e, p) for e in entries if (p := parse_plan_message(e.message, e.time_ns, e.pid, e.query_id))]


def test_three_formats_agree_and_text_plans_match_explain(textpg):
    with psycopg.connect(textpg.dsn(), autocommit=True) as conn:
        pid = conn.info.backend_pid
        conn.execute(QUERY).fetchall()
        explain = conn.execute("EXPLAIN (FORMAT JSON) " + QUERY).fetchone()[0][0]["Plan"]
    time.sleep(0.5)
    files = sorted(textpg.log_dir.iterdir())
    found = {}
    for fmt, parser, suffix in (("stderr", StderrParser(PREFIX), ""), ("csvlog", CsvlogParser(), ".csv"), ("jsonlog", JsonlogParser(), ".json")):
        path = [f for f in files if (f.suffix == suffix if suffix else f.suffix not in (".csv", ".json"))][-1]
        plans = [(e, p) for e, p in _plans(parser, path) if p.query_text == QUERY]
        assert len(plans) == 1, (fmt, plans)
        assert parser.skipped == 0, fmt
        found[fmt] = plans[0]
    shapes = {fmt: plan_shape(p.root) for fmt, (e, p) in found.items()}
    assert shapes["stderr"] == shapes["csvlog"] == shapes["jsonlog"] == plan_shape(explain)
    for fmt, (entry, plan) in found.items():
        assert entry.pid == pid, fmt
        assert plan.query_id is not None and plan.query_id == found["jsonlog"][1].query_id, fmt
        assert entry.time_ns == found["jsonlog"][0].time_ns, fmt
        assert plan.root["Actual Loops"] == 1 and plan.root["Actual Rows"] == 49
        assert plan.duration_ms > 0
    # Buffers lines of the text format land on the right node.
    assert "Shared Hit Blocks" in found["stderr"][1].root["Plans"][0] or "Shared Hit Blocks" in found["stderr"][1].root


def test_stderr_log_with_text_plans_end_to_end(textpg, make_proxy, otlp):
    proxy = make_proxy(upstream=f"{textpg.host}:{textpg.port}", server_log=str(textpg.log_dir),
                       server_log_format="stderr", server_log_line_prefix=PREFIX, join_timeout=3.0)
    assert proxy.enricher.wait_ready(10)
    ctx = random_traceparent()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(comment(QUERY, ctx)).fetchall()
    spans = otlp.wait_for(lambda ss: any(s.trace_id == ctx.trace_id and s.name.startswith("Merge Join") or
                                         s.trace_id == ctx.trace_id and s.name.startswith("Hash Join") or
                                         s.trace_id == ctx.trace_id and s.name.startswith("Nested Loop") for s in ss))
    nodes = [s for s in spans if s.trace_id == ctx.trace_id and "db.postgresql.plan.node_type" in s.attributes]
    assert any(s.attributes.get("db.postgresql.plan.relation") == "logfmt" for s in nodes)


def test_timestamps():
    assert parse_timestamp("2024-05-01 10:00:00.123 UTC") == 1714557600_123_000_000
    assert parse_timestamp("2024-05-01 12:00:00.5 +02") == 1714557600_500_000_000
    assert parse_timestamp("2024-05-01 10:00:00 GMT") == 1714557600_000_000_000
    assert parse_timestamp("not a time") is None


def test_file_follower_rotation_truncation_and_rename(tmp_path):
    d = tmp_path / "log"
    d.mkdir()
    first = d / "postgresql-1.json"
    first.write_bytes(b"old history\n")
    f = FileLogFollower(d, "jsonlog")
    f.check()
    assert f.read() == b""  # history is not replayed
    with open(first, "ab") as fh:
        fh.write(b"one\n")
    assert f.read() == b"one\n"
    # Rotation: the rest of the old file comes before the new one.
    with open(first, "ab") as fh:
        fh.write(b"two\n")
    second = d / "postgresql-2.json"
    second.write_bytes(b"three\n")
    os.utime(second, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert f.read() == b"two\n"
    assert f.read() == b"three\n"
    assert f.read() == b""
    # Truncation in place.
    second.write_bytes(b"")
    with open(second, "ab") as fh:
        fh.write(b"four\n")
    assert f.read() == b"four\n"
    # A single file renamed away and recreated (logrotate).
    single = tmp_path / "server.log"
    single.write_bytes(b"")
    g = FileLogFollower(single, "stderr")
    g.check()
    with open(single, "ab") as fh:
        fh.write(b"a\n")
    os.rename(single, tmp_path / "server.log.1")
    single.write_bytes(b"b\n")
    assert g.read() == b"a\n"
    assert g.read() == b"b\n"
    f.close()
    g.close()


def test_unreadable_log_path_raises_with_reason(tmp_path):
    with pytest.raises(FileNotFoundError):
        FileLogFollower(tmp_path / "missing.json", "jsonlog").check()
    with pytest.raises(FileNotFoundError, match="no jsonlog log file"):
        FileLogFollower(tmp_path, "jsonlog").check()


def test_csv_record_with_embedded_newlines_fed_byte_by_byte():
    line = (
        '2024-05-01 10:00:00.123 UTC,"postgres","postgres",4242,"127.0.0.1:5000",663a0000.1092,1,"SELECT",'
        '2024-05-01 10:00:00 UTC,3/4,0,LOG,00000,"duration: 1.500 ms  plan:\n{\n  ""Query Text"": ""select 1"",\n'
        '  ""Plan"": {""Node Type"": ""Result"", ""Actual Total Time"": 0.01, ""Actual Loops"": 1}\n}",,,,,,,,,"psql","client backend",,99\n'
    ).encode()
    p = CsvlogParser()
    out = []
    for i in range(len(line)):
        out += p.feed(line[i : i + 1])
    assert len(out) == 1
    e = out[0]
    assert (e.pid, e.query_id) == (4242, 99)
    plan = parse_plan_message(e.message, e.time_ns, e.pid, e.query_id)
    assert plan.query_text == "select 1" and plan.root["Node Type"] == "Result" and plan.duration_ms == 1.5


def test_oversized_record_is_skipped_and_parsing_goes_on(monkeypatch):
    from pgotel_proxy.enrich import logformat

    monkeypatch.setattr(logformat, "MAX_RECORD_BYTES", 100)
    p = JsonlogParser()
    big = b'{"timestamp": "2024-05-01 10:00:00.1 UTC", "pid": 1, "message": "' + b"x" * 300
    assert p.feed(big) == []
    out = p.feed(b'"}\n{"timestamp": "2024-05-01 10:00:00.2 UTC", "pid": 2, "message": "m"}\n')
    assert [e.pid for e in out] == [2]
    assert p.skipped == 1


def _status(proxy):
    with urllib.request.urlopen(proxy.admin_url + "/status", timeout=5) as r:
        return json.loads(r.read())["sources"]


def test_log_over_sql_joins_plans(pg, make_proxy, otlp):
    proxy = make_proxy(server_log_via_sql=True, server_log_format="jsonlog" if pg.major >= 15 else "csvlog",
                       stats_dsn=pg.dsn(), join_timeout=3.0)
    assert proxy.enricher.wait_ready(10)
    assert _status(proxy)["auto_explain"] == "ok"
    ctx = random_traceparent()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(comment("SELECT count(*) FROM pg_class", ctx))
    spans = otlp.wait_for(lambda ss: any(s.trace_id == ctx.trace_id and s.name == "Aggregate" for s in ss))
    assert any(s.trace_id == ctx.trace_id and s.name.startswith("Seq Scan pg_class") or
               s.trace_id == ctx.trace_id and s.name.startswith("Index Only Scan pg_class") for s in spans)


def test_log_over_sql_without_privilege_is_unavailable(pg, make_proxy, otlp):
    proxy = make_proxy(server_log_via_sql=True, stats_dsn=pg.dsn(user="scram_user"), join_timeout=5.0)
    assert proxy.enricher.wait_ready(10)
    sources = _status(proxy)
    assert sources["auto_explain"].startswith("unavailable: cannot read the server log over SQL: permission denied")
    # scram_user is not in pg_read_all_stats: the statistics sources work, limited, and say so.
    assert sources["pg_stat_statements"].startswith("ok (limited")
    assert sources["wait_events"].startswith("ok (limited")
