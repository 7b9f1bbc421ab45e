"""Following the server log, from a file (or its directory) or over SQL, across rotations.

:class:`FileLogFollower` reads a path that is either a log file or the log
directory. It starts at the end of the newest file (history is not
replayed), reads what was appended, and handles the three ways a log moves on:

* a newer file appears in the directory (``log_filename`` with a time stamp,
  ``pg_rotate_logfile()``): the old file is read to its end first, then the
  new one from its start, so no record written before the switch is lost;
* the file is truncated (``log_truncate_on_rotation``): read again from 0;
* the file is renamed away and a new one created under the same name
  (logrotate): the open descriptor is read to its end, then the path reopened.

:class:`SqlLogFollower` does the same over a database connection with
``pg_current_logfile(format)`` and ``pg_read_binary_file(path, offset,
length)``; the role needs ``pg_read_server_files`` (or to be superuser) and
EXECUTE on ``pg_current_logfile`` (granted to ``pg_monitor``).

Both return raw bytes; the format parser (:mod:`.logformat`) makes records.
Each read is capped (:data:`READ_CHUNK`) so one poll stays short.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["FileLogFollower", "SqlLogFollower", "READ_CHUNK", "LOG_SUFFIX"]

log = logging.getLogger("pgotel_proxy.enrich")

READ_CHUNK = 1024 * 1024
LOG_SUFFIX = {"jsonlog": ".json", "csvlog": ".csv", "stderr": ""}


class FileLogFollower:
    """Reads what is appended to the server log on the local file system."""

    def __init__(self, path: str | os.PathLike, fmt: str) -> None:
        self.path = Path(path)
        self.fmt = fmt
        self._fh = None
        self._file: Path | None = None
        self._ino: int | None = None

    def check(self) -> None:
        """Open the newest log file at its end; raises OSError with the reason when that is impossible."""
        current = self._newest()
        if current is None:
            raise FileNotFoundError(f"no {self.fmt} log file in {self.path}")
        self._open(current, at_end=True)

    def _newest(self) -> Path | None:
        if self.path.is_dir():
            suffix = LOG_SUFFIX.get(self.fmt, "")
            files = [p for p in self.path.iterdir() if p.is_file() and (not suffix or p.name.endswith(suffix))]
            if self.fmt == "stderr":
                # The collector's csv and json siblings are not ours.
                files = [p for p in files if not p.name.endswith((".csv", ".json"))]
            if not files:
                return None
            return max(files, key=lambda p: (p.stat().st_mtime_ns, p.name))
        if not self.path.exists():
            os.stat(self.path)  # raises with the errno's own words
        return self.path

    def _open(self, path: Path, at_end: bool) -> None:
        fh = open(path, "rb")
        if self._fh is not None:
            self._fh.close()
        self._fh = fh
        self._file = path
        self._ino = os.fstat(fh.fileno()).st_ino
        if at_end:
            fh.seek(0, os.SEEK_END)

    def read(self) -> bytes:
        """New bytes since the last call (b'' when nothing new)."""
        if self._fh is None:
            self.check()
        fh = self._fh
        data = fh.read(READ_CHUNK)
        if data:
            return data
        # At the end of what we hold: has the log moved on?
        try:
            st = os.stat(self._file)
        except FileNotFoundError:
            st = None
        if st is not None and st.st_ino != self._ino:
            # Renamed away and recreated: our descriptor is read to its end, take the new file.
            self._open(self._file, at_end=False)
            return self._fh.read(READ_CHUNK)
        if st is not None and st.st_size < fh.tell():
            log.info("server log %s was truncated; reading it from the start", self._file)
            fh.seek(0)
            return fh.read(READ_CHUNK)
        if self.path.is_dir():
            newest = self._newest()
            if newest is not None and newest != self._file:
                log.debug("server log rotated to %s", newest)
                self._open(newest, at_end=False)
                return self._fh.read(READ_CHUNK)
        return b""

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class SqlLogFollower:
    """Reads the current server log over SQL (for servers whose files the proxy cannot mount)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._file: str | None = None
        self._offset = 0

    async def _current(self, conn) -> str | None:
        cur = await conn.execute("SELECT pg_current_logfile(%s)", (self.fmt,))
        row = await cur.fetchone()
        return row[0] if row else None

    async def _size(self, conn, path: str) -> int:
        cur = await conn.execute("SELECT size FROM pg_stat_file(%s, true)", (path,))
        row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def check(self, conn) -> None:
        """Start at the end of the current file; raises the database's error when not allowed."""
        path = await self._current(conn)
        if path is None:
            raise RuntimeError(f"the server writes no {self.fmt} log (log_destination, logging_collector)")
        self._file = path
        self._offset = await self._size(conn, path)
        # Prove we may read it, now rather than at the first poll.
        await conn.execute("SELECT pg_read_binary_file(%s, %s, 0, true)", (path, self._offset))

    async def _chunk(self, conn, path: str) -> bytes:
        cur = await conn.execute(
            "SELECT pg_read_binary_file(%s, %s, %s, true)", (path, self._offset, READ_CHUNK)
        )
        row = await cur.fetchone()
        data = bytes(row[0]) if row and row[0] is not None else b""
        self._offset += len(data)
        return data

    async def read(self, conn) -> bytes:
        if self._file is None:
            await self.check(conn)
        data = await self._chunk(conn, self._file)
        if data:
            return data
        current = await self._current(conn)
        if current is not None and current != self._file:
            log.debug("server log rotated to %s", current)
            self._file, self._offset = current, 0
            return await self._chunk(conn, current)
        if current == self._file and await self._size(conn, current) < self._offset:
            self._offset = 0
            return await self._chunk(conn, current)
        return b""
