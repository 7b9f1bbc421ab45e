"""The session carrier: the trace context ``SET pgotel.traceparent`` gives a connection.

Followed statement by statement under PostgreSQL's rules (``SET LOCAL`` ends
with its transaction, a rolled-back ``SET`` is undone). The span builder and
otelwal emission (which runs in the relay) both follow it, so this module
needs neither the OpenTelemetry SDK nor a SQL parser.
"""

from __future__ import annotations

import re

from .. import sqlcomment
from .sampling import may_set_carrier

__all__ = ["SessionCarrier"]

_SET_RE = re.compile(
    r"^\s*(?:SET\s+(?P<scope>LOCAL\s+|SESSION\s+)?pgotel\.traceparent\s*(?:=|TO)\s*'(?P<value>[^']*)'"
    r"|(?P<reset>RESET\s+pgotel\.traceparent|RESET\s+ALL|DISCARD\s+ALL)"
    r"|SET\s+(?:LOCAL\s+|SESSION\s+)?pgotel\.traceparent\s*(?:=|TO)\s*DEFAULT)\s*;?\s*$",
    re.IGNORECASE,
)


class SessionCarrier:
    """The carrier of one connection, as its finished statements set and reset it."""

    __slots__ = ("carrier", "carrier_local", "saved")

    def __init__(self) -> None:
        self.carrier: sqlcomment.TraceContext | None = None
        self.carrier_local = False
        self.saved: tuple | None = None  # carrier before the first SET inside the open transaction

    def observe_set(self, sql: str, rec_ok: bool, tx_status: str) -> None:
        """Apply a successful ``SET [LOCAL] pgotel.traceparent`` / ``RESET``; Postgres' transaction rules apply."""
        if not rec_ok or not may_set_carrier(sql):
            return
        m = _SET_RE.match(sql)
        if m is None:
            return
        if tx_status in ("T", "E") and self.saved is None:
            self.saved = (self.carrier, self.carrier_local)
        if m.group("value") is not None:
            ctx = sqlcomment.parse_traceparent(m.group("value"))
            local = bool(m.group("scope")) and m.group("scope").strip().upper() == "LOCAL"
            if local and tx_status == "I":
                return  # SET LOCAL outside a transaction block does nothing
            self.carrier = ctx
            self.carrier_local = local
        else:
            self.carrier = None
            self.carrier_local = False

    def forget(self) -> None:
        """Statements of this connection went unseen (tracing off, queue full): the carrier is unknown.

        Forgetting it may leave later statements without their context; keeping
        it could put them in a trace that is no longer theirs.
        """
        self.carrier = None
        self.carrier_local = False
        self.saved = None

    def end_of_statement(self, tx_status: str, tag: str | None) -> None:
        """A statement finished with ``tx_status``: a transaction that ended takes its SETs with it."""
        if tx_status != "I":
            return
        if self.saved is not None:
            if tag is None or not tag.startswith("COMMIT"):
                self.carrier, self.carrier_local = self.saved  # rolled back: SET is undone
            self.saved = None
        if self.carrier_local:
            self.carrier = None
            self.carrier_local = False
