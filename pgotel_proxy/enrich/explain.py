"""Estimated plans from EXPLAIN on the side connection, where no auto_explain log can be read.

The ``explain`` source owns which statements may be explained, the per-shape
cache of their plans, the rate limit, and the EXPLAIN itself (on the
enrichment thread's side connection). The span helper's
:class:`~.join.Joiner` asks for a shape's plan (:meth:`ExplainSource.request`)
and reads the cache (:meth:`ExplainSource.lookup`); the enrichment thread
drains the requests (:meth:`ExplainSource.run`).

What is explained, and how:

* only statements of SELECT, INSERT, UPDATE, DELETE or MERGE (a leading
  ``WITH``, ``VALUES`` or ``TABLE`` counts as a query; ``SELECT ... INTO``
  creates a table and is skipped), one statement per text, that completed
  and ran at least ``explain_min_duration``, in the side connection's
  database;
* ``EXPLAIN (FORMAT JSON)``, never ``ANALYZE``: nothing executes. It runs in
  a read-only transaction under ``SET LOCAL statement_timeout``
  (:data:`EXPLAIN_TIMEOUT_MS`) and is rolled back;
* a text with ``$n`` parameters is explained with ``GENERIC_PLAN`` on
  PostgreSQL 16 and later; before 16 only with the statement's captured
  parameters (``capture_parameters`` on: a prepared statement executed with
  them as literals), else it is skipped (counted);
* a text with the client's literals (simple protocol) is explained as sent;
  the plan keeps no expression (filters, conditions, outputs may quote
  those literals) unless ``capture_query_literals`` is on.

A plan is cached per shape (the text's fingerprint) for
``explain_cache_ttl`` seconds; a failed EXPLAIN is cached too, so a shape
that cannot be explained is not retried before then. At most
``explain_rate`` EXPLAINs start per second; requests past it are refused
(counted) and their statements leave without a plan.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict, deque
from typing import Any, NamedTuple

from ..stats import STATS

__all__ = ["ExplainSource", "CachedPlan", "explainable", "has_parameters", "plan_hash", "strip_expressions",
           "EXPLAIN_TIMEOUT_MS"]

log = logging.getLogger("pgotel_proxy.enrich")

#: statement_timeout of one EXPLAIN: planning a statement is quick, a slow one is not waited on.
EXPLAIN_TIMEOUT_MS = 500
#: Shapes whose plans are kept at most (least recently stored leave first).
MAX_CACHED_SHAPES = 5000
#: Requests waiting for the side connection at most.
MAX_REQUESTS = 100
_POLL = 0.02

_QUERY_WORDS = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "VALUES", "TABLE"))
_LEADING_NOISE = re.compile(r"^(?:\s+|--[^\n]*\n?|/\*.*?\*/|\()*", re.S)
_FIRST_WORD = re.compile(r"[A-Za-z]+")
_INTO = re.compile(r"\binto\b", re.I)
# A $n outside quotes and comments; what is inside them is removed first.
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/|\$((?:[A-Za-z_]\w*)?)\$.*?\$\1\$", re.S)
_PARAM = re.compile(r"\$\d+")

# Plan keys kept when literals are not captured: node kinds, relations, estimates; no expressions.
_PLAN_KEYS = frozenset((
    "Node Type", "Relation Name", "Alias", "Schema", "Index Name", "Function Name", "CTE Name", "Operation",
    "Join Type", "Parent Relationship", "Subplan Name", "Strategy", "Partial Mode", "Scan Direction",
    "Parallel Aware", "Async Capable", "Startup Cost", "Total Cost", "Plan Rows", "Plan Width",
    "Workers Planned", "Single Copy", "Command", "Plans",
))


class CachedPlan(NamedTuple):
    """A shape's plan (None when EXPLAIN failed), its hash and when it expires (monotonic ns)."""

    root: dict | None
    hash: str | None
    expires_ns: int


def explainable(text: str) -> bool:
    """Whether ``text`` is one query EXPLAIN may be run on (no DDL, no utility, no SELECT INTO)."""
    body = text.strip().rstrip(";").rstrip()
    if not body or ";" in _QUOTED.sub("", body):
        return False
    m = _FIRST_WORD.match(body, _LEADING_NOISE.match(body).end())
    if m is None:
        return False
    word = m.group(0).upper()
    if word not in _QUERY_WORDS:
        return False
    if word in ("SELECT", "WITH", "VALUES", "TABLE") and _INTO.search(_QUOTED.sub("", body)):
        # SELECT ... INTO creates a table (INSERT INTO inside a WITH is caught too: skipped, not wrong).
        return False
    return True


def has_parameters(text: str) -> bool:
    """Whether ``text`` holds ``$n`` parameters (outside quotes and comments)."""
    return "$" in text and _PARAM.search(_QUOTED.sub("", text)) is not None


def plan_hash(root: dict | None) -> str | None:
    """A hash of the plan tree's node kinds, relations and indexes: costs and row estimates do not change it."""
    if not root:
        return None
    digest = hashlib.blake2b(digest_size=8)

    def walk(node: dict) -> None:
        digest.update(b"(")
        for key in ("Node Type", "Join Type", "Strategy", "Relation Name", "Index Name", "Function Name", "CTE Name",
                    "Parent Relationship", "Operation"):
            value = node.get(key)
            if value is not None:
                digest.update(f"{key}={value};".encode())
        for child in node.get("Plans") or ():
            if isinstance(child, dict):
                walk(child)
        digest.update(b")")

    walk(root)
    return digest.hexdigest()


def strip_expressions(node: dict) -> dict:
    """A copy of a plan tree without its expressions (filters, conditions, keys, outputs), which may quote literals."""
    out = {k: v for k, v in node.items() if k in _PLAN_KEYS and k != "Plans"}
    kids = node.get("Plans")
    if kids:
        out["Plans"] = [strip_expressions(c) for c in kids if isinstance(c, dict)]
    return out


class ExplainSource:
    """The per-shape plan cache, the request queue and its rate limit, and the EXPLAIN loop."""

    def __init__(self, *, min_duration: float, rate: float, cache_ttl: float, capture_parameters: bool,
                 capture_literals: bool) -> None:
        self.min_duration_ns = int(min_duration * 1e9)
        self.rate = rate
        self.cache_ttl_ns = int(cache_ttl * 1e9)
        self.capture_parameters = capture_parameters
        self.capture_literals = capture_literals
        #: server major and database of the side connection, set when it is up
        self.major = 0
        self.database: str | None = None
        self._cache: OrderedDict[str, CachedPlan] = OrderedDict()
        self._requests: deque[tuple[str, str, tuple | None]] = deque()
        self._asked: set[str] = set()
        self._tokens = 1.0
        self._refilled = time.monotonic()

    # ------------------------------------------------------------ the span helper's thread

    def lookup(self, shape: str) -> CachedPlan | None:
        """The shape's cached plan while it has not expired."""
        entry = self._cache.get(shape)
        if entry is None or entry.expires_ns <= time.monotonic_ns():
            return None
        return entry

    def how(self, text: str, params: Any) -> tuple | None | bool:
        """The parameters to explain ``text`` with: () none needed or GENERIC_PLAN, a tuple of values, or False (skip)."""
        if not has_parameters(text):
            return ()
        if self.major >= 16:
            return ()
        if self.capture_parameters and params:
            return tuple(params)
        return False

    def request(self, shape: str, text: str, params: tuple) -> bool:
        """Ask for the shape's plan; False when the rate limit or the queue refused (counted)."""
        if shape in self._asked:
            return True
        now = time.monotonic()
        self._tokens = min(max(self.rate, 1.0), self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1.0 or len(self._requests) >= MAX_REQUESTS:
            STATS.explains_rate_limited += 1
            return False
        self._tokens -= 1.0
        self._asked.add(shape)
        self._requests.append((shape, text, params or None))
        return True

    # ------------------------------------------------------------ the enrichment thread

    async def run(self, conn) -> None:
        """Drain the requests on ``conn`` (autocommit) until cancelled."""
        while True:
            if not self._requests:
                await asyncio.sleep(_POLL)
                continue
            shape, text, params = self._requests.popleft()
            root = None
            try:
                root = await self._explain(conn, text, params)
                STATS.explains_run += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                STATS.explains_failed += 1
                log.debug("EXPLAIN failed: %s", exc)
            if root is not None and not self.capture_literals:
                root = strip_expressions(root)
            self._store(shape, CachedPlan(root, plan_hash(root), time.monotonic_ns() + self.cache_ttl_ns))
            self._asked.discard(shape)

    def _store(self, shape: str, entry: CachedPlan) -> None:
        cache = self._cache
        cache.pop(shape, None)
        cache[shape] = entry
        while len(cache) > MAX_CACHED_SHAPES:
            cache.popitem(last=False)

    async def _explain(self, conn, text: str, params: tuple | None) -> dict | None:
        from psycopg import sql

        body = text.strip().rstrip(";")
        await conn.execute("BEGIN READ ONLY")
        prepared = False
        try:
            await conn.execute(f"SET LOCAL statement_timeout = {EXPLAIN_TIMEOUT_MS}")
            if params:
                # Before PostgreSQL 16 a statement with $n is planned only with values: prepare it and
                # EXPLAIN EXECUTE with the captured values as literals (the statement does not run).
                await conn.execute(sql.SQL("PREPARE pgotel_explain AS ") + sql.SQL(body))
                prepared = True
                values = sql.SQL(", ").join(sql.Literal(v) for v in params)
                query = sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE pgotel_explain(") + values + sql.SQL(")")
            elif self.major >= 16:
                query = sql.SQL("EXPLAIN (FORMAT JSON, GENERIC_PLAN) ") + sql.SQL(body)
            else:
                query = sql.SQL("EXPLAIN (FORMAT JSON) ") + sql.SQL(body)
            cur = await conn.execute(query)
            row = await cur.fetchone()
        finally:
            await conn.execute("ROLLBACK")
            if prepared:
                # A prepared statement outlives the transaction.
                try:
                    await conn.execute("DEALLOCATE pgotel_explain")
                except Exception:
                    pass
        doc = row[0] if row else None
        if isinstance(doc, str):
            doc = json.loads(doc)
        if isinstance(doc, list) and doc:
            doc = doc[0]
        root = doc.get("Plan") if isinstance(doc, dict) else None
        return root if isinstance(root, dict) else None
