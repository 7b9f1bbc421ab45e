"""Statement shapes (pgotel_proxy/shape.py, compiled by Cython where it can be, interpreted otherwise).

Two kinds of checks: the compiled module answers exactly as the same source
run by the interpreter (tests/codec_twin.py loads that copy), and both as
the patterns below that say what a literal and an unsafe construct are, for
any input (a corpus and generated texts built from the characters that
matter to the lexer); and the key itself means what it says: texts that
differ only in literal values and the traceparent share a key; texts that
could lex differently, or whose comment or code differ, do not; and what the
tracer derives from two texts of one key is the same.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codec_twin import interpreted_shape
from pgotel_proxy import shape, sqlcomment
from pgotel_proxy.tracing import sqlinfo

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TP2 = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
TP3 = "00-0000000000000000000000000000abcd-00000000000000ff-01"  # ids whose high digits are zero

_twin = interpreted_shape()

# What shape.py's scans mean, as patterns (the specification they are held to; the
# scans are written a character at a time so that Cython makes C loops of them).
# A character PostgreSQL's lexer may read inside an identifier or parameter.
_WORD = "0-9A-Za-z_$\x80-\U0010ffff"
#: Plain string and unsigned number literals: what blind() blanks.
LITERAL = re.compile(rf"'[^']*+(?:''[^']*+)*+'|(?<![{_WORD}.])[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?(?![{_WORD}.])")
#: What a literal-blind key cannot stand for in blanked code (besides a backslash or
#: "\x01" in the code): a quote left open, a dollar quote, a quoted identifier, a
#: comment, a Unicode escape, a typed or prefixed string.
UNSAFE = re.compile(rf"""['"]|\$(?![0-9])|--|/\*|(?<![{_WORD}])[eEbBxXnN]\x01|[uU]&""")


def _blank_code_spec(code: str) -> str | None:
    if "\\" in code or "\x01" in code:
        return None
    blank = LITERAL.sub("\x01", code)
    return None if UNSAFE.search(blank) else blank


def _agree(text: str) -> None:
    """The compiled and interpreted builds give the same answers, and blind/blank_code the specified ones."""
    assert shape.statement_key(text) == _twin.statement_key(text)
    assert shape.blind(text) == _twin.blind(text) == LITERAL.sub("\x01", text)
    assert shape.blank_code(text) == _twin.blank_code(text) == _blank_code_spec(text)


def test_shape_is_compiled_where_ci_expects_it():
    # .ci/run sets this: a machine with a C compiler must not silently lose the compiled shapes.
    if os.environ.get("PGOTEL_EXPECT_COMPILED") and not os.environ.get("PGOTEL_PURE_PYTHON"):
        assert shape.COMPILED, "pgotel_proxy.shape was not compiled"


CORPUS = [
    "",
    "SELECT 1",
    "SELECT 'a''b', 1.5e-3, 2., .5, 7e, 1e+, x1, $1, t.2, 3.4.5 /*c*/",
    f"SELECT abalance FROM pgbench_accounts WHERE aid = 4711 /*traceparent='{TP}'*/;",
    f"SELECT * FROM t WHERE name = 'x' AND n IN (1, 2) /*route='%2Fa',traceparent='{TP}'*/",
    f"  /*traceparent='{TP}'*/ SELECT 1",
    f"SELECT 'open /*traceparent='{TP}'*/",
    f"SELECT E'a' /*traceparent='{TP}'*/",
    f"SELECT THEN'a' /*traceparent='{TP}'*/",
    f"SELECT $$x$$ /*traceparent='{TP}'*/",
    f'SELECT "Col" FROM t /*traceparent=\'{TP}\'*/',
    f"SELECT 1 -- x\n/*traceparent='{TP}'*/",
    f"SELECT U&'d' /*traceparent='{TP}'*/",
    f"SELECT 'a\\b' /*traceparent='{TP}'*/",
    f"SELECT \x01 /*traceparent='{TP}'*/",
    f"SELECT 1 /*traceparent='{TP.replace('00-', 'ff-', 1)}'*/",
    "SELECT 1 /*traceparent='00-00000000000000000000000000000000-b7ad6b7169203331-01'*/",
    "SELECT 1 /*traceparent='00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01'*/",
    f"SELECT 1 /*traceparent='{TP.upper()}'*/",
    f"SELECT 1 /*traceparent='{TP}x'*/",
    f"SELECT 1 /*xtraceparent='{TP}'*/",
    f"SELECT 1 /*a='b', traceparent='{TP}'*/",
    f"SELECT 1 FROM calls /*traceparent='{TP}'*/",
    f"SELECT set_config('pgotel.traceparent', '1', false) /*traceparent='{TP}'*/",
    f"SELECT 'é' /*traceparent='{TP}'*/",
    f"SELECT 1 /*traceparent='{TP}'*/" + " " * 8200,
    *(f"SELECT {p}'1' /*traceparent='{TP}'*/" for p in "eEbBxXnN"),
    *(f"SELECT a{p}'1', ({p}'1'), '1'{p}'1' /*traceparent='{TP}'*/" for p in "eEbBxXnN"),
    f"SELECT $1, $x, $ /*traceparent='{TP}'*/",
    f"SELECT a -- b /*traceparent='{TP}'*/",
    f"SELECT u&x, U&'x' /*traceparent='{TP}'*/",
    "SELECT ''', ''''', '''', 1.2.3, 1e+5x, 1e+5, 1.e5, .5, 5., x.5, 1$, '' ''",
    "'a'", "1", "'", "''", "a'b'c'", "é'a'1",
]


@pytest.mark.parametrize("text", CORPUS)
def test_compiled_and_interpreted_agree_on_the_corpus(text):
    _agree(text)


_pieces = st.sampled_from(
    list("abeEnNxXuUlL&$\"\\'-.0123459 _,;/*()=+\x01\t\n\x1c") + ["traceparent='", TP, TP2, "/*", "*/", "1.5e3", "''",
                                                                "ff", "all", "pgotel", "é", "AlL", "PGotel",
                                                                "Application_Name", "pg_TRACING", "pg_trac", TP3])


@settings(max_examples=3000, deadline=None)
@given(code=st.lists(_pieces, max_size=12), comment=st.lists(_pieces, max_size=5), framed=st.booleans())
def test_compiled_and_interpreted_agree_on_any_text(code, comment, framed):
    text = "".join(code)
    if framed:
        text = f"SELECT {text} /*{''.join(comment)}traceparent='{TP}'{''.join(comment)}*/"
    _agree(text)


def _key(sql: str):
    k = shape.statement_key(sql)
    return None if k is None else k[0]


def test_texts_that_differ_in_values_and_trace_context_share_a_key():
    a = f"SELECT * FROM t WHERE id = 1 AND s = 'x' AND f = 1.5 /*route='%2Fa',traceparent='{TP}'*/;"
    b = f"SELECT * FROM t WHERE id = 123456 AND s = 'it''s' AND f = 2e10 /*route='%2Fa',traceparent='{TP2}'*/;"
    assert _key(a) is not None and _key(a) == _key(b)
    ka, kb = shape.statement_key(a), shape.statement_key(b)
    assert (ka[1], ka[2], ka[3]) == (int(TP[3:35], 16), int(TP[36:52], 16), 1)
    assert (kb[1], kb[2], kb[3]) == (int(TP2[3:35], 16), int(TP2[36:52], 16), 0)
    assert a[ka[4]:ka[4] + 55] == TP
    # what the tracer derives from them is the same
    ca, cb = sqlcomment.parse(a), sqlcomment.parse(b)
    assert {k: v for k, v in ca.tags.items() if k != "traceparent"} == {
        k: v for k, v in cb.tags.items() if k != "traceparent"}
    assert sqlinfo.analyze_many(ca.stripped_sql) == sqlinfo.analyze_many(cb.stripped_sql)


@pytest.mark.parametrize("other", [
    f"SELECT * FROM u WHERE id = 1 /*traceparent='{TP}'*/",  # another table
    f"SELECT * FROM t WHERE id = 1 /*route='%2Fb',traceparent='{TP}'*/",  # another tag
    f"SELECT * FROM t WHERE id = x1 /*traceparent='{TP}'*/",  # an identifier, not a number
    f"SELECT * FROM t WHERE id = 1 /*traceparent='{TP}'*/;",  # something after the comment
    f"SELECT * FROM t  WHERE id = 1 /*traceparent='{TP}'*/",  # other whitespace
])
def test_texts_that_differ_elsewhere_do_not_share_a_key(other):
    base = f"SELECT * FROM t WHERE id = 7 /*traceparent='{TP}'*/"
    assert _key(base) is not None and _key(other) is not None
    assert _key(base) != _key(other)


@pytest.mark.parametrize("sql", [
    f"/*traceparent='{TP}'*/ SELECT 1",  # the comment first
    f"SELECT E'a' /*traceparent='{TP}'*/",  # a prefixed string
    f"SELECT X'1f' /*traceparent='{TP}'*/",
    f"SELECT n'a' /*traceparent='{TP}'*/",
    f"SELECT $$a$$ /*traceparent='{TP}'*/",  # dollar quotes
    f"SELECT $a$x$a$ /*traceparent='{TP}'*/",
    f"SELECT $1$a$ /*traceparent='{TP}'*/",  # a parameter, then a dollar quote
    f"SELECT $ 1 /*traceparent='{TP}'*/",
    f'SELECT "a" /*traceparent=\'{TP}\'*/',  # a quoted identifier
    f"SELECT 1 -- a\n/*traceparent='{TP}'*/",  # a line comment
    f"SELECT 'a\\' /*traceparent='{TP}'*/",  # a backslash
    f"SELECT U&'a' /*traceparent='{TP}'*/",
    f"SELECT 'open /*traceparent='{TP}'*/",  # a quote left open
    f"SELECT \x01 /*traceparent='{TP}'*/",  # the blank itself
    f"SELECT 'é' /*traceparent='{TP}'*/",  # not ASCII
    f"SELECT 1 /*traceparent='{TP}'*/" + " " * shape.MAX_CHARS,  # too long
    f"SELECT 1 /*traceparent='ff{TP[2:]}'*/",  # version ff
    f"SELECT 1 /*traceparent='{TP[:3]}{'0' * 32}{TP[35:]}'*/",  # a zero id
    f"SELECT 1 /*traceparent='{TP.upper()}'*/",
    f"SELECT 1 /*xtraceparent='{TP}'*/",
    f"RESET ALL /*traceparent='{TP}'*/",  # could change the session carrier
    f"SELECT set_config('pgotel.traceparent', 'x', false) /*traceparent='{TP}'*/",
    f"SELECT 1 FROM t UNION aLl SELECT 2 /*traceparent='{TP}'*/",  # the carrier words in any case
    f"SELECT current_setting('Application_Name') /*traceparent='{TP}'*/",
    f"SELECT current_setting('PG_TRACING.trace_context') /*traceparent='{TP}'*/",
    f"SELECT 1 /*PgOtel=1,traceparent='{TP}'*/",
    f"SELECT 1 /*traceparent='{TP}'*/ -- ALL",  # at the very end
    # texts without a comment (keyed as code alone) that a literal-blind key cannot stand for
    "SELECT 1 -- a line comment",
    "SELECT E'a'",
    "SELECT $$a$$",
    'SELECT "a" FROM t',
    "SELECT 'a\\'",
    "SELECT 'open",
    "SELECT 'é'",
    "SELECT 1" + " " * shape.MAX_CHARS,
    "RESET ALL",
    "SET application_name = 'x'",
    "SELECT set_config('pgotel.traceparent', 'x', false)",
    "SELECT 1 FROM t UNION aLl SELECT 2",
    "",
])
def test_texts_a_key_cannot_stand_for_have_none(sql):
    assert shape.statement_key(sql) is None
    assert _twin.statement_key(sql) is None


@pytest.mark.parametrize("sql", [
    f"SELECT al, pg_trac, applicationname FROM pgotel_ /*traceparent='{TP}'*/".replace("pgotel_", "pgote"),
    f"SELECT application\x7fname /*traceparent='{TP}'*/",  # DEL is no underscore in any case
    f"SELECT a, p /*traceparent='{TP}'*/",
])
def test_near_misses_of_the_carrier_words_are_keyed(sql):
    assert shape.statement_key(sql) is not None
    assert _twin.statement_key(sql) == shape.statement_key(sql)


def test_parameters_share_a_key_across_trace_contexts():
    """Extended-protocol texts ($1, $2) are keyed: "$" before a digit never opens a dollar quote."""
    a = f"SELECT * FROM t WHERE id = $1 AND n > $12 AND s = 'x' /*traceparent='{TP}'*/"
    b = f"SELECT * FROM t WHERE id = $1 AND n > $12 AND s = 'y' /*traceparent='{TP2}'*/"
    assert _key(a) is not None and _key(a) == _key(b) and "$1 AND n > $12" in _key(a)
    assert _twin.statement_key(a) == shape.statement_key(a)
    assert _key(a) != _key(a.replace("$12", "$13"))
    assert sqlinfo.analyze_many(sqlcomment.parse(a).stripped_sql) == sqlinfo.analyze_many(
        sqlcomment.parse(b).stripped_sql)


def test_blank_code_blanks_only_what_lexes_as_one_token():
    assert shape.blank_code("SELECT 'a''b', 1.5e3, x1, t.2 FROM t2") == "SELECT \x01, \x01, x1, t.2 FROM t2"
    assert shape.blank_code("SELECT THEN'a'") == "SELECT THEN\x01"
    assert shape.blank_code("SELECT '--', '$', '\"', '/*'") == "SELECT \x01, \x01, \x01, \x01"
    for unsafe in ("SELECT n'a'", "SELECT 'a' -- c", "SELECT 'a", "SELECT $x$a$x$", "SELECT 'a\\'", "SELECT u&'a'"):
        assert shape.blank_code(unsafe) is None, unsafe


@pytest.mark.parametrize("a, b, key", [
    # values inline, no sqlcommenter: value start -1
    ("SELECT * FROM t WHERE id = 1 AND s = 'x' AND f = 1.5", "SELECT * FROM t WHERE id = 123456 AND s = 'it''s' AND f = 2e10",
     ("SELECT * FROM t WHERE id = \x01 AND s = \x01 AND f = \x01", 0, 0, 0, -1)),
    # other tags alone (Rails' query log tags): the comment as it is, value start -2
    ("SELECT * FROM t WHERE id = 1 /*application='shop',controller='users'*/",
     "SELECT * FROM t WHERE id = 99 /*application='shop',controller='users'*/",
     ("SELECT * FROM t WHERE id = \x01 /*application='shop',controller='users'*/", 0, 0, 0, -2)),
])
def test_texts_without_a_traceparent_share_a_key_without_a_context(a, b, key):
    """One key for every value, and trace id 0: no context of their own; the same analysis and tags."""
    assert shape.statement_key(a) == shape.statement_key(b) == key
    assert _twin.statement_key(a) == shape.statement_key(a)
    assert sqlinfo.analyze_many(a) == sqlinfo.analyze_many(b)
    assert (sqlcomment.parse(a) and sqlcomment.parse(a).tags) == (sqlcomment.parse(b) and sqlcomment.parse(b).tags)


def test_keys_without_a_context_stand_for_their_text_alone():
    assert shape.statement_key("SELECT now()") == ("SELECT now()", 0, 0, 0, -1)  # no literal: the text itself
    assert _key("SELECT * FROM t WHERE id = $1") == "SELECT * FROM t WHERE id = $1"
    tagged = "SELECT * FROM t WHERE id = 1 /*controller='users'*/"
    assert _key(tagged) != _key(tagged.replace("users", "orders"))  # another tag value: another key
    assert _key("SELECT 1 /*route='x'*/ -- ALL") is None  # the carrier words anywhere
    # never the key of a text with a traceparent: those keep their "/*", less the value
    plain = "SELECT * FROM t WHERE id = 1"
    assert _key(plain) != _key(f"{plain} /*traceparent='{TP}'*/") and "/*" in _key(f"{plain} /*traceparent='{TP}'*/")


def test_statement_keys_hold_statement_key_answers():
    keys = shape.StatementKeys()
    keyed = f"SELECT * FROM t WHERE id = 7 /*traceparent='{TP}'*/"
    assert keys[keyed] == shape.statement_key(keyed) is not None
    assert keys["SELECT 1 -- c"] is None and keys[""] is None  # no key, remembered as such
    assert keys["SELECT 1"] == ("SELECT \x01", 0, 0, 0, -1)
    assert set(keys) == {keyed, "SELECT 1 -- c", "", "SELECT 1"}


def test_blind_reads_non_ascii_as_postgresql_does():
    """Any non-ASCII character may be part of an identifier to PostgreSQL: a digit after one, or a
    non-ASCII digit, is no number literal; string literals with non-ASCII content are blanked."""
    assert shape.blind("SELECT ٣, é1, 'é', 2") == "SELECT ٣, é1, \x01, \x01"
    assert shape.blank_code("SELECT 'Zürich', 7") == "SELECT \x01, \x01"
