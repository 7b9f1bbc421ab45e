# Types for the Cython build of events.py (pure-Python mode): the records as cdef classes.
cimport cython
# The fields are STATEMENT_LAYOUT / COMPLETION_LAYOUT of events.py, in order (a test holds them equal).

cdef class Completion:
    cdef public object end_ns
    cdef public object tag
    cdef public object rows
    cdef public object error

cdef class Statement:
    cdef public object protocol
    cdef public object sql
    cdef public object statement_name
    cdef public object portal
    cdef public object start_ns
    cdef public object parse_start_ns
    cdef public object parse_end_ns
    cdef public object parse_exact
    cdef public object bind_start_ns
    cdef public object bind_end_ns
    cdef public object bind_exact
    cdef public object exec_start_ns
    cdef public object end_ns
    cdef public object exec_exact
    cdef public object first_row_ns
    cdef public object client_wait_ns
    cdef public object status
    cdef public object tag
    cdef public object rows
    cdef public object error
    cdef public object params
    cdef public object results
    cdef public object reused
    cdef public object copy
    cdef public object tx_status
    cdef public object application_name
    cdef public object extra

@cython.locals(rec=Statement)
cpdef Statement new_statement(object protocol, object sql, object start_ns)

@cython.locals(done=Completion)
cpdef Completion new_completion(object end_ns, object tag, object rows, object error=*)
