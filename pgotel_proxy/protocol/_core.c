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
 * with __slots__; configure() is given the record layouts (events.py: every
 * field's name, kind and default) and reads where each slot lives from the
 * classes' member descriptors, so the codec makes records and sets fields
 * without a Python call. When the layout is not what this file expects,
 * configure() fails and Session runs in Python alone.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* PyMemberDef, READONLY (Python 3.11) */
#include <string.h>
#include <time.h>
#include <stddef.h>
#include "../_cutil.h" /* take_exception */
#include "_kinds.h" /* FE_* and BE_* message type bytes */
#include "../_pumplog.h" /* the pump log's head and entry kinds */

#define T_OBJECT_EX_ 16 /* PyMemberDef type of a __slots__ entry (T_OBJECT_EX / Py_T_OBJECT_EX) */

/* Request kinds in the pending queue (session.py). */
enum { K_PARSE, K_BIND, K_DESCRIBE, K_EXECUTE, K_CLOSE, K_SYNC, K_QUERY, K_FUNC, K_PREFIX, K_COUNT };

/* Session slots. */
enum {
    S_PENDING, S_BATCH, S_BATCH_PARSED, S_PREPARED, S_PORTALS, S_SKIPPING, S_ROWS, S_LAST_KIND,
    S_LAST_REC, S_MAX_PENDING, S_MAX_MESSAGE_SIZE, S_CAPTURE_PARAMS, S_MESSAGES_IN, S_MESSAGES_OUT,
    S_COPY_IN_EXT, S_OUT_OF_SYNC, S_READY, S_TX_STATUS, S_COMPLETED, S_SHIFTED, S_INJECTOR,
    S_FLUSH_PHASES, S_CBUF, S_CSKIP, S_SBUF, S_SSKIP, S_INJECTED_PENDING, S_HELD_READY, S_PREV_PARSED,
    S_APPLICATION_NAME, S_COUNT
};
static const char *session_slots[S_COUNT] = {
    "_pending", "_batch", "_batch_parsed", "_prepared", "_portals", "_skipping", "_rows", "_last_kind",
    "_last_rec", "max_pending", "max_message_size", "capture_params", "messages_in", "messages_out",
    "_copy_in_ext", "out_of_sync", "ready", "tx_status", "completed", "_shifted", "injector",
    "flush_phases", "_cbuf", "_cskip", "_sbuf", "_sskip", "_injected_pending", "_held_ready", "_prev_parsed",
    "application_name",
};

/* Statement fields the codec writes, looked up by name in the layout configure() is given
 * (events.STATEMENT_LAYOUT, which defines every field, their order and defaults). */
enum {
    R_PROTOCOL, R_SQL, R_STATEMENT_NAME, R_PORTAL, R_START_NS, R_PARSE_START_NS, R_PARSE_END_NS,
    R_PARSE_EXACT, R_BIND_START_NS, R_BIND_END_NS, R_BIND_EXACT, R_EXEC_START_NS, R_END_NS,
    R_EXEC_EXACT, R_STATUS, R_TAG, R_ROWS, R_PARAMS, R_RESULTS, R_REUSED, R_TX_STATUS, R_APPLICATION_NAME,
    R_COUNT
};
static const char *record_slots[R_COUNT] = {
    "protocol", "sql", "statement_name", "portal", "start_ns", "parse_start_ns", "parse_end_ns",
    "parse_exact", "bind_start_ns", "bind_end_ns", "bind_exact", "exec_start_ns", "end_ns",
    "exec_exact", "status", "tag", "rows", "params", "results", "reused", "tx_status", "application_name",
};

enum { C_END_NS, C_TAG, C_ROWS, C_ERROR, C_COUNT };
static const char *completion_slots[C_COUNT] = {"end_ns", "tag", "rows", "error"};

/* Field kinds (events.py). */
enum { KIND_INT, KIND_BOOL, KIND_STR, KIND_VALUE, KIND_COMPLETIONS, KIND_COUNT };

/* One record class's layout as configure() was given it: per field its kind, default, data
 * descriptor (the class attribute, read and written through its public get / set slots by
 * pack() and unpack()) and, for the codec, its slot offset. */
typedef struct {
    Py_ssize_t count;
    int *kinds;
    PyObject **defaults;
    PyObject **descrs;
    Py_ssize_t *offs;
} layout;

static int configured = 0;
static Py_ssize_t s_off[S_COUNT], r_off[R_COUNT], c_off[C_COUNT];
static PyTypeObject *session_type, *record_type, *completion_type;
static layout rec_layout, comp_layout;
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

static void
layout_clear(layout *l)
{
    for (Py_ssize_t i = 0; i < l->count; i++) {
        Py_XDECREF(l->defaults[i]);
        Py_XDECREF(l->descrs[i]);
    }
    PyMem_Free(l->kinds);
    PyMem_Free(l->defaults);
    PyMem_Free(l->descrs);
    PyMem_Free(l->offs);
    memset(l, 0, sizeof *l);
}

/* Read a layout, ((name, kind, default), ...), of the record class type into l (0), or -1 (set);
 * the offsets of the fields named in wanted (want_count of them) go to wanted_offs. */
static int
layout_read(layout *l, PyTypeObject *type, PyObject *spec, const char **wanted, Py_ssize_t *wanted_offs,
            int want_count)
{
    Py_ssize_t n = PyTuple_GET_SIZE(spec);
    memset(l, 0, sizeof *l);
    l->kinds = PyMem_Calloc((size_t)n + 1, sizeof(int));
    l->defaults = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    l->descrs = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    l->offs = PyMem_Calloc((size_t)n + 1, sizeof(Py_ssize_t));
    if (l->kinds == NULL || l->defaults == NULL || l->descrs == NULL || l->offs == NULL) {
        layout_clear(l);
        PyErr_NoMemory();
        return -1;
    }
    l->count = n;
    for (int w = 0; w < want_count; w++)
        wanted_offs[w] = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(spec, i), *name;
        long kind;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 || !PyUnicode_Check(name = PyTuple_GET_ITEM(item, 0)) ||
            !PyLong_Check(PyTuple_GET_ITEM(item, 1)) || (kind = PyLong_AsLong(PyTuple_GET_ITEM(item, 1))) < 0 ||
            kind >= KIND_COUNT) {
            PyErr_SetString(PyExc_ValueError, "configure: a layout is ((name, kind, default), ...)");
            goto fail;
        }
        l->kinds[i] = (int)kind;
        l->defaults[i] = PyTuple_GET_ITEM(item, 2);
        Py_INCREF(l->defaults[i]);
        PyObject *descr = PyObject_GetAttr((PyObject *)type, name);
        if (descr == NULL)
            goto fail;
        l->descrs[i] = descr;
        if (Py_TYPE(descr)->tp_descr_get == NULL || Py_TYPE(descr)->tp_descr_set == NULL) {
            PyErr_Format(PyExc_TypeError, "configure: %s.%U is not a data descriptor", type->tp_name, name);
            goto fail;
        }
        const char *cname = PyUnicode_AsUTF8(name);
        if (cname == NULL || slot_offsets(type, &cname, &l->offs[i], 1) < 0)
            goto fail;
        for (int w = 0; w < want_count; w++)
            if (strcmp(cname, wanted[w]) == 0)
                wanted_offs[w] = l->offs[i];
    }
    for (int w = 0; w < want_count; w++) {
        if (wanted_offs[w] < 0) {
            PyErr_Format(PyExc_ValueError, "configure: the layout of %s has no field %s", type->tp_name, wanted[w]);
            goto fail;
        }
    }
    return 0;
fail:
    layout_clear(l);
    return -1;
}

/* configure(Session, Statement, Completion, statement_layout, completion_layout, kinds) */
static PyObject *
configure(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *st, *rt, *ct, *rspec, *cspec, *kinds;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!", &PyType_Type, &st, &PyType_Type, &rt, &PyType_Type, &ct,
                          &PyTuple_Type, &rspec, &PyTuple_Type, &cspec, &PyTuple_Type, &kinds))
        return NULL;
    if (PyTuple_GET_SIZE(kinds) != K_COUNT) {
        PyErr_SetString(PyExc_ValueError, "configure: request kinds are not 0..8 in order");
        return NULL;
    }
    for (int i = 0; i < K_COUNT; i++) {
        PyObject *k = PyTuple_GET_ITEM(kinds, i);
        if (!PyLong_Check(k) || PyLong_AsLong(k) != i) {
            PyErr_SetString(PyExc_ValueError, "configure: request kinds are not 0..8 in order");
            return NULL;
        }
    }
    /* Read into locals: a configure that fails leaves the working layout as it was. */
    Py_ssize_t so[S_COUNT], ro[R_COUNT], co[C_COUNT];
    layout rl, cl;
    if (slot_offsets((PyTypeObject *)st, session_slots, so, S_COUNT) < 0 ||
        layout_read(&rl, (PyTypeObject *)rt, rspec, record_slots, ro, R_COUNT) < 0)
        return NULL;
    if (layout_read(&cl, (PyTypeObject *)ct, cspec, completion_slots, co, C_COUNT) < 0) {
        layout_clear(&rl);
        return NULL;
    }
    memcpy(s_off, so, sizeof so);
    memcpy(r_off, ro, sizeof ro);
    memcpy(c_off, co, sizeof co);
    layout_clear(&rec_layout);
    rec_layout = rl;
    layout_clear(&comp_layout);
    comp_layout = cl;
    for (int i = 0; i < K_COUNT; i++) {
        PyObject *k = PyTuple_GET_ITEM(kinds, i);
        Py_INCREF(k);
        Py_XSETREF(kind_obj[i], k);
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

/* A record of type with every field of layout l at its default (new reference). */
static PyObject *
new_defaults(PyTypeObject *type, const layout *l)
{
    PyObject *rec = type->tp_alloc(type, 0);
    if (rec == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < l->count; i++) {
        PyObject *v = l->defaults[i];
        Py_INCREF(v);
        SLOT(rec, l->offs[i]) = v;
    }
    return rec;
}

/* A Statement with every field at its default, protocol and sql set (new reference). */
static PyObject *
new_record(PyObject *protocol, PyObject *sql)
{
    PyObject *rec = new_defaults(record_type, &rec_layout);
    if (rec == NULL)
        return NULL;
    set(rec, r_off[R_PROTOCOL], protocol);
    set(rec, r_off[R_SQL], sql);
    return rec;
}

static PyObject *
new_completion(PyObject *end_ns, PyObject *tag, PyObject *rows)
{
    PyObject *c = new_defaults(completion_type, &comp_layout);
    if (c == NULL)
        return NULL;
    set(c, c_off[C_END_NS], end_ns);
    set(c, c_off[C_TAG], tag);
    set(c, c_off[C_ROWS], rows);
    set(c, c_off[C_ERROR], Py_None);
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
        int first = 0; /* the first execution of a statement the batch just before parsed (Session._extended_rec) */
        if (parsed == NULL) {
            PyObject *prev_map = get(s, s_off[S_PREV_PARSED]);
            if (!PyDict_CheckExact(prev_map))
                goto done;
            if (PyDict_GET_SIZE(prev_map)) {
                PyObject *before = PyDict_GetItemWithError(prev_map, stmt); /* borrowed */
                if (before == NULL && PyErr_Occurred()) {
                    rc = -1;
                    goto done;
                }
                if (before != NULL) {
                    if (!is_rec(before))
                        goto done;
                    int bound = int_true(get(before, r_off[R_BIND_START_NS]));
                    if (bound < 0)
                        goto done;
                    PyObject *before_sql = get(before, r_off[R_SQL]);
                    int same = sql == NULL ? before_sql == Py_None
                                           : PyUnicode_CheckExact(before_sql) && PyUnicode_Compare(before_sql, sql) == 0;
                    if (PyErr_Occurred())
                        goto done_error;
                    first = !bound && same;
                    if (PyDict_DelItem(prev_map, stmt) < 0)
                        goto done_error;
                }
            }
        }
        rec = new_record(str_extended, sql ? sql : Py_None);
        if (rec == NULL) {
            rc = -1;
            goto done;
        }
        set(rec, r_off[R_STATEMENT_NAME], stmt);
        set(rec, r_off[R_START_NS], now);
        set(rec, r_off[R_REUSED], parsed == NULL && !first ? Py_True : Py_False);
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
done_error:
    rc = -1;
    goto done;
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
    /* What this batch parsed becomes _prev_parsed (Session._next_batch). */
    PyObject *bp = get(s, s_off[S_BATCH_PARSED]), *prev = get(s, s_off[S_PREV_PARSED]);
    if (PyDict_CheckExact(prev) && PyDict_GET_SIZE(prev))
        PyDict_Clear(prev);
    if (PyDict_CheckExact(bp) && PyDict_GET_SIZE(bp)) {
        if (PyDict_CheckExact(prev)) {
            SLOT(s, s_off[S_PREV_PARSED]) = bp;
            SLOT(s, s_off[S_BATCH_PARSED]) = prev;
        } else {
            PyDict_Clear(bp);
        }
    }
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
    PyObject *bp = get(s, s_off[S_BATCH_PARSED]), *prev = get(s, s_off[S_PREV_PARSED]);
    if (PyDict_CheckExact(bp))
        PyDict_Clear(bp);
    if (PyDict_CheckExact(prev) && PyDict_GET_SIZE(prev))
        PyDict_Clear(prev);
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
        if (typ == FE_COPY_DATA) {
            r = 1; /* CopyData: relayed, nothing to account */
        } else {
            if (get(s, s_off[S_SKIPPING]) != Py_False || get(s, s_off[S_COPY_IN_EXT]) != Py_False)
                break;
            if (typ != FE_FLUSH) {
                Py_ssize_t queued = PyObject_Size(get(s, s_off[S_PENDING]));
                if (queued < 0) {
                    err = 1;
                    break;
                }
                if (queued >= max_pending)
                    break;
            }
            switch (typ) {
            case FE_BIND: r = client_bind(s, p, start, end, now); break;
            case FE_EXECUTE: r = client_execute(s, p, start, end, now); break;
            case FE_SYNC: r = client_sync(s); break;
            case FE_PARSE: r = client_parse(s, p, start, end, now); break;
            case FE_DESCRIBE: r = queue(s, K_DESCRIBE, Py_None) < 0 ? -1 : 1; break;
            case FE_FLUSH: mark_flushed(s); r = 1; break;
            case FE_QUERY: r = client_query(s, p, start, end, now); break;
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
        PyObject *app = get(s, s_off[S_APPLICATION_NAME]);
        for (Py_ssize_t i = 0; i < m; i++) {
            set(items[i], r_off[R_TX_STATUS], tx);
            set(items[i], r_off[R_APPLICATION_NAME], app);
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
        if (typ == BE_DATA_ROW || typ == BE_COPY_DATA) {
            /* DataRow is counted, CopyData relayed; neither counts as a message here (as in Python). */
            if (typ == BE_DATA_ROW)
                rows++;
            pos = end;
            continue;
        }
        switch (typ) {
        case BE_PARSE_COMPLETE:
        case BE_BIND_COMPLETE:
        case BE_CLOSE_COMPLETE:
            f = front_of(pending, typ == BE_PARSE_COMPLETE ? K_PARSE : typ == BE_BIND_COMPLETE ? K_BIND : K_CLOSE);
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
            if (typ != BE_CLOSE_COMPLETE && rec != Py_None)
                set(rec, r_off[typ == BE_PARSE_COMPLETE ? R_PARSE_END_NS : R_BIND_END_NS], now);
            Py_DECREF(rec);
            r = 1;
            break;
        case BE_ROW_DESCRIPTION:
        case BE_NO_DATA:
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
        case BE_COMMAND_COMPLETE: {
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
        case BE_READY_FOR_QUERY:
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
 * pack(records) -> bytes
 *     The finished records of one connection in the compact form the span
 *     process takes them in (tracing/process.py).
 * unpack(data) -> list
 *     The records again, every field equal to the packed one.
 *
 * The form is defined in protocol/records.py, which implements it in Python;
 * tests hold both byte-equal. The fields and their kinds come from the
 * layouts configure() was given; fields are read and written through the
 * classes' descriptors (public get / set slots), not by offset.
 */

#define P_VERSION 1
#define P_NONE 0xFFFFFFFFu
#define P_REF 0xFFFFFFFEu /* then u32 k: the k-th string of at least P_REF_MIN bytes written in full */
#define P_REF_MIN 8
#define P_REF_SLOTS 64
#define P_MAX_DEPTH 32
enum { V_NONE, V_FALSE, V_TRUE, V_INT, V_STR, V_FLOAT, V_BYTES, V_LIST, V_TUPLE, V_DICT, V_BIGINT };

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
w_u8(wbuf *w, int v)
{
    if (w_reserve(w, 1) < 0)
        return -1;
    w->buf[w->len++] = (unsigned char)v;
    return 0;
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

static int
w_u64(wbuf *w, unsigned long long v)
{
    if (w_reserve(w, 8) < 0)
        return -1;
    put_le(w->buf + w->len, v, 8);
    w->len += 8;
    return 0;
}

static int
w_bytes(wbuf *w, const char *s, Py_ssize_t n)
{
    if (w_u32(w, (unsigned long)n) < 0 || w_reserve(w, n) < 0)
        return -1;
    memcpy(w->buf + w->len, s, (size_t)n);
    w->len += n;
    return 0;
}

/* An INT field: an exact int in the i64 range. */
static int
w_int(wbuf *w, PyObject *v)
{
    if (!PyLong_CheckExact(v)) {
        PyErr_SetString(PyExc_TypeError, "pack: an int field that is not an int");
        return -1;
    }
    long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    return w_u64(w, (unsigned long long)x);
}

/* A STR field: a str or None. */
static int
w_str(wbuf *w, PyObject *v)
{
    if (v == Py_None)
        return w_u32(w, P_NONE);
    if (!PyUnicode_CheckExact(v)) {
        PyErr_SetString(PyExc_TypeError, "pack: a str field that is not a str");
        return -1;
    }
    PyObject *encoded = NULL;
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(v, &n);
    if (s == NULL) { /* lone surrogates: passed through */
        PyErr_Clear();
        if ((encoded = PyUnicode_AsEncodedString(v, "utf-8", "surrogatepass")) == NULL)
            return -1;
        s = PyBytes_AS_STRING(encoded);
        n = PyBytes_GET_SIZE(encoded);
    }
    int r = 0;
    if (n >= (Py_ssize_t)P_REF) {
        PyErr_SetString(PyExc_OverflowError, "pack: a string of 4 GiB or more");
        r = -1;
    } else if (n >= P_REF_MIN && w->refs[((size_t)v >> 4) % P_REF_SLOTS].obj == v) {
        size_t slot = ((size_t)v >> 4) % P_REF_SLOTS;
        r = w_u32(w, P_REF) < 0 || w_u32(w, w->refs[slot].k) < 0 ? -1 : 0;
    } else {
        if (n >= P_REF_MIN) {
            size_t slot = ((size_t)v >> 4) % P_REF_SLOTS;
            w->refs[slot].obj = v;
            w->refs[slot].k = w->written++;
        }
        r = w_bytes(w, s, n);
    }
    Py_XDECREF(encoded);
    return r;
}

static int
w_value(wbuf *w, PyObject *v, int depth)
{
    if (depth > P_MAX_DEPTH) {
        PyErr_SetString(PyExc_ValueError, "pack: values nested too deep");
        return -1;
    }
    if (v == Py_None)
        return w_u8(w, V_NONE);
    if (v == Py_False)
        return w_u8(w, V_FALSE);
    if (v == Py_True)
        return w_u8(w, V_TRUE);
    if (PyLong_CheckExact(v)) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (!overflow)
            return w_u8(w, V_INT) < 0 ? -1 : w_u64(w, (unsigned long long)x);
        /* its digits, a temporary object: never remembered for a reference */
        PyObject *digits = PyObject_Str(v);
        if (digits == NULL)
            return -1;
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(digits, &n);
        int r = s == NULL || w_u8(w, V_BIGINT) < 0 || w_bytes(w, s, n) < 0 ? -1 : 0;
        Py_DECREF(digits);
        return r;
    }
    if (PyUnicode_CheckExact(v))
        return w_u8(w, V_STR) < 0 ? -1 : w_str(w, v);
    if (PyFloat_CheckExact(v)) {
        double d = PyFloat_AS_DOUBLE(v);
        unsigned long long bits;
        memcpy(&bits, &d, sizeof bits);
        return w_u8(w, V_FLOAT) < 0 ? -1 : w_u64(w, bits);
    }
    if (PyBytes_CheckExact(v))
        return w_u8(w, V_BYTES) < 0 ? -1 : w_bytes(w, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
    if (PyList_CheckExact(v) || PyTuple_CheckExact(v)) {
        int list = PyList_CheckExact(v);
        Py_ssize_t n = list ? PyList_GET_SIZE(v) : PyTuple_GET_SIZE(v);
        if (w_u8(w, list ? V_LIST : V_TUPLE) < 0 || w_u32(w, (unsigned long)n) < 0)
            return -1;
        /* a list may change size under a nested call only through Python code, which none runs */
        for (Py_ssize_t i = 0; i < n; i++)
            if (w_value(w, list ? PyList_GET_ITEM(v, i) : PyTuple_GET_ITEM(v, i), depth + 1) < 0)
                return -1;
        return 0;
    }
    if (PyDict_CheckExact(v)) {
        if (w_u8(w, V_DICT) < 0 || w_u32(w, (unsigned long)PyDict_GET_SIZE(v)) < 0)
            return -1;
        Py_ssize_t pos = 0;
        PyObject *key, *item;
        while (PyDict_Next(v, &pos, &key, &item))
            if (w_value(w, key, depth + 1) < 0 || w_value(w, item, depth + 1) < 0)
                return -1;
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "pack: a value of type %s", Py_TYPE(v)->tp_name);
    return -1;
}

/* A field's value through its descriptor, borrowed: the record keeps it alive while pack runs. */
static PyObject *
field_of(PyObject *rec, PyObject *descr)
{
    PyObject *v = Py_TYPE(descr)->tp_descr_get(descr, rec, (PyObject *)Py_TYPE(rec));
    Py_XDECREF(v);
    return v;
}

static int
pack_one(wbuf *w, PyObject *rec, PyTypeObject *type, const layout *l)
{
    if (!PyObject_TypeCheck(rec, type)) {
        PyErr_Format(PyExc_TypeError, "pack: %s is not a %s", Py_TYPE(rec)->tp_name, type->tp_name);
        return -1;
    }
    for (Py_ssize_t i = 0; i < l->count; i++) {
        PyObject *v = field_of(rec, l->descrs[i]);
        if (v == NULL)
            return -1;
        int r;
        switch (l->kinds[i]) {
        case KIND_INT:
            r = w_int(w, v);
            break;
        case KIND_BOOL:
            if (v != Py_True && v != Py_False) {
                PyErr_SetString(PyExc_TypeError, "pack: a bool field that is not a bool");
                return -1;
            }
            r = w_u8(w, v == Py_True);
            break;
        case KIND_STR:
            r = w_str(w, v);
            break;
        case KIND_VALUE:
            r = w_value(w, v, 0);
            break;
        default: /* KIND_COMPLETIONS */
            if (v == Py_None) {
                r = w_u32(w, P_NONE);
                break;
            }
            if (!PyList_CheckExact(v)) {
                PyErr_SetString(PyExc_TypeError, "pack: a completions field that is not a list");
                return -1;
            }
            r = w_u32(w, (unsigned long)PyList_GET_SIZE(v));
            for (Py_ssize_t j = 0; r == 0 && j < PyList_GET_SIZE(v); j++)
                r = pack_one(w, PyList_GET_ITEM(v, j), completion_type, &comp_layout);
        }
        if (r < 0)
            return -1;
    }
    return 0;
}

static PyObject *
pack(PyObject *self, PyObject *records)
{
    (void)self;
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "_core is not configured");
        return NULL;
    }
    if (!PyList_Check(records)) {
        PyErr_SetString(PyExc_TypeError, "pack takes a list of records");
        return NULL;
    }
    wbuf w;
    memset(&w, 0, sizeof w);
    Py_ssize_t n = PyList_GET_SIZE(records);
    PyObject *res = NULL;
    /* room for records of the usual size at once (no growing copies on the way) */
    if (w_reserve(&w, 5 + n * 256) < 0 || w_u8(&w, P_VERSION) < 0 || w_u32(&w, (unsigned long)n) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++)
        if (pack_one(&w, PyList_GET_ITEM(records, i), record_type, &rec_layout) < 0)
            goto done;
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
    if (k < 0 || r->n - r->pos < k) {
        PyErr_SetString(PyExc_ValueError, "unpack: truncated record data");
        return -1;
    }
    return 0;
}

static int
r_u8(rbuf *r, int *v)
{
    if (r_need(r, 1) < 0)
        return -1;
    *v = r->p[r->pos++];
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

static int
r_u64(rbuf *r, unsigned long long *v)
{
    if (r_need(r, 8) < 0)
        return -1;
    unsigned long long u = 0;
    for (int i = 0; i < 8; i++)
        u |= (unsigned long long)r->p[r->pos++] << (8 * i);
    *v = u;
    return 0;
}

static PyObject *
r_i64(rbuf *r)
{
    unsigned long long u;
    return r_u64(r, &u) < 0 ? NULL : PyLong_FromLongLong((long long)u);
}

/* A count of items that each take at least one byte. */
static int
r_count(rbuf *r, unsigned long *n)
{
    if (r_u32(r, n) < 0)
        return -1;
    if (*n != P_NONE && (Py_ssize_t)*n > r->n - r->pos) {
        PyErr_SetString(PyExc_ValueError, "unpack: truncated record data");
        return -1;
    }
    return 0;
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
                         str_tx[0], str_tx[1], str_tx[2], str_simple, str_extended, str_function};
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
    if (v == NULL) {
        v = PyUnicode_DecodeUTF8(s, (Py_ssize_t)len, "surrogatepass");
        if (v == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                return NULL;
            PyErr_SetString(PyExc_ValueError, "unpack: a string that is not UTF-8");
            return NULL;
        }
    }
    if (len >= P_REF_MIN && PyList_Append(r->written, v) < 0) /* as pack counts them */
        Py_CLEAR(v);
    return v;
}

static PyObject *
r_value(rbuf *r, int depth)
{
    if (depth > P_MAX_DEPTH) {
        PyErr_SetString(PyExc_ValueError, "unpack: values nested too deep");
        return NULL;
    }
    int tag;
    unsigned long n;
    unsigned long long u;
    if (r_u8(r, &tag) < 0)
        return NULL;
    switch (tag) {
    case V_NONE:
        Py_RETURN_NONE;
    case V_FALSE:
        Py_RETURN_FALSE;
    case V_TRUE:
        Py_RETURN_TRUE;
    case V_INT:
        return r_i64(r);
    case V_STR: {
        PyObject *v = r_str(r);
        if (v == Py_None) {
            Py_DECREF(v);
            PyErr_SetString(PyExc_ValueError, "unpack: a str value that is None");
            return NULL;
        }
        return v;
    }
    case V_FLOAT: {
        if (r_u64(r, &u) < 0)
            return NULL;
        double d;
        memcpy(&d, &u, sizeof d);
        return PyFloat_FromDouble(d);
    }
    case V_BYTES:
        if (r_u32(r, &n) < 0 || r_need(r, (Py_ssize_t)n) < 0)
            return NULL;
        r->pos += (Py_ssize_t)n;
        return PyBytes_FromStringAndSize((const char *)r->p + r->pos - n, (Py_ssize_t)n);
    case V_LIST:
    case V_TUPLE: {
        if (r_count(r, &n) < 0)
            return NULL;
        if (n == P_NONE) {
            PyErr_SetString(PyExc_ValueError, "unpack: truncated record data");
            return NULL;
        }
        PyObject *seq = tag == V_LIST ? PyList_New((Py_ssize_t)n) : PyTuple_New((Py_ssize_t)n);
        if (seq == NULL)
            return NULL;
        for (unsigned long i = 0; i < n; i++) {
            PyObject *item = r_value(r, depth + 1);
            if (item == NULL) {
                Py_DECREF(seq);
                return NULL;
            }
            if (tag == V_LIST)
                PyList_SET_ITEM(seq, (Py_ssize_t)i, item);
            else
                PyTuple_SET_ITEM(seq, (Py_ssize_t)i, item);
        }
        return seq;
    }
    case V_DICT: {
        if (r_count(r, &n) < 0)
            return NULL;
        if (n == P_NONE) {
            PyErr_SetString(PyExc_ValueError, "unpack: truncated record data");
            return NULL;
        }
        PyObject *d = PyDict_New();
        if (d == NULL)
            return NULL;
        for (unsigned long i = 0; i < n; i++) {
            PyObject *key = r_value(r, depth + 1), *item = key ? r_value(r, depth + 1) : NULL;
            int rc = item ? PyDict_SetItem(d, key, item) : -1;
            Py_XDECREF(key);
            Py_XDECREF(item);
            if (rc < 0) {
                if (PyErr_ExceptionMatches(PyExc_TypeError))
                    PyErr_SetString(PyExc_ValueError, "unpack: a dict key that is not hashable");
                Py_DECREF(d);
                return NULL;
            }
        }
        return d;
    }
    case V_BIGINT: {
        if (r_u32(r, &n) < 0 || r_need(r, (Py_ssize_t)n) < 0)
            return NULL;
        PyObject *digits = PyUnicode_DecodeASCII((const char *)r->p + r->pos, (Py_ssize_t)n, NULL);
        r->pos += (Py_ssize_t)n;
        if (digits == NULL) {
            PyErr_SetString(PyExc_ValueError, "unpack: a big int that is not digits");
            return NULL;
        }
        PyObject *v = PyLong_FromUnicodeObject(digits, 10);
        Py_DECREF(digits);
        if (v == NULL && PyErr_ExceptionMatches(PyExc_ValueError))
            PyErr_SetString(PyExc_ValueError, "unpack: a big int that is not digits");
        return v;
    }
    default:
        PyErr_Format(PyExc_ValueError, "unpack: unknown value tag %d", tag);
        return NULL;
    }
}

/* A field set through its descriptor, the reference to v stolen. */
static int
set_field(PyObject *rec, PyObject *descr, PyObject *v)
{
    int r = Py_TYPE(descr)->tp_descr_set(descr, rec, v);
    Py_DECREF(v);
    return r;
}

static PyObject *
unpack_one(rbuf *r, PyTypeObject *type, const layout *l)
{
    PyObject *rec = type->tp_alloc(type, 0);
    if (rec == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < l->count; i++) {
        PyObject *v = NULL;
        int b;
        unsigned long n;
        switch (l->kinds[i]) {
        case KIND_INT:
            v = r_i64(r);
            break;
        case KIND_BOOL:
            if (r_u8(r, &b) < 0)
                break;
            if (b > 1)
                PyErr_SetString(PyExc_ValueError, "unpack: bad bool");
            else
                v = b ? Py_True : Py_False, Py_INCREF(v);
            break;
        case KIND_STR:
            v = r_str(r);
            break;
        case KIND_VALUE:
            v = r_value(r, 0);
            break;
        default: /* KIND_COMPLETIONS */
            if (r_count(r, &n) < 0)
                break;
            if (n == P_NONE) {
                v = Py_None;
                Py_INCREF(v);
                break;
            }
            if ((v = PyList_New((Py_ssize_t)n)) == NULL)
                break;
            for (unsigned long j = 0; j < n; j++) {
                PyObject *c = unpack_one(r, completion_type, &comp_layout);
                if (c == NULL) {
                    Py_CLEAR(v);
                    break;
                }
                PyList_SET_ITEM(v, (Py_ssize_t)j, c);
            }
        }
        if (v == NULL || set_field(rec, l->descrs[i], v) < 0) {
            Py_DECREF(rec);
            return NULL;
        }
    }
    return rec;
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
    int version;
    unsigned long n;
    if (r_u8(&r, &version) < 0)
        goto done;
    if (version != P_VERSION) {
        PyErr_Format(PyExc_ValueError, "unpack: format version %d, not %d", version, P_VERSION);
        goto done;
    }
    if (r_count(&r, &n) < 0)
        goto done;
    if (n == P_NONE) {
        PyErr_SetString(PyExc_ValueError, "unpack: truncated record data");
        goto done;
    }
    list = PyList_New((Py_ssize_t)n);
    if (list == NULL)
        goto done;
    for (unsigned long i = 0; i < n; i++) {
        PyObject *rec = unpack_one(&r, record_type, &rec_layout);
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

/* ------------------------------------------------------------------ the pump's log
 *
 * observe_log(log, pumped, resume) -> dict
 *     Feed what the compiled pump relayed for traced sessions (its log,
 *     proxy/_pump.c, laid out in _pumplog.h) to the sessions of
 *     the connections in ``pumped`` (pair id -> connection), in order, as
 *     ClientConnection.pump_observe does: a LOG_CLIENT or LOG_SERVER chunk of
 *     the common kind goes through client_loop / server_loop without a Python
 *     frame. Any other record goes to resume(conn, kind, log, at, stop, ts),
 *     nothing done from ``at`` on: where the loop stopped, the chunk's start
 *     when the session holds bytes or is out of step, or the exception the loop
 *     raised; LOG_HANDBACK (the pump handed the pair back) always. Records of pairs
 *     not in ``pumped`` are skipped. Returns the connections fed (pair id ->
 *     connection) for the caller to hand their finished statements on; a
 *     pair handed back is left out (pump_back does that itself).
 */

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
    if (kind == LOG_CLIENT || kind == LOG_SERVER) {
        if (check_session(s) < 0)
            PyErr_Clear(); /* not a Session of this layout: Python does it */
        else if (kind == LOG_CLIENT)
            fast = is_empty_bytes(get(s, s_off[S_CBUF])) && is_zero(get(s, s_off[S_CSKIP]));
        else
            fast = get(s, s_off[S_OUT_OF_SYNC]) == Py_None && is_empty_bytes(get(s, s_off[S_SBUF])) &&
                   is_zero(get(s, s_off[S_SSKIP]));
    }
    Py_ssize_t at = start;
    PyObject *at_obj = NULL;
    if (fast) {
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(log);
        at = kind == LOG_CLIENT ? client_loop(s, p, start, stop, ts) : server_loop(s, p, start, stop, ts);
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
            if (kind == LOG_HANDBACK) {
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
     "configure(Session, Statement, Completion, statement_layout, completion_layout, kinds): take the layouts."},
    {"client", (PyCFunction)(void (*)(void))client, METH_FASTCALL,
     "client(session, data, pos, n, now) -> pos: account the client messages this path handles."},
    {"server", (PyCFunction)(void (*)(void))server, METH_FASTCALL,
     "server(session, data, pos, n, now) -> pos: account the server messages this path handles."},
    {"observe_log", (PyCFunction)(void (*)(void))observe_log, METH_FASTCALL,
     "observe_log(log, pumped, resume) -> dict: feed the pump's log to the pumped sessions (see _core.c)."},
    {"pack", pack, METH_O, "pack(records) -> bytes: finished records in the compact form (protocol/records.py)."},
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
    if (PyType_Ready(&FeedType) < 0)
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
    return m;
}
