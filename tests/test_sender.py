"""The compiled relay write (proxy._sender.Sender): a chunk goes out with one send() on the
transport's socket only when the transport holds nothing unsent and is open; everything else goes
through the transport's write(), and no byte ever overtakes one the transport holds.

Real sockets and the event loop the proxy runs on (uvloop when installed, else asyncio's), a peer
that reads slowly or not at all so that partial sends and buffered bytes really happen.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgotel_proxy.proxy import connection

pytestmark = pytest.mark.skipif(connection.Sender is None, reason="compiled codec not built (or PGOTEL_PURE_PYTHON)")

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None


# The proxy runs on uvloop where it is installed, else on asyncio's loop: the Sender serves both.
LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


def _on_pair(kind: str, loop_kind: str, body) -> None:
    """``await body(transport, far, writer)`` on a fresh event loop of that kind, with a transport on
    one end of a connected pair of sockets (``kind``: tcp or unix), the other end, and the relay's
    writer for the transport; both ends closed afterwards."""

    async def main():
        transport, far = await _pair(kind)
        try:
            await body(transport, far, connection._writer(transport))
        finally:
            transport.close()
            far.close()

    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


async def _pair(kind: str):
    """A transport on one end of a connected pair of sockets, and the other end (blocking, for the test)."""
    loop = asyncio.get_running_loop()
    if kind == "tcp":
        lsock = socket.create_server(("127.0.0.1", 0))
        far = socket.create_connection(lsock.getsockname())
        near, _ = lsock.accept()
        lsock.close()
        near.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, near)
    else:
        near, far = socket.socketpair()
        near.setblocking(False)
        transport, _ = await loop.create_unix_connection(asyncio.Protocol, sock=near)
    return transport, far


def _drain(far: socket.socket, want: int, timeout: float = 10.0) -> bytes:
    far.settimeout(timeout)
    got = bytearray()
    while len(got) < want:
        chunk = far.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def _read_available(far: socket.socket, limit: int) -> bytes:
    """What the far end can read right now, up to ``limit`` bytes."""
    far.setblocking(False)
    got = bytearray()
    try:
        while len(got) < limit:
            chunk = far.recv(limit - len(got))
            if not chunk:
                break
            got += chunk
    except BlockingIOError:
        pass
    far.setblocking(True)
    return bytes(got)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_the_relay_picks_the_sender_for_plain_sockets(kind, loop_kind):
    async def body(transport, far, w):
        assert type(w) is connection.Sender
        w(b"hello")
        assert transport.get_write_buffer_size() == 0  # sent by the Sender itself
        assert _drain(far, 5) == b"hello"

    _on_pair(kind, loop_kind, body)


def test_tls_and_unknown_transports_keep_their_write():
    class Other(asyncio.Transport):
        def write(self, data):
            pass

    t = Other()
    assert connection._writer(t) == t.write


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_bytes_never_overtake_what_the_transport_holds(kind, loop_kind):
    """A chunk larger than the socket takes: the rest waits in the transport; the next small chunk
    must go behind it (through write()), and the far end reads every byte in order."""

    async def body(transport, far, w):
        big = bytes(range(256)) * (64 << 10)  # 16 MiB: more than any socket buffer here
        w(big)
        held = transport.get_write_buffer_size()
        assert 0 < held < len(big)  # a partial send, the rest in the transport
        # The far end reads: the socket has room again, while the transport still holds bytes
        # (the event loop has not run since). A chunk sent now would overtake them.
        head = _read_available(far, 1 << 20)
        assert head
        w(b"tail-1")
        w(b"tail-2")
        assert transport.get_write_buffer_size() == held + 12  # queued behind, not sent
        loop = asyncio.get_running_loop()
        got = head + await loop.run_in_executor(None, _drain, far, len(big) + 12 - len(head))
        assert got == big + b"tail-1tail-2"
        while transport.get_write_buffer_size():
            await asyncio.sleep(0.001)
        w(b"after")  # empty again: the Sender sends it itself
        assert transport.get_write_buffer_size() == 0
        assert _drain(far, 5) == b"after"

    _on_pair(kind, loop_kind, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_closing_transport_is_never_written_behind_its_back(loop_kind):
    async def body(transport, far, w):
        transport.close()
        assert transport.is_closing()
        w(b"late")  # to the transport, which drops it as it would have (no send on its socket)
        await asyncio.sleep(0.01)
        far.settimeout(2)
        assert far.recv(100) == b""  # end of stream, no late bytes

    _on_pair("unix", loop_kind, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_other_buffers_go_through_the_transport(loop_kind):
    async def body(transport, far, w):
        w(bytearray(b"ab"))
        w(memoryview(b"cd"))
        w(b"")
        w(b"ef")
        await asyncio.sleep(0.01)
        assert _drain(far, 6) == b"abcdef"

    _on_pair("unix", loop_kind, body)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3 << 20), st.booleans()), min_size=1, max_size=12))
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_any_mix_of_chunks_and_slow_reads_arrives_whole_and_in_order(loop_kind, steps):
    """Chunks of any size, the far end sometimes reading a little between them: the bytes read are
    the bytes written, in order, whichever way each chunk went."""

    async def body(transport, far, w):
        loop = asyncio.get_running_loop()
        sent = bytearray()
        got = bytearray()
        for i, (size, read_some) in enumerate(steps):
            chunk = bytes([i % 251]) * size
            w(chunk)
            sent += chunk
            if read_some:  # room in the socket before the event loop moves what the transport holds
                got += _read_available(far, len(sent) - len(got))
            else:
                await asyncio.sleep(0)
        got += await loop.run_in_executor(None, _drain, far, len(sent) - len(got))
        assert got == sent

    _on_pair("tcp", loop_kind, body)
