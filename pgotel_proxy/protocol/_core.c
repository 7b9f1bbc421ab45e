/*
 * Compiled fast path of the protocol codec (pgotel_proxy/protocol/session.py).
 *
 * Session is the whole implementation and stays in Python. These two
 * functions take over its per-message loop for the messages that make up the
 * traffic of a traced application (Parse, Bind, Describe, Execute, Sync,
 * Flush, Query; ParseComplete, BindComplete, RowDescription, NoData, DataRow,
 * CommandComplete, CloseComplete, ReadyForQuery), on the Session's own state:
 *
 *   client(session, data, pos, n, now) -> pos
 *   server(session, data, pos, n, now) -> pos
 *
 * Each handles whole messages from ``pos`` and returns where it stopped. It
 * stops *before* any message it does not handle, or whose handling could
 * take a path it does not take (an incomplete or malformed message, a request
 * the proxy injected, a queue at its bound, an answer that does not match the
 * request due, COPY, errors, start-up, ...): the Python loop then handles
 * that one message and calls in again. So a message is either handled here
 * exactly as Session handles it, or not touched at all; tests feed the same
 * streams to both and compare every record and counter.
 *
 * The Session, Statement and Completion classes are plain Python classes
 * with __slots__; configure() reads where each slot lives from the classes'
 * member descriptors, so records are made and fields set without a Python
 * call. When the layout is not what this file expects, configure() fails and
 * Session runs in Python alone.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* PyMemberDef, READONLY (Python 3.11) */
#include <string.h>
#include <time.h>
#include <stddef.h>
#include "../_cutil.h" /* take_exception */
#include <errno.h>
#include <sys/types.h>
#include <sys/socket.h>
#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* SIGPIPE is ignored in Python processes: EPIPE comes back instead */
#endif

#define T_OBJECT_EX_ 16 /* PyMemberDef type of a __slots__ entry (T_OBJECT_EX / Py_T_OBJECT_EX) */

/* Request kinds in the pending queue (session.py). */
enum { K_PARSE, K_BIND, K_DESCRIBE, K_EXECUTE, K_CLOSE, K_SYNC, K_QUERY, K_FUNC, K_PREFIX, K_COUNT };

/* Session slots. */
enum {
    S_PENDING, S_BATCH, S_BATCH_PARSED, S_PREPARED, S_PORTALS, S_SKIPPING, S_ROWS, S_LAST_KIND,
    S_LAST_REC, S_MAX_PENDING, S_MAX_MESSAGE_SIZE, S_CAPTURE_PARAMS, S_MESSAGES_IN, S_MESSAGES_OUT,
    S_COPY_IN_EXT, S_OUT_OF_SYNC, S_READY, S_TX_STATUS, S_COMPLETED, S_SHIFTED, S_INJECTOR,
    S_FLUSH_PHASES, S_CBUF, S_CSKIP, S_SBUF, S_SSKIP, S_INJECTED_PENDING, S_HELD_READY, S_COUNT
};
static const char *session_slots[S_COUNT] = {
    "_pending", "_batch", "_batch_parsed", "_prepared", "_portals", "_skipping", "_rows", "_last_kind",
    "_last_rec", "max_pending", "max_message_size", "capture_params", "messages_in", "messages_out",
    "_copy_in_ext", "out_of_sync", "ready", "tx_status", "completed", "_shifted", "injector",
    "flush_phases", "_cbuf", "_cskip", "_sbuf", "_sskip", "_injected_pending", "_held_ready",
};

/* Statement slots (all of them: a new record gets every one). */
enum {
    R_PROTOCOL, R_SQL, R_STATEMENT_NAME, R_PORTAL, R_START_NS, R_PARSE_START_NS, R_PARSE_END_NS,
    R_PARSE_EXACT, R_BIND_START_NS, R_BIND_END_NS, R_BIND_EXACT, R_EXEC_START_NS, R_END_NS,
    R_EXEC_EXACT, R_STATUS, R_TAG, R_ROWS, R_ERROR, R_PARAMS, R_RESULTS, R_REUSED, R_COPY,
    R_TX_STATUS, R_EXTRA, R_COUNT
};
static const char *record_slots[R_COUNT] = {
    "protocol", "sql", "statement_name", "portal", "start_ns", "parse_start_ns", "parse_end_ns",
    "parse_exact", "bind_start_ns", "bind_end_ns", "bind_exact", "exec_start_ns", "end_ns",
    "exec_exact", "status", "tag", "rows", "error", "params", "results", "reused", "copy",
    "tx_status", "extra",
};

enum { C_END_NS, C_TAG, C_ROWS, C_ERROR, C_COUNT };
static const char *completion_slots[C_COUNT] = {"end_ns", "tag", "rows", "error"};

static int configured = 0;
static Py_ssize_t s_off[S_COUNT], r_off[R_COUNT], c_off[C_COUNT];
static PyTypeObject *session_type, *record_type, *completion_type;
static PyObject *record_defaults[R_COUNT];
static PyObject *kind_obj[K_COUNT];
static PyObject *str_empty, *str_simple, *str_extended, *str_pending, *str_prepared, *str_skipped,
    *str_ok, *str_error, *str_append, *str_popleft, *str_function, *str_tx[3];

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* Borrowed reference to a slot's value; NULL when unset (the caller bails). */
static inline PyObject *
get(PyObject *obj, Py_ssize_t off)
{
    return SLOT(obj, off);
}

/* Set a slot, taking a new reference to value. */
static inline void
set(PyObject *obj, Py_ssize_t off, PyObject *value)
{
    PyObject *old = SLOT(obj, off);
    Py_INCREF(value);
    SLOT(obj, off) = value;
    Py_XDECREF(old);
}

/* Set a slot, stealing the reference to value. */
static inline void
set_steal(PyObject *obj, Py_ssize_t off, PyObject *value)
{
    PyObject *old = SLOT(obj, off);
    SLOT(obj, off) = value;
    Py_XDECREF(old);
}

static int
slot_offsets(PyTypeObject *type, const char **names, Py_ssize_t *offs, int count)
{
    for (int i = 0; i < count; i++) {
        PyObject *descr = PyObject_GetAttrString((PyObject *)type, names[i]);
        if (descr == NULL)
            return -1;
        if (!PyObject_TypeCheck(descr, &PyMemberDescr_Type)) {
            Py_DECREF(descr);
            PyErr_Format(PyExc_TypeError, "%s.%s is not a slot", type->tp_name, names[i]);
            return -1;
        }
        PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
        if (m->type != T_OBJECT_EX_ || (m->flags & READONLY)) {
            Py_DECREF(descr);
            PyErr_Format(PyExc_TypeError, "%s.%s is not a writable object slot", type->tp_name, names[i]);
            return -1;
        }
        offs[i] = m->offset;
        Py_DECREF(descr);
    }
    return 0;
}

/* configure(Session, Statement, Completion, record_fields, record_defaults, kinds) */
static PyObject *
configure(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *st, *rt, *ct, *names, *defaults, *kinds;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!", &PyType_Type, &st, &PyType_Type, &rt, &PyType_Type, &ct,
                          &PyTuple_Type, &names, &PyTuple_Type, &defaults, &PyTuple_Type, &kinds))
        return NULL;
    if (PyTuple_GET_SIZE(names) != R_COUNT || PyTuple_GET_SIZE(defaults) != R_COUNT ||
        PyTuple_GET_SIZE(kinds) != K_COUNT) {
        PyErr_SetString(PyExc_ValueError, "configure: the record's fields are not the ones this path knows");
        return NULL;
    }
    for (int i = 0; i < R_COUNT; i++) {
        PyObject *nm = PyTuple_GET_ITEM(names, i);
        if (!PyUnicode_Check(nm) || PyUnicode_CompareWithASCIIString(nm, record_slots[i]) != 0) {
            PyErr_SetString(PyExc_ValueError, "configure: the record's fields are not the ones this path knows");
            return NULL;
        }
    }
    /* Read into locals: a configure that fails leaves the working layout as it was. */
    Py_ssize_t so[S_COUNT], ro[R_COUNT], co[C_COUNT];
    if (slot_offsets((PyTypeObject *)st, session_slots, so, S_COUNT) < 0 ||
        slot_offsets((PyTypeObject *)rt, record_slots, ro, R_COUNT) < 0 ||
        slot_offsets((PyTypeObject *)ct, completion_slots, co, C_COUNT) < 0)
        return NULL;
    for (int i = 0; i < K_COUNT; i++) {
        PyObject *k = PyTuple_GET_ITEM(kinds, i);
        if (!PyLong_Check(k) || PyLong_AsLong(k) != i) {
            PyErr_SetString(PyExc_ValueError, "configure: request kinds are not 0..8 in order");
            return NULL;
        }
    }
    memcpy(s_off, so, sizeof so);
    memcpy(r_off, ro, sizeof ro);
    memcpy(c_off, co, sizeof co);
    for (int i = 0; i < K_COUNT; i++) {
        PyObject *k = PyTuple_GET_ITEM(kinds, i);
        Py_INCREF(k);
        Py_XSETREF(kind_obj[i], k);
    }
    for (int i = 0; i < R_COUNT; i++) {
        PyObject *d = PyTuple_GET_ITEM(defaults, i);
        Py_INCREF(d);
        Py_XSETREF(record_defaults[i], d);
    }
    Py_INCREF(st);
    Py_XSETREF(session_type, (PyTypeObject *)st);
    Py_INCREF(rt);
    Py_XSETREF(record_type, (PyTypeObject *)rt);
    Py_INCREF(ct);
    Py_XSETREF(completion_type, (PyTypeObject *)ct);
    configured = 1;
    Py_RETURN_NONE;
}

/* A Statement with every field at its default, protocol and sql set (new reference). */
static PyObject *
new_record(PyObject *protocol, PyObject *sql)
{
    PyObject *rec = record_type->tp_alloc(record_type, 0);
    if (rec == NULL)
        return NULL;
    for (int i = 0; i < R_COUNT; i++) {
        PyObject *v = record_defaults[i];
        Py_INCREF(v);
        SLOT(rec, r_off[i]) = v;
    }
    set(rec, r_off[R_PROTOCOL], protocol);
    set(rec, r_off[R_SQL], sql);
    return rec;
}

static PyObject *
new_completion(PyObject *end_ns, PyObject *tag, PyObject *rows)
{
    PyObject *c = completion_type->tp_alloc(completion_type, 0);
    if (c == NULL)
        return NULL;
    Py_INCREF(end_ns);
    SLOT(c, c_off[C_END_NS]) = end_ns;
    Py_INCREF(tag);
    SLOT(c, c_off[C_TAG]) = tag;
    Py_INCREF(rows);
    SLOT(c, c_off[C_ROWS]) = rows;
    Py_INCREF(Py_None);
    SLOT(c, c_off[C_ERROR]) = Py_None;
    return c;
}

/* Only records get their slots written by offset. */
static inline int
is_rec(PyObject *o)
{
    return o != NULL && PyObject_TypeCheck(o, record_type);
}

static inline int
is_str(PyObject *v, PyObject *s)
{
    return v == s || (v != NULL && PyUnicode_Check(v) && PyUnicode_Compare(v, s) == 0);
}

/* Truth of an int / bool slot; -1 when it is not one (the caller bails). */
static inline int
int_true(PyObject *v)
{
    if (v == Py_True)
        return 1;
    if (v == Py_False)
        return 0;
    if (v != NULL && PyLong_CheckExact(v))
        return Py_SIZE(v) != 0;
    return -1;
}

/* A NUL-terminated name inside [pos, end): decoded as Session does, *next set after the NUL. */
/* Texts that repeat on the wire (statement texts of Parse, statement and portal names, command
 * tags) decoded once: a direct-mapped table of recent ASCII texts, matched on their bytes. A
 * repeated text comes back as the same object, so its hash is computed once wherever it is a
 * key, and pack() sends it once per batch. Texts with other bytes are decoded every time. */
#define TEXT_SLOTS 512
#define TEXT_MAX 4096
static PyObject *text_cache[TEXT_SLOTS];

static PyObject *
decode_text(const unsigned char *s, Py_ssize_t len, int ascii)
{
    return ascii ? PyUnicode_DecodeASCII((const char *)s, len, "replace")
                 : PyUnicode_DecodeUTF8((const char *)s, len, "replace");
}

/* ascii: decoded as Python decodes command tags (each other byte replaced); else as UTF-8. */
static PyObject *
cached_text(const unsigned char *s, Py_ssize_t len, int ascii)
{
    if (len == 0) {
        Py_INCREF(str_empty);
        return str_empty;
    }
    if (len > TEXT_MAX)
        return decode_text(s, len, ascii);
    unsigned long long h = (unsigned long long)len * 0x9E3779B97F4A7C15ull;
    Py_ssize_t head = len < 24 ? len : 24;
    for (Py_ssize_t i = 0; i < head; i++)
        h = (h ^ s[i]) * 0x100000001B3ull;
    for (Py_ssize_t i = len - 40 > head ? len - 40 : head; i < len; i++)
        h = (h ^ s[i]) * 0x100000001B3ull;
    PyObject **slot = &text_cache[(h >> 32) % TEXT_SLOTS];
    PyObject *e = *slot;
    if (e != NULL && PyUnicode_GET_LENGTH(e) == len && memcmp(PyUnicode_1BYTE_DATA(e), s, (size_t)len) == 0) {
        Py_INCREF(e);
        return e;
    }
    PyObject *v = decode_text(s, len, ascii);
    if (v != NULL && PyUnicode_IS_COMPACT_ASCII(v) && PyUnicode_GET_LENGTH(v) == len) {
        Py_INCREF(v);
        Py_XSETREF(*slot, v);
    }
    return v;
}

static PyObject *
cstr(const unsigned char *p, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t *next)
{
    const unsigned char *nul = memchr(p + pos, 0, (size_t)(end - pos));
    if (nul == NULL)
        return NULL; /* no exception set: the caller bails */
    Py_ssize_t len = nul - (p + pos);
    *next = pos + len + 1;
    return cached_text(p + pos, len, 0);
}

/* collections.deque and its append / popleft method descriptors: called without looking the
 * method up on every call (the session's queue of pending requests is a deque). */
static PyTypeObject *deque_type;
static PyObject *deque_append_m, *deque_popleft_m;

static int
deque_append(PyObject *deque, PyObject *item)
{
    PyObject *a[2] = {deque, item};
    PyObject *r = Py_TYPE(deque) == deque_type ? PyObject_Vectorcall(deque_append_m, a, 2, NULL)
                                               : PyObject_CallMethodOneArg(deque, str_append, item);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* deque.popleft() (a new reference). */
static PyObject *
deque_popleft(PyObject *deque)
{
    return Py_TYPE(deque) == deque_type ? PyObject_Vectorcall(deque_popleft_m, &deque, 1, NULL)
                                        : PyObject_CallMethodNoArgs(deque, str_popleft);
}

/* Session._queue for a queue known to have room. */
static int
queue(PyObject *s, int kind, PyObject *rec)
{
    PyObject *entry = PyTuple_Pack(3, kind_obj[kind], rec, Py_False);
    if (entry == NULL)
        return -1;
    int r = deque_append(get(s, s_off[S_PENDING]), entry);
    Py_DECREF(entry);
    if (r < 0)
        return -1;
    set(s, s_off[S_LAST_KIND], kind_obj[kind]);
    set(s, s_off[S_LAST_REC], rec);
    return 0;
}

/* Session._mark_flushed. */
static void
mark_flushed(PyObject *s)
{
    PyObject *rec = get(s, s_off[S_LAST_REC]);
    if (!is_rec(rec))
        return;
    PyObject *k = get(s, s_off[S_LAST_KIND]);
    long kind = (k != NULL && PyLong_Check(k)) ? PyLong_AsLong(k) : -1;
    if (kind == K_PARSE)
        set(rec, r_off[R_PARSE_EXACT], Py_True);
    else if (kind == K_BIND)
        set(rec, r_off[R_BIND_EXACT], Py_True);
    else if (kind == K_EXECUTE)
        set(rec, r_off[R_EXEC_EXACT], Py_True);
}

static int
add_int(PyObject *obj, Py_ssize_t off, long delta)
{
    if (delta == 0)
        return 0;
    PyObject *v = get(obj, off);
    long cur = PyLong_AsLong(v);
    if (cur == -1 && PyErr_Occurred())
        return -1;
    PyObject *nv = PyLong_FromLong(cur + delta);
    if (nv == NULL)
        return -1;
    set_steal(obj, off, nv);
    return 0;
}

static int
check_session(PyObject *s)
{
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "_core is not configured");
        return -1;
    }
    if (!PyObject_TypeCheck(s, session_type)) {
        PyErr_SetString(PyExc_TypeError, "not a Session");
        return -1;
    }
    for (int i = 0; i < S_COUNT; i++) {
        if (get(s, s_off[i]) == NULL) {
            PyErr_Format(PyExc_AttributeError, "Session slot %s is unset", session_slots[i]);
            return -1;
        }
    }
    return 0;
}

static int
parse_args(PyObject *const *args, Py_ssize_t nargs, Py_buffer *view, Py_ssize_t *pos, Py_ssize_t *n)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "expected (session, data, pos, n, now)");
        return -1;
    }
    if (check_session(args[0]) < 0)
        return -1;
    *pos = PyLong_AsSsize_t(args[2]);
    *n = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(args[1], view, PyBUF_SIMPLE) < 0)
        return -1;
    if (*pos < 0 || *n > view->len || *pos > *n) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "pos/n outside the buffer");
        return -1;
    }
    return 0;
}

/* End of a loop: add the counts, return where the loop stopped (-1: an error, set). */
static Py_ssize_t
loop_end(PyObject *s, int err, Py_ssize_t pos, Py_ssize_t counter_off, long messages, long rows)
{
    if (!err && (add_int(s, counter_off, messages) < 0 || add_int(s, s_off[S_ROWS], rows) < 0))
        err = 1;
    return err ? -1 : pos;
}

static inline Py_ssize_t
msg_len(const unsigned char *p, Py_ssize_t pos)
{
    return (Py_ssize_t)(((unsigned long)p[pos + 1] << 24) | ((unsigned long)p[pos + 2] << 16) |
                        ((unsigned long)p[pos + 3] << 8) | (unsigned long)p[pos + 4]);
}

/* ------------------------------------------------------------------ client */

/* One extended-protocol client message (P, B, E): 1 handled, 0 bail, -1 error. */
static int
client_parse(PyObject *s, const unsigned char *p, Py_ssize_t start, Py_ssize_t end, PyObject *now)
{
    Py_ssize_t q;
    PyObject *name = cstr(p, start, end, &q);
    if (name == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Py_ssize_t q2;
    PyObject *sql = cstr(p, q, end, &q2);
    if (sql == NULL) {
        Py_DECREF(name);
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *prepared = get(s, s_off[S_PREPARED]);
    int rc = 0;
    if (!PyDict_CheckExact(prepared) || (PyUnicode_GET_LENGTH(name) && PyDict_GET_SIZE(prepared) >= 10000 &&
                                         !PyDict_Contains(prepared, name)))
        goto done; /* the bound on remembered statements: Python evicts */
    PyObject *rec = new_record(str_extended, sql);
    if (rec == NULL) {
        rc = -1;
        goto done;
    }
    set(rec, r_off[R_STATEMENT_NAME], name);
    set(rec, r_off[R_START_NS], now);
    set(rec, r_off[R_PARSE_START_NS], now);
    set(rec, r_off[R_STATUS], str_prepared);
    if (PyDict_SetItem(prepared, name, sql) < 0 || PyDict_SetItem(get(s, s_off[S_BATCH_PARSED]), name, rec) < 0 ||
        PyList_Append(get(s, s_off[S_BATCH]), rec) < 0 || queue(s, K_PARSE, rec) < 0)
        rc = -1;
    else
        rc = 1;
    Py_DECREF(rec);
done:
    Py_DECREF(name);
    Py_DECREF(sql);
    return rc;
}

static int
client_bind(PyObject *s, const unsigned char *p, Py_ssize_t start, Py_ssize_t end, PyObject *now)
{
    if (get(s, s_off[S_CAPTURE_PARAMS]) != Py_False)
        return 0;
    Py_ssize_t q, q2;
    PyObject *portal = cstr(p, start, end, &q);
    if (portal == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *stmt = cstr(p, q, end, &q2);
    if (stmt == NULL) {
        Py_DECREF(portal);
        return PyErr_Occurred() ? -1 : 0;
    }
    int rc = 0;
    PyObject *rec = NULL;
    PyObject *portals = get(s, s_off[S_PORTALS]);
    PyObject *parsed_map = get(s, s_off[S_BATCH_PARSED]);
    PyObject *prepared = get(s, s_off[S_PREPARED]);
    if (!PyDict_CheckExact(portals) || !PyDict_CheckExact(parsed_map) || !PyDict_CheckExact(prepared))
        goto done;
    if (PyDict_GET_SIZE(portals) >= 10000 && !PyDict_Contains(portals, portal))
        goto done; /* the bound on portals: Python evicts */
    PyObject *parsed = PyDict_GetItemWithError(parsed_map, stmt); /* borrowed */
    if (parsed == NULL && PyErr_Occurred()) {
        rc = -1;
        goto done;
    }
    if (parsed != NULL) {
        if (!is_rec(parsed))
            goto done;
        int bound = int_true(get(parsed, r_off[R_BIND_START_NS]));
        if (bound < 0)
            goto done;
        if (!bound) {
            rec = parsed;
            Py_INCREF(rec);
        }
    }
    if (rec == NULL) {
        PyObject *sql = PyDict_GetItemWithError(prepared, stmt); /* borrowed */
        if (sql == NULL && PyErr_Occurred()) {
            rc = -1;
            goto done;
        }
        rec = new_record(str_extended, sql ? sql : Py_None);
        if (rec == NULL) {
            rc = -1;
            goto done;
        }
        set(rec, r_off[R_STATEMENT_NAME], stmt);
        set(rec, r_off[R_START_NS], now);
        set(rec, r_off[R_REUSED], parsed == NULL ? Py_True : Py_False);
        if (PyList_Append(get(s, s_off[S_BATCH]), rec) < 0) {
            rc = -1;
            goto done;
        }
    }
    set(rec, r_off[R_STATUS], str_pending);
    set(rec, r_off[R_PORTAL], portal);
    set(rec, r_off[R_BIND_START_NS], now);
    set(rec, r_off[R_PARAMS], Py_None);
    if (PyDict_SetItem(portals, portal, rec) < 0 || queue(s, K_BIND, rec) < 0)
        rc = -1;
    else
        rc = 1;
done:
    Py_XDECREF(rec);
    Py_DECREF(portal);
    Py_DECREF(stmt);
    return rc;
}

static int
client_execute(PyObject *s, const unsigned char *p, Py_ssize_t start, Py_ssize_t end, PyObject *now)
{
    if (end <= start)
        return 0;
    Py_ssize_t q;
    PyObject *portal = cstr(p, start, end, &q);
    if (portal == NULL)
        return PyErr_Occurred() ? -1 : 0;
    int rc = 0;
    PyObject *portals = get(s, s_off[S_PORTALS]);
    PyObject *rec = NULL;
    if (!PyDict_CheckExact(portals))
        goto done;
    PyObject *old = PyDict_GetItemWithError(portals, portal); /* borrowed */
    if (old == NULL && PyErr_Occurred()) {
        rc = -1;
        goto done;
    }
    if (old != NULL) {
        if (!is_rec(old) || get(old, r_off[R_SQL]) == NULL || get(old, r_off[R_STATEMENT_NAME]) == NULL)
            goto done;
        int running = int_true(get(old, r_off[R_EXEC_START_NS]));
        if (running < 0)
            goto done;
        if (!running) {
            rec = old;
            Py_INCREF(rec);
        }
    }
    if (rec == NULL) {
        rec = new_record(str_extended, old ? get(old, r_off[R_SQL]) : Py_None);
        if (rec == NULL) {
            rc = -1;
            goto done;
        }
        set(rec, r_off[R_START_NS], now);
        set(rec, r_off[R_REUSED], Py_True);
        if (old != NULL)
            set(rec, r_off[R_STATEMENT_NAME], get(old, r_off[R_STATEMENT_NAME]));
        set(rec, r_off[R_PORTAL], portal);
        if (PyDict_SetItem(portals, portal, rec) < 0 || PyList_Append(get(s, s_off[S_BATCH]), rec) < 0) {
            rc = -1;
            goto done;
        }
    }
    set(rec, r_off[R_STATUS], str_pending);
    set(rec, r_off[R_EXEC_START_NS], now);
    rc = queue(s, K_EXECUTE, rec) < 0 ? -1 : 1;
done:
    Py_XDECREF(rec);
    Py_DECREF(portal);
    return rc;
}

static int
client_sync(PyObject *s)
{
    PyObject *fresh = PyList_New(0);
    if (fresh == NULL)
        return -1;
    mark_flushed(s);
    PyObject *batch = get(s, s_off[S_BATCH]);
    Py_INCREF(batch);
    set_steal(s, s_off[S_BATCH], fresh);
    PyObject *bp = get(s, s_off[S_BATCH_PARSED]);
    if (PyDict_CheckExact(bp))
        PyDict_Clear(bp);
    set(s, s_off[S_SKIPPING], Py_False);
    int r = queue(s, K_SYNC, batch);
    Py_DECREF(batch);
    if (r < 0)
        return -1;
    set(s, s_off[S_LAST_REC], Py_None);
    return 1;
}

static int
client_query(PyObject *s, const unsigned char *p, Py_ssize_t start, Py_ssize_t end, PyObject *now)
{
    if (end - 1 < start)
        return 0;
    PyObject *sql = PyUnicode_DecodeUTF8((const char *)p + start, end - 1 - start, "replace");
    if (sql == NULL)
        return -1;
    PyObject *rec = new_record(str_simple, sql);
    Py_DECREF(sql);
    if (rec == NULL)
        return -1;
    PyObject *results = PyList_New(0);
    if (results == NULL) {
        Py_DECREF(rec);
        return -1;
    }
    set(rec, r_off[R_START_NS], now);
    set(rec, r_off[R_EXEC_START_NS], now);
    set(rec, r_off[R_EXEC_EXACT], Py_True);
    set_steal(rec, r_off[R_RESULTS], results);
    PyObject *bp = get(s, s_off[S_BATCH_PARSED]);
    if (PyDict_CheckExact(bp))
        PyDict_Clear(bp);
    int r = queue(s, K_QUERY, rec);
    Py_DECREF(rec);
    return r < 0 ? -1 : 1;
}

/* client()'s loop over p[pos:n] for a checked session: where it stopped, or -1 (an error, set). */
static Py_ssize_t
client_loop(PyObject *s, const unsigned char *p, Py_ssize_t pos, Py_ssize_t n, PyObject *now)
{
    long messages = 0;
    int err = 0;
    if (get(s, s_off[S_OUT_OF_SYNC]) != Py_None || get(s, s_off[S_INJECTOR]) != Py_None ||
        get(s, s_off[S_FLUSH_PHASES]) != Py_False)
        goto out;
    Py_ssize_t limit = PyLong_AsSsize_t(get(s, s_off[S_MAX_MESSAGE_SIZE]));
    Py_ssize_t max_pending = PyLong_AsSsize_t(get(s, s_off[S_MAX_PENDING]));
    if (PyErr_Occurred()) {
        err = 1;
        goto out;
    }
    while (n - pos >= 5) {
        int typ = p[pos];
        Py_ssize_t length = msg_len(p, pos);
        if (length < 4 || length > limit || length > n - pos - 1)
            break; /* garbage (Python raises) or incomplete */
        Py_ssize_t start = pos + 5, end = pos + 1 + length;
        int r;
        if (typ == 'd') {
            r = 1; /* CopyData: relayed, nothing to account */
        } else {
            if (get(s, s_off[S_SKIPPING]) != Py_False || get(s, s_off[S_COPY_IN_EXT]) != Py_False)
                break;
            if (typ != 'H') {
                Py_ssize_t queued = PyObject_Size(get(s, s_off[S_PENDING]));
                if (queued < 0) {
                    err = 1;
                    break;
                }
                if (queued >= max_pending)
                    break;
            }
            switch (typ) {
            case 'B': r = client_bind(s, p, start, end, now); break;
            case 'E': r = client_execute(s, p, start, end, now); break;
            case 'S': r = client_sync(s); break;
            case 'P': r = client_parse(s, p, start, end, now); break;
            case 'D': r = queue(s, K_DESCRIBE, Py_None) < 0 ? -1 : 1; break;
            case 'H': mark_flushed(s); r = 1; break;
            case 'Q': r = client_query(s, p, start, end, now); break;
            default: r = 0; /* Close, FunctionCall, COPY, Terminate, garbage: Python */
            }
        }
        if (r < 0) {
            err = 1;
            break;
        }
        if (r == 0)
            break;
        messages++;
        pos = end;
    }
out:
    return loop_end(s, err, pos, s_off[S_MESSAGES_IN], messages, 0);
}

static PyObject *
client(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    Py_buffer view;
    Py_ssize_t pos, n;
    if (parse_args(args, nargs, &view, &pos, &n) < 0)
        return NULL;
    Py_ssize_t at = client_loop(args[0], (const unsigned char *)view.buf, pos, n, args[4]);
    PyBuffer_Release(&view);
    return at < 0 ? NULL : PyLong_FromSsize_t(at);
}

/* ------------------------------------------------------------------ server */

/* Front of the pending queue (borrowed tuple) when it is a client request of this kind. */
static PyObject *
front_of(PyObject *pending, int kind)
{
    if (PyObject_Size(pending) <= 0) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *f = PySequence_GetItem(pending, 0);
    if (f == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_DECREF(f); /* still held by the deque */
    if (!PyTuple_CheckExact(f) || PyTuple_GET_SIZE(f) != 3 || PyTuple_GET_ITEM(f, 2) != Py_False)
        return NULL;
    if (kind >= 0 && PyTuple_GET_ITEM(f, 0) != kind_obj[kind])
        return NULL;
    return f;
}

static int
popleft(PyObject *pending)
{
    PyObject *r = deque_popleft(pending);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* ReadyForQuery after start-up: Session._ready_for_query. 1 handled, 0 bail, -1 error. */
static int
server_ready(PyObject *s, int status, PyObject *now)
{
    if (get(s, s_off[S_READY]) != Py_True || int_true(get(s, s_off[S_SHIFTED])) != 0)
        return 0;
    PyObject *pending = get(s, s_off[S_PENDING]);
    /* Only client requests up to the one ReadyForQuery answers. */
    Py_ssize_t count = PyObject_Size(pending), upto = count;
    if (count < 0)
        return -1;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *e = PySequence_GetItem(pending, i);
        if (e == NULL)
            return -1;
        int ok = PyTuple_CheckExact(e) && PyTuple_GET_SIZE(e) == 3 && PyTuple_GET_ITEM(e, 2) == Py_False;
        PyObject *k = ok ? PyTuple_GET_ITEM(e, 0) : NULL, *rec = ok ? PyTuple_GET_ITEM(e, 1) : NULL;
        if (ok) {
            if (k == kind_obj[K_SYNC]) {
                /* the batch: a list of records */
                ok = PyList_CheckExact(rec);
                for (Py_ssize_t j = 0; ok && j < PyList_GET_SIZE(rec); j++)
                    ok = is_rec(PyList_GET_ITEM(rec, j));
            } else {
                ok = rec == Py_None || is_rec(rec);
                if (ok && (k == kind_obj[K_QUERY] || k == kind_obj[K_FUNC]))
                    ok = rec != Py_None;
            }
        }
        Py_DECREF(e);
        if (!ok)
            return 0;
        if (k == kind_obj[K_SYNC] || k == kind_obj[K_QUERY] || k == kind_obj[K_FUNC]) {
            upto = i + 1;
            break;
        }
    }
    PyObject *tx = status == 'I' ? str_tx[0] : status == 'T' ? str_tx[1] : status == 'E' ? str_tx[2] : NULL;
    if (tx == NULL)
        return 0;
    set(s, s_off[S_TX_STATUS], tx);
    set(s, s_off[S_COPY_IN_EXT], Py_False);
    PyObject *done = NULL; /* new reference: the records the batch finished */
    for (Py_ssize_t i = 0; i < upto; i++) {
        PyObject *e = deque_popleft(pending);
        if (e == NULL)
            goto fail;
        PyObject *k = PyTuple_GET_ITEM(e, 0), *rec = PyTuple_GET_ITEM(e, 1);
        if (k == kind_obj[K_SYNC]) {
            Py_INCREF(rec);
            done = rec;
        } else if (k == kind_obj[K_QUERY] || k == kind_obj[K_FUNC]) {
            set(rec, r_off[R_END_NS], now);
            PyObject *results = get(rec, r_off[R_RESULTS]);
            int failed = 0;
            if (results != NULL && PyList_Check(results)) {
                for (Py_ssize_t j = 0; j < PyList_GET_SIZE(results); j++) {
                    PyObject *c = PyList_GET_ITEM(results, j);
                    int t = PyObject_TypeCheck(c, completion_type) && SLOT(c, c_off[C_ERROR]) != NULL
                                ? PyObject_IsTrue(SLOT(c, c_off[C_ERROR]))
                                : -1;
                    if (t < 0) {
                        Py_DECREF(e);
                        PyErr_SetString(PyExc_TypeError, "unexpected Query results");
                        goto fail;
                    }
                    if (t) {
                        failed = 1;
                        break;
                    }
                }
            }
            set(rec, r_off[R_STATUS], failed ? str_error : str_ok);
            done = PyTuple_Pack(1, rec);
            if (done == NULL) {
                Py_DECREF(e);
                goto fail;
            }
        } else if (rec != Py_None && is_str(get(rec, r_off[R_STATUS]), str_pending)) {
            set(rec, r_off[R_STATUS], str_skipped);
            set(rec, r_off[R_END_NS], now);
        }
        Py_DECREF(e);
    }
    if (done != NULL) {
        PyObject *seq = PySequence_Fast(done, "batch");
        if (seq == NULL)
            goto fail;
        Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
        PyObject **items = PySequence_Fast_ITEMS(seq);
        for (Py_ssize_t i = 0; i < m; i++) {
            set(items[i], r_off[R_TX_STATUS], tx);
            if (is_str(get(items[i], r_off[R_STATUS]), str_pending)) {
                set(items[i], r_off[R_STATUS], str_skipped);
                set(items[i], r_off[R_END_NS], now);
            }
        }
        PyObject *completed = get(s, s_off[S_COMPLETED]);
        int r = 0;
        for (Py_ssize_t i = 0; i < m && r == 0; i++)
            r = PyList_Append(completed, items[i]);
        Py_DECREF(seq);
        if (r < 0)
            goto fail;
        Py_DECREF(done);
    }
    if (tx == str_tx[0]) {
        PyObject *portals = get(s, s_off[S_PORTALS]);
        if (PyDict_CheckExact(portals))
            PyDict_Clear(portals);
    }
    return 1;
fail:
    Py_XDECREF(done);
    return -1;
}

/* server()'s loop over p[pos:n] for a checked session: where it stopped, or -1 (an error, set). */
static Py_ssize_t
server_loop(PyObject *s, const unsigned char *p, Py_ssize_t pos, Py_ssize_t n, PyObject *now)
{
    long messages = 0, rows = 0;
    int err = 0;
    if (get(s, s_off[S_OUT_OF_SYNC]) != Py_None)
        goto out;
    PyObject *pending = get(s, s_off[S_PENDING]);
    while (n - pos >= 5) {
        int typ = p[pos];
        Py_ssize_t length = msg_len(p, pos);
        if (length < 4 || length > n - pos - 1)
            break; /* incomplete (Python holds or skips it) or broken */
        Py_ssize_t start = pos + 5, end = pos + 1 + length;
        int r = 0;
        PyObject *f, *rec;
        if (typ == 'D' || typ == 'd') {
            /* DataRow is counted, CopyData relayed; neither counts as a message here (as in Python). */
            if (typ == 'D')
                rows++;
            pos = end;
            continue;
        }
        switch (typ) {
        case '1':
        case '2':
        case '3':
            f = front_of(pending, typ == '1' ? K_PARSE : typ == '2' ? K_BIND : K_CLOSE);
            if (f == NULL)
                break;
            rec = PyTuple_GET_ITEM(f, 1);
            if (rec != Py_None && !is_rec(rec))
                break;
            Py_INCREF(rec);
            if (popleft(pending) < 0) {
                Py_DECREF(rec);
                r = -1;
                break;
            }
            if (typ != '3' && rec != Py_None)
                set(rec, r_off[typ == '1' ? R_PARSE_END_NS : R_BIND_END_NS], now);
            Py_DECREF(rec);
            r = 1;
            break;
        case 'T':
        case 'n':
            if (PyObject_Size(pending) == 0) {
                r = 1;
                break;
            }
            f = front_of(pending, -1);
            if (f == NULL)
                break; /* an injected request is due: Python */
            if (PyTuple_GET_ITEM(f, 0) == kind_obj[K_DESCRIBE])
                r = popleft(pending) < 0 ? -1 : 1;
            else
                r = 1;
            break;
        case 'C': {
            if (end - 1 < start)
                break;
            f = front_of(pending, -1);
            if (f == NULL)
                break;
            PyObject *k = PyTuple_GET_ITEM(f, 0);
            if (k != kind_obj[K_QUERY] && k != kind_obj[K_EXECUTE])
                break;
            rec = PyTuple_GET_ITEM(f, 1);
            if (!is_rec(rec))
                break;
            Py_INCREF(rec);
            /* rows counted so far in this call, plus what Python counted before */
            PyObject *prior = get(s, s_off[S_ROWS]);
            long total = PyLong_AsLong(prior);
            PyObject *tag = NULL, *rowsobj = NULL;
            if (total == -1 && PyErr_Occurred())
                goto c_fail;
            tag = cached_text(p + start, end - 1 - start, 1);
            rowsobj = tag ? PyLong_FromLong(total + rows) : NULL;
            if (rowsobj == NULL)
                goto c_fail;
            if (k == kind_obj[K_QUERY]) {
                PyObject *results = get(rec, r_off[R_RESULTS]);
                if (results != Py_None) {
                    if (!PyList_Check(results)) {
                        PyErr_SetString(PyExc_TypeError, "unexpected Query results");
                        goto c_fail;
                    }
                    PyObject *c = new_completion(now, tag, rowsobj);
                    if (c == NULL || PyList_Append(results, c) < 0) {
                        Py_XDECREF(c);
                        goto c_fail;
                    }
                    Py_DECREF(c);
                }
            } else {
                if (popleft(pending) < 0)
                    goto c_fail;
                set(rec, r_off[R_TAG], tag);
                set(rec, r_off[R_ROWS], rowsobj);
                set(rec, r_off[R_END_NS], now);
                set(rec, r_off[R_STATUS], str_ok);
            }
            rows = 0;
            set(s, s_off[S_ROWS], kind_obj[K_PARSE]); /* the int 0 */
            r = 1;
            Py_DECREF(tag);
            Py_DECREF(rowsobj);
            Py_DECREF(rec);
            break;
        c_fail:
            Py_XDECREF(tag);
            Py_XDECREF(rowsobj);
            Py_DECREF(rec);
            r = -1;
            break;
        }
        case 'Z':
            if (end <= start)
                break;
            r = server_ready(s, p[start], now);
            break;
        default:
            r = 0; /* errors, notices, COPY, parameter status, ...: Python */
        }
        if (r < 0) {
            err = 1;
            break;
        }
        if (r == 0)
            break;
        messages++;
        pos = end;
    }
out:
    return loop_end(s, err, pos, s_off[S_MESSAGES_OUT], messages, rows);
}

static PyObject *
server(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    Py_buffer view;
    Py_ssize_t pos, n;
    if (parse_args(args, nargs, &view, &pos, &n) < 0)
        return NULL;
    Py_ssize_t at = server_loop(args[0], (const unsigned char *)view.buf, pos, n, args[4]);
    PyBuffer_Release(&view);
    return at < 0 ? NULL : PyLong_FromSsize_t(at);
}

/* ------------------------------------------------------------------ records over a pipe
 *
 * pack(records) -> bytes | None
 *     The finished records of one connection in a compact binary form for the
 *     span process (tracing/process.py), or None when one of them holds what
 *     this form does not carry (an error, parameters, extra facts, a result
 *     with an error, a value of another type): the caller then uses marshal.
 * unpack(data) -> list
 *     The records again, every field equal to the packed one.
 *
 * Per record, little-endian: u8 protocol (0 simple, 1 extended, 2 function),
 * u8 flags (parse_exact 1, bind_exact 2, exec_exact 4, reused 8), eight
 * i64 (start_ns, parse_start_ns, parse_end_ns, bind_start_ns, bind_end_ns,
 * exec_start_ns, end_ns, rows), seven strings (sql, statement_name, portal,
 * status, tag, copy, tx_status: u32 length, 0xFFFFFFFF for None, then
 * UTF-8; or 0xFFFFFFFE and u32 k for the same object as the k-th string of at
 * least P_REF_MIN bytes written in full before it in this data), and the results (u32 count, 0xFFFFFFFF for None; per result i64
 * end_ns, a string tag, i64 rows). The data starts with u32 count.
 */

#define P_NONE 0xFFFFFFFFu
#define P_REF 0xFFFFFFFEu /* then u32 k: the k-th string of at least P_REF_MIN bytes written in full */
#define P_REF_MIN 8
#define P_REF_SLOTS 64

typedef struct {
    unsigned char *buf;
    Py_ssize_t len, cap;
    /* strings written in full, by identity (the records hold them during pack) */
    struct {
        PyObject *obj;
        unsigned long k;
    } refs[P_REF_SLOTS];
    unsigned long written;
} wbuf;

static int
w_reserve(wbuf *w, Py_ssize_t more)
{
    if (w->len + more <= w->cap)
        return 0;
    Py_ssize_t cap = w->cap ? w->cap : 256;
    while (cap < w->len + more)
        cap *= 2;
    unsigned char *b = PyMem_Realloc(w->buf, (size_t)cap);
    if (b == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    w->buf = b;
    w->cap = cap;
    return 0;
}

/* n little-endian bytes of v at p */
static inline void
put_le(unsigned char *p, unsigned long long v, int n)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(p, &v, (size_t)n);
#else
    for (int i = 0; i < n; i++)
        p[i] = (unsigned char)(v >> (8 * i));
#endif
}

static int
w_u32(wbuf *w, unsigned long v)
{
    if (w_reserve(w, 4) < 0)
        return -1;
    put_le(w->buf + w->len, v, 4);
    w->len += 4;
    return 0;
}

/* 1 written, 0 not packable (not an exact int in i64 range), -1 error */
static int
w_i64(wbuf *w, PyObject *v)
{
    if (v == NULL || !PyLong_CheckExact(v))
        return 0;
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow)
        return 0;
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (w_reserve(w, 8) < 0)
        return -1;
    put_le(w->buf + w->len, (unsigned long long)x, 8);
    w->len += 8;
    return 1;
}

static int
w_str(wbuf *w, PyObject *v)
{
    if (v == Py_None)
        return w_u32(w, P_NONE) < 0 ? -1 : 1;
    if (v == NULL || !PyUnicode_CheckExact(v))
        return 0;
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(v, &n);
    if (s == NULL) {
        PyErr_Clear(); /* lone surrogates: marshal carries them */
        return 0;
    }
    if (n >= (Py_ssize_t)P_REF)
        return 0;
    if (n >= P_REF_MIN) {
        size_t slot = ((size_t)v >> 4) % P_REF_SLOTS;
        if (w->refs[slot].obj == v)
            return w_u32(w, P_REF) < 0 || w_u32(w, w->refs[slot].k) < 0 ? -1 : 1;
        w->refs[slot].obj = v;
        w->refs[slot].k = w->written++;
    }
    if (w_u32(w, (unsigned long)n) < 0 || w_reserve(w, n) < 0)
        return -1;
    memcpy(w->buf + w->len, s, (size_t)n);
    w->len += n;
    return 1;
}

static const int pack_ints[8] = {R_START_NS, R_PARSE_START_NS, R_PARSE_END_NS, R_BIND_START_NS,
                                 R_BIND_END_NS, R_EXEC_START_NS, R_END_NS, R_ROWS};
static const int pack_strs[7] = {R_SQL, R_STATEMENT_NAME, R_PORTAL, R_STATUS, R_TAG, R_COPY, R_TX_STATUS};
static const int pack_bools[4] = {R_PARSE_EXACT, R_BIND_EXACT, R_EXEC_EXACT, R_REUSED};

/* 1 written, 0 not packable, -1 error */
static int
pack_one(wbuf *w, PyObject *rec)
{
    if (Py_TYPE(rec) != record_type)
        return 0;
    for (int i = 0; i < R_COUNT; i++)
        if (get(rec, r_off[i]) == NULL)
            return 0;
    if (get(rec, r_off[R_ERROR]) != Py_None || get(rec, r_off[R_PARAMS]) != Py_None ||
        get(rec, r_off[R_EXTRA]) != Py_None)
        return 0;
    PyObject *proto = get(rec, r_off[R_PROTOCOL]);
    int code;
    if (is_str(proto, str_simple))
        code = 0;
    else if (is_str(proto, str_extended))
        code = 1;
    else if (is_str(proto, str_function))
        code = 2;
    else
        return 0;
    int flags = 0;
    for (int i = 0; i < 4; i++) {
        PyObject *b = get(rec, r_off[pack_bools[i]]);
        if (b == Py_True)
            flags |= 1 << i;
        else if (b != Py_False)
            return 0;
    }
    if (w_reserve(w, 2) < 0)
        return -1;
    w->buf[w->len++] = (unsigned char)code;
    w->buf[w->len++] = (unsigned char)flags;
    int r;
    for (int i = 0; i < 8; i++)
        if ((r = w_i64(w, get(rec, r_off[pack_ints[i]]))) <= 0)
            return r;
    for (int i = 0; i < 7; i++)
        if ((r = w_str(w, get(rec, r_off[pack_strs[i]]))) <= 0)
            return r;
    PyObject *results = get(rec, r_off[R_RESULTS]);
    if (results == Py_None)
        return w_u32(w, P_NONE) < 0 ? -1 : 1;
    if (!PyList_CheckExact(results))
        return 0;
    Py_ssize_t n = PyList_GET_SIZE(results);
    if (w_u32(w, (unsigned long)n) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *c = PyList_GET_ITEM(results, i);
        if (Py_TYPE(c) != completion_type || get(c, c_off[C_END_NS]) == NULL || get(c, c_off[C_TAG]) == NULL ||
            get(c, c_off[C_ROWS]) == NULL || get(c, c_off[C_ERROR]) != Py_None)
            return 0;
        if ((r = w_i64(w, get(c, c_off[C_END_NS]))) <= 0 || (r = w_str(w, get(c, c_off[C_TAG]))) <= 0 ||
            (r = w_i64(w, get(c, c_off[C_ROWS]))) <= 0)
            return r;
    }
    return 1;
}

static PyObject *
pack(PyObject *self, PyObject *records)
{
    (void)self;
    if (!configured || !PyList_CheckExact(records))
        Py_RETURN_NONE;
    wbuf w;
    memset(&w, 0, sizeof w);
    Py_ssize_t n = PyList_GET_SIZE(records);
    PyObject *res = NULL;
    /* room for records of the usual size at once (no growing copies on the way) */
    if (w_reserve(&w, 4 + n * 224) < 0 || w_u32(&w, (unsigned long)n) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        int r = pack_one(&w, PyList_GET_ITEM(records, i));
        if (r < 0)
            goto done;
        if (r == 0) {
            res = Py_None;
            Py_INCREF(res);
            goto done;
        }
    }
    res = PyBytes_FromStringAndSize((const char *)w.buf, w.len);
done:
    PyMem_Free(w.buf);
    return res;
}

typedef struct {
    const unsigned char *p;
    Py_ssize_t pos, n;
    PyObject *written; /* list: the strings of at least P_REF_MIN bytes read in full */
} rbuf;

static int
r_need(rbuf *r, Py_ssize_t k)
{
    if (r->n - r->pos < k) {
        PyErr_SetString(PyExc_ValueError, "unpack: truncated record data");
        return -1;
    }
    return 0;
}

static int
r_u32(rbuf *r, unsigned long *v)
{
    if (r_need(r, 4) < 0)
        return -1;
    unsigned long x = 0;
    for (int i = 0; i < 4; i++)
        x |= (unsigned long)r->p[r->pos++] << (8 * i);
    *v = x;
    return 0;
}

static PyObject *
r_i64(rbuf *r)
{
    if (r_need(r, 8) < 0)
        return NULL;
    unsigned long long u = 0;
    for (int i = 0; i < 8; i++)
        u |= (unsigned long long)r->p[r->pos++] << (8 * i);
    return PyLong_FromLongLong((long long)u);
}

/* Common short values come back as the interned strings the codec uses. */
static PyObject *
r_str(rbuf *r)
{
    unsigned long len;
    if (r_u32(r, &len) < 0)
        return NULL;
    if (len == P_NONE)
        Py_RETURN_NONE;
    if (len == P_REF) {
        unsigned long k;
        if (r_u32(r, &k) < 0)
            return NULL;
        if ((Py_ssize_t)k >= PyList_GET_SIZE(r->written)) {
            PyErr_SetString(PyExc_ValueError, "unpack: reference to a string not read yet");
            return NULL;
        }
        PyObject *v = PyList_GET_ITEM(r->written, (Py_ssize_t)k);
        Py_INCREF(v);
        return v;
    }
    if (r_need(r, (Py_ssize_t)len) < 0)
        return NULL;
    const char *s = (const char *)r->p + r->pos;
    r->pos += (Py_ssize_t)len;
    PyObject *known[] = {str_empty, str_ok, str_error, str_pending, str_prepared, str_skipped,
                         str_tx[0], str_tx[1], str_tx[2]};
    PyObject *v = NULL;
    if (len <= 8) {
        for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
            if ((unsigned long)PyUnicode_GET_LENGTH(known[i]) == len &&
                memcmp(PyUnicode_1BYTE_DATA(known[i]), s, len) == 0) {
                v = known[i];
                Py_INCREF(v);
                break;
            }
        }
    }
    if (v == NULL)
        v = PyUnicode_DecodeUTF8(s, (Py_ssize_t)len, NULL);
    if (v != NULL && len >= P_REF_MIN && PyList_Append(r->written, v) < 0) /* as pack counts them */
        Py_CLEAR(v);
    return v;
}

static PyObject *
unpack_one(rbuf *r)
{
    if (r_need(r, 2) < 0)
        return NULL;
    int code = r->p[r->pos++];
    int flags = r->p[r->pos++];
    PyObject *proto = code == 0 ? str_simple : code == 1 ? str_extended : code == 2 ? str_function : NULL;
    if (proto == NULL || flags > 15) {
        PyErr_SetString(PyExc_ValueError, "unpack: bad record header");
        return NULL;
    }
    PyObject *rec = new_record(proto, Py_None);
    if (rec == NULL)
        return NULL;
    for (int i = 0; i < 4; i++)
        set(rec, r_off[pack_bools[i]], (flags >> i) & 1 ? Py_True : Py_False);
    for (int i = 0; i < 8; i++) {
        PyObject *v = r_i64(r);
        if (v == NULL)
            goto fail;
        set_steal(rec, r_off[pack_ints[i]], v);
    }
    for (int i = 0; i < 7; i++) {
        PyObject *v = r_str(r);
        if (v == NULL)
            goto fail;
        set_steal(rec, r_off[pack_strs[i]], v);
    }
    unsigned long count;
    if (r_u32(r, &count) < 0)
        goto fail;
    if (count != P_NONE) {
        if ((Py_ssize_t)count > (r->n - r->pos) / 20) {
            PyErr_SetString(PyExc_ValueError, "unpack: truncated record data");
            goto fail;
        }
        PyObject *list = PyList_New((Py_ssize_t)count);
        if (list == NULL)
            goto fail;
        set_steal(rec, r_off[R_RESULTS], list);
        for (unsigned long i = 0; i < count; i++) {
            PyObject *end = r_i64(r), *tag = end ? r_str(r) : NULL, *rows = tag ? r_i64(r) : NULL;
            PyObject *c = rows ? new_completion(end, tag, rows) : NULL;
            Py_XDECREF(end);
            Py_XDECREF(tag);
            Py_XDECREF(rows);
            if (c == NULL)
                goto fail;
            PyList_SET_ITEM(list, (Py_ssize_t)i, c);
        }
    }
    return rec;
fail:
    Py_DECREF(rec);
    return NULL;
}

static PyObject *
unpack(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "_core is not configured");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    rbuf r = {(const unsigned char *)view.buf, 0, view.len, PyList_New(0)};
    PyObject *list = NULL;
    if (r.written == NULL)
        goto done;
    unsigned long n;
    if (r_u32(&r, &n) < 0)
        goto done;
    if ((Py_ssize_t)n > r.n / 60) { /* every record takes at least 2 + 64 + 28 + 4 bytes */
        PyErr_SetString(PyExc_ValueError, "unpack: truncated record data");
        goto done;
    }
    list = PyList_New((Py_ssize_t)n);
    if (list == NULL)
        goto done;
    for (unsigned long i = 0; i < n; i++) {
        PyObject *rec = unpack_one(&r);
        if (rec == NULL) {
            Py_CLEAR(list);
            goto done;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, rec);
    }
    if (r.pos != r.n) {
        PyErr_SetString(PyExc_ValueError, "unpack: data after the last record");
        Py_CLEAR(list);
    }
done:
    Py_XDECREF(r.written);
    PyBuffer_Release(&view);
    return list;
}

/* ---------------------------------------------------------------- Feed
 *
 * Feed(server_side, conn, session, write, full, resume, deliver_at): a callable
 * that stands in for a relay protocol's data_received (proxy/connection.py:
 * _FromClient / _FromServer), so that a chunk of the common kind goes from
 * the event loop through the compiled loop to the peer's write without a
 * Python frame. Anything else is handed to Python as it is, with nothing
 * done yet: full(data) (the protocol's own data_received) when the
 * connection is not observed, bytes are held, or (server side) the session
 * holds server bytes back; resume(data, now, at) when the compiled loop
 * stopped at ``at`` before the end of the chunk, or raised (``at`` is then
 * the exception). The server side then hands finished statements to
 * conn.deliver() as _FromServer does: when conn.eager is true or the
 * session holds deliver_at of them.
 */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int server_side;
    Py_ssize_t deliver_at;
    PyObject *conn, *session, *write, *full, *resume;
    PyObject *conn_dict; /* conn.__dict__, where its plain attributes observe and eager live; or NULL */
    int checked;         /* the session passed check_session (its slots stay set) */
} Feed;

static PyObject *str_observe, *str_eager, *str_deliver;

static int
feed_traverse(Feed *f, visitproc visit, void *arg)
{
    Py_VISIT(f->conn);
    Py_VISIT(f->session);
    Py_VISIT(f->write);
    Py_VISIT(f->full);
    Py_VISIT(f->resume);
    Py_VISIT(f->conn_dict);
    return 0;
}

static int
feed_clear(Feed *f)
{
    Py_CLEAR(f->conn);
    Py_CLEAR(f->session);
    Py_CLEAR(f->write);
    Py_CLEAR(f->full);
    Py_CLEAR(f->resume);
    Py_CLEAR(f->conn_dict);
    return 0;
}

static void
feed_dealloc(Feed *f)
{
    PyObject_GC_UnTrack(f);
    feed_clear(f);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static inline int
is_zero(PyObject *v)
{
    return PyLong_CheckExact(v) && Py_SIZE(v) == 0;
}

static inline int
is_empty_bytes(PyObject *v)
{
    return PyBytes_CheckExact(v) && PyBytes_GET_SIZE(v) == 0;
}

/* conn.<name> is True (read from its __dict__ when it is there: a plain attribute) */
static int
conn_flag(Feed *f, PyObject *name)
{
    if (f->conn_dict != NULL) {
        PyObject *d = PyDict_GetItemWithError(f->conn_dict, name);
        if (d != NULL)
            return d == Py_True;
        if (PyErr_Occurred())
            return -1;
    }
    PyObject *v = PyObject_GetAttr(f->conn, name);
    if (v == NULL)
        return -1;
    int r = v == Py_True;
    Py_DECREF(v);
    return r;
}

static PyObject *
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts); /* time.time_ns()'s clock */
    return PyLong_FromLongLong((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
}

/* Run the compiled loop (client() or server()) over all of data; resume in Python if it did not finish.
 * Returns 0 when done, -1 on error (exception set). */
static int
feed_loop(Feed *f, PyObject *data, PyObject *now, Py_ssize_t n)
{
    /* the session was checked by feed_call; data is bytes */
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t pos = f->server_side ? server_loop(f->session, p, 0, n, now) : client_loop(f->session, p, 0, n, now);
    if (pos == n)
        return 1; /* whole chunk taken */
    PyObject *r, *at = pos < 0 ? NULL : PyLong_FromSsize_t(pos);
    if (at == NULL) {
        PyObject *value = take_exception();
        if (value == NULL)
            return -1;
        PyObject *b[3] = {data, now, value};
        r = PyObject_Vectorcall(f->resume, b, 3, NULL);
        Py_DECREF(value);
    } else {
        PyObject *b[3] = {data, now, at};
        r = PyObject_Vectorcall(f->resume, b, 3, NULL);
        Py_DECREF(at);
    }
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *
feed_full(Feed *f, PyObject *data)
{
    return PyObject_CallOneArg(f->full, data);
}

static PyObject *
feed_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Feed *f = (Feed *)self;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "Feed takes one bytes argument");
        return NULL;
    }
    PyObject *data = args[0], *s = f->session;
    if (!f->checked) {
        if (!configured || check_session(s) < 0) {
            PyErr_Clear(); /* Python says what is wrong */
            return feed_full(f, data);
        }
        f->checked = 1;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (!f->server_side) {
        int obs = conn_flag(f, str_observe);
        if (obs < 0)
            return NULL;
        if (!obs || !is_empty_bytes(get(s, s_off[S_CBUF])) || !is_zero(get(s, s_off[S_CSKIP])))
            return feed_full(f, data);
        PyObject *now = now_ns();
        if (now == NULL)
            return NULL;
        int r = feed_loop(f, data, now, n);
        Py_DECREF(now);
        if (r < 0)
            return NULL;
        if (r == 1) { /* whole chunk accounted: forward it as it is */
            PyObject *w = PyObject_CallOneArg(f->write, data);
            if (w == NULL)
                return NULL;
            Py_DECREF(w);
        }
        /* r == 0: resume() forwarded what is to be forwarded */
        Py_RETURN_NONE;
    }
    /* server side: while the session holds server bytes back, Python filters them */
    PyObject *oos = get(s, s_off[S_OUT_OF_SYNC]);
    if (oos == Py_None && !(get(s, s_off[S_READY]) == Py_True && is_zero(get(s, s_off[S_INJECTED_PENDING])) &&
                            get(s, s_off[S_HELD_READY]) == Py_None && is_zero(get(s, s_off[S_SHIFTED]))))
        return feed_full(f, data);
    PyObject *w = PyObject_CallOneArg(f->write, data);
    if (w == NULL)
        return NULL;
    Py_DECREF(w);
    int obs = conn_flag(f, str_observe);
    if (obs < 0)
        return NULL;
    if (obs && oos == Py_None) {
        PyObject *now = now_ns();
        if (now == NULL)
            return NULL;
        int r;
        if (is_empty_bytes(get(s, s_off[S_SBUF])) && is_zero(get(s, s_off[S_SSKIP]))) {
            r = feed_loop(f, data, now, n);
        } else {
            PyObject *zero = PyLong_FromLong(0);
            PyObject *b[3] = {data, now, zero};
            PyObject *res = zero ? PyObject_Vectorcall(f->resume, b, 3, NULL) : NULL;
            Py_XDECREF(zero);
            r = res == NULL ? -1 : 0;
            Py_XDECREF(res);
        }
        Py_DECREF(now);
        if (r < 0)
            return NULL;
    }
    PyObject *done = get(s, s_off[S_COMPLETED]);
    if (PyList_Check(done) && PyList_GET_SIZE(done) > 0) {
        int eager = PyList_GET_SIZE(done) >= f->deliver_at ? 1 : conn_flag(f, str_eager);
        if (eager < 0)
            return NULL;
        if (eager) {
            PyObject *r = PyObject_CallMethodNoArgs(f->conn, str_deliver);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *
feed_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    (void)kw;
    int server_side;
    Py_ssize_t deliver_at;
    PyObject *conn, *session, *write, *full, *resume;
    if (!PyArg_ParseTuple(args, "pOOOOOn", &server_side, &conn, &session, &write, &full, &resume, &deliver_at))
        return NULL;
    if (!PyCallable_Check(write) || !PyCallable_Check(full) || !PyCallable_Check(resume)) {
        PyErr_SetString(PyExc_TypeError, "Feed: write, full and resume must be callable");
        return NULL;
    }
    Feed *f = (Feed *)type->tp_alloc(type, 0);
    if (f == NULL)
        return NULL;
    f->vectorcall = feed_call;
    f->server_side = server_side;
    f->deliver_at = deliver_at;
    Py_INCREF(conn);
    f->conn = conn;
    Py_INCREF(session);
    f->session = session;
    Py_INCREF(write);
    f->write = write;
    Py_INCREF(full);
    f->full = full;
    Py_INCREF(resume);
    f->resume = resume;
    /* observe and eager are read from the instance dict only when no class attribute (a property)
     * could stand in front of it */
    if (_PyType_Lookup(Py_TYPE(conn), str_observe) == NULL && _PyType_Lookup(Py_TYPE(conn), str_eager) == NULL) {
        PyObject *d = PyObject_GenericGetDict(conn, NULL);
        if (d != NULL && PyDict_CheckExact(d))
            f->conn_dict = d;
        else
            Py_XDECREF(d);
        PyErr_Clear(); /* no dict: conn_flag looks the attributes up */
    }
    return (PyObject *)f;
}

static PyTypeObject FeedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgotel_proxy.protocol._core.Feed",
    .tp_basicsize = sizeof(Feed),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A relay protocol's data_received for the common case (see _core.c).",
    .tp_new = feed_new,
    .tp_dealloc = (destructor)feed_dealloc,
    .tp_traverse = (traverseproc)feed_traverse,
    .tp_clear = (inquiry)feed_clear,
    .tp_vectorcall_offset = offsetof(Feed, vectorcall),
    .tp_call = PyVectorcall_Call,
};

/* ------------------------------------------------------------------ Sender
 *
 * Sender(fd, transport): a relay's write to a plain (not TLS) socket
 * transport. A chunk goes out with one send() on the transport's socket when
 * the transport is open and holds nothing unsent (is_closing() is False,
 * get_write_buffer_size() is 0): what the transport's write() would do itself
 * then, without its bookkeeping, and send() instead of write() (no file-layer
 * step). Whatever is not sent that way (a partial send, a full socket, an
 * error, a transport with bytes waiting or closing) goes to transport.write(),
 * which buffers it, applies flow control or reports the error exactly as
 * before; bytes never overtake what the transport holds.
 */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int fd;
    PyObject *write, *is_closing, *buffer_size;
} Sender;

static int
sender_traverse(Sender *w, visitproc visit, void *arg)
{
    Py_VISIT(w->write);
    Py_VISIT(w->is_closing);
    Py_VISIT(w->buffer_size);
    return 0;
}

static int
sender_clear(Sender *w)
{
    Py_CLEAR(w->write);
    Py_CLEAR(w->is_closing);
    Py_CLEAR(w->buffer_size);
    return 0;
}

static void
sender_dealloc(Sender *w)
{
    PyObject_GC_UnTrack(w);
    sender_clear(w);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

/* 1: the transport is open and holds nothing unsent; 0: not (or it could not say) */
static int
sender_clear_to_send(Sender *w)
{
    PyObject *c = PyObject_CallNoArgs(w->is_closing);
    if (c == NULL) {
        PyErr_Clear();
        return 0;
    }
    int open = c == Py_False;
    Py_DECREF(c);
    if (!open)
        return 0;
    PyObject *b = PyObject_CallNoArgs(w->buffer_size);
    if (b == NULL) {
        PyErr_Clear();
        return 0;
    }
    int empty = is_zero(b);
    Py_DECREF(b);
    return empty;
}

static PyObject *
sender_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Sender *w = (Sender *)self;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "Sender takes one argument");
        return NULL;
    }
    PyObject *data = args[0];
    if (PyBytes_CheckExact(data) && PyBytes_GET_SIZE(data) > 0 && sender_clear_to_send(w)) {
        const char *p = PyBytes_AS_STRING(data);
        Py_ssize_t n = PyBytes_GET_SIZE(data);
        ssize_t k = send(w->fd, p, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k == n)
            Py_RETURN_NONE;
        if (k > 0) { /* the rest waits in the transport */
            PyObject *rest = PyBytes_FromStringAndSize(p + k, n - k);
            if (rest == NULL)
                return NULL;
            PyObject *r = PyObject_CallOneArg(w->write, rest);
            Py_DECREF(rest);
            return r;
        }
        /* nothing sent (a full socket, an error): the transport tries again and deals with it */
    }
    return PyObject_CallOneArg(w->write, data);
}

static PyObject *
sender_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    (void)kw;
    int fd;
    PyObject *transport;
    if (!PyArg_ParseTuple(args, "iO", &fd, &transport))
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "Sender: no file descriptor");
        return NULL;
    }
    Sender *w = (Sender *)type->tp_alloc(type, 0);
    if (w == NULL)
        return NULL;
    w->vectorcall = sender_call;
    w->fd = fd;
    if ((w->write = PyObject_GetAttrString(transport, "write")) == NULL ||
        (w->is_closing = PyObject_GetAttrString(transport, "is_closing")) == NULL ||
        (w->buffer_size = PyObject_GetAttrString(transport, "get_write_buffer_size")) == NULL) {
        Py_DECREF(w);
        return NULL;
    }
    return (PyObject *)w;
}

static PyTypeObject SenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgotel_proxy.protocol._core.Sender",
    .tp_basicsize = sizeof(Sender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Sender(fd, transport): write a chunk with send() when the transport holds nothing, else through it.",
    .tp_new = sender_new,
    .tp_dealloc = (destructor)sender_dealloc,
    .tp_traverse = (traverseproc)sender_traverse,
    .tp_clear = (inquiry)sender_clear,
    .tp_vectorcall_offset = offsetof(Sender, vectorcall),
    .tp_call = PyVectorcall_Call,
};

/* ------------------------------------------------------------------ the pump's log
 *
 * observe_log(log, pumped, resume) -> dict
 *     Feed what the compiled pump relayed for traced sessions (its log,
 *     proxy/_pump.c: per chunk an i64 pair id, i32 kind, i32 length and i64
 *     receive time in native byte order, then the chunk) to the sessions of
 *     the connections in ``pumped`` (pair id -> connection), in order, as
 *     ClientConnection.pump_observe does: a client (0) or server (1) chunk of
 *     the common kind goes through client_loop / server_loop without a Python
 *     frame. Any other record goes to resume(conn, kind, log, at, stop, ts),
 *     nothing done from ``at`` on: where the loop stopped, the chunk's start
 *     when the session holds bytes or is out of step, or the exception the loop
 *     raised; kind 2 (the pump handed the pair back) always. Records of pairs
 *     not in ``pumped`` are skipped. Returns the connections fed (pair id ->
 *     connection) for the caller to hand their finished statements on; a
 *     pair handed back is left out (pump_back does that itself).
 */
#define LOG_HEAD 24
#define LOG_BACK 2

static PyObject *str_session;

/* resume(conn, kind, log, at, stop, ts); at is an int or an exception. 0, or -1 (set). */
static int
log_resume(PyObject *resume, PyObject *conn, int kind, PyObject *log, PyObject *at, Py_ssize_t stop, PyObject *ts)
{
    PyObject *k = PyLong_FromLong(kind), *st = PyLong_FromSsize_t(stop);
    PyObject *r = NULL;
    if (k != NULL && st != NULL) {
        PyObject *b[6] = {conn, k, log, at, st, ts};
        r = PyObject_Vectorcall(resume, b, 6, NULL);
    }
    Py_XDECREF(k);
    Py_XDECREF(st);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* One client or server chunk of an observed pair: 0, or -1 (set). */
static int
log_feed(PyObject *resume, PyObject *conn, int kind, PyObject *log, Py_ssize_t start, Py_ssize_t stop, PyObject *ts)
{
    PyObject *obs = PyObject_GetAttr(conn, str_observe);
    if (obs == NULL)
        return -1;
    int observing = obs == Py_True;
    Py_DECREF(obs);
    if (!observing)
        return 0; /* observation stopped: the pump relays, nobody frames */
    PyObject *s = PyObject_GetAttr(conn, str_session);
    if (s == NULL)
        return -1;
    int fast = 0;
    if (kind == 0 || kind == 1) {
        if (check_session(s) < 0)
            PyErr_Clear(); /* not a Session of this layout: Python does it */
        else if (kind == 0)
            fast = is_empty_bytes(get(s, s_off[S_CBUF])) && is_zero(get(s, s_off[S_CSKIP]));
        else
            fast = get(s, s_off[S_OUT_OF_SYNC]) == Py_None && is_empty_bytes(get(s, s_off[S_SBUF])) &&
                   is_zero(get(s, s_off[S_SSKIP]));
    }
    Py_ssize_t at = start;
    PyObject *at_obj = NULL;
    if (fast) {
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(log);
        at = kind == 0 ? client_loop(s, p, start, stop, ts) : server_loop(s, p, start, stop, ts);
        if (at == stop) {
            Py_DECREF(s);
            return 0;
        }
        if (at < 0 && (at_obj = take_exception()) == NULL) { /* the loop raised: Python decides */
            Py_DECREF(s);
            return -1;
        }
    }
    Py_DECREF(s);
    if (at_obj == NULL && (at_obj = PyLong_FromSsize_t(at)) == NULL)
        return -1;
    int r = log_resume(resume, conn, kind, log, at_obj, stop, ts);
    Py_DECREF(at_obj);
    return r;
}

static PyObject *
observe_log(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyBytes_CheckExact(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "expected (log: bytes, pumped: dict, resume)");
        return NULL;
    }
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "_core is not configured");
        return NULL;
    }
    PyObject *log = args[0], *pumped = args[1], *resume = args[2];
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(log);
    Py_ssize_t end = PyBytes_GET_SIZE(log), pos = 0;
    PyObject *touched = PyDict_New();
    if (touched == NULL)
        return NULL;
    while (pos < end) {
        long long pair, ts_ns;
        int32_t kind, length;
        if (end - pos < LOG_HEAD)
            goto truncated;
        memcpy(&pair, p + pos, 8);
        memcpy(&kind, p + pos + 8, 4);
        memcpy(&length, p + pos + 12, 4);
        memcpy(&ts_ns, p + pos + 16, 8);
        pos += LOG_HEAD;
        if (length < 0 || length > end - pos)
            goto truncated;
        Py_ssize_t stop = pos + length;
        PyObject *key = PyLong_FromLongLong(pair);
        if (key == NULL)
            goto fail;
        PyObject *conn = PyDict_GetItemWithError(pumped, key);
        if (conn == NULL) {
            Py_DECREF(key);
            if (PyErr_Occurred())
                goto fail;
            pos = stop;
            continue;
        }
        Py_INCREF(conn); /* resume may take it out of pumped */
        int r = -1;
        PyObject *ts = PyLong_FromLongLong(ts_ns);
        if (ts != NULL) {
            if (kind == LOG_BACK) {
                r = PyDict_Contains(touched, key);
                if (r == 1)
                    r = PyDict_DelItem(touched, key);
                PyObject *at = r < 0 ? NULL : PyLong_FromSsize_t(pos);
                r = at == NULL ? -1 : log_resume(resume, conn, kind, log, at, stop, ts);
                Py_XDECREF(at);
            } else {
                r = PyDict_SetItem(touched, key, conn);
                if (r == 0)
                    r = log_feed(resume, conn, kind, log, pos, stop, ts);
            }
            Py_DECREF(ts);
        }
        Py_DECREF(conn);
        Py_DECREF(key);
        if (r < 0)
            goto fail;
        pos = stop;
    }
    return touched;
truncated:
    PyErr_SetString(PyExc_ValueError, "observe_log: a truncated record");
fail:
    Py_DECREF(touched);
    return NULL;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(Session, Statement, Completion, record_fields, record_defaults, kinds): read the slot layout."},
    {"client", (PyCFunction)(void (*)(void))client, METH_FASTCALL,
     "client(session, data, pos, n, now) -> pos: account the client messages this path handles."},
    {"server", (PyCFunction)(void (*)(void))server, METH_FASTCALL,
     "server(session, data, pos, n, now) -> pos: account the server messages this path handles."},
    {"observe_log", (PyCFunction)(void (*)(void))observe_log, METH_FASTCALL,
     "observe_log(log, pumped, resume) -> dict: feed the pump's log to the pumped sessions (see _core.c)."},
    {"pack", pack, METH_O, "pack(records) -> bytes | None: finished records in a compact form (None: use marshal)."},
    {"unpack", unpack, METH_O, "unpack(data) -> list: the records pack() packed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_core", "Compiled fast path of the protocol codec.", -1, methods,
    NULL, NULL, NULL, NULL, /* m_slots, m_traverse, m_clear, m_free */
};

PyMODINIT_FUNC
PyInit__core(void)
{
#define INTERN(var, text)                                                                          \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                          \
        return NULL;
    INTERN(str_empty, "");
    INTERN(str_simple, "simple");
    INTERN(str_extended, "extended");
    INTERN(str_function, "function");
    INTERN(str_pending, "pending");
    INTERN(str_prepared, "prepared");
    INTERN(str_skipped, "skipped");
    INTERN(str_ok, "ok");
    INTERN(str_error, "error");
    INTERN(str_append, "append");
    INTERN(str_popleft, "popleft");
    INTERN(str_tx[0], "I");
    INTERN(str_tx[1], "T");
    INTERN(str_tx[2], "E");
    INTERN(str_observe, "observe");
    INTERN(str_eager, "eager");
    INTERN(str_deliver, "deliver");
    INTERN(str_session, "session");
#undef INTERN
    PyObject *collections = PyImport_ImportModule("collections");
    if (collections == NULL)
        return NULL;
    deque_type = (PyTypeObject *)PyObject_GetAttrString(collections, "deque");
    Py_DECREF(collections);
    if (deque_type == NULL || !PyType_Check(deque_type) ||
        (deque_append_m = PyObject_GetAttr((PyObject *)deque_type, str_append)) == NULL ||
        (deque_popleft_m = PyObject_GetAttr((PyObject *)deque_type, str_popleft)) == NULL)
        return NULL;
    if (PyType_Ready(&FeedType) < 0 || PyType_Ready(&SenderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FeedType);
    if (PyModule_AddObject(m, "Feed", (PyObject *)&FeedType) < 0) {
        Py_DECREF(&FeedType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&SenderType);
    if (PyModule_AddObject(m, "Sender", (PyObject *)&SenderType) < 0) {
        Py_DECREF(&SenderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
