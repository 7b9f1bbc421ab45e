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
        refused = _twin.framing.frame_client(state, chunk, len(chunk), bytearray(2 * len(chunk))) == -1
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


# Adaptive phase splitting (docs/design/adaptive-splitting.md): the framing splices a Flush after
# each Parse, Bind and Execute of a batch whose Parse has a slow shape.

def _msg(typ: str, body: bytes) -> bytes:
    return typ.encode() + struct.pack("!I", len(body) + 4) + body


def _parse(sql: str, name: str = "") -> bytes:
    return _msg("P", name.encode() + b"\0" + sql.encode() + b"\0" + b"\0\0")


def _bind(name: str = "") -> bytes:
    return _msg("B", b"\0" + name.encode() + b"\0" + b"\0\0\0\0\0\0")


EXECUTE = _msg("E", b"\0\0\0\0\0")
DESCRIBE = _msg("D", b"P\0")
SYNC = _msg("S", b"")
FLUSH = _msg("H", b"")


def _framed(state, data: bytes, cuts) -> bytes:
    """What the framing sends on for ``data`` read in the chunks ``cuts`` makes."""
    out = b""
    for chunk in _split(data, cuts):
        buf = bytearray(2 * len(chunk))
        m = _twin.framing.frame_client(state, chunk, len(chunk), buf)
        assert m >= 0
        out += bytes(buf[:m]) if m else chunk
    return out


def test_the_shape_hash_leaves_comments_and_white_space_out():
    h = _twin.framing.shape_hash
    base = h("SELECT pg_sleep(0.05)")
    assert h("SELECT pg_sleep(0.05) /*traceparent='00-ab-cd-01'*/") == base
    assert h("/* a */ SELECT  pg_sleep(0.05) -- b\n") == base
    assert h("SELECT pg_sleep(0.06)") != base
    assert h("SELECT 1 - 2 / 3") != h("SELECT 1 + 2 / 3")
    # the compiled function is the same function
    for sql in ("SELECT pg_sleep(0.05)", "SELECT 1 /* x */", "select $1 - -2 / / 3", "é -- x"):
        assert framing.shape_hash(sql) == h(sql)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=8))
def test_a_slow_shape_s_batch_gets_a_flush_after_parse_bind_and_execute(cuts):
    slow = _twin.framing.SlowShapesTable()
    slow.add(_twin.framing.shape_hash("SELECT pg_sleep(0.05)"), 10**19)
    state = _twin.framing.ClientFramingState(LIMIT, slow)
    slow_batch = _parse("SELECT pg_sleep(0.05) /* c */", "s1") + _bind("s1") + DESCRIBE + EXECUTE + SYNC
    fast_batch = _parse("SELECT 1") + _bind() + EXECUTE + SYNC
    later = _bind("s1") + EXECUTE + SYNC  # a prepared statement parsed in a split batch
    other = _parse("SELECT 2", "s2") + SYNC + _bind("s2") + EXECUTE + SYNC
    data = fast_batch + slow_batch + fast_batch + later + other
    assert _framed(state, data, cuts) == (
        fast_batch
        + _parse("SELECT pg_sleep(0.05) /* c */", "s1") + FLUSH + _bind("s1") + FLUSH + DESCRIBE + EXECUTE + FLUSH + SYNC
        + fast_batch
        + _bind("s1") + FLUSH + EXECUTE + FLUSH + SYNC
        + other)


def test_an_expired_shape_is_not_split():
    slow = _twin.framing.SlowShapesTable()
    slow.add(_twin.framing.shape_hash("SELECT 3"), 100)
    state = _twin.framing.ClientFramingState(LIMIT, slow)
    state.now = 200
    data = _parse("SELECT 3") + _bind() + EXECUTE + SYNC
    assert _framed(state, data, []) == data


def test_a_statement_prepared_before_its_shape_was_slow_is_split_once_it_is():
    slow = _twin.framing.SlowShapesTable()
    state = _twin.framing.ClientFramingState(LIMIT, slow)
    prepare = _parse("SELECT pg_sleep($1)", "_pg3_0") + SYNC
    run = _bind("_pg3_0") + EXECUTE + SYNC
    assert _framed(state, prepare + run, []) == prepare + run
    slow.add(_twin.framing.shape_hash("SELECT pg_sleep($1)"), 10**19)
    assert _framed(state, run + _bind("other") + EXECUTE + SYNC, []) == (
        _bind("_pg3_0") + FLUSH + EXECUTE + FLUSH + SYNC + _bind("other") + EXECUTE + SYNC)
