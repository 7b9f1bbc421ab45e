# Types for the Cython build of messages.py (pure-Python mode).
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING
from cpython.unicode cimport PyUnicode_1BYTE_DATA, PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcmp, memcpy

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object)  # (a str whose characters are all ASCII, stored one a byte)

cdef list _text_str
cdef dict _texts
cdef unsigned long long _HASH_SEED, _HASH_PRIME, _HASH_MIX
cdef Py_ssize_t _TEXT_SLOTS, _TEXT_MAX

cdef unsigned char _frontend[256]

cpdef int header_refused(int typ, long long length, long long limit) noexcept nogil

@cython.locals(p=cython.p_uchar)
cpdef unsigned int be32(bytes buf, Py_ssize_t pos) noexcept

@cython.locals(size=Py_ssize_t, p=cython.p_uchar, h=cython.ulonglong, head=Py_ssize_t, i=Py_ssize_t,
               slot=Py_ssize_t, value=str, word=cython.ulonglong, tail=Py_ssize_t, window_end=Py_ssize_t)
cpdef str text(bytes buf, Py_ssize_t start, Py_ssize_t end)

@cython.locals(data=bytes, end=Py_ssize_t, base=cython.p_char, nul=cython.p_char)
cpdef Py_ssize_t nul_at(object buf, Py_ssize_t start) except -1

cpdef str cstring_text(object buf, Py_ssize_t start, Py_ssize_t end)

@cython.locals(end=Py_ssize_t)
cpdef tuple cstring(object buf, Py_ssize_t start)

cpdef tuple decode_parse(object buf, Py_ssize_t start, Py_ssize_t end)

@cython.locals(pos=Py_ssize_t, stmt_end=Py_ssize_t)
cpdef tuple decode_bind(object buf, Py_ssize_t start, Py_ssize_t end, bint want_params=*)

@cython.locals(pos=Py_ssize_t, fields=dict)
cpdef dict decode_error_fields(object buf, Py_ssize_t start, Py_ssize_t end)
