/*
 * What the pump (_pump.c) may do with a TLS connection of _tls.c: its record layer, on memory
 * BIOs, through function pointers published as a capsule (TLS_API_CAPSULE). The pump links no
 * TLS library of its own: without _tls (no OpenSSL headers at build time) it relays plain pairs.
 *
 * A connection is lent to the pump (lend, with the interpreter lock, from add()) and used by the
 * pump's thread alone until it is released (release, any thread, no lock): while lent, its
 * Python object refuses every call. The last of the object and the pump to let go frees it.
 */
#ifndef PGOTEL_TLSAPI_H
#define PGOTEL_TLSAPI_H

#include <Python.h>
#include <stddef.h>

#define TLS_API_CAPSULE "pgotel_proxy.proxy._tls.API"
#define TLS_API_VERSION 1

/* What read() returns besides a count of plaintext bytes. */
#define TLS_NEEDS_INPUT 0 /* no whole record buffered: feed more ciphertext */
#define TLS_CLOSED (-1)   /* the peer sent close_notify: end of input */
#define TLS_FAILED (-2)   /* a protocol error (a bad record, an alert): the connection is broken */

typedef struct TlsConn TlsConn;

typedef struct {
    int version;
    /* The TLS connection of a _tls.Conn, now the pump's (NULL with an exception set). */
    TlsConn *(*lend)(PyObject *conn);
    /* The pump is done with it: the Python object may use it again, or it is freed. */
    void (*release)(TlsConn *t);
    /* Ciphertext received from the socket: 0, or -1 when memory ran out. */
    int (*feed)(TlsConn *t, const void *data, size_t n);
    /* Plaintext, up to cap bytes (several records): > 0, TLS_NEEDS_INPUT, TLS_CLOSED or TLS_FAILED. */
    long (*read)(TlsConn *t, void *buf, size_t cap);
    /* Encrypt n plaintext bytes (all of them, as records): 0, or TLS_FAILED. */
    int (*write)(TlsConn *t, const void *data, size_t n);
    /* Ciphertext to send, up to cap bytes: the count (0: nothing waits). */
    size_t (*take_out)(TlsConn *t, void *buf, size_t cap);
    /* Whether input is buffered (ciphertext not yet decrypted, or plaintext not yet read). */
    int (*has_input)(TlsConn *t);
    /* Queue a close_notify (take_out then has it). */
    void (*close_notify)(TlsConn *t);
} TlsApi;

#endif
