"""node-postgres with OpenTelemetry JS's pg instrumentation, end to end through the proxy.

The application is ``tests/node/writer.js``, run with the node found on PATH
against a proxy in front of the real PostgreSQL fixture; its pg.query CLIENT
spans reach the in-process OTLP receiver through the JS OTLP/HTTP protobuf
exporter, beside the proxy's. Each of its queries' statement spans must have
that CLIENT span as its parent, with either channel the instrumentation
offers: ``addSqlCommenterCommentToQueries`` (a sqlcommenter comment in the
SQL) and ``enableTraceContextPropagation`` (``SET application_name =
'00-<trace>-<span>-01'`` before each query, a session channel). With
``--wal-propagation``, its writes' otelwal messages carry the same context,
whichever channel brought it: the CDC consumer's span is a child of the
writer's pg.query span.

The npm packages are pinned in tests/node/package-lock.json and installed by
.ci/run, or here when tests/node/node_modules is missing. The tests are skipped
only when there is no ``node``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from test_wal_consumer import RunningConsumer, cdc_table, consumer_spans  # noqa: F401
from tracetree import collect, server_spans

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")

pytestmark = [pytest.mark.skipif(NODE is None, reason="node not found"), pytest.mark.timeout(300)]

APP_NAME = "db.postgresql.application_name"
INSTRUMENTATION_SCOPE = "@opentelemetry/instrumentation-pg"


@pytest.fixture(scope="module")
def writer() -> Path:
    """tests/node/writer.js, its packages installed from the lock file if they are not yet."""
    if not (NODE_DIR / "node_modules" / "@opentelemetry" / "instrumentation-pg").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "node is here but npm is not: install npm (or run .ci/run)"
        subprocess.run([npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
                       check=True, timeout=600, stdout=subprocess.DEVNULL)
    return NODE_DIR / "writer.js"


def _run_writer(writer: Path, proxy, otlp, channel: str, table: str | None = None) -> list[dict]:
    """Run the node application; one dict per query it ran (text, rows, its CLIENT span's ids).

    With ``table`` its queries insert into that table instead of reading.
    """
    env = dict(os.environ, PGOTEL_NODE_PG_PORT=str(proxy.port), PGOTEL_NODE_OTLP_URL=otlp.http_traces_url,
               PGOTEL_NODE_CHANNEL=channel)
    if table is not None:
        env["PGOTEL_NODE_TABLE"] = table
    done = subprocess.run([NODE, str(writer)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _children(spans, query: dict):
    return [s for s in server_spans(spans, query["trace_id"]) if s.parent_span_id == query["span_id"]]


@pytest.mark.parametrize("channel", ["sqlcommenter", "application_name"])
def test_node_postgres_statements_are_children_of_its_query_spans(make_proxy, otlp, writer, channel):
    proxy = make_proxy()
    queries = _run_writer(writer, proxy, otlp, channel)
    rows = [q["rows"] for q in queries]
    if channel == "sqlcommenter":
        assert rows == [[{"answer": 42}], [{"n": 1}], [{"n": 2}]]
    else:  # also a named statement, prepared by its first execution and reused by the second
        assert rows == [[{"answer": 42}], [{"n": 1}], [{"n": 2}], [{"n": 103}], [{"n": 104}]]
    # With enableTraceContextPropagation the SET that carries the context runs
    # in the query's own trace, ahead of the query.
    expected = ["SELECT"] if channel == "sqlcommenter" else ["SET", "SELECT"]
    spans = collect(proxy, otlp, lambda got: all(len(_children(got, q)) >= len(expected) for q in queries))
    clients = {(s.trace_id, s.span_id): s for s in spans if s.kind == "CLIENT" and s.scope == INSTRUMENTATION_SCOPE}
    for query in queries:
        client = clients.get((query["trace_id"], query["span_id"]))
        assert client is not None, "the writer's pg.query span was not exported"
        kids = _children(spans, query)
        assert [s.name for s in kids] == expected, (client.name, [s.describe() for s in kids])
        statement = kids[-1]
        assert statement.attributes["db.response.returned_rows"] == 1
        if channel == "sqlcommenter":
            assert statement.attributes[APP_NAME] == "node-writer"
        else:  # the traceparent in application_name is context, not the application's name
            assert APP_NAME not in statement.attributes, statement.attributes
    assert len(clients) == len(queries)
    assert all(s.parent_span_id is not None for s in server_spans(spans)), "a statement span is a root"


@pytest.mark.parametrize("channel", ["sqlcommenter", "application_name"])
def test_node_postgres_writes_carry_their_context_into_the_wal(pg, make_proxy, otlp, writer, cdc_table, channel):
    table, pub, slot = cdc_table
    proxy = make_proxy(wal_propagation=True)
    running = RunningConsumer(pg, otlp, slot, pub).start()
    try:
        queries = _run_writer(writer, proxy, otlp, channel, table)
        # autocommit writes, simple and extended (with application_name also a named
        # statement executed again without its Parse): one transaction, one message each
        assert len(queries) == (2 if channel == "sqlcommenter" else 4)
        running.wait_transactions(len(queries))
        otlp.wait_for(lambda spans: len(consumer_spans(otlp)) >= len(queries))
        spans = consumer_spans(otlp)
        assert [(s.trace_id, s.parent_span_id) for s in spans] == [(q["trace_id"], q["span_id"]) for q in queries]
        assert all(s.attributes["db.postgresql.wal.inserts"] == 1 for s in spans)
    finally:
        running.stop()
