"""Stepping over runs of same-type messages (DataRow, CopyData) in the server stream.

A large result is millions of DataRows that the proxy only counts; a Python
step per message would make observing a large result slower than relaying
it. ``run_end`` steps over a whole run in one call: compiled
(``_scan.c``, built with the package when a C compiler is there) or, as a
fallback with the same answers, in Python. ``PGOTEL_PURE_PYTHON=1`` forces the
fallback (tests run both).
"""

from __future__ import annotations

import struct

from ._impl import PURE_PYTHON

__all__ = ["run_end", "run_end_py", "COMPILED"]

_unpack_I = struct.Struct("!I").unpack_from


def run_end_py(buf, pos: int, n: int, typ: int) -> tuple[int, int]:
    """(end, count): ``buf[pos]`` starts a message of type ``typ`` with a complete header.

    Steps to the end of each following message of the same type whose header
    is complete and whose length is at least 4. ``end`` may lie beyond ``n``
    (the last message is incomplete).
    """
    if pos < 0 or n > len(buf) or pos + 5 > n:
        raise ValueError("run_end: no complete header at pos")
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


COMPILED = False
run_end = run_end_py
if not PURE_PYTHON:
    try:
        from ._scan import run_end  # type: ignore[no-redef]  # noqa: F811

        COMPILED = True
    except ImportError:  # not built (no compiler at install time): the Python version serves
        pass
