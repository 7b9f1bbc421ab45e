"""The records' compact form (protocol/records.py), compiled and interpreted.

``records.py`` is one source, compiled by Cython where the package was built
with it; tests/codec_twin.py loads the same source interpreted. Both builds
are run on the same records: random ones, the records of the recorded
corpus, and ones with every kind of value a field may hold. The compiled pack
must write the bytes the interpreted one writes, and each unpack must give
back every field of every record. The layout is defined once, in
``events.py``: a record class with one more field passes through both.
"""

from __future__ import annotations

import dataclasses
import inspect
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgotel_proxy.protocol import Session, records
from pgotel_proxy.protocol import session as session_mod
from pgotel_proxy.protocol import events
from pgotel_proxy.protocol.events import COMPLETION_LAYOUT, STATEMENT_LAYOUT, Completion, Statement

from test_protocol_fuzz import CORPUS

from codec_twin import interpreted

_twin = interpreted()
#: The interpreted source's form, for the package's record classes.
_PY_FORM = _twin.records.RecordForm(Statement, Completion, STATEMENT_LAYOUT, COMPLETION_LAYOUT)
FORMS = [pytest.param((_PY_FORM.pack, _PY_FORM.unpack), id="python")]
if session_mod.COMPILED:
    FORMS.append(pytest.param((records.pack, records.unpack), id="compiled"))


def _fields(rec) -> dict:
    if dataclasses.is_dataclass(rec):  # a wider class of these tests
        names = [f.name for f in dataclasses.fields(rec)]
    else:
        names = [name for name, _, _ in (STATEMENT_LAYOUT if hasattr(rec, "protocol") else COMPLETION_LAYOUT)]
    out = {name: getattr(rec, name) for name in names}
    if out.get("results") is not None:
        out["results"] = [_fields(c) for c in out["results"]]
    return out


def _replace(rec: Statement, **changes) -> Statement:
    """A copy of ``rec`` with ``changes``."""
    values = {name: getattr(rec, name) for name, _, _ in STATEMENT_LAYOUT}
    values.update(changes)
    return Statement(**values)


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
    packed = _PY_FORM.pack(recs)
    _same(_PY_FORM.unpack(packed), recs)
    if session_mod.COMPILED:
        assert records.pack(recs) == packed
        _same(records.unpack(packed), recs)


def test_corpus_records_same_bytes_and_come_back():
    recs = _corpus_records()
    assert any(r.error for r in recs) and any(r.params for r in recs) and any(r.results for r in recs)
    packed = _PY_FORM.pack(recs)
    _same(_PY_FORM.unpack(packed), recs)
    if session_mod.COMPILED:
        assert records.pack(recs) == packed
        _same(records.unpack(packed), recs)


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
    (dict(results=[Completion(1, "x", None)]), TypeError),  # a required int: None is not its default
])
def test_values_a_kind_does_not_carry_are_refused(form, change, error):
    pack, _ = form
    good = Statement("extended", "SELECT 1", status="ok", tag="SELECT 1", rows=1, tx_status="I")
    assert type(pack([good])) is bytes
    with pytest.raises(error):
        pack([good, _replace(good, **change)])


@pytest.mark.parametrize("form", FORMS)
def test_unpack_refuses_damaged_data(form):
    pack, unpack = form
    recs = [Statement("simple", "SELECT 1", status="ok", results=[Completion(5, "SELECT 1", 1)], tx_status="I",
                      extra={"k": [1, 2]}, parse_exact=True)]
    packed = pack(recs)
    for cut in (0, 1, 4, 10, len(packed) - 1):
        with pytest.raises(ValueError):
            unpack(packed[:cut])
    with pytest.raises(ValueError):
        unpack(packed + b"\x00")
    with pytest.raises(ValueError):
        unpack(bytes([records.FORMAT_VERSION + 1]) + packed[1:])  # another format version
    # version, count, the record's mask, protocol, sql (the None texts and zero times left out)
    bools = 5 + 8 + (4 + 6) + (4 + 8)
    assert packed[bools] == 1  # parse_exact
    with pytest.raises(ValueError):
        unpack(packed[:bools] + b"\x02" + packed[bools + 1:])
    mask = int.from_bytes(packed[5:13], "little")
    assert mask == sum(1 << i for i, (name, _, _) in enumerate(STATEMENT_LAYOUT)
                       if name in ("protocol", "sql", "parse_exact", "status", "results", "tx_status", "extra"))
    with pytest.raises(ValueError):  # a field the layout does not have
        unpack(packed[:5] + (mask | 1 << len(STATEMENT_LAYOUT)).to_bytes(8, "little") + packed[13:])
    done = packed.index((1).to_bytes(4, "little") + (0b111).to_bytes(8, "little"))  # one Completion: end, tag, rows
    with pytest.raises(ValueError):  # its end left out: a required int has no default to stand for it
        unpack(packed[:done + 4] + (0b110).to_bytes(8, "little") + packed[done + 12:])
    at = packed.index(b"\x07" + b"\x02\x00\x00\x00")  # extra's list
    with pytest.raises(ValueError):
        unpack(packed[:at] + b"\x63" + packed[at + 1:])  # no such value tag
    with pytest.raises(ValueError):
        unpack(packed[:at + 1] + b"\xff\xff\xff\x7f" + packed[at + 5:])  # more items than bytes


@pytest.mark.parametrize("form", FORMS)
def test_a_text_repeated_in_a_batch_is_sent_once_and_comes_back_shared(form):
    pack, unpack = form
    sql = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
    other = "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2"
    recs = [Statement("extended", sql if i % 2 else other, statement_name="P0_1", status="ok", tag="SELECT 1",
                      rows=1, tx_status="I")
            for i in range(50)]
    packed = pack(recs)
    # Four texts long enough to be referred to ("extended", the two statements, the tag):
    # each is written once wherever in memory they are, even if all their slots collide.
    for text in ("extended", sql, other, "SELECT 1"):
        assert packed.count(text.encode()) == 1, text
    back = unpack(packed)
    assert back[1].sql == sql and back[0].sql == other
    assert all(r.sql is back[i % 2].sql and r.tag == "SELECT 1" for i, r in enumerate(back))
    recs = recs[1::2]
    # A reference to a text not read yet is damage, not a guess.
    one = pack(recs[:1])
    at = 5 + 8 + 4 + len("extended")  # the record's second text: its SQL ("extended" is text 0)
    assert one[at:at + 4] == len(sql).to_bytes(4, "little")
    forward = one[:at] + b"\xfe\xff\xff\xff" + (1).to_bytes(4, "little") + one[at + 4 + len(sql):]
    with pytest.raises(ValueError):
        unpack(forward)
    assert unpack(one[:at] + b"\xfe\xff\xff\xff" + (0).to_bytes(4, "little") + one[at + 4 + len(sql):])[0].sql \
        == "extended"


def test_texts_whose_slots_collide_are_remembered_over_the_probed_slots(monkeypatch):
    # The interpreted build takes a text's slot from id(): make every text's slot the same.
    monkeypatch.setattr(_twin.records, "id", lambda _v: 0, raising=False)
    texts = [f"SELECT {n} FROM a_table_of_mine" for n in range(_twin.records.REF_PROBES + 1)]
    recs = [Statement("simple", texts[i % len(texts)]) for i in range(3 * len(texts))]
    packed = _PY_FORM.pack(recs)
    # "simple" (under REF_MIN) is never referred to; the first REF_PROBES texts fill the
    # probed slots and are written once; the one more overwrites the home slot each time.
    for text in texts[1:-1]:
        assert packed.count(text.encode()) == 1, text
    assert packed.count(texts[-1].encode()) == 3
    assert packed.count(texts[0].encode()) == 3  # pushed out of the home slot, written again
    assert [r.sql for r in _PY_FORM.unpack(packed)] == [r.sql for r in recs]


def test_a_batch_starts_with_its_format_version():
    packed = _PY_FORM.pack([])
    assert packed == struct.pack("<BI", records.FORMAT_VERSION, 0)
    assert records.pack([]) == packed


# ------------------------------------------------------------------ one layout, defined once


def test_the_layout_is_the_classes_fields():
    """STATEMENT_LAYOUT / COMPLETION_LAYOUT are what the classes' __init__ take, in order, with their defaults."""
    for cls, layout, required in ((_twin.events.Statement, STATEMENT_LAYOUT, 2),
                                  (_twin.events.Completion, COMPLETION_LAYOUT, 3)):
        params = list(inspect.signature(cls).parameters.values())
        assert [p.name for p in params] == [name for name, _, _ in layout]
        assert [p.default for p in params[required:]] == [d for _, _, d in layout[required:]]
        assert all(p.default is inspect.Parameter.empty for p in params[:required])
        assert list(cls.__slots__) == [name for name, _, _ in layout]
    for cls, layout, required in ((Statement, STATEMENT_LAYOUT, 2), (Completion, COMPLETION_LAYOUT, 3)):
        # (the compiled classes too: the .pxd declares the same fields)
        made = cls(*(f"given {name}" for name, _, _ in layout[:required]))
        assert [getattr(made, name) for name, _, _ in layout] == [
            f"given {name}" if i < required else d for i, (name, _, d) in enumerate(layout)]
        made = cls(*(f"given {name}" for name, _, _ in layout))
        assert [getattr(made, name) for name, _, _ in layout] == [f"given {name}" for name, _, _ in layout]
    kinds = dict((name, kind) for name, kind, _ in STATEMENT_LAYOUT)
    assert kinds["start_ns"] == events.INT and kinds["reused"] == events.BOOL and kinds["sql"] == events.STR
    assert kinds["extra"] == events.VALUE and kinds["results"] == events.COMPLETIONS
    assert dict((n, d) for n, _, d in STATEMENT_LAYOUT)["status"] == "pending"


def test_the_codec_makes_records_at_their_defaults():
    """new_statement and new_completion (what the codec calls, no keyword parsing when compiled) equal the constructors."""
    for build in (events, _twin.events):
        made = build.new_statement("extended", "SELECT 1", 7)
        assert _fields(made) == _fields(build.Statement("extended", "SELECT 1", start_ns=7))
        for error in (None, {"C": "42601"}):
            done = build.new_completion(9, "SELECT 1", 1, error)
            assert type(done) is build.Completion and _fields(done) == _fields(build.Completion(9, "SELECT 1", 1, error))
        assert build.new_completion(9, None, 0).error is None


def _wider_classes():
    """Statement and Completion with one more field each, and their layouts."""
    def fields(layout, required):
        return [(name, object, dataclasses.field(default=d)) if i >= required else (name, object)
                for i, (name, _, d) in enumerate(layout)]

    statement = dataclasses.make_dataclass("Statement", fields(STATEMENT_LAYOUT, 2) + [("wal_lsn", object, None)],
                                           slots=True, eq=False)
    completion = dataclasses.make_dataclass("Completion", fields(COMPLETION_LAYOUT, 3) + [("seq", object, 0)],
                                            slots=True, eq=False)
    return (statement, completion, STATEMENT_LAYOUT + (("wal_lsn", events.STR, None),),
            COMPLETION_LAYOUT + (("seq", events.INT, 0),))


@pytest.mark.parametrize("form_class", [pytest.param(_twin.records.RecordForm, id="python")] + (
    [pytest.param(records.RecordForm, id="compiled")] if session_mod.COMPILED else []))
def test_a_new_field_needs_no_other_file(form_class):
    statement, completion, layout, clayout = _wider_classes()
    recs = [statement("simple", "SELECT 1", status="ok", wal_lsn="0/16B3748",
                      results=[completion(5, "SELECT 1", 1, None, seq=3)])]
    form = form_class(statement, completion, layout, clayout)
    packed = form.pack(recs)
    _same(form.unpack(packed), recs)


def test_the_compiled_encoder_takes_the_layout_it_is_given():
    """_otlpenc finds the fields it reads in the layout from events.py: a wider record is fine, a missing field not."""
    from pgotel_proxy.tracing import otlp
    from pgotel_proxy.tracing.spans import _FIRST_ROW_FIELD

    if otlp.configure_records is None:
        pytest.skip("compiled encoder not built")
    statement, completion, layout, clayout = _wider_classes()
    try:
        otlp.configure_records(statement, completion, layout, clayout, _FIRST_ROW_FIELD)
        with pytest.raises(ValueError):
            otlp.configure_records(Statement, Completion, tuple(f for f in STATEMENT_LAYOUT if f[0] != "sql"),
                                   COMPLETION_LAYOUT, _FIRST_ROW_FIELD)
        with pytest.raises(ValueError):  # a field of another kind than the encoder reads
            otlp.configure_records(Statement, Completion, tuple((n, events.VALUE if n == "rows" else k, d)
                                                                for n, k, d in STATEMENT_LAYOUT), COMPLETION_LAYOUT,
                                   _FIRST_ROW_FIELD)
        with pytest.raises(ValueError):  # the first row's field must end in the double 0.0 it writes over
            otlp.configure_records(Statement, Completion, STATEMENT_LAYOUT, COMPLETION_LAYOUT,
                                   _FIRST_ROW_FIELD[:-1] + b"\x01")
    finally:
        otlp.configure_records(Statement, Completion, STATEMENT_LAYOUT, COMPLETION_LAYOUT, _FIRST_ROW_FIELD)
