"""The layers of ARCHITECTURE.md, held by the code: who may import whom, and where I/O may happen.

Static checks read the sources (Python with ``ast``, C as text): nothing under
``protocol/`` does I/O, in Python or C; no import runs against the layer table.
One end-to-end check runs the real command line as a process (tracing on, the
span process, otelwal emission on) and reads which modules the relay process
loaded: never the OpenTelemetry SDK, an exporter, protobuf or pglast.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from waiting import free_port, wait_accepting

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pgotel_proxy"


# ---------------------------------------------------------------------------
# Python imports


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in the file, also those inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                # "from . import x" imports the module x when there is one.
                sub = f"{module}.{alias.name}"
                found.append((node.lineno, sub if sub in known else module))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found += [(node.lineno, a.value) for a in node.args[:1] if isinstance(a, ast.Constant)]
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pgotel_proxy" else ""


# Composition roots and tools: nothing below them imports them.
_ENTRY = {"cli", "cli_cdc", "background", "demo", "devdb", "devcerts", "__main__"}


def _violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (both dotted), or None when it may.

    The rows of ARCHITECTURE.md's table, "Layers and what each may import".
    Modules shared by every layer (the version, ``stats``, ``shape``,
    ``sqlcomment``, ``config``, ``runtime``, ``logsetup``) are not layers.
    """
    src, dst = _layer(importer), _layer(imported)
    top = imported.split(".")[0]
    if src == dst:
        return None
    if src == "protocol":
        if top == "pgotel_proxy":
            return "protocol/ imports nothing of the package outside it"
        if top == "cython":  # pure-Python mode: the compiler's names, a stand-in without it (_nocython)
            return None
        if top not in sys.stdlib_module_names or top in ("asyncio", "socket", "ssl", "selectors"):
            return "protocol/ is sans-IO: stdlib only (and Cython's names), no asyncio or sockets"
        return None
    if src == "sqlcomment" and top == "pgotel_proxy" and dst not in ("shape", "stats"):
        return "sqlcomment imports the stdlib, the shared literal blanking and the one statistics registry only"
    if top != "pgotel_proxy":
        return None
    if src in _ENTRY:
        return None
    if dst in _ENTRY:
        return f"{dst} is an entry point: layers do not import it"
    if src == "tracing" and dst == "enrich" and importer == "pgotel_proxy.tracing.process":
        # The span process is put together in tracing/process.py (its child_main), as the
        # relay is in proxy/server.py: it starts the enricher, through the package interface.
        if imported != "pgotel_proxy.enrich":
            return "the span process talks to enrich/ through its package interface, not its internals"
        return None
    if src == "tracing" and dst in ("proxy", "enrich", "wal", "admin"):
        return "tracing/ is below proxy/, enrich/ and wal/ (inject what it needs from the composition root)"
    if src in ("enrich", "wal") and dst in ("proxy", "admin", "enrich", "wal"):
        return f"{src}/ may import protocol/ and tracing/, not {dst}/"
    if src == "proxy" and dst in ("tracing", "enrich", "wal", "admin"):
        if importer == "pgotel_proxy.proxy.workers" and imported == "pgotel_proxy.enrich":
            # The workers' parent puts several relays together: it creates their shared
            # session file, through the package interface.
            return None
        if importer != "pgotel_proxy.proxy.server":
            return f"only proxy/server.py (where the proxy is put together) talks to {dst}/"
        if imported != f"pgotel_proxy.{dst}":
            return f"proxy/ talks to {dst}/ through its package interface, not its internals"
    return None


def test_python_imports_follow_the_layer_table():
    modules = _modules()
    known = set(modules)
    assert {"pgotel_proxy.protocol.session", "pgotel_proxy.tracing.spans", "pgotel_proxy.wal.emit"} <= known
    wrong = []
    for name, path in modules.items():
        for line, imported in _imports(name, path, known):
            why = _violation(name, imported)
            if why:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {imported}: {why}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("importer, imported", [
    ("pgotel_proxy.protocol.session", "asyncio"),
    ("pgotel_proxy.protocol.session", "opentelemetry.trace"),
    ("pgotel_proxy.protocol.session", "pgotel_proxy.stats"),
    ("pgotel_proxy.tracing.process", "pgotel_proxy.cli"),
    ("pgotel_proxy.tracing", "pgotel_proxy.enrich"),
    ("pgotel_proxy.wal.emit", "pgotel_proxy.proxy.server"),
    ("pgotel_proxy.enrich.join", "pgotel_proxy.proxy"),
    ("pgotel_proxy.proxy.connection", "pgotel_proxy.wal.emit"),
    ("pgotel_proxy.proxy.server", "pgotel_proxy.tracing.spans"),
    ("pgotel_proxy.sqlcomment", "pgotel_proxy.tracing"),
])
def test_the_layer_rules_catch_a_wrong_way_import(importer, imported):
    assert _violation(importer, imported)


# ---------------------------------------------------------------------------
# C sources under protocol/

_IO_HEADERS = re.compile(
    r"<(?:sys/(?:socket|epoll|eventfd|select|uio|un|sendfile|poll)\.h|unistd\.h|fcntl\.h|poll\.h|stdio\.h"
    r"|netinet/[\w/]+\.h|arpa/[\w/]+\.h|netdb\.h|pthread\.h)>")
_IO_CALLS = re.compile(
    r"(?<![\w.>])(?:send|recv|sendto|recvfrom|sendmsg|recvmsg|write|read|writev|readv|socket|connect|accept"
    r"|accept4|close|shutdown|epoll_\w+|poll|select|open|fopen|fwrite|fread|fprintf|printf|puts)\s*\(")
_C_COMMENT_OR_STRING = re.compile(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)


def _c_sources(folder: Path) -> list[Path]:
    """The C files of ``folder`` and the package headers they include."""
    files = sorted(folder.glob("*.c")) + sorted(folder.glob("*.h"))
    seen = list(files)
    for path in files:
        for inc in re.findall(r'#\s*include\s+"([^"]+)"', path.read_text()):
            header = (path.parent / inc).resolve()
            if header.is_file() and header not in seen:
                seen.append(header)
    return seen


def _c_problems(text: str) -> list[str]:
    problems = [f"includes {m.group(0)}" for m in _IO_HEADERS.finditer(text)]
    code = _C_COMMENT_OR_STRING.sub(" ", text)
    problems += [f"calls {m.group(0).rstrip('( ')}()" for m in _IO_CALLS.finditer(code)]
    return problems


def _generated(path: Path) -> bool:
    """C that Cython wrote from a source beside it (the codec's compiled build), not written by hand."""
    with path.open() as f:
        return f.readline().startswith("/* Generated by Cython")


#: What a .pxd of the codec may cimport: Cython, CPython's objects, and C's memory and string functions.
_PXD_CIMPORTS = re.compile(r"^\s*(?:from\s+(\S+)\s+cimport|cimport\s+(\S+))", re.M)
_PXD_ALLOWED = ("cython", "cpython.", "libc.string", "libc.stdint", ".")


def test_protocol_has_no_hand_written_c_and_its_cython_does_no_io():
    folder = PKG / "protocol"
    hand = [p.name for p in sorted(folder.glob("*.[ch]")) if not _generated(p)]
    assert not hand, f"hand-written C under protocol/: {hand}"
    pxds = sorted(folder.glob("*.pxd"))
    assert any(p.name == "session.pxd" for p in pxds)
    wrong = []
    for pxd in pxds:
        for m in _PXD_CIMPORTS.finditer(pxd.read_text()):
            name = m[1] or m[2]
            if not any(name == a or name.startswith(a) for a in _PXD_ALLOWED):
                wrong.append(f"{pxd.name}: cimports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_c_check_catches_io():
    assert _c_problems("#include <sys/socket.h>\n")
    assert _c_problems("#include <unistd.h>\n")
    assert _c_problems("ssize_t k = send(fd, p, n, 0);")
    assert _c_problems("if (write(fd, p, n) < 0) return -1;")
    # Names that only look alike, comments and strings are not I/O.
    assert not _c_problems("PyObject_CallOneArg(w->write, data); /* send() */ x = \"recv(\"; resend(1);")


#: CPython's private API: names with a leading underscore and a capital (``_PyLong_AsByteArray``,
#: ``_PyType_Lookup``), which may change in any release.
_PRIVATE_API = re.compile(r"(?<![\w])_Py[A-Z]\w*")


def _private_api(text: str) -> list[str]:
    return sorted(set(_PRIVATE_API.findall(_C_COMMENT_OR_STRING.sub(" ", text))))


def test_hand_written_c_uses_no_private_cpython_api():
    hand = [p for p in sorted(PKG.rglob("*.[ch]")) if not _generated(p)]
    assert any(p.name == "_otlpenc.c" for p in hand) and any(p.name == "_pump.c" for p in hand)
    found = {p.relative_to(PKG).as_posix(): names for p in hand if (names := _private_api(p.read_text()))}
    assert not found, found


def test_the_private_api_check_catches_a_private_call():
    assert _private_api("return _PyLong_AsByteArray((PyLongObject *)o, out, n, 0, 0);") == ["_PyLong_AsByteArray"]
    assert not _private_api("PyLong_AsUnsignedLongLong(o); /* not _PyLong_AsByteArray */ my_PyThing(1);")


# ---------------------------------------------------------------------------
# The relay process never loads the span builder's dependencies

_FORBIDDEN_IN_RELAY = ("opentelemetry.sdk", "opentelemetry.exporter", "google.protobuf", "pglast")

# The real command line in a fresh interpreter; on exit (after SIGTERM and the
# drain) it writes the names of every module the process loaded.
_RUN_AND_LIST_MODULES = """
import atexit, json, sys

out = sys.argv[1]


def dump():
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)


atexit.register(dump)
from pgotel_proxy.cli import main

main(sys.argv[2:], prog_name="pgotel-proxy")
"""


def test_relay_process_never_loads_the_sdk_exporters_protobuf_or_pglast(pg, otlp, tmp_path):
    table = "layers_relay_t"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        conn.execute(f"GRANT ALL ON {table} TO PUBLIC")
    port = free_port()
    listing = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGOTEL_", "OTEL_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, "-c", _RUN_AND_LIST_MODULES, str(listing), "run",
            "--listen", f"127.0.0.1:{port}", "--upstream", f"{pg.host}:{pg.port}", "--upstream-tls", "disable",
            "--otlp-endpoint", otlp.http_endpoint, "--export-interval", "0.05", "--wal-propagation",
            "--admin-listen", f"127.0.0.1:{free_port()}", "--drain-timeout", "1"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable"
    tp = "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    try:
        wait_accepting(dsn, proc)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"SELECT 1 /*traceparent='{tp}'*/")
            # A traced autocommit write (simple Query), one in an extended batch and one in a block:
            # otelwal emission decides in the relay where to splice its message in.
            conn.execute(f"INSERT INTO {table} VALUES (1, 'simple') /*traceparent='{tp}'*/")
            conn.execute(f"INSERT INTO {table} VALUES (%s, 'extended') /*traceparent='{tp}'*/", (2,))
            with conn.transaction():
                conn.execute(f"UPDATE {table} SET v = 'block' WHERE id = %s /*traceparent='{tp}'*/", (1,))
            conn.execute(f"SET pgotel.traceparent = '{tp}'")
            conn.execute(f"DELETE FROM {table} WHERE id = 2")
            conn.execute("RESET pgotel.traceparent")
        # The spans are built in the span process and exported from there; the emitted
        # messages' LSNs on them show that emission ran.
        spans = otlp.wait_for(lambda got: sum("pgotel.wal.message_lsn" in s.attributes for s in got) >= 3,
                              timeout=20)
        assert any(s.trace_id == tp[3:35] and s.name.startswith("INSERT") for s in spans
                   if "pgotel.wal.message_lsn" in s.attributes)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    assert proc.returncode == 0, err
    loaded = json.loads(listing.read_text())
    # It was the relay that did the work: the proxy, the codec, emission and the span process's client.
    for name in ("pgotel_proxy.proxy.connection", "pgotel_proxy.protocol.session", "pgotel_proxy.wal.emit",
                 "pgotel_proxy.tracing.process"):
        assert name in loaded, name
    wrong = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in _FORBIDDEN_IN_RELAY))
    assert not wrong, wrong
