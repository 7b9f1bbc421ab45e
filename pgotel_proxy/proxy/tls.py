"""TLS contexts for both legs: terminating client TLS, and the upstream modes disable … verify-full."""

from __future__ import annotations

import ssl

__all__ = ["client_context", "upstream_context", "certificate_der", "ALPN"]

ALPN = "postgresql"  # PostgreSQL 17 direct TLS requires this ALPN protocol


def client_context(cert: str, key: str, min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """Server-side context for terminating client TLS (TLS 1.2+ by default, no compression)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols([ALPN])
    return ctx


def certificate_der(path: str) -> bytes:
    """The first certificate of a PEM file (the leaf of a chain), in DER.

    Channel binding (``tls-server-end-point``) hashes exactly this certificate.
    """
    with open(path, encoding="ascii", errors="replace") as fh:
        text = fh.read()
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise ssl.SSLError(f"no PEM certificate in {path}")
    return ssl.PEM_cert_to_DER_cert(text[begin : end + len("-----END CERTIFICATE-----")])


def upstream_context(mode: str, ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext | None:
    """Client-side context for the upstream leg, as libpq's sslmode would build it; None for disable."""
    if mode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode in ("verify-ca", "verify-full"):
        ctx.check_hostname = mode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
        if ca:
            ctx.load_verify_locations(ca)
        else:
            ctx.load_default_certs()
    else:
        # prefer / require: encrypt, but (like libpq without a root cert) do not verify.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert and key:
        ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols([ALPN])
    return ctx
