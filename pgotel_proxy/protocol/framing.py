"""Framing of client bytes for a relay that forwards them before the codec sees them (the pump).

The pump (proxy/_pump.c) relays a traced connection on its own thread and
must refuse a client chunk before forwarding it, by the rule the codec frames
with (:func:`messages.header_refused`, which :class:`Session` checks every
client message with). :func:`frame_client` is that framing over a chunk:
compiled, a C function without the GIL that the pump imports through the
capsule Cython generates (``framing_api.h``), over the C struct
``ClientFraming`` (framing.pxd); interpreted, the same code over
:class:`ClientFramingState`.

It also owns adaptive phase splitting's decision (docs/design/adaptive-splitting.md):
a Parse whose query text's shape (:func:`shape_hash`, comments left out) is in
the pump's table of slow shapes (``SlowShapes``, filled by the event loop from
finished statements) marks its batch, up to Sync, split; the shapes of the
connection's named statements are remembered (the last SPLIT_NAMES), so that a
Bind of one whose shape is slow splits its batch too. In a split batch a Flush is spliced after each Parse, Bind and
Execute: PostgreSQL then answers each phase as it ends (Flush has no reply,
so the client reads the same bytes), and the session, which sees the client
bytes as sent, times those phases exactly.
"""

from __future__ import annotations

try:
    import cython
except ImportError:  # no Cython: the module runs interpreted
    from ._nocython import cython

from .messages import header_refused

__all__ = ["frame_client", "ClientFramingState", "SlowShapesTable", "SlowTexts", "shape_hash", "shape_slow",
           "FLUSH", "SLOW_SHAPES", "SLOW_PROBE"]

FNV_OFFSET = 0xCBF29CE484222325  # 64-bit FNV-1a (compiled: wrapping arithmetic)
FNV_PRIME = 0x100000001B3
HASH_MASK = 0xFFFFFFFFFFFFFFFF
SLOW_SHAPES = 1024  # entries of the slow-shape table (a power of two; framing.pxd's array size)
SLOW_PROBE = 8  # slots a hash may sit in, from its home slot on (the pump's writer probes the same)
SPLIT_NAMES = 64  # named statements' shapes remembered per connection (framing.pxd), oldest out
TEXTS_KEPT = 4096  # SlowTexts: query texts whose shape is remembered (then it starts over)
FLUSH = b"H\x00\x00\x00\x04"

_PARSE = 80  # 'P'
_BIND = 66  # 'B'
_EXECUTE = 69  # 'E'
_SYNC = 83  # 'S'


class SlowShapesTable:
    """The slow-shape table, interpreted (compiled, the C struct ``SlowShapes`` the pump owns)."""

    __slots__ = ("hash", "expires")

    def __init__(self) -> None:
        self.hash = [0] * SLOW_SHAPES
        self.expires = [0] * SLOW_SHAPES

    def add(self, h: int, expires: int) -> None:
        """As the pump's ``mark_slow`` writes (the home slot when all probed slots are live)."""
        home = h & (SLOW_SHAPES - 1)
        for k in range(SLOW_PROBE):
            j = (home + k) & (SLOW_SHAPES - 1)
            if self.hash[j] == h or self.expires[j] <= 0:
                break
        else:
            j = home
        self.hash[j] = h
        self.expires[j] = expires


class SlowTexts:
    """The slow shapes for the relay that frames with the codec itself (the asyncio path).

    The same decision as the pump's table, by query text: a text's shape is
    :func:`shape_hash` (remembered for the last ``TEXTS_KEPT`` texts, as texts
    that carry a new traceparent each would otherwise grow it without end),
    slow while its expiry time (ns) is ahead. The event loop marks shapes from
    finished statements (``mark``); :class:`Session` asks ``slow`` at a Parse
    and at a Bind, and splices the Flushes itself.
    """

    __slots__ = ("expires", "shape_of")

    def __init__(self) -> None:
        self.expires: dict = {}  # shape -> expiry time (ns)
        self.shape_of: dict = {}  # query text -> shape

    def shape(self, sql: str) -> int:
        shape = self.shape_of.get(sql)
        if shape is None:
            if len(self.shape_of) >= TEXTS_KEPT:
                self.shape_of.clear()
            shape = self.shape_of[sql] = shape_hash(sql)
        return shape

    def mark(self, shape: int, expires: int) -> None:
        """``shape`` is slow until ``expires`` (ns); 0: no longer slow."""
        if expires <= 0:
            self.expires.pop(shape, None)
            return
        if len(self.expires) >= SLOW_SHAPES and shape not in self.expires:
            self.expires.clear()  # as many slow shapes as the pump's table holds: start over
        self.expires[shape] = expires

    def slow(self, sql: str, now: int) -> bool:
        if not self.expires:  # the common case: nothing slow, no hash
            return False
        return self.expires.get(self.shape(sql), 0) > now


class ClientFramingState:
    """The framing state of one client stream, interpreted (compiled, the C struct ``ClientFraming``)."""

    __slots__ = ("max_message", "skip", "have", "typ", "length", "field", "comment", "name_len", "split",
                 "text_hash", "name_hash", "now", "slow", "names", "name_shapes", "names_next")

    def __init__(self, max_message: int, slow: SlowShapesTable | None = None) -> None:
        self.max_message = max_message  # a longer message is refused
        self.skip = 0  # bytes of the current message still to come
        self.have = 0  # bytes of the next message's head seen so far (0..4)
        self.typ = 0  # its type byte, once seen
        self.length = 0  # its length bytes seen so far, big-endian
        self.field = 0  # Parse, Bind: the strings of the body ended so far
        self.comment = 0  # Parse: where the query text is in a comment (_text_state)
        self.name_len = 0  # Parse, Bind: bytes of the statement name
        self.split = 0  # this batch (up to Sync) gets a Flush after each Parse, Bind and Execute
        self.text_hash = FNV_OFFSET  # Parse: the query text's hash so far
        self.name_hash = FNV_OFFSET  # Parse, Bind: the statement name's hash so far
        self.now = 0  # the chunk's receive time (ns), against the table's expiry times
        self.slow = slow  # the slow-shape table (None: never split)
        self.names = [0] * SPLIT_NAMES  # name hashes of the last prepared statements parsed (0: none)
        self.name_shapes = [0] * SPLIT_NAMES  # ... and their query texts' shapes
        self.names_next = 0


def _fnv(h: int, c: int) -> int:
    return ((h ^ c) * FNV_PRIME) & HASH_MASK


def _text_hash(h: int, cs: int, c: int) -> int:
    """The hash after byte ``c`` of a query text in comment state ``cs``: comments and white space are left out,
    and so are bytes past ASCII: the pump hashes the client's bytes in its own encoding, the event loop
    a text decoded as UTF-8 (a byte it could not decode became U+FFFD), and the two agree on ASCII alone."""
    if cs == 2 or cs == 3 or cs == 5:  # in a comment
        return h
    if cs == 1:  # a '/' held back: a comment's start unless '*' follows
        if c == 42:
            return h
        h = _fnv(h, 47)
    elif cs == 4:  # a '-' held back
        if c == 45:
            return h
        h = _fnv(h, 45)
    if c == 47 or c == 45 or c == 32 or c == 9 or c == 10 or c == 13 or c >= 128:
        return h
    return _fnv(h, c)


def _text_state(cs: int, c: int) -> int:
    """The comment state after byte ``c``: 0 text, 1 after '/', 2 in /* */, 3 there after '*', 4 after '-', 5 in --."""
    if cs == 2:
        return 3 if c == 42 else 2
    if cs == 3:
        if c == 47:
            return 0
        return 3 if c == 42 else 2
    if cs == 5:
        return 0 if c == 10 else 5
    if cs == 1 and c == 42:
        return 2
    if cs == 4 and c == 45:
        return 5
    if c == 47:
        return 1
    if c == 45:
        return 4
    return 0


def _text_final(h: int, cs: int) -> int:
    """The hash of a whole query text (a held back '/' or '-' counts; never 0, an empty slot)."""
    if cs == 1:
        h = _fnv(h, 47)
    elif cs == 4:
        h = _fnv(h, 45)
    return h | 1


def shape_hash(sql: str) -> int:
    """The shape hash of a query text as the pump computes it from a Parse (UTF-8 client text)."""
    h = FNV_OFFSET
    cs = 0
    for c in sql.encode("utf-8", "surrogateescape"):
        h = _text_hash(h, cs, c)
        cs = _text_state(cs, c)
    return _text_final(h, cs)


def shape_slow(slow, h: int, now: int) -> int:
    """1 when ``h`` is in the slow-shape table and not expired at ``now`` (ns).

    The event loop writes the table while the pump reads it: a torn or stale
    entry costs one statement a split it did not need, or lacks one.
    """
    home = h & (SLOW_SHAPES - 1)
    for k in range(SLOW_PROBE):
        j = (home + k) & (SLOW_SHAPES - 1)
        if slow.hash[j] == h and slow.expires[j] > now:
            return 1
    return 0


def _body_byte(state, typ: int, c: int) -> None:
    """A byte of the first two strings of a Parse (name, query) or Bind (portal, statement name)."""
    if c == 0:
        state.field += 1
    elif typ == _PARSE:
        if state.field == 0:
            state.name_hash = _fnv(state.name_hash, c)
            state.name_len += 1
        else:
            state.text_hash = _text_hash(state.text_hash, state.comment, c)
            state.comment = _text_state(state.comment, c)
    elif state.field == 1:
        state.name_hash = _fnv(state.name_hash, c)
        state.name_len += 1


def _message_end(state, typ: int) -> int:
    """A message ended: 1 when a Flush goes after it (a Parse, Bind or Execute of a split batch)."""
    if typ == _SYNC:
        state.split = 0
        return 0
    if typ == _PARSE:
        shape = _text_final(state.text_hash, state.comment)
        if not state.split and state.slow and shape_slow(state.slow, shape, state.now):
            state.split = 1
        if state.name_len:  # a prepared statement: its Binds look its shape up
            h = state.name_hash | 1
            for k in range(SPLIT_NAMES):
                if state.names[k] == h:
                    break
            else:
                k = state.names_next
                state.names_next += 1
                if state.names_next == SPLIT_NAMES:
                    state.names_next = 0
                state.names[k] = h
            state.name_shapes[k] = shape
        return state.split
    if typ == _BIND:
        if not state.split and state.name_len and state.slow:
            h = state.name_hash | 1
            for k in range(SPLIT_NAMES):
                if state.names[k] == h:
                    state.split = shape_slow(state.slow, state.name_shapes[k], state.now)
                    break
        return state.split
    if typ == _EXECUTE:
        return state.split
    return 0


def _copy(data, start: int, stop: int, out, w: int) -> int:
    """Copy ``data[start:stop]`` to ``out`` at ``w``; the new end of ``out``."""
    for i in range(start, stop):
        out[w] = data[i]
        w += 1
    return w


def _put_flush(out, w: int) -> int:
    """Write a Flush (FLUSH) to ``out`` at ``w``; the new end of ``out``."""
    out[w] = 72
    out[w + 1] = 0
    out[w + 2] = 0
    out[w + 3] = 0
    out[w + 4] = 4
    return w + 5


def frame_client(state, data, n: int, out) -> int:
    """Frame ``data[:n]``, client bytes that follow what ``state`` framed.

    -1 when they hold a refused head (the chunk is not forwarded, nothing
    after it matters); 0 when they go on as they are; else the length of
    what goes on instead, written to ``out`` (room for ``2 * n`` bytes): the
    chunk with a Flush after each message of a split batch that gets one.
    """
    skip = state.skip
    have = state.have
    typ = state.typ
    length = state.length
    pos = 0
    copied = 0
    w = 0
    while pos < n:
        if skip:
            if state.field < 2 and (typ == _PARSE or typ == _BIND):
                _body_byte(state, typ, data[pos])
                pos += 1
                skip -= 1
            else:
                take = n - pos if n - pos < skip else skip
                pos += take
                skip -= take
            if skip == 0 and _message_end(state, typ):
                w = _copy(data, copied, pos, out, w)
                w = _put_flush(out, w)
                copied = pos
            continue
        if have == 0:
            typ = data[pos]
            length = 0
        else:
            length = (length << 8) | data[pos]
        pos += 1
        have += 1
        if have < 5:
            continue
        if header_refused(typ, length, state.max_message):  # not HEAD_OK
            return -1
        skip = length - 4
        have = 0
        if typ == _PARSE or typ == _BIND:
            state.field = 0
            state.comment = 0
            state.name_len = 0
            state.text_hash = FNV_OFFSET
            state.name_hash = FNV_OFFSET
        if skip == 0 and _message_end(state, typ):
            w = _copy(data, copied, pos, out, w)
            w = _put_flush(out, w)
            copied = pos
    state.skip = skip
    state.have = have
    state.typ = typ
    state.length = length
    if w:
        return _copy(data, copied, n, out, w)
    return 0
