"""Build of the optional C helpers; everything else is in pyproject.toml.

* pgotel_proxy/protocol/_scan.c: stepping over runs of DataRow/CopyData;
* pgotel_proxy/protocol/_core.c: the codec's per-message loop for the common messages;
* pgotel_proxy/tracing/_otlpenc.c: the byte-assembling half of the OTLP span encoder;
* pgotel_proxy/_shape.c: statement shapes (literals blanked, the span cache's key);
* pgotel_proxy/proxy/_pump.c: the relay of connections with nothing to observe, on a thread;
* pgotel_proxy/proxy/_sender.c: the asyncio relay's write to a plain socket (one send());
* pgotel_proxy/proxy/_tls.c: TLS on OpenSSL (both legs, start-up and pump; needs libssl's headers).

``optional=True``: without a C compiler the package installs anyway and the
Python versions of the same functions serve (pgotel_proxy.protocol.scan,
pgotel_proxy.protocol.session, pgotel_proxy.tracing.otlp, pgotel_proxy.shape; the
asyncio relay of pgotel_proxy.proxy.connection for the pump, the transport's
write for the Sender; Python's ssl module for _tls, and then TLS sessions stay on
the asyncio relay).

Shared helpers of the extensions are in the header pgotel_proxy/_cutil.h; the
message type bytes in pgotel_proxy/protocol/_kinds.h; the pump's log layout, which
_pump.c writes and _core.c reads, in pgotel_proxy/_pumplog.h; what the pump may do
with a TLS connection of _tls (a capsule: _pump links no TLS library) in
pgotel_proxy/proxy/_tlsapi.h.
"""

from setuptools import Extension, setup

#: Helpers shared by extensions, included as a header (pgotel_proxy/_cutil.h).
_COMMON = ["pgotel_proxy/_cutil.h"]
#: The pump's log layout, shared by its writer and its reader.
_PUMPLOG = ["pgotel_proxy/_pumplog.h"]
#: What the pump may do with a TLS connection of _tls, shared by both.
_TLSAPI = ["pgotel_proxy/proxy/_tlsapi.h"]

setup(
    ext_modules=[
        Extension("pgotel_proxy.protocol._scan", ["pgotel_proxy/protocol/_scan.c"], optional=True),
        Extension("pgotel_proxy.protocol._core", ["pgotel_proxy/protocol/_core.c"],
                  depends=[*_COMMON, "pgotel_proxy/protocol/_kinds.h", *_PUMPLOG], optional=True),
        Extension("pgotel_proxy.tracing._otlpenc", ["pgotel_proxy/tracing/_otlpenc.c"], depends=_COMMON,
                  optional=True),
        Extension("pgotel_proxy._shape", ["pgotel_proxy/_shape.c"], optional=True),
        Extension("pgotel_proxy.proxy._pump", ["pgotel_proxy/proxy/_pump.c"], depends=[*_PUMPLOG, *_TLSAPI],
                  optional=True),
        Extension("pgotel_proxy.proxy._tls", ["pgotel_proxy/proxy/_tls.c"], depends=_TLSAPI, libraries=["ssl", "crypto"],
                  optional=True),
        Extension("pgotel_proxy.proxy._sender", ["pgotel_proxy/proxy/_sender.c"], optional=True),
    ],
)
