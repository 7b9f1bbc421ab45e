"""Sans-IO PostgreSQL wire protocol: framing, decoding and per-connection state.

Nothing here does I/O or imports asyncio; the proxy feeds bytes in and reads
state and finished statement records out.
"""

from . import _impl  # noqa: F401  (first: PGOTEL_PURE_PYTHON decides how the codec's modules load)
from .errors import ProtocolViolation
from .events import Completion, Statement
from .session import Session
from .startup import StartupPacket, encode_startup, parse_startup_packet, startup_packet_length

__all__ = [
    "Completion",
    "ProtocolViolation",
    "Session",
    "Statement",
    "StartupPacket",
    "encode_startup",
    "parse_startup_packet",
    "startup_packet_length",
]
