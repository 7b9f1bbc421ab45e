# Types for the Cython build of histograms.py (pure-Python mode): the per-record loop.
cimport cython
from pgotel_proxy.protocol.events cimport Completion, Statement
from pgotel_proxy.shape cimport blank_code, statement_key

cdef class _Series:
    cdef public list counts
    cdef public double total, low, high
    cdef public list exemplars

@cython.locals(q=tuple)
cdef tuple _shape(dict shapes, object sql, object keys)

@cython.locals(wanted=list, room=int, series_of=dict, shapes=dict, index=Py_ssize_t, rec=Statement, res=Completion,
               series=_Series, last_ok_series=_Series, last_ok_overflow=bint, overflow=bint,
               start=cython.longlong, end=cython.longlong, seconds=double, bucket=Py_ssize_t)
cdef list _observe(object hist, list records, object namespace, object keys, long long stale)
