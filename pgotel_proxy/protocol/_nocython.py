"""What the codec's sources use of the ``cython`` module, for a machine without Cython.

The codec's modules are written in Cython's pure-Python mode: compiled where
Cython and a compiler were there at install time, run as they are otherwise.
They test ``cython.compiled`` to choose a byte loop written for the compiler;
without Cython installed this stands in for the module (never compiled).
"""

from types import SimpleNamespace

__all__ = ["cython"]

cython = SimpleNamespace(compiled=False)
