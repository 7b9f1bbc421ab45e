"""Test-side name for :mod:`pgotel_proxy.devdb` (the throwaway PostgreSQL used by tests, bench and demo)."""

from pgotel_proxy import devdb as _devdb
from pgotel_proxy.devdb import *  # noqa: F401,F403
from pgotel_proxy.devdb import __all__  # noqa: F401


def __getattr__(name):
    return getattr(_devdb, name)
