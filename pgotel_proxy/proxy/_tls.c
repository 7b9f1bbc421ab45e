/*
 * The proxy's TLS, in C, on OpenSSL: one implementation for both legs, from start-up to the pump.
 *
 * Context holds an SSL_CTX configured as pgotel_proxy.proxy.tls describes (the client leg's
 * server side with its certificate and ALPN; the upstream leg's client side with its sslmode's
 * verification). Conn is one TLS connection on memory BIOs, like ssl.SSLObject: the caller
 * moves ciphertext between the socket and the BIOs (feed, take_out) and plaintext through
 * read and write. Start-up drives it from the event loop (tls.py's transport); once a session
 * has nothing to splice in, the connection is lent to the pump (_pump.c) with the sockets, and
 * the pump's thread does the same record I/O without the interpreter (_tlsapi.h).
 *
 * Python's ssl objects cannot be used for that: their SSL* is private to CPython's _ssl, and
 * OpenSSL has no way to move an established connection from one SSL object to another.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "_tlsapi.h"

#define READ_CAP (256 * 1024) /* plaintext handed to Python per read() */

/* The cipher list (TLS 1.2) and options Python's ssl module sets on a new context, so that the
 * proxy offers what it offered with that module. Renegotiation is refused, as PostgreSQL and
 * libpq refuse it. */
#define CIPHERS "@SECLEVEL=2:ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM"
#define OPTIONS                                                                                                    \
    ((SSL_OP_ALL & ~(SSL_OP_DONT_INSERT_EMPTY_FRAGMENTS | SSL_OP_LEGACY_SERVER_CONNECT)) | SSL_OP_NO_SSLv3 |      \
     SSL_OP_NO_COMPRESSION | SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_ENABLE_MIDDLEBOX_COMPAT |                    \
     SSL_OP_NO_RENEGOTIATION)

static PyObject *TlsError;

struct TlsConn {
    atomic_int refs; /* the Python object's and the pump's */
    atomic_int lent; /* the pump's thread uses it: Python must not */
    SSL *ssl;
};

static void
conn_unref(TlsConn *t)
{
    if (atomic_fetch_sub(&t->refs, 1) == 1) {
        SSL_free(t->ssl); /* and its BIOs */
        free(t);
    }
}

/* Raise TlsError with what OpenSSL's error queue says (what: the operation). */
static PyObject *
raise_openssl(const char *what)
{
    unsigned long e = ERR_peek_last_error();
    const char *reason = e ? ERR_reason_error_string(e) : NULL;
    ERR_clear_error();
    PyErr_Format(TlsError, "%s: %s", what, reason ? reason : "unknown TLS error");
    return NULL;
}

/* ------------------------------------------------------------ Context */

/* A server's ALPN protocols, owned by its SSL_CTX (ex_data, freed with it): a connection may
 * outlive the Python Context it was made from (a reload; a session on the pump). */
typedef struct {
    unsigned int len;
    unsigned char wire[256]; /* length-prefixed names */
} Alpn;

static int alpn_index = -1;

static void
alpn_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
    free(ptr);
}

typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
    int server_side;
    int check_hostname;
} Context;

/* The server picks the first of its protocols the client offers; none in common: no ALPN (the
 * handshake goes on; direct TLS, which needs it, is refused by the caller). */
static int
select_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in, unsigned int inlen,
            void *arg)
{
    (void)ssl;
    const Alpn *a = (const Alpn *)arg;
    unsigned char *o;
    if (SSL_select_next_proto(&o, outlen, a->wire, a->len, in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = o;
    return SSL_TLSEXT_ERR_OK;
}

static void
context_dealloc(Context *c)
{
    SSL_CTX_free(c->ctx);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *
context_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    int server_side, verify = 0, check_hostname = 0;
    const char *min_version = "TLSv1.2", *cert = NULL, *key = NULL, *ca = NULL;
    Py_buffer alpn = {0};
    static char *kwlist[] = {"server_side", "min_version", "cert", "key", "verify", "ca", "check_hostname", "alpn", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "p|szzpzpy*:Context", kwlist, &server_side, &min_version, &cert, &key,
                                     &verify, &ca, &check_hostname, &alpn))
        return NULL;
    Context *c = NULL;
    if (alpn.obj != NULL && (size_t)alpn.len > sizeof ((Alpn *)NULL)->wire) {
        PyBuffer_Release(&alpn);
        PyErr_SetString(PyExc_ValueError, "alpn: too long");
        return NULL;
    }
    c = (Context *)type->tp_alloc(type, 0);
    if (c == NULL)
        goto out;
    c->server_side = server_side;
    c->check_hostname = check_hostname;
    ERR_clear_error();
    c->ctx = SSL_CTX_new(server_side ? TLS_server_method() : TLS_client_method());
    if (c->ctx == NULL) {
        raise_openssl("cannot create a TLS context");
        goto fail;
    }
    SSL_CTX_set_options(c->ctx, OPTIONS);
    if (SSL_CTX_set_cipher_list(c->ctx, CIPHERS) != 1) {
        raise_openssl("cannot set the cipher list");
        goto fail;
    }
    int min = strcmp(min_version, "TLSv1.3") == 0 ? TLS1_3_VERSION : TLS1_2_VERSION;
    SSL_CTX_set_min_proto_version(c->ctx, min);
    SSL_CTX_set_mode(c->ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    X509_VERIFY_PARAM_set_hostflags(SSL_CTX_get0_param(c->ctx), X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    if (verify) {
        SSL_CTX_set_verify(c->ctx, SSL_VERIFY_PEER, NULL);
        if (ca != NULL ? SSL_CTX_load_verify_locations(c->ctx, ca, NULL) != 1
                       : SSL_CTX_set_default_verify_paths(c->ctx) != 1) {
            PyErr_Clear();
            raise_openssl(ca != NULL ? "cannot load the CA certificates" : "cannot load the system's CA certificates");
            goto fail;
        }
    } else {
        SSL_CTX_set_verify(c->ctx, SSL_VERIFY_NONE, NULL);
    }
    if (cert != NULL && key != NULL) {
        if (SSL_CTX_use_certificate_chain_file(c->ctx, cert) != 1) {
            raise_openssl("cannot load the certificate");
            goto fail;
        }
        if (SSL_CTX_use_PrivateKey_file(c->ctx, key, SSL_FILETYPE_PEM) != 1) {
            raise_openssl("cannot load the private key");
            goto fail;
        }
        if (SSL_CTX_check_private_key(c->ctx) != 1) {
            raise_openssl("the private key does not match the certificate");
            goto fail;
        }
    }
    if (alpn.obj != NULL && alpn.len > 0) {
        if (server_side) {
            Alpn *a = malloc(sizeof *a);
            if (a == NULL || !SSL_CTX_set_ex_data(c->ctx, alpn_index, a)) {
                free(a);
                PyErr_NoMemory();
                goto fail;
            }
            memcpy(a->wire, alpn.buf, (size_t)alpn.len);
            a->len = (unsigned int)alpn.len;
            SSL_CTX_set_alpn_select_cb(c->ctx, select_alpn, a);
        } else if (SSL_CTX_set_alpn_protos(c->ctx, alpn.buf, (unsigned int)alpn.len) != 0) {
            raise_openssl("cannot set ALPN");
            goto fail;
        }
    }
    goto out;
fail:
    Py_CLEAR(c);
out:
    if (alpn.obj != NULL)
        PyBuffer_Release(&alpn);
    return (PyObject *)c;
}

static PyTypeObject ContextType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgotel_proxy.proxy._tls.Context",
    .tp_basicsize = sizeof(Context),
    .tp_dealloc = (destructor)context_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Context(server_side, min_version='TLSv1.2', cert=None, key=None, verify=False, ca=None,\n"
              "check_hostname=False, alpn=b''): an SSL_CTX. verify: check the peer's certificate against ca (a\n"
              "PEM file; None: the system's); check_hostname: also against the name given to Conn; alpn: the\n"
              "protocols in wire format (a server picks from them, a client offers them).",
    .tp_new = context_new,
};

/* --------------------------------------------------------------- Conn */

typedef struct {
    PyObject_HEAD
    TlsConn *t;
    PyObject *hostname; /* for error messages (str or None) */
} Conn;

static PyTypeObject ConnType;

static void
conn_dealloc(Conn *c)
{
    if (c->t != NULL)
        conn_unref(c->t);
    Py_XDECREF(c->hostname);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *
conn_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    Context *ctx;
    PyObject *hostname = Py_None;
    static char *kwlist[] = {"context", "server_hostname", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|O:Conn", kwlist, &ContextType, &ctx, &hostname))
        return NULL;
    if (hostname != Py_None && !PyUnicode_Check(hostname)) {
        PyErr_SetString(PyExc_TypeError, "server_hostname: str or None");
        return NULL;
    }
    if (ctx->check_hostname && (hostname == Py_None || PyUnicode_GET_LENGTH(hostname) == 0)) {
        PyErr_SetString(PyExc_ValueError, "check_hostname requires server_hostname");
        return NULL;
    }
    Conn *c = (Conn *)type->tp_alloc(type, 0);
    if (c == NULL)
        return NULL;
    Py_INCREF(hostname);
    c->hostname = hostname;
    ERR_clear_error();
    TlsConn *t = calloc(1, sizeof *t);
    if (t == NULL) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    atomic_init(&t->refs, 1);
    atomic_init(&t->lent, 0);
    c->t = t;
    t->ssl = SSL_new(ctx->ctx);
    BIO *rbio = BIO_new(BIO_s_mem()), *wbio = BIO_new(BIO_s_mem());
    if (t->ssl == NULL || rbio == NULL || wbio == NULL) {
        BIO_free(rbio);
        BIO_free(wbio);
        Py_DECREF(c);
        return raise_openssl("cannot create a TLS connection");
    }
    BIO_set_mem_eof_return(rbio, -1); /* empty: "try again", not end of input */
    BIO_set_mem_eof_return(wbio, -1);
    SSL_set_bio(t->ssl, rbio, wbio);
    if (ctx->server_side) {
        SSL_set_accept_state(t->ssl);
    } else {
        SSL_set_connect_state(t->ssl);
        if (hostname != Py_None && PyUnicode_GET_LENGTH(hostname) > 0) {
            const char *name = PyUnicode_AsUTF8(hostname);
            if (name == NULL) {
                Py_DECREF(c);
                return NULL;
            }
            ASN1_OCTET_STRING *ip = a2i_IPADDRESS(name);
            int ok = 1;
            if (ip == NULL) /* a name: sent as SNI (an address is not) */
                ok = SSL_set_tlsext_host_name(t->ssl, name) == 1;
            if (ok && ctx->check_hostname) {
                X509_VERIFY_PARAM *param = SSL_get0_param(t->ssl);
                ok = ip != NULL ? X509_VERIFY_PARAM_set1_ip(param, ASN1_STRING_get0_data(ip), (size_t)ASN1_STRING_length(ip))
                                : X509_VERIFY_PARAM_set1_host(param, name, 0);
            }
            ASN1_OCTET_STRING_free(ip);
            if (!ok) {
                Py_DECREF(c);
                return raise_openssl("cannot set the server name");
            }
        }
    }
    return (PyObject *)c;
}

/* The connection, when Python may use it (else NULL with an exception). */
static TlsConn *
usable(Conn *c)
{
    if (atomic_load(&c->t->lent)) {
        PyErr_SetString(PyExc_RuntimeError, "the TLS connection is relayed by the pump");
        return NULL;
    }
    return c->t;
}

/* Raise for a failed handshake or record: a certificate the checks refused says why. */
static PyObject *
raise_failure(Conn *c, SSL *ssl, int err)
{
    long v = SSL_get_verify_result(ssl);
    if (v != X509_V_OK && ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_CERTIFICATE_VERIFY_FAILED) {
        ERR_clear_error();
        if (v == X509_V_ERR_HOSTNAME_MISMATCH || v == X509_V_ERR_IP_ADDRESS_MISMATCH)
            PyErr_Format(TlsError, "certificate verify failed: %s mismatch, certificate is not valid for %R",
                         v == X509_V_ERR_HOSTNAME_MISMATCH ? "Hostname" : "IP address", c->hostname);
        else
            PyErr_Format(TlsError, "certificate verify failed: %s", X509_verify_cert_error_string(v));
        return NULL;
    }
    if (err == SSL_ERROR_SYSCALL && ERR_peek_last_error() == 0) {
        PyErr_SetString(TlsError, "TLS connection ended in violation of the protocol");
        return NULL;
    }
    return raise_openssl("TLS error");
}

static PyObject *
conn_do_handshake(Conn *c, PyObject *unused)
{
    (void)unused;
    TlsConn *t = usable(c);
    if (t == NULL)
        return NULL;
    ERR_clear_error();
    int r = SSL_do_handshake(t->ssl);
    if (r == 1)
        Py_RETURN_TRUE;
    int err = SSL_get_error(t->ssl, r);
    if (err == SSL_ERROR_WANT_READ) {
        ERR_clear_error();
        Py_RETURN_FALSE;
    }
    return raise_failure(c, t->ssl, err);
}

static PyObject *
conn_feed(Conn *c, PyObject *arg)
{
    TlsConn *t = usable(c);
    if (t == NULL)
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    int ok = b.len == 0 || BIO_write(SSL_get_rbio(t->ssl), b.buf, (int)b.len) == (int)b.len;
    PyBuffer_Release(&b);
    if (!ok)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Plaintext into buf: > 0 bytes, TLS_NEEDS_INPUT, TLS_CLOSED or TLS_FAILED (err: the SSL error). */
static long
read_records(TlsConn *t, char *buf, size_t cap, int *err)
{
    size_t got = 0;
    ERR_clear_error();
    while (got < cap) {
        size_t n = 0;
        if (SSL_read_ex(t->ssl, buf + got, cap - got, &n) == 1) {
            got += n;
            continue;
        }
        int e = SSL_get_error(t->ssl, 0);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            ERR_clear_error();
            break;
        }
        if (got)
            break; /* the end (or the failure) is seen again by the next call */
        *err = e;
        return e == SSL_ERROR_ZERO_RETURN ? TLS_CLOSED : TLS_FAILED;
    }
    return (long)got;
}

static PyObject *
conn_read(Conn *c, PyObject *unused)
{
    (void)unused;
    TlsConn *t = usable(c);
    if (t == NULL)
        return NULL;
    static char plain[READ_CAP]; /* under the interpreter lock */
    int err = 0;
    long n = read_records(t, plain, READ_CAP, &err);
    if (n == TLS_CLOSED)
        Py_RETURN_NONE;
    if (n == TLS_FAILED)
        return raise_failure(c, t->ssl, err);
    return PyBytes_FromStringAndSize(plain, n);
}

/* Everything the write BIO holds, as bytes. */
static PyObject *
take_all_out(TlsConn *t)
{
    BIO *w = SSL_get_wbio(t->ssl);
    size_t n = BIO_ctrl_pending(w);
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (out != NULL && n > 0 && BIO_read(w, PyBytes_AS_STRING(out), (int)n) != (int)n) {
        Py_DECREF(out);
        PyErr_SetString(TlsError, "cannot take the TLS output");
        return NULL;
    }
    return out;
}

static int
write_records(TlsConn *t, const char *data, size_t n)
{
    ERR_clear_error();
    while (n > 0) {
        size_t w = 0;
        if (SSL_write_ex(t->ssl, data, n, &w) != 1)
            return TLS_FAILED; /* no renegotiation: a write never waits for input */
        data += w;
        n -= w;
    }
    return 0;
}

static PyObject *
conn_write(Conn *c, PyObject *arg)
{
    TlsConn *t = usable(c);
    if (t == NULL)
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    int r = write_records(t, b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    if (r < 0)
        return raise_failure(c, t->ssl, SSL_ERROR_SSL);
    return take_all_out(t);
}

static PyObject *
conn_take_out(Conn *c, PyObject *unused)
{
    (void)unused;
    TlsConn *t = usable(c);
    return t == NULL ? NULL : take_all_out(t);
}

static PyObject *
conn_shutdown(Conn *c, PyObject *unused)
{
    (void)unused;
    TlsConn *t = usable(c);
    if (t == NULL)
        return NULL;
    if (SSL_is_init_finished(t->ssl) && !(SSL_get_shutdown(t->ssl) & SSL_SENT_SHUTDOWN))
        SSL_shutdown(t->ssl);
    ERR_clear_error();
    return take_all_out(t);
}

static PyObject *
conn_selected_alpn_protocol(Conn *c, PyObject *unused)
{
    (void)unused;
    TlsConn *t = usable(c);
    if (t == NULL)
        return NULL;
    const unsigned char *p = NULL;
    unsigned int n = 0;
    SSL_get0_alpn_selected(t->ssl, &p, &n);
    if (p == NULL || n == 0)
        Py_RETURN_NONE;
    return PyUnicode_DecodeASCII((const char *)p, n, "replace");
}

static PyObject *
conn_getpeercert(Conn *c, PyObject *args, PyObject *kw)
{
    int binary = 0;
    static char *kwlist[] = {"binary_form", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p:getpeercert", kwlist, &binary))
        return NULL;
    if (!binary) {
        PyErr_SetString(PyExc_ValueError, "only binary_form=True is supported");
        return NULL;
    }
    TlsConn *t = usable(c);
    if (t == NULL)
        return NULL;
    X509 *x = SSL_get1_peer_certificate(t->ssl);
    if (x == NULL)
        Py_RETURN_NONE;
    unsigned char *der = NULL;
    int n = i2d_X509(x, &der);
    X509_free(x);
    if (n < 0)
        return raise_openssl("cannot encode the certificate");
    PyObject *out = PyBytes_FromStringAndSize((const char *)der, n);
    OPENSSL_free(der);
    return out;
}

static PyObject *
conn_version(Conn *c, PyObject *unused)
{
    (void)unused;
    TlsConn *t = usable(c);
    return t == NULL ? NULL : PyUnicode_FromString(SSL_get_version(t->ssl));
}

/* Plaintext decrypted and not yet read, or ciphertext not yet decrypted. A partial record that
 * SSL holds (SSL_has_pending) is not input: it needs more from the socket, which epoll reports. */
static int
has_input(TlsConn *t)
{
    return SSL_pending(t->ssl) > 0 || BIO_ctrl_pending(SSL_get_rbio(t->ssl)) > 0;
}

static PyObject *
conn_get_has_input(Conn *c, void *closure)
{
    (void)closure;
    TlsConn *t = usable(c);
    return t == NULL ? NULL : PyBool_FromLong(has_input(t));
}

static PyObject *
conn_get_lent(Conn *c, void *closure)
{
    (void)closure;
    return PyBool_FromLong(atomic_load(&c->t->lent));
}

static PyMethodDef conn_methods[] = {
    {"do_handshake", (PyCFunction)conn_do_handshake, METH_NOARGS,
     "do_handshake() -> bool: True once the handshake is over, False while it needs input; raises TlsError."},
    {"feed", (PyCFunction)conn_feed, METH_O, "feed(ciphertext): what the socket received."},
    {"read", (PyCFunction)conn_read, METH_NOARGS,
     "read() -> bytes | None: the plaintext decrypted so far (b'': more input needed; None: close_notify)."},
    {"write", (PyCFunction)conn_write, METH_O, "write(plaintext) -> bytes: encrypt it; returns what to send."},
    {"take_out", (PyCFunction)conn_take_out, METH_NOARGS, "take_out() -> bytes: what to send (handshake, alerts)."},
    {"shutdown", (PyCFunction)conn_shutdown, METH_NOARGS, "shutdown() -> bytes: a close_notify to send."},
    {"selected_alpn_protocol", (PyCFunction)conn_selected_alpn_protocol, METH_NOARGS,
     "selected_alpn_protocol() -> str | None: as ssl.SSLObject's."},
    {"getpeercert", (PyCFunction)(void (*)(void))conn_getpeercert, METH_VARARGS | METH_KEYWORDS,
     "getpeercert(binary_form=True) -> bytes | None: the peer's certificate, DER."},
    {"version", (PyCFunction)conn_version, METH_NOARGS, "version() -> str: the protocol version."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef conn_getset[] = {
    {"has_input", (getter)conn_get_has_input, NULL, "input is buffered (not yet read)", NULL},
    {"lent", (getter)conn_get_lent, NULL, "the pump relays it now", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ConnType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgotel_proxy.proxy._tls.Conn",
    .tp_basicsize = sizeof(Conn),
    .tp_dealloc = (destructor)conn_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Conn(context, server_hostname=None): one TLS connection on memory BIOs (see the module).",
    .tp_methods = conn_methods,
    .tp_getset = conn_getset,
    .tp_new = conn_new,
};

/* ------------------------------------------------------- the pump's API */

static TlsConn *
api_lend(PyObject *obj)
{
    if (!PyObject_TypeCheck(obj, &ConnType)) {
        PyErr_SetString(PyExc_TypeError, "a TLS leg must be a pgotel_proxy.proxy._tls.Conn");
        return NULL;
    }
    TlsConn *t = ((Conn *)obj)->t;
    int free_ = 0;
    if (!atomic_compare_exchange_strong(&t->lent, &free_, 1)) {
        PyErr_SetString(PyExc_RuntimeError, "the TLS connection is relayed by the pump already");
        return NULL;
    }
    atomic_fetch_add(&t->refs, 1);
    return t;
}

static void
api_release(TlsConn *t)
{
    atomic_store(&t->lent, 0);
    conn_unref(t);
}

static int
api_feed(TlsConn *t, const void *data, size_t n)
{
    return n == 0 || BIO_write(SSL_get_rbio(t->ssl), data, (int)n) == (int)n ? 0 : -1;
}

static long
api_read(TlsConn *t, void *buf, size_t cap)
{
    int err = 0;
    long n = read_records(t, buf, cap, &err);
    ERR_clear_error(); /* the pump's thread keeps no error queue */
    return n;
}

static int
api_write(TlsConn *t, const void *data, size_t n)
{
    int r = write_records(t, data, n);
    ERR_clear_error();
    return r;
}

static size_t
api_take_out(TlsConn *t, void *buf, size_t cap)
{
    int n = BIO_read(SSL_get_wbio(t->ssl), buf, (int)(cap > INT_MAX ? INT_MAX : cap));
    return n > 0 ? (size_t)n : 0;
}

static void
api_close_notify(TlsConn *t)
{
    if (SSL_is_init_finished(t->ssl) && !(SSL_get_shutdown(t->ssl) & SSL_SENT_SHUTDOWN))
        SSL_shutdown(t->ssl);
    ERR_clear_error();
}

static const TlsApi api = {
    TLS_API_VERSION, api_lend, api_release, api_feed, api_read, api_write, api_take_out, has_input, api_close_notify,
};

/* ---------------------------------------------------------------- module */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tls", "TLS on OpenSSL with memory BIOs, for start-up and for the pump (see Conn).", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__tls(void)
{
    if (PyType_Ready(&ContextType) < 0 || PyType_Ready(&ConnType) < 0)
        return NULL;
    if (alpn_index < 0)
        alpn_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, alpn_free);
    if (alpn_index < 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot register the ALPN data of a TLS context");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    TlsError = PyErr_NewExceptionWithDoc("pgotel_proxy.proxy._tls.TlsError",
                                         "A TLS handshake or record failed, or a context could not be set up.",
                                         PyExc_OSError, NULL);
    PyObject *capsule = PyCapsule_New((void *)&api, TLS_API_CAPSULE, NULL);
    if (TlsError == NULL || capsule == NULL || PyModule_AddObjectRef(m, "TlsError", TlsError) < 0 ||
        PyModule_AddObjectRef(m, "Context", (PyObject *)&ContextType) < 0 ||
        PyModule_AddObjectRef(m, "Conn", (PyObject *)&ConnType) < 0 || PyModule_AddObject(m, "API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
