/*
 * The bare relay of connections with nothing to observe, in C, on a thread of its own.
 *
 * Once a connection's start-up is over and nothing is to be observed on it
 * (tracing off or not sampled for this connection, no WAL propagation, no
 * flush-phase timing), the proxy has only bytes to move between two sockets.
 * A Pump takes both sockets (the caller hands over its own duplicates) and
 * moves what one sends to the other, with epoll, recv and send, and no
 * Python object, interpreter lock or event-loop callback per chunk: what
 * PgBouncer does per chunk, and nothing more.
 *
 * Per direction: read into a stack buffer, send it on at once; what the
 * receiving socket does not take is kept (the only allocation) and reading
 * that direction stops until it has left (backpressure, as the asyncio
 * relay's pause_reading). End of input or an error on either socket ends
 * the pair: nothing more is read, what is kept is still sent (as a
 * transport's close() flushes), then both sockets are closed. A pair closed
 * on request (pump.close: shutdown, drain) is closed at once.
 *
 * The Python side learns of ended pairs through an eventfd it watches on its
 * event loop (notify_fd) and take_closed(). Commands (add, close) are
 * queued under a mutex, a stop is a flag, and both wake the thread through its
 * own eventfd; the thread alone touches the pairs.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK 65536
#define MAX_EVENTS 64
#define CMD_TAG UINT64_MAX

enum { CMD_ADD, CMD_CLOSE };

typedef struct {
    int kind;
    long long id;
    int fd[2];
} Cmd;

typedef struct {
    long long id;
    int fd[2];
    char *buf[2]; /* buf[i]: read from fd[i], not yet sent to fd[1 - i] */
    size_t off[2], len[2];
    uint32_t ev[2]; /* what fd[i] is registered for */
    int hup[2];     /* fd[i] hung up: nothing can be sent to it; read to its end, out of epoll */
    int ending;     /* no more reads; sending what is kept, then closing */
    int err;        /* the first errno seen (0: end of input) */
} Pair;

typedef struct {
    long long id;
    int err;
} Closed;

typedef struct {
    PyObject_HEAD
    int epfd, cmdfd, notifyfd;
    pthread_t thread;
    int started, stopped;
    int stop_req; /* the thread is to end (under mu) */
    pthread_mutex_t mu;
    Cmd *cmds;
    size_t ncmds, capcmds;
    Closed *closed;
    size_t nclosed, capclosed;
    long long next_id;
    size_t live; /* pairs the thread holds (read under mu) */
    /* thread-owned */
    Pair **slots;
    size_t nslots;
    size_t *free_slots;
    size_t nfree;
} Pump;

/* ------------------------------------------------------------ thread side */

static void
wake(int fd)
{
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(fd, &one, sizeof one);
    } while (r < 0 && errno == EINTR);
}

/* A queue's items, taken under the lock; the queue is left empty (*count: how many). */
static void *
take_all(Pump *p, void **items, size_t *n, size_t *cap, size_t *count)
{
    pthread_mutex_lock(&p->mu);
    void *out = *items;
    *count = *n;
    *items = NULL;
    *n = *cap = 0;
    pthread_mutex_unlock(&p->mu);
    return out;
}

static int
pair_register(Pump *p, size_t slot, int side, uint32_t want)
{
    Pair *q = p->slots[slot];
    if (q->ev[side] == want || q->hup[side])
        return 0;
    struct epoll_event e;
    e.events = want;
    e.data.u64 = ((uint64_t)slot << 1) | (uint64_t)side;
    int r = epoll_ctl(p->epfd, EPOLL_CTL_MOD, q->fd[side], &e);
    if (r == 0)
        q->ev[side] = want;
    return r;
}

/* What fd[side] waits for now: input while reading, output while the other side's bytes wait for it. */
static uint32_t
wanted(Pair *q, int side)
{
    uint32_t w = 0;
    if (!q->ending && q->len[side] == 0 && !q->hup[1 - side]) /* not for a socket that is gone */
        w |= EPOLLIN;
    if (q->len[1 - side] > q->off[1 - side])
        w |= EPOLLOUT;
    return w;
}

static void
drop(Pair *q, int side)
{
    free(q->buf[side]);
    q->buf[side] = NULL;
    q->off[side] = q->len[side] = 0;
}

/* Tell the Python side that pair id ended (err: the first errno, 0 for end of input). */
static void
report_closed(Pump *p, long long id, int err)
{
    pthread_mutex_lock(&p->mu);
    if (p->nclosed == p->capclosed) {
        size_t cap = p->capclosed ? p->capclosed * 2 : 64;
        Closed *c = realloc(p->closed, cap * sizeof *c);
        if (c != NULL) {
            p->closed = c;
            p->capclosed = cap;
        }
    }
    if (p->nclosed < p->capclosed) { /* else lost: the connection ends at the proxy's shutdown */
        p->closed[p->nclosed].id = id;
        p->closed[p->nclosed].err = err;
        p->nclosed++;
    }
    p->live--;
    pthread_mutex_unlock(&p->mu);
    wake(p->notifyfd);
}

static void
pair_free(Pump *p, size_t slot, int err)
{
    Pair *q = p->slots[slot];
    for (int i = 0; i < 2; i++) {
        epoll_ctl(p->epfd, EPOLL_CTL_DEL, q->fd[i], NULL);
        close(q->fd[i]);
        free(q->buf[i]);
    }
    long long id = q->id;
    free(q);
    p->slots[slot] = NULL;
    p->free_slots[p->nfree++] = slot;
    report_closed(p, id, err);
}

/* Send what side's buffer holds to the other socket. 0 all sent (or nothing waited), 1 some left, -1 error. */
static int
flush_side(Pair *q, int side)
{
    while (q->off[side] < q->len[side]) {
        ssize_t n = send(q->fd[1 - side], q->buf[side] + q->off[side], q->len[side] - q->off[side],
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 1;
            return -1;
        }
        q->off[side] += (size_t)n;
    }
    drop(q, side);
    return 0;
}

/* Start ending the pair: no more reads; done (1) when nothing waits any more. */
static int
begin_end(Pair *q, int err)
{
    if (!q->ending) {
        q->ending = 1;
        q->err = err;
    }
    return q->len[0] == 0 && q->len[1] == 0;
}

/* A socket failed: nothing more goes anywhere, the pair ends now (returns 1). */
static int
broken(Pair *q, int err)
{
    q->len[0] = q->len[1] = 0; /* the buffers are freed with the pair */
    begin_end(q, err);
    return 1;
}

/* Read from side and send on; 1 when the pair is to be freed now. */
static int
pump_in(Pair *q, int side, char *chunk)
{
    for (;;) {
        ssize_t n = recv(q->fd[side], chunk, CHUNK, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return broken(q, errno);
        }
        if (n == 0)
            return begin_end(q, 0);
        size_t sent = 0;
        while (sent < (size_t)n) {
            ssize_t s = send(q->fd[1 - side], chunk + sent, (size_t)n - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (s < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                return broken(q, errno);
            }
            sent += (size_t)s;
        }
        if (sent < (size_t)n) {
            size_t rest = (size_t)n - sent;
            q->buf[side] = malloc(rest);
            if (q->buf[side] == NULL) {
                begin_end(q, ENOMEM);
                return 1;
            }
            memcpy(q->buf[side], chunk + sent, rest);
            q->off[side] = 0;
            q->len[side] = rest;
            return 0; /* reading this side waits until the rest has left */
        }
        if (n < CHUNK && !q->hup[side])
            return 0; /* a short read: the socket is empty (epoll says when there is more) */
    }
}

static int
sock_error(int fd)
{
    int e = 0;
    socklen_t n = sizeof e;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &n) < 0)
        e = errno;
    return e ? e : ECONNRESET;
}

static void
handle(Pump *p, uint64_t tag, uint32_t events, char *chunk)
{
    size_t slot = (size_t)(tag >> 1);
    int side = (int)(tag & 1);
    if (slot >= p->nslots || p->slots[slot] == NULL)
        return;
    Pair *q = p->slots[slot];
    int done = 0;
    if (events & EPOLLERR) { /* reset: what either socket holds is lost anyway */
        begin_end(q, sock_error(q->fd[side]));
        pair_free(p, slot, q->err);
        return;
    }
    if ((events & EPOLLHUP) && !q->hup[side]) {
        /* Gone both ways (a Unix peer closed, say): nothing more can be sent to it, but what
         * it sent before is still to be read. Out of epoll, which would report it again and
         * again; read to its end from here on. */
        q->hup[side] = 1;
        epoll_ctl(p->epfd, EPOLL_CTL_DEL, q->fd[side], NULL);
        q->ev[side] = 0;
        drop(q, 1 - side);
    }
    if ((events & EPOLLOUT) && flush_side(q, 1 - side) < 0) { /* fd[side] can take the other side's bytes */
        begin_end(q, errno);
        pair_free(p, slot, q->err);
        return;
    }
    if (!q->ending && q->len[side] == 0 && (events & (EPOLLIN | EPOLLHUP)))
        done = pump_in(q, side, chunk);
    /* A hung-up side whose kept bytes have left is read on here (epoll no longer says). */
    for (int i = 0; i < 2 && !done; i++)
        if (q->hup[i] && !q->ending && q->len[i] == 0 && (i != side || !(events & (EPOLLIN | EPOLLHUP))))
            done = pump_in(q, i, chunk);
    for (int i = 0; i < 2; i++)
        if (q->hup[1 - i] && q->len[i]) /* kept for a socket that is gone */
            drop(q, i);
    if (!done && q->ending && q->len[0] == 0 && q->len[1] == 0)
        done = 1;
    if (!done && q->hup[0] && q->hup[1])
        done = 1;
    if (!done)
        for (int i = 0; i < 2; i++)
            if (pair_register(p, slot, i, wanted(q, i)) < 0) {
                begin_end(q, errno);
                done = 1;
                break;
            }
    if (done)
        pair_free(p, slot, q->err);
}

static void
add_pair(Pump *p, Cmd *c)
{
    Pair *q = calloc(1, sizeof *q);
    size_t slot;
    if (q == NULL)
        goto fail;
    if (p->nfree) {
        slot = p->free_slots[--p->nfree];
    } else {
        size_t n = p->nslots ? p->nslots * 2 : 64;
        Pair **s = realloc(p->slots, n * sizeof *s);
        if (s == NULL)
            goto fail;
        p->slots = s;
        size_t *f = realloc(p->free_slots, n * sizeof *f);
        if (f == NULL)
            goto fail;
        p->free_slots = f;
        for (size_t i = p->nslots; i < n; i++)
            p->slots[i] = NULL;
        for (size_t i = n; i > p->nslots + 1; i--)
            p->free_slots[p->nfree++] = i - 1;
        slot = p->nslots;
        p->nslots = n;
    }
    q->id = c->id;
    q->fd[0] = c->fd[0];
    q->fd[1] = c->fd[1];
    p->slots[slot] = q;
    for (int i = 0; i < 2; i++) {
        struct epoll_event e;
        e.events = EPOLLIN;
        e.data.u64 = ((uint64_t)slot << 1) | (uint64_t)i;
        if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, q->fd[i], &e) < 0) {
            int err = errno;
            if (i == 1)
                epoll_ctl(p->epfd, EPOLL_CTL_DEL, q->fd[0], NULL);
            q->ev[0] = q->ev[1] = 0;
            pair_free(p, slot, err);
            return;
        }
        q->ev[i] = EPOLLIN;
    }
    return;
fail:
    free(q);
    close(c->fd[0]);
    close(c->fd[1]);
    report_closed(p, c->id, ENOMEM); /* so that the connection ends */
}

static int
run_commands(Pump *p)
{
    uint64_t v;
    ssize_t r;
    do {
        r = read(p->cmdfd, &v, sizeof v);
    } while (r < 0 && errno == EINTR);
    size_t n;
    Cmd *cmds = take_all(p, (void **)&p->cmds, &p->ncmds, &p->capcmds, &n);
    for (size_t i = 0; i < n; i++) {
        Cmd *c = &cmds[i];
        if (c->kind == CMD_ADD) {
            add_pair(p, c);
        } else {
            for (size_t s = 0; s < p->nslots; s++)
                if (p->slots[s] != NULL && (c->id < 0 || p->slots[s]->id == c->id))
                    pair_free(p, s, ECONNABORTED);
        }
    }
    free(cmds);
    pthread_mutex_lock(&p->mu);
    int stop = p->stop_req;
    pthread_mutex_unlock(&p->mu);
    return stop;
}

static void *
thread_main(void *arg)
{
    Pump *p = (Pump *)arg;
    struct epoll_event events[MAX_EVENTS];
    char *chunk = malloc(CHUNK);
    if (chunk == NULL)
        return NULL;
    for (;;) {
        int n = epoll_wait(p->epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        int commands = 0;
        for (int i = 0; i < n; i++) {
            if (events[i].data.u64 == CMD_TAG)
                commands = 1;
            else
                handle(p, events[i].data.u64, events[i].events, chunk);
        }
        /* Commands last: a slot freed by an event of this batch is reused only after every
         * event of the batch (one may be for the freed pair's other socket) is handled. */
        if (commands && run_commands(p))
            break;
    }
    /* Ending: pairs still queued to be added are closed too (a stop may come right after an add). */
    size_t n;
    Cmd *cmds = take_all(p, (void **)&p->cmds, &p->ncmds, &p->capcmds, &n);
    for (size_t i = 0; i < n; i++)
        if (cmds[i].kind == CMD_ADD) {
            close(cmds[i].fd[0]);
            close(cmds[i].fd[1]);
            report_closed(p, cmds[i].id, ECONNABORTED);
        }
    free(cmds);
    for (size_t s = 0; s < p->nslots; s++)
        if (p->slots[s] != NULL)
            pair_free(p, s, ECONNABORTED);
    free(chunk);
    return NULL;
}

/* ------------------------------------------------------------ Python side */

static int
push(Pump *p, Cmd c)
{
    pthread_mutex_lock(&p->mu);
    if (p->stop_req) { /* the thread is ending or gone: nothing would take the command */
        pthread_mutex_unlock(&p->mu);
        PyErr_SetString(PyExc_RuntimeError, "pump stopped");
        return -1;
    }
    if (p->ncmds == p->capcmds) {
        size_t cap = p->capcmds ? p->capcmds * 2 : 16;
        Cmd *n = realloc(p->cmds, cap * sizeof *n);
        if (n == NULL) {
            pthread_mutex_unlock(&p->mu);
            PyErr_NoMemory();
            return -1;
        }
        p->cmds = n;
        p->capcmds = cap;
    }
    p->cmds[p->ncmds++] = c;
    if (c.kind == CMD_ADD)
        p->live++;
    pthread_mutex_unlock(&p->mu);
    wake(p->cmdfd);
    return 0;
}

static PyObject *
pump_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    int notifyfd;
    if (!PyArg_ParseTuple(args, "i:Pump", &notifyfd))
        return NULL;
    Pump *p = (Pump *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    p->epfd = p->cmdfd = -1;
    p->notifyfd = notifyfd;
    pthread_mutex_init(&p->mu, NULL);
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->cmdfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (p->epfd < 0 || p->cmdfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(p);
        return NULL;
    }
    struct epoll_event e;
    e.events = EPOLLIN;
    e.data.u64 = CMD_TAG;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->cmdfd, &e) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(p);
        return NULL;
    }
    int r = pthread_create(&p->thread, NULL, thread_main, p);
    if (r != 0) {
        errno = r;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(p);
        return NULL;
    }
    p->started = 1;
    return (PyObject *)p;
}

static void
pump_stop_thread(Pump *p)
{
    if (p->started && !p->stopped) {
        pthread_mutex_lock(&p->mu);
        p->stop_req = 1;
        pthread_mutex_unlock(&p->mu);
        wake(p->cmdfd);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(p->thread, NULL);
        Py_END_ALLOW_THREADS
        p->stopped = 1;
    }
}

static void
pump_dealloc(Pump *p)
{
    pump_stop_thread(p);
    if (p->epfd >= 0)
        close(p->epfd);
    if (p->cmdfd >= 0)
        close(p->cmdfd);
    free(p->cmds);
    free(p->closed);
    free(p->slots);
    free(p->free_slots);
    pthread_mutex_destroy(&p->mu);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

PyDoc_STRVAR(add_doc, "add(fd_a, fd_b) -> id: relay between two sockets from now on; the pump owns both fds.");

static PyObject *
pump_add(Pump *p, PyObject *args)
{
    int a, b;
    if (!PyArg_ParseTuple(args, "ii:add", &a, &b))
        return NULL;
    pthread_mutex_lock(&p->mu);
    long long id = ++p->next_id;
    pthread_mutex_unlock(&p->mu);
    Cmd c = {CMD_ADD, id, {a, b}};
    if (push(p, c) < 0)
        return NULL;
    return PyLong_FromLongLong(id);
}

PyDoc_STRVAR(close_doc, "close(id): end that pair now (both sockets closed); close(-1): every pair.");

static PyObject *
pump_close(Pump *p, PyObject *arg)
{
    long long id = PyLong_AsLongLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    Cmd c = {CMD_CLOSE, id, {-1, -1}};
    if (push(p, c) < 0)
        PyErr_Clear(); /* stopped: every pair is closed already */
    Py_RETURN_NONE;
}

PyDoc_STRVAR(take_closed_doc, "take_closed() -> [(id, errno)]: pairs ended since the last call (errno 0: end of input).");

static PyObject *
pump_take_closed(Pump *p, PyObject *unused)
{
    size_t n;
    Closed *c = take_all(p, (void **)&p->closed, &p->nclosed, &p->capclosed, &n);
    PyObject *out = PyList_New((Py_ssize_t)n);
    if (out != NULL)
        for (size_t i = 0; i < n; i++) {
            PyObject *t = Py_BuildValue("(Li)", c[i].id, c[i].err);
            if (t == NULL) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, (Py_ssize_t)i, t);
        }
    free(c);
    return out;
}

PyDoc_STRVAR(stop_doc, "stop(): close every pair and end the thread (waits for it).");

static PyObject *
pump_stop(Pump *p, PyObject *unused)
{
    pump_stop_thread(p);
    Py_RETURN_NONE;
}

static PyObject *
pump_live(Pump *p, void *closure)
{
    pthread_mutex_lock(&p->mu);
    size_t n = p->live;
    pthread_mutex_unlock(&p->mu);
    return PyLong_FromSize_t(n);
}

static PyMethodDef pump_methods[] = {
    {"add", (PyCFunction)pump_add, METH_VARARGS, add_doc},
    {"close", (PyCFunction)pump_close, METH_O, close_doc},
    {"take_closed", (PyCFunction)pump_take_closed, METH_NOARGS, take_closed_doc},
    {"stop", (PyCFunction)pump_stop, METH_NOARGS, stop_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pump_getset[] = {
    {"live", (getter)pump_live, NULL, "pairs relayed now (added and not yet reported closed)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgotel_proxy.proxy._pump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_dealloc = (destructor)pump_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pump(notify_fd): relays pairs of sockets on a thread of its own; writes notify_fd (an eventfd) when pairs end.",
    .tp_methods = pump_methods,
    .tp_getset = pump_getset,
    .tp_new = pump_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pump", "The bare relay of unobserved connections, in C (see Pump).", -1, NULL,
};

PyMODINIT_FUNC
PyInit__pump(void)
{
    if (PyType_Ready(&PumpType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PumpType);
    if (PyModule_AddObject(m, "Pump", (PyObject *)&PumpType) < 0) {
        Py_DECREF(&PumpType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
