"""A second, interpreted copy of the codec (and of pgotel_proxy.shape) beside the compiled one, for differential tests.

Where the codec's modules are compiled (Cython, pure-Python mode), their
``.py`` sources are the same logic run by the interpreter. ``interpreted()``
imports every module of ``pgotel_proxy/protocol`` once more from its ``.py``,
as the package ``pgotel_proxy.protocol._interpreted`` (so that its modules
import each other, never the compiled ones), and returns it.
``interpreted_shape()`` does the same for ``pgotel_proxy/shape.py``, as
``pgotel_proxy._interpreted_shape``, and ``interpreted_histograms()`` for
``pgotel_proxy/tracing/histograms.py``, as ``pgotel_proxy.tracing._interpreted_histograms``.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import pgotel_proxy
from pgotel_proxy import protocol
from pgotel_proxy.protocol._impl import SourceFinder

__all__ = ["interpreted", "interpreted_histograms", "interpreted_shape"]

TWIN = protocol.__name__ + "._interpreted"
SHAPE_TWIN = pgotel_proxy.__name__ + "._interpreted_shape"
HISTOGRAMS_TWIN = pgotel_proxy.__name__ + ".tracing._interpreted_histograms"


def interpreted() -> types.SimpleNamespace:
    """The interpreted twin's modules: session, events, messages, scan, framing, records, pumplog, errors."""
    if TWIN not in sys.modules:
        directory = os.path.dirname(protocol.__file__)
        sys.meta_path.insert(0, SourceFinder(TWIN, directory))
        package = types.ModuleType(TWIN)
        package.__path__ = []  # its modules come from SourceFinder only
        sys.modules[TWIN] = package
    mods = {name: importlib.import_module(f"{TWIN}.{name}")
            for name in ("session", "events", "messages", "scan", "framing", "records", "pumplog", "errors")}
    assert not mods["session"].COMPILED and mods["session"].__file__.endswith(".py")
    return types.SimpleNamespace(**mods)


def _from_source(name: str, source: str) -> types.ModuleType:
    """The module ``source`` run by the interpreter as ``name`` (once)."""
    module = sys.modules.get(name)
    if module is None:
        loader = importlib.machinery.SourceFileLoader(name, source)
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, source, loader=loader))
        sys.modules[name] = module
        loader.exec_module(module)
    assert not module.COMPILED and module.__file__.endswith(".py")
    return module


def interpreted_shape() -> types.ModuleType:
    """pgotel_proxy/shape.py run by the interpreter, whether or not the package's shape is compiled."""
    return _from_source(SHAPE_TWIN, os.path.join(os.path.dirname(pgotel_proxy.__file__), "shape.py"))


def interpreted_histograms() -> types.ModuleType:
    """pgotel_proxy/tracing/histograms.py run by the interpreter, whether or not the package's is compiled."""
    return _from_source(HISTOGRAMS_TWIN, os.path.join(os.path.dirname(pgotel_proxy.__file__), "tracing", "histograms.py"))
