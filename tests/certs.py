"""Test-side name for :mod:`pgotel_proxy.devcerts` (throwaway CA and certificates)."""

from pgotel_proxy.devcerts import *  # noqa: F401,F403
from pgotel_proxy.devcerts import __all__, make_certs  # noqa: F401
