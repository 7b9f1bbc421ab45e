"""Which implementation serves: the compiled extensions, or pure Python everywhere.

``PGOTEL_PURE_PYTHON`` (any non-empty value) makes every module that has a
compiled version take its Python one instead, so that tests and CI can run
the Python path on a machine where the extensions are built. It is read
here, once, at import; the modules with a compiled version consult
:data:`PURE_PYTHON` rather than the environment.

The codec's modules (:data:`CODEC_MODULES`), the statement shapes and the
latency histograms (:data:`SHARED_MODULES`) are one source each: the same
``.py`` runs interpreted, or is compiled by Cython at install time (its
``.pxd`` beside it gives the types). Compiled, the extension module sits next
to the source and Python's import prefers it; with the switch set,
:class:`SourceFinder` is put first on ``sys.meta_path`` before any of them is
imported (the package's ``__init__.py`` imports this module first), so that
their ``.py`` files serve.

The switch lives in ``protocol/``, the bottom layer, because every other
layer may import from it and ``protocol/`` may import nothing outside itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

__all__ = ["CODEC_MODULES", "PURE_PYTHON", "PURE_PYTHON_ENV", "SHARED_MODULES", "SourceFinder"]

#: The environment variable that forces the Python implementations.
PURE_PYTHON_ENV = "PGOTEL_PURE_PYTHON"
#: True: leave the compiled extensions out, use the Python versions.
PURE_PYTHON: bool = bool(os.environ.get(PURE_PYTHON_ENV))

#: The modules of this package that setup.py compiles with Cython (each a ``.py`` and a ``.pxd``).
CODEC_MODULES = ("events", "messages", "scan", "framing", "session", "records", "pumplog")
#: The modules of other packages that setup.py compiles with Cython, by name under the package above this one.
SHARED_MODULES = ("shape", "tracing.histograms")

_HERE = os.path.dirname(os.path.abspath(__file__))


class SourceFinder(importlib.abc.MetaPathFinder):
    """Imports the modules ``package.<name>`` (for ``name`` in ``names``) from their ``.py`` in ``directory``.

    Never from a compiled module beside them. ``names`` None: every ``.py``
    of the directory (a package of its own that mirrors this one: a second,
    interpreted copy of the codec for the tests that compare the two builds).
    """

    def __init__(self, package: str, directory: str, names: tuple[str, ...] | None = None) -> None:
        self.package = package
        self.directory = directory
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        package, _, leaf = fullname.rpartition(".")
        if package != self.package or (self.names is not None and leaf not in self.names):
            return None
        source = os.path.join(self.directory, leaf + ".py")
        if not os.path.isfile(source):
            return None
        loader = importlib.machinery.SourceFileLoader(fullname, source)
        return importlib.util.spec_from_file_location(fullname, source, loader=loader)


def _finders() -> list[SourceFinder]:
    """One finder a package with compiled modules, for the switch."""
    top = __package__.rpartition(".")[0]
    by_package: dict[str, list[str]] = {__package__: list(CODEC_MODULES)}
    for name in SHARED_MODULES:
        sub, _, leaf = name.rpartition(".")
        by_package.setdefault(f"{top}.{sub}" if sub else top, []).append(leaf)
    root = os.path.dirname(_HERE)
    return [SourceFinder(package, os.path.join(root, *package.split(".")[1:]), tuple(names))
            for package, names in by_package.items()]


if PURE_PYTHON:
    for _finder in _finders():
        if not any(isinstance(f, SourceFinder) and f.package == _finder.package for f in sys.meta_path):
            sys.meta_path.insert(0, _finder)
