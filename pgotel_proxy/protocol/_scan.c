/*
 * Compiled helper of the protocol codec: step over a run of messages of one
 * type (DataRow, CopyData) in a server stream, without a Python call per
 * message. Optional: pgotel_proxy/protocol/scan.py has the same function in
 * Python and is used when this module was not built.
 *
 * run_end(buf, pos, n, typ) -> (end, count)
 *
 * buf[pos] is a message of type typ whose header is complete (pos + 5 <= n)
 * and whose end is end0 = pos + 1 + length. While the next message starts
 * with a complete header of the same type and a length of at least 4, step
 * to its end. Returns the end of the last message stepped over (it may lie
 * beyond n: that message is incomplete) and how many messages that was.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static inline Py_ssize_t
msg_end(const unsigned char *p, Py_ssize_t pos)
{
    unsigned long len = ((unsigned long)p[pos + 1] << 24) | ((unsigned long)p[pos + 2] << 16) |
                        ((unsigned long)p[pos + 3] << 8) | (unsigned long)p[pos + 4];
    if (len < 4)
        return -1;
    return pos + 1 + (Py_ssize_t)len;
}

static PyObject *
run_end(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "run_end(buf, pos, n, typ)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    long typ = PyLong_AsLong(args[3]);
    if (PyErr_Occurred()) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (pos < 0 || n > view.len || pos + 5 > n) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "run_end: no complete header at pos");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)view.buf;
    Py_ssize_t end = pos + 1 + (Py_ssize_t)(((unsigned long)p[pos + 1] << 24) | ((unsigned long)p[pos + 2] << 16) |
                                          ((unsigned long)p[pos + 3] << 8) | (unsigned long)p[pos + 4]);
    Py_ssize_t count = 1;
    while (end <= n - 5 && p[end] == (unsigned char)typ) {
        Py_ssize_t next = msg_end(p, end);
        if (next < 0)
            break;
        end = next;
        count++;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nn)", end, count);
}

static PyMethodDef methods[] = {
    {"run_end", (PyCFunction)(void (*)(void))run_end, METH_FASTCALL,
     "run_end(buf, pos, n, typ) -> (end, count): step over a run of messages of one type."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scan", "Compiled helper of the protocol codec.", -1, methods,
    NULL, NULL, NULL, NULL, /* m_slots, m_traverse, m_clear, m_free */
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModule_Create(&module);
}
