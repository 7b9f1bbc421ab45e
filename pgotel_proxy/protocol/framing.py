"""Framing of client bytes for a relay that forwards them before the codec sees them (the pump).

The pump (proxy/_pump.c) relays a traced connection on its own thread and
must refuse a client chunk before forwarding it, by the rule the codec frames
with (:func:`messages.header_refused`, which :class:`Session` checks every
client message with). :func:`frame_client` is that framing over a chunk:
compiled, a C function without the GIL that the pump imports through the
capsule Cython generates (``framing_api.h``), over the C struct
``ClientFraming`` (framing.pxd); interpreted, the same code over
:class:`ClientFramingState`.
"""

from __future__ import annotations

try:
    import cython
except ImportError:  # no Cython: the module runs interpreted
    from ._nocython import cython

from .messages import header_refused

__all__ = ["frame_client", "ClientFramingState"]

class ClientFramingState:
    """The framing state of one client stream, interpreted (compiled, the C struct ``ClientFraming``)."""

    __slots__ = ("max_message", "skip", "have", "typ", "length")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message  # a longer message is refused
        self.skip = 0  # bytes of the current message still to come
        self.have = 0  # bytes of the next message's head seen so far (0..4)
        self.typ = 0  # its type byte, once seen
        self.length = 0  # its length bytes seen so far, big-endian


def frame_client(state, data, n: int) -> int:
    """Frame ``data[:n]``, client bytes that follow what ``state`` framed: 1 when they hold a refused head.

    ``state`` moves on only when every head in the chunk is good (a refused
    chunk is not forwarded, nothing after it matters).
    """
    skip = state.skip
    have = state.have
    typ = state.typ
    length = state.length
    pos = 0
    while pos < n:
        if skip:
            take = n - pos if n - pos < skip else skip
            pos += take
            skip -= take
            continue
        if have == 0:
            typ = data[pos]
            length = 0
        else:
            length = (length << 8) | data[pos]
        pos += 1
        have += 1
        if have < 5:
            continue
        if header_refused(typ, length, state.max_message):  # not HEAD_OK
            return 1
        skip = length - 4
        have = 0
    state.skip = skip
    state.have = have
    state.typ = typ
    state.length = length
    return 0
