"""The sample rate's draw for new roots, where the relay can make it (``Presampler``), and
which statements are traced whatever the draw (``keep_reason``).

Kept apart from the span builder (spans.py) so that the relay, which hands
records to a span process, does not load the tracing SDK for it.
"""

from __future__ import annotations

import os
import random

#: The generator every id and every sampling draw of the proxy comes from (span
#: and trace ids here and in the span builder, the enricher's span ids). A
#: forked worker (``--workers``) seeds it afresh: the parent imports this
#: module before forking, and workers sharing its state would make the same
#: ids in the same order.
rand = random.Random()
os.register_at_fork(after_in_child=rand.seed)


def may_set_carrier(sql: str) -> bool:
    """Whether a statement could change a context channel (``spans.CHANNELS``).

    That is ``SET`` / ``RESET`` of ``pgotel.traceparent``, ``pg_tracing.trace_context``
    or ``application_name``, ``RESET ALL`` or ``DISCARD ALL``: a cheap test that
    may say yes to other statements, never no to one of those.
    """
    if "pgotel" in sql:
        return True
    upper = sql.upper()
    return "ALL" in upper or "APPLICATION_NAME" in upper or "PG_TRACING" in upper or "PGOTEL" in upper


def keep_reason(rec, slow_ns: int, errors: bool) -> str | None:
    """Why a statement is traced although a draw or an unsampled parent left it out, or None.

    ``"error"`` when ``errors`` and it failed (its status: a simple Query's is "error"
    when any of its statements failed), ``"slow"`` when ``slow_ns`` and it ran at least
    that many nanoseconds, first message to last answer (``always_trace_*`` options).
    Cheap: the relay asks it of every record its draw leaves out, the span process of
    every record.
    """
    if errors and rec.status == "error":
        return "error"
    if slow_ns and rec.start_ns and rec.end_ns - rec.start_ns >= slow_ns:
        return "slow"
    return None


class Presampler:
    """The sample rate's draw for new roots, made where statements finish (the relay).

    Below a rate of 1, a statement the draw leaves out costs its framing and
    its record alone: it is not handed to the span builder (no pack, no pipe,
    no builder step). The draw is the builder's own (a new root is kept with
    probability ``rate``) and is made only where the relay can tell a
    statement is a new root: its text holds no comment (which may carry a
    traceparent; a prepared statement's comment is not read again when it is
    executed later) and no statement of the connection so far could have set a
    session carrier (``may_set_carrier``). A commented statement goes to the
    builder undrawn; from the first statement that could set a carrier on,
    all of the connection's records do: the builder tracks the carrier and
    draws itself. Records handed over after a draw say so (``drawn``): the
    builder keeps their roots (``ConnState.presampled``), so no root is drawn
    twice. A statement the draw leaves out that failed or was slow
    (:func:`keep_reason`) is handed over undrawn all the same: the builder
    draws for it again and, when that draw leaves it out too, keeps it by
    that rule (so such a statement is traced at a rate a little above the
    sample rate's). Transaction spans need every statement of a block: a
    tracer that builds them does not use this.
    """

    __slots__ = ("plain",)

    def __init__(self, startup_application_name: str | None = None) -> None:
        # no statement of this connection could have set a carrier (and its start-up
        # application_name, a context channel too, is no traceparent)
        self.plain = not (startup_application_name and startup_application_name.count("-") >= 3)

    def split(self, records: list, rate: float, slow_ns: int = 0, errors: bool = False) -> tuple[list, list, int]:
        """(drawn, undrawn, left_out): the new roots the draw kept; the records the builder is to
        draw for, in order (those with a comment, and all from the first that could set a
        carrier on, and those ``keep_reason(rec, slow_ns, errors)`` keeps); how many the draw left out. Each list keeps the records' order; no
        record of a plain connection depends on another's, so the two may be built apart."""
        if rate >= 1.0 or not self.plain:
            return [], records, 0
        drawn: list = []
        undrawn: list = []
        rand_draw = rand.random
        for i, rec in enumerate(records):
            sql = rec.sql or ""
            if "/*" in sql and not (rec.reused and rec.protocol == "extended"):
                # Its comment may carry a context: the builder decides. (A prepared statement's
                # comment was read when it was prepared: its later executions are roots.)
                undrawn.append(rec)
            elif may_set_carrier(sql):
                self.plain = False
                undrawn += records[i:]
                return drawn, undrawn, len(records) - len(drawn) - len(undrawn)
            elif rate > 0.0 and rand_draw() < rate:
                drawn.append(rec)
            elif (errors or slow_ns) and keep_reason(rec, slow_ns, errors) is not None:
                undrawn.append(rec)
        return drawn, undrawn, len(records) - len(drawn) - len(undrawn)
