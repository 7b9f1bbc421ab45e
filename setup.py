"""Build of the optional C helpers; everything else is in pyproject.toml.

* pgotel_proxy/protocol/_scan.c: stepping over runs of DataRow/CopyData;
* pgotel_proxy/protocol/_core.c: the codec's per-message loop for the common messages;
* pgotel_proxy/tracing/_otlpenc.c: the byte-assembling half of the OTLP span encoder;
* pgotel_proxy/_shape.c: statement shapes (literals blanked, the span cache's key);
* pgotel_proxy/proxy/_pump.c: the compiled relay (traced sessions or not), on a thread.

``optional=True``: without a C compiler the package installs anyway and the
Python versions of the same functions serve (pgotel_proxy.protocol.scan,
pgotel_proxy.protocol.session, pgotel_proxy.tracing.otlp, pgotel_proxy.shape; the
asyncio relay of pgotel_proxy.proxy.connection for the pump).

Shared helpers of the extensions are in the header pgotel_proxy/_cutil.h; the
message type bytes in pgotel_proxy/protocol/_kinds.h; the pump's log layout, which
_pump.c writes and _core.c reads, in pgotel_proxy/_pumplog.h.
"""

from setuptools import Extension, setup

#: Helpers shared by extensions, included as a header (pgotel_proxy/_cutil.h).
_COMMON = ["pgotel_proxy/_cutil.h"]
#: The pump's log layout, shared by its writer and its reader.
_PUMPLOG = ["pgotel_proxy/_pumplog.h"]

setup(
    ext_modules=[
        Extension("pgotel_proxy.protocol._scan", ["pgotel_proxy/protocol/_scan.c"], optional=True),
        Extension("pgotel_proxy.protocol._core", ["pgotel_proxy/protocol/_core.c"],
                  depends=[*_COMMON, "pgotel_proxy/protocol/_kinds.h", *_PUMPLOG], optional=True),
        Extension("pgotel_proxy.tracing._otlpenc", ["pgotel_proxy/tracing/_otlpenc.c"], depends=_COMMON,
                  optional=True),
        Extension("pgotel_proxy._shape", ["pgotel_proxy/_shape.c"], optional=True),
        Extension("pgotel_proxy.proxy._pump", ["pgotel_proxy/proxy/_pump.c"], depends=_PUMPLOG, optional=True),
    ],
)
