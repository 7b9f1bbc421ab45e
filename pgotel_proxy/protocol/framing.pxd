# Types for the Cython build of framing.py (pure-Python mode). frame_client is exported to the
# pump's C (proxy/_pump.c) through framing_api.h, over the struct ClientFraming declared here.
cimport cython

cdef public struct ClientFraming:
    unsigned int max_message
    unsigned int skip
    int have
    int typ
    unsigned int length

from .messages cimport header_refused

@cython.locals(skip=cython.size_t, have=int, typ=int, length=cython.uint, pos=cython.size_t, take=cython.size_t)
cdef api int frame_client(ClientFraming *state, const unsigned char *data, size_t n) noexcept nogil
