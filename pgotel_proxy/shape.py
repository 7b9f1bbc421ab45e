"""Statement shapes: what two statement texts that differ only in their values share.

Applications that send values inline (the simple protocol, many ORMs) send a
new text for every execution of the same statement, and instrumentations
add a new traceparent to every one. What the tracer derives from a text (the
sqlcommenter tags, the SQL summary and sanitised text, the encoded span
attributes) is the same for all texts of one shape, so the caches of
``sqlcomment``, ``tracing.sqlinfo`` and ``tracing.spans`` are keyed by shape.

* :data:`SHAPE_LITERAL` is what a shape blanks: plain string literals (with
  doubled quotes) and unsigned number literals. :func:`blind` replaces each
  with ``"\\x01"``.
* :func:`statement_key` is the key of the span builder's cache for simple
  statements: the whole text with the code's literals blanked and the
  traceparent value cut out, and the parsed traceparent.
* :class:`StatementKeys` holds its answers for the texts of one hand-over of
  records, so that the latency histograms and the span builder, which both
  key every record, compute each text's key once.

Both have a compiled version (``_shape.c``, built with the package when a C
compiler is there) and the Python version here, which gives the same answer
for every input (``tests/test_shape.py`` compares them) and serves when the
extension is missing or ``PGOTEL_PURE_PYTHON=1``.
"""

from __future__ import annotations

import re

from .protocol._impl import PURE_PYTHON

__all__ = ["SHAPE_LITERAL", "blank_code", "blind", "blind_py", "statement_key", "statement_key_py", "StatementKeys",
           "COMPILED", "MAX_CHARS"]

#: Plain string and number literals: what a literal-blind key blanks.
SHAPE_LITERAL = re.compile(r"'[^']*+(?:''[^']*+)*+'|(?<![\w$.])\d+(?:\.\d*)?(?:[eE][-+]?\d+)?(?![\w$.])")
#: What a literal-blind key cannot stand for, outside the literals it blanked: a quote
#: left open, dollar quotes (a "$" not before a digit: "$1" is a parameter, and a dollar
#: quote's tag never starts with a digit), quoted identifiers, comments, Unicode escapes,
#: typed or prefixed strings (E'', B'', X'', N'': a prefix letter before a blanked literal).
_BLANK_UNSAFE = re.compile(r"""['"]|\$(?![0-9])|--|/\*|(?<![\w$])[eEbBxXnN]\x01|[uU]&""")
_TP_TAG = "traceparent='"
_TP_VALUE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
#: Longest statement given a key (sqlcomment's shape limit).
MAX_CHARS = 8192


def blind_py(s: str) -> str:
    """``s`` with each literal of :data:`SHAPE_LITERAL` replaced by ``"\\x01"``."""
    return SHAPE_LITERAL.sub("\x01", s)


def _blank_code(code: str, blind) -> str | None:
    if "\\" in code or "\x01" in code:
        return None
    blank = blind(code)
    return blank if _BLANK_UNSAFE.search(blank) is None else None


def blank_code(code: str) -> str | None:
    """``code`` with its literals blanked when a literal-blind key may stand for it, else None.

    It may when each literal :data:`SHAPE_LITERAL` finds is one token to
    PostgreSQL's lexer whatever its content: no backslash (an escape, or any
    string with ``standard_conforming_strings`` off) and no ``\\x01`` (the
    blank itself) in the code, and :data:`_BLANK_UNSAFE` finds nothing
    outside its literals. Up to the first such construct both lexers agree,
    so none there means they agree on the whole text. Then texts that differ
    only in their literals' values share their blanked code, and their parse
    trees differ only in those values.
    """
    return _blank_code(code, blind)


def statement_key_py(sql: str) -> tuple[str, int, int, int, int] | None:
    """(key, trace_id, span_id, flags, value_start) for a keyable statement, else None.

    Keyable: an ASCII text of at most :data:`MAX_CHARS` characters, with code
    before its first "/*" (not only whitespace) that :func:`blank_code`
    accepts, and a ``traceparent='…'`` after that "/*" (its first occurrence there,
    right after "/*", "," or whitespace) holding a valid W3C value of 55
    characters (not version ff, no zero id). Nothing that
    ``spans.may_set_carrier`` could take for a carrier change ("pgotel", "all",
    "application_name" or "pg_tracing", in any case) is keyed.

    The key is the code with its literals blanked, then the rest of the text
    with the 55 characters of the value cut out. Two texts with one key lex
    the same way, token for token (each literal is one token whatever its
    content, and a value of hexadecimal digits and dashes changes nothing in
    its comment), so they differ only in their literals' values and the trace
    context: the same tags, the same summary, the same sanitised text.
    """
    if type(sql) is not str or not sql.isascii() or not 0 < len(sql) <= MAX_CHARS:
        return None
    lower = sql.lower()
    if "pgotel" in lower or "all" in lower or "application_name" in lower or "pg_tracing" in lower:
        return None
    j = sql.find("/*")
    if j <= 0 or sql[:j].isspace():
        return None
    k = sql.find(_TP_TAG, j)
    if k < 0:
        return None
    before = sql[k - 1]
    if not (sql[k - 2:k] == "/*" or before == "," or before.isspace()):
        return None
    vs = k + len(_TP_TAG)
    ve = vs + 55
    if ve >= len(sql) or sql[ve] != "'" or _TP_VALUE.fullmatch(sql, vs, ve) is None or sql.startswith("ff", vs):
        return None
    trace_id = int(sql[vs + 3:vs + 35], 16)
    span_id = int(sql[vs + 36:vs + 52], 16)
    if not trace_id or not span_id:
        return None
    blank = _blank_code(sql[:j], blind_py)
    if blank is None:
        return None
    return blank + sql[j:vs] + sql[ve:], trace_id, span_id, int(sql[vs + 53:ve], 16), vs


def _blind_compiled(s: str) -> str:
    out = _c_blind(s)
    return blind_py(s) if out is None else out


COMPILED = False
blind = blind_py
statement_key = statement_key_py
if not PURE_PYTHON:
    try:
        from ._shape import blind as _c_blind, statement_key  # type: ignore[no-redef]  # noqa: F811

        blind = _blind_compiled
        COMPILED = True
    except ImportError:  # not built (no compiler at install time): the Python versions serve
        pass


class StatementKeys(dict):
    """:func:`statement_key`'s answer for each text, as ``keys[sql]``; a text not held yet is keyed then.

    The span process keys each record twice, once for the latency histograms
    and once for the span builder, and instrumented applications send a new
    traceparent, so a new text, with every statement: no cache by text hits,
    and keying (blanking the code, reading the ids) is most of a kept
    statement's cost. The histograms, which see a hand-over's records first,
    fill one of these; the builder reads it. The span helper clears it for
    every hand-over, which bounds it.
    """

    __slots__ = ()

    def __missing__(self, sql: str):
        q = self[sql] = statement_key(sql)
        return q
