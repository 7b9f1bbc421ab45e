"""The compiled TLS (proxy/_tls.c): contexts as tls.py builds them, handshakes in memory, and TLS legs on the pump.

The TLS suite through real clients and PostgreSQL is test_tls_auth.py; here
each check is on the connection objects themselves: which certificates each
upstream mode accepts, ALPN, the peer certificate channel binding hashes, and
the pump decrypting and encrypting a leg over socket pairs.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading

import pytest

from pgotel_proxy.proxy import server as server_mod
from pgotel_proxy.proxy import tls
from waiting import wait_for

pytestmark = pytest.mark.skipif(not tls.COMPILED, reason="compiled TLS not built (or PGOTEL_PURE_PYTHON)")

if tls.COMPILED:
    from pgotel_proxy.proxy._tls import Conn, TlsError


def _handshake(client: "Conn", server: "Conn") -> None:
    """Run a handshake between two connections in memory."""
    client_done = server_done = False
    for _ in range(10):
        client_done = client.do_handshake() or client_done
        server.feed(client.take_out())
        server_done = server.do_handshake() or server_done
        client.feed(server.take_out())
        if client_done and server_done:
            client.read()  # what came after the client's last step (tickets)
            return
    raise AssertionError("the handshake did not finish")


def _server(certs, **kw) -> "Conn":
    # The Context is let go at once: a connection must not need its Python object (a reload
    # replaces it while sessions go on; .ci/sanitize catches what the handshake would touch).
    return Conn(tls.client_context(certs["proxy_cert"], certs["proxy_key"], **kw))


def test_upstream_modes_check_the_certificate_as_libpq_does(certs, tmp_path):
    other = tmp_path / "other-ca.pem"
    other.write_text(open(certs["client_cert"]).read())  # a certificate that signed nothing here
    cases = [
        ("require", None, "localhost", None),
        ("require", str(other), "wrong.example", None),  # no verification at all
        ("verify-ca", certs["ca"], "wrong.example", None),  # the chain only
        ("verify-full", certs["ca"], "localhost", None),
        ("verify-full", certs["ca"], "127.0.0.1", None),  # an address: checked against the IP SAN
        ("verify-full", certs["ca"], "wrong.example", "Hostname mismatch"),
        ("verify-full", certs["ca"], "10.9.9.9", "IP address mismatch"),
        ("verify-ca", str(other), "localhost", "certificate verify failed"),
    ]
    for mode, ca, name, error in cases:
        client = Conn(tls.upstream_context(mode, ca), server_hostname=name)
        if error is None:
            _handshake(client, _server(certs))
        else:
            with pytest.raises(TlsError, match=error):
                _handshake(client, _server(certs))
    with pytest.raises(ValueError, match="server_hostname"):
        Conn(tls.upstream_context("verify-full", certs["ca"]))


def test_alpn_peer_certificate_and_records_both_ways(certs):
    client = Conn(tls.upstream_context("verify-full", certs["ca"]), server_hostname="localhost")
    server = _server(certs)
    _handshake(client, server)
    assert client.selected_alpn_protocol() == server.selected_alpn_protocol() == "postgresql"
    # What channel binding hashes on each side: the certificate the proxy presents.
    assert client.getpeercert(binary_form=True) == tls.certificate_der(certs["proxy_cert"])
    assert server.getpeercert(binary_form=True) is None  # no client certificate asked for
    big = os.urandom(600_000)
    server.feed(client.write(big))
    got = bytearray()
    while len(got) < len(big):
        piece = server.read()
        assert piece
        got += piece
    assert bytes(got) == big and server.read() == b""
    client.feed(server.shutdown())
    assert client.read() is None  # close_notify: the end of input


def test_min_version_and_plaintext_refused(certs):
    server = _server(certs, min_version="TLSv1.3")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    py = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        py.do_handshake()
    server.feed(outgoing.read())
    with pytest.raises(TlsError, match="protocol"):
        server.do_handshake()
    plain = _server(certs)
    plain.feed(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
    with pytest.raises(TlsError):
        plain.do_handshake()


@pytest.mark.skipif(server_mod.Pump is None, reason="compiled pump not built")
def test_the_pump_relays_a_tls_leg_and_lends_it_back(certs):
    """Client TLS on fd_a, plain fd_b: the pump decrypts one way, encrypts the other, in order."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    pump = server_mod.Pump(efd)
    peer = Conn(tls.upstream_context("require"), server_hostname="localhost")
    leg = _server(certs)
    _handshake(peer, leg)
    client, mid_a = socket.socketpair()
    mid_b, backend = socket.socketpair()
    try:
        for s in (mid_a, mid_b):
            s.setblocking(False)
        early = os.urandom(1000)
        leg.feed(peer.write(early))  # held by the connection when it is handed over
        pair = pump.add(mid_a.detach(), mid_b.detach(), tls_a=leg)
        assert leg.lent
        with pytest.raises(RuntimeError, match="pump"):
            leg.read()
        r, w = os.pipe()
        with pytest.raises(RuntimeError, match="already"):
            pump.add(r, w, tls_a=leg)
        os.close(r)
        os.close(w)
        big = os.urandom(3_000_000)
        sender = threading.Thread(target=client.sendall, args=(peer.write(big),))
        sender.start()
        backend.settimeout(10)
        got = bytearray()
        while len(got) < len(early) + len(big):
            got += backend.recv(1 << 20)
        sender.join(10)
        assert bytes(got) == early + big
        answer = os.urandom(2_000_000)
        sender = threading.Thread(target=backend.sendall, args=(answer,))
        sender.start()
        client.settimeout(10)
        plain = bytearray()
        while len(plain) < len(answer):
            peer.feed(client.recv(1 << 20))
            while piece := peer.read():  # at most 256 KiB a call
                plain += piece
        sender.join(10)
        assert bytes(plain) == answer
        pump.close(pair)
        wait_for(lambda: not leg.lent, timeout=5, what="the pump to release the TLS connection")
        peer.feed(client.recv(1 << 16))
        assert peer.read() is None  # the pump's close_notify as the pair ended
    finally:
        pump.stop()
        os.close(efd)
        client.close()
        backend.close()
