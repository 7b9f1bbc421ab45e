# cython: boundscheck=False, wraparound=False
# (Compiled without index checks: every index the scans read is at least 0 and below
# an end at most the text's length; .ci/sanitize runs tests/test_shape.py on a build
# under AddressSanitizer.)
"""Statement shapes: what two statement texts that differ only in their values share.

Applications that send values inline (the simple protocol, many ORMs) send a
new text for every execution of the same statement, and instrumentations
add a new traceparent to every one. What the tracer derives from a text (the
sqlcommenter tags, the SQL summary and sanitised text, the encoded span
attributes) is the same for all texts of one shape, so the caches of
``sqlcomment``, ``tracing.sqlinfo`` and ``tracing.spans`` are keyed by shape.

* :func:`blind` blanks a text's literals: each plain string literal (with
  doubled quotes) and each unsigned number literal becomes ``"\\x01"``.
* :func:`blank_code` is :func:`blind` for code where the blanked text may
  stand for every text of its shape, else None.
* :func:`statement_key` is the key of the span builder's cache for
  statements: the whole text with the code's literals blanked and the
  traceparent value cut out, and the parsed traceparent; or, for a text
  without a comment, the text with its literals blanked.
* :class:`StatementKeys` holds its answers for the texts of one hand-over of
  records, so that the latency histograms and the span builder, which both
  key every record, compute each text's key once.

One source: Cython compiles this file where it and a C compiler were there at
install time (pure-Python mode, the types in ``shape.pxd``), and it runs as it
is otherwise, or with ``PGOTEL_PURE_PYTHON=1`` (``protocol/_impl.py``). The
scans are written a character at a time so that the compiled build is a C
loop; ``tests/test_shape.py`` holds the two builds to the same answers.
"""

from __future__ import annotations

try:
    import cython
except ImportError:  # no Cython: the module runs interpreted
    from .protocol._nocython import cython

__all__ = ["blank_code", "blind", "statement_key", "StatementKeys", "COMPILED", "MAX_CHARS"]

#: Longest statement given a key (sqlcomment's shape limit).
MAX_CHARS = 8192
_TP_TAG = "traceparent='"
#: Characters of a W3C traceparent value: version, trace id, span id, flags, three dashes.
_TP_LEN = 55
#: The digits of a traceparent value (interpreted, :func:`_hex` checks against them).
_HEX_DIGITS = "0123456789abcdef"


def _in_word(c: str) -> bool:
    """Whether PostgreSQL's lexer may read ``c`` inside an identifier or parameter: [A-Za-z0-9_$], any non-ASCII."""
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9") or c == "_" or c == "$" or c >= "\x80"


def _is_space(c: str) -> bool:
    """``str.isspace()`` for an ASCII character."""
    return c == " " or ("\t" <= c <= "\r") or ("\x1c" <= c <= "\x1f")


def _string_end(s: str, i: int, end: int) -> int:
    """End of the string literal opening at ``s[i] == "'"``, or -1 when it is not closed before ``end``."""
    k = s.find("'", i + 1, end)
    while k >= 0 and k + 1 < end and s[k + 1] == "'":  # a doubled quote: the literal goes on
        k = s.find("'", k + 2, end)
    return k + 1 if k >= 0 else -1


def _number_end(s: str, i: int, end: int) -> int:
    """End of the unsigned number literal at the digit ``s[i]``, or -1 when the digits run into a word.

    ``digits[.digits][(e|E)[+|-]digits]``, not followed by a word character
    or a ".": "1e" and "1.2.3" are not literals, nor any part of them.
    """
    k = i
    while k < end and "0" <= s[k] <= "9":
        k += 1
    if k < end and s[k] == ".":
        k += 1
        while k < end and "0" <= s[k] <= "9":
            k += 1
    if k < end and (s[k] == "e" or s[k] == "E"):
        e = k + 1
        if e < end and (s[e] == "+" or s[e] == "-"):
            e += 1
        if e < end and "0" <= s[e] <= "9":
            while e < end and "0" <= s[e] <= "9":
                e += 1
            k = e
    if k < end and (_in_word(s[k]) or s[k] == "."):
        return -1
    return k


def _blank(s: str, end: int, cuts: list) -> bool:
    """Appends where each literal of ``s[:end]`` starts and ends to ``cuts`` (two ints a literal, in order).

    A literal: a string ``'…'`` (doubled quotes inside), or a number
    (:func:`_number_end`) that does not start inside a word or after a ".".
    Nothing else is: not a quote left open, not "$1" or "t1", not the digits
    of "1.2.3". :func:`_assemble` makes the text with each one blanked.

    Returns whether a literal-blind key may stand for ``s[:end]``: no
    backslash (an escape, or any string with ``standard_conforming_strings``
    off) and no ``"\\x01"`` (the blank itself) anywhere; outside its
    literals no quote left open, no double quote (a quoted identifier), no
    "--" or "/*" (comments), no "$" but before a digit (a dollar quote; "$1"
    is a parameter, and a dollar quote's tag never starts with a digit), no
    U& (Unicode escapes), and no letter E, B, X or N that starts a word right
    before a literal (a typed or prefixed string).
    """
    safe = True
    i = -1
    last = 0  # where the text after the last literal starts
    for c in s:  # (compiled: a loop over the characters in place)
        i += 1
        if i >= end:
            break
        if c not in "'0123456789\"-/$&\\\x01":  # a letter, a space, most punctuation: nothing to note
            continue
        if c == "\\" or c == "\x01":  # an escape (or any string without standard_conforming_strings), a blank
            safe = False
        if i < last:  # inside the literal just blanked
            continue
        e = -1
        if c == "'":
            e = _string_end(s, i, end)
            if e < 0:
                safe = False
        elif c in "0123456789":  # (compiled: these comparisons are one switch)
            if not (i > 0 and (_in_word(s[i - 1]) or s[i - 1] == ".")):
                e = _number_end(s, i, end)
        elif c == '"':
            safe = False
        elif c == "-" or c == "/":
            if i + 1 < end and s[i + 1] == ("-" if c == "-" else "*"):
                safe = False
        elif c == "$":
            if not (i + 1 < end and "0" <= s[i + 1] <= "9"):
                safe = False
        elif c == "&":
            if i > 0 and (s[i - 1] == "u" or s[i - 1] == "U"):
                safe = False
        if e < 0:
            continue
        if i > 0 and s[i - 1] in "eEbBxXnN" and not (i > 1 and _in_word(s[i - 2])):
            safe = False
        cuts.append(i)
        cuts.append(e)
        last = e
    return safe


def _assemble(s: str, cuts: list, tail: int, rest: int) -> str:
    """``s[:tail]`` with each literal ``cuts`` holds (:func:`_blank`) replaced by ``"\\x01"``, then ``s[rest:]``."""
    if cython.compiled and PyUnicode_IS_ASCII(s):
        # One str, written in place: no piece made and joined (an ASCII str's characters are
        # one byte each, and so are the blank's).
        n = len(cuts)
        size = tail + (len(s) - rest)
        for k in range(0, n, 2):
            size -= cuts[k + 1] - cuts[k] - 1
        out = PyUnicode_New(size, 127)
        dst = PyUnicode_1BYTE_DATA(out)
        src = PyUnicode_1BYTE_DATA(s)
        w = 0
        last = 0
        for k in range(0, n, 2):
            a = cuts[k]
            memcpy(dst + w, src + last, a - last)
            w += a - last
            dst[w] = 1
            w += 1
            last = cuts[k + 1]
        memcpy(dst + w, src + last, tail - last)
        w += tail - last
        memcpy(dst + w, src + rest, len(s) - rest)
        return out
    parts: list = []
    last = 0
    for k in range(0, len(cuts), 2):
        parts.append(s[last:cuts[k]])
        parts.append("\x01")
        last = cuts[k + 1]
    parts.append(s[last:tail])
    parts.append(s[rest:])
    return "".join(parts)


def blind(s: str) -> str:
    """``s`` with each literal replaced by ``"\\x01"`` (``s`` itself when it has none)."""
    cuts: list = []
    _blank(s, len(s), cuts)
    return _assemble(s, cuts, len(s), len(s)) if cuts else s


def blank_code(code: str) -> str | None:
    """``code`` with its literals blanked when a literal-blind key may stand for it, else None.

    It may when each literal :func:`blind` finds is one token to
    PostgreSQL's lexer whatever its content, and the code holds nothing
    :func:`_blank` refuses. Up to the first such construct both lexers
    agree, so none there means they agree on the whole text. Then texts that
    differ only in their literals' values share their blanked code, and
    their parse trees differ only in those values.
    """
    cuts: list = []
    if not _blank(code, len(code), cuts):
        return None
    return _assemble(code, cuts, len(code), len(code)) if cuts else code


def _hex(s: str, start: int, end: int):
    """The number the lower-case hexadecimal digits ``s[start:end]`` of an ASCII text write (at most 16), or None.

    None when another character is there (not even an upper-case digit: a
    traceparent value is written in lower case).
    """
    if cython.compiled:  # a C loop over the characters in place (the text is ASCII): no str or int made on the way
        data = PyUnicode_1BYTE_DATA(s)
        v = 0
        for i in range(start, end):
            c = data[i]
            if 0x30 <= c <= 0x39:  # 0-9
                v = v * 16 + (c - 0x30)
            elif 0x61 <= c <= 0x66:  # a-f
                v = v * 16 + (c - 0x57)
            else:
                return None
        return v
    digits = s[start:end]
    return None if digits.strip(_HEX_DIGITS) else int(digits, 16)


def _names_a_carrier(sql: str, start: int, n: int) -> bool:
    """Whether ``sql[start:n]`` (ASCII) holds "pgotel", "all", "application_name" or "pg_tracing", in any case.

    (A word that starts in the range and runs past ``n`` counts: it is read to the text's end.)
    """
    if cython.compiled:  # one pass over the characters in place: no lower-cased copy, no four searches
        data = PyUnicode_1BYTE_DATA(sql)
        end = len(sql)
        for i in range(start, n):
            c = data[i] | 0x20  # (a letter in lower case; what else it makes is never compared below)
            if c == 0x61:  # a
                if _word_at(data, i, end, b"all", 3) or _word_at(data, i, end, b"application_name", 16):
                    return True
            elif c == 0x70:  # p
                if _word_at(data, i, end, b"pgotel", 6) or _word_at(data, i, end, b"pg_tracing", 10):
                    return True
        return False
    lower = sql.lower()
    for word in ("pgotel", "all", "application_name", "pg_tracing"):
        if 0 <= lower.find(word, start) < n:
            return True
    return False


def _word_at(data, i: int, n: int, word, k: int) -> bool:
    """Whether ``data[i:i + k]`` is ``word`` (lower case) in any case (compiled only: ``data`` is a C pointer)."""
    if i + k > n:
        return False
    for m in range(k):
        c = data[i + m]
        if 0x41 <= c <= 0x5A:  # A-Z
            c += 0x20
        if c != word[m]:
            return False
    return True


def statement_key(sql: object) -> tuple[str, int, int, int, int] | None:
    """(key, trace_id, span_id, flags, value_start) for a keyable statement, else None.

    Keyable: an ASCII text of at most :data:`MAX_CHARS` characters that is
    either

    * code before its first "/*" (not only whitespace) that :func:`blank_code`
      accepts, and a ``traceparent='…'`` after that "/*" (its first occurrence there,
      right after "/*", "," or whitespace) holding a valid W3C value of 55
      characters (not version ff, no zero id): the key is the code with its
      literals blanked, then the rest of the text with the 55 characters of the
      value cut out, with the value's ids and flags and where it starts; or
    * code alone, without any comment, that :func:`blank_code` accepts: the key
      is the code with its literals blanked, and the rest ``0, 0, 0, -1`` (no
      context in the text: a trace id is never 0). Such texts carry no context
      of their own, and take the connection's, or a new root's: the form of
      most applications that send values inline without sqlcommenter; or
    * code as in the first case, then a comment without ``traceparent='``: the
      key is the code with its literals blanked and the rest of the text as it
      is, and the rest ``0, 0, 0, -2`` (no context; a comment, whose tags
      sqlcommenter's parse reads, such as Rails' query log tags).

    Nothing that ``spans.may_set_carrier`` could take for a carrier change
    ("pgotel", "all", "application_name" or "pg_tracing", in any case) is keyed.

    Two texts with one key lex the same way, token for token (each literal is
    one token whatever its content, and a value of hexadecimal digits and
    dashes changes nothing in its comment), so they differ only in their
    literals' values and the trace context: the same tags, the same summary,
    the same sanitised text.
    """
    return _key(sql) if type(sql) is str else None


def _key(sql: str) -> tuple[str, int, int, int, int] | None:
    """:func:`statement_key` for a str."""
    n = len(sql)
    if n == 0 or n > MAX_CHARS or not sql.isascii():
        return None
    j = sql.find("/*")
    if j < 0:  # no comment, so no context of its own
        return _contextless_key(sql, n, -1)
    if j == 0:
        return None
    i = 0
    while i < j and _is_space(sql[i]):
        i += 1
    if i == j:  # the comment comes first
        return None
    k = sql.find(_TP_TAG, j)
    if k < 0:  # a comment without a traceparent (other tags)
        return _contextless_key(sql, j, -2)
    # (k >= j + 2: the tag does not start with "/*", so sql[k - 2] is there)
    before = sql[k - 1]
    if not (before == "," or _is_space(before) or (before == "*" and sql[k - 2] == "/")):
        return None
    vs = k + len(_TP_TAG)
    ve = vs + _TP_LEN
    if ve >= n or sql[ve] != "'" or sql[vs + 2] != "-" or sql[vs + 35] != "-" or sql[vs + 52] != "-":
        return None
    version = _hex(sql, vs, vs + 2)
    trace_high = _hex(sql, vs + 3, vs + 19)
    trace_low = _hex(sql, vs + 19, vs + 35)
    span_id = _hex(sql, vs + 36, vs + 52)
    flags = _hex(sql, vs + 53, ve)
    if version is None or version == 255 or trace_high is None or trace_low is None or span_id is None or flags is None:
        return None
    if not (trace_high or trace_low) or not span_id:
        return None
    # (The value's lower-case hexadecimal digits and dashes hold none of the words: the scan skips them.)
    if _names_a_carrier(sql, 0, vs) or _names_a_carrier(sql, ve, n):
        return None
    cuts: list = []
    if not _blank(sql, j, cuts):
        return None
    return _assemble(sql, cuts, vs, ve), (trace_high << 64) | trace_low, span_id, flags, vs


def _contextless_key(sql: str, end: int, mark: int) -> tuple[str, int, int, int, int] | None:
    """:func:`statement_key`'s answer for a text without a traceparent: its code (``sql[:end]``)
    blanked, the rest as it is; ``mark`` is the answer's value start (-1: no comment, -2: a
    comment with other tags)."""
    if _names_a_carrier(sql, 0, len(sql)):
        return None
    cuts: list = []
    if not _blank(sql, end, cuts):
        return None
    return (_assemble(sql, cuts, end, end) if cuts else sql), 0, 0, 0, mark


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


#: True when this module was compiled by Cython.
COMPILED: bool = cython.compiled
