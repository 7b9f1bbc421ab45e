/*
 * Compiled half of the OTLP span encoder (pgotel_proxy/tracing/otlp.py).
 * Optional: otlp.py has the same two functions in Python and uses them when
 * this module was not built; tests compare both byte for byte.
 *
 * span_field(trace_id, span_id, parent_id, trace_state, name_field, kind,
 *            start, end, flags, attrs, status, rare) -> bytes
 *     One span as an encoded ScopeSpans.spans field. trace_id, span_id: int;
 *     parent_id: int or None; trace_state: bytes (b"" for none); name_field:
 *     the encoded name field; kind: 0..127; start, end: int nanoseconds;
 *     flags: the 32-bit span flags; attrs, status, rare: encoded fields
 *     (b"" for none), appended in that order.
 *
 * local_children(out, head, trace_id, parent_id, trace_state, flags, parts, span_id, start, end, ...)
 *     span_field for each group of four, as local children of parent_id,
 *     appended to the list out as head + (field,).
 *
 * configure(Statement, Completion, statement_layout, completion_layout, first_row_field)
 *     The record classes and their layouts (events.py); statement_spans and kept_run read the
 *     fields they need through the classes' descriptors. first_row_field: the encoded
 *     Span.attributes field of the first row's offset (spans.py) with the value 0.0, a double
 *     in its last 8 bytes: the span holding execute of a record with a first row's time gets
 *     it after its pre-encoded attributes, with the offset in ms from the span's start.
 *
 * statement_spans(out, head, parts, phase_parts, rec, trace_id, parent_id, trace_state,
 *                 parent_flags, child_flags, getrandbits)
 *     An extended-protocol statement of a kept shape: its span (parts, a remote
 *     parent) and its parse / plan / execute children, appended to out as
 *     head + (field,), span ids drawn by getrandbits(64) in the order the
 *     Python builder draws them. phase_parts: eight entries indexed by a mask
 *     of the phases a span holds (parse 1, plan 2, execute 4), each an
 *     (inexact, exact) pair of parts; entry 0 unused. The phase rule is
 *     group_phases (phase_groups below).
 *
 * simple_spans(out, head, parts, exec_parts, trace_id, parent_id, trace_state, parent_flags, child_flags,
 *              getrandbits, start, end, first_row)
 *     The same for a kept simple-protocol statement: its span from start to
 *     end and its exact execute child (SpanBuilder._kept_simple), with the
 *     first row's offset when first_row (ns) is not 0.
 *
 * phase_groups(rec) -> [(mask, exact, start, end), ...]
 *     The phase spans of an extended statement: the rule statement_spans and kept_run apply, for
 *     the span builder's other steps (spans._phase_groups).
 *
 * kept_run(out, head, records, i, stop, shapes, app, phase_parts, exec_parts, parent_flags, child_flags,
 *          getrandbits, random, rate, statement_key, opts, keep_slow_ns, carrier, app_key[, marks])
 *          -> (next, parsed, error)
 *     SpanBuilder.kept: the spans of records[i:stop] whose shapes the connection keeps (shapes), one
 *     record after the other, up to the first one the Python steps must see; next is its index,
 *     new roots drawn with random() < rate when the rate is below 1 (random None: such a record is
 *     Python's),
 *     parsed the comments counted as parsed, error the exception that record raised (its spans
 *     are not in out) or None. head None appends each span's field alone (SpanBuilder.bare).
 *     app: the connection's application_name as a key of kept shapes (app_key(name), spans.app_key),
 *     for records that carry none of their own; app_key makes the key of a record's own.
 *     A record with a client's wait (client_wait_ns, rare) is Python's, and so is one the keep
 *     rule keeps when it is not sampled: its wire interval at least keep_slow_ns (not 0; a failed
 *     statement is Python's anyway).
 *     carrier: the connection's session carrier, the context of statements without one of their
 *     own, as (trace_id, span_id, sampled, trace_state_field); None where there is none.
 *     marks, a list when given: len(out) before each record done is appended to it (where its
 *     spans start; a record not sampled has none).
 *
 * attribute_fields(attributes, cache, encode_one, cache_max, field_max) -> bytes
 *     A dict's items as encoded Span.attributes fields. Values of type str,
 *     bool or int are looked up in ``cache`` by (key, type, value); misses
 *     call encode_one(key, value) -> bytes or None (None: skipped), and are
 *     kept when at most field_max bytes long (the cache is cleared when it
 *     holds cache_max entries).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include "../_cutil.h" /* take_exception */

static Py_ssize_t
varint_len(unsigned long long v)
{
    Py_ssize_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static unsigned char *
put_varint(unsigned char *p, unsigned long long v)
{
    while (v >= 0x80) {
        *p++ = (unsigned char)((v & 0x7F) | 0x80);
        v >>= 7;
    }
    *p++ = (unsigned char)v;
    return p;
}

static unsigned char *
put_le64(unsigned char *p, unsigned long long v)
{
    for (int i = 0; i < 8; i++) {
        *p++ = (unsigned char)(v & 0xFF);
        v >>= 8;
    }
    return p;
}

static int
as_bytes(PyObject *o, const char *name, char **buf, Py_ssize_t *len)
{
    if (!PyBytes_Check(o)) {
        PyErr_Format(PyExc_TypeError, "span_field: %s must be bytes", name);
        return -1;
    }
    *buf = PyBytes_AS_STRING(o);
    *len = PyBytes_GET_SIZE(o);
    return 0;
}

/* Made once by the module's init. */
static PyObject *py_64 = NULL, *py_128 = NULL, *s_ok = NULL, *s_extended = NULL, *s_simple = NULL;

static void
put_u64_be(unsigned char *out, unsigned long long v)
{
    for (int i = 7; i >= 0; i--) {
        out[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

/* An int from 0 to 2**64 - 1 as a C integer; (unsigned long long)-1 with OverflowError set otherwise.
 * Where unsigned long is 64 bits (LP64), PyLong_AsUnsignedLong: it reads the digits in a loop,
 * where PyLong_AsUnsignedLongLong goes through a byte array (several times the instructions,
 * and every id and time is a multi-digit int). */
static unsigned long long
as_u64(PyObject *o)
{
#if ULONG_MAX >= 0xFFFFFFFFFFFFFFFFULL
    return PyLong_AsUnsignedLong(o);
#else
    return PyLong_AsUnsignedLongLong(o);
#endif
}

static int
id_bytes(PyObject *o, unsigned char *out, size_t n)
{
    /* big-endian, exactly n (8 or 16) bytes; OverflowError when negative or too large.
       Public API only: a 16-byte id is its two 64-bit halves. */
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "span_field: ids must be int");
        return -1;
    }
    if (n == 8) {
        unsigned long long v = as_u64(o);
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        put_u64_be(out, v);
        return 0;
    }
    PyObject *high = PyNumber_Rshift(o, py_64);
    if (high == NULL)
        return -1;
    unsigned long long hi = as_u64(high);  /* negative or too large: OverflowError */
    Py_DECREF(high);
    if (hi == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    unsigned long long lo = PyLong_AsUnsignedLongLongMask(o);
    if (lo == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    put_u64_be(out, hi);
    put_u64_be(out + 8, lo);
    return 0;
}

/* A nanosecond time (an int from 0 to 2**64 - 1); -1 with an exception otherwise. */
static int
ns_of(PyObject *v, unsigned long long *out)
{
    *out = as_u64(v);
    return *out == (unsigned long long)-1 && PyErr_Occurred() ? -1 : 0;
}

/* One span as an encoded ScopeSpans.spans field; parent_id NULL for none. */
static PyObject *
build_field(const unsigned char *trace_id, const unsigned char *span_id, const unsigned char *parent_id,
            const char *ts, Py_ssize_t ts_len, const char *name, Py_ssize_t name_len, long kind,
            unsigned long long start, unsigned long long end, unsigned long flags,
            const char *attrs, Py_ssize_t attrs_len, const char *status, Py_ssize_t status_len,
            const char *rare, Py_ssize_t rare_len)
{
    int has_parent = parent_id != NULL;
    Py_ssize_t body = 18 + 10;                                   /* trace id, span id */
    if (ts_len)
        body += 1 + varint_len((unsigned long long)ts_len) + ts_len;
    if (has_parent)
        body += 10;
    body += name_len + 2 + 9 + 9 + 6 + attrs_len + status_len + rare_len;
    Py_ssize_t total = 1 + varint_len((unsigned long long)body) + body;

    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    *p++ = 0x12; /* ScopeSpans.spans */
    p = put_varint(p, (unsigned long long)body);
    *p++ = 0x0a; *p++ = 0x10; memcpy(p, trace_id, 16); p += 16;
    *p++ = 0x12; *p++ = 0x08; memcpy(p, span_id, 8); p += 8;
    if (ts_len) {
        *p++ = 0x1a;
        p = put_varint(p, (unsigned long long)ts_len);
        memcpy(p, ts, ts_len);
        p += ts_len;
    }
    if (has_parent) {
        *p++ = 0x22; *p++ = 0x08; memcpy(p, parent_id, 8); p += 8;
    }
    memcpy(p, name, name_len); p += name_len;
    *p++ = 0x30; *p++ = (unsigned char)kind;
    *p++ = 0x39; p = put_le64(p, start);
    *p++ = 0x41; p = put_le64(p, end);
    *p++ = 0x85; *p++ = 0x01;
    for (int i = 0; i < 4; i++)
        *p++ = (unsigned char)((flags >> (8 * i)) & 0xFF);
    memcpy(p, attrs, attrs_len); p += attrs_len;
    memcpy(p, status, status_len); p += status_len;
    memcpy(p, rare, rare_len); p += rare_len;
    return out;
}

static PyObject *
span_field(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "span_field takes 12 arguments");
        return NULL;
    }
    unsigned char trace_id[16], span_id[8], parent_id[8];
    int has_parent = args[2] != Py_None;
    if (id_bytes(args[0], trace_id, 16) < 0 || id_bytes(args[1], span_id, 8) < 0)
        return NULL;
    if (has_parent && id_bytes(args[2], parent_id, 8) < 0)
        return NULL;
    char *ts, *name, *attrs, *status, *rare;
    Py_ssize_t ts_len, name_len, attrs_len, status_len, rare_len;
    if (as_bytes(args[3], "trace_state", &ts, &ts_len) < 0 || as_bytes(args[4], "name_field", &name, &name_len) < 0 ||
        as_bytes(args[9], "attrs", &attrs, &attrs_len) < 0 || as_bytes(args[10], "status", &status, &status_len) < 0 ||
        as_bytes(args[11], "rare", &rare, &rare_len) < 0)
        return NULL;
    long kind = PyLong_AsLong(args[5]);
    unsigned long long start, end;
    if (ns_of(args[6], &start) < 0 || ns_of(args[7], &end) < 0)
        return NULL;
    unsigned long flags = PyLong_AsUnsignedLong(args[8]);
    if (PyErr_Occurred())
        return NULL;
    if (kind < 0 || kind > 127 || flags > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_ValueError, "span_field: kind or flags out of range");
        return NULL;
    }

    return build_field(trace_id, span_id, has_parent ? parent_id : NULL, ts, ts_len, name, name_len, kind, start, end,
                       flags, attrs, attrs_len, status, status_len, rare, rare_len);
}

static PyObject *
attribute_fields(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "attribute_fields takes 5 arguments");
        return NULL;
    }
    PyObject *attributes = args[0], *cache = args[1], *encode_one = args[2];
    Py_ssize_t cache_max = PyLong_AsSsize_t(args[3]);
    Py_ssize_t field_max = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyDict_Check(attributes) || !PyDict_Check(cache)) {
        PyErr_SetString(PyExc_TypeError, "attribute_fields: attributes and cache must be dicts");
        return NULL;
    }
    PyObject *parts = PyList_New(0);
    if (parts == NULL)
        return NULL;
    PyObject *key, *value;
    Py_ssize_t i = 0;
    while (PyDict_Next(attributes, &i, &key, &value)) {
        PyTypeObject *t = Py_TYPE(value);
        PyObject *ck = NULL, *field = NULL;
        if (t == &PyUnicode_Type || t == &PyBool_Type || t == &PyLong_Type) {
            ck = PyTuple_Pack(3, key, (PyObject *)t, value);
            if (ck == NULL)
                goto fail;
            field = PyDict_GetItemWithError(cache, ck); /* borrowed */
            if (field == NULL && PyErr_Occurred()) {
                Py_DECREF(ck);
                goto fail;
            }
            Py_XINCREF(field);
        }
        if (field == NULL) {
            field = PyObject_CallFunctionObjArgs(encode_one, key, value, NULL);
            if (field == NULL) {
                Py_XDECREF(ck);
                goto fail;
            }
            if (field == Py_None) {
                Py_DECREF(field);
                Py_XDECREF(ck);
                continue;
            }
            if (!PyBytes_Check(field)) {
                Py_DECREF(field);
                Py_XDECREF(ck);
                PyErr_SetString(PyExc_TypeError, "attribute_fields: encode_one must return bytes or None");
                goto fail;
            }
            if (ck != NULL && PyBytes_GET_SIZE(field) <= field_max) {
                if (PyDict_GET_SIZE(cache) >= cache_max)
                    PyDict_Clear(cache);
                if (PyDict_SetItem(cache, ck, field) < 0) {
                    Py_DECREF(field);
                    Py_DECREF(ck);
                    goto fail;
                }
            }
        }
        Py_XDECREF(ck);
        if (PyList_Append(parts, field) < 0) {
            Py_DECREF(field);
            goto fail;
        }
        Py_DECREF(field);
    }
    Py_ssize_t total = 0, count = PyList_GET_SIZE(parts);
    for (Py_ssize_t j = 0; j < count; j++)
        total += PyBytes_GET_SIZE(PyList_GET_ITEM(parts, j));
    PyObject *joined = PyBytes_FromStringAndSize(NULL, total);
    if (joined == NULL)
        goto fail;
    char *q = PyBytes_AS_STRING(joined);
    for (Py_ssize_t j = 0; j < count; j++) {
        PyObject *b = PyList_GET_ITEM(parts, j);
        memcpy(q, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
        q += PyBytes_GET_SIZE(b);
    }
    Py_DECREF(parts);
    return joined;
fail:
    Py_DECREF(parts);
    return NULL;
}

/* Append a span's field (stolen; NULL: an error already set) to out: as head + (field,), or alone
 * when head is None (the exporter knows the head: SpanBuilder.bare). */
static int
append_field(PyObject *out, PyObject *head, PyObject *field)
{
    if (field == NULL)
        return -1;
    PyObject *item = field;
    if (head != Py_None) {
        item = PyTuple_Pack(3, PyTuple_GET_ITEM(head, 0), PyTuple_GET_ITEM(head, 1), field);
        Py_DECREF(field);
        if (item == NULL)
            return -1;
    }
    int r = PyList_Append(out, item);
    Py_DECREF(item);
    return r;
}

/* head: a (resource, scope) pair, or None */
static int
head_ok(PyObject *head)
{
    return head == Py_None || (PyTuple_Check(head) && PyTuple_GET_SIZE(head) == 2);
}

/* local_children(out, head, trace_id, parent_id, trace_state, flags, parts, span_id, start, end, ...)
 *     For each group of four (parts, span_id, start, end), parts being
 *     (name_field, kind, attrs, status): the span_field of a child of
 *     parent_id, appended to the list out as head + (field,), head being a
 *     tuple (resource, scope), or alone when head is None. One call for a statement's phase spans. */
static PyObject *
local_children(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs < 6 || (nargs - 6) % 4 != 0 || !PyList_Check(args[0]) || !head_ok(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "local_children(out, head, trace_id, parent_id, trace_state, flags, (parts, span_id, start, end)...)");
        return NULL;
    }
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
    if (empty == NULL)
        return NULL;
    for (Py_ssize_t g = 6; g < nargs; g += 4) {
        PyObject *parts = args[g];
        if (!PyTuple_Check(parts) || PyTuple_GET_SIZE(parts) != 4) {
            PyErr_SetString(PyExc_TypeError, "local_children: parts must be (name_field, kind, attrs, status)");
            Py_DECREF(empty);
            return NULL;
        }
        PyObject *a[12] = {args[2], args[g + 1], args[3], args[4], PyTuple_GET_ITEM(parts, 0),
                           PyTuple_GET_ITEM(parts, 1), args[g + 2], args[g + 3], args[5],
                           PyTuple_GET_ITEM(parts, 2), PyTuple_GET_ITEM(parts, 3), empty};
        PyObject *field = span_field(NULL, a, 12);
        if (append_field(args[0], args[1], field) < 0) {
            Py_DECREF(empty);
            return NULL;
        }
    }
    Py_DECREF(empty);
    Py_RETURN_NONE;
}

/* ---- statement_spans: a kept extended-protocol statement and its phases ---- */

/* The Statement fields this encoder reads and the kind each must have in the layout (events.py,
 * where the record layout is defined; configure() is given it). They are read through the
 * classes' descriptors (their public get slot), not by offset. */
enum { F_START, F_PARSE_START, F_PARSE_END, F_PARSE_EXACT, F_BIND_START, F_BIND_END, F_BIND_EXACT,
       F_EXEC_START, F_END, F_EXEC_EXACT, F_STATUS, F_PROTOCOL, F_SQL, F_STATEMENT_NAME, F_PORTAL, F_TAG, F_ROWS,
       F_PARAMS, F_RESULTS, F_REUSED, F_COPY, F_EXTRA, F_APPLICATION_NAME, F_FIRST_ROW, F_CLIENT_WAIT, F_COUNT };
enum { KIND_INT, KIND_BOOL, KIND_STR, KIND_VALUE, KIND_COMPLETIONS }; /* events.py */
static const struct {
    const char *name;
    int kind;
} read_fields[F_COUNT] = {
    {"start_ns", KIND_INT}, {"parse_start_ns", KIND_INT}, {"parse_end_ns", KIND_INT},
    {"parse_exact", KIND_BOOL}, {"bind_start_ns", KIND_INT}, {"bind_end_ns", KIND_INT},
    {"bind_exact", KIND_BOOL}, {"exec_start_ns", KIND_INT}, {"end_ns", KIND_INT},
    {"exec_exact", KIND_BOOL}, {"status", KIND_STR}, {"protocol", KIND_STR},
    {"sql", KIND_STR}, {"statement_name", KIND_STR}, {"portal", KIND_STR},
    {"tag", KIND_STR}, {"rows", KIND_INT}, {"params", KIND_VALUE},
    {"results", KIND_COMPLETIONS}, {"reused", KIND_BOOL}, {"copy", KIND_STR},
    {"extra", KIND_VALUE}, {"application_name", KIND_STR}, {"first_row_ns", KIND_INT},
    {"client_wait_ns", KIND_INT},
};
enum { C_END, C_TAG, C_ROWS, C_ERROR, C_COUNT };
static const struct {
    const char *name;
    int kind;
} read_completion_fields[C_COUNT] = {
    {"end_ns", KIND_INT}, {"tag", KIND_STR}, {"rows", KIND_INT}, {"error", KIND_VALUE},
};
static PyTypeObject *record_type = NULL, *completion_type = NULL;
static PyObject *record_descrs[F_COUNT], *completion_descrs[C_COUNT];
static PyObject *first_row_field = NULL; /* configure's: the first row's attribute, value 0.0 */

/* The descriptors of the named fields of cls, checked against its layout ((name, kind, default), ...). */
static int
field_descrs(PyObject *cls, PyObject *layout, int count, const char *const *names, const int *kinds,
             PyObject **descrs)
{
    if (!PyType_Check(cls) || !PyTuple_Check(layout)) {
        PyErr_SetString(PyExc_TypeError, "configure(Statement, Completion, statement_layout, completion_layout)");
        return -1;
    }
    for (int i = 0; i < count; i++) {
        int found = 0;
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(layout) && !found; j++) {
            PyObject *item = PyTuple_GET_ITEM(layout, j);
            if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 || !PyUnicode_Check(PyTuple_GET_ITEM(item, 0))) {
                PyErr_SetString(PyExc_ValueError, "configure: a layout is ((name, kind, default), ...)");
                return -1;
            }
            if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(item, 0), names[i]) != 0)
                continue;
            long kind = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
            if (kind == -1 && PyErr_Occurred())
                return -1;
            if (kind != kinds[i]) {
                PyErr_Format(PyExc_ValueError, "configure: %s is of another kind than this encoder reads", names[i]);
                return -1;
            }
            found = 1;
        }
        if (!found) {
            PyErr_Format(PyExc_ValueError, "configure: the layout has no field %s", names[i]);
            return -1;
        }
        PyObject *descr = PyObject_GetAttrString(cls, names[i]);
        if (descr == NULL)
            return -1;
        if (Py_TYPE(descr)->tp_descr_get == NULL) {
            Py_DECREF(descr);
            PyErr_Format(PyExc_TypeError, "configure: %s is not a descriptor", names[i]);
            return -1;
        }
        descrs[i] = descr;
    }
    return 0;
}

/* configure(Statement, Completion, statement_layout, completion_layout, first_row_field): the fields
 * statement_spans and kept_run read, and the first row's attribute. */
static PyObject *
configure(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    PyObject *descrs[F_COUNT] = {NULL}, *cdescrs[C_COUNT] = {NULL};
    const char *names[F_COUNT], *cnames[C_COUNT];
    int kinds[F_COUNT], ckinds[C_COUNT];
    for (int i = 0; i < F_COUNT; i++)
        names[i] = read_fields[i].name, kinds[i] = read_fields[i].kind;
    for (int i = 0; i < C_COUNT; i++)
        cnames[i] = read_completion_fields[i].name, ckinds[i] = read_completion_fields[i].kind;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "configure(Statement, Completion, statement_layout, completion_layout, first_row_field)");
        return NULL;
    }
    static const char double_zero[9] = {0x21, 0, 0, 0, 0, 0, 0, 0, 0}; /* AnyValue.double_value 0.0 */
    if (!PyBytes_Check(args[4]) || PyBytes_GET_SIZE(args[4]) < 12 ||
        memcmp(PyBytes_AS_STRING(args[4]) + PyBytes_GET_SIZE(args[4]) - 9, double_zero, 9) != 0) {
        PyErr_SetString(PyExc_ValueError, "configure: first_row_field must be an attribute field of the double 0.0");
        return NULL;
    }
    if (field_descrs(args[0], args[2], F_COUNT, names, kinds, descrs) < 0 ||
        field_descrs(args[1], args[3], C_COUNT, cnames, ckinds, cdescrs) < 0) {
        for (int i = 0; i < F_COUNT; i++)
            Py_XDECREF(descrs[i]);
        for (int i = 0; i < C_COUNT; i++)
            Py_XDECREF(cdescrs[i]);
        return NULL;
    }
    for (int i = 0; i < F_COUNT; i++)
        Py_XSETREF(record_descrs[i], descrs[i]);
    for (int i = 0; i < C_COUNT; i++)
        Py_XSETREF(completion_descrs[i], cdescrs[i]);
    Py_INCREF(args[0]);
    Py_XSETREF(record_type, (PyTypeObject *)args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(completion_type, (PyTypeObject *)args[1]);
    Py_INCREF(args[4]);
    Py_XSETREF(first_row_field, args[4]);
    Py_RETURN_NONE;
}

/* A field's value through its descriptor, borrowed (the record holds it while the caller runs);
 * NULL with an exception (AttributeError when unset). */
static PyObject *
descr_value(PyObject *obj, PyObject *descr)
{
    PyObject *v = Py_TYPE(descr)->tp_descr_get(descr, obj, (PyObject *)Py_TYPE(obj));
    Py_XDECREF(v);
    return v;
}

/* A record's field (borrowed); NULL with AttributeError when unset. */
static PyObject *
field(PyObject *rec, int f)
{
    return descr_value(rec, record_descrs[f]);
}

static int
read_ns(PyObject *rec, int f, unsigned long long *out)
{
    PyObject *v = field(rec, f);
    return v == NULL ? -1 : ns_of(v, out);
}

static int
read_flag(PyObject *rec, int f)
{
    PyObject *v = field(rec, f);
    return v == NULL ? -1 : PyObject_IsTrue(v);
}

/* `getrandbits(bits) or _new_id(bits)` as the span builder writes it: the first draw that is
 * true (a new reference). Ids are drawn as Python draws them and only then encoded, so that
 * both take the same draws whatever comes out of them. */
static PyObject *
draw_obj(PyObject *getrandbits, PyObject *bits)
{
    for (;;) {
        PyObject *v = PyObject_CallOneArg(getrandbits, bits);
        if (v == NULL)
            return NULL;
        int t = PyObject_IsTrue(v);
        if (t != 0)
            return t < 0 ? (Py_DECREF(v), NULL) : v;
        Py_DECREF(v);
    }
}

/* An id of n (8 or 16) bytes from draw_obj. */
static int
draw_bytes(PyObject *getrandbits, unsigned char *out, size_t n)
{
    PyObject *v = draw_obj(getrandbits, n == 8 ? py_64 : py_128);
    if (v == NULL)
        return -1;
    int r = id_bytes(v, out, n);
    Py_DECREF(v);
    return r;
}


static int
parts_of(PyObject *parts, const char **name, Py_ssize_t *name_len, long *kind, const char **attrs,
         Py_ssize_t *attrs_len, const char **status, Py_ssize_t *status_len)
{
    if (!PyTuple_Check(parts) || PyTuple_GET_SIZE(parts) != 4 || !PyBytes_Check(PyTuple_GET_ITEM(parts, 0)) ||
        !PyBytes_Check(PyTuple_GET_ITEM(parts, 2)) || !PyBytes_Check(PyTuple_GET_ITEM(parts, 3))) {
        PyErr_SetString(PyExc_TypeError, "statement_spans: parts must be (name_field, kind, attrs, status)");
        return -1;
    }
    *name = PyBytes_AS_STRING(PyTuple_GET_ITEM(parts, 0));
    *name_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(parts, 0));
    *kind = PyLong_AsLong(PyTuple_GET_ITEM(parts, 1));
    if (*kind == -1 && PyErr_Occurred())
        return -1;
    if (*kind < 0 || *kind > 127) {
        PyErr_SetString(PyExc_ValueError, "statement_spans: kind out of range");
        return -1;
    }
    *attrs = PyBytes_AS_STRING(PyTuple_GET_ITEM(parts, 2));
    *attrs_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(parts, 2));
    *status = PyBytes_AS_STRING(PyTuple_GET_ITEM(parts, 3));
    *status_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(parts, 3));
    return 0;
}

/* What every span of a kept statement shares: read from (trace_id, parent_id, trace_state, parent_flags,
 * child_flags, getrandbits) in the arguments. */
typedef struct {
    unsigned char trace_id[16], parent[8];
    int has_parent;
    const char *ts;
    Py_ssize_t ts_len;
    unsigned long parent_flags, child_flags;
    PyObject *getrandbits;
    /* kept_run only: the sample rate's draw for new roots below a rate of 1 (random() < rate
     * samples, as SpanBuilder._context draws); NULL where no draw is made here. */
    PyObject *random;
    double rate;
    /* kept_run only: the keep rule's threshold (0: none). A slow statement that would not be
     * sampled is Python's, which keeps it as a root of its own (SpanBuilder._keep_root). */
    unsigned long long keep_slow_ns;
    /* kept_run only: the connection's session carrier, the context of statements without one of
     * their own (has_carrier 0: none, they are new roots): its ids, whether it is sampled, and
     * its trace_state field. */
    int has_carrier, carrier_sampled;
    unsigned char carrier_trace_id[16], carrier_parent[8];
    const char *carrier_ts;
    Py_ssize_t carrier_ts_len;
    /* kept_run only: spans.app_key, and the last application_name a record carried with its key
     * (owned references, released when kept_run returns). */
    PyObject *app_key, *last_app, *last_app_key;
} Ctx;

static int
read_ctx(PyObject *const *a, Ctx *c)
{
    if (!PyBytes_Check(a[2])) {
        PyErr_SetString(PyExc_TypeError, "trace_state must be bytes");
        return -1;
    }
    c->has_parent = a[1] != Py_None && PyObject_IsTrue(a[1]) == 1;
    if (id_bytes(a[0], c->trace_id, 16) < 0 || (c->has_parent && id_bytes(a[1], c->parent, 8) < 0))
        return -1;
    c->ts = PyBytes_AS_STRING(a[2]);
    c->ts_len = PyBytes_GET_SIZE(a[2]);
    c->parent_flags = PyLong_AsUnsignedLong(a[3]);
    if (PyErr_Occurred())
        return -1;
    c->child_flags = PyLong_AsUnsignedLong(a[4]);
    if (PyErr_Occurred())
        return -1;
    if (c->parent_flags > 0xFFFFFFFFUL || c->child_flags > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_ValueError, "flags out of range");
        return -1;
    }
    c->getrandbits = a[5];
    return 0;
}

/* A span from parts appended to out as head + (field,), with the id in id, or a freshly drawn one
 * written there (drawn: id_obj NULL). */
static int
append_span(PyObject *out, PyObject *head, PyObject *parts, const Ctx *c, const unsigned char *parent,
            unsigned long flags, unsigned long long start, unsigned long long end, PyObject *id_obj,
            unsigned char *id)
{
    const char *name, *attrs, *status;
    Py_ssize_t name_len, attrs_len, status_len;
    long kind;
    if (parts_of(parts, &name, &name_len, &kind, &attrs, &attrs_len, &status, &status_len) < 0 ||
        (id_obj == NULL ? draw_bytes(c->getrandbits, id, 8) : id_bytes(id_obj, id, 8)) < 0)
        return -1;
    return append_field(out, head, build_field(c->trace_id, id, parent, c->ts, c->ts_len, name, name_len, kind,
                                               start, end, flags, attrs, attrs_len, status, status_len, "", 0));
}

/* The statement's own span: its parent is the context's (remote) one. */
static int
append_statement(PyObject *out, PyObject *head, PyObject *parts, const Ctx *c, unsigned long long start,
                 unsigned long long end, unsigned char *sid)
{
    return append_span(out, head, parts, c, c->has_parent ? c->parent : NULL,
                       c->has_parent ? c->parent_flags : c->child_flags, start, end, NULL, sid);
}

/* A local child of sid, ending no earlier than it starts; its id id_obj, or drawn when NULL. */
static int
append_child(PyObject *out, PyObject *head, PyObject *parts, const Ctx *c, const unsigned char *sid,
             unsigned long long start, unsigned long long end, PyObject *id_obj)
{
    unsigned char id[8];
    return append_span(out, head, parts, c, sid, c->child_flags, start, end > start ? end : start, id_obj, id);
}

/* parts (name_field, kind, attrs, status) with the first row's attribute after attrs: its offset in
 * ms from start, as spans._phase_attrs computes it (a new reference; NULL with an exception). */
static PyObject *
with_first_row(PyObject *parts, unsigned long long start, unsigned long long first_row)
{
    if (!PyTuple_Check(parts) || PyTuple_GET_SIZE(parts) != 4 || !PyBytes_Check(PyTuple_GET_ITEM(parts, 2))) {
        PyErr_SetString(PyExc_TypeError, "parts must be (name_field, kind, attrs, status)");
        return NULL;
    }
    if (first_row_field == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() was not called");
        return NULL;
    }
    PyObject *old = PyTuple_GET_ITEM(parts, 2);
    Py_ssize_t alen = PyBytes_GET_SIZE(old), flen = PyBytes_GET_SIZE(first_row_field);
    PyObject *attrs = PyBytes_FromStringAndSize(NULL, alen + flen);
    if (attrs == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(attrs);
    memcpy(p, PyBytes_AS_STRING(old), (size_t)alen);
    memcpy(p + alen, PyBytes_AS_STRING(first_row_field), (size_t)flen);
    double ms = (double)(first_row > start ? first_row - start : 0) / 1e6;
    unsigned long long bits;
    memcpy(&bits, &ms, sizeof bits);
    for (int i = 0; i < 8; i++) /* fixed64: little-endian */
        p[alen + flen - 8 + i] = (char)(bits >> (8 * i));
    PyObject *out = PyTuple_Pack(4, PyTuple_GET_ITEM(parts, 0), PyTuple_GET_ITEM(parts, 1), attrs,
                                 PyTuple_GET_ITEM(parts, 3));
    Py_DECREF(attrs);
    return out;
}

/* A local child of sid from parts, with the first row's attribute when first_row is not 0. */
static int
append_execute(PyObject *out, PyObject *head, PyObject *parts, const Ctx *c, const unsigned char *sid,
               unsigned long long start, unsigned long long end, PyObject *id_obj, unsigned long long first_row)
{
    if (!first_row)
        return append_child(out, head, parts, c, sid, start, end, id_obj);
    PyObject *own = with_first_row(parts, start, first_row);
    if (own == NULL)
        return -1;
    int r = append_child(out, head, own, c, sid, start, end, id_obj);
    Py_DECREF(own);
    return r;
}

/* phase_parts[mask][exact] */
static PyObject *
phase(PyObject *phase_parts, int mask, int exact)
{
    PyObject *pair = PyTuple_GET_ITEM(phase_parts, mask);
    if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
        PyErr_SetString(PyExc_TypeError, "statement_spans: phase_parts must be (inexact, exact) pairs by mask");
        return NULL;
    }
    return PyTuple_GET_ITEM(pair, exact ? 1 : 0);
}

static int extended_spans(PyObject *out, PyObject *head, PyObject *stmt_parts, PyObject *phase_parts,
                          PyObject *rec, const Ctx *cp);

static PyObject *
statement_spans(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 11 || !PyList_Check(args[0]) || !head_ok(args[1]) ||
        !PyTuple_Check(args[3]) || PyTuple_GET_SIZE(args[3]) != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "statement_spans(out, head, parts, phase_parts, rec, trace_id, parent_id, trace_state, "
                        "parent_flags, child_flags, getrandbits)");
        return NULL;
    }
    PyObject *rec = args[4];
    if (record_type == NULL || Py_TYPE(rec) != record_type) {
        PyErr_SetString(PyExc_TypeError, "statement_spans: rec is not a record of the configured class");
        return NULL;
    }
    Ctx c;
    if (read_ctx(args + 5, &c) < 0 || extended_spans(args[0], args[1], args[2], args[3], rec, &c) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* An extended statement's times and flags, as its record holds them. */
typedef struct {
    unsigned long long start, parse_start, parse_end, bind_start, bind_end, exec_start, end, first_row;
    int parse_exact, bind_exact, exec_exact, skipped;
} Times;

static int
read_times(PyObject *rec, Times *t)
{
    if (read_ns(rec, F_START, &t->start) < 0 || read_ns(rec, F_PARSE_START, &t->parse_start) < 0 ||
        read_ns(rec, F_PARSE_END, &t->parse_end) < 0 || read_ns(rec, F_BIND_START, &t->bind_start) < 0 ||
        read_ns(rec, F_BIND_END, &t->bind_end) < 0 || read_ns(rec, F_EXEC_START, &t->exec_start) < 0 ||
        read_ns(rec, F_END, &t->end) < 0 || read_ns(rec, F_FIRST_ROW, &t->first_row) < 0)
        return -1;
    t->parse_exact = read_flag(rec, F_PARSE_EXACT);
    t->bind_exact = read_flag(rec, F_BIND_EXACT);
    t->exec_exact = read_flag(rec, F_EXEC_EXACT);
    if (t->parse_exact < 0 || t->bind_exact < 0 || t->exec_exact < 0)
        return -1;
    PyObject *st = field(rec, F_STATUS);
    if (st == NULL)
        PyErr_Clear();
    t->skipped = st != NULL && PyUnicode_Check(st) && PyUnicode_CompareWithASCIIString(st, "skipped") == 0;
    return 0;
}

/* The phase spans of an extended statement: (mask, exact, start, end) each, at most 3, in masks,
 * exact, from and to; their number. The rule's one source where this module is built (the span
 * builder takes it as spans._phase_groups; spans._phase_groups_py is its twin for a build without
 * it): a boundary between two phases counts as observed only when the server flushed right after
 * the earlier phase's answer (*_exact) and that answer arrived in an earlier read than the next
 * phase's; runs of phases whose boundary was not observed make one span over their joint
 * interval, exact when its end was observed. Masks: parse 1, plan 2, execute 4. */
static int
group_phases(const Times *t, int masks[3], int exact[3], unsigned long long from[3], unsigned long long to[3])
{
    unsigned long long later = t->bind_end ? t->bind_end : t->end;
    int seen[3] = {t->parse_exact && (!later || t->parse_end < later), t->bind_exact && (!t->end || t->bind_end < t->end),
                   t->exec_exact};
    int has[3] = {t->parse_start && t->parse_end, t->bind_start && t->bind_end, t->exec_start && t->end && !t->skipped};
    unsigned long long starts[3] = {t->parse_start, t->bind_start > t->parse_end ? t->bind_start : t->parse_end,
                                    t->exec_start > t->bind_end ? t->exec_start : t->bind_end};
    unsigned long long ends[3] = {t->parse_end, t->bind_end, t->end};
    int n = 0, mask = 0;
    for (int i = 0; i < 3; i++) {
        if (!has[i])
            continue;
        if (!mask)
            from[n] = starts[i];
        mask |= 1 << i;
        to[n] = ends[i] > from[n] ? ends[i] : from[n];
        if (seen[i]) {
            masks[n] = mask;
            exact[n++] = 1;
            mask = 0;
        }
    }
    if (mask) {
        masks[n] = mask;
        exact[n++] = 0;
    }
    return n;
}

/* phase_groups(rec) -> [(mask, exact, start, end), ...]: group_phases for a record of the
 * configured class (spans._phase_groups). */
static PyObject *
phase_groups(PyObject *self, PyObject *rec)
{
    (void)self;
    if (record_type == NULL || Py_TYPE(rec) != record_type) {
        PyErr_SetString(PyExc_TypeError, "phase_groups: rec is not a record of the configured class");
        return NULL;
    }
    Times t;
    int masks[3], exact[3];
    unsigned long long from[3], to[3];
    if (read_times(rec, &t) < 0)
        return NULL;
    int n = group_phases(&t, masks, exact, from, to);
    PyObject *out = PyList_New(n);
    for (int g = 0; out != NULL && g < n; g++) {
        PyObject *item = Py_BuildValue("(iOKK)", masks[g], exact[g] ? Py_True : Py_False, from[g], to[g]);
        if (item == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, g, item);
    }
    return out;
}

/* statement_spans' work, for a checked record and its context. */
static int
extended_spans(PyObject *out, PyObject *head, PyObject *stmt_parts, PyObject *phase_parts, PyObject *rec,
               const Ctx *cp)
{
    const Ctx c = *cp;
    Times t;
    if (read_times(rec, &t) < 0)
        return -1;
    unsigned char sid[8];
    if (append_statement(out, head, stmt_parts, &c, t.start,
                         t.end ? t.end : t.bind_end ? t.bind_end : t.parse_end ? t.parse_end : t.start, sid) < 0)
        return -1;
    /* its phases, ids drawn first, as the Python steps draw them (SpanBuilder._phases) */
    int masks[3], exact[3];
    unsigned long long from[3], to[3];
    int n = group_phases(&t, masks, exact, from, to);
    PyObject *ids[3] = {NULL, NULL, NULL};
    int rc = 0;
    for (int g = 0; g < n && rc == 0; g++)
        if ((ids[g] = draw_obj(c.getrandbits, py_64)) == NULL)
            rc = -1;
    for (int g = 0; g < n && rc == 0; g++) {
        PyObject *parts;
        if ((parts = phase(phase_parts, masks[g], exact[g])) == NULL ||
            append_execute(out, head, parts, &c, sid, from[g], to[g], ids[g], masks[g] & 4 ? t.first_row : 0) < 0)
            rc = -1;
    }
    for (int g = 0; g < 3; g++)
        Py_XDECREF(ids[g]);
    return rc;
}

/* simple_spans(out, head, parts, exec_parts, trace_id, parent_id, trace_state, parent_flags, child_flags,
 *              getrandbits, start, end, first_row): a kept simple-protocol statement's span and its exact
 * execute child (SpanBuilder._kept_simple). */
static PyObject *
simple_spans(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 13 || !PyList_Check(args[0]) || !head_ok(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "simple_spans(out, head, parts, exec_parts, trace_id, parent_id, trace_state, "
                        "parent_flags, child_flags, getrandbits, start, end, first_row)");
        return NULL;
    }
    Ctx c;
    if (read_ctx(args + 4, &c) < 0)
        return NULL;
    unsigned long long start, end, first_row;
    if (ns_of(args[10], &start) < 0 || ns_of(args[11], &end) < 0 || ns_of(args[12], &first_row) < 0)
        return NULL;
    unsigned char sid[8];
    if (append_statement(args[0], args[1], args[2], &c, start, end, sid) < 0 ||
        append_execute(args[0], args[1], args[3], &c, sid, start, end, NULL, first_row) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- kept_run: a run of records of kept shapes, without a Python step each ---- */

static int
is_str(PyObject *v, PyObject *s)
{
    return v == s || (PyUnicode_CheckExact(v) && PyUnicode_Compare(v, s) == 0);
}

/* Whether the keep rule keeps rec when it is not sampled (sampling.keep_reason's "slow": its
 * wire interval at least keep_slow_ns; failed records never reach kept_run): 1 yes (or its times
 * are not both ints: the Python steps judge it), 0 no. */
static int
kept_if_left_out(PyObject *rec, const Ctx *c)
{
    unsigned long long start, end;
    if (!c->keep_slow_ns)
        return 0;
    if (read_ns(rec, F_START, &start) < 0 || read_ns(rec, F_END, &end) < 0) {
        PyErr_Clear(); /* a record without both times: the Python steps judge it */
        return 1;
    }
    return start && end >= start && end - start >= c->keep_slow_ns;
}

/* The context of a kept extended statement (its shape's third item, spans._kept_context;
 * False for none of its own): 1 spans with c filled, 0 no spans (not sampled), -2 the record is
 * Python's, -1 an error. */
static int
kept_context(PyObject *fast, int root_ok, PyObject *rec, Ctx *c)
{
    if (fast == Py_False && c->has_carrier) { /* no context of its own: the session carrier's */
        if (!c->carrier_sampled)
            return kept_if_left_out(rec, c) ? -2 : 0;
        memcpy(c->trace_id, c->carrier_trace_id, 16);
        memcpy(c->parent, c->carrier_parent, 8);
        c->has_parent = 1;
        c->ts = c->carrier_ts;
        c->ts_len = c->carrier_ts_len;
        return 1;
    }
    if (fast == Py_False) { /* no context, no carrier: a new root, sampled at the rate's draw */
        if (!root_ok) {
            /* The draw SpanBuilder._context makes, from the same generator, in the same order:
             * none at a rate of 0, else random() < rate samples. A statement the keep rule
             * keeps when the draw leaves it out is Python's before the draw, which is then
             * made there. */
            if (c->random == NULL || kept_if_left_out(rec, c))
                return -2;
            if (c->rate <= 0.0)
                return 0;
            PyObject *u = PyObject_CallNoArgs(c->random);
            if (u == NULL)
                return -1;
            double draw = PyFloat_AsDouble(u);
            Py_DECREF(u);
            if (draw == -1.0 && PyErr_Occurred())
                return -1;
            if (draw >= c->rate)
                return 0;
        }
        if (draw_bytes(c->getrandbits, c->trace_id, 16) < 0)
            return -1;
        c->has_parent = 0;
        c->ts = "";
        c->ts_len = 0;
        return 1;
    }
    if (!PyTuple_CheckExact(fast))
        return -2;
    if (PyTuple_GET_SIZE(fast) == 0) /* a context the application did not sample */
        return kept_if_left_out(rec, c) ? -2 : 0;
    if (PyTuple_GET_SIZE(fast) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(fast, 2)))
        return -2;
    if (id_bytes(PyTuple_GET_ITEM(fast, 0), c->trace_id, 16) < 0 || id_bytes(PyTuple_GET_ITEM(fast, 1), c->parent, 8) < 0)
        return -1;
    c->has_parent = 1;
    c->ts = PyBytes_AS_STRING(PyTuple_GET_ITEM(fast, 2));
    c->ts_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(fast, 2));
    return 1;
}

/* kept_run's opts: a new root may be sampled (rate 1); texts may be keyed without their literals and
 * traceparent (no capture of literals); parameters are captured (a record with some is Python's). */
enum { KEPT_ROOT_OK = 1, KEPT_KEYED = 2, KEPT_PARAMS = 4 };

/* The context of a keyed statement: trace and parent ids from its key q (shape.statement_key), its
 * trace_state field from the shape kept, hit = (parts, tracestate, trace_state_field). */
static int
keyed_ctx(PyObject *q, PyObject *hit, Ctx *c)
{
    c->has_parent = 1;
    c->ts = PyBytes_AS_STRING(PyTuple_GET_ITEM(hit, 2));
    c->ts_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(hit, 2));
    return id_bytes(PyTuple_GET_ITEM(q, 1), c->trace_id, 16) < 0 || id_bytes(PyTuple_GET_ITEM(q, 2), c->parent, 8) < 0
               ? -1 : 0;
}

/* The last shape kept_run found, and its key: the records of one statement that follow one another
 * (one connection's, run after run) carry the same or equal items (the record form sends a repeated
 * text once a batch; a keyed text's key is made anew), so the next lookup compares the key's items
 * instead of making, hashing and comparing a new tuple. Owned references; one kept_run call long
 * (the Python steps, which may change the shapes, run between calls). */
typedef struct {
    PyObject *key;
    PyObject *entry;
} ShapeMemo;

/* Whether an item of a key is the memo's: the same object, or an equal str or int (what the dict
 * would find equal too: texts shorter than the record form's references and large row counts come
 * as new objects). */
static int
same_item(PyObject *a, PyObject *b)
{
    if (a == b)
        return 1;
    int r;
    if (PyUnicode_CheckExact(a) && PyUnicode_CheckExact(b)) {
        if (PyUnicode_GET_LENGTH(a) != PyUnicode_GET_LENGTH(b))
            return 0;
        r = PyUnicode_Compare(a, b) == 0;
    } else if (PyLong_CheckExact(a) && PyLong_CheckExact(b)) {
        r = PyObject_RichCompareBool(a, b, Py_EQ);
    } else {
        return 0;
    }
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return r == 1;
}

/* shapes[(items[0], ..., items[n - 1])] as a new reference, NULL when it is not there (an error set
 * when the lookup failed). */
static PyObject *
shape_entry(ShapeMemo *memo, PyObject *shapes, PyObject *const *items, Py_ssize_t n)
{
    if (memo->key != NULL && PyTuple_GET_SIZE(memo->key) == n) {
        Py_ssize_t k = 0;
        while (k < n && same_item(items[k], PyTuple_GET_ITEM(memo->key, k)))
            k++;
        if (k == n) {
            Py_INCREF(memo->entry);
            return memo->entry;
        }
    }
    PyObject *key = PyTuple_New(n);
    if (key == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_INCREF(items[k]);
        PyTuple_SET_ITEM(key, k, items[k]);
    }
    PyObject *entry = PyDict_GetItemWithError(shapes, key); /* borrowed */
    if (entry == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    Py_XDECREF(memo->key);
    memo->key = key;
    Py_INCREF(entry);
    Py_XDECREF(memo->entry);
    memo->entry = entry;
    Py_INCREF(entry);
    return entry;
}

/* The kept shape of a keyed text: key its text (shape.statement_key) and look the shape up as
 * (key text, *rest, app); hit is set (a new reference) to a (parts, tracestate, trace_state_field)
 * found, *q to the key. 1 found, 0 not (the record is Python's), 2 the text has no key, -1 an
 * error. */
static int
keyed_lookup(PyObject *statement_key, PyObject *sql, PyObject *const *rest, Py_ssize_t nrest, PyObject *app,
             PyObject *shapes, ShapeMemo *memo, PyObject **q, PyObject **hit)
{
    *hit = NULL;
    *q = PyObject_CallOneArg(statement_key, sql);
    if (*q == NULL)
        return -1;
    if (!PyTuple_CheckExact(*q) || PyTuple_GET_SIZE(*q) != 5)
        return 2;
    PyObject *items[8];
    items[0] = PyTuple_GET_ITEM(*q, 0);
    for (Py_ssize_t i = 0; i < nrest; i++)
        items[i + 1] = rest[i];
    items[nrest + 1] = app;
    PyObject *h = shape_entry(memo, shapes, items, nrest + 2);
    if (h == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_CheckExact(h) || PyTuple_GET_SIZE(h) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(h, 2))) {
        Py_DECREF(h);
        return 0;
    }
    *hit = h;
    return 1;
}

/* Whether a keyed statement found kept (its key q) is sampled: 2 yes (its spans to build), 1 no (none
 * to build), 0 the record is Python's (the keep rule keeps it when left out), -1 an error. parsed
 * counts its comment as the Python steps count it: found, before building. */
static int
keyed_sampled(PyObject *q, PyObject *rec, const Ctx *c, Py_ssize_t *parsed)
{
    long flags = PyLong_AsLong(PyTuple_GET_ITEM(q, 3));
    if (flags == -1 && PyErr_Occurred())
        return -1;
    if (!(flags & 1) && kept_if_left_out(rec, c))
        return 0;
    (*parsed)++;
    return flags & 1 ? 2 : 1;
}

/* The context of a keyed statement found kept (its key q, hit = (parts, tracestate,
 * trace_state_field)), as keyed_sampled answers: 2 its spans to build (c filled), 1 none to build,
 * 0 the record is Python's, -1 an error. A text with a traceparent of its own carries its context;
 * one without (its key's trace id 0: no comment, or one with other tags) takes the session
 * carrier's, else it is a new root at the rate's draw, as SpanBuilder._context makes it for a
 * statement without a context. */
static int
keyed_context(PyObject *q, PyObject *hit, PyObject *rec, Ctx *c, long opts, Py_ssize_t *parsed)
{
    int own = PyObject_IsTrue(PyTuple_GET_ITEM(q, 1));
    if (own < 0)
        return -1;
    if (!own) {
        int r = kept_context(Py_False, opts & KEPT_ROOT_OK, rec, c);
        if (r == 1 || r == 0) {
            /* a comment with tags but no traceparent (value start -2, spans._KEY_TAGS): its parse
             * counts as the Python steps count it */
            long vs = PyLong_AsLong(PyTuple_GET_ITEM(q, 4));
            if (vs == -1 && PyErr_Occurred())
                return -1;
            if (vs == -2)
                (*parsed)++;
        }
        return r == 1 ? 2 : r == 0 ? 1 : r == -2 ? 0 : -1;
    }
    int r = keyed_sampled(q, rec, c, parsed);
    return r == 2 && keyed_ctx(q, hit, c) < 0 ? -1 : r;
}

/* A keyed extended statement (SpanBuilder._extended's keyed shapes): v = (sql, reused, tag, rows,
 * statement_name, portal). As keyed_lookup, 2 when the text has no key. */
static int
keyed_one(PyObject *out, PyObject *head, PyObject *rec, PyObject *const *v, PyObject *shapes, ShapeMemo *memo,
          PyObject *app, PyObject *phase_parts, Ctx *c, PyObject *statement_key, long opts, Py_ssize_t *parsed)
{
    PyObject *q, *hit, *rest[5] = {Py_None, v[2], v[3], v[4], v[5]};
    int r = keyed_lookup(statement_key, v[0], rest, 5, app, shapes, memo, &q, &hit);
    if (r == 1 && (r = keyed_context(q, hit, rec, c, opts, parsed)) == 2)
        r = extended_spans(out, head, PyTuple_GET_ITEM(hit, 0), phase_parts, rec, c) < 0 ? -1 : 1;
    Py_XDECREF(hit);
    Py_XDECREF(q);
    return r;
}

/* The key of kept shapes for an application_name a record carries (spans.app_key, called once for
 * each new value), borrowed; NULL with an error set. */
static PyObject *
app_key_of(PyObject *app, Ctx *c)
{
    if (app == c->last_app)
        return c->last_app_key;
    PyObject *key = PyObject_CallOneArg(c->app_key, app);
    if (key == NULL)
        return NULL;
    Py_INCREF(app);
    Py_XDECREF(c->last_app);
    c->last_app = app;
    Py_XDECREF(c->last_app_key);
    c->last_app_key = key;
    return key;
}

/* One record: 1 done (spans appended), 0 the record is Python's, -1 an error. */
static int
kept_one(PyObject *out, PyObject *head, PyObject *rec, PyObject *shapes, ShapeMemo *memo, PyObject *app,
         PyObject *phase_parts, PyObject *exec_parts, Ctx *c, PyObject *statement_key, long opts, Py_ssize_t *parsed)
{
    PyObject *protocol, *status, *copy, *extra, *client_wait;
    if (Py_TYPE(rec) != record_type || (protocol = field(rec, F_PROTOCOL)) == NULL ||
        (status = field(rec, F_STATUS)) == NULL || (copy = field(rec, F_COPY)) == NULL ||
        (extra = field(rec, F_EXTRA)) == NULL || (client_wait = field(rec, F_CLIENT_WAIT)) == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (!is_str(status, s_ok) || copy != Py_None || extra != Py_None)
        return 0;
    int waited = PyObject_IsTrue(client_wait);
    if (waited != 0) { /* the Python steps put it on the execute span (SpanBuilder._phases) */
        PyErr_Clear();
        return 0;
    }
    /* The application_name the statement ran under is part of its shape (SpanBuilder._app_key):
     * the record's own, else the connection's (app, a key already). */
    PyObject *rec_app = field(rec, F_APPLICATION_NAME);
    if (rec_app == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (rec_app != Py_None && (app = app_key_of(rec_app, c)) == NULL)
        return -1;
    if (is_str(protocol, s_extended)) {
        PyObject *v[6];
        for (int i = 0; i < 6; i++) {
            static const int f[6] = {F_SQL, F_REUSED, F_TAG, F_ROWS, F_STATEMENT_NAME, F_PORTAL};
            if ((v[i] = field(rec, f[i])) == NULL) {
                PyErr_Clear();
                return 0;
            }
        }
        if (opts & KEPT_PARAMS) {
            PyObject *params = field(rec, F_PARAMS);
            if (params == NULL || (params != Py_None && PyObject_IsTrue(params) != 0)) {
                PyErr_Clear();
                return 0;
            }
        }
        if ((opts & KEPT_KEYED) && v[1] == Py_False && PyUnicode_CheckExact(v[0]) && PyUnicode_GET_LENGTH(v[0])) {
            int r = keyed_one(out, head, rec, v, shapes, memo, app, phase_parts, c, statement_key, opts, parsed);
            if (r != 2)
                return r;
            /* a text without a key: kept by the text itself, as SpanBuilder._extended keeps it */
        }
        PyObject *items[7] = {v[0], v[1], v[2], v[3], v[4], v[5], app};
        PyObject *hit = shape_entry(memo, shapes, items, 7);
        if (hit == NULL)
            return PyErr_Occurred() ? -1 : 0;
        if (!PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) != 3) {
            Py_DECREF(hit);
            return 0;
        }
        int r = kept_context(PyTuple_GET_ITEM(hit, 2), opts & KEPT_ROOT_OK, rec, c);
        if (r == 1)
            r = extended_spans(out, head, PyTuple_GET_ITEM(hit, 1), phase_parts, rec, c);
        Py_DECREF(hit);
        return r == -2 ? 0 : r < 0 ? -1 : 1;
    }
    if (!(opts & KEPT_KEYED) || !is_str(protocol, s_simple))
        return 0;
    PyObject *results = field(rec, F_RESULTS), *sql = field(rec, F_SQL);
    if (results == NULL || sql == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (!PyList_CheckExact(results) || PyList_GET_SIZE(results) != 1 || !PyUnicode_CheckExact(sql))
        return 0;
    PyObject *res = PyList_GET_ITEM(results, 0);
    if (Py_TYPE(res) != completion_type)
        return 0;
    PyObject *tag = descr_value(res, completion_descrs[C_TAG]), *rows = tag ? descr_value(res, completion_descrs[C_ROWS]) : NULL;
    PyObject *error = rows ? descr_value(res, completion_descrs[C_ERROR]) : NULL;
    PyObject *res_end = error ? descr_value(res, completion_descrs[C_END]) : NULL;
    if (res_end == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (error != Py_None)
        return 0;
    PyObject *q, *hit, *rest[3] = {tag, rows, NULL};
    int r = keyed_lookup(statement_key, sql, rest, 2, app, shapes, memo, &q, &hit);
    if (r == 2)
        r = 0; /* no key: the Python steps key the shape by its analysis */
    if (r == 1 && (r = keyed_context(q, hit, rec, c, opts, parsed)) == 2) {
        unsigned long long start, end, first_row;
        int has_rows = 1;
        unsigned char sid[8];
        r = 1;
        if (read_ns(rec, F_START, &start) < 0 || ns_of(res_end, &end) < 0 ||
            (!end && read_ns(rec, F_END, &end) < 0) || read_ns(rec, F_FIRST_ROW, &first_row) < 0 ||
            /* a first row counts for a statement that returned rows (spans._first_row_result) */
            (first_row && (has_rows = PyObject_IsTrue(rows)) < 0) ||
            append_statement(out, head, PyTuple_GET_ITEM(hit, 0), c, start, end, sid) < 0 ||
            append_execute(out, head, exec_parts, c, sid, start, end, NULL, has_rows ? first_row : 0) < 0)
            r = -1;
    }
    Py_XDECREF(hit);
    Py_XDECREF(q);
    return r;
}

/* The session carrier kept_run was given: None, or (trace_id, span_id, sampled, trace_state_field). */
static int
read_carrier(PyObject *carrier, Ctx *c)
{
    if (carrier == Py_None)
        return 0;
    if (!PyTuple_CheckExact(carrier) || PyTuple_GET_SIZE(carrier) != 4 || !PyBytes_Check(PyTuple_GET_ITEM(carrier, 3))) {
        PyErr_SetString(PyExc_TypeError, "kept_run: carrier must be None or (trace_id, span_id, sampled, trace_state)");
        return -1;
    }
    int sampled = PyObject_IsTrue(PyTuple_GET_ITEM(carrier, 2));
    if (sampled < 0 || id_bytes(PyTuple_GET_ITEM(carrier, 0), c->carrier_trace_id, 16) < 0 ||
        id_bytes(PyTuple_GET_ITEM(carrier, 1), c->carrier_parent, 8) < 0)
        return -1;
    c->has_carrier = 1;
    c->carrier_sampled = sampled;
    c->carrier_ts = PyBytes_AS_STRING(PyTuple_GET_ITEM(carrier, 3));
    c->carrier_ts_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(carrier, 3));
    return 0;
}

/* kept_run(out, head, records, i, stop, shapes, app, phase_parts, exec_parts, parent_flags, child_flags,
 *          getrandbits, random, rate, statement_key, opts, keep_slow_ns, carrier, app_key[, marks])
 *     -> (next, parsed, error) */
static PyObject *
kept_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if ((nargs != 19 && nargs != 20) || !PyList_Check(args[0]) || !head_ok(args[1]) ||
        !PyList_Check(args[2]) || !PyDict_CheckExact(args[5]) || !PyTuple_Check(args[7]) ||
        PyTuple_GET_SIZE(args[7]) != 8 || !PyCallable_Check(args[18]) ||
        (nargs == 20 && args[19] != Py_None && !PyList_Check(args[19]))) {
        PyErr_SetString(PyExc_TypeError,
                        "kept_run(out, head, records, i, stop, shapes, app, phase_parts, exec_parts, parent_flags, "
                        "child_flags, getrandbits, random, rate, statement_key, opts, keep_slow_ns, carrier, app_key"
                        "[, marks])");
        return NULL;
    }
    PyObject *marks = nargs == 20 && args[19] != Py_None ? args[19] : NULL;
    if (record_type == NULL || completion_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "kept_run: configure() first");
        return NULL;
    }
    PyObject *out = args[0], *records = args[2];
    Py_ssize_t i = PyLong_AsSsize_t(args[3]), stop = PyLong_AsSsize_t(args[4]);
    long opts = PyLong_AsLong(args[15]);
    if ((i == -1 || stop == -1 || opts == -1) && PyErr_Occurred())
        return NULL;
    Ctx c;
    memset(&c, 0, sizeof c);
    c.parent_flags = PyLong_AsUnsignedLong(args[9]);
    c.child_flags = PyLong_AsUnsignedLong(args[10]);
    if (PyErr_Occurred())
        return NULL;
    c.getrandbits = args[11];
    c.random = args[12] == Py_None ? NULL : args[12];
    c.rate = PyFloat_AsDouble(args[13]);
    if (c.rate == -1.0 && PyErr_Occurred())
        return NULL;
    if (ns_of(args[16], &c.keep_slow_ns) < 0 || read_carrier(args[17], &c) < 0)
        return NULL;
    c.app_key = args[18];
    Py_ssize_t parsed = 0;
    PyObject *error = NULL;
    ShapeMemo memo = {NULL, NULL};
    int failed = 0;
    for (; i >= 0 && i < stop && i < PyList_GET_SIZE(records); i++) {
        Py_ssize_t mark = PyList_GET_SIZE(out);
        PyObject *rec = PyList_GET_ITEM(records, i);
        Py_INCREF(rec);
        int r = kept_one(out, args[1], rec, args[5], &memo, args[6], args[7], args[8], &c, args[14], opts, &parsed);
        Py_DECREF(rec);
        if (r == 0)
            break;
        if (r > 0 && marks != NULL) {
            PyObject *at = PyLong_FromSsize_t(mark);
            if (at == NULL || PyList_Append(marks, at) < 0) {
                Py_XDECREF(at);
                failed = 1; /* (its spans stay in out: the caller's error) */
                break;
            }
            Py_DECREF(at);
        }
        if (r < 0) { /* this record's spans go; the caller logs the error and goes on */
            error = take_exception();
            if (PyList_SetSlice(out, mark, PyList_GET_SIZE(out), NULL) < 0) {
                failed = 1;
                break;
            }
            if (error == NULL) {
                Py_INCREF(Py_None);
                error = Py_None;
            }
            break;
        }
    }
    Py_XDECREF(memo.key);
    Py_XDECREF(memo.entry);
    Py_XDECREF(c.last_app);
    Py_XDECREF(c.last_app_key);
    PyObject *ret = failed ? NULL : Py_BuildValue("(nnO)", i, parsed, error != NULL ? error : Py_None);
    Py_XDECREF(error);
    return ret;
}

static PyMethodDef methods[] = {
    {"span_field", (PyCFunction)(void (*)(void))span_field, METH_FASTCALL, "One span as an encoded ScopeSpans.spans field."},
    {"local_children", (PyCFunction)(void (*)(void))local_children, METH_FASTCALL,
     "Child spans of one parent as ScopeSpans.spans fields, appended to a list."},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "Where the record fields statement_spans and kept_run read live."},
    {"phase_groups", (PyCFunction)phase_groups, METH_O,
     "The phase spans of an extended statement's record: [(mask, exact, start, end), ...]."},
    {"kept_run", (PyCFunction)(void (*)(void))kept_run, METH_FASTCALL,
     "Spans of a run of records whose shapes are kept, up to the first that needs the Python steps."},
    {"statement_spans", (PyCFunction)(void (*)(void))statement_spans, METH_FASTCALL,
     "A kept extended-protocol statement's span and its phase spans, appended to a list."},
    {"simple_spans", (PyCFunction)(void (*)(void))simple_spans, METH_FASTCALL,
     "A kept simple-protocol statement's span and its execute span, appended to a list."},
    {"attribute_fields", (PyCFunction)(void (*)(void))attribute_fields, METH_FASTCALL,
     "A dict's items as encoded Span.attributes fields, through an encoded-field cache."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_otlpenc", "Compiled half of the OTLP span encoder.", -1, methods,
    NULL, NULL, NULL, NULL, /* m_slots, m_traverse, m_clear, m_free */
};

PyMODINIT_FUNC
PyInit__otlpenc(void)
{
    if ((py_64 == NULL && (py_64 = PyLong_FromLong(64)) == NULL) ||
        (py_128 == NULL && (py_128 = PyLong_FromLong(128)) == NULL) ||
        (s_ok == NULL && (s_ok = PyUnicode_InternFromString("ok")) == NULL) ||
        (s_extended == NULL && (s_extended = PyUnicode_InternFromString("extended")) == NULL) ||
        (s_simple == NULL && (s_simple = PyUnicode_InternFromString("simple")) == NULL))
        return NULL;
    return PyModule_Create(&module);
}
