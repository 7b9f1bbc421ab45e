"""SCRAM-SHA-256 client exchange (RFC 5802 / 7677) as PostgreSQL uses it, sans-IO.

PostgreSQL ignores the user name inside the SCRAM messages (it takes the one
from the start-up packet), so the client-first message carries an empty one.
Channel binding is not offered ("n,,"), which is what a client without TLS, or
one that does not require it, sends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["ScramClient", "ScramError"]


class ScramError(Exception):
    """The server's SCRAM messages are malformed or its signature is wrong."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _attrs(message: str) -> dict[str, str]:
    out = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed SCRAM attribute {part[:20]!r}")
        out[part[0]] = part[2:]
    return out


class ScramClient:
    """One SCRAM-SHA-256 exchange: ``first()``, ``final(server_first)``, ``verify(server_final)``."""

    mechanism = "SCRAM-SHA-256"

    def __init__(self, password: str, nonce: str | None = None) -> None:
        # SASLprep is skipped: PostgreSQL itself uses the raw bytes when a password
        # is not valid UTF-8 / prep-able, and ASCII passwords are unchanged by it.
        self._password = password.encode("utf-8")
        self._nonce = nonce or _b64(secrets.token_bytes(18))
        self._bare = f"n=,r={self._nonce}"
        self._server_signature: bytes | None = None

    def first(self) -> bytes:
        return ("n,," + self._bare).encode("ascii")

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode("utf-8", "replace")
        attrs = _attrs(text)
        nonce, salt, iters = attrs.get("r", ""), attrs.get("s"), attrs.get("i")
        if not nonce.startswith(self._nonce) or salt is None or iters is None:
            raise ScramError("server-first-message does not continue our nonce")
        try:
            iterations = int(iters)
            salt_bytes = base64.b64decode(salt, validate=True)
        except ValueError as exc:
            raise ScramError(f"bad salt or iteration count: {exc}") from None
        if not 0 < iterations <= 10_000_000:
            raise ScramError(f"unreasonable iteration count {iterations}")
        salted = hashlib.pbkdf2_hmac("sha256", self._password, salt_bytes, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._bare},{text},{without_proof}".encode("utf-8")
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def verify(self, server_final: bytes) -> None:
        attrs = _attrs(server_final.decode("utf-8", "replace"))
        if "e" in attrs:
            raise ScramError(f"server reported SCRAM error: {attrs['e']}")
        try:
            got = base64.b64decode(attrs.get("v", ""), validate=True)
        except ValueError:
            raise ScramError("malformed server signature") from None
        if self._server_signature is None or not hmac.compare_digest(got, self._server_signature):
            raise ScramError("server signature does not match: not the server we asked")
