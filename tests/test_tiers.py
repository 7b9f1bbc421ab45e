"""The tier table (``TIERS`` in tests/conftest.py) places every test module once and names no missing one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from conftest import TIERS

TESTS_DIR = Path(__file__).resolve().parent


def test_every_test_module_is_in_exactly_one_tier():
    on_disk = {path.relative_to(TESTS_DIR).as_posix() for path in TESTS_DIR.rglob("test_*.py")}
    placed = Counter(module for modules in TIERS.values() for module in modules)
    assert sorted(on_disk - set(placed)) == [], "modules in no tier"
    assert sorted(module for module, count in placed.items() if count > 1) == [], "modules in several tiers"
    assert sorted(set(placed) - on_disk) == [], "tier entries with no module"


def test_tiers_are_the_registered_markers(pytestconfig):
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    assert set(TIERS) <= registered
