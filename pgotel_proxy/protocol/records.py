# cython: boundscheck=False, wraparound=False
# (Compiled without index checks: every index is a field's position below its layout's
# length, which a _Fields' tuples all have, a slot below REF_SLOTS, or a reference
# checked against what was read; .ci/sanitize runs tests/test_records.py on a build
# under AddressSanitizer.)
"""The compact form finished records cross to the span process in, pure Python.

``pack(records) -> bytes`` and ``unpack(data) -> list`` for the records of
``events.STATEMENT_LAYOUT``; every field of every record comes back equal.
One source: compiled by Cython with the rest of the codec where it is
installed, interpreted otherwise; tests hold the two builds byte-equal.

The form, little-endian throughout. A batch: u8 ``FORMAT_VERSION``, u32
record count, the records. A record: a u64 mask, bit i set when field i of its
layout is written, then the fields written, in layout order, each by its kind
(``events``). A field left out holds its layout's default: pack leaves out a
value that is the default object itself (None, False, 0, the default texts),
which most fields of most records are, so that neither side spends time on
them:

* INT: i64. BOOL: u8 0 or 1.
* STR: u32 ``NONE`` for None; or u32 ``REF`` and u32 k: the same object as
  the k-th string of at least ``REF_MIN`` UTF-8 bytes written in full before
  it in this batch (remembered by identity in ``REF_SLOTS`` slots, from slot
  ``(id >> 4) % REF_SLOTS`` on over at most ``REF_PROBES`` slots; when those
  are all taken the first is overwritten); or u32 length
  and the UTF-8 bytes (lone surrogates passed through).
* VALUE: a tag byte (``V_*``) and what it announces: nothing (None, False,
  True), an i64 (INT), a STR (STR; BIGINT: its decimal digits, never
  referred to), an IEEE double (FLOAT), u32 length and bytes (BYTES), u32
  count and values (LIST, TUPLE), u32 count and key, value pairs (DICT).
* COMPLETIONS: u32 ``NONE``, or u32 count and each Completion's fields in
  ``events.COMPLETION_LAYOUT`` order.

A value of a type its field's kind does not carry raises TypeError (an int
out of range: OverflowError); data that is not a batch raises ValueError.
"""

from __future__ import annotations

import struct

try:
    import cython
except ImportError:  # no Cython: the module runs interpreted
    from ._nocython import cython

from .events import (BOOL, COMPLETION_LAYOUT, COMPLETIONS, INT, STATEMENT_LAYOUT, STR, VALUE, Completion,
                     Statement)

__all__ = ["FORMAT_VERSION", "RecordForm", "pack", "unpack"]

FORMAT_VERSION = 2
NONE = 0xFFFFFFFF
REF = 0xFFFFFFFE
REF_MIN = 8
REF_SLOTS = 64
#: Bytes reserved a record when a batch is packed (most records take fewer).
_RECORD_ROOM = 256
REF_PROBES = 4  # so that up to 4 texts whose slots collide are all remembered
#: Most fields a layout may have (a record's u64 mask has a bit each; one bit spare, so that the
#: check for bits beyond the layout's shifts by less than 64).
MAX_FIELDS = 63
MAX_DEPTH = 32  # nesting of VALUEs

# VALUE tags.
V_NONE, V_FALSE, V_TRUE, V_INT, V_STR, V_FLOAT, V_BYTES, V_LIST, V_TUPLE, V_DICT, V_BIGINT = range(11)

#: The default of a field pack never leaves out (no value is this object).
_ALWAYS = object()

_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


class RecordForm:
    """pack / unpack for one pair of record classes and their layouts."""

    def __init__(self, statement=Statement, completion=Completion, statement_layout=STATEMENT_LAYOUT,
                 completion_layout=COMPLETION_LAYOUT) -> None:
        self.statement = statement
        self.completion = completion
        self.statement_layout = statement_layout
        self.completion_layout = completion_layout
        self._statement_fields = _Fields(statement, statement_layout)
        self._completion_fields = _Fields(completion, completion_layout)

    # ------------------------------------------------------------ pack

    def pack(self, records: list) -> bytes:
        out = _Out()
        if cython.compiled:  # room for most batches up front: the buffer is not copied as it grows
            PyByteArray_Resize(out.buf, 64 + _RECORD_ROOM * len(records))
        _put_u8(out, FORMAT_VERSION)
        _put_u32(out, len(records))
        refs: list = [None] * REF_SLOTS  # (object, k) by slot
        written = [0]
        for rec in records:
            self._pack_record(out, rec, self._statement_fields, refs, written)
        return out.value()

    def _pack_record(self, out: _Out, rec, fields: _Fields, refs: list, written: list) -> None:
        cls = fields.cls
        if not isinstance(rec, cls):
            raise TypeError(f"pack: {type(rec).__name__} is not a {cls.__name__}")
        names = fields.names
        kinds = fields.kinds
        defaults = fields.defaults
        descrs = fields.descrs if type(rec) is cls else None
        at = out.size if cython.compiled else len(out.buf)  # where the mask goes, once the fields are written
        _put_u64(out, 0)
        mask = 0
        for i in range(len(names)):
            kind = kinds[i]
            if cython.compiled and descrs is not None:  # the field's own get slot, no lookup by name
                descr = descrs[i]
                v = Py_TYPE(descr).tp_descr_get(descr, rec, cls)
            else:
                v = getattr(rec, names[i])
            if v is defaults[i]:
                continue
            mask |= cython.cast(cython.ulonglong, 1) << i
            if kind == INT:
                _pack_int(out, v, names[i])
            elif kind == BOOL:
                if v is not True and v is not False:
                    raise TypeError(f"pack: {names[i]} is not a bool")
                _put_u8(out, 1 if v else 0)
            elif kind == STR:
                if v is not None and type(v) is not str:
                    raise TypeError(f"pack: {names[i]} is not a str")
                _pack_str(out, v, refs, written)
            elif kind == VALUE:
                _pack_value(out, v, refs, written, 0)
            elif kind == COMPLETIONS:
                if v is None:
                    _put_u32(out, NONE)
                    continue
                if type(v) is not list:
                    raise TypeError(f"pack: {names[i]} is not a list")
                _put_u32(out, len(v))
                for c in v:
                    self._pack_record(out, c, self._completion_fields, refs, written)
            else:
                raise TypeError(f"pack: {names[i]} has an unknown kind {kind!r}")
        _set_u64(out, at, mask)

    # ---------------------------------------------------------- unpack

    def unpack(self, data) -> list:
        r = _Reader(data if type(data) is bytes else bytes(data))
        version = r.u8()
        if version != FORMAT_VERSION:
            raise ValueError(f"unpack: format version {version}, not {FORMAT_VERSION}")
        n = r.u32()
        if n > r.left():
            raise ValueError("unpack: truncated record data")
        fields = self._statement_fields
        records = [self._unpack_record(r, fields) for _ in range(n)]
        if r.left():
            raise ValueError("unpack: data after the last record")
        return records

    def _unpack_record(self, r: _Reader, fields: _Fields):
        kinds = fields.kinds
        cls = fields.cls
        descrs = fields.descrs
        defaults = fields.defaults
        preset = fields.preset
        mask = r.u64()
        if mask >> len(kinds):
            raise ValueError("unpack: a field its layout does not have")
        # Compiled, a record of a class whose fields all have descriptors is made empty and
        # each field stored by its descriptor's set slot as it is read: no list of the values,
        # no call of __init__ that parses them again.
        direct = cython.compiled and descrs is not None
        if direct:
            rec = cls.__new__(cls)
        else:
            values = []
        for i in range(len(kinds)):
            if not (mask >> i) & 1:  # left out: the default
                if defaults[i] is _ALWAYS:
                    raise ValueError("unpack: a field left out that has no default")
                if direct:
                    if preset[i]:  # (a new record holds it already)
                        continue
                    descr = descrs[i]
                    if Py_TYPE(descr).tp_descr_set(descr, rec, defaults[i]) < 0:
                        raise RuntimeError("unpack: a field could not be set")
                else:
                    values.append(defaults[i])
                continue
            kind = kinds[i]
            if kind == INT:
                v = r.i64()
            elif kind == BOOL:
                b = r.u8()
                if b > 1:
                    raise ValueError("unpack: bad bool")
                v = b == 1
            elif kind == STR:
                v = r.string()
            elif kind == VALUE:
                v = r.value(0)
            else:
                n = r.u32()
                if n == NONE:
                    v = None
                else:
                    if n > r.left():
                        raise ValueError("unpack: truncated record data")
                    cfields = self._completion_fields
                    v = [self._unpack_record(r, cfields) for _ in range(n)]
            if direct:
                descr = descrs[i]
                if Py_TYPE(descr).tp_descr_set(descr, rec, v) < 0:
                    raise RuntimeError("unpack: a field could not be set")  # (its error is set: Cython raises it)
            else:
                values.append(v)
        if direct:
            return rec
        return cls(*values)


class _Fields:
    """One record class's fields as pack and unpack walk them, by position in its layout.

    ``names`` and ``kinds`` (one byte a field) are the layout's; ``descrs`` the class's data
    descriptor of each field (what ``getattr`` would find on it), or None when
    a field has none or the class looks attributes up its own way. Compiled,
    pack calls a descriptor's get slot directly for a record of exactly
    ``cls``: the field's value as ``getattr`` gives it, without the lookup by
    name per field.
    """

    def __init__(self, cls, layout) -> None:
        if len(layout) > MAX_FIELDS:
            raise ValueError(f"a record layout of more than {MAX_FIELDS} fields")
        self.cls = cls
        self.names = tuple(name for name, _, _ in layout)
        self.kinds = bytes(kind for _, kind, _ in layout)  # (compiled, read as C chars)
        # (A field whose kind cannot carry its default, None for a required INT, is always written.)
        self.defaults = tuple(_ALWAYS if default is None and kind in (INT, BOOL) else default
                              for _, kind, default in layout)
        self.descrs = _data_descriptors(cls, self.names)
        self.preset = _preset(cls, self.descrs, self.defaults)


def _preset(cls, descrs, defaults: tuple) -> bytes:
    """Per field, 1 when a record made by ``cls.__new__`` holds its default already (a Cython
    class's object fields start as None), else 0 (a slot starts unset)."""
    if descrs is None:
        return bytes(len(defaults))
    try:
        fresh = cls.__new__(cls)
    except Exception:
        return bytes(len(defaults))
    out = []
    for descr, default in zip(descrs, defaults):
        try:
            out.append(1 if descr.__get__(fresh, cls) is default else 0)
        except AttributeError:
            out.append(0)
    return bytes(out)


def _data_descriptors(cls, names: tuple):
    """The data descriptor of each of ``names`` on ``cls``, or None when one is missing."""
    if not isinstance(cls, type) or cls.__getattribute__ is not object.__getattribute__:
        return None
    out = []
    for name in names:
        for klass in cls.__mro__:
            if name in klass.__dict__:
                descr = klass.__dict__[name]
                break
        else:
            return None
        kind = type(descr)
        if not hasattr(kind, "__get__") or not hasattr(kind, "__set__"):
            return None
        out.append(descr)
    return tuple(out)


class _Out:
    """The batch being packed.

    Interpreted, ``buf`` is the batch. Compiled, the batch is the first
    ``size`` bytes of ``buf`` and the rest is room: ``buf`` grows by doubling
    (:func:`_room`), not by a resize for every field, and the ``_put_*``
    functions store their bytes in place.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.size = 0

    def value(self) -> bytes:
        """The batch packed so far."""
        if cython.compiled:
            return PyBytes_FromStringAndSize(PyByteArray_AS_STRING(self.buf), self.size)
        return bytes(self.buf)


def _room(out: _Out, n: int):
    """Compiled only: where the next ``n`` bytes of ``out`` go (a C pointer); ``out`` then holds them."""
    at = out.size
    if at + n > len(out.buf):
        PyByteArray_Resize(out.buf, 2 * (at + n) + 256)
    out.size = at + n
    return cython.cast(cython.p_uchar, PyByteArray_AS_STRING(out.buf)) + at


def _put_u8(out: _Out, v: int) -> None:
    """``v`` (0 to 255) as one byte at the end of ``out``."""
    if cython.compiled:
        _room(out, 1)[0] = v
        return
    out.buf.append(v)


def _put_bytes(out: _Out, b: bytes) -> None:
    """``b`` at the end of ``out``."""
    if cython.compiled:
        _put_raw(out, PyBytes_AS_STRING(b), len(b))
        return
    out.buf += b


def _put_u32(out: _Out, v: int) -> None:
    """``v`` as u32, little-endian, at the end of ``out``."""
    if cython.compiled:  # the bytes stored directly (no struct call, no temporary bytes)
        p = _room(out, 4)
        u = cython.cast(cython.uint, v)
        p[0] = u & 0xFF
        p[1] = (u >> 8) & 0xFF
        p[2] = (u >> 16) & 0xFF
        p[3] = u >> 24
        return
    _put_bytes(out, _U32.pack(v))


def _put_i64(out: _Out, v: int) -> None:
    """``v`` as i64, little-endian, at the end of ``out`` (OverflowError out of the 64-bit range)."""
    if cython.compiled:
        x = cython.cast(cython.longlong, v)  # (the conversion raises OverflowError)
        _put_u64(out, cython.cast(cython.ulonglong, x))  # (its two's complement: the same eight bytes)
        return
    if not _I64_MIN <= v <= _I64_MAX:
        raise OverflowError("pack: an int out of the 64-bit range")
    _put_bytes(out, _I64.pack(v))


def _put_u64(out: _Out, v: int) -> None:
    """``v`` (at least 0, below 2**64) as u64, little-endian, at the end of ``out``."""
    if cython.compiled:
        p = _room(out, 8)
        for i in range(8):
            p[i] = (v >> (8 * i)) & 0xFF
        return
    _put_bytes(out, _U64.pack(v))


def _set_u64(out: _Out, at: int, v: int) -> None:
    """Overwrite the 8 bytes of ``out`` at ``at`` with ``v`` as u64, little-endian."""
    if cython.compiled:
        p = cython.cast(cython.p_uchar, PyByteArray_AS_STRING(out.buf)) + at
        for i in range(8):
            p[i] = (v >> (8 * i)) & 0xFF
        return
    out.buf[at:at + 8] = _U64.pack(v)


def _pack_int(out: _Out, v, name) -> None:
    if type(v) is not int:
        raise TypeError(f"pack: {name} is not an int")
    _put_i64(out, v)


def _utf8(v: str) -> bytes:
    try:
        return v.encode("utf-8")
    except UnicodeEncodeError:
        return v.encode("utf-8", "surrogatepass")


def _pack_str(out: _Out, v, refs: list, written: list) -> None:
    if v is None:
        _put_u32(out, NONE)
        return
    if cython.compiled:
        data = cython.NULL  # (set below when v is ASCII)
    if cython.compiled and PyUnicode_IS_ASCII(v):  # its characters are its UTF-8 bytes: no bytes object
        n = PyUnicode_GET_LENGTH(v)
        data = cython.cast(cython.p_char, PyUnicode_1BYTE_DATA(v))
    else:
        b = _utf8(v)
        n = len(b)
    if n >= REF:
        raise OverflowError("pack: a string of 4 GiB or more")
    if n >= REF_MIN:
        if cython.compiled:  # id(v), as an unsigned address
            home = (cython.cast(cython.size_t, cython.cast(cython.p_void, v)) >> 4) % REF_SLOTS
        else:
            home = (id(v) >> 4) % REF_SLOTS
        # Linear probing over REF_PROBES slots: slots are filled in probe order and
        # never emptied, so the first empty one ends the search. When all are taken
        # the home slot is overwritten (that text is then written in full again).
        slot = home
        for probe in range(REF_PROBES):
            slot = (home + probe) % REF_SLOTS
            seen = refs[slot]
            if seen is None:
                break
            if seen[0] is v:
                _put_u32(out, REF)
                _put_u32(out, seen[1])
                return
        else:
            slot = home
        refs[slot] = (v, written[0])
        written[0] += 1
    _put_u32(out, n)
    if cython.compiled:
        if data == cython.NULL:
            data = PyBytes_AS_STRING(b)
        _put_raw(out, data, n)
        return
    _put_bytes(out, b)


def _put_raw(out: _Out, data, n: int) -> None:
    """``n`` bytes at ``data`` at the end of ``out`` (compiled only: ``data`` is a C pointer)."""
    memcpy(_room(out, n), data, n)


def _pack_value(out: _Out, v, refs: list, written: list, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("pack: values nested too deep")
    t = type(v)
    if v is None:
        _put_u8(out, V_NONE)
    elif v is False:
        _put_u8(out, V_FALSE)
    elif v is True:
        _put_u8(out, V_TRUE)
    elif t is int:
        if _I64_MIN <= v <= _I64_MAX:
            _put_u8(out, V_INT)
            _put_i64(out, v)
        else:  # its digits, a temporary object: never remembered for a reference
            _put_u8(out, V_BIGINT)
            b = str(v).encode()
            _put_u32(out, len(b))
            _put_bytes(out, b)
    elif t is str:
        _put_u8(out, V_STR)
        _pack_str(out, v, refs, written)
    elif t is float:
        _put_u8(out, V_FLOAT)
        _put_bytes(out, _F64.pack(v))
    elif t is bytes:
        _put_u8(out, V_BYTES)
        _put_u32(out, len(v))
        _put_bytes(out, v)
    elif t is list or t is tuple:
        _put_u8(out, V_LIST if t is list else V_TUPLE)
        _put_u32(out, len(v))
        for item in v:
            _pack_value(out, item, refs, written, depth + 1)
    elif t is dict:
        _put_u8(out, V_DICT)
        _put_u32(out, len(v))
        for key, item in v.items():
            _pack_value(out, key, refs, written, depth + 1)
            _pack_value(out, item, refs, written, depth + 1)
    else:
        raise TypeError(f"pack: a value of type {t.__name__}")


class _Reader:
    __slots__ = ("data", "pos", "written")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.written: list[str] = []

    def left(self) -> int:
        return len(self.data) - self.pos

    def need(self, k: int) -> int:
        """The position of the next ``k`` bytes, which are then taken."""
        at = self.pos
        if k < 0 or len(self.data) - at < k:
            raise ValueError("unpack: truncated record data")
        self.pos = at + k
        return at

    def take(self, k: int) -> bytes:
        at = self.need(k)
        return self.data[at:at + k]

    def u8(self) -> int:
        at = self.need(1)
        if cython.compiled:
            return cython.cast(cython.p_uchar, PyBytes_AS_STRING(self.data))[at]
        return self.data[at]

    def u32(self) -> int:
        at = self.need(4)
        if cython.compiled:
            p = cython.cast(cython.p_uchar, PyBytes_AS_STRING(self.data)) + at
            return (cython.cast(cython.uint, p[0]) | (cython.cast(cython.uint, p[1]) << 8)
                    | (cython.cast(cython.uint, p[2]) << 16) | (cython.cast(cython.uint, p[3]) << 24))
        return _U32.unpack_from(self.data, at)[0]

    def u64(self) -> int:
        at = self.need(8)
        if cython.compiled:
            p = cython.cast(cython.p_uchar, PyBytes_AS_STRING(self.data)) + at
            u = cython.cast(cython.ulonglong, 0)
            for i in range(8):
                u |= cython.cast(cython.ulonglong, p[i]) << (8 * i)
            return u
        return _U64.unpack_from(self.data, at)[0]

    def i64(self) -> int:
        if cython.compiled:  # the eight bytes u64 reads, as a signed number
            return cython.cast(cython.longlong, self.u64())
        return _I64.unpack_from(self.data, self.need(8))[0]

    def string(self) -> str | None:
        n = self.u32()
        if n == NONE:
            return None
        if n == REF:
            k = self.u32()
            if k >= len(self.written):
                raise ValueError("unpack: reference to a string not read yet")
            return self.written[k]
        at = self.need(n)
        try:
            if cython.compiled:  # decoded in place, no bytes slice first
                v = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(self.data) + at, n, "surrogatepass")
            else:
                v = self.data[at:at + n].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise ValueError("unpack: a string that is not UTF-8") from None
        if n >= REF_MIN:
            self.written.append(v)
        return v

    def value(self, depth: int):
        if depth > MAX_DEPTH:
            raise ValueError("unpack: values nested too deep")
        tag = self.u8()
        if tag == V_NONE:
            return None
        if tag == V_FALSE:
            return False
        if tag == V_TRUE:
            return True
        if tag == V_INT:
            return self.i64()
        if tag == V_STR:
            v = self.string()
            if v is None:
                raise ValueError("unpack: a str value that is None")
            return v
        if tag == V_FLOAT:
            return _F64.unpack_from(self.data, self.need(8))[0]
        if tag == V_BYTES:
            return self.take(self.u32())
        if tag == V_LIST or tag == V_TUPLE:
            n = self.u32()
            if n > self.left():
                raise ValueError("unpack: truncated record data")
            items = [self.value(depth + 1) for _ in range(n)]
            return items if tag == V_LIST else tuple(items)
        if tag == V_DICT:
            n = self.u32()
            if n > self.left():
                raise ValueError("unpack: truncated record data")
            d = {}
            for _ in range(n):
                key = self.value(depth + 1)
                try:
                    d[key] = self.value(depth + 1)
                except TypeError:  # an unhashable key
                    raise ValueError("unpack: a dict key that is not hashable") from None
            return d
        if tag == V_BIGINT:
            digits = self.take(self.u32())
            try:
                return int(digits)
            except ValueError:
                raise ValueError("unpack: a big int that is not digits") from None
        raise ValueError(f"unpack: unknown value tag {tag}")


_FORM = RecordForm()
#: The finished records of one connection as one batch of the compact form.
pack = _FORM.pack
#: The records of one batch again, every field equal to the packed one.
unpack = _FORM.unpack
