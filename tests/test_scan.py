"""The run-stepping helper of the codec: compiled and interpreted, the same answers.

``pgotel_proxy.protocol.scan`` is compiled by Cython when the package was
built with it; its source also runs interpreted (tests/codec_twin.py loads
that copy). Both are checked here against each other and against the
definition, and a Session of either build observing a large result counts
the same rows.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgotel_proxy.protocol import scan
from pgotel_proxy.protocol import session as session_mod
from wire import message as _msg

from codec_twin import interpreted

_twin = interpreted()
#: run_end of the interpreted source, and of the compiled module when there is one.
IMPLS = [pytest.param(_twin.scan.run_end, id="python")]
SESSIONS = [pytest.param(_twin.session.Session, id="python")]
if scan.COMPILED:
    IMPLS.append(pytest.param(scan.run_end, id="compiled"))
    SESSIONS.append(pytest.param(session_mod.Session, id="compiled"))


def test_compiled_helper_is_built_where_ci_expects_it():
    # .ci/run sets this: a machine with a C compiler must not silently lose the helper.
    if os.environ.get("PGOTEL_EXPECT_COMPILED"):
        assert scan.COMPILED, "pgotel_proxy.protocol.scan was not compiled"


@pytest.mark.parametrize("impl", IMPLS)
def test_run_end_steps_over_a_run_and_stops_at_another_type(impl):
    rows = [_msg(b"D", b"x" * i) for i in range(5)]
    data = _msg(b"T", b"desc") + b"".join(rows) + _msg(b"C", b"SELECT 5\0")
    start = len(_msg(b"T", b"desc"))
    end, count = impl(data, start, len(data), ord("D"))
    assert count == 5 and end == start + sum(map(len, rows)) and data[end:end + 1] == b"C"


@pytest.mark.parametrize("impl", IMPLS)
def test_run_end_reports_an_incomplete_last_message(impl):
    data = _msg(b"D", b"ab") + _msg(b"D", b"abcdef")
    cut = data[:-3]
    end, count = impl(cut, 0, len(cut), ord("D"))
    assert count == 2 and end == len(data) > len(cut)
    # a header that is not complete ends the run before it
    cut = data[: len(_msg(b"D", b"ab")) + 3]
    assert impl(cut, 0, len(cut), ord("D")) == (len(_msg(b"D", b"ab")), 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_run_end_rejects_a_start_without_a_header(impl):
    with pytest.raises(ValueError):
        impl(b"D\x00\x00", 0, 3, ord("D"))
    with pytest.raises(ValueError):
        impl(b"D\x00\x00\x00\x04", 0, 99, ord("D"))  # n beyond the buffer


messages = st.tuples(st.sampled_from([b"D", b"d", b"C", b"Z"]), st.integers(0, 12), st.booleans())


@settings(max_examples=1000, deadline=None)
@given(st.lists(messages, min_size=1, max_size=30), st.integers(0, 40), st.sampled_from([ord("D"), ord("d")]))
def test_compiled_and_python_agree_on_any_stream(parts, cut, typ):
    data = b""
    for kind, size, bad_length in parts:
        body = b"\x01" * size
        # some messages declare a length below 4 (never sent by a server; must not hang either)
        data += kind + struct.pack("!I", min(size, 3) if bad_length and size < 4 else size + 4) + body
    n = max(0, len(data) - cut)
    for pos in range(0, max(0, n - 4)):
        if data[pos] != typ:
            continue
        expected = _twin.scan.run_end(data, pos, n, typ)
        assert expected[0] > pos and expected[1] >= 1
        if scan.COMPILED:
            assert scan.run_end(data, pos, n, typ) == expected


@pytest.mark.parametrize("session_class", SESSIONS)
def test_session_counts_a_large_result_in_small_and_large_chunks(session_class):
    from test_protocol_session import ready_session

    rows = 20000
    row = _msg(b"D", struct.pack("!h", 1) + struct.pack("!i", 3) + b"abc")
    stream = (_msg(b"T", struct.pack("!h", 0)) + row * rows + _msg(b"C", b"SELECT 20000\0") + _msg(b"Z", b"I"))
    for size in (7, 1000, 65536, len(stream)):
        s = ready_session(session_class)
        s.client_data(_msg(b"Q", b"SELECT x FROM t\0"), 1)
        for i in range(0, len(stream), size):
            s.server_observe(stream[i:i + size], 2)
        (rec,) = s.take_completed()
        assert rec.results[0].rows == rows and rec.results[0].tag == "SELECT 20000", size
