# Types for the Cython build of records.py (pure-Python mode).
cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport Py_TYPE
from cpython.unicode cimport PyUnicode_1BYTE_DATA, PyUnicode_DecodeUTF8, PyUnicode_GET_LENGTH
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)

@cython.final
cdef class _Fields:
    cdef public object cls
    cdef public tuple names
    cdef public bytes kinds
    cdef public object descrs
    cdef public tuple defaults
    cdef public bytes preset

@cython.final
cdef class _Out:
    cdef bytearray buf
    cdef Py_ssize_t size

    cdef bytes value(self)

@cython.final
cdef class RecordForm:
    cdef public object statement, completion, statement_layout, completion_layout
    cdef _Fields _statement_fields, _completion_fields

    @cython.locals(out=_Out, refs=list, written=list)
    cpdef bytes pack(self, object records)
    @cython.locals(r=_Reader, n=cython.longlong, fields=_Fields)
    cpdef list unpack(self, object data)
    @cython.locals(kind=int, i=Py_ssize_t, names=tuple, kinds=bytes, descrs=tuple, defaults=tuple, at=Py_ssize_t,
                   mask=uint64_t)
    cdef _pack_record(self, _Out out, object rec, _Fields fields, list refs, list written)
    @cython.locals(values=list, kind=int, i=Py_ssize_t, n=cython.longlong, b=int, kinds=bytes, fields=_Fields,
                   cfields=_Fields, descrs=tuple, direct=bint, defaults=tuple, preset=bytes, mask=uint64_t)
    cdef _unpack_record(self, _Reader r, _Fields fields)

@cython.final
cdef class _Reader:
    cdef bytes data
    cdef Py_ssize_t pos
    cdef list written

    cdef Py_ssize_t left(self)
    @cython.locals(at=Py_ssize_t)
    cdef Py_ssize_t need(self, Py_ssize_t k) except -1
    @cython.locals(at=Py_ssize_t)
    cdef bytes take(self, Py_ssize_t k)
    @cython.locals(at=Py_ssize_t)
    cdef int u8(self) except -1
    @cython.locals(at=Py_ssize_t, p=cython.p_uchar)
    cdef int64_t u32(self) except? -1
    @cython.locals(at=Py_ssize_t, p=cython.p_uchar, u=cython.ulonglong, i=int)
    cdef uint64_t u64(self) except *
    cdef int64_t i64(self) except? -1
    @cython.locals(n=cython.longlong, k=cython.longlong, at=Py_ssize_t)
    cdef object string(self)
    @cython.locals(tag=int, n=cython.longlong)
    cdef object value(self, int depth)

@cython.locals(at=Py_ssize_t)
cdef unsigned char *_room(_Out out, Py_ssize_t n) except NULL
cdef void _put_u8(_Out out, unsigned char v) except *
cdef void _put_bytes(_Out out, bytes b) except *
@cython.locals(p=cython.p_uchar, u=cython.uint)
cdef void _put_u32(_Out out, cython.uint v) except *
cdef void _put_raw(_Out out, const char *data, Py_ssize_t n) except *
@cython.locals(x=cython.longlong)
cdef void _put_i64(_Out out, object v) except *
@cython.locals(p=cython.p_uchar, i=int)
cdef void _put_u64(_Out out, uint64_t v) except *
@cython.locals(p=cython.p_uchar, i=int)
cdef void _set_u64(_Out out, Py_ssize_t at, uint64_t v) noexcept
cdef void _pack_int(_Out out, object v, object name) except *
@cython.locals(slot=Py_ssize_t, home=Py_ssize_t, probe=Py_ssize_t, n=Py_ssize_t, data="const char *", b=bytes)
cdef void _pack_str(_Out out, object v, list refs, list written) except *
cdef void _pack_value(_Out out, object v, list refs, list written, int depth) except *
cdef bytes _utf8(str v)

cdef int INT, BOOL, STR, VALUE, COMPLETIONS
cdef long long NONE, REF, REF_MIN, REF_SLOTS, REF_PROBES, MAX_DEPTH, _RECORD_ROOM, MAX_FIELDS
cdef object _ALWAYS
cdef int V_NONE, V_FALSE, V_TRUE, V_INT, V_STR, V_FLOAT, V_BYTES, V_LIST, V_TUPLE, V_DICT, V_BIGINT
