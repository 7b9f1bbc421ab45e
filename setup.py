"""Build of the compiled parts; everything else is in pyproject.toml.

The protocol codec (pgotel_proxy/protocol: events, messages, scan, framing,
session, records, pumplog) and the statement shapes (pgotel_proxy/shape.py:
literals blanked, the span cache's key) are one source: each module a ``.py``
that runs as it is, and that Cython compiles (pure-Python mode; the types in
the ``.pxd`` beside it) when Cython is importable at build time. The
hand-written C:

* pgotel_proxy/tracing/_otlpenc.c: the byte-assembling half of the OTLP span encoder;
* pgotel_proxy/proxy/_pump.c: the compiled relay (traced sessions or not), on a
  thread; it frames client bytes with the codec's framing (imported from the
  compiled pgotel_proxy/protocol/framing.py through its C capsule);
* pgotel_proxy/proxy/_tls.c: TLS on OpenSSL (both legs, start-up and pump; needs libssl's headers).

``optional=True`` everywhere: without Cython or a C compiler the package
installs anyway and the Python versions serve (the codec's and shape's ``.py`` files,
pgotel_proxy.tracing.otlp; the asyncio relay of
pgotel_proxy.proxy.connection for the pump; Python's ssl module for _tls, and
then TLS sessions stay on the asyncio relay). ``PGOTEL_PURE_PYTHON=1`` makes
them serve where the compiled ones exist (pgotel_proxy/protocol/_impl.py).

Shared helpers of the C extensions are in the header pgotel_proxy/_cutil.h; the
pump's log layout, which _pump.c writes (pgotel_proxy/protocol/pumplog.py reads
it), in pgotel_proxy/_pumplog.h; what the pump may do with a TLS connection of
_tls (a capsule: _pump links no TLS library) in pgotel_proxy/proxy/_tlsapi.h.
"""

from setuptools import Extension, setup

#: Helpers shared by extensions, included as a header (pgotel_proxy/_cutil.h).
_COMMON = ["pgotel_proxy/_cutil.h"]
#: The pump's log layout, shared by its writer and its reader.
_PUMPLOG = ["pgotel_proxy/_pumplog.h"]
#: What the pump may do with a TLS connection of _tls, shared by both.
_TLSAPI = ["pgotel_proxy/proxy/_tlsapi.h"]
#: The codec's modules compiled by Cython (protocol/_impl.py CODEC_MODULES, which the
#: PGOTEL_PURE_PYTHON switch loads from source).
CODEC_MODULES = ("events", "messages", "scan", "framing", "session", "records", "pumplog")


def _cython() -> list:
    """The codec's extensions and shape's, or none when Cython is not installed (their .py files serve)."""
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    modules = [
        Extension(f"pgotel_proxy.protocol.{name}", [f"pgotel_proxy/protocol/{name}.py"], optional=True)
        for name in CODEC_MODULES
    ]
    modules.append(Extension("pgotel_proxy.shape", ["pgotel_proxy/shape.py"], optional=True))
    modules.append(Extension("pgotel_proxy.tracing.histograms", ["pgotel_proxy/tracing/histograms.py"], optional=True))
    return cythonize(
        modules,
        compiler_directives={"language_level": 3, "annotation_typing": False, "boundscheck": True,
                           "warn.unreachable": False},
        quiet=True,
    )


setup(
    ext_modules=[
        *_cython(),
        Extension("pgotel_proxy.tracing._otlpenc", ["pgotel_proxy/tracing/_otlpenc.c"], depends=_COMMON,
                  optional=True),
        Extension("pgotel_proxy.proxy._pump", ["pgotel_proxy/proxy/_pump.c"],
                  depends=[*_PUMPLOG, *_TLSAPI, "pgotel_proxy/protocol/framing.pxd"],  # its structs: framing_api.h
                  optional=True),
        Extension("pgotel_proxy.proxy._tls", ["pgotel_proxy/proxy/_tls.c"], depends=_TLSAPI, libraries=["ssl", "crypto"],
                  optional=True),
    ],
)
