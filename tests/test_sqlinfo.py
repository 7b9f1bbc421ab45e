"""Tests for pgotel_proxy.tracing.sqlinfo: summaries, sanitising, splitting.

The table tests pin the summary format from the database semantic
conventions; the secret tests check that no literal survives sanitising on
either the parser path or the fallback; the hypothesis tests check that
analysis never raises and stays fast on arbitrary text; the server test runs
the statements the module calls writes against a real PostgreSQL and checks
that each one advances the WAL.
"""

from __future__ import annotations

import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgotel_proxy.tracing import sqlinfo
from pgotel_proxy.tracing.sqlscan import guess_many
from pgotel_proxy.tracing.sqlinfo import (
    MAX_SUMMARY_CHARS,
    PARSE_MAX_CHARS,
    SqlInfo,
    analyze,
    analyze_many,
    fingerprint,
)

# (sql, summary, operation, collection, is_write)
CASES = [
    ("SELECT * FROM users WHERE id = $1", "SELECT users", "SELECT", "users", False),
    ("select id from users", "select users", "select", "users", False),
    ("SELECT 1", "SELECT", "SELECT", None, False),
    ("SELECT now()", "SELECT", "SELECT", None, False),
    (
        "SELECT u.id FROM users u JOIN orders o ON o.user_id = u.id",
        "SELECT users orders",
        "SELECT",
        None,
        False,
    ),
    ('SELECT * FROM "song list", artists', 'SELECT "song list" artists', "SELECT", None, False),
    ("SELECT * FROM public.users", "SELECT public.users", "SELECT", "public.users", False),
    ('SELECT * FROM "MySchema"."Users"', 'SELECT "MySchema"."Users"', "SELECT", '"MySchema"."Users"', False),
    ("SELECT * FROM ONLY t", "SELECT t", "SELECT", "t", False),
    ("SELECT * FROM a JOIN a b ON true", "SELECT a", "SELECT", "a", False),
    (
        "SELECT order_date FROM (SELECT * FROM orders o JOIN customers c"
        " ON o.customer_id = c.customer_id) x",
        "SELECT SELECT orders customers",
        "SELECT",
        None,
        False,
    ),
    (
        "SELECT x FROM t WHERE y IN (SELECT y FROM u WHERE z = 'q')",
        "SELECT t SELECT u",
        "SELECT",
        None,
        False,
    ),
    ("SELECT (SELECT max(a) FROM t2) FROM t1", "SELECT SELECT t2 t1", "SELECT", None, False),
    ("SELECT a FROM t1 UNION ALL SELECT b FROM t2", "SELECT t1 SELECT t2", "SELECT", None, False),
    ("SELECT * FROM t FOR UPDATE", "SELECT t", "SELECT", "t", False),
    ("SELECT * INTO archive FROM events", "SELECT archive events", "SELECT", None, True),
    ("VALUES (1, 'a'), (2, 'b')", "VALUES", "VALUES", None, False),
    ("INSERT INTO orders (a) VALUES ($1)", "INSERT orders", "INSERT", "orders", True),
    (
        "INSERT INTO shipping_details (order_id, address) SELECT order_id, address"
        " FROM orders WHERE order_id = 5",
        "INSERT shipping_details SELECT orders",
        "INSERT",
        None,
        True,
    ),
    (
        "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = 2",
        "INSERT t",
        "INSERT",
        "t",
        True,
    ),
    ("UPDATE accounts SET balance = 0 WHERE id = 7", "UPDATE accounts", "UPDATE", "accounts", True),
    ("DELETE FROM t USING u WHERE t.id = u.id", "DELETE t u", "DELETE", None, True),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET x = 1",
        "MERGE t s",
        "MERGE",
        None,
        True,
    ),
    ("COPY t FROM STDIN", "COPY t", "COPY", "t", True),
    ("COPY t TO STDOUT", "COPY t", "COPY", "t", False),
    ("COPY (SELECT * FROM t) TO STDOUT", "COPY SELECT t", "COPY", "t", False),
    (
        "WITH x AS (SELECT * FROM a) SELECT * FROM x JOIN b ON true",
        "SELECT a SELECT x b",
        "SELECT",
        None,
        False,
    ),
    ("WITH x AS (SELECT * FROM a) SELECT * FROM x", "SELECT a SELECT x", "SELECT", "a", False),
    (
        "WITH d AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM d",
        "DELETE a INSERT b SELECT d",
        "INSERT",
        None,
        True,
    ),
    (
        "WITH d AS (DELETE FROM a RETURNING *) SELECT count(*) FROM d",
        "DELETE a SELECT d",
        "SELECT",
        "a",
        True,
    ),
    ("BEGIN", "BEGIN", "BEGIN", None, False),
    ("begin isolation level serializable", "begin", "begin", None, False),
    ("START TRANSACTION READ ONLY", "START TRANSACTION", "START TRANSACTION", None, False),
    ("COMMIT", "COMMIT", "COMMIT", None, False),
    ("ROLLBACK", "ROLLBACK", "ROLLBACK", None, False),
    ("SAVEPOINT sp_1", "SAVEPOINT", "SAVEPOINT", None, False),
    ("ROLLBACK TO SAVEPOINT sp_1", "ROLLBACK", "ROLLBACK", None, False),
    ("SET search_path = 'app'", "SET", "SET", None, False),
    ("RESET ALL", "RESET", "RESET", None, False),
    ("SHOW work_mem", "SHOW", "SHOW", None, False),
    ("CALL my_proc(1, 'x')", "CALL my_proc", "CALL", None, True),
    ("CALL app.do_it()", "CALL app.do_it", "CALL", None, True),
    ("DO $$ BEGIN PERFORM 1; END $$", "DO", "DO", None, True),
    ("EXPLAIN SELECT * FROM t", "EXPLAIN SELECT t", "EXPLAIN", "t", False),
    ("EXPLAIN ANALYZE INSERT INTO t VALUES (1)", "EXPLAIN INSERT t", "EXPLAIN", "t", True),
    ("EXPLAIN INSERT INTO t VALUES (1)", "EXPLAIN INSERT t", "EXPLAIN", "t", False),
    ("EXPLAIN (ANALYZE off) DELETE FROM t", "EXPLAIN DELETE t", "EXPLAIN", "t", False),
    ("EXPLAIN (ANALYZE 0) DELETE FROM t", "EXPLAIN DELETE t", "EXPLAIN", "t", False),
    ("EXPLAIN (ANALYZE, COSTS off) DELETE FROM t", "EXPLAIN DELETE t", "EXPLAIN", "t", True),
    ("PREPARE p AS INSERT INTO t VALUES ($1)", "PREPARE INSERT t", "PREPARE", "t", False),
    ("EXECUTE p(1)", "EXECUTE", "EXECUTE", None, False),
    ("TRUNCATE a, b", "TRUNCATE a b", "TRUNCATE", None, True),
    ("CREATE TABLE IF NOT EXISTS foo (id int DEFAULT 42)", "CREATE TABLE foo", "CREATE TABLE", "foo", True),
    ("CREATE TEMP TABLE tmp AS SELECT * FROM src", "CREATE TABLE tmp SELECT src", "CREATE TABLE", None, True),
    ("create unique index concurrently i on t (x)", "create index t", "create index", "t", True),
    ("ALTER TABLE t ADD COLUMN y int", "ALTER TABLE t", "ALTER TABLE", "t", True),
    ("DROP TABLE IF EXISTS a.b", "DROP TABLE a.b", "DROP TABLE", "a.b", True),
    ("DROP INDEX i", "DROP INDEX", "DROP INDEX", None, True),
    (
        "CREATE MATERIALIZED VIEW mv AS SELECT * FROM t",
        "CREATE MATERIALIZED VIEW mv SELECT t",
        "CREATE MATERIALIZED VIEW",
        None,
        True,
    ),
    ("REFRESH MATERIALIZED VIEW mv", "REFRESH MATERIALIZED VIEW mv", "REFRESH MATERIALIZED VIEW", "mv", True),
    ("CREATE OR REPLACE VIEW v AS SELECT 1", "CREATE VIEW v SELECT", "CREATE VIEW", "v", True),
    ("GRANT SELECT ON t TO bob", "GRANT t", "GRANT", "t", True),
    ("VACUUM ANALYZE t", "VACUUM t", "VACUUM", "t", False),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", "LOCK t", "LOCK", "t", False),
    ("LISTEN ch", "LISTEN", "LISTEN", None, False),
    ("NOTIFY ch, 'payload'", "NOTIFY", "NOTIFY", None, False),
    ("DISCARD ALL", "DISCARD", "DISCARD", None, False),
    ("SELECT 'é' FROM café JOIN \"Ünï\" u ON true", 'SELECT café "Ünï"', "SELECT", None, False),
]


@pytest.mark.parametrize(("sql", "summary", "operation", "collection", "is_write"), CASES)
def test_summary_table(sql, summary, operation, collection, is_write):
    info = analyze(sql)
    assert info.summary == summary
    assert info.operation == operation
    assert info.collection == collection
    assert info.is_write is is_write
    assert info.statement_count == 1
    # The parser path must have produced this, not the heuristic.
    assert sqlinfo._parse_path(sql, sqlinfo._pg_tokens(sql))


# (sql, expected sanitised text)
SANITIZE = [
    ("SELECT * FROM users WHERE id = $1", "SELECT * FROM users WHERE id = $1"),
    ("SELECT * FROM t WHERE a = 'x' AND b = 42 LIMIT 10", "SELECT * FROM t WHERE a = ? AND b = ? LIMIT ?"),
    ("SELECT * FROM t WHERE id IN (1, 2, 3)", "SELECT * FROM t WHERE id IN (?)"),
    ("SELECT * FROM t WHERE id not in ('a','b')", "SELECT * FROM t WHERE id not in (?)"),
    ("SELECT * FROM t WHERE id IN ($1, $2)", "SELECT * FROM t WHERE id IN ($1, $2)"),
    ("SELECT ARRAY[1, 2.5, -3e4]", "SELECT ARRAY[?, ?, -?]"),
    ("SELECT true, FALSE, NULL", "SELECT ?, ?, NULL"),
    ("SELECT DATE '2020-01-01', interval '1 day', B'0101', X'FF', 0x1F, 1_000",
     "SELECT DATE ?, interval ?, ?, ?, ?, ?"),
    ("SELECT '2020-01-01'::date", "SELECT ?::date"),
    ("INSERT INTO t VALUES (1, 'a'), (2, 'b')", "INSERT INTO t VALUES (?, ?), (?, ?)"),
    ("SELECT 1 -- trailing\n", "SELECT ?"),
    ("/* app=web,traceparent='00-abc' */ SELECT a  /* nested /* c */ x */ FROM\n\tt",
     "SELECT a FROM t"),
    ('SELECT "quoted ident", "it\'s" FROM "Tab"', 'SELECT "quoted ident", "it\'s" FROM "Tab"'),
    ("SELECT data->>'key' FROM t WHERE data ? 'k'", "SELECT data->>? FROM t WHERE data ? ?"),
]


@pytest.mark.parametrize(("sql", "expected"), SANITIZE)
def test_sanitize_table(sql, expected):
    assert analyze(sql).sanitized == expected


SECRET = "Zq9sekrit7Wx"

LEAKY = [
    f"SELECT * FROM t WHERE pw = '{SECRET}'",
    f"SELECT * FROM t WHERE pw = E'{SECRET}\\'s'",
    f"SELECT * FROM t WHERE pw = E'a\\'{SECRET}'",
    f"SELECT * FROM t WHERE pw = U&'{SECRET}'",
    f"SELECT * FROM t WHERE pw = $${SECRET}$$",
    f"SELECT * FROM t WHERE pw = $tag${SECRET} $$ still $tag$",
    f"SELECT * FROM t WHERE pw = 'it''s {SECRET}'",
    f"SELECT * FROM t WHERE pw IN ('{SECRET}', 'other')",
    f"SELECT ARRAY['{SECRET}']",
    f"SELECT '{{{SECRET}}}'::text[]",
    f"INSERT INTO t (a, b) VALUES (1, '{SECRET}'), (2, 'x')",
    f"UPDATE t SET pw = '{SECRET}' WHERE id = 4",
    f"SET app.secret = '{SECRET}'",
    f"CALL login('{SECRET}')",
    f"DO $body$ BEGIN RAISE NOTICE '{SECRET}'; END $body$",
    f"SELECT 1 /* {SECRET} */",
    f"SELECT 1 -- {SECRET}",
    f"SELECT * FROM t WHERE pw = '{SECRET}'; SELECT 1",
    # Unparsable on purpose: these take the fallback paths.
    f"SELEC * FROM t WHERE pw = '{SECRET}'",
    f"SELECT * FROM t WHERE pw = '{SECRET}",
    f"SELECT * FROM t WHERE pw = E'{SECRET}\\'",
    f"SELECT * FROM t WHERE pw = $${SECRET}",
    f"SELECT * FROM t WHERE pw = $x${SECRET}$y$",
    f"SELECT 1 /* {SECRET}",
    f"SELECT 1 /* /* */ {SECRET} */",
    f"SELECT 1 FROM t WHERE a = '{SECRET}'; GARBAGE (",
]


@pytest.mark.parametrize("sql", LEAKY)
def test_no_literal_leaks(sql):
    info = analyze(sql)
    assert SECRET not in info.sanitized
    assert SECRET not in info.summary
    for one in analyze_many(sql):
        assert SECRET not in one.sanitized
        assert SECRET not in one.summary


def test_numeric_secrets_do_not_leak():
    info = analyze("SELECT * FROM cards WHERE pan = 4111111111111111 AND cvv = 737 AND amt = 12.75")
    assert info.sanitized == "SELECT * FROM cards WHERE pan = ? AND cvv = ? AND amt = ?"


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT * FROM t WHERE pw = '{SECRET}' AND id = 12345",
        f"SELEC * FROM t WHERE pw = '{SECRET}' AND id = 12345",
        f"SELECT * FROM t WHERE pw = '{SECRET}' AND id = 12345 AND x = 'unterminated",
    ],
)
def test_regex_fallback_matches_lexer(sql):
    """The regex tokenizer alone must also hide every literal."""
    text = sqlinfo._render(sql, sqlinfo._regex_tokens(sql))
    assert SECRET not in text
    assert "12345" not in text
    assert text.startswith(sql[:5])


def test_params_kept_identifiers_preserved():
    info = analyze('SELECT "Weird Col", x1 FROM "Sch"."Tab" WHERE a = $1 AND b = $12')
    assert info.sanitized == 'SELECT "Weird Col", x1 FROM "Sch"."Tab" WHERE a = $1 AND b = $12'
    assert info.summary == 'SELECT "Sch"."Tab"'


def test_fallback_on_syntax_error():
    info = analyze("SELEC id FROM users WHERE x = 'y'")
    # An unknown lead word gives no operation rather than a made-up one.
    assert info.operation is None
    assert info.summary == ""
    assert info.sanitized == "SELEC id FROM users WHERE x = ?"
    with pytest.raises(Exception):
        sqlinfo._parse_path("SELEC id FROM users", sqlinfo._pg_tokens("SELEC id FROM users"))


def test_fallback_known_lead_finds_targets():
    # Newer or broken grammar after a known keyword: the heuristic still names it.
    info = analyze("SELECT a FROM orders o JOIN users u ON o.uid = u.id WHERE a = = 1")
    assert info.summary == "SELECT orders users"
    assert info.operation == "SELECT"
    info = analyze("UPDATE accounts SET x = 1 WHERE WHERE")
    assert (info.summary, info.collection, info.is_write) == ("UPDATE accounts", "accounts", True)
    info = analyze("INSERT INTO logs VALUES (1, 'x') RETURNING RETURNING")
    assert (info.summary, info.is_write) == ("INSERT logs", True)


def test_fallback_unterminated_literal():
    info = analyze("SELECT * FROM t WHERE a = 'never closed")
    assert info.summary == "SELECT t"
    assert info.sanitized == "SELECT * FROM t WHERE a = ?"


def test_empty_and_comment_only():
    for sql in ("", "   ", "-- nothing\n", "/* x */", ";;"):
        info = analyze(sql)
        assert info.statement_count == 0
        assert info.summary == "" and info.sanitized == ""
        assert analyze_many(sql) == []


def test_multi_statement_batch():
    sql = "BEGIN; INSERT INTO t VALUES (1); COMMIT"
    many = analyze_many(sql)
    assert [i.summary for i in many] == ["BEGIN", "INSERT t", "COMMIT"]
    assert [i.is_write for i in many] == [False, True, False]
    assert all(i.statement_count == 1 for i in many)
    info = analyze(sql)
    assert info.statement_count == 3
    assert info.summary == "BATCH"
    assert info.operation == "BATCH"
    assert info.is_write
    assert info.sanitized == "BEGIN; INSERT INTO t VALUES (?); COMMIT"


def test_multi_statement_same_summary():
    info = analyze("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);")
    assert (info.summary, info.operation, info.collection) == ("BATCH INSERT t", "BATCH INSERT", "t")
    assert info.statement_count == 2


def test_split_respects_quotes_and_bodies():
    sql = (
        "SELECT 'a;b' FROM \"x;y\"; "
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END; "
        "SELECT $$;$$ /* ; */ -- ;\n"
    )
    many = analyze_many(sql)
    assert [i.operation for i in many] == ["SELECT", "CREATE FUNCTION", "SELECT"]
    assert many[0].summary == 'SELECT "x;y"'


@pytest.mark.parametrize("sql, operations", [
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END; SELECT 3",
     ["CREATE FUNCTION", "SELECT"]),
    ("create or replace procedure p() language sql begin atomic insert into t values (1); "
     "select case when true then 1 end; end; commit", ["create procedure", "commit"]),
    ("BEGIN; INSERT INTO t VALUES (1); END", ["BEGIN", "INSERT", "END"]),
    ("CREATE TABLE x (a int); BEGIN; CASE; END", ["CREATE TABLE", "BEGIN", None, "END"]),
])
def test_heuristic_split_keeps_routine_bodies_whole(sql, operations):
    """The relay's reader (no parser): a BEGIN ATOMIC body's semicolons and END end no statement,
    so a routine's END is never read as the end of a transaction (wal/emit.py's bookkeeping)."""
    assert [i.operation for i in guess_many(sql)] == operations


def test_split_fallback_keeps_good_statements():
    many = analyze_many("SELECT * FROM a; GARBAGE 'x'; DELETE FROM b")
    assert [i.summary for i in many] == ["SELECT a", "", "DELETE b"]
    assert many[1].sanitized == "GARBAGE ?"


def test_regex_split_on_lexer_failure():
    many = analyze_many("SELECT 1 FROM a; UPDATE b SET c = 'open")
    assert [i.summary for i in many] == ["SELECT a", "UPDATE b"]
    assert many[1].sanitized == "UPDATE b SET c = ?"


def test_summary_truncated_on_part_boundary():
    names = [f"table_number_{i:03d}" for i in range(40)]
    sql = "SELECT * FROM " + ", ".join(names)
    info = analyze(sql)
    assert len(info.summary) <= MAX_SUMMARY_CHARS
    parts = info.summary.split(" ")
    assert parts[0] == "SELECT"
    assert parts[1:] == names[: len(parts) - 1]
    assert len(parts) > 5


def test_non_ascii_locations():
    sql = "SELECT 'ünïcödé €€€' AS x, y FROM \"Tâble\" JOIN schéma.t2 ON true WHERE z = 'ß'"
    info = analyze(sql)
    assert info.summary == 'SELECT "Tâble" schéma.t2'
    assert info.sanitized == 'SELECT ? AS x, y FROM "Tâble" JOIN schéma.t2 ON ? WHERE z = ?'


def test_huge_input_takes_fallback_and_is_bounded():
    rows = ", ".join(f"({i}, 'secret{i}')" for i in range(20000))
    sql = "INSERT INTO bulk VALUES " + rows
    assert len(sql) > PARSE_MAX_CHARS
    start = time.thread_time()
    info = analyze(sql)
    elapsed = time.thread_time() - start
    assert info.summary == "INSERT bulk"
    assert info.is_write
    assert "secret" not in info.sanitized
    assert elapsed < 2.0


def test_cache_returns_same_object_and_skips_large():
    sql = f"SELECT * FROM cache_probe_{uuid.uuid4().hex} WHERE a = 1"
    first = analyze(sql)
    assert analyze("".join(list(sql))) is first
    big = "SELECT * FROM t WHERE a IN (" + ", ".join(["1"] * 10000) + ")"
    assert len(big) > sqlinfo.CACHE_MAX_CHARS
    before = sqlinfo._analyze_all_cached.cache_info().currsize
    assert analyze(big).sanitized == "SELECT * FROM t WHERE a IN (?)"
    assert sqlinfo._analyze_all_cached.cache_info().currsize == before


def test_texts_differing_only_in_literals_share_one_analysis():
    table = f"shape_probe_{uuid.uuid4().hex}"
    first = analyze(f"SELECT abalance FROM {table} WHERE aid = 4711 AND name = 'alice'")
    again = analyze(f"SELECT abalance FROM {table} WHERE aid = 12 AND name = 'bob''s'")
    assert again is first  # no second parse
    assert again.sanitized == f"SELECT abalance FROM {table} WHERE aid = ? AND name = ?"
    # the blanking never merges texts that differ in anything but plain literals
    other = analyze(f"SELECT abalance FROM {table}2 WHERE aid = 4711 AND name = 'alice'")
    assert other.collection == f"{table}2"
    escaped = analyze(f"SELECT abalance FROM {table} WHERE aid = 5 AND name = E'x\\'y'")
    assert escaped is not first and "x" not in escaped.sanitized
    quoted = analyze(f'SELECT abalance FROM "{table} 7" WHERE aid = 5')
    assert quoted.collection == f'"{table} 7"'
    ident = analyze(f"SELECT abalance FROM {table}_9 WHERE aid = 5 AND name = 'a'")
    assert ident.collection == f"{table}_9"


def test_odd_inputs_never_raise():
    for value in (None, b"SELECT 1", 42, "SELECT '\x00'", "SELECT '\ud800'", "\x00" * 10):
        info = analyze(value)  # type: ignore[arg-type]
        assert isinstance(info, SqlInfo)
        assert isinstance(analyze_many(value), list)  # type: ignore[arg-type]
    assert analyze(b"SELECT 1 FROM t").summary == "SELECT t"  # type: ignore[arg-type]
    # NUL and lone surrogates skip the parser; literals still go.
    assert analyze("SELECT '\x00secret' FROM t").sanitized == "SELECT ? FROM t"
    assert analyze("SELECT '\ud800secret' FROM t").sanitized == "SELECT ? FROM t"


def test_fingerprint():
    a = fingerprint("SELECT * FROM t WHERE a = 1")
    b = fingerprint("select *   from t where a = 42 -- other literal")
    assert a and a == b
    assert fingerprint("SELECT * FROM u WHERE a = 1") != a
    assert fingerprint("SELEC nope") is None
    assert fingerprint(None) is None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Fuzzing

SQL_WORDS = st.sampled_from(
    [
        "SELECT", "FROM", "WHERE", "JOIN", "INSERT", "INTO", "VALUES", "UPDATE", "SET",
        "DELETE", "WITH", "AS", "(", ")", ",", ";", "'", '"', "$$", "$1", "--", "/*", "*/",
        "E'", "\\", "1", "1.5e3", "t", "public.t", "IN", "ONLY", "UNION", "CALL", "COPY",
        "CREATE", "TABLE", "DROP", "BEGIN", "COMMIT", "\n", " ", "?", "$a$", "U&'",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SQL_WORDS, max_size=60).map(" ".join))
def test_fuzz_sqlish_never_raises(sql):
    start = time.thread_time()
    info = analyze(sql)
    many = analyze_many(sql)
    assert time.thread_time() - start < 0.5
    assert isinstance(info, SqlInfo)
    assert len(info.summary) <= MAX_SUMMARY_CHARS
    assert info.statement_count == len(many)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_fuzz_text_never_raises(sql):
    start = time.thread_time()
    info = analyze(sql)
    analyze_many(sql)
    fingerprint(sql)
    assert time.thread_time() - start < 0.5
    assert len(info.summary) <= MAX_SUMMARY_CHARS


SECRET_ALPHABET = "qxzjkvw"


@settings(max_examples=200, deadline=None)
@given(
    secret=st.text(alphabet=SECRET_ALPHABET, min_size=10, max_size=20),
    template=st.sampled_from(
        [
            "SELECT * FROM t WHERE a = '{s}'",
            "SELECT * FROM t WHERE a = E'{s}'",
            "SELECT * FROM t WHERE a = $${s}$$",
            "SELECT * FROM t WHERE a = $q${s}$q$",
            "INSERT INTO t VALUES ('{s}', 1)",
            "SELECT * FROM t WHERE a IN ('x', '{s}')",
            "SELEC broken '{s}'",
            "SELECT '{s}",
            "SELECT $${s}",
            "UPDATE t SET a = '{s}' WHERE b = '{s}'",
        ]
    ),
    prefix=st.sampled_from(["", "/* c */ ", "BEGIN; ", "SELECT 1; "]),
)
def test_fuzz_secrets_never_leak(secret, template, prefix):
    sql = prefix + template.format(s=secret)
    assert secret not in analyze(sql).sanitized
    assert secret not in analyze(sql).summary
    assert all(secret not in i.sanitized for i in analyze_many(sql))


# ---------------------------------------------------------------------------
# Against a real server


WRITES = [
    "INSERT INTO {s}.w (a) VALUES (1)",
    "UPDATE {s}.w SET a = a + 1",
    "DELETE FROM {s}.w WHERE a = 2",
    "MERGE INTO {s}.w USING (SELECT 7 AS a) src ON w.a = src.a WHEN NOT MATCHED THEN INSERT VALUES (src.a)",
    "WITH d AS (DELETE FROM {s}.w WHERE a = 7 RETURNING a) SELECT count(*) FROM d",
    "TRUNCATE {s}.w",
    "CREATE TABLE {s}.w2 (b int)",
    "ALTER TABLE {s}.w2 ADD COLUMN c text",
    "CREATE INDEX ON {s}.w2 (b)",
    "SELECT * INTO {s}.w3 FROM {s}.w",
    "CREATE TABLE {s}.w4 AS SELECT 1 AS x",
    "DROP TABLE {s}.w4",
    "EXPLAIN ANALYZE INSERT INTO {s}.w VALUES (2)",
]


def test_writes_advance_wal_on_real_server(pg):
    psycopg = pytest.importorskip("psycopg")
    schema = f"sqlinfo_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.w (a int)")
        conn.execute(f"INSERT INTO {schema}.w VALUES (1), (2), (3)")
        try:
            for template in WRITES:
                sql = template.format(s=schema)
                info = analyze(sql)
                assert info.is_write, sql
                assert info.summary and info.operation, sql
                before = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
                conn.execute(sql)
                grew = conn.execute(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)", (before,)
                ).fetchone()[0]
                assert grew > 0, sql
        finally:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_summaries_describe_statements_the_server_accepts(pg):
    """Every parser-path case is real SQL: the server parses it (we roll back)."""
    psycopg = pytest.importorskip("psycopg")
    checked = 0
    with psycopg.connect(pg.dsn()) as conn:
        for sql, *_ in CASES:
            if "$1" in sql or "CONCURRENTLY" in sql.upper() or sql.upper().startswith(
                ("BEGIN", "START", "COMMIT", "ROLLBACK", "SAVEPOINT", "VACUUM", "COPY")
            ):
                continue
            # EXPLAIN (without ANALYZE) of the statement makes the server parse
            # it without running it; utility statements cannot be explained.
            if not sql.upper().startswith(("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "VALUES")):
                continue
            try:
                conn.execute("EXPLAIN " + sql)
            except psycopg.errors.UndefinedTable:
                pass  # parsed fine; the tables do not exist
            except psycopg.errors.UndefinedFunction:
                pass
            except psycopg.errors.SyntaxError as exc:  # pragma: no cover - a real failure
                pytest.fail(f"server rejected {sql!r}: {exc}")
            finally:
                conn.rollback()
            checked += 1
    assert checked > 20


_SHAPE_TEMPLATES = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = {n}",
    "UPDATE pgbench_accounts SET abalance = abalance + {n} WHERE aid = {m}",
    "INSERT INTO t (a, b) VALUES ({n}, {s})",
    "SELECT * FROM t WHERE a IN ({n}, {m}) AND b = {s} LIMIT {m}",
    "SELECT {n} AS x, {s}::text",
    "SELECT * FROM t{n} WHERE c = {s}",
]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(_SHAPE_TEMPLATES),
    st.integers(0, 10**12),
    st.floats(0, 1e6, allow_nan=False).map(lambda f: repr(f)),
    st.text(max_size=20).map(lambda t: "'" + t.replace("'", "''") + "'"),
)
def test_shape_cache_agrees_with_a_fresh_analysis(template, n, m, s):
    sql = template.format(n=n, m=m, s=s)
    assert analyze_many(sql) == list(sqlinfo._analyze_all(sql))
