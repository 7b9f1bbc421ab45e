"""Message kinds: the type byte of every message after start-up, named per direction.

One table per direction, named as in the "Message Formats" chapter of the
PostgreSQL documentation. The same byte means different messages in the two
directions ('D' is Describe from the client and DataRow from the server), so
every name says its direction: ``FRONTEND_*`` for (F) messages, ``BACKEND_*``
for (B) ones. A byte a table does not hold is :data:`OTHER`: from a client it
is garbage, from a server it is relayed without being accounted.

The names are plain ``int`` module constants (indexing bytes yields ints, and
comparing two ints is the cheapest test on the hot path; compiled, the codec
declares them C ints in its ``.pxd`` files).
"""

from __future__ import annotations

__all__ = [
    "FRONTEND_KINDS",
    "BACKEND_KINDS",
    "FRONTEND_TYPES",
    "OTHER",
    "frontend_kind",
    "backend_kind",
    # Frontend (F)
    "FRONTEND_BIND",
    "FRONTEND_CLOSE",
    "FRONTEND_COPY_DATA",
    "FRONTEND_COPY_DONE",
    "FRONTEND_COPY_FAIL",
    "FRONTEND_DESCRIBE",
    "FRONTEND_EXECUTE",
    "FRONTEND_FLUSH",
    "FRONTEND_FUNCTION_CALL",
    "FRONTEND_PARSE",
    "FRONTEND_PASSWORD",
    "FRONTEND_QUERY",
    "FRONTEND_SYNC",
    "FRONTEND_TERMINATE",
    # Backend (B)
    "BACKEND_PARSE_COMPLETE",
    "BACKEND_BIND_COMPLETE",
    "BACKEND_CLOSE_COMPLETE",
    "BACKEND_NOTIFICATION_RESPONSE",
    "BACKEND_COPY_DONE",
    "BACKEND_COMMAND_COMPLETE",
    "BACKEND_COPY_DATA",
    "BACKEND_DATA_ROW",
    "BACKEND_ERROR_RESPONSE",
    "BACKEND_COPY_IN_RESPONSE",
    "BACKEND_COPY_OUT_RESPONSE",
    "BACKEND_EMPTY_QUERY_RESPONSE",
    "BACKEND_BACKEND_KEY_DATA",
    "BACKEND_NO_DATA",
    "BACKEND_NOTICE_RESPONSE",
    "BACKEND_AUTHENTICATION",
    "BACKEND_PORTAL_SUSPENDED",
    "BACKEND_PARAMETER_STATUS",
    "BACKEND_PARAMETER_DESCRIPTION",
    "BACKEND_ROW_DESCRIPTION",
    "BACKEND_NEGOTIATE_PROTOCOL_VERSION",
    "BACKEND_FUNCTION_CALL_RESPONSE",
    "BACKEND_COPY_BOTH_RESPONSE",
    "BACKEND_READY_FOR_QUERY",
    # Describe / Close (F) targets
    "TARGET_STATEMENT",
    "TARGET_PORTAL",
]

#: The name of a type byte that a direction's table does not hold.
OTHER = "other"

# ---------------------------------------------------------------- Frontend (F)
FRONTEND_BIND = ord("B")
FRONTEND_CLOSE = ord("C")
FRONTEND_COPY_DATA = ord("d")
FRONTEND_COPY_DONE = ord("c")
FRONTEND_COPY_FAIL = ord("f")
FRONTEND_DESCRIBE = ord("D")
FRONTEND_EXECUTE = ord("E")
FRONTEND_FLUSH = ord("H")
FRONTEND_FUNCTION_CALL = ord("F")
FRONTEND_PARSE = ord("P")
# PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse share one byte:
# which one it is follows from the authentication request it answers.
FRONTEND_PASSWORD = ord("p")
FRONTEND_QUERY = ord("Q")
FRONTEND_SYNC = ord("S")
FRONTEND_TERMINATE = ord("X")

# ----------------------------------------------------------------- Backend (B)
BACKEND_PARSE_COMPLETE = ord("1")
BACKEND_BIND_COMPLETE = ord("2")
BACKEND_CLOSE_COMPLETE = ord("3")
BACKEND_NOTIFICATION_RESPONSE = ord("A")
BACKEND_COPY_DONE = ord("c")
BACKEND_COMMAND_COMPLETE = ord("C")
BACKEND_COPY_DATA = ord("d")
BACKEND_DATA_ROW = ord("D")
BACKEND_ERROR_RESPONSE = ord("E")
BACKEND_COPY_IN_RESPONSE = ord("G")
BACKEND_COPY_OUT_RESPONSE = ord("H")
BACKEND_EMPTY_QUERY_RESPONSE = ord("I")
BACKEND_BACKEND_KEY_DATA = ord("K")
BACKEND_NO_DATA = ord("n")
BACKEND_NOTICE_RESPONSE = ord("N")
# AuthenticationOk, AuthenticationSASL, ... share one byte; an int32 code says which.
BACKEND_AUTHENTICATION = ord("R")
BACKEND_PORTAL_SUSPENDED = ord("s")
BACKEND_PARAMETER_STATUS = ord("S")
BACKEND_PARAMETER_DESCRIPTION = ord("t")
BACKEND_ROW_DESCRIPTION = ord("T")
BACKEND_NEGOTIATE_PROTOCOL_VERSION = ord("v")
BACKEND_FUNCTION_CALL_RESPONSE = ord("V")
BACKEND_COPY_BOTH_RESPONSE = ord("W")
BACKEND_READY_FOR_QUERY = ord("Z")

# First byte of a Describe or Close (F) body: what the name that follows names.
TARGET_STATEMENT = ord("S")
TARGET_PORTAL = ord("P")

#: Frontend type byte -> message name.
FRONTEND_KINDS: dict[int, str] = {
    FRONTEND_BIND: "Bind",
    FRONTEND_CLOSE: "Close",
    FRONTEND_COPY_DATA: "CopyData",
    FRONTEND_COPY_DONE: "CopyDone",
    FRONTEND_COPY_FAIL: "CopyFail",
    FRONTEND_DESCRIBE: "Describe",
    FRONTEND_EXECUTE: "Execute",
    FRONTEND_FLUSH: "Flush",
    FRONTEND_FUNCTION_CALL: "FunctionCall",
    FRONTEND_PARSE: "Parse",
    FRONTEND_PASSWORD: "PasswordMessage",
    FRONTEND_QUERY: "Query",
    FRONTEND_SYNC: "Sync",
    FRONTEND_TERMINATE: "Terminate",
}

#: Backend type byte -> message name.
BACKEND_KINDS: dict[int, str] = {
    BACKEND_PARSE_COMPLETE: "ParseComplete",
    BACKEND_BIND_COMPLETE: "BindComplete",
    BACKEND_CLOSE_COMPLETE: "CloseComplete",
    BACKEND_NOTIFICATION_RESPONSE: "NotificationResponse",
    BACKEND_COPY_DONE: "CopyDone",
    BACKEND_COMMAND_COMPLETE: "CommandComplete",
    BACKEND_COPY_DATA: "CopyData",
    BACKEND_DATA_ROW: "DataRow",
    BACKEND_ERROR_RESPONSE: "ErrorResponse",
    BACKEND_COPY_IN_RESPONSE: "CopyInResponse",
    BACKEND_COPY_OUT_RESPONSE: "CopyOutResponse",
    BACKEND_EMPTY_QUERY_RESPONSE: "EmptyQueryResponse",
    BACKEND_BACKEND_KEY_DATA: "BackendKeyData",
    BACKEND_NO_DATA: "NoData",
    BACKEND_NOTICE_RESPONSE: "NoticeResponse",
    BACKEND_AUTHENTICATION: "Authentication",
    BACKEND_PORTAL_SUSPENDED: "PortalSuspended",
    BACKEND_PARAMETER_STATUS: "ParameterStatus",
    BACKEND_PARAMETER_DESCRIPTION: "ParameterDescription",
    BACKEND_ROW_DESCRIPTION: "RowDescription",
    BACKEND_NEGOTIATE_PROTOCOL_VERSION: "NegotiateProtocolVersion",
    BACKEND_FUNCTION_CALL_RESPONSE: "FunctionCallResponse",
    BACKEND_COPY_BOTH_RESPONSE: "CopyBothResponse",
    BACKEND_READY_FOR_QUERY: "ReadyForQuery",
}

#: The type bytes a client may send after start-up; anything else is garbage.
FRONTEND_TYPES = frozenset(FRONTEND_KINDS)


def frontend_kind(type_byte: int) -> str:
    """The name of a frontend message type, :data:`OTHER` when there is none."""
    return FRONTEND_KINDS.get(type_byte, OTHER)


def backend_kind(type_byte: int) -> str:
    """The name of a backend message type, :data:`OTHER` when there is none."""
    return BACKEND_KINDS.get(type_byte, OTHER)
