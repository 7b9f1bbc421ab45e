# Types for the Cython build of scan.py (pure-Python mode).
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING
from .messages cimport be32

@cython.locals(end=Py_ssize_t, count=Py_ssize_t, last=Py_ssize_t, length=Py_ssize_t, p=cython.p_uchar)
cpdef tuple run_end(bytes buf, Py_ssize_t pos, Py_ssize_t n, int typ)
