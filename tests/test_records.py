"""The records' compact form (protocol/records.py) and its compiled twin (_core.pack / unpack).

Both implementations are run on the same records: random ones, the records of
the recorded corpus, and ones with every kind of value a field may hold. The
compiled pack must write the bytes the Python one writes, and each unpack must
give back every field of every record. The layout is defined once, in
``events.py``: a record class with one more field passes through both.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgotel_proxy.protocol import Session, records
from pgotel_proxy.protocol import session as session_mod
from pgotel_proxy.protocol import events
from pgotel_proxy.protocol.events import COMPLETION_LAYOUT, STATEMENT_LAYOUT, Completion, Statement

from test_protocol_fuzz import CORPUS

PY = (records.pack, records.unpack)
FORMS = [pytest.param(PY, id="python")]
if session_mod.COMPILED:
    from pgotel_proxy.protocol import _core

    FORMS.append(pytest.param((_core.pack, _core.unpack), id="compiled"))


def _fields(rec) -> dict:
    out = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}
    if out.get("results") is not None:
        out["results"] = [_fields(c) for c in out["results"]]
    return out


def _types(value):
    """The value with the type of everything in it (1 and True, [] and () are equal, not the same)."""
    if isinstance(value, dict):
        return {(type(k), _types(k)): (type(v), _types(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (type(value), [(type(v), _types(v)) for v in value])
    return (type(value), value)


def _same(back: list, recs: list) -> None:
    assert [type(r) for r in back] == [type(r) for r in recs]
    assert [_fields(r) for r in back] == [_fields(r) for r in recs]
    assert [_types(_fields(r)) for r in back] == [_types(_fields(r)) for r in recs]


def _corpus_records() -> list:
    out = []
    for steps in CORPUS.values():
        s = Session(capture_params=True)
        now = 1
        for side, data in steps:
            now += 1000
            if side == "c":
                s.client_data(data, now)
            else:
                s.server_observe(data, now)
        out.extend(s.take_completed())
    return out


_text = st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["", "ok", "I", "SELECT 1", "extended"]))
_i64 = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(0, 10**12))
_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10),
                  st.binary(max_size=6))
_value = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner),
    st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=3)), max_leaves=8)
_completion = st.builds(Completion, _i64, _text, _i64,
                        st.one_of(st.none(), st.dictionaries(st.sampled_from("CMPS"), st.text(max_size=5))))
_statement = st.builds(
    Statement, st.sampled_from(["simple", "extended", "function"]), _text,
    statement_name=_text, portal=_text, start_ns=_i64, parse_start_ns=_i64, parse_end_ns=_i64,
    parse_exact=st.booleans(), bind_start_ns=_i64, bind_end_ns=_i64, bind_exact=st.booleans(),
    exec_start_ns=_i64, end_ns=_i64, exec_exact=st.booleans(), status=_text, tag=_text, rows=_i64,
    error=st.one_of(st.none(), st.dictionaries(st.sampled_from("CMPS"), st.text(max_size=5))),
    params=st.one_of(st.none(), st.lists(_text, max_size=3)),
    results=st.one_of(st.none(), st.lists(_completion, max_size=3)), reused=st.booleans(), copy=_text,
    tx_status=_text, extra=st.one_of(st.none(), st.dictionaries(st.text(max_size=8), _value, max_size=3)))


@settings(max_examples=300, deadline=None)
@given(st.lists(_statement, max_size=5), st.integers(0, 4))
def test_random_records_same_bytes_and_come_back(recs, repeat):
    recs = recs + recs[:repeat]  # the same objects again: references to texts already written
    packed = records.pack(recs)
    _same(records.unpack(packed), recs)
    if session_mod.COMPILED:
        assert _core.pack(recs) == packed
        _same(_core.unpack(packed), recs)


def test_corpus_records_same_bytes_and_come_back():
    recs = _corpus_records()
    assert any(r.error for r in recs) and any(r.params for r in recs) and any(r.results for r in recs)
    packed = records.pack(recs)
    _same(records.unpack(packed), recs)
    if session_mod.COMPILED:
        assert _core.pack(recs) == packed
        _same(_core.unpack(packed), recs)


@pytest.mark.parametrize("form", FORMS)
def test_every_field_is_carried(form):
    """Errors, parameters, extra facts, results with errors, lone surrogates, big ints: one form for all."""
    pack, unpack = form
    rec = Statement("simple", "SELECT 1; SELECT x\udc80", error={"C": "42P01", "M": "no"}, params=["1", None],
                    extra={"wal_lsn": "0/16B3748", "row": None, "position_shift": 3, "big": 2**80, "f": 0.5,
                           "b": b"\x00", "nested": [(1, {"k": True})]},
                    results=[Completion(7, "SELECT 1", 1), Completion(9, None, 0, {"C": "22012"})],
                    copy="in", tx_status="E", status="error", reused=True)
    _same(unpack(pack([rec])), [rec])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("change, error", [
    (dict(rows=2**63), OverflowError), (dict(parse_exact=1), TypeError), (dict(tag=b"SELECT 1"), TypeError),
    (dict(results=(Completion(1, "x", 1),)), TypeError), (dict(extra={"s": {1}}), TypeError),
    (dict(results=[object()]), TypeError), (dict(start_ns=True), TypeError),
])
def test_values_a_kind_does_not_carry_are_refused(form, change, error):
    pack, _ = form
    good = Statement("extended", "SELECT 1", status="ok", tag="SELECT 1", rows=1, tx_status="I")
    assert type(pack([good])) is bytes
    with pytest.raises(error):
        pack([good, dataclasses.replace(good, **change)])


@pytest.mark.parametrize("form", FORMS)
def test_unpack_refuses_damaged_data(form):
    pack, unpack = form
    recs = [Statement("simple", "SELECT 1", status="ok", results=[Completion(5, "SELECT 1", 1)], tx_status="I",
                      extra={"k": [1, 2]})]
    packed = pack(recs)
    for cut in (0, 1, 4, 10, len(packed) - 1):
        with pytest.raises(ValueError):
            unpack(packed[:cut])
    with pytest.raises(ValueError):
        unpack(packed + b"\x00")
    with pytest.raises(ValueError):
        unpack(b"\x02" + packed[1:])  # another format version
    bools = 5 + (4 + 6) + (4 + 8) + 4 + 4 + 3 * 8  # version, count, protocol, sql, two None texts, three times
    assert packed[bools] == 0  # parse_exact
    with pytest.raises(ValueError):
        unpack(packed[:bools] + b"\x02" + packed[bools + 1:])
    at = packed.index(b"\x07" + b"\x02\x00\x00\x00")  # extra's list
    with pytest.raises(ValueError):
        unpack(packed[:at] + b"\x63" + packed[at + 1:])  # no such value tag
    with pytest.raises(ValueError):
        unpack(packed[:at + 1] + b"\xff\xff\xff\x7f" + packed[at + 5:])  # more items than bytes


@pytest.mark.parametrize("form", FORMS)
def test_a_text_repeated_in_a_batch_is_sent_once_and_comes_back_shared(form):
    pack, unpack = form
    sql = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
    recs = [Statement("extended", sql, statement_name="P0_1", status="ok", tag="SELECT 1", rows=1, tx_status="I")
            for _ in range(50)]
    packed = pack(recs)
    assert packed.count(sql.encode()) == 1
    back = unpack(packed)
    assert back[0].sql == sql and all(r.sql is back[0].sql and r.tag == "SELECT 1" for r in back)
    # A reference to a text not read yet is damage, not a guess.
    one = pack(recs[:1])
    at = 5 + 4 + len("extended")  # the record's second text: its SQL ("extended" is text 0)
    assert one[at:at + 4] == len(sql).to_bytes(4, "little")
    forward = one[:at] + b"\xfe\xff\xff\xff" + (1).to_bytes(4, "little") + one[at + 4 + len(sql):]
    with pytest.raises(ValueError):
        unpack(forward)
    assert unpack(one[:at] + b"\xfe\xff\xff\xff" + (0).to_bytes(4, "little") + one[at + 4 + len(sql):])[0].sql \
        == "extended"


def test_a_batch_starts_with_its_format_version():
    packed = records.pack([])
    assert packed == struct.pack("<BI", records.FORMAT_VERSION, 0)
    if session_mod.COMPILED:
        assert _core.pack([]) == packed


# ------------------------------------------------------------------ one layout, defined once


def test_the_layout_is_the_classes_fields():
    assert [name for name, _, _ in STATEMENT_LAYOUT] == [f.name for f in dataclasses.fields(Statement)]
    assert [name for name, _, _ in COMPLETION_LAYOUT] == [f.name for f in dataclasses.fields(Completion)]
    kinds = dict((name, kind) for name, kind, _ in STATEMENT_LAYOUT)
    assert kinds["start_ns"] == events.INT and kinds["reused"] == events.BOOL and kinds["sql"] == events.STR
    assert kinds["extra"] == events.VALUE and kinds["results"] == events.COMPLETIONS
    assert dict((n, d) for n, _, d in STATEMENT_LAYOUT)["status"] == "pending"


def test_a_field_without_a_kind_is_refused():
    @dataclasses.dataclass(slots=True)
    class Odd:
        when: "set[int]"

    with pytest.raises(TypeError):
        events._layout(Odd)


def _wider_classes():
    """Statement and Completion with one more field each, their layouts made the one way there is."""
    fields = [(f.name, f.type, dataclasses.field(default=f.default) if f.default is not dataclasses.MISSING else
               dataclasses.field()) for f in dataclasses.fields(Statement)]
    statement = dataclasses.make_dataclass("Statement", fields + [("wal_lsn", "str | None", None)],
                                           slots=True, eq=False)
    cfields = [(f.name, f.type, dataclasses.field(default=f.default) if f.default is not dataclasses.MISSING else
                dataclasses.field()) for f in dataclasses.fields(Completion)]
    completion = dataclasses.make_dataclass("Completion", cfields + [("seq", "int", 0)], slots=True, eq=False)
    return statement, completion, events._layout(statement), events._layout(completion)


def test_a_new_field_needs_no_other_file():
    statement, completion, layout, clayout = _wider_classes()
    assert layout[-1] == ("wal_lsn", events.STR, None) and clayout[-1] == ("seq", events.INT, 0)
    recs = [statement("simple", "SELECT 1", status="ok", wal_lsn="0/16B3748",
                      results=[completion(5, "SELECT 1", 1, None, seq=3)])]
    form = records.RecordForm(statement, completion, layout, clayout)
    packed = form.pack(recs)
    _same(form.unpack(packed), recs)
    if not session_mod.COMPILED:
        return
    try:
        _core.configure(Session, statement, completion, layout, clayout, tuple(range(9)))
        assert _core.pack(recs) == packed
        _same(_core.unpack(packed), recs)
        # the codec makes records of the configured class, every field at its default
        from test_protocol_session import ready_session

        s = ready_session()
        s.client_data(b"Q" + struct.pack("!I", 13) + b"SELECT 1\x00", 1)
        s.server_observe(b"C" + struct.pack("!I", 13) + b"SELECT 1\x00" + b"Z" + struct.pack("!I", 5) + b"I", 2)
        (rec,) = s.take_completed()
        assert type(rec) is statement and rec.wal_lsn is None and rec.results[0].seq == 0
    finally:
        _core.configure(Session, Statement, Completion, STATEMENT_LAYOUT, COMPLETION_LAYOUT, tuple(range(9)))
    assert _core.unpack(_core.pack([Statement("simple", "x")]))[0].__class__ is Statement


def test_the_compiled_encoder_takes_the_layout_it_is_given():
    """_otlpenc finds the fields it reads in the layout from events.py: a wider record is fine, a missing field not."""
    from pgotel_proxy.tracing import otlp

    if otlp.configure_records is None:
        pytest.skip("compiled encoder not built")
    statement, completion, layout, clayout = _wider_classes()
    try:
        otlp.configure_records(statement, completion, layout, clayout)
        with pytest.raises(ValueError):
            otlp.configure_records(Statement, Completion, tuple(f for f in STATEMENT_LAYOUT if f[0] != "sql"),
                                   COMPLETION_LAYOUT)
        with pytest.raises(ValueError):  # a field of another kind than the encoder reads
            otlp.configure_records(Statement, Completion, tuple((n, events.VALUE if n == "rows" else k, d)
                                                                for n, k, d in STATEMENT_LAYOUT), COMPLETION_LAYOUT)
    finally:
        otlp.configure_records(Statement, Completion, STATEMENT_LAYOUT, COMPLETION_LAYOUT)
