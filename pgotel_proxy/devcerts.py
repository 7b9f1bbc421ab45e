"""Throwaway TLS material for tests, benchmarks and the demo.

This module owns certificate generation: one private CA (made with
``trustme``) and the leaf certificates signed by it for the PostgreSQL server,
the proxy's listener and a client, all valid for ``localhost`` and
``127.0.0.1`` so clients can use ``sslmode=verify-full``.

Private keys are written with mode 0600 because libpq and the PostgreSQL
server both refuse group- or world-readable keys. Handing a key to another
user (the server runs unprivileged when the tests run as root) is the
caller's job; :class:`pgserver.PgServer` does that for its copy.

It imports nothing from pytest so ``bench/`` can reuse it.
"""

from __future__ import annotations

import os
from pathlib import Path


__all__ = ["SANS", "make_certs"]

#: Names every leaf certificate is valid for.
SANS = ("localhost", "127.0.0.1")


def _write(path: Path, blobs, mode: int) -> str:
    # Create with the final mode from the start, so a key is never briefly
    # readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        for blob in blobs:
            fh.write(blob.bytes())
    os.chmod(path, mode)
    return str(path)


def make_certs(directory: str | os.PathLike[str]) -> dict[str, str]:
    """Create a CA and signed certificates in *directory*; return their paths.

    Keys of the returned dict: ``ca`` (the CA certificate, for
    ``sslrootcert``), ``ca_key``, ``server_cert``/``server_key`` (for
    PostgreSQL), ``proxy_cert``/``proxy_key`` (for the proxy's TLS listener)
    and ``client_cert``/``client_key`` (CN ``postgres``, for certificate
    authentication).
    """
    import trustme  # a test/demo extra; imported here so the package does not need it

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    ca = trustme.CA(organization_name="pgotel-proxy tests")
    issued = {
        "server": ca.issue_cert(*SANS, common_name="localhost"),
        "proxy": ca.issue_cert(*SANS, common_name="localhost"),
        "client": ca.issue_cert(*SANS, common_name="postgres"),
    }

    paths = {
        "ca": _write(out / "ca.crt", [ca.cert_pem], 0o644),
        "ca_key": _write(out / "ca.key", [ca.private_key_pem], 0o600),
    }
    for name, leaf in issued.items():
        # Leaf first, then any intermediates, as servers expect a chain file.
        paths[f"{name}_cert"] = _write(out / f"{name}.crt", leaf.cert_chain_pems, 0o644)
        paths[f"{name}_key"] = _write(out / f"{name}.key", [leaf.private_key_pem], 0o600)
    return paths
