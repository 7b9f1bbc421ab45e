"""The pump's framing of client bytes (protocol/framing.py) refuses what the codec refuses.

The pump frames a traced connection's client bytes before it forwards them,
with ``framing.frame_client`` (compiled: a C function the pump calls through
Cython's capsule; tests/test_pump.py drives that one through real sockets).
Here its source, interpreted, is held to the Session's framing: fed the same
chunks, it refuses a chunk exactly when ``Session.client_data`` raises
ProtocolViolation on it, and both follow the one rule (``messages.header_refused``).
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from pgotel_proxy.protocol import ProtocolViolation, framing, messages
from pgotel_proxy.protocol.kinds import FRONTEND_TYPES

from codec_twin import interpreted
from test_protocol_fuzz import _split
from test_protocol_session import ready_session

_twin = interpreted()
LIMIT = 4096

# A message: a type byte (frontend or not) and a declared length (good, or below 4, or above LIMIT).
_message = st.tuples(st.sampled_from(sorted(FRONTEND_TYPES) + [0, ord("Z"), 0xFF]),
                     st.sampled_from(["good", "short", "long"]), st.integers(0, 40))


def _stream(parts) -> bytes:
    out = b""
    for typ, length, size in parts:
        declared = {"good": size + 4, "short": size % 4, "long": LIMIT + 1 + size}[length]
        body = b"\x00" * size if typ != ord("X") else b""  # (Terminate: nothing may follow its head)
        out += bytes((typ,)) + struct.pack("!I", declared if typ != ord("X") else 4) + body
    return out


@settings(max_examples=400, deadline=None)
@given(st.lists(_message, min_size=1, max_size=8), st.lists(st.integers(1, 60), max_size=6))
def test_the_pump_refuses_the_chunk_the_session_refuses(parts, cuts):
    data = _stream(parts)
    state = _twin.framing.ClientFramingState(LIMIT)
    session = ready_session(max_message_size=LIMIT, observe_limit=LIMIT)
    for now, chunk in enumerate(_split(data, cuts), start=2):
        refused = _twin.framing.frame_client(state, chunk, len(chunk))
        try:
            session.client_data(chunk, now)
            raised = False
        except ProtocolViolation:
            raised = True
        assert bool(refused) == raised, chunk
        if raised:
            break


def test_the_rule_is_the_codec_s():
    assert messages.header_refused(ord("Q"), 4, LIMIT) == messages.HEAD_OK
    assert messages.header_refused(ord("Z"), 8, LIMIT) == messages.BAD_TYPE
    assert messages.header_refused(ord("Q"), 3, LIMIT) == messages.BAD_LENGTH
    assert messages.header_refused(ord("Q"), LIMIT + 1, LIMIT) == messages.BAD_LENGTH
    assert all(messages.header_refused(t, 8, LIMIT) == (0 if t in FRONTEND_TYPES else 1) for t in range(256))
    assert framing.__name__ == "pgotel_proxy.protocol.framing"
