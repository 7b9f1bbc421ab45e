"""Build of the one optional C helper (pgotel_proxy/protocol/_scan.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler the package installs anyway and
pgotel_proxy.protocol.scan uses its Python version.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("pgotel_proxy.protocol._scan", ["pgotel_proxy/protocol/_scan.c"], optional=True),
    ],
)
