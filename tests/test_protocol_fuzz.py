"""Property tests for the sans-IO session: hostile or mangled bytes never break it.

Streams start from real recordings in ``tests/corpus/`` (a psycopg session's
traffic after the start-up packet, both directions in arrival order), are
mutated (bytes flipped, lengths and type bytes overwritten, spans cut out or
duplicated) and split into random chunks. Whatever comes in:

* the client side raises nothing but :class:`ProtocolViolation`;
* the server side raises nothing at all, in observe and in filter (hold) mode;
* it terminates quickly (hypothesis deadline, generous so a loaded machine does not flake);
* buffered bytes stay within ``observe_limit`` + a header, and the request
  queue within ``max_pending``.

Corpus file format: records of one side byte (``c`` / ``s``), a big-endian
uint32 length, and that many bytes.
"""

from __future__ import annotations

import pathlib
import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pgotel_proxy.protocol import ProtocolViolation, Session

CORPUS_DIR = pathlib.Path(__file__).parent / "corpus"
OBSERVE_LIMIT = 512
MAX_PENDING = 64
MAX_MESSAGE = 4096


def load(path: pathlib.Path) -> list[tuple[str, bytes]]:
    raw = path.read_bytes()
    steps = []
    pos = 0
    while pos < len(raw):
        side = chr(raw[pos])
        (n,) = struct.unpack_from("!I", raw, pos + 1)
        steps.append((side, raw[pos + 5 : pos + 5 + n]))
        pos += 5 + n
    return steps


CORPUS = {p.stem: load(p) for p in sorted(CORPUS_DIR.glob("*.bin"))}
SETTINGS = settings(
    max_examples=150,
    deadline=2000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def new_session(**kw) -> Session:
    kw.setdefault("observe_limit", OBSERVE_LIMIT)
    kw.setdefault("max_pending", MAX_PENDING)
    kw.setdefault("max_message_size", MAX_MESSAGE)
    kw.setdefault("strip_scram_plus", True)
    return Session(**kw)


def check_bounds(s: Session) -> None:
    assert len(s._cbuf) <= OBSERVE_LIMIT + 5
    assert len(s._sbuf) <= OBSERVE_LIMIT + 5
    assert len(s._pending) <= MAX_PENDING


def feed(s: Session, steps, cuts, done: list | None = None) -> tuple[bool, bytes, bytes]:
    """Feed steps split at ``cuts``; return (client violated, client bytes out, server bytes out)."""
    violated = False
    cout: list[bytes] = []
    sout: list[bytes] = []
    now = 0
    for i, (side, data) in enumerate(steps):
        pieces = _split(data, cuts[i % len(cuts)] if cuts else [])
        for piece in pieces:
            now += 1
            if side == "c":
                if violated:
                    continue  # the proxy has closed this connection
                try:
                    r = s.client_data(piece, now)
                except ProtocolViolation as exc:
                    assert exc.sqlstate in ("08P01",)
                    violated = True
                    continue
                cout.append(piece if r is None else r)
            elif s.server_hold:
                sout.append(s.server_filter(piece, now))
            else:
                s.server_observe(piece, now)
                sout.append(piece)
            check_bounds(s)
        taken = s.take_completed()
        if done is not None:
            done.extend(taken)
    s.finish_all(now + 1)
    if done is not None:
        done.extend(s.take_completed())
    return violated, b"".join(cout), b"".join(sout)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    if not data:
        return []
    points = sorted({c % len(data) for c in cuts} - {0})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


# One mutation: (kind, where, value); "where" is taken modulo the step's size.
mutation = st.tuples(
    st.sampled_from(["flip", "set", "length", "type", "cut", "dup", "insert"]),
    st.integers(min_value=0, max_value=1 << 16),
    st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1),
)
cut_lists = st.lists(st.lists(st.integers(min_value=1, max_value=1 << 16), max_size=6), min_size=1, max_size=4)


def mutate(steps, muts):
    steps = list(steps)
    for kind, where, value in muts:
        i = where % len(steps)
        side, data = steps[i]
        if not data:
            continue
        at = (where * 7919 + value) % len(data)
        b = bytearray(data)
        if kind == "flip":
            b[at] ^= 1 << (value & 7)
        elif kind == "set":
            b[at] = value & 0xFF
        elif kind == "length" and len(b) >= at + 4:
            b[at : at + 4] = struct.pack("!i", value)
        elif kind == "type":
            b[at] = b"QPBEDSHCFXcdfpZTEN1234snIGVKRAD"[value % 31]
        elif kind == "cut":
            del b[at : at + (value % 64) + 1]
        elif kind == "dup":
            b[at:at] = b[at : at + (value % 64) + 1]
        elif kind == "insert":
            b[at:at] = struct.pack("!i", value)
        steps[i] = (side, bytes(b))
    return steps


def _corpus_examples(test):
    for name in CORPUS:
        test = example(name=name, muts=[], cuts=[[1]])(test)
    return test


@SETTINGS
@given(name=st.sampled_from(sorted(CORPUS)), muts=st.lists(mutation, max_size=8), cuts=cut_lists)
@_corpus_examples
def test_mutated_streams(name, muts, cuts):
    steps = mutate(CORPUS[name], muts)
    for flush in (False, True):
        s = new_session(flush_phases=flush)
        feed(s, steps, cuts)
        check_bounds(s)


@SETTINGS
@given(
    steps=st.lists(st.tuples(st.sampled_from("cs"), st.binary(max_size=600)), max_size=12),
    cuts=cut_lists,
    ready=st.booleans(),
)
def test_random_bytes(steps, cuts, ready):
    s = new_session()
    if ready:
        s.server_filter(b"Z\x00\x00\x00\x05I", 0)
    feed(s, steps, cuts)
    check_bounds(s)


@settings(max_examples=60, deadline=2000, derandomize=True, database=None)
@given(name=st.sampled_from(sorted(CORPUS)), cuts=cut_lists)
def test_valid_streams_any_chunking(name, cuts):
    """Recorded valid traffic: relayed byte for byte, observation stays in sync, same records."""
    steps = CORPUS[name]
    whole = new_session(observe_limit=1 << 20, max_message_size=1 << 20, max_pending=10_000)
    done_whole = _records(whole, steps, [])
    s = new_session(observe_limit=1 << 20, max_message_size=1 << 20, max_pending=10_000)
    done = _records(s, steps, cuts)
    assert s.out_of_sync is None and whole.out_of_sync is None
    assert done == done_whole
    assert done, "the recording produced no statements"


def _records(s: Session, steps, cuts):
    out = []
    cin = b"".join(d for side, d in steps if side == "c")
    sin = b"".join(d for side, d in steps if side == "s")
    violated, cout, sout = feed(s, steps, cuts, out)
    assert not violated
    assert cout == cin and sout == sin
    return [(r.protocol, r.sql, r.status, r.tag, r.rows, r.reused, r.copy) for r in out]
