"""Hostile input through a real proxy into real spans: comments, encodings, start-up and cancel packets.

Each case goes from a real client through the proxy to a real PostgreSQL while
a bystander session measures its own round trips, and the spans arrive at a
real OTLP receiver. What must hold:

* the client gets PostgreSQL's answer (a result, or PostgreSQL's own error:
  the proxy adds nothing and takes nothing away);
* the proxy keeps serving: the bystander's round trips stay short while the
  hostile statements are relayed and turned into spans, and a new session
  works afterwards;
* every exported span is well-formed: ids of the right size, attribute values
  of OTLP scalar types, strings valid UTF-8, and bounded in number and size.

The pure parsers get their own coverage-guided fuzzing (``tests/fuzz/``); the
fault cases of ``test_faults.py`` (garbage after login, oversized and
truncated start-up packets, unknown cancel keys) are not repeated here.
"""

from __future__ import annotations

import socket
import statistics
import struct
import threading
import time

import psycopg
import pytest

from pgotel_proxy import sqlcomment
from pgotel_proxy.stats import STATS
from rawpg import RawConn, error_fields
from tracetree import random_traceparent, server_spans
from wire import Query as _query, message as _msg

pytestmark = pytest.mark.timeout(90)

MB = 1 << 20
# Bounds a span must keep whatever the SQL held: OpenTelemetry's default span
# attribute count limit, and the sanitised text's cap plus room for the rest.
MAX_ATTRIBUTES = 128
MAX_ATTRIBUTE_CHARS = 64 * 1024 + 16
MAX_SPAN_CHARS = 96 * 1024


class Bystander:
    """Another session through the same proxy, timing ``SELECT 1`` round trips the whole time."""

    def __init__(self, proxy) -> None:
        self.conn = psycopg.connect(proxy.dsn(application_name="bystander"), autocommit=True)
        self.samples: list[float] = []
        self.at: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                assert self.conn.execute("select 1").fetchone() == (1,)
                self.samples.append(time.perf_counter() - t0)
                self.at.append(t0)
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.errors.append(exc)

    def __enter__(self) -> "Bystander":
        # Warm up, so connection set-up is not counted.
        self.conn.execute("select 1")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self.conn.close()
        assert not self.errors, self.errors

    def worst(self) -> float:
        return max(self.samples)

    def summary(self) -> str:
        s = sorted(self.samples)
        return f"n={len(s)} median={statistics.median(s) * 1e3:.1f}ms max={s[-1] * 1e3:.1f}ms"


def check_span(span) -> None:
    """One exported span is well-formed and bounded."""
    assert len(span.trace_id) == 32 and int(span.trace_id, 16) != 0
    assert len(span.span_id) == 16 and int(span.span_id, 16) != 0
    assert span.parent_span_id is None or len(span.parent_span_id) == 16
    assert span.name and len(span.name) <= 255
    assert 0 < span.start_ns <= span.end_ns
    assert len(span.attributes) <= MAX_ATTRIBUTES, (span.name, len(span.attributes))
    total = 0
    for key, value in span.attributes.items():
        assert isinstance(key, str) and key
        if isinstance(value, list):  # an array attribute (pgotel.phases): of plain scalars
            assert value and all(isinstance(item, (str, bool, int, float)) for item in value), (key, value)
            continue
        assert isinstance(value, (str, bool, int, float)), (key, type(value))
        if isinstance(value, str):
            value.encode("utf-8")  # the receiver decoded protobuf strings: they were valid UTF-8
            assert len(value) <= MAX_ATTRIBUTE_CHARS, (key, len(value))
            total += len(value)
    assert total <= MAX_SPAN_CHARS, (span.name, total)


def spans_of(otlp, proxy, ctx, n: int = 1):
    proxy.flush()
    otlp.wait_for(lambda s: len(server_spans(s, ctx.trace_id)) >= n, timeout=15)
    for span in otlp.spans:
        check_span(span)
    return server_spans(otlp.spans, ctx.trace_id)


def _still_serves(proxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) as conn:
        assert conn.execute("select 'still here'").fetchone() == ("still here",)


# --------------------------------------------------------------------------
# Hostile sqlcommenter comments


def _pairs(n: int, width: int = 1, prefix: str = "k") -> str:
    return ",".join(f"{prefix}{i}='{'v' * width}'" for i in range(n))


def hostile_statements(tp: str) -> dict[str, str]:
    lead = f"/*traceparent='{tp}'*/ "
    return {
        # Just under the proxy's observe limit, so it is decoded and parsed (not merely relayed).
        "900kb-comment-value": lead + "SELECT 1 /*k='" + "x" * (900 << 10) + "'*/",
        "900kb-comment-of-stars": lead + "SELECT 1 /*" + "*" * (900 << 10) + "*/",
        "thousands-of-pairs": lead + "SELECT 1 /*" + _pairs(5000) + "*/",
        # Many comments, each within every per-comment cap: the tags must not multiply.
        "16-comments-of-64-pairs": lead + "SELECT 1 " + " ".join(
            "/*" + _pairs(64, 100, f"c{j}k") + "*/" for j in range(16)
        ),
        # (PostgreSQL's own lexer is quadratic in runs of "/*": 2000 deep costs it ~50 ms.)
        "nested-2000-deep": lead + "SELECT 1 /*" + "/*" * 2000 + "*/" * 2001,
        "quotes-and-escapes": lead + "SELECT 1 /*a='\\'" + "%27%2A%2F" * 2000 + "',b='%ZZ%'*/",
        "invalid-percent-utf8": lead + "SELECT 1 /*a='%ED%A0%80%FF%C3%28',b='%F0%9F%98'*/",
    }


def test_hostile_comments_through_the_proxy(make_proxy, otlp):
    proxy = make_proxy()
    ctx = random_traceparent()
    cases = hostile_statements(ctx.traceparent)
    took = {}
    with Bystander(proxy) as bystander, psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        time.sleep(0.3)
        baseline = bystander.worst()
        for name, sql in cases.items():
            t0 = time.perf_counter()
            assert conn.execute(sql).fetchone() == (1,), name
            took[name] = time.perf_counter() - t0
        proxy.flush()  # spans are built while the bystander keeps going
        time.sleep(0.2)
    spans = spans_of(otlp, proxy, ctx, len(cases))
    assert len(spans) == len(cases), otlp.tree(ctx.trace_id)
    # The relay was not held up: a bystander round trip stays short (generous for a busy CI machine).
    assert bystander.worst() < max(0.25, 10 * baseline), f"{bystander.summary()}, statements: {took}"
    many = spans[3]
    tags = [k for k in many.attributes if k.startswith("pgotel.sqlcommenter.")]
    # 1024 well-formed pairs in 16 comments: capped in all (the traceparent is one of the tags).
    assert len(tags) == sqlcomment._MAX_TAGS - 1, len(tags)
    odd = spans[-1].attributes
    assert odd["pgotel.sqlcommenter.a"].startswith("\ufffd") and odd["pgotel.sqlcommenter.b"] == "\ufffd"
    for span in spans:
        assert span.name == "SELECT" and span.status_code != "ERROR", span.describe()
        assert span.parent_span_id == ctx.span_id
    _still_serves(proxy)


def test_comment_beyond_observe_limit_is_relayed_undecoded(make_proxy, otlp):
    proxy = make_proxy()
    ctx = random_traceparent()
    sql = f"/*traceparent='{ctx.traceparent}'*/ SELECT 1 /*k='" + "x" * (2 * MB) + "'*/"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute(sql).fetchone() == (1,)
        marker = random_traceparent()
        conn.execute(f"SELECT 2 /*traceparent='{marker.traceparent}'*/")
    spans_of(otlp, proxy, marker)
    # Too large to hold: no text, so no context either (a root span of its own), but well-formed.
    assert server_spans(otlp.spans, ctx.trace_id) == []
    assert any(s.attributes.get("db.response.returned_rows") == 1 for s in server_spans(otlp.spans))


def _direct_error(pg, payload: bytes, **startup) -> dict[str, str]:
    with RawConn(pg.host, pg.port) as raw:
        raw.startup(**startup)
        raw.send(payload)
        msgs = raw.read_until_ready()
    return error_fields(next(b for t, b in msgs if t == "E"))


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_query(b"SELECT 1 /*a='\x00'*/"), id="nul-in-query"),
        pytest.param(_query(b"SELECT '\xff\xfe' /*a='\xc3\x28'*/"), id="invalid-utf8-in-query"),
        pytest.param(
            _msg(b"P", b"\x00SELECT $1::text /*traceparent='x'*/\x00\x00\x00")
            + _msg(b"B", b"\x00\x00\x00\x00\x00\x01" + struct.pack("!i", 3) + b"a\x00b" + b"\x00\x00")
            + _msg(b"E", b"\x00\x00\x00\x00\x00")
            + _msg(b"S", b""),
            id="nul-in-text-parameter",
        ),
    ],
)
def test_postgres_rejects_and_client_gets_its_error(pg, make_proxy, otlp, payload):
    """NUL and invalid UTF-8: PostgreSQL refuses them; the client gets exactly PostgreSQL's error."""
    proxy = make_proxy()
    expected = _direct_error(pg, payload)
    with RawConn("127.0.0.1", proxy.port) as raw:
        raw.startup()
        raw.send(payload)
        msgs = raw.read_until_ready()
        got = error_fields(next(b for t, b in msgs if t == "E"))
        assert {k: got[k] for k in "SCM"} == {k: expected[k] for k in "SCM"}
        assert got["C"] in ("08P01", "22021"), got
        if got["S"] != "FATAL":
            # The session goes on.
            assert any(t == "D" for t, _ in raw.query("select 1"))
    proxy.flush()
    for span in otlp.spans:
        check_span(span)
    _still_serves(proxy)


def test_latin1_client_encoding_bytes_in_comments(make_proxy, otlp):
    """A LATIN1 client sends bytes that are not UTF-8; PostgreSQL converts them, the proxy must cope."""
    proxy = make_proxy()
    ctx = random_traceparent()
    sql = ("SELECT 'caf\xe9' AS v /*app='caf\xe9\xff',enc='%E9%FF',traceparent='" + ctx.traceparent + "'*/").encode("latin-1")
    with RawConn("127.0.0.1", proxy.port) as raw:
        raw.startup(client_encoding="LATIN1")
        msgs = raw.send(_query(sql)) or raw.read_until_ready()
        rows = [b for t, b in msgs if t == "D"]
        assert rows and rows[0].endswith(b"caf\xe9"), msgs  # PostgreSQL answered in LATIN1
    (span,) = spans_of(otlp, proxy, ctx)
    assert span.attributes["pgotel.sqlcommenter.app"] == "caf\ufffd\ufffd"
    assert span.attributes["pgotel.sqlcommenter.enc"] == "\ufffd\ufffd"
    assert span.status_code != "ERROR"


# --------------------------------------------------------------------------
# Start-up packets


def test_startup_packet_one_byte_at_a_time(make_proxy):
    proxy = make_proxy()
    body = b"user\x00postgres\x00database\x00postgres\x00application_name\x00dribble\x00\x00"
    packet = struct.pack("!II", len(body) + 8, 196608) + body
    with RawConn("127.0.0.1", proxy.port) as raw:
        for i in range(len(packet)):
            raw.send(packet[i : i + 1])
            time.sleep(0.002)
        msgs = raw.read_until_ready()
        assert msgs[-1][0] == "Z", msgs
        assert raw.params.get("application_name") == "dribble"
        assert any(t == "D" for t, _ in raw.query("select 1"))


def _first_error(data: bytes) -> dict[str, str]:
    pos = 0
    while pos + 5 <= len(data):
        end = pos + 1 + struct.unpack_from("!I", data, pos + 1)[0]
        if data[pos : pos + 1] == b"E":
            return error_fields(data[pos + 5 : end])
        pos = end
    raise AssertionError(f"no ErrorResponse in {data[:200]!r}")


def test_startup_with_junk_options_and_invalid_utf8_user(pg, make_proxy):
    """PostgreSQL refuses these itself; the proxy passes its FATAL on and keeps serving."""
    proxy = make_proxy()
    many = b"".join(b"x%d\x00%s\x00" % (i, b"\xff" * 8) for i in range(300))
    cases = {
        "bad-user": b"user\x00\xff\xfe\xc3\x28\x00database\x00postgres\x00\x00",
        "300-unknown-options": b"user\x00postgres\x00" + many + b"\x00",
    }
    for name, body in cases.items():
        packet = struct.pack("!II", len(body) + 8, 196608) + body
        answers = []
        for port in (pg.port, proxy.port):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(packet)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            answers.append(_first_error(data))
        direct, proxied = answers
        assert proxied["S"] == "FATAL" and proxied["C"] == direct["C"], (name, direct, proxied)
    _still_serves(proxy)


# --------------------------------------------------------------------------
# CancelRequest keys of the wrong size


@pytest.mark.parametrize("key_len", [0, 3, 8, 32, 256, 300], ids=lambda n: f"key-{n}-bytes")
def test_cancel_with_wrong_key_length_is_not_forwarded(make_proxy, key_len):
    """The backend's real pid with a key of the wrong size (protocol 3.0 keys are 4 bytes)."""
    proxy = make_proxy()
    with RawConn("127.0.0.1", proxy.port) as raw:
        raw.startup()
        assert raw.cancel_key is not None and len(raw.cancel_key) == 4
        raw.send(_query(b"select pg_sleep(0.6), 'finished'"))
        time.sleep(0.15)
        dropped, violations = STATS.cancel_dropped, STATS.protocol_violations
        key = (raw.cancel_key * 100)[:key_len]
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            c.sendall(struct.pack("!III", 12 + key_len, 80877102, raw.backend_pid) + key)
            data = b""
            while chunk := c.recv(4096):
                data += chunk
        if 4 <= key_len <= 256:
            # A well-formed request for a key the proxy never issued: closed without a word, as PostgreSQL does.
            assert data == b""
            assert STATS.cancel_dropped == dropped + 1
        else:
            # Malformed: refused as a protocol violation (PostgreSQL just closes; either way nothing is cancelled).
            assert error_fields(data[5:])["C"] == "08P01", data
            assert STATS.protocol_violations == violations + 1
        msgs = raw.read_until_ready()
        assert not [b for t, b in msgs if t == "E"], msgs  # not cancelled
        assert any(t == "D" and b"finished" in b for t, b in msgs)
    _still_serves(proxy)
