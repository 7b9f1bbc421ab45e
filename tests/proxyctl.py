"""Test-side proxy runner: :class:`pgotel_proxy.background.BackgroundProxy` with test defaults.

Test defaults: export every 50 ms, no upstream TLS (the fixture server has TLS,
but most tests are about other things; TLS tests set it explicitly).
"""

from __future__ import annotations

from typing import Any

from pgotel_proxy.background import BackgroundProxy

__all__ = ["RunningProxy"]


class RunningProxy(BackgroundProxy):
    def __init__(self, **overrides: Any) -> None:
        overrides.setdefault("export_interval", 0.05)
        overrides.setdefault("upstream_tls", "disable")
        super().__init__(**overrides)
