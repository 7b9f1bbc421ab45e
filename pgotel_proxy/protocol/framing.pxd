# Types for the Cython build of framing.py (pure-Python mode). frame_client is exported to the
# pump's C (proxy/_pump.c) through framing_api.h, over the structs ClientFraming and SlowShapes
# declared here.
cimport cython

# The slow shapes (framing.py: SLOW_SHAPES entries, SLOW_PROBE probes), owned by the pump.
cdef public struct SlowShapes:
    unsigned long long hash[1024]
    long long expires[1024]

cdef public struct ClientFraming:
    unsigned int max_message
    unsigned int skip
    int have
    int typ
    unsigned int length
    int field
    int comment
    int name_len
    int split
    unsigned long long text_hash
    unsigned long long name_hash
    long long now
    const SlowShapes *slow
    unsigned long long names[64]
    unsigned long long name_shapes[64]
    int names_next

from .messages cimport header_refused

cdef unsigned long long FNV_OFFSET, FNV_PRIME, HASH_MASK
cdef int SLOW_SHAPES, SLOW_PROBE, SPLIT_NAMES
cdef int _PARSE, _BIND, _EXECUTE, _SYNC

cdef unsigned long long _fnv(unsigned long long h, int c) noexcept nogil
@cython.locals(c2=int)
cdef unsigned long long _text_hash(unsigned long long h, int cs, int c) noexcept nogil
cdef int _text_state(int cs, int c) noexcept nogil
cdef unsigned long long _text_final(unsigned long long h, int cs) noexcept nogil
@cython.locals(home=cython.size_t, k=int, j=cython.size_t)
cdef int shape_slow(const SlowShapes *slow, unsigned long long h, long long now) noexcept nogil
cdef void _body_byte(ClientFraming *state, int typ, int c) noexcept nogil
@cython.locals(h=cython.ulonglong, shape=cython.ulonglong, k=int)
cdef int _message_end(ClientFraming *state, int typ) noexcept nogil
@cython.locals(i=cython.size_t)
cdef cython.size_t _copy(const unsigned char *data, cython.size_t start, cython.size_t stop,
                         unsigned char *out, cython.size_t w) noexcept nogil

cdef cython.size_t _put_flush(unsigned char *out, cython.size_t w) noexcept nogil

@cython.locals(skip=cython.size_t, have=int, typ=int, length=cython.uint, pos=cython.size_t, take=cython.size_t,
               copied=cython.size_t, w=cython.size_t)
cdef api Py_ssize_t frame_client(ClientFraming *state, const unsigned char *data, size_t n,
                                 unsigned char *out) noexcept nogil
