"""A second, interpreted copy of the codec beside the compiled one, for differential tests.

Where the codec's modules are compiled (Cython, pure-Python mode), their
``.py`` sources are the same logic run by the interpreter. ``interpreted()``
imports every module of ``pgotel_proxy/protocol`` once more from its ``.py``,
as the package ``pgotel_proxy.protocol._interpreted`` (so that its modules
import each other, never the compiled ones), and returns it.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

from pgotel_proxy import protocol
from pgotel_proxy.protocol._impl import SourceFinder

__all__ = ["interpreted"]

TWIN = protocol.__name__ + "._interpreted"


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
