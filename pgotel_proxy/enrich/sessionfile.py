"""The file the workers' span processes share: each one's sessions by backend pid and their latest statement spans.

Only for ``--workers N`` (:mod:`pgotel_proxy.proxy.workers` makes the file
before forking and names it to each worker in :data:`SHARED_ENV`); lock waits
(:mod:`.locks`) read it to tell whether a blocking backend is a session of a
sibling worker, and which statement span it ran. Standard library only: the
supervisor and the relay processes import it.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Callable, NamedTuple

__all__ = ["Entry", "SharedSessions", "SHARED_ENV", "open_shared"]

#: The environment variable through which a worker's span process finds the file: ``PATH:INDEX:WORKERS``.
SHARED_ENV = "PGOTEL_PROXY_SHARED_SESSIONS"


class Entry(NamedTuple):
    """A statement span of a proxy session: what a link to it and the blocker's attributes need."""

    trace_id: int
    span_id: int
    flags: int
    start_ns: int
    end_ns: int
    summary: str


class SharedSessions:
    """A file shared by the workers' span processes: per worker, the latest statement spans of each backend.

    Layout: one region per worker of :data:`SLOTS` slots; a slot is a sequence
    number (odd while it is written), the backend pid (0: free), the number
    of entries written, then a ring of its :data:`HISTORY` latest
    :class:`Entry` (ids, flags, start, end, summary cut to
    :data:`SUMMARY_BYTES`). A few, not one: by the time a lock wait is over,
    the blocker has usually run its COMMIT after the statement that held the
    lock. Each span process writes only its own region and reads the others;
    a reader retries a slot whose sequence number moved.
    """

    SLOTS = 1024
    HISTORY = 4
    SUMMARY_BYTES = 96
    _HEAD = struct.Struct("=IiI")
    _ENTRY = struct.Struct(f"=QQQBqqH{SUMMARY_BYTES}s")
    SLOT_SIZE = _HEAD.size + HISTORY * _ENTRY.size

    def __init__(self, mm: mmap.mmap, index: int, workers: int) -> None:
        self.mm = mm
        self.index = index
        self.workers = workers
        self._region = self.SLOTS * self.SLOT_SIZE
        self._slots: dict[int, int] = {}  # own backend pid → slot number
        self.live: Callable[[], list[int]] = list  # own open backends: slots of others are reused

    @classmethod
    def size(cls, workers: int) -> int:
        return workers * cls.SLOTS * cls.SLOT_SIZE

    @classmethod
    def create(cls, path: str, workers: int) -> None:
        """Make the zeroed file for ``workers`` (the parent, before forking)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, cls.size(workers))
        finally:
            os.close(fd)

    def _slot_for(self, pid: int) -> int | None:
        slot = self._slots.get(pid)
        if slot is not None:
            return slot
        if len(self._slots) >= self.SLOTS:
            live = set(self.live())
            for old in [p for p in self._slots if p not in live]:
                self._write_free(self._slots.pop(old))
            if len(self._slots) >= self.SLOTS:
                return None
        used = set(self._slots.values())
        slot = next(i for i in range(self.SLOTS) if i not in used)
        self._slots[pid] = slot
        return slot

    def clear_own(self) -> None:
        """Free this worker's region: what an earlier span process of the worker published is gone."""
        start = self.index * self._region
        self.mm[start:start + self._region] = bytes(self._region)

    def _offset(self, index: int, slot: int) -> int:
        return index * self._region + slot * self.SLOT_SIZE

    def _write_free(self, slot: int) -> None:
        at = self._offset(self.index, slot)
        seq, _, _ = self._HEAD.unpack_from(self.mm, at)
        self._HEAD.pack_into(self.mm, at, seq + 2, 0, 0)
        self.mm[at + self._HEAD.size:at + self.SLOT_SIZE] = bytes(self.SLOT_SIZE - self._HEAD.size)

    def publish(self, pid: int, e: Entry) -> None:
        slot = self._slot_for(pid)
        if slot is None:
            return
        at = self._offset(self.index, slot)
        mm, head = self.mm, self._HEAD
        seq, _, count = head.unpack_from(mm, at)
        seq |= 1
        head.pack_into(mm, at, seq, pid, count)  # odd: being written
        summary = e.summary.encode("utf-8", "replace")[: self.SUMMARY_BYTES]
        self._ENTRY.pack_into(mm, at + head.size + (count % self.HISTORY) * self._ENTRY.size,
                              e.trace_id >> 64, e.trace_id & (2**64 - 1), e.span_id, e.flags & 0xFF,
                              e.start_ns, e.end_ns, len(summary), summary)
        head.pack_into(mm, at, seq + 1, pid, count + 1)

    def lookup(self, pid: int) -> list[Entry] | None:
        """The latest statement spans a sibling worker published for backend ``pid``; None when none has it."""
        mm, head, entry = self.mm, self._HEAD, self._ENTRY
        for index in range(self.workers):
            if index == self.index:
                continue
            for slot in range(self.SLOTS):
                at = self._offset(index, slot)
                if head.unpack_from(mm, at)[1] != pid:
                    continue
                for _ in range(5):
                    seq, _, count = head.unpack_from(mm, at)
                    found = []
                    for i in range(min(count, self.HISTORY)):
                        hi, lo, span_id, flags, start, end, n, summary = entry.unpack_from(mm, at + head.size + i * entry.size)
                        found.append(Entry((hi << 64) | lo, span_id, flags, start, end,
                                           summary[:n].decode("utf-8", "replace")))
                    again, still, _ = head.unpack_from(mm, at)
                    if again == seq and not seq & 1:
                        return found if still == pid else None
                return []
        return None

    def close(self) -> None:
        self.mm.close()


def open_shared(value: str | None) -> SharedSessions | None:
    """The shared session file a worker's span process was told of (``SHARED_ENV``), or None."""
    if not value:
        return None
    try:
        path, index, workers = value.rsplit(":", 2)
        fd = os.open(path, os.O_RDWR)
    except (ValueError, OSError):
        return None
    try:
        mm = mmap.mmap(fd, SharedSessions.size(int(workers)))
    except (ValueError, OSError):
        return None
    finally:
        os.close(fd)
    shared = SharedSessions(mm, int(index), int(workers))
    shared.clear_own()
    return shared
