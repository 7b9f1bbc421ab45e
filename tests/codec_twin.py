"""A second, interpreted copy of the codec (and of pgotel_proxy.shape) beside the compiled one, for differential tests.

Where the codec's modules are compiled (Cython, pure-Python mode), their
``.py`` sources are the same logic run by the interpreter. ``interpreted()``
imports every module of ``pgotel_proxy/protocol`` once more from its ``.py``,
as the package ``pgotel_proxy.protocol._interpreted`` (so that its modules
import each other, never the compiled ones), and returns it.
``interpreted_shape()`` does the same for ``pgotel_proxy/shape.py``, as
``pgotel_proxy._interpreted_shape``.
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

__all__ = ["interpreted", "interpreted_shape"]

TWIN = protocol.__name__ + "._interpreted"
SHAPE_TWIN = pgotel_proxy.__name__ + "._interpreted_shape"


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


def interpreted_shape() -> types.ModuleType:
    """pgotel_proxy/shape.py run by the interpreter, whether or not the package's shape is compiled."""
    module = sys.modules.get(SHAPE_TWIN)
    if module is None:
        source = os.path.join(os.path.dirname(pgotel_proxy.__file__), "shape.py")
        loader = importlib.machinery.SourceFileLoader(SHAPE_TWIN, source)
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(SHAPE_TWIN, source, loader=loader))
        sys.modules[SHAPE_TWIN] = module
        loader.exec_module(module)
    assert not module.COMPILED and module.__file__.endswith(".py")
    return module
