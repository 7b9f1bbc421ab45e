"""The session's context channels: the trace context its settings give a connection.

``SET [LOCAL] pgotel.traceparent``, ``SET [LOCAL] pg_tracing.trace_context``
and ``application_name`` (its start-up value, then ``SET``) are followed
statement by statement under one set of rules, PostgreSQL's own for settings:
``SET LOCAL`` lasts until its transaction ends, a rolled-back transaction
undoes its ``SET``, ``RESET`` / ``RESET ALL`` / ``DISCARD ALL`` go back to the
session's default (for ``application_name``, the start-up value; for the
others, none). The span builder and otelwal emission (which runs in the relay)
both follow them, so this module needs neither the OpenTelemetry SDK nor a SQL
parser.
"""

from __future__ import annotations

import re

from .. import sqlcomment
from .sampling import may_set_carrier

__all__ = ["CHANNELS", "SessionCarrier", "channel_context"]

# Context channels a session can carry, in the order they win when several are
# set; a statement's own sqlcommenter comment wins over all of them. The
# proxy's own setting is the most deliberate; pg_tracing's is set for tracing
# alone; application_name is a name that some instrumentations (OpenTelemetry
# JS's pg with enableTraceContextPropagation, dd-trace-java) overload.
CHANNELS = ("pgotel.traceparent", "pg_tracing.trace_context", "application_name")
_APP = 2  # CHANNELS.index("application_name")

# (A quoted value as runs of other characters between doubled quotes: the regex engine
# takes a run in one step, where an alternation tried at each character costs it dearly.)
_SET_RE = re.compile(
    r"^\s*(?:SET\s+(?P<scope>LOCAL\s+|SESSION\s+)?(?P<name>pgotel\.traceparent|pg_tracing\.trace_context"
    r"|application_name)\s*(?:=|\bTO\b)\s*(?P<value>'[^']*(?:''[^']*)*'|[^\s;']+)"
    r"|RESET\s+(?P<reset>pgotel\.traceparent|pg_tracing\.trace_context|application_name|ALL)"
    r"|(?P<discard>DISCARD\s+ALL))\s*;?\s*$",
    re.IGNORECASE,
)


def channel_context(channel: int, value: str | None) -> sqlcomment.TraceContext | None:
    """The trace context a channel's value carries, None when it carries none.

    ``pgotel.traceparent`` and ``application_name`` hold a W3C traceparent
    itself; ``pg_tracing.trace_context`` holds sqlcommenter-style tags
    (``traceparent='00-…'``), as pg_tracing reads them.
    """
    if not value:
        return None
    if channel == 1:
        return sqlcomment.context_of_tags(value)
    return sqlcomment.parse_traceparent(value)


class SessionCarrier:
    """The context channels of one connection, as its finished statements set and reset them.

    ``carrier`` is the context of the first channel (in ``CHANNELS`` order) that holds one.
    """

    __slots__ = ("carrier", "carrier_local", "saved", "values", "session_values", "defaults")

    def __init__(self, startup_application_name: str | None = None) -> None:
        # Each channel's context: the default RESET returns to, the value now, and the
        # value that outlives the open transaction when it commits (SET LOCAL does not).
        self.defaults = (None, None, channel_context(_APP, startup_application_name))
        self.values = list(self.defaults)
        self.session_values = list(self.defaults)
        self.saved: list | None = None  # session_values before the first SET inside the open transaction
        self.carrier: sqlcomment.TraceContext | None = None
        self.carrier_local = False  # a channel holds a SET LOCAL value
        self._settle()

    def _settle(self) -> None:
        values = self.values
        self.carrier = values[0] or values[1] or values[2]
        self.carrier_local = values != self.session_values

    def observe_set(self, sql: str, rec_ok: bool, tx_status: str) -> None:
        """Apply a successful ``SET [LOCAL]`` / ``RESET`` / ``DISCARD ALL`` of a context channel."""
        if not rec_ok or not may_set_carrier(sql):
            return
        m = _SET_RE.match(sql)
        if m is None:
            return
        in_tx = tx_status in ("T", "E")
        local = m.group("scope") is not None and m.group("scope").strip().upper() == "LOCAL"
        if local and not in_tx:
            return  # SET LOCAL outside a transaction block does nothing
        if in_tx and self.saved is None:
            self.saved = list(self.session_values)
        name = m.group("name")
        if name is not None:
            channel = CHANNELS.index(name.lower())
            value = m.group("value")
            if value.startswith("'"):
                ctx = channel_context(channel, value[1:-1].replace("''", "'"))
            elif value.upper() == "DEFAULT":
                ctx = self.defaults[channel]
            else:
                ctx = channel_context(channel, value)
            self.values[channel] = ctx
            if not local:
                self.session_values[channel] = ctx
        else:
            reset = m.group("reset")
            channels = range(len(CHANNELS)) if reset is None or reset.upper() == "ALL" else (
                CHANNELS.index(reset.lower()),)
            for channel in channels:
                self.values[channel] = self.session_values[channel] = self.defaults[channel]
        self._settle()

    def forget(self) -> None:
        """Statements of this connection went unseen (tracing off, queue full): the channels are unknown.

        Forgetting them may leave later statements without their context; keeping
        them could put them in a trace that is no longer theirs.
        """
        self.values = [None] * len(CHANNELS)
        self.session_values = [None] * len(CHANNELS)
        self.saved = None
        self._settle()

    def end_of_statement(self, tx_status: str, tag: str | None) -> None:
        if tx_status != "I" or not (self.saved is not None or self.carrier_local):
            return
        if self.saved is not None:
            if tag is None or not tag.startswith("COMMIT"):
                self.session_values = self.saved  # rolled back: its SETs are undone
            self.saved = None
        self.values = list(self.session_values)  # SET LOCAL ends with its transaction
        self._settle()
