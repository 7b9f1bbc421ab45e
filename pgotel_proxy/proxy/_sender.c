/*
 * The relay's write to a plain socket transport, in C.
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

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/socket.h>
#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* SIGPIPE is ignored in Python processes: EPIPE comes back instead */
#endif

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
    int empty = PyLong_CheckExact(b) && PyLong_AsSsize_t(b) == 0;
    if (PyErr_Occurred())
        PyErr_Clear();
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
    .tp_name = "pgotel_proxy.proxy._sender.Sender",
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

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sender", "A relay's write to a plain socket transport, in C (see Sender).", -1, NULL,
    NULL, NULL, NULL, NULL, /* m_slots, m_traverse, m_clear, m_free */
};

PyMODINIT_FUNC
PyInit__sender(void)
{
    if (PyType_Ready(&SenderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SenderType);
    if (PyModule_AddObject(m, "Sender", (PyObject *)&SenderType) < 0) {
        Py_DECREF(&SenderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
