"""Keyed ``send_event``, ``consume_event`` and ``save_snapshot`` on SQL: the records of
``sayiir_sent_events``, ``sayiir_consumed_events`` and ``sayiir_snapshot_writes``
(docs/contract.md#send_event, #consume_event, #save_snapshot).

The caller holds the workflow row's lock (``SELECT ... FOR UPDATE``) before it reads a record,
so callers of one instance with the same key run one after another, and the read, a new
statement at READ COMMITTED, sees what the previous one committed: a repeat finds the record.
The primary key ``(instance_id, key)`` guards the insert as well: a duplicate, which the lock
makes impossible between our own callers, raises ``IntegrityError``, and the caller runs its
transaction again, finding the record then.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, bindparam, insert, select

from ..idempotency import payload_digest, snapshot_digest
from ..model import WorkflowSnapshot
from .schema import consumed_events, sent_events, snapshot_writes


class KeyedStatements:
    """The statements of the keyed calls, built once per backend."""

    def __init__(self) -> None:
        self.read_sent = select(sent_events.c.name, sent_events.c.payload_sha256).where(
            sent_events.c.instance_id == bindparam("p_instance_id"),
            sent_events.c.idempotency_key == bindparam("p_key"),
        )
        self.record_sent = insert(sent_events)
        self.read_consumed = select(consumed_events.c.name, consumed_events.c.payload).where(
            consumed_events.c.instance_id == bindparam("p_instance_id"),
            consumed_events.c.consumer_key == bindparam("p_key"),
        )
        self.record_consumed = insert(consumed_events)
        self.read_write = select(
            snapshot_writes.c.version, snapshot_writes.c.snapshot_sha256
        ).where(
            snapshot_writes.c.instance_id == bindparam("p_instance_id"),
            snapshot_writes.c.write_id == bindparam("p_key"),
        )
        self.record_write = insert(snapshot_writes)


def recorded_send(
    conn: Connection, sql: KeyedStatements, instance_id: str, key: str
) -> tuple[str, str] | None:
    """The event name and payload digest recorded under ``key``, or ``None``."""
    row = conn.execute(sql.read_sent, {"p_instance_id": instance_id, "p_key": key}).first()
    return None if row is None else (row.name, row.payload_sha256)


def record_send(
    conn: Connection,
    sql: KeyedStatements,
    instance_id: str,
    key: str,
    name: str,
    payload: bytes,
    now: datetime,
) -> None:
    """Record a keyed send. Raises ``IntegrityError`` if the key is recorded already."""
    conn.execute(
        sql.record_sent,
        {
            "instance_id": instance_id,
            "idempotency_key": key,
            "name": name,
            "payload_sha256": payload_digest(payload),
            "sent_at": now,
        },
    )


def recorded_consumption(
    conn: Connection, sql: KeyedStatements, instance_id: str, key: str
) -> tuple[str, bytes] | None:
    """The event name and payload consumed under ``key``, or ``None``."""
    row = conn.execute(sql.read_consumed, {"p_instance_id": instance_id, "p_key": key}).first()
    return None if row is None else (row.name, bytes(row.payload))


def record_consumption(
    conn: Connection,
    sql: KeyedStatements,
    instance_id: str,
    key: str,
    name: str,
    payload: bytes,
    now: datetime,
) -> None:
    """Record a keyed consumption. Raises ``IntegrityError`` if the key is recorded already."""
    conn.execute(
        sql.record_consumed,
        {
            "instance_id": instance_id,
            "consumer_key": key,
            "name": name,
            "payload": payload,
            "consumed_at": now,
        },
    )


def recorded_write(
    conn: Connection, sql: KeyedStatements, instance_id: str, write_id: str
) -> tuple[int, str] | None:
    """The version and snapshot digest recorded under ``write_id``, or ``None``."""
    row = conn.execute(sql.read_write, {"p_instance_id": instance_id, "p_key": write_id}).first()
    return None if row is None else (row.version, row.snapshot_sha256)


def record_write(
    conn: Connection,
    sql: KeyedStatements,
    snapshot: WorkflowSnapshot,
    write_id: str,
    version: int,
    now: datetime,
) -> None:
    """Record a keyed save. Raises ``IntegrityError`` if the id is recorded already."""
    conn.execute(
        sql.record_write,
        {
            "instance_id": snapshot.instance_id,
            "write_id": write_id,
            "version": version,
            "snapshot_sha256": snapshot_digest(snapshot),
            "written_at": now,
        },
    )
