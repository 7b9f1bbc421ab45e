"""What the protocol layer hands to the tracer: one compact record per statement execution.

The relay path only fills integers and references into a :class:`Statement`
while the request is in flight; the tracer turns finished records into spans
later, in batches, off the relay path.

The two classes below are the one definition of the record layout. Everything
that handles records field by field derives from :data:`STATEMENT_LAYOUT` and
:data:`COMPLETION_LAYOUT` (name, kind, default of each field, in order): the
compact form records cross to the span process in (``protocol/records.py`` and
its compiled twin in ``_core.c``), and the compiled codec and OTLP encoder,
which are handed the layout when they are configured. A new field is one line
in its class; its annotation gives its kind (``_KINDS``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["Statement", "Completion", "STATEMENT_LAYOUT", "COMPLETION_LAYOUT",
           "INT", "BOOL", "STR", "VALUE", "COMPLETIONS", "REQUIRED"]

# Field kinds: how a field is carried in the compact form (protocol/records.py).
INT = 0  # an int in the signed 64-bit range
BOOL = 1  # True or False
STR = 2  # a str or None
VALUE = 3  # None or a plain value: bool, int, float, str, bytes, list, tuple, dict of those
COMPLETIONS = 4  # None or a list of Completion


@dataclass(slots=True, eq=False)
class Completion:
    """One statement's outcome inside a simple Query (which may hold several statements)."""

    end_ns: int
    tag: str | None
    rows: int
    error: dict[str, str] | None = None


@dataclass(slots=True, eq=False)
class Statement:
    """One execution of one request on the wire.

    Extended protocol: Parse → Bind → Execute (phases may be absent: a statement
    prepared in an earlier batch starts at Bind). Simple protocol: one Query
    message, whose statements' outcomes are in ``results`` in order.

    ``*_exact`` tells whether the server flushed right after that phase's
    response, so that its arrival time is the phase's true end. Without a Flush
    or Sync after a request, Postgres holds the response back until the batch
    ends and the arrival time is only an upper bound.
    """

    protocol: str  # "simple" | "extended" | "function"
    sql: str | None
    statement_name: str | None = None
    portal: str | None = None
    start_ns: int = 0
    parse_start_ns: int = 0
    parse_end_ns: int = 0
    parse_exact: bool = False
    bind_start_ns: int = 0
    bind_end_ns: int = 0
    bind_exact: bool = False
    exec_start_ns: int = 0
    end_ns: int = 0
    exec_exact: bool = False
    # "pending" while in flight, then "ok" | "error" | "skipped" (after an earlier
    # error in the same Sync batch) | "suspended" (PortalSuspended) | "incomplete"
    # (the connection ended first) | "prepared" (Parse without Execute)
    status: str = "pending"
    tag: str | None = None
    rows: int = 0
    error: dict[str, str] | None = None
    params: list[str | None] | None = None
    results: list[Completion] | None = None
    # executed from a statement prepared earlier, whose text (and comment) is not this request's:
    # not parsed in its own batch, nor parsed and left unbound in the batch right before it
    reused: bool = False
    copy: str | None = None  # "in" | "out" | "both" when the statement ran COPY
    tx_status: str = ""  # the ReadyForQuery status that closed its batch: I, T or E
    # the application_name the server reported (ParameterStatus) when that ReadyForQuery came:
    # what the statement ran under, even when the connection changes it between statements
    application_name: str | None = None
    extra: dict | None = None  # room for later stages (WAL LSN, ...)


# Each field's annotation, as written above, names its kind; an annotation not
# listed here fails at import, so a new field cannot go without one.
_KINDS = {
    "int": INT,
    "bool": BOOL,
    "str": STR,
    "str | None": STR,
    "dict[str, str] | None": VALUE,
    "list[str | None] | None": VALUE,
    "dict | None": VALUE,
    "list[Completion] | None": COMPLETIONS,
}

#: The default of a field that has none (the constructor requires it).
REQUIRED = None


def _layout(cls) -> tuple[tuple[str, int, object], ...]:
    layout = []
    for f in dataclasses.fields(cls):
        kind = _KINDS.get(f.type)
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: no record kind for the annotation {f.type!r}")
        layout.append((f.name, kind, REQUIRED if f.default is dataclasses.MISSING else f.default))
    return tuple(layout)


#: (name, kind, default) of every Statement field, in order.
STATEMENT_LAYOUT = _layout(Statement)
#: (name, kind, default) of every Completion field, in order.
COMPLETION_LAYOUT = _layout(Completion)
