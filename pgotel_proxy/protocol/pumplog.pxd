# Types for the Cython build of pumplog.py (pure-Python mode).
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING
from libc.string cimport memcpy
from .session cimport Session

@cython.locals(pos=Py_ssize_t, end=Py_ssize_t, stop=Py_ssize_t, length=Py_ssize_t, kind=int, touched=dict, seen=dict, known=tuple,
               p=cython.p_char, pair64=cython.longlong, kind32=cython.int, length32=cython.int, ts64=cython.longlong,
               waited64=cython.longlong, pair=object, ts=object,
               client_kind=int, handback_kind=int, wait_kind=int)
cpdef dict observe_log(bytes log, dict pumped, object resume)
