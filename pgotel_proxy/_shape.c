/*
 * Compiled helpers of the statement-shape caches (optional; pgotel_proxy/shape.py
 * has the same functions in Python and is used when this module was not built).
 *
 * blind(s) -> str | None
 *     For an ASCII str: s with each plain string literal ('...' with doubled
 *     quotes) and each unsigned number literal replaced by "\x01", exactly as
 *     shape.SHAPE_LITERAL.sub("\x01", s) does; None for any other str (the
 *     caller then uses the regular expression).
 *
 * statement_key(sql) -> (key, trace_id, span_id, flags, value_start) | None
 *     For a statement whose code comes first and whose sqlcommenter comment
 *     follows with a traceparent: a key that two statements share only when
 *     they differ in nothing but the values of their code's literals and the
 *     traceparent value, and the parsed traceparent. The rules are in
 *     shape.statement_key_py's docstring; both implementations give the same
 *     answer for every input (tests/test_shape.py).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem */
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_CHARS 8192
#define TP_TAG "traceparent='"
#define TP_TAG_LEN 13
#define TP_VALUE_LEN 55

static inline int
is_word(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static inline int
is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

/* Python's str.isspace() / regex \s for an ASCII character. */
static inline int
is_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

static inline int
is_hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

/* End of the string literal opening at p[i] == '\'', or -1 when it is not closed. */
static Py_ssize_t
string_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n)
{
    Py_ssize_t k = i + 1;
    for (;;) {
        while (k < n && p[k] != '\'')
            k++;
        if (k >= n)
            return -1;
        if (k + 1 < n && p[k + 1] == '\'') {
            k += 2; /* a doubled quote: the literal goes on */
            continue;
        }
        return k + 1;
    }
}

/* End of the number literal starting at the digit p[i] (not after [\w$.]), or -1 when the
 * pattern does not match there. Backtracking never finds a shorter match: each shorter
 * candidate is followed by a digit, '.', 'e' or 'E', which the look-ahead refuses. */
static Py_ssize_t
number_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n)
{
    Py_ssize_t k = i;
    while (k < n && is_digit(p[k]))
        k++;
    if (k < n && p[k] == '.') {
        k++;
        while (k < n && is_digit(p[k]))
            k++;
    }
    if (k < n && (p[k] == 'e' || p[k] == 'E')) {
        Py_ssize_t e = k + 1;
        if (e < n && (p[e] == '+' || p[e] == '-'))
            e++;
        if (e < n && is_digit(p[e])) {
            while (e < n && is_digit(p[e]))
                e++;
            k = e;
        }
    }
    if (k < n && (is_word(p[k]) || p[k] == '$' || p[k] == '.'))
        return -1;
    return k;
}

/* Copy p[0:n] into out with literals blanked; returns the length written. */
static Py_ssize_t
blank(const unsigned char *p, Py_ssize_t n, unsigned char *out)
{
    Py_ssize_t i = 0, o = 0;
    while (i < n) {
        unsigned char c = p[i];
        Py_ssize_t e = -1;
        if (c == '\'')
            e = string_end(p, i, n);
        else if (is_digit(c) && !(i > 0 && (is_word(p[i - 1]) || p[i - 1] == '$' || p[i - 1] == '.')))
            e = number_end(p, i, n);
        if (e >= 0) {
            out[o++] = 1;
            i = e;
        }
        else {
            out[o++] = c;
            i++;
        }
    }
    return o;
}

/* Whether a literal-blind key may stand for the code p[0:n] whose literals blanked are
 * b[0:m] (shape.blank_code): no backslash or \x01 in the code; outside its literals no
 * quote (one left open), dollar sign (but a parameter: "$" and a digit), double quote, "--", comment opener,
 * U& or typed or prefixed
 * string (E'', B'', X'', N'' not after [\w$]). */
static int
code_safe(const unsigned char *p, Py_ssize_t n, const unsigned char *b, Py_ssize_t m)
{
    if (memchr(p, '\\', (size_t)n) != NULL || memchr(p, 1, (size_t)n) != NULL)
        return 0;
    for (Py_ssize_t i = 0; i < m; i++) {
        unsigned char c = b[i];
        if (c == '\'' || c == '"' || (c == '$' && !(i + 1 < m && is_digit(b[i + 1]))))
            return 0; /* $ before a digit is a parameter ($1), never a dollar quote */
        if ((c == '-' || c == '/') && i + 1 < m && b[i + 1] == (c == '-' ? '-' : '*'))
            return 0;
        if (c == 1 && i > 0 && memchr("eEbBxXnN", b[i - 1], 8) != NULL &&
            !(i > 1 && (is_word(b[i - 2]) || b[i - 2] == '$')))
            return 0;
        if (c == '&' && i > 0 && (b[i - 1] == 'u' || b[i - 1] == 'U'))
            return 0;
    }
    return 1;
}

/* A str of the ASCII (and \x01) characters buf[0:len]. */
static PyObject *
ascii_str(const unsigned char *buf, Py_ssize_t len)
{
    return PyUnicode_FromKindAndData(PyUnicode_1BYTE_KIND, buf, len);
}

/* The characters of an exact, ASCII str (NULL for any other object; no exception set). */
static const unsigned char *
ascii_data(PyObject *arg, Py_ssize_t *n)
{
    if (!PyUnicode_CheckExact(arg) || !PyUnicode_IS_ASCII(arg))
        return NULL;
    *n = PyUnicode_GET_LENGTH(arg);
    return PyUnicode_1BYTE_DATA(arg);
}

static PyObject *
blind(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_ssize_t n;
    const unsigned char *p = ascii_data(arg, &n);
    if (p == NULL)
        Py_RETURN_NONE;
    unsigned char *buf = PyMem_Malloc(n ? (size_t)n : 1);
    if (buf == NULL)
        return PyErr_NoMemory();
    Py_ssize_t o = blank(p, n, buf);
    PyObject *res;
    if (o == n && memcmp(p, buf, (size_t)n) == 0) {
        Py_INCREF(arg);
        res = arg; /* nothing blanked */
    }
    else
        res = ascii_str(buf, o);
    PyMem_Free(buf);
    return res;
}

static const unsigned char *
find(const unsigned char *p, Py_ssize_t from, Py_ssize_t n, const char *what, Py_ssize_t len)
{
    if (from >= n)
        return NULL;
    return memmem(p + from, (size_t)(n - from), what, (size_t)len);
}

/* Whether word (lower case letters, digits, '_' and '.') is at p[i:n], in any case. */
static int
word_at(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, const char *word, Py_ssize_t len)
{
    if (i + len > n)
        return 0;
    Py_ssize_t k = 0;
    while (k < len && (p[i + k] | (word[k] >= 'a' ? 0x20 : 0)) == (unsigned char)word[k])
        k++;
    return k == len;
}

/* Whether p[0:n] holds, in any case, a word that could name the session's carrier: "pgotel",
 * "all", "application_name" or "pg_tracing" (spans.may_set_carrier). One pass: each starts
 * with 'p' or 'a', which OR 0x20 finds in either case and nothing else gives. */
static int
has_carrier_word(const unsigned char *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i] | 0x20;
        if (c == 'p') {
            if (word_at(p, i, n, "pgotel", 6) || word_at(p, i, n, "pg_tracing", 10))
                return 1;
        }
        else if (c == 'a') {
            if (word_at(p, i, n, "all", 3) || word_at(p, i, n, "application_name", 16))
                return 1;
        }
    }
    return 0;
}

/* The value of len (at most 16) lower-case hexadecimal digits. */
static unsigned long long
hex_value(const unsigned char *p, Py_ssize_t len)
{
    unsigned long long v = 0;
    for (Py_ssize_t i = 0; i < len; i++)
        v = v << 4 | (unsigned long long)(p[i] <= '9' ? p[i] - '0' : p[i] - 'a' + 10);
    return v;
}

/* The int of len (2, 16 or 32) lower-case hexadecimal digits, checked before. */
static PyObject *
hex_int(const unsigned char *p, Py_ssize_t len)
{
    if (len <= 16)
        return PyLong_FromUnsignedLongLong(hex_value(p, len));
    unsigned long long high = hex_value(p, len - 16), low = hex_value(p + len - 16, 16);
    if (high == 0)
        return PyLong_FromUnsignedLongLong(low);
    PyObject *h = PyLong_FromUnsignedLongLong(high), *l = PyLong_FromUnsignedLongLong(low), *shifted = NULL, *res = NULL;
    PyObject *bits = PyLong_FromLong(64);
    if (h != NULL && l != NULL && bits != NULL && (shifted = PyNumber_Lshift(h, bits)) != NULL)
        res = PyNumber_Or(shifted, l);
    Py_XDECREF(h);
    Py_XDECREF(l);
    Py_XDECREF(bits);
    Py_XDECREF(shifted);
    return res;
}

static PyObject *
statement_key(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_ssize_t n;
    const unsigned char *p = ascii_data(arg, &n);
    if (p == NULL || n == 0 || n > MAX_CHARS)
        Py_RETURN_NONE;
    /* What could SET, RESET or DISCARD the session's carrier is never keyed (spans.may_set_carrier). */
    if (has_carrier_word(p, n))
        Py_RETURN_NONE;
    const unsigned char *c = find(p, 0, n, "/*", 2);
    if (c == NULL)
        Py_RETURN_NONE;
    Py_ssize_t j = c - p;
    Py_ssize_t i;
    for (i = 0; i < j && is_space(p[i]); i++)
        ;
    if (i == j)
        Py_RETURN_NONE; /* the comment comes first */
    const unsigned char *t = find(p, j, n, TP_TAG, TP_TAG_LEN);
    if (t == NULL)
        Py_RETURN_NONE;
    Py_ssize_t k = t - p;
    if (!((k >= 2 && p[k - 2] == '/' && p[k - 1] == '*') || p[k - 1] == ',' || is_space(p[k - 1])))
        Py_RETURN_NONE;
    Py_ssize_t vs = k + TP_TAG_LEN, ve = vs + TP_VALUE_LEN;
    if (ve >= n || p[ve] != '\'')
        Py_RETURN_NONE;
    const unsigned char *v = p + vs;
    for (i = 0; i < TP_VALUE_LEN; i++) {
        int dash = i == 2 || i == 35 || i == 52;
        if (dash ? v[i] != '-' : !is_hex(v[i]))
            Py_RETURN_NONE;
    }
    if (v[0] == 'f' && v[1] == 'f')
        Py_RETURN_NONE;
    int zero_trace = 1, zero_span = 1;
    for (i = 3; i < 35; i++)
        zero_trace &= v[i] == '0';
    for (i = 36; i < 52; i++)
        zero_span &= v[i] == '0';
    if (zero_trace || zero_span)
        Py_RETURN_NONE;

    unsigned char out[MAX_CHARS]; /* the key is never longer than the text */
    Py_ssize_t o = blank(p, j, out);
    if (!code_safe(p, j, out, o))
        Py_RETURN_NONE;
    memcpy(out + o, p + j, (size_t)(vs - j));
    o += vs - j;
    memcpy(out + o, p + ve, (size_t)(n - ve));
    o += n - ve;
    PyObject *key = ascii_str(out, o);
    if (key == NULL)
        return NULL;
    PyObject *trace_id = hex_int(v + 3, 32);
    PyObject *span_id = hex_int(v + 36, 16);
    PyObject *flags = hex_int(v + 53, 2);
    if (trace_id == NULL || span_id == NULL || flags == NULL) {
        Py_DECREF(key);
        Py_XDECREF(trace_id);
        Py_XDECREF(span_id);
        Py_XDECREF(flags);
        return NULL;
    }
    PyObject *start = PyLong_FromSsize_t(vs);
    if (start == NULL) {
        Py_DECREF(key);
        Py_DECREF(trace_id);
        Py_DECREF(span_id);
        Py_DECREF(flags);
        return NULL;
    }
    PyObject *res = PyTuple_New(5);
    if (res == NULL) {
        Py_DECREF(key);
        Py_DECREF(trace_id);
        Py_DECREF(span_id);
        Py_DECREF(flags);
        Py_DECREF(start);
        return NULL;
    }
    PyTuple_SET_ITEM(res, 0, key);
    PyTuple_SET_ITEM(res, 1, trace_id);
    PyTuple_SET_ITEM(res, 2, span_id);
    PyTuple_SET_ITEM(res, 3, flags);
    PyTuple_SET_ITEM(res, 4, start);
    return res;
}

static PyMethodDef methods[] = {
    {"blind", blind, METH_O, "blind(s) -> str | None: literals blanked (ASCII str only)."},
    {"statement_key", statement_key, METH_O,
     "statement_key(sql) -> (key, trace_id, span_id, flags, value_start) | None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_shape", "Compiled helpers of the statement-shape caches.", -1, methods,
    NULL, NULL, NULL, NULL, /* m_slots, m_traverse, m_clear, m_free */
};

PyMODINIT_FUNC
PyInit__shape(void)
{
    return PyModule_Create(&module);
}
