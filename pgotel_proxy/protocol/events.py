"""What the protocol layer hands to the tracer: one compact record per statement execution.

The relay path only fills integers and references into a :class:`Statement`
while the request is in flight; the tracer turns finished records into spans
later, in batches, off the relay path.

:data:`STATEMENT_LAYOUT` and :data:`COMPLETION_LAYOUT` (name, kind, default
of each field, in order) are the record layout. Everything that handles
records field by field derives from them: the compact form records cross to
the span process in (``protocol/records.py``) and the compiled OTLP encoder,
which is handed the layout when it is configured. The classes spell the same
fields out (``__init__``, ``__slots__``; compiled, the cdef classes of
``events.pxd``): a new field is a line in each of those and in the layout,
and tests/test_records.py holds them equal.
"""

from __future__ import annotations

try:
    import cython
except ImportError:  # no Cython: the module runs interpreted
    from ._nocython import cython

__all__ = ["Statement", "Completion", "new_completion", "STATEMENT_LAYOUT", "COMPLETION_LAYOUT",
           "INT", "BOOL", "STR", "VALUE", "COMPLETIONS", "REQUIRED",
           "new_statement", "as_dict"]

# Field kinds: how a field is carried in the compact form (protocol/records.py).
INT = 0  # an int in the signed 64-bit range
BOOL = 1  # True or False
STR = 2  # a str or None
VALUE = 3  # None or a plain value: bool, int, float, str, bytes, list, tuple, dict of those
COMPLETIONS = 4  # None or a list of Completion


class Completion:
    """One statement's outcome inside a simple Query (which may hold several statements)."""

    __slots__ = ("end_ns", "tag", "rows", "error")

    def __init__(self, end_ns: int, tag: str | None, rows: int, error: dict[str, str] | None = None) -> None:
        self.end_ns = end_ns
        self.tag = tag
        self.rows = rows
        self.error = error

    def __repr__(self) -> str:
        return _repr(self, COMPLETION_LAYOUT)


class Statement:
    """One execution of one request on the wire.

    Extended protocol: Parse → Bind → Execute (phases may be absent: a statement
    prepared in an earlier batch starts at Bind). Simple protocol: one Query
    message, whose statements' outcomes are in ``results`` in order.

    ``*_exact`` tells whether the server flushed right after that phase's
    response, so that its arrival time is the phase's true end. Without a Flush
    or Sync after a request, Postgres holds the response back until the batch
    ends and the arrival time is only an upper bound.

    The fields, their kinds and defaults are :data:`STATEMENT_LAYOUT` (below);
    ``__init__`` takes them in that order (tests hold the two equal).
    """

    __slots__ = (
        "protocol", "sql", "statement_name", "portal", "start_ns", "parse_start_ns", "parse_end_ns",
        "parse_exact", "bind_start_ns", "bind_end_ns", "bind_exact", "exec_start_ns", "end_ns", "exec_exact",
        "first_row_ns", "client_wait_ns", "status", "tag", "rows", "error", "params", "results", "reused", "copy", "tx_status",
        "application_name", "extra",
    )

    def __init__(
        self,
        protocol: str,
        sql: str | None,
        statement_name: str | None = None,
        portal: str | None = None,
        start_ns: int = 0,
        parse_start_ns: int = 0,
        parse_end_ns: int = 0,
        parse_exact: bool = False,
        bind_start_ns: int = 0,
        bind_end_ns: int = 0,
        bind_exact: bool = False,
        exec_start_ns: int = 0,
        end_ns: int = 0,
        exec_exact: bool = False,
        first_row_ns: int = 0,
        client_wait_ns: int = 0,
        status: str = "pending",
        tag: str | None = None,
        rows: int = 0,
        error: dict[str, str] | None = None,
        params: list[str | None] | None = None,
        results: list[Completion] | None = None,
        reused: bool = False,
        copy: str | None = None,
        tx_status: str = "",
        application_name: str | None = None,
        extra: dict | None = None,
    ) -> None:
        self.protocol = protocol  # "simple" | "extended" | "function"
        self.sql = sql
        self.statement_name = statement_name
        self.portal = portal
        self.start_ns = start_ns
        self.parse_start_ns = parse_start_ns
        self.parse_end_ns = parse_end_ns
        self.parse_exact = parse_exact
        self.bind_start_ns = bind_start_ns
        self.bind_end_ns = bind_end_ns
        self.bind_exact = bind_exact
        self.exec_start_ns = exec_start_ns
        self.end_ns = end_ns
        self.exec_exact = exec_exact
        # when the first DataRow (or CopyData of COPY TO) of its execution arrived: the receive
        # time of the read that completed its header; 0 when none came. A simple Query's is its
        # first statement's that returned rows.
        self.first_row_ns = first_row_ns
        # how long the relay stopped reading the server while the client's write buffer was full,
        # its result in flight (Session.client_waited, from either relay)
        self.client_wait_ns = client_wait_ns
        # "pending" while in flight, then "ok" | "error" | "skipped" (after an earlier
        # error in the same Sync batch) | "suspended" (PortalSuspended) | "incomplete"
        # (the connection ended first) | "prepared" (Parse without Execute)
        self.status = status
        self.tag = tag
        self.rows = rows
        self.error = error
        self.params = params
        self.results = results
        # executed from a statement prepared earlier, whose text (and comment) is not this request's:
        # not parsed in its own batch, nor parsed and left unbound in the batch right before it
        self.reused = reused
        self.copy = copy  # "in" | "out" | "both" when the statement ran COPY
        self.tx_status = tx_status  # the ReadyForQuery status that closed its batch: I, T or E
        # the application_name the server reported (ParameterStatus) when that ReadyForQuery came:
        # what the statement ran under, even when the connection changes it between statements
        self.application_name = application_name
        self.extra = extra  # room for later stages (WAL LSN, ...)

    def __repr__(self) -> str:
        return _repr(self, STATEMENT_LAYOUT)


def new_statement(protocol: str, sql: str | None, start_ns: int) -> Statement:
    """``Statement(protocol, sql, start_ns=start_ns)``, as the codec makes one per request.

    Compiled, the fields are stored directly (no keyword parsing per record);
    the defaults are those of ``__init__``.
    """
    if cython.compiled:
        rec = Statement.__new__(Statement)
        rec.protocol = protocol
        rec.sql = sql
        rec.statement_name = None
        rec.portal = None
        rec.start_ns = start_ns
        rec.parse_start_ns = 0
        rec.parse_end_ns = 0
        rec.parse_exact = False
        rec.bind_start_ns = 0
        rec.bind_end_ns = 0
        rec.bind_exact = False
        rec.exec_start_ns = 0
        rec.end_ns = 0
        rec.exec_exact = False
        rec.first_row_ns = 0
        rec.client_wait_ns = 0
        rec.status = "pending"
        rec.tag = None
        rec.rows = 0
        rec.error = None
        rec.params = None
        rec.results = None
        rec.reused = False
        rec.copy = None
        rec.tx_status = ""
        rec.application_name = None
        rec.extra = None
        return rec
    return Statement(protocol, sql, None, None, start_ns)


def new_completion(end_ns: int, tag: str | None, rows: int, error: dict[str, str] | None = None) -> Completion:
    """``Completion(end_ns, tag, rows, error)``, as the codec makes one per statement of a simple Query.

    Compiled, the fields are stored directly (no call of ``__init__`` through its arguments).
    """
    if cython.compiled:
        done = Completion.__new__(Completion)
        done.end_ns = end_ns
        done.tag = tag
        done.rows = rows
        done.error = error
        return done
    return Completion(end_ns, tag, rows, error)


def as_dict(rec) -> dict:
    """A Statement's or Completion's fields by name (a Statement's results as dicts too), for tests and logs."""
    if isinstance(rec, Completion):
        return {name: getattr(rec, name) for name, _, _ in COMPLETION_LAYOUT}
    out = {name: getattr(rec, name) for name, _, _ in STATEMENT_LAYOUT}
    if out["results"] is not None:
        out["results"] = [as_dict(c) for c in out["results"]]
    return out


def _repr(rec, layout) -> str:
    return f"{type(rec).__name__}({', '.join(f'{name}={getattr(rec, name)!r}' for name, _, _ in layout)})"


#: The default of a field that has none (the constructor requires it).
REQUIRED = None

#: (name, kind, default) of every Statement field, in order: the record layout.
STATEMENT_LAYOUT: tuple[tuple[str, int, object], ...] = (
    ("protocol", STR, REQUIRED),
    ("sql", STR, REQUIRED),
    ("statement_name", STR, None),
    ("portal", STR, None),
    ("start_ns", INT, 0),
    ("parse_start_ns", INT, 0),
    ("parse_end_ns", INT, 0),
    ("parse_exact", BOOL, False),
    ("bind_start_ns", INT, 0),
    ("bind_end_ns", INT, 0),
    ("bind_exact", BOOL, False),
    ("exec_start_ns", INT, 0),
    ("end_ns", INT, 0),
    ("exec_exact", BOOL, False),
    ("first_row_ns", INT, 0),
    ("client_wait_ns", INT, 0),
    ("status", STR, "pending"),
    ("tag", STR, None),
    ("rows", INT, 0),
    ("error", VALUE, None),
    ("params", VALUE, None),
    ("results", COMPLETIONS, None),
    ("reused", BOOL, False),
    ("copy", STR, None),
    ("tx_status", STR, ""),
    ("application_name", STR, None),
    ("extra", VALUE, None),
)
#: (name, kind, default) of every Completion field, in order.
COMPLETION_LAYOUT: tuple[tuple[str, int, object], ...] = (
    ("end_ns", INT, REQUIRED),
    ("tag", STR, REQUIRED),
    ("rows", INT, REQUIRED),
    ("error", VALUE, None),
)
