"""The names of message kinds and pump log entries: one list in Python, the same in C.

The C sources include ``protocol/_kinds.h`` and ``_pumplog.h``; these tests read
the headers and hold them equal to ``protocol/kinds.py`` and
``proxy/connection.py``, so that neither side can drift.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pgotel_proxy.protocol import kinds
from pgotel_proxy.proxy import connection, server

PACKAGE = Path(kinds.__file__).resolve().parent.parent


def _defines(header: Path) -> dict[str, int]:
    """``#define NAME 'c'`` lines of a header: name -> byte value."""
    return {m[1]: ord(m[2]) for m in re.finditer(r"^#define (\w+) '(.)'$", header.read_text(), re.M)}


def _python_kinds(prefix: str) -> dict[str, int]:
    return {name[len(prefix) :]: getattr(kinds, name) for name in dir(kinds) if name.startswith(prefix)}


@pytest.mark.parametrize(("py_prefix", "c_prefix"), [("FRONTEND_", "FE_"), ("BACKEND_", "BE_")])
def test_header_names_the_same_kinds(py_prefix, c_prefix):
    py = {k: v for k, v in _python_kinds(py_prefix).items() if isinstance(v, int)}
    c = {name[len(c_prefix) :]: value for name, value in _defines(PACKAGE / "protocol" / "_kinds.h").items()
         if name.startswith(c_prefix)}
    assert c == py


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
        "LOG_CLIENT": connection.PUMP_LOG_CLIENT,
        "LOG_SERVER": connection.PUMP_LOG_SERVER,
        "LOG_HANDBACK": connection.PUMP_LOG_HANDBACK,
    }
    head = re.search(r"^#define LOG_HEAD (\d+)$", text, re.M)
    assert head is not None and int(head[1]) == server._LOG_HEAD.size
