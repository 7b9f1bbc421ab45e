"""Errors raised by the sans-IO protocol layer."""

__all__ = ["ProtocolViolation"]


class ProtocolViolation(Exception):
    """A peer broke the wire protocol in a way the proxy must answer.

    Only the client direction raises this (garbage, a bad length, an oversized
    message): the proxy answers with an ErrorResponse carrying ``sqlstate`` and
    closes that connection. Anything odd in the server direction merely stops
    observation for the connection (see ``Session.out_of_sync``).
    """

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
