"""sqlcommenter comment parsing: the proxy's view of trace context sent inside SQL.

This module owns recognising sqlcommenter-style comments (``/*key='value',...*/``)
at the start or the end of a statement, decoding their tags, validating the W3C
``traceparent`` / ``tracestate`` they may carry, and producing the statement
text with those comments removed.  It is stdlib-only and called on every traced
statement, so the common paths are cheap and every path is bounded.

Rules this parser follows (the places where the spec leaves room):

* Positions.  Only comments at the very start (after whitespace) or at the very
  end (before any mix of whitespace and ``;``) are considered; a comment in the
  middle of a statement is never a sqlcommenter comment.  Several comments in a
  row at either end are all examined; comments that are not ``key='value'``
  lists are ordinary comments and stay in ``stripped_sql``.  Line comments
  (``--``) end the run of comments.
* Merging.  When several sqlcommenter comments are present their tags are merged
  in text order and the later one wins on a duplicate key (so a trailing comment
  beats a leading one).  Instrumentation layers append their comment last, so
  the innermost, most recent context is the one that survives.
* Literals.  A trailing comment is only accepted after a lexical pass that knows
  PostgreSQL's string forms ('...' with doubled quotes, E'...' with backslash
  escapes, "identifiers", $tag$ dollar quotes $tag$, nested block comments), so a
  fake comment inside a literal is never picked up.  ``standard_conforming_strings
  = off`` is not modelled.
* Pyformat doubling.  Python pyformat drivers require ``%`` to be written as
  ``%%`` and the OpenTelemetry writer therefore doubles it; whether the driver
  undoes that depends on whether the statement had parameters.  A correctly
  percent-encoded token never contains ``%%`` (every ``%`` there starts a
  ``%XX`` escape), so a key or value is un-doubled exactly when every ``%`` in it
  is part of a ``%%XX`` group.
* Decoding.  Percent-decoding is UTF-8 with replacement characters; ``+`` is kept
  literally (the spec asks for URL *component* encoding, where space is
  ``%20``).  ``\\x`` inside a value or key stands for ``x``.  Lone surrogates are
  replaced so tags are always encodable.
* Bounds.  A comment longer than ``max_len`` characters is not examined; at most
  ``_MAX_COMMENTS`` comments per end, ``_MAX_PAIRS`` pairs per comment,
  ``_MAX_TAGS`` distinct keys in all (``traceparent`` and ``tracestate`` are
  taken beyond that), and keys / values up to ``_MAX_KEY_LEN`` /
  ``_MAX_VALUE_LEN`` raw characters are taken.
  Nothing here raises on any input.
"""

from __future__ import annotations

import logging
import re
from typing import NamedTuple
from urllib.parse import unquote

from .shape import blank_code
from .stats import STATS

__all__ = [
    "Comment",
    "TraceContext",
    "context_of_tags",
    "parse",
    "parse_traceparent",
    "valid_tracestate",
]

logger = logging.getLogger(__name__)

_MAX_COMMENTS = 16
_MAX_PAIRS = 64
_MAX_TAGS = 64  # over all comments of a statement; the trace context keys always fit
_CONTEXT_KEYS = ("traceparent", "tracestate")
_MAX_KEY_LEN = 128
_MAX_VALUE_LEN = 2048
_MAX_TRACESTATE_LEN = 512
_MAX_TRACESTATE_MEMBERS = 32
# Nested comments and tagged dollar quotes are walked in Python, one step at a
# time; this caps that work for pathological input such as megabytes of "/*/*".
_MAX_SLOW_STEPS = 4096

_WS = " \t\n\r\f\v"
_WS_RUN = re.compile(r"[ \t\n\r\f\v]*")
_GAP_RUN = re.compile(r"[ \t\n\r\f\v;]*")
_COMMENT_TOKEN = re.compile(r"/\*|\*/")

# One pass over a statement, in C.  Each iteration eats optional "trivia"
# (whitespace, semicolons, block comments without nesting) and then one code
# token, so a match ends exactly at the end of the last code token it saw: that
# is where the trailing run of comments can start.  A plain code run may hold
# inner whitespace (fewer, longer tokens) but never ends on whitespace or ';'.
# The pattern has no capturing groups on purpose: CPython 3.11 mis-tracks group
# spans inside possessive repeats that backtrack.  Tagged dollar quotes need a
# back-reference and nested comments need counting, so the pattern stops in
# front of those and the caller walks them.  String bodies run to the end of
# input when unterminated, as PostgreSQL's would, hiding anything after them.
# A run of $ right after a word character continues an identifier (a$$b) and
# is eaten whole, so a $ that follows a $ is never taken for one: after a
# closing $$ the next $ opens a new dollar quote ($$$$$q$ x $q$).
_TRIVIA = r"""
    (?:
        [ \t\n\r\f\v;]++
      | /\*(?:[^*/]++|\*(?!/)|/(?!\*))*+\*/
    )*+
"""
_LEX = re.compile(
    r"""
    (?:
    """
    + _TRIVIA
    + r"""
        (?:
            [^'"$/\-]*[^'"$/\-\ \t\n\r\f\v;]
          | (?<=[eE])(?<![\w$][eE])'(?:[^'\\]++|\\.?|'')*+(?:'|\Z)
          | '[^']*+(?:''[^']*+)*+(?:'|\Z)
          | "[^"]*+(?:""[^"]*+)*+(?:"|\Z)
          | (?<!\w)\$\$(?:.*?\$\$|.*\Z)
          | --[^\r\n]*+
          | /(?!\*)
          | -
          | (?<=\w)\$++
          | \$(?![^\W\d]\w*\$)
        )
    )*+
    """,
    re.VERBOSE | re.DOTALL,
)
_TRIVIA_RUN = re.compile(_TRIVIA, re.VERBOSE | re.DOTALL)
_DOLLAR_TAG = re.compile(r"\$[^\W\d]\w*\$")

# Keys are unquoted URL-encoded tokens; values are single-quoted with backslash
# escapes.  Whitespace around pairs and commas is tolerated because some writers
# emit "/* k='v' */".  Some writers leave numbers unquoted (OpenTelemetry's
# dbapi commenter writes dbapi_threadsafety=2), so a bare value is accepted
# too, as long as the comment has at least one quoted pair.
_PAIR = re.compile(
    r"""
    [ \t\n\r\f\v]*
    ((?:[^\s=',\\]|\\.)+)
    =(?:
    '([^'\\]*+(?:\\.[^'\\]*+)*+)'
    |([^\s=',\\]+)
    )
    [ \t\n\r\f\v]*
    (,?)
    """,
    re.VERBOSE | re.DOTALL,
)
_BACKSLASH_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_PYFORMAT_DOUBLED = re.compile(r"(?:[^%]|%%[0-9A-Fa-f]{2})*")
_SURROGATE = re.compile("[\ud800-\udfff]")

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACESTATE_MEMBER = re.compile(
    r"""
    (?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})
    =
    [\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]
    """,
    re.VERBOSE,
)


class TraceContext(NamedTuple):
    """A validated W3C trace context taken from a sqlcommenter comment.

    (A named tuple: made for every traced statement, and a frozen dataclass
    costs noticeably more to construct.)
    """

    trace_id: int
    span_id: int
    flags: int
    tracestate: str | None = None

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 0x01)

    def traceparent(self) -> str:
        # Always version 00: a forward-compatible parse only keeps the 00 fields,
        # and W3C asks a participant to emit the version it implements.
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags:02x}"


class Comment(NamedTuple):
    """The sqlcommenter content found on one statement."""

    tags: dict[str, str]
    context: TraceContext | None
    stripped_sql: str
    invalid_traceparent: bool


def parse_traceparent(value: str) -> TraceContext | None:
    """Strictly validate a W3C ``traceparent`` value; ``None`` when invalid."""
    if not isinstance(value, str) or len(value) < 55:
        return None
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version = m.group(1)
    if version == "ff":
        return None
    if len(value) != 55:
        # Version 00 has exactly four fields; a later version may append more,
        # but only after a '-' so the 00 fields stay where they are.
        if version == "00" or value[55] != "-":
            return None
    trace_id = int(m.group(2), 16)
    span_id = int(m.group(3), 16)
    if trace_id == 0 or span_id == 0:
        return None
    return TraceContext(trace_id, span_id, int(m.group(4), 16))


def context_of_tags(body: str) -> TraceContext | None:
    """The trace context in a bare list of sqlcommenter tags (``traceparent='00-…'``), None without one.

    pg_tracing's ``pg_tracing.trace_context`` setting holds such a list, without
    the comment marks. Nothing is counted: a setting is no statement comment.
    """
    if not isinstance(body, str) or len(body) > _MAX_VALUE_LEN or "traceparent" not in body:
        return None
    tags: dict[str, str] = {}
    if not _read_pairs(body, 0, len(body), tags, _Budget()):
        return None
    context = parse_traceparent(tags.get("traceparent", ""))
    if context is None:
        return None
    tracestate = tags.get("tracestate")
    if tracestate is not None and valid_tracestate(tracestate):
        context = context._replace(tracestate=tracestate)
    return context


def valid_tracestate(value: str) -> bool:
    """True when ``value`` is a sane W3C ``tracestate`` list (size and syntax)."""
    if not isinstance(value, str) or len(value) > _MAX_TRACESTATE_LEN:
        return False
    members = value.split(",")
    if len(members) > _MAX_TRACESTATE_MEMBERS:
        return False
    seen: set[str] = set()
    for member in members:
        member = member.strip(" \t")
        if not member:
            continue  # empty list-members are allowed by the grammar
        if _TRACESTATE_MEMBER.fullmatch(member) is None:
            return False
        key = member.partition("=")[0]
        if key in seen:
            return False
        seen.add(key)
    return bool(seen)


def parse(sql: str, *, max_len: int = 8192) -> Comment | None:
    """Extract sqlcommenter tags from ``sql``; ``None`` when it carries none.

    Never raises: anything unexpected is counted as malformed and ignored.
    """
    if not isinstance(sql, str) or "/*" not in sql:
        return None
    try:
        max_len = max(int(max_len), 4)
        m = None
        if len(sql) <= _SHAPE_MAX_CHARS:
            # str.find first: the pattern's look-behinds make a search from the start slow.
            i = sql.find("traceparent='")
            if i >= 0:
                m = _TP_VALUE.search(sql, i)
        if m is None or sql.count(m.group(1)) != 1:
            return _parse(sql, max_len)
        return _parse_shaped(sql, m, max_len)
    except Exception:  # pragma: no cover - a bug here must not break tracing
        STATS.sqlcomment_malformed += 1
        logger.exception("sqlcommenter parse failed for a %s-char statement", len(sql))
        return None


class _Budget:
    """Per-call bookkeeping so each kind of problem is counted once per statement."""

    __slots__ = ("oversized", "malformed")

    def __init__(self) -> None:
        self.oversized = False
        self.malformed = False


# Statements repeat with only their traceparent changed: the same text, the
# same comment, a new trace id. Such a value ([0-9a-f] and single '-') cannot
# change how the text lexes, so what parsing found (tags, stripped text) is
# kept per text-around-the-value, and a repeat costs a search, a look-up and
# the value's own check. Kept only when the value came from a sqlcommenter
# comment and is nowhere in the stripped text, and the parse was clean.
_TP_VALUE = re.compile(r"(?:(?<=/\*)|(?<=[,\s]))traceparent='([0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2})'")
_SHAPES: dict[tuple, tuple] = {}
_HAS_DIGIT = re.compile(r"\d")
_SHAPES_MAX = 4096
_SHAPE_MAX_CHARS = 8192


def _blind_code(sql: str, value_start: int, value_end: int) -> tuple[int, str, int] | None:
    """Where the code is and its literals blanked, when a literal-blind key is safe; else None.

    Statements sent with the simple protocol carry their values inline, so
    their texts (and the text around the traceparent value) rarely repeat;
    their shapes do. The code is the text before the first "/*" when there
    is any (sqlcommenter appends its comment), else the text after the end of
    the comment holding the value (a comment put in front, as some ORMs do),
    which then must hold no comment mark itself. When shape.blank_code takes
    the code, each literal is one token to the lexer whatever its content,
    so the parse of the rest is the same for every text of this shape: only
    positions after the code move with the literals' lengths.

    Returns (base, blanked code, tail): for code in front, base is where the
    first "/*" is and tail is 0; for a leading comment, base is 0 and tail is
    where the code after it starts.
    """
    j = sql.find("/*")
    if j < 0 or value_start < j:
        return None
    tail = 0
    if j == 0 or sql[:j].isspace():
        end = sql.find("*/", value_end)
        if end < 0:
            return None
        tail = end + 2
        code = sql[tail:]
        if "/*" in code or "*/" in code:
            return None
        j = 0
    else:
        code = sql[:j]
    blank = blank_code(code)
    if blank is None or blank == code:
        return None
    return j, blank, tail


def _parse_shaped(sql: str, m: re.Match, max_len: int) -> Comment | None:
    value = m.group(1)
    vs, ve = m.span(1)
    base = 0
    blinded = None
    key = (sql[:vs], sql[ve:], max_len)
    hit = _SHAPES.get(key)
    if hit is None and ("'" in sql or _HAS_DIGIT.search(sql) is not None):
        blinded = _blind_code(sql, vs, ve)
        if blinded is not None:
            base, blank, tail = blinded
            if tail:
                # A leading comment, the code after it: keyed by the comment and the code's
                # shape; comment positions (all before the code) kept as they are.
                key = ("lead", sql[:vs], sql[ve:tail], blank, max_len)
            else:
                # Code, then comments: keyed by the shape; comment positions (all at or
                # after the first "/*") kept relative to it.
                key = (blank, sql[base:vs], key[1], max_len)
            hit = _SHAPES.get(key)
    if hit is None:
        before = (STATS.sqlcomment_oversized, STATS.sqlcomment_malformed)
        spans: list[tuple[int, int]] = []
        comment = _parse(sql, max_len, spans)
        if (comment is not None and comment.tags.get("traceparent") == value
                and value not in comment.stripped_sql and before == (STATS.sqlcomment_oversized, STATS.sqlcomment_malformed)):
            tracestate = comment.tags.get("tracestate")
            if tracestate is not None and not valid_tracestate(tracestate):
                tracestate = None
            if len(_SHAPES) >= _SHAPES_MAX:
                _SHAPES.clear()
            kept = comment.stripped_sql if blinded is None else tuple((a - base, b - base) for a, b in spans)
            _SHAPES[key] = (comment.tags, kept, tracestate)
        return comment
    tags, stripped, tracestate = hit
    if blinded is not None:
        stripped = _strip(sql, [(a + base, b + base) for a, b in stripped])
    STATS.sqlcomment_parsed += 1
    tags = dict(tags)
    tags["traceparent"] = value
    context = _known_shape_context(value, tracestate)
    if context is None:
        STATS.sqlcomment_parsed_invalid_traceparent += 1
    return Comment(tags, context, stripped, context is None)


def _known_shape_context(value: str, tracestate: str | None) -> TraceContext | None:
    """parse_traceparent for a value already known to be 55 lowercase-hex characters and dashes."""
    if value.startswith("ff"):
        return None
    trace_id = int(value[3:35], 16)
    span_id = int(value[36:52], 16)
    if trace_id == 0 or span_id == 0:
        return None
    return TraceContext(trace_id, span_id, int(value[53:55], 16), tracestate)


def _parse(sql: str, max_len: int, spans: list[tuple[int, int]] | None = None) -> Comment | None:
    """The full parse; ``spans`` (when given) receives where the sqlcommenter comments are."""
    budget = _Budget()
    if spans is None:
        spans = []
    tags: dict[str, str] = {}

    # Leading comments need no lexing: nothing before them can open a literal.
    lead_end = _comment_run(sql, _WS_RUN.match(sql).end(), _WS_RUN, max_len, tags, spans, budget)

    # Trailing comments: cheap test first, the lexer only when the statement
    # really ends with "*/".
    if sql.rstrip(_WS + ";").endswith("*/"):
        code_end = _code_end(sql, budget)
        if code_end >= 0:
            start = _GAP_RUN.match(sql, max(code_end, lead_end)).end()
            _comment_run(sql, start, _GAP_RUN, max_len, tags, spans, budget)

    if budget.oversized:
        STATS.sqlcomment_oversized += 1
    if budget.malformed:
        STATS.sqlcomment_malformed += 1
    if not spans:
        return None
    STATS.sqlcomment_parsed += 1

    context = None
    invalid = False
    traceparent = tags.get("traceparent")
    if traceparent is not None:
        context = parse_traceparent(traceparent)
        if context is None:
            invalid = True
            STATS.sqlcomment_parsed_invalid_traceparent += 1
        else:
            tracestate = tags.get("tracestate")
            if tracestate is not None and valid_tracestate(tracestate):
                context = TraceContext(context.trace_id, context.span_id, context.flags, tracestate)
    return Comment(tags, context, _strip(sql, spans), invalid)


def _comment_end(sql: str, start: int, max_len: int, budget: _Budget) -> int:
    """End index of the (possibly nested) block comment at ``start``, or -1.

    Only ``max_len`` characters are looked at; a longer comment is oversized.
    """
    limit = min(len(sql), start + max_len)
    depth = 0
    pos = start + 2
    while True:
        m = _COMMENT_TOKEN.search(sql, pos, limit)
        if m is None:
            if limit < len(sql):
                budget.oversized = True
            return -1
        pos = m.end()
        if sql[m.start()] == "/":
            depth += 1
        elif depth == 0:
            return pos
        else:
            depth -= 1


def _code_end(sql: str, budget: _Budget) -> int:
    """End of the last code token (0 when there is none), -1 when unknowable."""
    n = len(sql)
    code_end = 0
    pos = 0
    slow_steps = 0
    while True:
        end = _LEX.match(sql, pos).end()
        if end > pos:
            code_end = end
        pos = _TRIVIA_RUN.match(sql, end).end()
        if pos >= n:
            return code_end
        slow_steps += 1
        if slow_steps > _MAX_SLOW_STEPS:
            budget.malformed = True
            return -1
        tag = _DOLLAR_TAG.match(sql, pos)
        if tag is not None:
            close = sql.find(tag.group(), tag.end())
            if close < 0:
                return n  # unterminated dollar quote swallows the rest
            pos = code_end = close + len(tag.group())
            continue
        # Otherwise the lexer stopped in front of a comment containing "/*".
        depth = 0
        pos += 2
        while True:
            t = _COMMENT_TOKEN.search(sql, pos)
            if t is None:
                return code_end  # unterminated comment swallows the rest
            slow_steps += 1
            if slow_steps > _MAX_SLOW_STEPS:
                budget.malformed = True
                return -1
            pos = t.end()
            if sql[t.start()] == "/":
                depth += 1
            elif depth == 0:
                break
            else:
                depth -= 1


def _comment_run(sql: str, pos: int, gap: re.Pattern, max_len: int, tags: dict[str, str],
                 spans: list[tuple[int, int]], budget: _Budget) -> int:
    """Read the comments that follow one another from ``pos`` (``gap`` between them); return where the run ends."""
    count = 0
    while sql.startswith("/*", pos):
        if count >= _MAX_COMMENTS:
            budget.malformed = True
            break
        end = _comment_end(sql, pos, max_len, budget)
        if end < 0:
            break
        count += 1
        if _read_pairs(sql, pos + 2, end - 2, tags, budget):
            spans.append((pos, end))
        pos = gap.match(sql, end).end()
    return pos


def _read_pairs(sql: str, start: int, end: int, tags: dict[str, str], budget: _Budget) -> bool:
    """Merge the key='value' pairs of a comment body into ``tags``.

    Returns False (and touches nothing) when the body is not a pair list, which
    makes it an ordinary comment.
    """
    body = sql[start:end]
    if "='" not in body:
        return False
    found: list[tuple[str, str]] = []
    pos = 0
    size = len(body)
    while True:
        m = _PAIR.match(body, pos)
        if m is None:
            return False
        value = m.group(2)
        found.append((m.group(1), value if value is not None else m.group(3)))
        pos = m.end()
        if not m.group(4):
            if _WS_RUN.match(body, pos).end() != size:
                return False
            break
        if len(found) >= _MAX_PAIRS:
            # Enough has been read to know it is sqlcommenter; the rest is ignored.
            budget.malformed = True
            break
    for raw_key, raw_value in found:
        if len(raw_key) > _MAX_KEY_LEN or len(raw_value) > _MAX_VALUE_LEN:
            budget.oversized = True
            continue
        key = _decode(raw_key)
        if key:
            if len(tags) >= _MAX_TAGS and key not in tags and key not in _CONTEXT_KEYS:
                # Each tag becomes a span attribute: many comments must not multiply them.
                budget.malformed = True
                continue
            tags[key] = _decode(raw_value)
    return True


def _decode(raw: str) -> str:
    if "\\" in raw:
        raw = _BACKSLASH_ESCAPE.sub(r"\1", raw)
    if "%" in raw:
        if "%%" in raw and _PYFORMAT_DOUBLED.fullmatch(raw) is not None:
            raw = raw.replace("%%", "%")
        raw = unquote(raw, errors="replace")
    if not raw.isascii() and _SURROGATE.search(raw) is not None:
        raw = _SURROGATE.sub("\ufffd", raw)
    return raw


def _strip(sql: str, spans: list[tuple[int, int]]) -> str:
    """Remove ``spans`` and tidy the whitespace left where they were."""
    spans.sort()
    pieces: list[str] = []
    prev = 0
    last = len(spans)
    for i, (start, end) in enumerate(spans):
        piece = sql[prev:start]
        pieces.append(piece.rstrip(_WS) if i == 0 else piece.strip(_WS))
        prev = end
    pieces.append(sql[prev:].lstrip(_WS) if last else sql[prev:])
    out: list[str] = []
    for piece in pieces:
        if not piece:
            continue
        if out and not piece.startswith(";"):
            out.append(" ")
        out.append(piece)
    return "".join(out).strip(_WS)
