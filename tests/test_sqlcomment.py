"""Tests for the sqlcommenter parser (pgotel_proxy.sqlcomment).

Writers are re-implemented here from their documented output format (OpenTelemetry
Python's sorted ``key='urlencoded'`` list appended before ``;`` with ``%``
doubled for pyformat drivers; the sqlcommenter spec's ``encodeURIComponent`` plus
``\\'`` escaping; Datadog's prepended ``dddbs``/``dde``/``ddps``/``ddpv`` keys).
PostgreSQL's own lexer, via pglast, is the oracle for which comments are real.
"""

from __future__ import annotations

import itertools

import time
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast.parser import ParseError, scan

from pgotel_proxy import sqlcomment
from pgotel_proxy.sqlcomment import Comment, TraceContext, parse, parse_traceparent, valid_tracestate
from pgotel_proxy.stats import STATS

TP = "00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01"
TP_TRACE = 0x5BD66EF5095369C7B0D1F8F4BD33716A
TP_SPAN = 0xC532CB4098AC3DD2
TS = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


# --- writers, built from their documented formats ---------------------------------


def otel_quote(value: str) -> str:
    # urllib quoting, then '%' doubled because pyformat drivers treat it as special.
    return quote(value).replace("%", "%%")


def otel_comment(**meta: str | None) -> str:
    pairs = [f"{otel_quote(k)}={otel_quote(v)!r}" for k, v in sorted(meta.items()) if v is not None]
    return " /*" + ",".join(pairs) + "*/" if pairs else ""


def otel_add(sql: str, /, **meta: str | None) -> str:
    comment = otel_comment(**meta)
    sql = sql.rstrip()
    if sql.endswith(";"):
        return sql[:-1] + comment + ";"
    return sql + comment


def spec_quote(value: str) -> str:
    # encodeURIComponent keeps A-Z a-z 0-9 - _ . ! ~ * ' ( ); then ' is meta-escaped.
    return quote(value, safe="-_.!~*'()").replace("'", "\\'")


def spec_comment(tags: dict[str, str]) -> str:
    return "/*" + ",".join(f"{spec_quote(k)}='{spec_quote(v)}'" for k, v in sorted(tags.items())) + "*/"


# --- table of statements ------------------------------------------------------------

TABLE = [
    pytest.param(
        f"SELECT * FROM t /*action='%2Fparam*d',framework='spring',traceparent='{TP}',"
        "tracestate='congo%3Dt61rcWkgMzE%2Crojo%3D00f067aa0ba902b7'*/",
        {"action": "/param*d", "framework": "spring", "traceparent": TP, "tracestate": TS},
        (TP, TS),
        "SELECT * FROM t",
        id="spec-example",
    ),
    pytest.param(
        f"SELECT 1 /*db_driver='psycopg2',traceparent='{TP}'*/;",
        {"db_driver": "psycopg2", "traceparent": TP},
        (TP, None),
        "SELECT 1;",
        id="before-semicolon",
    ),
    pytest.param(
        f"/*dddbs='orders-db',dde='prod',ddps='orders',ddpv='1.2.3',traceparent='{TP}'*/ SELECT 1",
        {"dddbs": "orders-db", "dde": "prod", "ddps": "orders", "ddpv": "1.2.3", "traceparent": TP},
        (TP, None),
        "SELECT 1",
        id="datadog-leading",
    ),
    pytest.param(
        "SELECT 1 /*a='1'*/ /*b='2'*/",
        {"a": "1", "b": "2"},
        None,
        "SELECT 1",
        id="two-trailing",
    ),
    pytest.param(
        "/*a='lead',x='1'*/ SELECT 1 /*a='tail'*/ ;",
        {"a": "tail", "x": "1"},
        None,
        "SELECT 1;",
        id="leading-and-trailing-later-wins",
    ),
    pytest.param(
        "SELECT 1 /*a='first'*/ /*a='second'*/",
        {"a": "second"},
        None,
        "SELECT 1",
        id="later-wins-same-end",
    ),
    pytest.param(
        "SELECT 1 /* keep me */ /*a='1'*/",
        {"a": "1"},
        None,
        "SELECT 1 /* keep me */",
        id="ordinary-comment-kept",
    ),
    pytest.param(
        "/* header */ SELECT 1 /*a='1'*/ /* footer */;",
        {"a": "1"},
        None,
        "/* header */ SELECT 1 /* footer */;",
        id="ordinary-comments-around",
    ),
    pytest.param(
        "SELECT 1 /* a /* nested */ b */ /*a='1'*/",
        {"a": "1"},
        None,
        "SELECT 1 /* a /* nested */ b */",
        id="nested-ordinary-comment",
    ),
    pytest.param(
        "SELECT 1 /* a='1', b='2' */",
        {"a": "1", "b": "2"},
        None,
        "SELECT 1",
        id="spaces-inside",
    ),
    pytest.param(
        "SELECT 1 /*route='%%2Fusers%%2F42',q='50%%25'*/",
        {"route": "/users/42", "q": "50%"},
        None,
        "SELECT 1",
        id="pyformat-doubled",
    ),
    pytest.param(
        "SELECT 1 /*a='%2F',b='100%'*/",
        {"a": "/", "b": "100%"},
        None,
        "SELECT 1",
        id="single-percent-kept",
    ),
    pytest.param(
        "SELECT 1 /*a='%%zz'*/",
        {"a": "%%zz"},
        None,
        "SELECT 1",
        id="not-pyformat-doubling",
    ),
    pytest.param(
        "SELECT 1 /*name='O\\'Brien',k\\'y='v'*/",
        {"name": "O'Brien", "k'y": "v"},
        None,
        "SELECT 1",
        id="meta-escaped-quotes",
    ),
    pytest.param(
        "SELECT 1 /*route%20parameter='a%20b',e=''*/",
        {"route parameter": "a b", "e": ""},
        None,
        "SELECT 1",
        id="encoded-key-and-empty-value",
    ),
    pytest.param(
        "SELECT 1 /*a='x+y',u='%E2%82%AC'*/",
        {"a": "x+y", "u": "\u20ac"},
        None,
        "SELECT 1",
        id="plus-kept-utf8-decoded",
    ),
    pytest.param(
        "SELECT 1 /*t='%ED%A0%80'*/",
        {"t": "\ufffd\ufffd\ufffd"},
        None,
        "SELECT 1",
        id="encoded-surrogate-replaced",
    ),
    pytest.param(
        "SELECT 'it''s' AS a,\n  x FROM t\n /*a='1'*/ \n",
        {"a": "1"},
        None,
        "SELECT 'it''s' AS a,\n  x FROM t",
        id="inner-whitespace-untouched",
    ),
    pytest.param(
        "SELECT $fn$ body $fn$, a$b$ /*a='1'*/",
        {"a": "1"},
        None,
        "SELECT $fn$ body $fn$, a$b$",
        id="dollar-quote-before",
    ),
]

NOT_SQLCOMMENTER = [
    pytest.param("SELECT 1", id="no-comment"),
    pytest.param("SELECT 1 /* just a note */", id="ordinary"),
    pytest.param("SELECT 1 /* a=1 */", id="unquoted-value"),
    pytest.param("SELECT 1 /* a='1' b='2' */", id="missing-comma"),
    pytest.param("SELECT 1 /*a='1',*/", id="trailing-comma"),
    pytest.param("SELECT 1 /*='1'*/", id="empty-key"),
    pytest.param("SELECT 1 /*a='1*/", id="unterminated-value"),
    pytest.param("SELECT /*a='1'*/ 1", id="middle"),
    pytest.param("SELECT 1 /*a='1'*/ -- line comment ends the run", id="line-comment-after"),
    pytest.param("SELECT '/* a=''1'' */' FROM t", id="in-literal"),
    pytest.param("SELECT 'x /*a=''1''*/'", id="literal-at-end"),
    pytest.param("SELECT 'abc /*a='1'*/", id="literal-closed-inside"),
    pytest.param("SELECT E'\\' /*a=''1''*/'", id="e-string-backslash-quote"),
    pytest.param("SELECT $$ /*a='1'*/ $$", id="dollar-quoted"),
    pytest.param("SELECT $q$ /*a='1'*/ $q$", id="tagged-dollar-quoted"),
    pytest.param("SELECT $q$ x /*a='1'*/", id="unterminated-dollar-quote"),
    pytest.param('SELECT "col /*a=\'1\'*/"', id="quoted-identifier"),
    pytest.param("SELECT 1 -- /*a='1'*/", id="inside-line-comment"),
    pytest.param("SELECT 1 /* outer /*a='1'*/ */", id="nested-inside-ordinary"),
    pytest.param("SELECT 1 /*a='1'", id="unterminated-comment"),
]


def context_key(ctx: TraceContext | None):
    return None if ctx is None else (ctx.traceparent(), ctx.tracestate)


@pytest.mark.parametrize(("sql", "tags", "context", "stripped"), TABLE)
def test_table(sql, tags, context, stripped):
    got = parse(sql)
    assert isinstance(got, Comment)
    assert got.tags == tags
    assert context_key(got.context) == context
    assert got.stripped_sql == stripped
    assert got.invalid_traceparent is False


@pytest.mark.parametrize("sql", NOT_SQLCOMMENTER)
def test_not_sqlcommenter(sql):
    assert parse(sql) is None


def test_context_fields():
    got = parse(f"SELECT 1 /*traceparent='{TP}',tracestate='{quote(TS)}'*/")
    assert got is not None and got.context is not None
    assert got.context.trace_id == TP_TRACE
    assert got.context.span_id == TP_SPAN
    assert got.context.flags == 1 and got.context.sampled
    assert got.context.tracestate == TS
    assert got.context.traceparent() == TP


# --- OpenTelemetry writer format ----------------------------------------------------


def test_otel_writer_exact_format():
    sql = otel_add(
        "SELECT * FROM users WHERE id = %s;",
        db_driver="psycopg2:2.9.9",
        dbapi_level="2.0",
        framework="flask:3.0",
        route="/users/<id>",
        traceparent=TP,
        unset=None,
    )
    assert sql == (
        "SELECT * FROM users WHERE id = %s /*db_driver='psycopg2%%3A2.9.9',dbapi_level='2.0',"
        "framework='flask%%3A3.0',route='/users/%%3Cid%%3E',"
        f"traceparent='{TP}'*/;"
    )
    for wire in (sql, sql.replace("%%", "%")):  # without and with driver interpolation
        got = parse(wire)
        assert got is not None
        assert got.tags == {
            "db_driver": "psycopg2:2.9.9",
            "dbapi_level": "2.0",
            "framework": "flask:3.0",
            "route": "/users/<id>",
            "traceparent": TP,
        }
        assert context_key(got.context) == (TP, None)
        assert got.stripped_sql == wire.split(" /*")[0] + ";"


def test_otel_writer_after_real_pyformat_interpolation():
    # What a pyformat driver sends once it has substituted parameters.
    template = otel_add("SELECT %s, 'x' AS y", route="/a,b", traceparent=TP)
    wire = template % ("'v'",)
    got = parse(wire)
    assert got is not None
    assert got.tags["route"] == "/a,b"
    assert got.stripped_sql == "SELECT 'v', 'x' AS y"


SQL_BODIES = [
    "SELECT 1",
    "SELECT 1;",
    "SELECT 'a /* b */ c' FROM t;",
    "SELECT $$ /* x='1' */ $$",
    "UPDATE t SET v = E'it\\'s' WHERE id = $1",
    "SELECT 1 /* keep */",
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    tags=st.dictionaries(st.text(min_size=1, max_size=6), st.text(max_size=80), max_size=12),
    body=st.sampled_from(SQL_BODIES),
    interpolated=st.booleans(),
)
def test_round_trip_otel_writer(tags, body, interpolated):
    sql = otel_add(body, **tags)
    if interpolated:
        sql = sql.replace("%%", "%")
    got = parse(sql, max_len=1 << 16)
    if not tags:
        assert got is None or got.tags == {}
        return
    assert got is not None
    assert got.tags == tags
    assert got.stripped_sql == body.rstrip()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    tags=st.dictionaries(st.text(min_size=1, max_size=6), st.text(max_size=80), min_size=1, max_size=12),
    body=st.sampled_from(SQL_BODIES),
    leading=st.booleans(),
)
def test_round_trip_spec_writer(tags, body, leading):
    comment = spec_comment(tags)
    sql = f"{comment} {body}" if leading else f"{body} {comment}"
    got = parse(sql, max_len=1 << 16)
    assert got is not None
    assert got.tags == tags
    assert got.stripped_sql == body


# --- traceparent / tracestate -------------------------------------------------------


VALID_TRACEPARENTS = [
    pytest.param(TP, (TP_TRACE, TP_SPAN, 1), id="v00-sampled"),
    pytest.param(TP[:-2] + "00", (TP_TRACE, TP_SPAN, 0), id="v00-unsampled"),
    pytest.param(TP[:-2] + "ff", (TP_TRACE, TP_SPAN, 0xFF), id="v00-unknown-flags"),
    pytest.param("01" + TP[2:], (TP_TRACE, TP_SPAN, 1), id="future-version-exact"),
    pytest.param("cc" + TP[2:] + "-what-the-future-holds", (TP_TRACE, TP_SPAN, 1), id="future-version-extra"),
]

INVALID_TRACEPARENTS = [
    pytest.param("", id="empty"),
    pytest.param("ff" + TP[2:], id="version-ff"),
    pytest.param("00-" + "0" * 32 + "-c532cb4098ac3dd2-01", id="zero-trace-id"),
    pytest.param("00-5bd66ef5095369c7b0d1f8f4bd33716a-" + "0" * 16 + "-01", id="zero-parent-id"),
    pytest.param(TP.upper(), id="uppercase"),
    pytest.param("00-5BD66EF5095369C7B0D1F8F4BD33716A-c532cb4098ac3dd2-01", id="uppercase-trace-id"),
    pytest.param(TP[:-2] + "0A", id="uppercase-flags"),
    pytest.param("0A" + TP[2:], id="uppercase-version"),
    pytest.param(TP + "-extra", id="v00-extra-field"),
    pytest.param(TP + "0", id="v00-too-long"),
    pytest.param("01" + TP[2:] + "x", id="future-version-no-dash"),
    pytest.param(TP[:-1], id="too-short"),
    pytest.param("00-5bd66ef5095369c7b0d1f8f4bd33716-ac532cb4098ac3dd2-01", id="misplaced-dash"),
    pytest.param("00-5bd66ef5095369c7b0d1f8f4bd33716g-c532cb4098ac3dd2-01", id="non-hex"),
    pytest.param(TP.replace("-", "_"), id="wrong-separator"),
    pytest.param(" " + TP, id="leading-space"),
    pytest.param(TP + " ", id="trailing-space"),
    pytest.param("0-" + TP[2:], id="short-version"),
]


@pytest.mark.parametrize(("value", "expected"), VALID_TRACEPARENTS)
def test_valid_traceparent(value, expected):
    ctx = parse_traceparent(value)
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.flags) == expected
    assert ctx.traceparent() == "00" + value[2:55]


@pytest.mark.parametrize("value", INVALID_TRACEPARENTS)
def test_invalid_traceparent(value):
    assert parse_traceparent(value) is None
    before = STATS.sqlcomment_parsed_invalid_traceparent
    got = parse(f"SELECT 1 /*traceparent='{quote(value)}',tracestate='{quote(TS)}'*/")
    assert got is not None
    assert got.context is None
    assert got.invalid_traceparent is True
    assert got.tags["traceparent"] == value
    assert STATS.sqlcomment_parsed_invalid_traceparent == before + 1


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (TS, True),
        ("congo=t61rcWkgMzE , rojo=00f067aa0ba902b7", True),
        ("fw529a3039@dt=foo,,abc/def*x=1", True),
        ("a=b c", True),
        ("", False),
        ("Congo=x", False),
        ("a=b=c", False),
        ("a=", False),
        ("a=b,a=c", False),
        ("a=b ", True),
        (",".join(f"k{i}=v" for i in range(33)), False),
        ("a=" + "x" * 511, False),
        ("a=\u00e9", False),
    ],
)
def test_tracestate_validation(value, ok):
    assert valid_tracestate(value) is ok
    got = parse(f"SELECT 1 /*traceparent='{TP}',tracestate='{quote(value)}'*/")
    assert got is not None and got.context is not None
    assert got.context.tracestate == (value if ok else None)
    assert got.tags["tracestate"] == value


# --- stats and bounds ---------------------------------------------------------------


def test_stats_count():
    names = ("sqlcomment_parsed", "sqlcomment_parsed_invalid_traceparent", "sqlcomment_oversized",
             "sqlcomment_malformed")
    before = {name: getattr(STATS, name) for name in names}
    parse("SELECT 1 /*a='1'*/")
    parse("SELECT 1 /* plain */")
    parse("SELECT 1 /*" + "a" * 10_000 + "*/")
    parse("SELECT 1 /*" + ",".join(f"k{i}='v'" for i in range(70)) + "*/")
    after = {name: getattr(STATS, name) for name in names}
    assert after["sqlcomment_parsed"] - before["sqlcomment_parsed"] == 2
    assert after["sqlcomment_oversized"] - before["sqlcomment_oversized"] == 1
    assert after["sqlcomment_malformed"] - before["sqlcomment_malformed"] == 1
    assert after["sqlcomment_parsed_invalid_traceparent"] == before["sqlcomment_parsed_invalid_traceparent"]


def test_pair_and_length_caps():
    got = parse("SELECT 1 /*" + ",".join(f"k{i}='v'" for i in range(200)) + "*/")
    assert got is not None and len(got.tags) == 64 and got.stripped_sql == "SELECT 1"
    got = parse("SELECT 1 /*big='" + "x" * 5000 + "',small='1'*/")
    assert got is not None and got.tags == {"small": "1"}
    assert parse("SELECT 1 /*a='" + "x" * 9000 + "'*/") is None
    # Within max_len the comment is still recognised (and removed), but the
    # over-long value is not taken.
    got = parse("SELECT 1 /*a='" + "x" * 9000 + "'*/", max_len=16384)
    assert got is not None and got.tags == {} and got.stripped_sql == "SELECT 1"
    assert parse("SELECT 1 /*a='" + "x" * 100 + "'*/", max_len=64) is None


MB = 1 << 20
TRAILER = f"/*traceparent='{TP}'*/"
HOSTILE = {
    "megabyte-comment-end": "SELECT 1 /*" + "a" * MB + "*/",
    "megabyte-comment-start": "/*" + "a='1'," * (MB // 6) + "*/ SELECT 1",
    "megabyte-kv-pairs": "SELECT 1 /*" + ",".join(f"k{i}='v'" for i in range(MB // 8)) + "*/",
    "nested-openers": "SELECT 1 " + "/*" * (MB // 2) + "*/",
    "only-openers": "/*" * (MB // 2),
    "many-empty-comments": "SELECT 1 " + "/**/" * (MB // 4),
    "slashes": "SELECT 1 /*" + "/" * MB + "*/",
    "stars": "SELECT 1 /*" + "*" * MB + "*/",
    "quotes": "SELECT " + "'" * MB + TRAILER,
    "e-strings": "SELECT " + "E'\\" * (MB // 3) + TRAILER,
    "dollar-tags": "SELECT " + "$a$ $a$" * (MB // 7) + TRAILER,
    "dollars": "SELECT " + "$a" * (MB // 2) + TRAILER,
    "nul-and-surrogates": "SELECT 1 /*a='" + "\x00\ud800%ED%A0%80" * (MB // 16) + "'*/",
    "bulk-insert": "INSERT INTO t VALUES " + ",".join(f"({i}, 'n{i}', E'\\'x')" for i in range(MB // 24)) + TRAILER,
}


@pytest.mark.parametrize("sql", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_input_bounded(sql):
    # CPU time of this thread: what the parser costs, whatever else loads the machine.
    start = time.thread_time()
    got = parse(sql)
    elapsed = time.thread_time() - start
    assert elapsed < 2.0, f"{elapsed:.2f}s"
    assert got is None or isinstance(got, Comment)


def test_bulk_insert_trailer_found():
    got = parse(HOSTILE["bulk-insert"] + ";")
    assert got is not None and context_key(got.context) == (TP, None)
    assert got.stripped_sql.endswith("E'\\'x');")


def test_surrogates_sanitised():
    got = parse("SELECT 1 /*k\ud800='v\udfff\x00'*/")
    assert got is not None
    assert got.tags == {"k\ufffd": "v\ufffd\x00"}
    for key, value in got.tags.items():
        key.encode("utf-8"), value.encode("utf-8")


def test_non_string_input():
    assert parse(None) is None  # type: ignore[arg-type]
    assert parse(b"SELECT 1 /*a='1'*/") is None  # type: ignore[arg-type]
    assert parse_traceparent(None) is None  # type: ignore[arg-type]


# --- fuzzing ------------------------------------------------------------------------

SQLISH = st.text(alphabet="/*'\"$\\%=,;-Eeq \n\tax01", max_size=200)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.text(max_size=300), SQLISH))
def test_fuzz_never_raises(sql):
    # The private entry point has no safety net, so a bug surfaces here.
    got = sqlcomment._parse(sql, 8192) if "/*" in sql else None
    assert got == parse(sql)
    if got is not None:
        assert len(got.stripped_sql) <= len(sql)
        assert got.invalid_traceparent == ("traceparent" in got.tags and got.context is None)


def pg_comment_runs(sql: str) -> set[tuple[int, int]] | None:
    """Spans of top-level /* */ comments at the start or end, per PostgreSQL's lexer."""
    try:
        tokens = list(scan(sql))
    except ParseError:
        return None
    runs: set[tuple[int, int]] = set()
    for token in tokens:
        if token.name != "C_COMMENT":
            break
        runs.add((token.start, token.end + 1))
    for token in reversed(tokens):
        if token.name == "C_COMMENT":
            runs.add((token.start, token.end + 1))
        elif token.name != "ASCII_59":  # ';'
            break
    return runs


FRAGMENTS = [
    "SELECT", " ", "x", "'", "''", "E'", "\\'", "$$", "$q$", "a$b$", '"', "--", "\n", "/*", "*/", ";", "/* c */",
]


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.just(None)), max_size=14))
def test_real_comments_match_postgres_lexer(parts):
    sql = ""
    planted: dict[str, tuple[int, int]] = {}
    for part in parts:
        if part is None:  # plant a sqlcommenter comment with a unique key
            key = f"k{len(planted)}"
            part = f"/*{key}='v'*/"
            planted[key] = (len(sql), len(sql) + len(part))
        sql += part
    runs = pg_comment_runs(sql)
    got = parse(sql)
    if runs is None:
        return  # PostgreSQL would reject the statement; only "no exception" matters
    expected = {key for key, span in planted.items() if span in runs}
    assert set(got.tags if got else ()) == expected, sql


def test_opentelemetry_dbapi_commenter_with_unquoted_number():
    # opentelemetry-instrumentation-psycopg writes dbapi_threadsafety=2 unquoted.
    sql = (
        "select 1 /*db_driver='psycopg%%3A3.3.9',dbapi_level='2.0',dbapi_threadsafety=2,"
        "driver_paramstyle='pyformat',libpq_version=180006,"
        "traceparent='00-8c373c44edc1d911e6ee89e7a8eac7a3-b163677539d1c44e-03'*/"
    )
    c = parse(sql)
    assert c is not None and c.context is not None
    assert c.context.span_id == 0xB163677539D1C44E and c.context.sampled
    assert c.tags["dbapi_threadsafety"] == "2" and c.tags["db_driver"] == "psycopg:3.3.9"
    assert c.stripped_sql == "select 1"


def test_comment_without_any_quoted_pair_stays_ordinary():
    assert parse("select 1 /* a=b */") is None


def test_adjacent_dollar_quoted_strings():
    # Found by the lexer property test: an empty $$ string followed by another.
    got = parse("$$$$$$/*k0='v'*/$$/*k1='v'*/")
    assert got is not None and got.tags == {"k1": "v"}


def test_dollar_quote_right_after_a_closing_one():
    got = parse("$$$$$q$/*k0='v'*/$q$/*k1='v'*/")
    assert got is not None and got.tags == {"k1": "v"}
    # ... while $ after a word character continues an identifier
    got = parse("select a$$b /*k='v'*/")
    assert got is not None and got.tags == {"k": "v"}


# --- the per-shape cache (same text, new traceparent) ------------------------------

TP_FRAGMENTS = FRAGMENTS + [
    "traceparent='{tp}'", "/*traceparent='{tp}'*/", "/*a='1',traceparent='{tp}'*/", ",traceparent='{tp}'",
    "xtraceparent='{tp}'", "/*traceparent='{tp}',tracestate='k=v'*/", "'{tp}'", "*/", "/*b='2'*/",
    "$$ traceparent='{tp}' $$", "'x traceparent=''{tp}'''",
]
TRACE_VALUES = st.sampled_from([
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
])


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(TP_FRAGMENTS), max_size=10), TRACE_VALUES, TRACE_VALUES,
       st.lists(st.booleans(), min_size=10, max_size=10))
def test_shape_cache_answers_like_a_full_parse(parts, first, second, changed):
    # The first statement fills the cache; the second is the same text with
    # some of its trace values changed (all, or only some occurrences), and
    # must get what a full parse of it gives.
    pieces = "".join(parts).split("{tp}")
    sqlcomment._SHAPES.clear()
    for values in ([first] * 10, [second if c else first for c in changed]):
        sql = pieces[0] + "".join(values[i] + piece for i, piece in enumerate(pieces[1:]))
        assert parse(sql) == (sqlcomment._parse(sql, 8192) if "/*" in sql else None), sql


LITERAL_FRAGMENTS = FRAGMENTS + [
    "'{lit}'", " {num}", "x{num}", "$1", "'a''{lit}'", "E'{lit}'", "= {num}.5e3 ", "/*traceparent='{tp}'*/",
    "/*r='{lit}',traceparent='{tp}'*/", "-- '{lit}'\n", "\"{lit}\"", "U&'{lit}'",
]
LITERAL_TEXTS = ["", "x", "it''s", "'", "*/", "--", "\\", "$$", "$q$", '"', "\n", "e", "1", "a b", "é"]
LITERAL_VALUES = st.sampled_from(LITERAL_TEXTS)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(LITERAL_FRAGMENTS), max_size=10), TRACE_VALUES,
       st.lists(LITERAL_VALUES, min_size=20, max_size=20), st.lists(st.integers(0, 10**6), min_size=20, max_size=20))
def test_literal_blind_shape_cache_answers_like_a_full_parse(parts, tp, literals, numbers):
    # Texts of one shape whose literals (and numbers) differ, as simple-protocol
    # statements carry their values: each must get what a full parse gives.
    sqlcomment._SHAPES.clear()
    template = "".join(parts)
    for round_ in range(3):
        sql = template
        for i in range(20):
            sql = sql.replace("{lit}", literals[(i + round_) % 20], 1).replace("{num}", str(numbers[(i + round_) % 20]), 1)
        sql = sql.replace("{tp}", tp)
        assert parse(sql) == (sqlcomment._parse(sql, 8192) if "/*" in sql else None), sql


def test_literal_blind_shape_cache_inside_other_constructs():
    # A literal inside a dollar quote, quoted identifier, line comment or
    # escape string is no token of its own: its content can end the construct.
    # Every combination: the first text fills the cache, the second must still
    # get what a full parse gives.
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    openers = ["", "$$", "$q$", '"', "-- ", "E", "'", "/* x */", "\\", "X", "U&"]
    closers = ["", "$$", "$q$", '"', "\n", "'", "'y'"]
    for opener, closer, number, first, second in itertools.product(openers, closers, ("", "7"), ("x", "'"), LITERAL_TEXTS):
        sqlcomment._SHAPES.clear()
        for lit in (first, second):
            sql = f"SELECT {opener}'{lit}'{closer} {number} /*a='1',traceparent='{tp}'*/"
            assert parse(sql) == sqlcomment._parse(sql, 8192), sql
        sqlcomment._SHAPES.clear()
        for lit in (first, second):  # the comment in front, the code after it
            sql = f" /*a='1',traceparent='{tp}'*/ SELECT {opener}'{lit}'{closer} {number}"
            assert parse(sql) == sqlcomment._parse(sql, 8192), sql


def test_literal_blind_shape_cache_is_used():
    sqlcomment._SHAPES.clear()
    base = "SELECT * FROM t WHERE id = {} AND name = '{}' /*route='%2Fusers',traceparent='00-{:032x}-b7ad6b7169203331-01'*/;"
    for i in range(3):
        got = parse(base.format(i * 1000, "x" * i, i + 1))
        assert got.context.trace_id == i + 1 and got.tags["route"] == "/users"
        assert got.stripped_sql == f"SELECT * FROM t WHERE id = {i * 1000} AND name = '{'x' * i}';"
    assert len(sqlcomment._SHAPES) == 1


def test_shape_cache_is_used_and_bounded():
    sqlcomment._SHAPES.clear()
    base = "SELECT * FROM t WHERE id = $1 /*route='%2Fusers',traceparent='00-{}-b7ad6b7169203331-01'*/"
    for i in range(3):
        got = parse(base.format(f"{i + 1:032x}"))
        assert got.context.trace_id == i + 1 and got.tags["route"] == "/users"
        assert got.stripped_sql == "SELECT * FROM t WHERE id = $1"
    assert len(sqlcomment._SHAPES) == 1
    for i in range(sqlcomment._SHAPES_MAX + 10):
        parse(f"SELECT {i} /*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/")
    assert len(sqlcomment._SHAPES) <= sqlcomment._SHAPES_MAX


def test_literal_blind_shape_cache_is_used_with_the_comment_in_front():
    sqlcomment._SHAPES.clear()
    base = "/*route='%2Fusers',traceparent='00-{:032x}-b7ad6b7169203331-01'*/ SELECT * FROM t WHERE id = {} AND name = '{}';"
    for i in range(3):
        got = parse(base.format(i + 1, i * 1000, "x" * i))
        assert got.context.trace_id == i + 1 and got.tags["route"] == "/users"
        assert got.stripped_sql == f"SELECT * FROM t WHERE id = {i * 1000} AND name = '{'x' * i}';"
    assert len(sqlcomment._SHAPES) == 1
    # a second comment after the code: not this shape's (the full parse answers)
    got = parse(base.format(9, 1, "y") + " /*a='b'*/")
    assert got.tags["a"] == "b" and got.context.trace_id == 9
