"""The compiled half of the OTLP encoder (``_otlpenc.c``) and its Python twin give the same bytes.

``pgotel_proxy.tracing.otlp`` uses the compiled ``span_field`` and
``attribute_fields`` when the package was built with a C compiler, the Python
versions otherwise (or with ``PGOTEL_PURE_PYTHON=1``). tests/test_otlp_encoding.py
checks whichever is active against the SDK's encoder; here the two are
checked against each other on arbitrary input.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgotel_proxy.tracing import otlp

pytestmark = pytest.mark.skipif(not otlp.COMPILED, reason="compiled encoder not built (or PGOTEL_PURE_PYTHON)")

from pgotel_proxy.tracing._otlpenc import attribute_fields as c_attribute_fields  # noqa: E402
from pgotel_proxy.tracing._otlpenc import local_children as c_local_children  # noqa: E402
from pgotel_proxy.tracing._otlpenc import span_field as c_span_field  # noqa: E402


def test_compiled_encoder_is_built_where_ci_expects_it():
    if os.environ.get("PGOTEL_EXPECT_COMPILED"):
        assert otlp.COMPILED


ids64 = st.integers(1, 2**64 - 1)
blobs = st.binary(max_size=300)


@settings(max_examples=1500, deadline=None)
@given(st.integers(1, 2**128 - 1), ids64, st.one_of(st.none(), ids64), blobs, blobs, st.integers(0, 5),
       st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), blobs, blobs, blobs)
def test_span_field_same_bytes(trace_id, span_id, parent, trace_state, name, kind, start, end, flags, attrs, status, rare):
    args = (trace_id, span_id, parent, trace_state, name, kind, start, end, flags, attrs, status, rare)
    assert c_span_field(*args) == otlp._span_field_py(*args)


def test_span_field_refuses_what_python_refuses():
    good = [1, 2, None, b"", b"\x2a\x00", 1, 0, 0, 0, b"", b"", b""]
    for i, bad in ((0, 2**128), (1, 2**64), (0, -1), (2, 2**64), (6, -1), (7, 2**64)):
        args = list(good)
        args[i] = bad
        with pytest.raises((OverflowError, ValueError, struct.error)):
            otlp._span_field_py(*args)
        with pytest.raises((OverflowError, ValueError)):
            c_span_field(*args)
    with pytest.raises(TypeError):
        c_span_field(*good[:-1])
    with pytest.raises(TypeError):
        c_span_field(*(good[:3] + ["not bytes"] + good[4:]))


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 2**128 - 1), ids64, blobs, st.lists(st.tuples(
    st.tuples(blobs, st.integers(0, 5), blobs, blobs), ids64, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    max_size=4))
def test_local_children_same_spans(trace_id, parent, trace_state, groups):
    flat = [x for g in groups for x in g]
    head = ("resource", "scope")
    got, want = [], []
    c_local_children(got, head, trace_id, parent, trace_state, 256, *flat)
    otlp._local_children_py(want, head, trace_id, parent, trace_state, 256, *flat)
    assert got == want and len(got) == len(groups)
    assert [g[2] for g in got] == [c_span_field(trace_id, sid, parent, trace_state, *p[:2], s, e, 256, *p[2:], b"")
                                   for p, sid, s, e in groups]


def test_local_children_refuses_what_it_cannot_encode():
    parts = (b"", 1, b"", b"")
    with pytest.raises(TypeError):
        c_local_children([], ("r", "s"), 1, 2, b"", 256, parts, 3, 0)  # an incomplete group
    with pytest.raises(TypeError):
        c_local_children([], ("r", "s"), 1, 2, b"", 256, (b"", 1), 3, 0, 1)  # parts of three
    out: list = []
    with pytest.raises(OverflowError):
        c_local_children(out, ("r", "s"), 1, 2, b"", 256, parts, 3, 0, 1, parts, 2**64, 0, 1)
    assert len(out) == 1  # the spans before the bad one stay


values = st.one_of(
    st.text(max_size=40), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.lists(st.text(max_size=5), max_size=3), st.binary(max_size=10), st.none(),
)


@settings(max_examples=1000, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=20), values, max_size=12), st.integers(1, 6))
def test_attribute_fields_same_bytes_and_same_cache(attrs, cache_max):
    # Each implementation with its own cache, small enough to be cleared on the way.
    def run(fn):
        saved = (otlp._KV_CACHE, otlp._KV_CACHE_MAX)
        otlp._KV_CACHE, otlp._KV_CACHE_MAX = {}, cache_max
        try:
            out = [fn(attrs) for _ in range(2)]
            return out, dict(otlp._KV_CACHE)
        finally:
            otlp._KV_CACHE, otlp._KV_CACHE_MAX = saved

    py_out, py_cache = run(otlp._attribute_fields_py)
    c_out, c_cache = run(lambda a: c_attribute_fields(a, otlp._KV_CACHE, otlp._encode_kv, otlp._KV_CACHE_MAX,
                                                       otlp._KV_FIELD_MAX))
    assert c_out == py_out
    assert c_cache == py_cache
