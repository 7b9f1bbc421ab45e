"""PostgreSQL server log entries: incremental parsers for jsonlog, csvlog and stderr with a log_line_prefix.

Each parser is fed raw bytes as they are read from the log (a file or
``pg_read_binary_file``) and returns whole :class:`LogEntry` records. A
partial record at the end of a chunk waits for the next chunk; the buffer is
bounded (:data:`MAX_RECORD_BYTES`) so a runaway line cannot eat memory: it is
skipped and counted in ``parser.skipped``.

Only what the join needs is kept: timestamp, pid, query id (PG 14+ with
``compute_query_id``) and the message text.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

__all__ = ["LogEntry", "make_parser", "parse_timestamp", "JsonlogParser", "CsvlogParser", "StderrParser", "MAX_RECORD_BYTES"]

log = logging.getLogger("pgotel_proxy.enrich")

#: Largest single log record kept; a plan of a few thousand nodes fits easily.
MAX_RECORD_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class LogEntry:
    """One server log record."""

    time_ns: int
    pid: int | None
    message: str
    query_id: int | None = None
    severity: str = "LOG"


_TS_RE = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?\s*(?:([A-Za-z]{1,6})|([+-]\d\d)(?::?(\d\d))?)?$"
)
_UTC_NAMES = {"UTC", "GMT", "Z", "UCT", ""}
_warned_zones: set[str] = set()


def parse_timestamp(text: str) -> int | None:
    """Nanoseconds since the epoch of a log timestamp such as ``2024-05-01 10:00:00.123 UTC``.

    Zone abbreviations other than UTC/GMT are ambiguous and are read as UTC,
    with one warning: run the server with ``log_timezone = 'UTC'`` (or a
    numeric offset) for an exact time join.
    """
    m = _TS_RE.match(text.strip())
    if m is None:
        return None
    y, mo, d, h, mi, s, frac, zone, off_h, off_m = m.groups()
    tz = timezone.utc
    if off_h is not None:
        minutes = int(off_h) * 60 + (int(off_m) if off_m else 0) * (1 if off_h[0] == "+" else -1)
        tz = timezone(timedelta(minutes=minutes))
    elif zone is not None and zone.upper() not in _UTC_NAMES and zone not in _warned_zones:
        _warned_zones.add(zone)
        log.warning("server log time zone %s is read as UTC; set log_timezone = 'UTC' for an exact join", zone)
    dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=tz)
    ns = int(dt.timestamp()) * 1_000_000_000
    if frac:
        ns += int(frac.ljust(9, "0"))
    return ns


def _int(v) -> int | None:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


class _LineBuffer:
    """Splits byte chunks into complete lines; keeps the unfinished tail (bounded)."""

    __slots__ = ("_tail", "skipped", "_dropping")

    def __init__(self) -> None:
        self._tail = b""
        self.skipped = 0
        self._dropping = False

    def lines(self, chunk: bytes) -> list[bytes]:
        data = self._tail + chunk if self._tail else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            self._tail = data
            if len(data) > MAX_RECORD_BYTES:
                self._tail = b""
                self._dropping = True
                self.skipped += 1
            return []
        self._tail = data[cut + 1 :]
        out = data[:cut].split(b"\n")
        if self._dropping:
            # The rest of an oversized line we already gave up on.
            out = out[1:]
            self._dropping = False
        return out


class JsonlogParser:
    """``log_destination = jsonlog`` (PG 15+): one JSON object per line."""

    def __init__(self) -> None:
        self._buf = _LineBuffer()

    @property
    def skipped(self) -> int:
        return self._buf.skipped

    def feed(self, chunk: bytes) -> list[LogEntry]:
        out = []
        for line in self._buf.lines(chunk):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                ts = parse_timestamp(d.get("timestamp", ""))
            except (ValueError, AttributeError):
                self._buf.skipped += 1
                continue
            if ts is None:
                self._buf.skipped += 1
                continue
            out.append(LogEntry(ts, _int(d.get("pid")), d.get("message") or "", _int(d.get("query_id")), d.get("error_severity") or "LOG"))
        return out


# csvlog columns (stable positions since PG 9.0; backend_type, leader_pid and query_id were appended later).
_CSV_TIME, _CSV_PID, _CSV_SEVERITY, _CSV_MESSAGE, _CSV_QUERY_ID = 0, 3, 11, 13, 25


class CsvlogParser:
    """``log_destination = csvlog``: RFC 4180 records whose quoted fields may hold newlines."""

    def __init__(self) -> None:
        self._buf = _LineBuffer()
        self._record: list[bytes] = []
        self._quotes = 0
        self._size = 0

    @property
    def skipped(self) -> int:
        return self._buf.skipped

    def feed(self, chunk: bytes) -> list[LogEntry]:
        out = []
        for line in self._buf.lines(chunk):
            self._record.append(line)
            self._quotes += line.count(b'"')
            self._size += len(line)
            if self._size > MAX_RECORD_BYTES:
                self._record, self._quotes, self._size = [], 0, 0
                self._buf.skipped += 1
                continue
            if self._quotes % 2:
                continue  # inside a quoted field: the record goes on
            raw = b"\n".join(self._record).decode("utf-8", "replace")
            self._record, self._quotes, self._size = [], 0, 0
            try:
                row = next(csv.reader(io.StringIO(raw)))
            except (csv.Error, StopIteration):
                self._buf.skipped += 1
                continue
            if len(row) <= _CSV_MESSAGE:
                self._buf.skipped += 1
                continue
            ts = parse_timestamp(row[_CSV_TIME])
            if ts is None:
                self._buf.skipped += 1
                continue
            qid = _int(row[_CSV_QUERY_ID]) if len(row) > _CSV_QUERY_ID else None
            out.append(LogEntry(ts, _int(row[_CSV_PID]), row[_CSV_MESSAGE], qid, row[_CSV_SEVERITY]))
        return out


# log_line_prefix escapes → regex; named groups are what we keep.
_PREFIX_ESCAPES = {
    "m": r"(?P<m>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+(?: [A-Za-z]+| [+-]\d\d(?::?\d\d)?)?)",
    "t": r"(?P<t>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?: [A-Za-z]+| [+-]\d\d(?::?\d\d)?)?)",
    "n": r"(?P<n>\d+(?:\.\d+)?)",
    "p": r"(?P<p>\d+)",
    "Q": r"(?P<Q>-?\d+)",
    "l": r"\d+",
    "s": r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?: [A-Za-z]+| [+-]\d\d(?::?\d\d)?)?",
    "c": r"[0-9a-f]+\.[0-9a-f]+",
    "v": r"(?:\d+/\d+)?",
    "x": r"\d*",
    "e": r"[0-9A-Z]{5}",
    "i": r".*?",
    "u": r".*?",
    "d": r".*?",
    "a": r".*?",
    "h": r".*?",
    "r": r".*?",
    "b": r".*?",
    "P": r"\d*",
    "%": r"%",
}
_SEVERITIES = r"(?P<sev>DEBUG\d?|LOG|INFO|NOTICE|WARNING|ERROR|FATAL|PANIC|STATEMENT|DETAIL|HINT|CONTEXT|QUERY|LOCATION):  "


def prefix_regex(prefix: str) -> re.Pattern:
    """A regex matching one stderr log line head: ``log_line_prefix`` then ``SEVERITY:  ``.

    ``%q`` makes the rest of the prefix optional (it is empty for processes
    without a session). Padding such as ``%-10u`` is accepted.
    """
    parts: list[str] = []
    optional_from: int | None = None
    i = 0
    while i < len(prefix):
        ch = prefix[i]
        if ch != "%" or i + 1 >= len(prefix):
            parts.append(re.escape(ch))
            i += 1
            continue
        start = j = i + 1
        while j < len(prefix) and (prefix[j].isdigit() or prefix[j] == "-"):
            j += 1
        padded = j > start
        esc = prefix[j] if j < len(prefix) else "%"
        i = j + 1
        if esc == "q":
            optional_from = len(parts)
            continue
        pat = _PREFIX_ESCAPES.get(esc, r".*?")
        if padded:
            pat = rf"\s*{pat}\s*"
        parts.append(pat)
    if optional_from is not None:
        head = "".join(parts[:optional_from])
        rest = "".join(parts[optional_from:])
        body = f"{head}(?:{rest})?"
    else:
        body = "".join(parts)
    return re.compile(rf"^{body}{_SEVERITIES}")


class StderrParser:
    """``log_destination = stderr`` (logging_collector on): prefix, severity, message; continuation lines start with a tab."""

    def __init__(self, line_prefix: str) -> None:
        self._buf = _LineBuffer()
        self._re = prefix_regex(line_prefix)
        self._cur: LogEntry | None = None
        self._parts: list[str] = []
        self._size = 0

    @property
    def skipped(self) -> int:
        return self._buf.skipped

    def _finish(self, out: list) -> None:
        if self._cur is not None:
            self._cur.message = "\n".join(self._parts)
            out.append(self._cur)
        self._cur, self._parts, self._size = None, [], 0

    def feed(self, chunk: bytes) -> list[LogEntry]:
        out: list[LogEntry] = []
        for raw in self._buf.lines(chunk):
            line = raw.decode("utf-8", "replace")
            if line.startswith("\t"):
                if self._cur is not None:
                    self._size += len(line)
                    if self._size > MAX_RECORD_BYTES:
                        self._cur = None
                        self._buf.skipped += 1
                    else:
                        self._parts.append(line[1:])
                continue
            self._finish(out)
            m = self._re.match(line)
            if m is None:
                self._buf.skipped += 1
                continue
            g = m.groupdict()
            ts = None
            if g.get("n"):
                ts = int(float(g["n"]) * 1e9)
            elif g.get("m"):
                ts = parse_timestamp(g["m"])
            elif g.get("t"):
                ts = parse_timestamp(g["t"])
            if ts is None:
                self._buf.skipped += 1
                continue
            self._cur = LogEntry(ts, _int(g.get("p")), "", _int(g.get("Q")), g["sev"])
            self._parts = [line[m.end() :]]
            self._size = len(line)
        return out

    def flush(self) -> list[LogEntry]:
        """The record held back waiting for continuation lines (call when the file is idle)."""
        out: list[LogEntry] = []
        self._finish(out)
        return out


def make_parser(fmt: str, line_prefix: str = "%m [%p] "):
    """A fresh parser for ``server_log_format``."""
    if fmt == "jsonlog":
        return JsonlogParser()
    if fmt == "csvlog":
        return CsvlogParser()
    if fmt == "stderr":
        return StderrParser(line_prefix)
    raise ValueError(f"unknown server log format {fmt!r}")
