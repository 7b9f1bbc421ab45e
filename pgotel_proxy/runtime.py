"""Process-wide runtime settings of a proxy process (the relay, a worker, the span process)."""

from __future__ import annotations

import gc

__all__ = ["settle_gc"]

#: Young-generation threshold of the cyclic collector once start-up is over.
GC_THRESHOLD = 20_000


def settle_gc() -> None:
    """Keep Python's cyclic garbage collector off the relay path once start-up is over.

    Called by the relay process (and each worker) when it serves, and by the
    span process once its tracer is set up.

    After start-up the process holds some 60,000 long-lived objects (modules,
    the OpenTelemetry SDK, protocol and SQL caches). A full collection walks
    them all, about 20 ms with every session stalled, and runs whenever enough
    objects survived into the oldest generation, which statement records held
    for a span batch do. ``gc.freeze()`` moves what exists now out of the
    collector's sight, so a full collection only walks what was made since.
    The young-generation threshold goes from 700 to ``GC_THRESHOLD``
    allocations: a young collection costs about the same whatever the
    threshold (it walks the live young objects, which the records in flight
    bound), so fewer of them stall fewer requests. The proxy's own data
    structures hold no reference cycles; reference counting frees them.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, older, oldest)
