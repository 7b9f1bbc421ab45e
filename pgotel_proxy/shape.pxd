# Types for the Cython build of shape.py (pure-Python mode).
cimport cython
from cpython.unicode cimport PyUnicode_1BYTE_DATA
from libc.string cimport memcpy

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object)  # (a str whose characters are all ASCII, stored one a byte)
    str PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)

cdef str _TP_TAG
cdef Py_ssize_t _TP_LEN

cdef bint _in_word(Py_UCS4 c) noexcept
cdef bint _is_space(Py_UCS4 c) noexcept

@cython.locals(k=Py_ssize_t)
cdef Py_ssize_t _string_end(str s, Py_ssize_t i, Py_ssize_t end) except -2

@cython.locals(k=Py_ssize_t, e=Py_ssize_t)
cdef Py_ssize_t _number_end(str s, Py_ssize_t i, Py_ssize_t end) noexcept

@cython.locals(safe=bint, i=Py_ssize_t, last=Py_ssize_t, e=Py_ssize_t, c=Py_UCS4)
cdef bint _blank(str s, Py_ssize_t end, list cuts) except -1

@cython.locals(n=Py_ssize_t, size=Py_ssize_t, k=Py_ssize_t, a=Py_ssize_t, w=Py_ssize_t, last=Py_ssize_t,
               dst=cython.p_uchar, src=cython.p_uchar, out=str, parts=list)
cdef str _assemble(str s, list cuts, Py_ssize_t tail, Py_ssize_t rest)

@cython.locals(cuts=list)
cpdef str blind(str s)

@cython.locals(cuts=list)
cpdef str blank_code(str code)

@cython.locals(v=cython.ulonglong, i=Py_ssize_t, c=cython.uint, data=cython.p_uchar)
cdef object _hex(str s, Py_ssize_t start, Py_ssize_t end)

@cython.locals(i=Py_ssize_t, c=cython.uint, data=cython.p_uchar, end=Py_ssize_t)
cdef bint _names_a_carrier(str sql, Py_ssize_t start, Py_ssize_t n) except -1

@cython.locals(m=Py_ssize_t, c=int)
cdef bint _word_at(const unsigned char *data, Py_ssize_t i, Py_ssize_t n, const char *word, Py_ssize_t k) noexcept

@cython.locals(n=Py_ssize_t, j=Py_ssize_t, i=Py_ssize_t, k=Py_ssize_t, vs=Py_ssize_t, ve=Py_ssize_t, before=Py_UCS4,
               cuts=list)
cdef tuple _key(str sql)

@cython.locals(cuts=list)
cdef tuple _contextless_key(str sql, Py_ssize_t end, Py_ssize_t mark)

cpdef tuple statement_key(object sql)
