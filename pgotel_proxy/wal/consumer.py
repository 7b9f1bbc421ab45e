"""The CDC consumer: a pgoutput stream in, one CONSUMER span per otelwal-carrying transaction out.

:class:`CdcConsumer` connects with ``replication=database``, creates the slot if
asked (or reuses it), and streams ``START_REPLICATION SLOT s LOGICAL 0/0
(proto_version '1', publication_names '...', messages 'true')``. Each decoded
transaction is gathered (tables, operation counts, otelwal messages) until its
Commit; then, if it carried a valid otelwal message, a CONSUMER span is started
in the carried trace (parent = the carried span id) and ended. Transactions
without one are counted, not traced.

Position: the flush LSN reported to the server (standby status update) is the
end of the last transaction fully handled (its span given to the SDK), so the
slot never advances past a transaction that was not handled; between
transactions a keepalive's end position is confirmed too, so unpublished
traffic does not pin WAL. :meth:`CdcConsumer.stop` reports the final position
before it disconnects, so a restart neither repeats nor loses a transaction.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass, field

from opentelemetry.semconv._incubating.attributes.messaging_attributes import (
    MESSAGING_BATCH_MESSAGE_COUNT,
    MESSAGING_CONSUMER_GROUP_NAME,
    MESSAGING_DESTINATION_NAME,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
)
from opentelemetry.semconv.attributes.db_attributes import DB_COLLECTION_NAME, DB_SYSTEM_NAME
from opentelemetry.trace import SpanKind

from .. import __version__
from . import pgoutput as po
from .carrier import extract
from .replication import PgError, ReplicationConnection

__all__ = ["CdcConsumer", "TransactionInfo", "ATTR"]

log = logging.getLogger("pgotel_proxy.wal")

ATTR = {
    "commit_lsn": "db.postgresql.wal.commit_lsn",
    "end_lsn": "db.postgresql.wal.end_lsn",
    "message_lsn": "db.postgresql.wal.message_lsn",
    "xid": "db.postgresql.wal.xid",
    "commit_time": "db.postgresql.wal.commit_time",
    "tables": "db.postgresql.wal.tables",
    "inserts": "db.postgresql.wal.inserts",
    "updates": "db.postgresql.wal.updates",
    "deletes": "db.postgresql.wal.deletes",
    "truncates": "db.postgresql.wal.truncates",
    "lag_ms": "pgotel.cdc.lag_ms",
}


@dataclass(slots=True)
class TransactionInfo:
    """One decoded transaction, as handed to ``on_transaction``."""

    xid: int
    final_lsn: int
    commit_time_ns: int
    received_ns: int
    tables: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"insert": 0, "update": 0, "delete": 0, "truncate": 0})
    messages: list[po.LogicalMessage] = field(default_factory=list)
    context: object | None = None  # the extracted OpenTelemetry Context
    message_lsn: int | None = None
    commit_lsn: int = 0
    end_lsn: int = 0

    def _table(self, name: str) -> None:
        if name not in self.tables and len(self.tables) < 64:
            self.tables.append(name)


class CdcConsumer:
    """Consume a logical replication slot and continue the traces found in it."""

    def __init__(
        self,
        dsn: str | dict,
        slot: str,
        publications: list[str] | str,
        *,
        create_slot: bool = False,
        prefix: str = "otelwal",
        tracer_provider=None,
        status_interval: float = 1.0,
        on_transaction=None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publications = [publications] if isinstance(publications, str) else list(publications)
        self.create_slot = create_slot
        self.prefix = prefix
        self.status_interval = status_interval
        self.on_transaction = on_transaction
        self.connect_timeout = connect_timeout
        if tracer_provider is None:
            from opentelemetry import trace

            tracer_provider = trace.get_tracer_provider()
        self.tracer = tracer_provider.get_tracer("pgotel_proxy.wal", __version__)
        self.stats = {
            "transactions": 0,
            "transactions_traced": 0,
            "messages_ignored": 0,  # otelwal messages whose content was unusable
            "messages_other": 0,  # messages with another prefix, or outside transactions
            "decode_errors": 0,
        }
        self.received_lsn = 0
        self.flushed_lsn = 0
        self.started = asyncio.Event()
        self._conn: ReplicationConnection | None = None
        self._stopping = False
        self._relations: dict[int, po.Relation] = {}
        self._tx: TransactionInfo | None = None
        self._last_status = 0.0
        self._reported = 0

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        """Stream until :meth:`stop` or an error (PgError, ConnectionError)."""
        conn = await ReplicationConnection.connect(self.dsn, replication="database", timeout=self.connect_timeout)
        self._conn = conn
        try:
            if self.create_slot:
                try:
                    await conn.query(f"CREATE_REPLICATION_SLOT {_ident(self.slot)} LOGICAL pgoutput NOEXPORT_SNAPSHOT")
                    log.info("created replication slot %s", self.slot)
                except PgError as exc:
                    if exc.sqlstate != "42710":  # duplicate_object: reuse it
                        raise
            pubs = ",".join(_ident(p) for p in self.publications)
            command = (
                f"START_REPLICATION SLOT {_ident(self.slot)} LOGICAL 0/0 "
                f"(proto_version '1', publication_names {_literal(pubs)}, messages 'true')"
            )
            for attempt in range(50):
                try:
                    await conn.start_replication(command)
                    break
                except PgError as exc:
                    # The previous consumer's walsender may still hold the slot for a moment.
                    if exc.sqlstate != "55006" or attempt == 49 or self._stopping:
                        raise
                    await asyncio.sleep(0.1)
            log.info("streaming slot %s (publications %s)", self.slot, pubs)
            self.started.set()
            ticker = asyncio.ensure_future(self._ticker(conn))
            try:
                await self._stream(conn)
            finally:
                ticker.cancel()
        finally:
            self._conn = None
            await conn.close()

    async def stop(self) -> None:
        """Report the handled position and end the stream; ``run`` returns."""
        self._stopping = True
        conn = self._conn
        if conn is not None:
            try:
                self._send_status(conn, reply=False)
                await conn.drain()
            except (ConnectionError, OSError):
                pass
            await conn.close()

    async def _stream(self, conn: ReplicationConnection) -> None:
        while not self._stopping:
            try:
                payload = await conn.read_copy()
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                if self._stopping:
                    return
                raise
            if payload is None:
                return
            try:
                item = po.decode_copy_data(payload)
            except po.DecodeError as exc:
                self.stats["decode_errors"] += 1
                log.warning("slot %s: undecodable replication message: %s", self.slot, exc)
                continue
            if isinstance(item, po.XLogData):
                if item.start > self.received_lsn:
                    self.received_lsn = item.start
                try:
                    msg = po.decode_message(item.data)
                except po.DecodeError as exc:
                    self.stats["decode_errors"] += 1
                    log.warning("slot %s: undecodable pgoutput message at %s: %s", self.slot, po.lsn_to_str(item.start), exc)
                    continue
                self._handle(msg)
            elif isinstance(item, po.Keepalive):
                if item.end > self.received_lsn:
                    self.received_lsn = item.end
                if self._tx is None and item.end > self.flushed_lsn:
                    # Between transactions everything up to the server's send position was seen.
                    self.flushed_lsn = item.end
                if item.reply:
                    self._send_status(conn, reply=False)
            now = time.monotonic()
            if now - self._last_status >= self.status_interval:
                self._send_status(conn, reply=False)
            await conn.drain()

    async def _ticker(self, conn: ReplicationConnection) -> None:
        """Report progress while the stream is quiet, so the slot follows without waiting for traffic."""
        while not self._stopping:
            await asyncio.sleep(self.status_interval)
            if self.flushed_lsn != self._reported and time.monotonic() - self._last_status >= self.status_interval:
                try:
                    self._send_status(conn, reply=False)
                    await conn.drain()
                except (ConnectionError, OSError):
                    return

    def _send_status(self, conn: ReplicationConnection, reply: bool) -> None:
        self._last_status = time.monotonic()
        self._reported = self.flushed_lsn
        flushed = self.flushed_lsn
        conn.send_copy(po.standby_status_update(max(self.received_lsn, flushed), flushed, flushed, reply))

    # ----------------------------------------------------------- decoding

    def _handle(self, msg) -> None:
        tx = self._tx
        if isinstance(msg, po.Begin):
            self._tx = TransactionInfo(msg.xid, msg.final_lsn, po.pg_time_to_ns(msg.commit_time), time.time_ns())
        elif isinstance(msg, po.Relation):
            self._relations[msg.relid] = msg
        elif isinstance(msg, (po.Insert, po.Update, po.Delete)):
            if tx is not None:
                rel = self._relations.get(msg.relid)
                tx._table(rel.qualified if rel is not None else f"relid:{msg.relid}")
                kind = "insert" if isinstance(msg, po.Insert) else "update" if isinstance(msg, po.Update) else "delete"
                tx.counts[kind] += 1
        elif isinstance(msg, po.Truncate):
            if tx is not None:
                for relid in msg.relids:
                    rel = self._relations.get(relid)
                    tx._table(rel.qualified if rel is not None else f"relid:{relid}")
                tx.counts["truncate"] += 1
        elif isinstance(msg, po.LogicalMessage):
            if tx is None or not msg.transactional or msg.prefix != self.prefix:
                self.stats["messages_other"] += 1
                return
            if tx.context is None:
                ctx = extract(msg.content)
                if ctx is None:
                    self.stats["messages_ignored"] += 1
                    log.debug("slot %s: otelwal message at %s ignored (unusable content)", self.slot, po.lsn_to_str(msg.lsn))
                else:
                    tx.context = ctx
                    tx.message_lsn = msg.lsn
            if len(tx.messages) < 16:
                tx.messages.append(msg)
        elif isinstance(msg, po.Commit):
            if tx is None:
                return
            self._tx = None
            tx.commit_lsn = msg.commit_lsn
            tx.end_lsn = msg.end_lsn
            tx.commit_time_ns = po.pg_time_to_ns(msg.commit_time)
            self._finish(tx)
            if msg.end_lsn > self.flushed_lsn:
                self.flushed_lsn = msg.end_lsn

    def _finish(self, tx: TransactionInfo) -> None:
        self.stats["transactions"] += 1
        if tx.context is not None:
            self.stats["transactions_traced"] += 1
            try:
                self._span(tx)
            except Exception:  # noqa: BLE001 - a tracing problem must not stop the stream
                log.exception("slot %s: could not record the span of transaction %s", self.slot, tx.xid)
        if self.on_transaction is not None:
            try:
                self.on_transaction(tx)
            except Exception:  # noqa: BLE001
                log.exception("on_transaction callback failed")

    def _span(self, tx: TransactionInfo) -> None:
        now = time.time_ns()
        tables = " ".join(tx.tables) if tx.tables else "(no tables)"
        attrs = {
            MESSAGING_SYSTEM: "postgresql",
            MESSAGING_OPERATION_TYPE: "process",
            MESSAGING_OPERATION_NAME: "consume",
            MESSAGING_DESTINATION_NAME: ",".join(self.publications),
            MESSAGING_CONSUMER_GROUP_NAME: self.slot,
            MESSAGING_BATCH_MESSAGE_COUNT: sum(tx.counts.values()),
            DB_SYSTEM_NAME: "postgresql",
            ATTR["commit_lsn"]: po.lsn_to_str(tx.commit_lsn),
            ATTR["end_lsn"]: po.lsn_to_str(tx.end_lsn),
            ATTR["xid"]: tx.xid,
            ATTR["commit_time"]: datetime.datetime.fromtimestamp(tx.commit_time_ns / 1e9, datetime.timezone.utc).isoformat(),
            ATTR["tables"]: list(tx.tables),
            ATTR["inserts"]: tx.counts["insert"],
            ATTR["updates"]: tx.counts["update"],
            ATTR["deletes"]: tx.counts["delete"],
            ATTR["truncates"]: tx.counts["truncate"],
            ATTR["lag_ms"]: max(0.0, (now - tx.commit_time_ns) / 1e6),
        }
        if tx.message_lsn is not None:
            attrs[ATTR["message_lsn"]] = po.lsn_to_str(tx.message_lsn)
        if len(tx.tables) == 1:
            attrs[DB_COLLECTION_NAME] = tx.tables[0]
        span = self.tracer.start_span(
            f"otelwal consume {tables}", context=tx.context, kind=SpanKind.CONSUMER,
            attributes=attrs, start_time=min(tx.received_ns, now),
        )
        span.end(end_time=now)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
