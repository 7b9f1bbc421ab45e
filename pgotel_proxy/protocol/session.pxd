# Types for the Cython build of session.py (pure-Python mode): read only when
# session.py is compiled; the interpreted module ignores this file.
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING
from .events cimport Completion, Statement, new_completion, new_statement
from .messages cimport be32, cstring, cstring_text, nul_at, header_refused, decode_bind, decode_error_fields, decode_parse, text
from .scan cimport run_end

@cython.final
cdef class _Due:
    cdef list items
    cdef Py_ssize_t head

    cpdef Py_ssize_t size(self)
    cpdef push(self, tuple entry)
    cpdef front(self)
    cpdef second(self)
    @cython.locals(items=list, entry=tuple)
    cpdef tuple pop(self)
    cpdef clear(self)

cdef class Session:
    cdef public object max_message_size
    cdef public object observe_limit
    cdef public object max_pending
    cdef public object capture_params
    cdef public object flush_phases
    cdef public object slow_texts
    cdef public bint _split_batch
    cdef public object strip_scram_plus
    cdef public object protocol_version
    cdef public object startup_params
    cdef public dict server_params
    cdef public object application_name
    cdef public object backend_pid
    cdef public object cancel_key
    cdef public object tx_status
    cdef public bint ready
    cdef public bint authenticated
    cdef public object fatal
    cdef public object out_of_sync
    cdef public list completed
    cdef public long long longest_done_ns
    cdef public long long slow_after_ns
    cdef public list slow_done
    cdef public bint slow_done_full
    cdef public _Due _pending
    cdef public list _batch
    cdef public dict _batch_parsed
    cdef public dict _prev_parsed
    cdef public dict _prepared
    cdef public dict _portals
    cdef public bint _skipping
    cdef public object _rows
    cdef public object _first_row_ns
    cdef public bytes _cbuf
    cdef public Py_ssize_t _cskip
    cdef public bytes _sbuf
    cdef public Py_ssize_t _sfwd
    cdef public Py_ssize_t _sskip
    cdef public Py_ssize_t _injected_pending
    cdef public object injector
    cdef public bint hold_first_ready
    cdef public object _held_ready
    cdef public Py_ssize_t _shifted
    cdef public int _last_kind
    cdef public object _last_rec
    cdef public object _query_rec
    cdef public bint _copy_in_ext
    cdef public bint client_terminated
    cdef public Py_ssize_t messages_in
    cdef public Py_ssize_t messages_out

    cpdef client_data(self, bytes data, object now)
    cpdef client_observe(self, bytes data, Py_ssize_t start, Py_ssize_t stop, object now)

    @cython.locals(held=bytes, n=Py_ssize_t, pos=Py_ssize_t, seg=Py_ssize_t, typ=int, length=cython.longlong,
                   mend=Py_ssize_t, end=Py_ssize_t, observing=bint, limit=Py_ssize_t, nxt=int,
                   refused=int)
    cdef _client_data(self, bytes data, object now, Py_ssize_t start, Py_ssize_t stop, bint splice)
    @cython.locals(rec=Statement)
    cdef bint _splits(self, int typ, object now) except -1

    @cython.locals(rec=Statement, k=int)
    cdef _mark_flushed(self)
    @cython.locals(pending=_Due)
    cdef _queue(self, int kind, object rec)
    @cython.locals(rec=Statement, which=int)
    cpdef _client_message(self, int typ, bytes buf, Py_ssize_t start, Py_ssize_t end, object now)
    cdef _next_batch(self)
    @cython.locals(rec=Statement, parsed=Statement, old=Statement, before=Statement, batch=list, portals=dict,
                   prepared=dict)
    cdef _extended_rec(self, int typ, bytes buf, Py_ssize_t start, Py_ssize_t end, object now)

    cpdef server_observe(self, bytes data, object now, Py_ssize_t start=*, Py_ssize_t stop=*)
    cpdef bytes server_filter(self, bytes data, object now)

    @cython.locals(sbuf=bytes, fwd=Py_ssize_t, n=Py_ssize_t, pos=Py_ssize_t, skip=Py_ssize_t, typ=int,
                   mend=Py_ssize_t, count=Py_ssize_t, first=bint, suppress=bint)
    cdef _server(self, bytes data, object now, list out, Py_ssize_t start, Py_ssize_t stop)

    @cython.locals(front=tuple)
    cdef bint _suppressing(self)
    @cython.locals(pending=_Due, front=tuple)
    cdef _pop(self, int expect)
    @cython.locals(rec=Statement, front=tuple)
    cpdef _server_message(self, int typ, bytes buf, Py_ssize_t start, Py_ssize_t end, object now)
    @cython.locals(kind=int, first=bint, pending=_Due, query=Statement, item=Statement, c=Completion, failed=bint)
    cdef _ready_for_query(self, int status, object now)
    @cython.locals(rec=Statement, longest=cython.longlong, took=cython.longlong, end=cython.longlong, start=cython.longlong,
                   slow_after=cython.longlong)
    cdef _note_longest(self, object done)

cdef int _PARSE, _BIND, _DESCRIBE, _EXECUTE, _CLOSE, _SYNC, _QUERY, _FUNC, _PREFIX
cdef int BACKEND_AUTHENTICATION, BACKEND_BACKEND_KEY_DATA, BACKEND_BIND_COMPLETE, BACKEND_CLOSE_COMPLETE
cdef int BACKEND_COMMAND_COMPLETE, BACKEND_COPY_BOTH_RESPONSE, BACKEND_COPY_DATA, BACKEND_COPY_IN_RESPONSE
cdef int BACKEND_COPY_OUT_RESPONSE, BACKEND_DATA_ROW, BACKEND_EMPTY_QUERY_RESPONSE, BACKEND_ERROR_RESPONSE
cdef int BACKEND_NO_DATA, BACKEND_NOTICE_RESPONSE, BACKEND_NOTIFICATION_RESPONSE, BACKEND_PARAMETER_STATUS
cdef int BACKEND_PARSE_COMPLETE, BACKEND_PORTAL_SUSPENDED, BACKEND_READY_FOR_QUERY, BACKEND_ROW_DESCRIPTION
cdef int FRONTEND_BIND, FRONTEND_CLOSE, FRONTEND_COPY_DATA, FRONTEND_COPY_DONE, FRONTEND_COPY_FAIL
cdef int FRONTEND_DESCRIBE, FRONTEND_EXECUTE, FRONTEND_FLUSH, FRONTEND_FUNCTION_CALL, FRONTEND_PARSE
cdef int FRONTEND_PASSWORD, FRONTEND_QUERY, FRONTEND_SYNC, FRONTEND_TERMINATE, TARGET_STATEMENT
