"""The names of message kinds and pump log entries: one list in Python, the same in C.

The message kinds are named once, in ``protocol/kinds.py``. The pump's C
includes ``_pumplog.h``; a test reads it and holds it equal to
``protocol/pumplog.py``, so that neither side can drift.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pgotel_proxy.protocol import kinds
from pgotel_proxy.protocol import pumplog

PACKAGE = Path(kinds.__file__).resolve().parent.parent


def _python_kinds(prefix: str) -> dict[str, int]:
    return {name[len(prefix) :]: getattr(kinds, name) for name in dir(kinds) if name.startswith(prefix)}


@pytest.mark.parametrize(("table", "prefix"), [(kinds.FRONTEND_KINDS, "FRONTEND_"), (kinds.BACKEND_KINDS, "BACKEND_")])
def test_table_holds_every_named_kind_once(table, prefix):
    named = {v for v in _python_kinds(prefix).values() if isinstance(v, int)}
    assert set(table) == named
    assert len(set(table.values())) == len(table)
    # Named as in the protocol chapter: the constant is the message name in upper snake case.
    for type_byte, name in table.items():
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()
        if snake != "PASSWORD_MESSAGE":
            assert getattr(kinds, prefix + snake) == type_byte


def test_same_byte_different_kind_per_direction():
    assert kinds.frontend_kind(ord("D")) == "Describe"
    assert kinds.backend_kind(ord("D")) == "DataRow"
    assert kinds.frontend_kind(ord("S")) == "Sync"
    assert kinds.backend_kind(ord("S")) == "ParameterStatus"
    assert kinds.frontend_kind(ord("Z")) == kinds.OTHER
    assert kinds.backend_kind(ord("X")) == kinds.OTHER
    assert kinds.FRONTEND_TYPES == frozenset(b"BCdcfDEHFPpQSX")


def test_pump_log_header_matches_python():
    text = (PACKAGE / "_pumplog.h").read_text()
    enum = dict(re.findall(r"^\s*(LOG_\w+) = (\d+)", text, re.M))
    assert {name: int(v) for name, v in enum.items()} == {
        "LOG_CLIENT": pumplog.PUMP_LOG_CLIENT,
        "LOG_SERVER": pumplog.PUMP_LOG_SERVER,
        "LOG_HANDBACK": pumplog.PUMP_LOG_HANDBACK,
        "LOG_CLIENT_WAIT": pumplog.PUMP_LOG_CLIENT_WAIT,
    }
    head = re.search(r"^#define LOG_HEAD (\d+)$", text, re.M)
    assert head is not None and int(head[1]) == pumplog.LOG_HEAD.size
