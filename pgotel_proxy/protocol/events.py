"""What the protocol layer hands to the tracer: one compact record per statement execution.

The relay path only fills integers and references into a :class:`Statement`
while the request is in flight; the tracer turns finished records into spans
later, in batches, off the relay path.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Statement", "Completion"]


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
    reused: bool = False  # executed from a statement prepared in an earlier batch
    copy: str | None = None  # "in" | "out" | "both" when the statement ran COPY
    tx_status: str = ""  # the ReadyForQuery status that closed its batch: I, T or E
    extra: dict | None = None  # room for later stages (WAL LSN, ...)
