"""Stepping over runs of same-type messages (DataRow, CopyData) in the server stream.

A large result is millions of DataRows that the proxy only counts; a Python
step per message would make observing a large result slower than relaying
it. ``run_end`` steps over a whole run in one call; compiled by Cython with
the rest of the codec (``scan.pxd`` types it), interpreted otherwise.
"""

from __future__ import annotations

import struct

try:
    import cython
except ImportError:  # no Cython: the module runs interpreted
    from ._nocython import cython

from .messages import be32

__all__ = ["run_end", "COMPILED"]

_unpack_I = struct.Struct("!I").unpack_from


def run_end(buf: bytes, pos: int, n: int, typ: int) -> tuple[int, int]:
    """(end, count): ``buf[pos]`` starts a message of type ``typ`` with a complete header.

    Steps to the end of each following message of the same type whose header
    is complete and whose length is at least 4. ``end`` may lie beyond ``n``
    (the last message is incomplete).
    """
    if pos < 0 or n > len(buf) or pos + 5 > n:
        raise ValueError("run_end: no complete header at pos")
    if cython.compiled:
        p = cython.cast(cython.p_uchar, PyBytes_AS_STRING(buf))
        end = pos + 1 + be32(buf, pos + 1)
        count = 1
        last = n - 5
        while end <= last and p[end] == typ:
            length = be32(buf, end + 1)
            if length < 4:
                break
            end += 1 + length
            count += 1
        return end, count
    end = pos + 1 + _unpack_I(buf, pos + 1)[0]
    count = 1
    last = n - 5
    while end <= last and buf[end] == typ:
        length = _unpack_I(buf, end + 1)[0]
        if length < 4:
            break
        end += 1 + length
        count += 1
    return end, count


#: True when this module was compiled by Cython.
COMPILED: bool = cython.compiled
