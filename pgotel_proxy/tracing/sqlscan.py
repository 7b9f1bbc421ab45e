"""SQL read without a parser: a regular-expression tokenizer and a keyword heuristic.

What :mod:`pgotel_proxy.tracing.sqlinfo` falls back on when pglast cannot
read a text, and what the relay process uses on its own (otelwal emission
tells writes and transaction control apart with :func:`guess_many`): it
imports neither pglast nor OpenTelemetry. Only known command words become
operations; targets follow FROM/JOIN/INTO/USING/UPDATE; ``is_write`` follows
the lead word (INSERT, UPDATE, DELETE, MERGE, TRUNCATE, CALL, DO, REFRESH,
DDL), a data-modifying WITH, ``COPY ... FROM``, a top-level ``SELECT ...
INTO`` and ``EXPLAIN ANALYZE`` of a DML statement. The tokenizer assumes
``standard_conforming_strings = on``; unterminated quotes, dollar quotes and
comments run to the end of the text.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable

__all__ = ["FALLBACK_MAX_CHARS", "MAX_SUMMARY_CHARS", "SqlInfo", "guess_many"]

log = logging.getLogger(__name__)

MAX_SUMMARY_CHARS = 255

# The regex tokenizer only looks at this many characters; the sanitised text
# of anything longer is cut there and ends with " ...".
FALLBACK_MAX_CHARS = 64 * 1024


@dataclass(frozen=True, slots=True)
class SqlInfo:
    """What the tracer needs to know about one statement (or one message)."""

    summary: str
    operation: str | None
    collection: str | None
    sanitized: str
    is_write: bool
    statement_count: int


# Token kinds shared by both tokenizers.
_WORD = 0  # keyword or unquoted identifier
_QIDENT = 1  # quoted identifier
_LITERAL = 2
_PARAM = 3
_COMMENT = 4
_SEMI = 5
_OTHER = 6

# A token is (start, end_exclusive, kind, upper-cased text for words else "").
_Token = tuple[int, int, int, str]

_FALLBACK_TOKEN = re.compile(
    r"""
     (?P<ws>\s+)
    |(?P<lc>--[^\r\n]*)
    |(?P<bc>/\*)
    |(?P<param>\$\d+)
    |(?P<dq>\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z_0-9\u0080-\U0010ffff]*)?\$)
    |(?P<estr>[eE]'(?:[^'\\]|\\.|'')*'?)
    |(?P<str>(?:[bBxXnN]|[uU]&)?'(?:[^']|'')*'?)
    |(?P<qid>(?:[uU]&)?"(?:[^"]|"")*"?)
    |(?P<num>0[xXoObB][0-9A-Fa-f_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?)
    |(?P<word>[A-Za-z_\u0080-\U0010ffff][A-Za-z_0-9$\u0080-\U0010ffff]*)
    |(?P<semi>;)
    |(?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_COMMENT_EDGE = re.compile(r"/\*|\*/")
_IN_LIST = re.compile(r"\b(in)\s*\(\s*\?(?:\s*,\s*\?)+\s*\)", re.IGNORECASE)
_DDL_LEADS = frozenset(
    {"CREATE", "ALTER", "DROP", "COMMENT", "GRANT", "REVOKE", "SECURITY", "REASSIGN", "IMPORT"}
)
_DDL_MODIFIERS = frozenset(
    {
        "OR",
        "REPLACE",
        "UNIQUE",
        "CONCURRENTLY",
        "TEMP",
        "TEMPORARY",
        "UNLOGGED",
        "GLOBAL",
        "LOCAL",
        "IF",
        "NOT",
        "EXISTS",
        "RECURSIVE",
        "TRUSTED",
        "PROCEDURAL",
    }
)
_DDL_OBJECTS = frozenset(
    {
        "TABLE", "INDEX", "VIEW", "SEQUENCE", "SCHEMA", "FUNCTION", "PROCEDURE",
        "ROUTINE", "TRIGGER", "TYPE", "DOMAIN", "EXTENSION", "ROLE", "USER",
        "DATABASE", "POLICY", "RULE", "AGGREGATE", "COLLATION", "CONVERSION",
        "PUBLICATION", "SUBSCRIPTION", "SERVER", "STATISTICS", "TABLESPACE",
        "GROUP", "CAST", "LANGUAGE", "TRANSFORM", "OWNED", "SYSTEM",
        "MATERIALIZED", "FOREIGN", "EVENT", "ACCESS", "OPERATOR", "TEXT",
        "DEFAULT", "LARGE", "CONSTRAINT",
    }
)
# Object kinds spelled with more than one word: the allowed next words.
_DDL_SECOND = {
    "MATERIALIZED": {"VIEW"},
    "FOREIGN": {"TABLE", "DATA", "SERVER"},
    "EVENT": {"TRIGGER"},
    "ACCESS": {"METHOD"},
    "USER": {"MAPPING"},
    "OPERATOR": {"CLASS", "FAMILY"},
    "TEXT": {"SEARCH"},
    "DEFAULT": {"PRIVILEGES"},
    "LARGE": {"OBJECT"},
    "CONSTRAINT": {"TRIGGER"},
}
_LEAD_FOLLOW = {
    "START": ("TRANSACTION",),
    "COMMIT": ("PREPARED",),
    "ROLLBACK": ("PREPARED",),
    "PREPARE": ("TRANSACTION",),
    "REFRESH": ("MATERIALIZED", "VIEW"),
    "SECURITY": ("LABEL",),
    "IMPORT": ("FOREIGN", "SCHEMA"),
    "REASSIGN": ("OWNED",),
}
# Words that end a FROM item in the heuristic, so they are never read as an
# alias or a table name.
_CLAUSE_WORDS = frozenset(
    {
        "WHERE", "JOIN", "ON", "GROUP", "ORDER", "LIMIT", "OFFSET", "HAVING",
        "WINDOW", "UNION", "INTERSECT", "EXCEPT", "FOR", "USING", "INNER", "LEFT",
        "RIGHT", "FULL", "CROSS", "NATURAL", "RETURNING", "SET", "VALUES",
        "SELECT", "DEFAULT", "FETCH", "LATERAL", "TABLESAMPLE", "WITH", "AS",
        "FROM", "INTO", "OVERRIDING", "DO", "WHEN", "THEN", "AND", "OR", "NOT",
        "NOWAIT", "SKIP", "OF", "TO", "STDIN", "STDOUT", "ONLY", "IF", "EXISTS",
        "TABLE", "OUTER", "ROWS", "IN",
    }
)
_HEURISTIC_OPS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE"})
# Only these lead words become an operation on the heuristic path: the first
# word of text that failed to parse may be anything, and span names must stay
# low-cardinality.
_KNOWN_LEADS = frozenset(
    {
        "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "VALUES", "TABLE",
        "COPY", "BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT",
        "RELEASE", "PREPARE", "EXECUTE", "DEALLOCATE", "SET", "RESET", "SHOW", "CALL",
        "DO", "EXPLAIN", "CREATE", "ALTER", "DROP", "TRUNCATE", "GRANT", "REVOKE",
        "COMMENT", "VACUUM", "ANALYZE", "CLUSTER", "REINDEX", "LOCK", "LISTEN",
        "NOTIFY", "UNLISTEN", "DISCARD", "FETCH", "MOVE", "CLOSE", "DECLARE",
        "CHECKPOINT", "LOAD", "REFRESH", "SECURITY", "REASSIGN", "IMPORT",
    }
)




# ---------------------------------------------------------------------------
# Tokenizer (regular expressions; sqlinfo reads pglast's lexer where it can)


def _regex_tokens(sql: str) -> list[_Token]:
    out: list[_Token] = []
    append = out.append
    pos = 0
    n = len(sql)
    match = _FALLBACK_TOKEN.match
    while pos < n:
        m = match(sql, pos)
        if m is None:  # cannot happen: "other" matches any character
            break
        kind = m.lastgroup
        end = m.end()
        if kind == "ws":
            pos = end
            continue
        if kind == "bc":
            depth = 1
            while depth:
                edge = _COMMENT_EDGE.search(sql, end)
                if edge is None:
                    end = n
                    break
                end = edge.end()
                depth += 1 if edge.group() == "/*" else -1
            append((pos, end, _COMMENT, ""))
        elif kind == "lc":
            append((pos, end, _COMMENT, ""))
        elif kind == "dq":
            close = sql.find(m.group(), end)
            end = n if close < 0 else close + len(m.group())
            append((pos, end, _LITERAL, ""))
        elif kind in ("estr", "str", "num"):
            append((pos, end, _LITERAL, ""))
        elif kind == "param":
            append((pos, end, _PARAM, ""))
        elif kind == "qid":
            append((pos, end, _QIDENT, ""))
        elif kind == "word":
            word = m.group().upper()
            append((pos, end, _LITERAL if word in ("TRUE", "FALSE") else _WORD, word))
        elif kind == "semi":
            append((pos, end, _SEMI, ""))
        else:
            append((pos, end, _OTHER, ""))
        pos = end
    return out


def _render(sql: str, toks: Iterable[_Token]) -> str:
    parts: list[str] = []
    prev_end = -1
    for start, end, kind, _ in toks:
        if kind == _COMMENT or kind == _SEMI:
            continue
        if prev_end >= 0 and start > prev_end:
            parts.append(" ")
        parts.append("?" if kind == _LITERAL else sql[start:end])
        prev_end = end
    text = "".join(parts)
    if "?" in text:
        text = _IN_LIST.sub(lambda m: m.group(1) + " (?)", text)
    return text


def _split(toks: list[_Token]) -> list[list[_Token]]:
    """The statements of a token list, cut at semicolons.

    A semicolon inside the body of ``CREATE [OR REPLACE] FUNCTION | PROCEDURE
    ... BEGIN ATOMIC ... END`` (SQL-standard routine bodies, PostgreSQL 14+)
    belongs to the body: as psql does, BEGIN and CASE open a block in such a
    statement and END closes one, and only a semicolon outside every block
    ends the statement.
    """
    stmts: list[list[_Token]] = []
    cur: list[_Token] = []
    lead: list[str] | None = []  # the statement's first words, until it is known whether it creates a routine
    routine = False
    depth = 0
    for tok in toks:
        kind = tok[2]
        if kind == _SEMI and not depth:
            if cur:
                stmts.append(cur)
            cur = []
            lead = []
            routine = False
        elif kind != _COMMENT:
            cur.append(tok)
            if kind != _WORD:
                continue
            word = tok[3]
            if routine:
                if word == "BEGIN" or word == "CASE":
                    depth += 1
                elif word == "END" and depth:
                    depth -= 1
            elif lead is not None:
                lead.append(word)
                routine = _creates_routine(lead)
                if routine or not _may_create_routine(lead):
                    lead = None
    if cur:
        stmts.append(cur)
    return stmts


_ROUTINES = ("FUNCTION", "PROCEDURE")


def _creates_routine(lead: list[str]) -> bool:
    """``lead`` is CREATE FUNCTION / PROCEDURE, or the same with OR REPLACE."""
    return lead in (["CREATE", "FUNCTION"], ["CREATE", "PROCEDURE"],
                    ["CREATE", "OR", "REPLACE", "FUNCTION"], ["CREATE", "OR", "REPLACE", "PROCEDURE"])


def _may_create_routine(lead: list[str]) -> bool:
    """More words may still make ``lead`` a CREATE FUNCTION / PROCEDURE."""
    return lead in (["CREATE"], ["CREATE", "OR"], ["CREATE", "OR", "REPLACE"])


# ---------------------------------------------------------------------------
# Summary helpers


def _lead_words(sql: str, toks: list[_Token]) -> tuple[str, str, int]:
    """Return (operation as written, upper-cased lead keyword, tokens used)."""
    first = toks[0]
    if first[2] != _WORD:
        return "", "", 0
    lead = first[3]
    words = [sql[first[0] : first[1]]]
    i = 1
    if lead in ("CREATE", "ALTER", "DROP"):
        while i < len(toks) and toks[i][3] in _DDL_MODIFIERS:
            i += 1
        if i < len(toks) and toks[i][3] in _DDL_OBJECTS:
            obj = toks[i][3]
            words.append(sql[toks[i][0] : toks[i][1]])
            i += 1
            second = _DDL_SECOND.get(obj)
            if second and i < len(toks) and toks[i][3] in second:
                words.append(sql[toks[i][0] : toks[i][1]])
                i += 1
                if obj == "TEXT" and i < len(toks) and toks[i][2] == _WORD:
                    words.append(sql[toks[i][0] : toks[i][1]])
                    i += 1
    else:
        for follow in _LEAD_FOLLOW.get(lead, ()):
            if i < len(toks) and toks[i][3] == follow:
                words.append(sql[toks[i][0] : toks[i][1]])
                i += 1
            else:
                break
    return " ".join(words), lead, i


def _join_summary(parts: list[tuple[bool, str]]) -> str:
    """Join (is_operation, text) parts, dropping repeated targets of one operation."""
    out: list[str] = []
    size = 0
    seen: set[str] = set()
    for is_op, text in parts:
        if not text:
            continue
        if is_op:
            seen = set()
        elif text in seen:
            continue
        else:
            seen.add(text)
        extra = len(text) + (1 if out else 0)
        if size + extra > MAX_SUMMARY_CHARS:
            break
        out.append(text)
        size += extra
    return " ".join(out)


def _read_name(sql: str, toks: list[_Token], i: int) -> tuple[str, int]:
    """Read a possibly qualified name starting at toks[i]; return (text, next index)."""
    n = len(toks)
    if i >= n or toks[i][2] not in (_WORD, _QIDENT):
        return "", i
    start = toks[i][0]
    end = toks[i][1]
    i += 1
    while (
        i + 1 < n
        and toks[i][2] == _OTHER
        and sql[toks[i][0] : toks[i][1]] == "."
        and toks[i][0] == end
        and toks[i + 1][2] in (_WORD, _QIDENT)
    ):
        end = toks[i + 1][1]
        i += 2
    return sql[start:end], i


# ---------------------------------------------------------------------------
# Heuristic path


def _heuristic_statement(sql: str, toks: list[_Token]) -> SqlInfo:
    op_text, lead, i = _lead_words(sql, toks)
    if lead not in _KNOWN_LEADS:
        op_text, lead, i = "", "", 0
    parts: list[tuple[bool, str]] = []
    tables: list[str] = []
    top: str | None = None
    n = len(toks)

    def add_target(name: str, is_table: bool = True) -> None:
        if name:
            parts.append((False, name))
            if is_table:
                tables.append(name)

    if op_text and lead != "WITH":
        parts.append((True, op_text))
        top = op_text
        if lead in ("CREATE", "ALTER", "DROP", "TRUNCATE", "COPY", "LOCK", "CALL", "UPDATE"):
            j = i
            while j < n and toks[j][3] in ("IF", "NOT", "EXISTS", "ONLY", "TABLE", "CONCURRENTLY"):
                j += 1
            name, j = _read_name(sql, toks, j)
            upper_op = op_text.upper()
            is_table = lead in ("TRUNCATE", "COPY", "LOCK", "UPDATE") or upper_op.endswith(
                ("TABLE", "VIEW")
            )
            add_target(name, is_table)
            i = j
    elif lead == "WITH":
        i = 1

    depth = 0
    is_write = lead in _DDL_LEADS or lead in (
        "INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "CALL", "DO", "REFRESH",
    )
    saw_analyze = False
    saw_dml = False
    copy_from = None
    while i < n:
        start, end, kind, word = toks[i]
        text = sql[start:end]
        if kind == _OTHER:
            if text == "(":
                depth += 1
            elif text == ")":
                depth = max(0, depth - 1)
            i += 1
            continue
        if kind != _WORD:
            i += 1
            continue
        prev = sql[toks[i - 1][0] : toks[i - 1][1]] if i else ""
        if word == "ANALYZE":
            saw_analyze = True
        if word in _HEURISTIC_OPS and (word == "SELECT" or prev in ("(", ")") or i == 0):
            parts.append((True, text))
            if word != "SELECT":
                saw_dml = True
            if top is None and depth == 0:
                top = text
            if word == "UPDATE":
                name, i = _read_name(sql, toks, i + 1)
                while not name and i < n and toks[i][3] == "ONLY":
                    name, i = _read_name(sql, toks, i + 1)
                add_target(name)
                continue
            i += 1
            continue
        if lead == "COPY" and depth == 0 and word in ("FROM", "TO"):
            copy_from = copy_from if copy_from is not None else word == "FROM"
            i += 1
            continue
        if word in ("FROM", "JOIN", "INTO", "USING") and prev.upper() != "DISTINCT":
            if lead == "SELECT" and word == "INTO" and depth == 0:
                is_write = True
            j = i + 1
            while True:
                while j < n and toks[j][3] in ("ONLY", "LATERAL"):
                    j += 1
                if j < n and toks[j][2] == _WORD and toks[j][3] in _CLAUSE_WORDS:
                    break
                name, j = _read_name(sql, toks, j)
                if not name:
                    break
                add_target(name)
                if word != "FROM":
                    break
                # Skip an alias, then continue a comma-separated FROM list.
                if j < n and toks[j][3] == "AS":
                    j += 1
                if j < n and toks[j][2] in (_WORD, _QIDENT) and toks[j][3] not in _CLAUSE_WORDS:
                    j += 1
                if j < n and toks[j][2] == _OTHER and sql[toks[j][0] : toks[j][1]] == ",":
                    j += 1
                    continue
                break
            i = j
            continue
        i += 1

    if lead == "WITH" and saw_dml:
        is_write = True
    elif lead == "COPY":
        is_write = bool(copy_from)
    elif lead == "EXPLAIN":
        is_write = saw_analyze and saw_dml
    if top is None:
        # Without a recognised operation the targets are guesses about text
        # the server will reject anyway; do not name spans after them.
        return SqlInfo("", None, None, _render(sql, toks), False, 1)
    unique = set(tables)
    collection = next(iter(unique)) if len(unique) == 1 else None
    return SqlInfo(_join_summary(parts), top, collection, _render(sql, toks), is_write, 1)


def _heuristic_path(sql: str, toks: list[_Token]) -> tuple[SqlInfo, ...]:
    out = []
    for stmt in _split(toks):
        try:
            out.append(_heuristic_statement(sql, stmt))
        except Exception:  # noqa: BLE001 - a bad guess must not lose the statement
            log.debug("sql heuristic failed for a statement of %s chars", len(sql), exc_info=True)
            out.append(SqlInfo("", None, None, _render(sql, stmt), False, 1))
    return tuple(out)


# ---------------------------------------------------------------------------
# Entry point


def guess_many(sql: str) -> tuple[SqlInfo, ...]:
    """One SqlInfo per statement of ``sql``, by the keyword heuristic alone; never raises.

    Reads at most ``FALLBACK_MAX_CHARS``; the sanitised text of a longer one is
    cut there and ends with " ...".
    """
    truncated = len(sql) > FALLBACK_MAX_CHARS
    text = sql[:FALLBACK_MAX_CHARS] if truncated else sql
    try:
        infos = _heuristic_path(text, _regex_tokens(text))
    except Exception:  # noqa: BLE001 - last resort: say nothing rather than leak
        log.warning("sql analysis failed for a text of %s chars", len(sql), exc_info=True)
        return (SqlInfo("", None, None, "", False, 1),)
    if truncated and infos:
        last = infos[-1]
        infos = infos[:-1] + (
            SqlInfo(last.summary, last.operation, last.collection, last.sanitized + " ...",
                    last.is_write, 1),
        )
    return infos
