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
 *
 * Observed pairs (traced sessions: add(..., observe=True)): fd_a is the
 * client, fd_b its server. Each chunk read is logged, with its receive time,
 * before it is sent on (take_log(): the event loop feeds the session from
 * it, so relaying comes first and observing happens on another thread). The
 * client's chunks are framed first (message type and length, what the codec
 * checks): a chunk holding a message the codec refuses is not forwarded, and
 * the pair is handed back, as it is when the server's side ends or fails: a
 * LOG_HANDBACK entry carries both descriptors (left open, the Python side's
 * now), the chunk not forwarded and the bytes kept for each side, and the
 * proxy answers as its asyncio relay does (08P01, 08006). The log is bounded
 * (log_limit): past it, observed pairs stop reading until it is taken.
 *
 * TLS legs (add(..., tls_a=, tls_b=): a _tls.Conn lent with the socket): the socket's ciphertext
 * goes into the connection's read BIO and what is relayed, logged and framed is the plaintext
 * it decrypts; bytes for a TLS leg are encrypted into its write BIO and drained to its socket,
 * and what the socket does not take is kept as ciphertext. A TLS leg may hold input its socket
 * no longer shows (has_input), which is read without waiting for epoll. The record layer is
 * _tls's, through the function pointers of _tlsapi.h: this file links no TLS library.
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
#include <time.h>
#include <unistd.h>

#include "../_pumplog.h" /* LOG_HEAD, LOG_CLIENT, LOG_SERVER, LOG_HANDBACK */
#include "_tlsapi.h"      /* TLS legs: the record layer of _tls.c */

#define CHUNK 65536
#define MAX_EVENTS 64
#define CMD_TAG UINT64_MAX
#define LOG_NOTIFY (1u << 20) /* the log this long wakes the event loop (else it looks every few ms) */

enum { CMD_ADD, CMD_CLOSE };

/* Why a pair is handed back. */
enum { BACK_VIOLATION = 1, BACK_SERVER_END = 2 };

typedef struct {
    int kind;
    long long id;
    int fd[2];
    TlsConn *tls[2]; /* lent by _tls (NULL: a plain leg) */
    int observe;
    uint32_t max_message;
    unsigned char types[32]; /* bitmap of the frontend message types (observed pairs) */
} Cmd;

/* One log entry's head; the bytes follow. */
typedef struct {
    long long id;
    int32_t kind;
    int32_t len;
    long long ts;
} LogHead;

/* What follows a LOG_HANDBACK head: the numbers, then the unforwarded chunk and the kept bytes. */
typedef struct {
    int32_t reason, err, fd_client, fd_server;
    uint32_t chunk, kept_to_server, kept_to_client, pad;
} Back;

typedef struct {
    long long id;
    int fd[2];
    TlsConn *tls[2]; /* fd[i]'s TLS connection, NULL for a plain leg */
    char *buf[2]; /* buf[i]: read from fd[i], not yet sent to fd[1 - i] (as sent: encrypted for a TLS leg) */
    size_t off[2], len[2];
    uint32_t ev[2]; /* what fd[i] is registered for */
    int hup[2];     /* fd[i] hung up: nothing can be sent to it; read to its end, out of epoll */
    int ending;     /* no more reads; sending what is kept, then closing */
    int err;        /* the first errno seen (0: end of input) */
    /* observed pairs: every chunk relayed is logged for the event loop, which observes it */
    int observe;
    int starved[2];          /* reading fd[i] waits until the event loop takes the log */
    uint32_t max_message;    /* a longer client message is a protocol violation */
    unsigned char types[32]; /* the frontend message types */
    uint32_t cskip;          /* bytes of the current client message still to come */
    unsigned char chdr[5];   /* a client message head split between chunks */
    int chn;
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
    /* the observation log (under mu): entries of observed pairs, in the order relayed */
    char *log;
    size_t loglen, logcap, log_limit;
    int notified;      /* the event loop was woken for this log */
    int resume_reads;  /* the log was taken: starved pairs may read again */
    /* thread-owned */
    Pair **slots;
    size_t nslots;
    size_t *free_slots;
    size_t nfree;
} Pump;

/* What the pump does with TLS legs (_tls's capsule, loaded by the first add() with one). */
static const TlsApi *tls_api;

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
    if (!q->ending && q->len[side] == 0 && !q->hup[1 - side] && !q->starved[side]) /* not for a socket that is gone */
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

/* A TLS leg that ends: its close_notify, as a TLS transport's close() sends it (best effort, once). */
static void
tls_goodbye(TlsConn *t, int fd)
{
    char alert[512];
    tls_api->close_notify(t);
    size_t n = tls_api->take_out(t, alert, sizeof alert);
    if (n > 0 && send(fd, alert, n, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
        /* the peer is gone or its socket full: it sees the end of the connection anyway */
    }
}

static void
pair_free(Pump *p, size_t slot, int err)
{
    Pair *q = p->slots[slot];
    for (int i = 0; i < 2; i++) {
        epoll_ctl(p->epfd, EPOLL_CTL_DEL, q->fd[i], NULL);
        if (q->tls[i] != NULL) {
            if (!q->hup[i])
                tls_goodbye(q->tls[i], q->fd[i]);
            tls_api->release(q->tls[i]);
        }
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

/* Keep n more bytes for fd[1 - side] behind what buf[side] holds. 0, or -1 (ENOMEM). */
static int
keep(Pair *q, int side, const char *d, size_t n)
{
    size_t have = q->len[side] - q->off[side];
    if (q->off[side] && have)
        memmove(q->buf[side], q->buf[side] + q->off[side], have);
    char *b = realloc(q->buf[side], have + n);
    if (b == NULL) {
        errno = ENOMEM;
        return -1;
    }
    memcpy(b + have, d, n);
    q->buf[side] = b;
    q->off[side] = 0;
    q->len[side] = have + n;
    return 0;
}

/* Send bytes (as they go on the wire) from side's direction to fd[1 - side], behind what waits
 * already; what the socket does not take is kept in buf[side]. 0, or -1 (errno). */
static int
send_keep(Pair *q, int side, const char *d, size_t n)
{
    if (q->len[side] == q->off[side]) {
        while (n > 0) {
            ssize_t s = send(q->fd[1 - side], d, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (s < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                return -1;
            }
            d += s;
            n -= (size_t)s;
        }
        if (n == 0)
            return 0;
    }
    return keep(q, side, d, n);
}

/* What fd[1 - side]'s TLS connection has to send (records, alerts), onto the wire or kept in
 * buf[side] (cbuf: CHUNK bytes of room). 0, or -1 (errno). */
static int
drain_tls(Pair *q, int side, char *cbuf)
{
    size_t m;
    while ((m = tls_api->take_out(q->tls[1 - side], cbuf, CHUNK)) > 0)
        if (send_keep(q, side, cbuf, m) < 0)
            return -1;
    return 0;
}

/* Relay n bytes read from side to fd[1 - side], encrypted first when that leg is TLS. 0, or -1 (errno). */
static int
relay_out(Pair *q, int side, const char *d, size_t n, char *cbuf)
{
    if (q->tls[1 - side] == NULL)
        return send_keep(q, side, d, n);
    if (tls_api->write(q->tls[1 - side], d, n) < 0) {
        errno = EPROTO;
        return -1;
    }
    return drain_tls(q, side, cbuf);
}

/* Read from fd[side] into chunk (CHUNK bytes), decrypted when that leg is TLS (its ciphertext
 * passes through cbuf): as recv() returns (0: the end of input, close_notify included).
 * *emptied: a short recv() of this pump_in found the socket empty; once the records it brought
 * are read, the next read waits for epoll rather than trying recv() again (as for plain legs). */
static ssize_t
leg_read(Pair *q, int side, char *chunk, char *cbuf, int *emptied)
{
    TlsConn *t = q->tls[side];
    if (t == NULL)
        return recv(q->fd[side], chunk, CHUNK, MSG_DONTWAIT);
    for (;;) {
        long n = tls_api->read(t, chunk, CHUNK);
        if (n > 0)
            return n;
        if (n == TLS_CLOSED)
            return 0;
        if (n == TLS_FAILED) {
            errno = EPROTO;
            return -1;
        }
        if (*emptied) {
            errno = EAGAIN;
            return -1;
        }
        ssize_t r = recv(q->fd[side], cbuf, CHUNK, MSG_DONTWAIT);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r; /* an end without close_notify is an end of input too, as on the asyncio relay */
        if (r < CHUNK && !q->hup[side])
            *emptied = 1;
        if (tls_api->feed(t, cbuf, (size_t)r) < 0) {
            errno = ENOMEM;
            return -1;
        }
    }
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

static long long
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts); /* time.time_ns()'s clock, as the codec's */
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Room for n more bytes in the log (under mu); 0 when memory ran out. */
static int
log_room(Pump *p, size_t n)
{
    if (p->loglen + n <= p->logcap)
        return 1;
    size_t cap = p->logcap ? p->logcap : 65536;
    while (cap < p->loglen + n)
        cap *= 2;
    char *l = realloc(p->log, cap);
    if (l == NULL)
        return 0;
    p->log = l;
    p->logcap = cap;
    return 1;
}

/* Append an entry: head, then up to three pieces of bytes. 0 when memory ran out. */
static int
log_entry(Pump *p, long long id, int kind, long long ts, const void *a, size_t na, const void *b, size_t nb,
          const void *c, size_t nc)
{
    LogHead h = {id, kind, (int32_t)(na + nb + nc), ts};
    int wake_loop = 0, ok = 0;
    pthread_mutex_lock(&p->mu);
    if (log_room(p, sizeof h + na + nb + nc)) {
        char *w = p->log + p->loglen;
        memcpy(w, &h, sizeof h);
        w += sizeof h;
        if (na)
            memcpy(w, a, na);
        if (nb)
            memcpy(w + na, b, nb);
        if (nc)
            memcpy(w + na + nb, c, nc);
        p->loglen += sizeof h + na + nb + nc;
        ok = 1;
    }
    if ((p->loglen >= LOG_NOTIFY || kind == LOG_HANDBACK) && !p->notified) {
        p->notified = 1;
        wake_loop = 1;
    }
    pthread_mutex_unlock(&p->mu);
    if (wake_loop)
        wake(p->notifyfd);
    return ok;
}

static int
log_full(Pump *p)
{
    pthread_mutex_lock(&p->mu);
    int full = p->loglen >= p->log_limit;
    pthread_mutex_unlock(&p->mu);
    return full;
}

/* Frame a chunk of client bytes (observed pairs): 1 when it holds a message the codec refuses
 * (a type that is not a frontend message, a length below 4 or above max_message). The pair's
 * framing state moves on only when the whole chunk is good: a bad chunk is not forwarded. */
static int
frame_client(Pair *q, const unsigned char *d, size_t n)
{
    uint32_t skip = q->cskip;
    unsigned char hdr[5];
    int hn = q->chn;
    memcpy(hdr, q->chdr, 5);
    size_t pos = 0;
    while (pos < n) {
        if (skip) {
            size_t take = n - pos < skip ? n - pos : skip;
            pos += take;
            skip -= (uint32_t)take;
            continue;
        }
        while (hn < 5 && pos < n)
            hdr[hn++] = d[pos++];
        if (hn < 5)
            break;
        uint32_t len = ((uint32_t)hdr[1] << 24) | ((uint32_t)hdr[2] << 16) | ((uint32_t)hdr[3] << 8) | hdr[4];
        if (!(q->types[hdr[0] >> 3] & (1u << (hdr[0] & 7))) || len < 4 || len > q->max_message)
            return 1;
        skip = len - 4;
        hn = 0;
    }
    q->cskip = skip;
    q->chn = hn;
    memcpy(q->chdr, hdr, 5);
    return 0;
}

/* Give an observed pair back to the event loop: out of epoll, its sockets left open for the
 * Python side, what it kept logged, the pair freed. Returns 1 (the pair is gone). */
static int
hand_back(Pump *p, size_t slot, int reason, int err, const char *chunk, size_t n)
{
    Pair *q = p->slots[slot];
    for (int i = 0; i < 2; i++)
        if (!q->hup[i])
            epoll_ctl(p->epfd, EPOLL_CTL_DEL, q->fd[i], NULL);
    /* The TLS connections are the event loop's again (it takes the pair over with them): the
     * bytes kept are already encrypted for them, and what they still hold is read from there. */
    for (int i = 0; i < 2; i++)
        if (q->tls[i] != NULL) {
            tls_api->release(q->tls[i]);
            q->tls[i] = NULL;
        }
    size_t k0 = q->len[0] - q->off[0], k1 = q->len[1] - q->off[1];
    Back b = {reason, err, q->fd[0], q->fd[1], (uint32_t)n, (uint32_t)k0, (uint32_t)k1, 0};
    /* one entry: Back, the chunk not forwarded, then what each direction kept */
    char *joined = malloc(sizeof b + n + 1);
    int ok = 0;
    if (joined != NULL) {
        memcpy(joined, &b, sizeof b);
        if (n)
            memcpy(joined + sizeof b, chunk, n);
        ok = log_entry(p, q->id, LOG_HANDBACK, now_ns(), joined, sizeof b + n, q->buf[0] ? q->buf[0] + q->off[0] : NULL, k0,
                       q->buf[1] ? q->buf[1] + q->off[1] : NULL, k1);
        free(joined);
    }
    if (!ok) { /* the event loop cannot take it over: end the pair as a broken one */
        close(q->fd[0]);
        close(q->fd[1]);
    }
    long long id = q->id;
    free(q->buf[0]);
    free(q->buf[1]);
    free(q);
    p->slots[slot] = NULL;
    p->free_slots[p->nfree++] = slot;
    if (ok) {
        pthread_mutex_lock(&p->mu);
        p->live--;
        pthread_mutex_unlock(&p->mu);
    } else {
        report_closed(p, id, ENOMEM);
    }
    return 1;
}

/* Read from side and send on; 1 when the pair is to be freed now, 2 when it was handed back.
 * chunk: 2 * CHUNK bytes, the plaintext read and room for ciphertext. */
static int
pump_in(Pump *p, size_t slot, int side, char *chunk)
{
    Pair *q = p->slots[slot];
    char *cbuf = chunk + CHUNK;
    int emptied = 0;
    for (;;) {
        if (q->observe && log_full(p)) {
            q->starved[side] = 1; /* the event loop is behind: this side reads again once it caught up */
            return 0;
        }
        ssize_t n = leg_read(q, side, chunk, cbuf, &emptied);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (q->observe && side == 1) {
                hand_back(p, slot, BACK_SERVER_END, errno, NULL, 0);
                return 2;
            }
            return broken(q, errno);
        }
        if (n == 0) {
            if (q->observe && side == 1) { /* the proxy may have words for the client (08006) */
                hand_back(p, slot, BACK_SERVER_END, 0, NULL, 0);
                return 2;
            }
            return begin_end(q, 0);
        }
        long long ts = q->observe ? now_ns() : 0;
        if (q->observe && side == 0 && frame_client(q, (const unsigned char *)chunk, (size_t)n)) {
            hand_back(p, slot, BACK_VIOLATION, 0, chunk, (size_t)n); /* the proxy answers 08P01 */
            return 2;
        }
        /* Logged before it is sent: once a peer has these bytes, the event loop can see them (a
         * client that got its answer and asks the proxy to flush finds the statement finished). */
        if (q->observe && !log_entry(p, q->id, side == 0 ? LOG_CLIENT : LOG_SERVER, ts, chunk, (size_t)n, NULL, 0, NULL, 0))
            return broken(q, ENOMEM); /* observation cannot go on without this chunk */
        /* What reading a TLS leg made it send (a key update's answer) goes first. */
        int r = q->tls[side] != NULL ? drain_tls(q, 1 - side, cbuf) : 0;
        if (r == 0)
            r = relay_out(q, side, chunk, (size_t)n, cbuf);
        if (r < 0) {
            if (errno == ENOMEM) {
                begin_end(q, ENOMEM);
                return 1;
            }
            if (q->observe && side == 0) { /* the server is gone (the chunk was logged): back */
                hand_back(p, slot, BACK_SERVER_END, errno, NULL, 0);
                return 2;
            }
            return broken(q, errno);
        }
        if (q->len[side] > q->off[side])
            return 0; /* reading this side waits until what is kept has left */
        if (n < CHUNK && !q->hup[side] && q->tls[side] == NULL)
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
        if (q->observe && side == 1) { /* the proxy may have words for the client (08006) */
            hand_back(p, slot, BACK_SERVER_END, sock_error(q->fd[1]), NULL, 0);
            return;
        }
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
        if (q->observe && side == 1) {
            hand_back(p, slot, BACK_SERVER_END, errno, NULL, 0);
            return;
        }
        begin_end(q, errno);
        pair_free(p, slot, q->err);
        return;
    }
    if (!q->ending && q->len[side] == 0 && !q->starved[side] && (events & (EPOLLIN | EPOLLHUP)))
        done = pump_in(p, slot, side, chunk);
    if (done == 2)
        return; /* handed back */
    /* A hung-up side whose kept bytes have left is read on here (epoll no longer says). */
    for (int i = 0; i < 2 && !done; i++)
        if (q->hup[i] && !q->ending && q->len[i] == 0 && !q->starved[i] &&
            (i != side || !(events & (EPOLLIN | EPOLLHUP))))
            done = pump_in(p, slot, i, chunk);
    if (done == 2)
        return;
    /* A TLS leg may hold input its socket no longer has (read but not yet relayed when the
     * other side's socket was full, or when the pair came to the pump): epoll cannot say. */
    for (int i = 0; i < 2 && !done; i++)
        if (q->tls[i] != NULL && !q->ending && q->len[i] == 0 && !q->starved[i] && tls_api->has_input(q->tls[i]))
            done = pump_in(p, slot, i, chunk);
    if (done == 2)
        return;
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
release_cmd(Cmd *c)
{
    for (int i = 0; i < 2; i++)
        if (c->tls[i] != NULL) {
            tls_api->release(c->tls[i]);
            c->tls[i] = NULL;
        }
}

static void
add_pair(Pump *p, Cmd *c, char *chunk)
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
    q->tls[0] = c->tls[0];
    q->tls[1] = c->tls[1];
    c->tls[0] = c->tls[1] = NULL; /* the pair's now */
    q->observe = c->observe;
    q->max_message = c->max_message;
    memcpy(q->types, c->types, sizeof q->types);
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
    /* Input the TLS legs hold already (records that came with the start-up's last bytes). */
    for (int i = 0; i < 2; i++)
        if (p->slots[slot] == q && q->tls[i] != NULL && tls_api->has_input(q->tls[i]))
            handle(p, ((uint64_t)slot << 1) | (uint64_t)i, EPOLLIN, chunk);
    return;
fail:
    free(q);
    release_cmd(c);
    close(c->fd[0]);
    close(c->fd[1]);
    report_closed(p, c->id, ENOMEM); /* so that the connection ends */
}

/* The event loop took the log: pairs that stopped reading for it read again. */
static void
resume_starved(Pump *p, char *chunk)
{
    for (size_t s = 0; s < p->nslots; s++) {
        Pair *q = p->slots[s];
        if (q == NULL || !(q->starved[0] || q->starved[1]))
            continue;
        for (int i = 0; i < 2 && p->slots[s] != NULL; i++)
            if (p->slots[s]->starved[i]) {
                p->slots[s]->starved[i] = 0;
                /* as if epoll said the side is readable: reads, registers again, or ends */
                handle(p, ((uint64_t)s << 1) | (uint64_t)i, EPOLLIN, chunk);
            }
    }
}

static int
run_commands(Pump *p, char *chunk)
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
            add_pair(p, c, chunk);
        } else {
            for (size_t s = 0; s < p->nslots; s++)
                if (p->slots[s] != NULL && (c->id < 0 || p->slots[s]->id == c->id))
                    pair_free(p, s, ECONNABORTED);
        }
    }
    free(cmds);
    pthread_mutex_lock(&p->mu);
    int stop = p->stop_req, resume = p->resume_reads;
    p->resume_reads = 0;
    pthread_mutex_unlock(&p->mu);
    if (resume && !stop)
        resume_starved(p, chunk);
    return stop;
}

static void *
thread_main(void *arg)
{
    Pump *p = (Pump *)arg;
    struct epoll_event events[MAX_EVENTS];
    char *chunk = malloc(2 * CHUNK); /* what is read, and room for ciphertext (pump_in) */
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
        if (commands && run_commands(p, chunk))
            break;
    }
    /* Ending: pairs still queued to be added are closed too (a stop may come right after an add). */
    size_t n;
    Cmd *cmds = take_all(p, (void **)&p->cmds, &p->ncmds, &p->capcmds, &n);
    for (size_t i = 0; i < n; i++)
        if (cmds[i].kind == CMD_ADD) {
            release_cmd(&cmds[i]);
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
    Py_ssize_t log_limit = 16 << 20;
    static char *kwlist[] = {"notify_fd", "log_limit", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|n:Pump", kwlist, &notifyfd, &log_limit))
        return NULL;
    if (log_limit < 1) {
        PyErr_SetString(PyExc_ValueError, "log_limit must be positive");
        return NULL;
    }
    Pump *p = (Pump *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    p->epfd = p->cmdfd = -1;
    p->notifyfd = notifyfd;
    p->log_limit = (size_t)log_limit;
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
    free(p->log);
    free(p->slots);
    free(p->free_slots);
    pthread_mutex_destroy(&p->mu);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

PyDoc_STRVAR(add_doc,
"add(fd_a, fd_b, observe=False, max_message=0, types=b'', tls_a=None, tls_b=None) -> id: relay between two\n"
"sockets from now on; the pump owns both fds. observe: fd_a is a client and fd_b its server; every chunk relayed\n"
"is logged (take_log), the client's messages are framed before they are forwarded (types: the frontend message\n"
"type bytes, max_message: the longest message), and on a refused chunk or the server's end the pair is handed\n"
"back. tls_a, tls_b: a leg's established TLS connection (a _tls.Conn), lent to the pump until the pair ends or is\n"
"handed back; what is logged is plaintext, what is kept in a hand-back is as it goes on the wire.");

/* The TLS connection of a leg for the pump (NULL for None; -1 with an exception). */
static int
lend_tls(PyObject *obj, TlsConn **out)
{
    *out = NULL;
    if (obj == NULL || obj == Py_None)
        return 0;
    if (tls_api == NULL) {
        const TlsApi *api = PyCapsule_Import(TLS_API_CAPSULE, 0);
        if (api == NULL)
            return -1;
        if (api->version != TLS_API_VERSION) {
            PyErr_SetString(PyExc_RuntimeError, "the pump and _tls were built apart (TLS API versions differ)");
            return -1;
        }
        tls_api = api;
    }
    *out = tls_api->lend(obj);
    return *out == NULL ? -1 : 0;
}

static PyObject *
pump_add(Pump *p, PyObject *args, PyObject *kw)
{
    int a, b, observe = 0;
    unsigned long max_message = 0;
    Py_buffer types = {0};
    PyObject *tls_a = NULL, *tls_b = NULL;
    static char *kwlist[] = {"fd_a", "fd_b", "observe", "max_message", "types", "tls_a", "tls_b", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ii|pky*OO:add", kwlist, &a, &b, &observe, &max_message, &types,
                                     &tls_a, &tls_b))
        return NULL;
    Cmd c;
    memset(&c, 0, sizeof c);
    if (lend_tls(tls_a, &c.tls[0]) < 0 || lend_tls(tls_b, &c.tls[1]) < 0) {
        if (c.tls[0] != NULL)
            tls_api->release(c.tls[0]);
        if (types.obj != NULL)
            PyBuffer_Release(&types);
        return NULL;
    }
    c.kind = CMD_ADD;
    c.fd[0] = a;
    c.fd[1] = b;
    c.observe = observe;
    c.max_message = max_message > UINT32_MAX ? UINT32_MAX : (uint32_t)max_message;
    for (Py_ssize_t i = 0; i < types.len; i++) {
        unsigned char t = ((const unsigned char *)types.buf)[i];
        c.types[t >> 3] |= (unsigned char)(1u << (t & 7));
    }
    if (types.obj != NULL)
        PyBuffer_Release(&types);
    pthread_mutex_lock(&p->mu);
    c.id = ++p->next_id;
    pthread_mutex_unlock(&p->mu);
    if (push(p, c) < 0) {
        release_cmd(&c);
        return NULL;
    }
    return PyLong_FromLongLong(c.id);
}

PyDoc_STRVAR(take_log_doc,
"take_log() -> bytes: the observation log since the last call (entries: id int64, kind int32, length int32,\n"
"receive time ns int64, then length bytes; kind 0 client bytes, 1 server bytes, 2 the pair handed back:\n"
"LOG_CLIENT, LOG_SERVER, LOG_HANDBACK in _pumplog.h).");

static PyObject *
pump_take_log(Pump *p, PyObject *unused)
{
    (void)unused;
    pthread_mutex_lock(&p->mu);
    char *log = p->log;
    size_t n = p->loglen;
    int resume = n >= p->log_limit;
    p->log = NULL;
    p->loglen = p->logcap = 0;
    p->notified = 0;
    if (resume)
        p->resume_reads = 1;
    pthread_mutex_unlock(&p->mu);
    if (resume)
        wake(p->cmdfd);
    PyObject *out = PyBytes_FromStringAndSize(log ? log : "", (Py_ssize_t)n);
    free(log);
    return out;
}

PyDoc_STRVAR(close_doc, "close(id): end that pair now (both sockets closed); close(-1): every pair.");

static PyObject *
pump_close(Pump *p, PyObject *arg)
{
    long long id = PyLong_AsLongLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    Cmd c;
    memset(&c, 0, sizeof c);
    c.kind = CMD_CLOSE;
    c.id = id;
    c.fd[0] = c.fd[1] = -1;
    if (push(p, c) < 0)
        PyErr_Clear(); /* stopped: every pair is closed already */
    Py_RETURN_NONE;
}

PyDoc_STRVAR(take_closed_doc, "take_closed() -> [(id, errno)]: pairs ended since the last call (errno 0: end of input).");

static PyObject *
pump_take_closed(Pump *p, PyObject *unused)
{
    (void)unused;
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
    (void)unused;
    pump_stop_thread(p);
    Py_RETURN_NONE;
}

static PyObject *
pump_live(Pump *p, void *closure)
{
    (void)closure;
    pthread_mutex_lock(&p->mu);
    size_t n = p->live;
    pthread_mutex_unlock(&p->mu);
    return PyLong_FromSize_t(n);
}

static PyMethodDef pump_methods[] = {
    {"add", (PyCFunction)(void (*)(void))pump_add, METH_VARARGS | METH_KEYWORDS, add_doc},
    {"take_log", (PyCFunction)pump_take_log, METH_NOARGS, take_log_doc},
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
    .tp_doc = "Pump(notify_fd, log_limit=16 MiB): relays pairs of sockets on a thread of its own; writes notify_fd (an eventfd)\n"
              "when pairs end, when a pair is handed back and when the observation log passes 1 MiB.",
    .tp_methods = pump_methods,
    .tp_getset = pump_getset,
    .tp_new = pump_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pump", "The bare relay of unobserved connections, in C (see Pump).", -1, NULL,
    NULL, NULL, NULL, NULL, /* m_slots, m_traverse, m_clear, m_free */
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
