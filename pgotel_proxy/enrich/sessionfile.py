"""The file the workers' span processes share: which backend pids they ask about, and their siblings' answers.

Only for ``--workers N`` (:mod:`pgotel_proxy.proxy.workers` makes the file
before forking and names it to each worker in :data:`SHARED_ENV`); lock waits
(:mod:`.locks`) use it to tell whether a blocking backend is a session of a
sibling worker, and which statement span it ran. Standard library only: the
supervisor and the relay processes import it.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import NamedTuple

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
    """A file shared by the workers' span processes: backend pids asked about, and the answers.

    A span process that meets a blocker it does not know asks its siblings
    about the pid (:meth:`ask`, which returns a ticket). On its next tick
    each sibling publishes its latest statement spans when the session is
    its own (:meth:`publish`) and then records that it has seen the asks so
    far (:meth:`mark_seen`): once every sibling has seen the ticket
    (:meth:`answered`), a pid that nobody published (:meth:`lookup`) is no
    session of the proxy. Statements are published only when asked for: a
    span process pays nothing per statement for its siblings.

    Layout: one region per worker, written only by that worker's span process:
    the asks (a counter and a ring of :data:`ASKS` pids), the asks it has
    seen of each worker (one counter each), then :data:`SLOTS` answer slots.
    A slot is a sequence number (odd while it is written), the backend pid
    (0: free), the number of entries, then up to :data:`HISTORY`
    :class:`Entry` (ids, flags, start, end, summary cut to
    :data:`SUMMARY_BYTES`). A few, not one: by the time a lock wait is over,
    the blocker has usually run its COMMIT after the statement that held the
    lock. A reader retries a slot whose sequence number moved.
    """

    ASKS = 64
    SLOTS = 256
    HISTORY = 4
    SUMMARY_BYTES = 96
    _ASKS = struct.Struct(f"=I{ASKS}i")
    _COUNT = struct.Struct("=I")
    _HEAD = struct.Struct("=IiI")
    _ENTRY = struct.Struct(f"=QQQBqqH{SUMMARY_BYTES}s")
    SLOT_SIZE = _HEAD.size + HISTORY * _ENTRY.size

    def __init__(self, mm: mmap.mmap, index: int, workers: int) -> None:
        self.mm = mm
        self.index = index
        self.workers = workers
        self.region = self.region_size(workers)
        self._slots: dict[int, int] = {}  # own answered backend pid → slot number, oldest first

    @classmethod
    def region_size(cls, workers: int) -> int:
        return cls._ASKS.size + workers * cls._COUNT.size + cls.SLOTS * cls.SLOT_SIZE

    @classmethod
    def size(cls, workers: int) -> int:
        return workers * cls.region_size(workers)

    @classmethod
    def create(cls, path: str, workers: int) -> None:
        """Make the zeroed file for ``workers`` (the parent, before forking)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, cls.size(workers))
        finally:
            os.close(fd)

    def clear_own(self) -> None:
        """Empty this worker's answers and asks (an earlier span process of the worker wrote them)."""
        start = self.index * self.region
        count = self._COUNT.unpack_from(self.mm, start)[0]  # kept: the siblings' seen counters refer to it
        self.mm[start:start + self.region] = bytes(self.region)
        self._COUNT.pack_into(self.mm, start, count)

    def _seen_at(self, index: int, of: int) -> int:
        return index * self.region + self._ASKS.size + of * self._COUNT.size

    def _slot_at(self, index: int, slot: int) -> int:
        return index * self.region + self._ASKS.size + self.workers * self._COUNT.size + slot * self.SLOT_SIZE

    # -- asking

    def ask(self, pid: int) -> int:
        """Ask the siblings about backend ``pid``; the ticket :meth:`answered` takes."""
        at = self.index * self.region
        count = self._COUNT.unpack_from(self.mm, at)[0]
        struct.pack_into("=i", self.mm, at + 4 + (count % self.ASKS) * 4, pid)
        self._COUNT.pack_into(self.mm, at, count + 1)
        return count + 1

    def answered(self, ticket: int) -> bool:
        """Whether every sibling has seen the asks up to ``ticket`` (and published what it had)."""
        return all(self._COUNT.unpack_from(self.mm, self._seen_at(k, self.index))[0] >= ticket
                   for k in range(self.workers) if k != self.index)

    def asks(self) -> list[tuple[int, int, set[int]]]:
        """(worker, its ask count, the pids in its ring) of each sibling."""
        out = []
        for k in range(self.workers):
            if k != self.index:
                count, *pids = self._ASKS.unpack_from(self.mm, k * self.region)
                out.append((k, count, {p for p in pids if p}))
        return out

    def mark_seen(self, worker: int, count: int) -> None:
        """The asks of ``worker`` up to ``count`` are answered."""
        self._COUNT.pack_into(self.mm, self._seen_at(self.index, worker), count)

    # -- answering

    def publish(self, pid: int, entries: list[Entry]) -> None:
        """Answer for backend ``pid``: its latest statement spans (at most :data:`HISTORY`)."""
        slot = self._slots.get(pid)
        if slot is None:
            if len(self._slots) >= self.SLOTS:
                slot = self._slots.pop(next(iter(self._slots)))  # the oldest answer goes
            else:
                slot = len(self._slots)
            self._slots[pid] = slot
        at = self._slot_at(self.index, slot)
        mm, head = self.mm, self._HEAD
        entries = entries[-self.HISTORY:]
        seq = head.unpack_from(mm, at)[0] | 1
        head.pack_into(mm, at, seq, pid, 0)  # odd: being written
        for i, e in enumerate(entries):
            summary = e.summary.encode("utf-8", "replace")[: self.SUMMARY_BYTES]
            self._ENTRY.pack_into(mm, at + head.size + i * self._ENTRY.size, e.trace_id >> 64,
                                  e.trace_id & (2**64 - 1), e.span_id, e.flags & 0xFF, e.start_ns, e.end_ns,
                                  len(summary), summary)
        head.pack_into(mm, at, seq + 1, pid, len(entries))

    def lookup(self, pid: int) -> list[Entry] | None:
        """The statement spans a sibling published for backend ``pid``; None when none did."""
        mm, head, entry = self.mm, self._HEAD, self._ENTRY
        for index in range(self.workers):
            if index == self.index:
                continue
            for slot in range(self.SLOTS):
                at = self._slot_at(index, slot)
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
                return None
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
