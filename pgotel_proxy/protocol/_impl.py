"""Which implementation serves: the compiled extensions, or pure Python everywhere.

``PGOTEL_PURE_PYTHON`` (any non-empty value) makes every module that has a
compiled version take its Python one instead, so that tests and CI can run
the Python path on a machine where the extensions are built. It is read
here, once, at import; the modules with a compiled version consult
:data:`PURE_PYTHON` rather than the environment.

The switch lives in ``protocol/``, the bottom layer, because every other
layer may import from it and ``protocol/`` may import nothing outside itself.
"""

from __future__ import annotations

import os

__all__ = ["PURE_PYTHON", "PURE_PYTHON_ENV"]

#: The environment variable that forces the Python implementations.
PURE_PYTHON_ENV = "PGOTEL_PURE_PYTHON"
#: True: leave the compiled extensions out, use the Python versions.
PURE_PYTHON: bool = bool(os.environ.get(PURE_PYTHON_ENV))
