"""SQL statement analysis for span names and database span attributes.

This module owns turning raw statement text, as seen in Query/Parse messages,
into the values the tracer puts on a statement span under the OpenTelemetry
database semantic conventions:

* ``db.query.summary`` (also the span name): the operations and their targets
  in the order they appear in the text, e.g. ``SELECT users orders``,
  ``INSERT shipping_details SELECT orders``, ``SELECT SELECT orders`` for a
  select over an anonymous sub-select, ``BEGIN``, ``CALL my_proc``. Operation
  keywords and target names are kept as the application wrote them (no case
  folding, quotes kept) and the result is cut to at most 255 characters on a
  part boundary, as the conventions ask.
* ``db.operation.name``: the top-level operation of the statement (for a
  ``WITH ... INSERT`` that is the ``INSERT``), spelled as in the summary.
* ``db.collection.name``: set only when exactly one table-like relation is
  referenced (CTE names do not count), spelled as in the summary. Note that
  the current conventions text says this attribute and ``db.operation.name``
  SHOULD NOT be derived from ``db.query.text``; whether to emit them is the
  tracer's decision, this module only offers the values.
* ``db.query.text`` sanitised: every literal (strings in all their forms,
  ``E''``, ``U&''``, bit/hex strings, dollar-quoted bodies, numbers, ``TRUE``
  and ``FALSE``) becomes ``?``; ``$n`` parameters, identifiers, keywords and
  ``NULL`` stay; comments go (they carry sqlcommenter trace ids and free
  text); whitespace runs become one space; ``IN (?, ?, ...)`` lists of
  sanitised literals collapse to ``IN (?)``. Multi-row ``VALUES`` lists are
  not collapsed. Literals are replaced even in statements that also use
  ``$n`` parameters: we cannot tell a deliberate constant from a secret.

A simple Query message may hold several statements. ``analyze_many`` returns
one result per statement; ``analyze`` describes the whole message, and for
two or more statements follows the conventions' batch rules (``BATCH INSERT
t`` when every statement has the same summary, otherwise ``BATCH``).

``SqlInfo.is_write`` is true when the statement, judged by its syntax alone,
changes persistent state: INSERT, UPDATE, DELETE, MERGE (also inside a CTE),
COPY ... FROM, TRUNCATE, SELECT ... INTO, CREATE TABLE AS, REFRESH
MATERIALIZED VIEW, every CREATE/ALTER/DROP/COMMENT/GRANT/REVOKE/SECURITY
LABEL/REASSIGN OWNED/IMPORT FOREIGN SCHEMA, CALL and DO (procedures and
anonymous blocks usually exist to write), and EXPLAIN ANALYZE of a writing
statement (it runs it). It is false for plain SELECT (even ``FOR UPDATE`` or
one calling ``nextval``), EXPLAIN without ANALYZE, PREPARE and EXECUTE (the
prepared text is not visible here), transaction control, SET/SHOW, LOCK,
LISTEN/NOTIFY, VACUUM/ANALYZE/CLUSTER/REINDEX and other maintenance.

The parser is pglast (libpg_query). When a multi-statement text does not
parse, each ';'-separated piece is parsed on its own. A piece that still
fails gets a keyword heuristic over pglast's lexer tokens (only known
command words become operations; targets follow FROM/JOIN/INTO/USING/UPDATE).
Unpaired surrogates (from a lenient decode) become U+FFFD first, so every
result encodes as UTF-8. Text the lexer rejects (unterminated quotes, dollar
quotes or comments, which are then treated as running to the end, so their
content never leaks), text holding NUL or a run of 256 operator characters
(which costs PostgreSQL's lexer quadratic time), and text over ``PARSE_MAX_CHARS`` use the
same heuristic over a small regular-expression tokenizer
(:mod:`pgotel_proxy.tracing.sqlscan`, which needs no parser) that reads at most
``FALLBACK_MAX_CHARS``. Both tokenizers assume
``standard_conforming_strings = on``. Results for texts up to
``CACHE_MAX_CHARS`` are kept in an LRU cache keyed by the exact text. No
public function here raises.
"""

from __future__ import annotations

import json
import logging
import re
from bisect import bisect_left, bisect_right
from functools import lru_cache
from typing import Any, Callable

from pglast import parser as _pg

from ..shape import blank_code
from .sqlscan import (
    FALLBACK_MAX_CHARS,
    MAX_SUMMARY_CHARS,
    SqlInfo,
    guess_many,
    _COMMENT,
    _DDL_LEADS,
    _LITERAL,
    _OTHER,
    _PARAM,
    _QIDENT,
    _SEMI,
    _Token,
    _WORD,
    _heuristic_statement,
    _join_summary,
    _lead_words,
    _read_name,
    _regex_tokens,
    _render,
    _split,
)

__all__ = [
    "CACHE_MAX_CHARS",
    "CACHE_SIZE",
    "FALLBACK_MAX_CHARS",
    "MAX_SUMMARY_CHARS",
    "PARSE_MAX_CHARS",
    "SqlInfo",
    "analyze",
    "analyze_many",
    "fingerprint",
]

log = logging.getLogger(__name__)

CACHE_SIZE = 4096
# Texts longer than this are analysed every time instead of being cached, so
# that a few huge statements cannot pin megabytes in the cache.
CACHE_MAX_CHARS = 16 * 1024
# Longer texts skip the parser: building and walking its tree costs far more
# than the heuristic, and such texts are almost always bulk VALUES lists.
PARSE_MAX_CHARS = 64 * 1024



_EMPTY = SqlInfo("", None, None, "", False, 0)


_PG_LITERALS = frozenset(
    {"SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST", "TRUE_P", "FALSE_P"}
)

_SURROGATE = re.compile("[\ud800-\udfff]")
# PostgreSQL's lexer (and so pglast's) takes time quadratic in the length of a run
# of operator characters holding '+', '-' or '/*' (it re-scans the run for each
# token it cuts off): 60 KB of '+' keep it busy for 20 s. Such runs never occur
# in real statements, so text with a long one skips the parser.
_OPERATOR_RUN = re.compile(r"[~!@#^&|`?+\-*/%<>=]{256}")

_DML_TAGS = {
    "SelectStmt": "SELECT",
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
}
_WRITE_ROOTS = frozenset(
    {
        "InsertStmt",
        "UpdateStmt",
        "DeleteStmt",
        "MergeStmt",
        "TruncateStmt",
        "CreateTableAsStmt",
        "RefreshMatViewStmt",
        "CallStmt",
        "DoStmt",
    }
)
_TABLE_DROPS = frozenset(
    {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"}
)
# ---------------------------------------------------------------------------
# Tokenizers


def _pg_tokens(sql: str) -> list[_Token]:
    out: list[_Token] = []
    append = out.append
    for tok in _pg.scan(sql):
        name = tok.name
        start = tok.start
        end = tok.end + 1
        if name in _PG_LITERALS:
            append((start, end, _LITERAL, ""))
        elif name == "UIDENT" or (name == "IDENT" and sql[start] == '"'):
            append((start, end, _QIDENT, ""))
        elif name == "IDENT":
            append((start, end, _WORD, sql[start:end].upper()))
        elif tok.kind != "NO_KEYWORD":
            append((start, end, _WORD, sql[start:end].upper()))
        elif name == "PARAM":
            append((start, end, _PARAM, ""))
        elif name == "SQL_COMMENT" or name == "C_COMMENT":
            append((start, end, _COMMENT, ""))
        elif name == "ASCII_59":
            append((start, end, _SEMI, ""))
        else:
            append((start, end, _OTHER, ""))
    return out


# ---------------------------------------------------------------------------
# Parser path


class _Walker:
    """Collects operation and target events from one statement's JSON tree."""

    __slots__ = (
        "sql", "b2c", "toks", "starts", "stmt_start", "events", "ctes", "writes", "seq", "skipped",
    )

    def __init__(
        self,
        sql: str,
        b2c: Callable[[int], int],
        toks: list[_Token],
        stmt_start: int,
    ) -> None:
        self.sql = sql
        self.b2c = b2c
        self.toks = toks
        self.starts = [t[0] for t in toks]
        self.stmt_start = stmt_start
        # (char position, 0 for operation / 1 for target, depth, seq, text, relation key)
        self.events: list[tuple[int, int, int, int, str, tuple[str, str] | None]] = []
        self.ctes: set[str] = set()
        self.writes = False
        self.seq = 0
        self.skipped = -1

    def emit(
        self, pos: int, is_op: bool, depth: int, text: str, rel: tuple[str, str] | None = None
    ) -> None:
        self.seq += 1
        self.events.append((pos, 0 if is_op else 1, depth, self.seq, text, rel))

    def name_at(self, byte_loc: int) -> str:
        if byte_loc < 0:
            return ""
        pos = self.b2c(byte_loc)
        idx = bisect_left(self.starts, pos)
        if idx < len(self.starts) and self.starts[idx] == pos:
            return _read_name(self.sql, self.toks, idx)[0]
        return ""

    def keyword_before(self, pos: int, keyword: str) -> str:
        """The operation keyword as written: the nearest matching token before pos."""
        idx = bisect_right(self.starts, pos) - 1
        stop = max(-1, idx - 64)
        while idx > stop:
            tok = self.toks[idx]
            if tok[3] == keyword:
                return self.sql[tok[0] : tok[1]]
            idx -= 1
        return keyword

    def node(self, obj: Any, depth: int, parent: str | None = None) -> int:
        """Visit obj; return the smallest byte location inside it, or -1."""
        if type(obj) is list:
            best = -1
            for item in obj:
                if type(item) is dict or type(item) is list:
                    loc = self.node(item, depth, parent)
                    if loc >= 0 and (best < 0 or loc < best):
                        best = loc
            return best
        if len(obj) == 1:
            ((tag, body),) = obj.items()
            if type(body) is dict and tag[:1].isupper():
                if tag in _DML_TAGS:
                    return self.dml(tag, body, depth, parent)
                if tag == "RangeVar":
                    return self.rangevar(body, depth)
                if tag == "CommonTableExpr" and isinstance(body.get("ctename"), str):
                    self.ctes.add(body["ctename"])
                return self.children(body, depth, None)
        if "relname" in obj:
            return self.rangevar(obj, depth)
        return self.children(obj, depth, None)

    def children(
        self, body: dict, depth: int, parent: str | None, skip_with: bool = False
    ) -> int:
        """Visit the fields of body; return its smallest location (see dml for skip_with)."""
        best = -1
        skipped = -1
        for key, val in body.items():
            kind = type(val)
            if kind is dict or kind is list:
                loc = self.node(val, depth, parent)
                if skip_with and key == "withClause":
                    skipped = loc
                    continue
            elif key == "location" and kind is int:
                loc = val
            else:
                continue
            if loc >= 0 and (best < 0 or loc < best):
                best = loc
        self.skipped = skipped
        return best

    def rangevar(self, body: dict, depth: int) -> int:
        relname = body.get("relname") or ""
        schema = body.get("schemaname") or ""
        loc = body.get("location", -1)
        if not isinstance(loc, int):
            loc = -1
        text = self.name_at(loc)
        if not text:
            text = ".".join(p for p in (body.get("catalogname"), schema, relname) if p)
        pos = self.b2c(loc) if loc >= 0 else self.stmt_start
        self.emit(pos, False, depth, text, (schema, relname))
        return loc

    def dml(self, tag: str, body: dict, depth: int, parent: str | None) -> int:
        keyword = _DML_TAGS[tag]
        if tag == "SelectStmt":
            if body.get("op", "SETOP_NONE") != "SETOP_NONE":
                # A set operation has no keyword of its own: its branches do.
                best = -1
                for key, val in body.items():
                    if key in ("larg", "rarg") and type(val) is dict:
                        loc = self.dml("SelectStmt", val, depth, None)
                    elif type(val) is dict or type(val) is list:
                        loc = self.node(val, depth + 1, None)
                    else:
                        continue
                    if loc >= 0 and (best < 0 or loc < best):
                        best = loc
                return best
            if body.get("intoClause"):
                self.writes = True
            if body.get("valuesLists"):
                keyword = "" if parent == "InsertStmt" else "VALUES"
        else:
            self.writes = True
        # The operation keyword comes before everything in its statement
        # except a leading WITH clause, so the earliest location outside the
        # WITH clause sits just after it.
        loc = self.children(body, depth + 1, tag, skip_with=True)
        if keyword:
            pos = self.b2c(loc) if loc >= 0 else self.stmt_start
            self.emit(pos, True, depth, self.keyword_before(pos, keyword))
        skipped = self.skipped
        if skipped >= 0 and (loc < 0 or skipped < loc):
            return skipped
        return loc


def _explain_analyze(body: dict) -> bool:
    """Whether EXPLAIN runs its statement: ANALYZE given and not turned off."""
    for opt in body.get("options") or ():
        elem = opt.get("DefElem") if isinstance(opt, dict) else None
        if not elem or elem.get("defname") != "analyze":
            continue
        arg = elem.get("arg")
        if arg is None:
            return True
        # The JSON form leaves out zero and false values, hence the defaults.
        if "String" in arg:
            return arg["String"].get("sval", "").lower() not in ("false", "off", "no", "0")
        if "Integer" in arg:
            return arg["Integer"].get("ival", 0) != 0
        if "Boolean" in arg:
            return bool(arg["Boolean"].get("boolval", False))
        return True
    return False


def _parsed_statement(
    sql: str,
    b2c: Callable[[int], int],
    stmt: dict,
    toks: list[_Token],
) -> SqlInfo:
    ((tag, body),) = stmt.items()
    words = [t for t in toks if t[2] != _COMMENT and t[2] != _SEMI]
    start = words[0][0] if words else 0
    walker = _Walker(sql, b2c, words, start)
    lead_upper = ""
    if tag in _DML_TAGS:
        walker.node(stmt, 0)
    else:
        op_text, lead_upper, _ = _lead_words(sql, words) if words else ("", "", 0)
        walker.emit(start, True, 0, op_text or tag.removesuffix("Stmt").upper())
        if tag == "CallStmt":
            call = body.get("funccall") or {}
            name = walker.name_at(call.get("location", -1))
            if not name:
                name = ".".join(s["String"]["sval"] for s in call.get("funcname", ()) if "String" in s)
            walker.emit(start, False, 0, name)
        elif tag == "DropStmt" and body.get("removeType") in _TABLE_DROPS:
            for obj in body.get("objects") or ():
                items = obj.get("List", {}).get("items", ()) if isinstance(obj, dict) else ()
                names = [i["String"]["sval"] for i in items if isinstance(i, dict) and "String" in i]
                if names:
                    walker.emit(start, False, 0, ".".join(names), (".".join(names[:-1]), names[-1]))
        walker.children(body, 1, None)

    ordered = sorted(walker.events)
    parts = [(ev[1] == 0, ev[4]) for ev in ordered]
    summary = _join_summary(parts)
    top = next((ev[4] for ev in ordered if ev[1] == 0 and ev[2] == 0), None)
    if top is None:
        top = next((ev[4] for ev in ordered if ev[1] == 0), None)
    tables = {
        ev[4]
        for ev in ordered
        if ev[5] is not None and not (not ev[5][0] and ev[5][1] in walker.ctes)
    }
    collection = next(iter(tables)) if len(tables) == 1 else None

    if tag in _WRITE_ROOTS:
        is_write = True
    elif tag == "CopyStmt":
        is_write = bool(body.get("is_from"))
    elif tag == "SelectStmt":
        is_write = walker.writes
    elif tag == "ExplainStmt":
        is_write = walker.writes and _explain_analyze(body)
    else:
        is_write = lead_upper in _DDL_LEADS
    return SqlInfo(summary, top, collection, _render(sql, toks), is_write, 1)


def _byte_to_char(sql: str) -> Callable[[int], int]:
    if sql.isascii():
        return lambda b: b
    data = sql.encode("utf-8")
    return lambda b: len(data[:b].decode("utf-8", "ignore"))


def _parse_path(sql: str, toks: list[_Token]) -> tuple[SqlInfo, ...]:
    tree = json.loads(_pg.parse_sql_json(sql))
    b2c = _byte_to_char(sql)
    starts = [t[0] for t in toks]
    out = []
    for raw in tree.get("stmts", ()):
        loc = raw.get("stmt_location", 0)
        length = raw.get("stmt_len", 0)
        cstart = b2c(loc)
        cend = b2c(loc + length) if length else len(sql)
        lo = bisect_left(starts, cstart)
        hi = bisect_left(starts, cend)
        stmt_toks = toks[lo:hi]
        if not any(t[2] not in (_COMMENT, _SEMI) for t in stmt_toks):
            continue
        out.append(_parsed_statement(sql, b2c, raw["stmt"], stmt_toks))
    return tuple(out)



def _per_statement_path(sql: str, toks: list[_Token]) -> tuple[SqlInfo, ...]:
    """Parse each ';'-separated piece on its own, guessing only for the bad ones.

    One broken statement must not cost the others their parsed summaries.
    Splitting on ';' tokens is wrong inside BEGIN ATOMIC bodies, but such a
    piece then simply fails to parse and gets the heuristic.
    """
    out: list[SqlInfo] = []
    for stmt in _split(toks):
        first = stmt[0][0]
        piece = sql[first : stmt[-1][1]]
        shifted = [(a - first, b - first, k, w) for a, b, k, w in stmt]
        try:
            out.extend(_parse_path(piece, shifted))
        except Exception:  # noqa: BLE001 - this piece is not valid SQL to pglast
            out.append(_heuristic_statement(piece, shifted))
    return tuple(out)


# ---------------------------------------------------------------------------
# Entry points


def _analyze_all(sql: str) -> tuple[SqlInfo, ...]:
    if not sql.isascii() and _SURROGATE.search(sql) is not None:
        # The results become span attributes, which must encode as UTF-8 for export.
        sql = _SURROGATE.sub("\ufffd", sql)
    if len(sql) <= PARSE_MAX_CHARS and "\x00" not in sql and _OPERATOR_RUN.search(sql) is None:
        try:
            toks = _pg_tokens(sql)
        except Exception:  # noqa: BLE001 - lexer errors (unterminated quotes) fall back
            toks = None
        if toks is not None:
            try:
                return _parse_path(sql, toks)
            except Exception:  # noqa: BLE001 - unparsable text takes the heuristic
                pass
            try:
                return _per_statement_path(sql, toks)
            except Exception:  # noqa: BLE001
                log.debug("sql heuristic failed on lexer tokens", exc_info=True)
    return guess_many(sql)


_analyze_all_cached = lru_cache(maxsize=CACHE_SIZE)(_analyze_all)


def _combine(infos: tuple[SqlInfo, ...]) -> SqlInfo:
    if not infos:
        return _EMPTY
    if len(infos) == 1:
        return infos[0]
    # Several statements in one message are a batch in the conventions' sense.
    first = infos[0]
    same_summary = all(i.summary == first.summary for i in infos)
    summary = "BATCH"
    if same_summary and first.summary:
        prefixed = f"BATCH {first.summary}"
        # The single summary already fills the limit; cutting it again could
        # split a target, so fall back to the bare term.
        if len(prefixed) <= MAX_SUMMARY_CHARS:
            summary = prefixed
    same_op = first.operation is not None and all(i.operation == first.operation for i in infos)
    operation = f"BATCH {first.operation}" if same_op else "BATCH"
    same_coll = first.collection is not None and all(
        i.collection == first.collection for i in infos
    )
    return SqlInfo(
        summary,
        operation,
        first.collection if same_coll else None,
        "; ".join(i.sanitized for i in infos if i.sanitized),
        any(i.is_write for i in infos),
        len(infos),
    )


# Statements sent with the simple protocol carry their values inline
# ("... WHERE aid = 4711"), so their texts rarely repeat, but their shapes do.
# Everything analyze() returns is the same for two texts that differ only in
# plain string and number literals (the sanitised text has "?" for both), so a
# second cache is keyed by the text with those literals blanked out. Texts
# with anything the blanking cannot read exactly (escapes, dollar quotes,
# quoted identifiers, comments, typed or prefixed strings, parameters) skip it
# (shape.blank_code).
_shapes: dict[str, tuple[SqlInfo, ...]] = {}


def _analyze_all_shaped(sql: str) -> tuple[SqlInfo, ...]:
    # The same text again (prepared statements, ORMs, placeholders): one look-up.
    hit = _texts.get(sql)
    if hit is not None:
        return hit
    if "'" in sql or _HAS_DIGIT.search(sql):
        shape = blank_code(sql)
        if shape is not None and shape != sql:
            hit = _shapes.get(shape)
            if hit is None:
                hit = _analyze_all_cached(sql)
                if len(_shapes) >= CACHE_SIZE:
                    _shapes.clear()  # crude but bounded; refilled by the statements in use
                _shapes[shape] = hit
            return hit  # texts with literals vary per call: not kept by text
    hit = _analyze_all_cached(sql)
    if len(_texts) >= CACHE_SIZE:
        _texts.clear()
    _texts[sql] = hit
    return hit


_texts: dict[str, tuple[SqlInfo, ...]] = {}


_HAS_DIGIT = re.compile(r"\d")


def _coerce(sql: Any) -> str:
    if isinstance(sql, str):
        return sql
    if isinstance(sql, (bytes, bytearray, memoryview)):
        return bytes(sql).decode("utf-8", "replace")
    return ""


def analyze(sql: str) -> SqlInfo:
    """Describe a whole statement text (one Query or Parse message); never raises."""
    try:
        if type(sql) is str and len(sql) <= CACHE_MAX_CHARS:
            infos = _analyze_all_shaped(sql)
            return infos[0] if len(infos) == 1 else _combine(infos)
        return _combine(_analyze_all(_coerce(sql)))
    except Exception:  # noqa: BLE001 - tracing must never break the proxied session
        log.warning("sql analysis failed", exc_info=True)
        return SqlInfo("", None, None, "", False, 0)


def analyze_many(sql: str) -> list[SqlInfo]:
    """Describe each statement of a multi-statement text separately; never raises."""
    try:
        if type(sql) is str and len(sql) <= CACHE_MAX_CHARS:
            return list(_analyze_all_shaped(sql))
        return list(_analyze_all(_coerce(sql)))
    except Exception:  # noqa: BLE001
        log.warning("sql analysis failed", exc_info=True)
        return []


@lru_cache(maxsize=CACHE_SIZE)
def _fingerprint_cached(sql: str) -> str | None:
    try:
        return _pg.fingerprint(sql)
    except Exception:  # noqa: BLE001 - unparsable text has no fingerprint
        return None


def fingerprint(sql: str) -> str | None:
    """pg_query fingerprint of the text, or None when it does not parse."""
    if type(sql) is not str or "\x00" in sql or len(sql) > PARSE_MAX_CHARS or _OPERATOR_RUN.search(sql):
        return None
    if len(sql) <= CACHE_MAX_CHARS:
        return _fingerprint_cached(sql)
    return _fingerprint_cached.__wrapped__(sql)
