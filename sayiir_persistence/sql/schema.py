"""The tables, on one ``MetaData`` shared by ``SqlBackend`` and the Alembic migrations.

Layout (one row per ...):

- ``sayiir_workflows``: workflow instance: status, position (JSON), payloads, version.
- ``sayiir_task_results``: completed task (its output). Kept apart from the workflow row
  so parallel branches append results without rewriting one big value.
- ``sayiir_ready_tasks``: task that is runnable by position in an in-progress workflow
  and not completed. Maintained by every write that changes status, position or results,
  so finding work is one indexed scan instead of decoding every snapshot; its claim's expiry
  is copied there by the claim (``claimed_until``).
- ``sayiir_task_claims``: claim on a task. Released claims stay (``released``) so the
  fencing token of the next claim keeps increasing, and the token counts the task's attempts.
  A claim held by the worker id ``''`` is a scheduled retry's wait.
- ``sayiir_signals``: pending cancel or pause request.
- ``sayiir_events``: buffered event, FIFO by ``id``.
- ``sayiir_workflow_tags``: tag of a workflow, for the worker tag filter.
- ``sayiir_sent_events``: event sent with an ``idempotency_key`` (its name and payload
  digest), so that a repeat is recognised; the key is the primary key with the instance.
- ``sayiir_consumed_events``: event consumed with a ``consumer_key`` (its name and payload),
  so that a repeat returns it again.
- ``sayiir_snapshot_writes``: save made with a ``write_id`` (the version it got and the
  snapshot's digest), so that a repeat returns that version.
- ``sayiir_token_floors``: deleted workflow instance that had claims: the greatest fencing
  token its claims reached. Written when its claim rows are deleted (``delete_snapshot``,
  ``prune_workflows``), read by a task's first claim (token = floor + 1), never deleted: kept
  when the id is created again, so tokens never repeat for an (instance id, task id).

No foreign keys: every write path locks the workflow row first and deletes children
explicitly, and foreign keys would add MySQL shared locks on the parent row to every
child insert (a source of deadlocks).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
)

from .types import Identifier, LongText, Payload, UtcDateTime

# Deterministic constraint names, so migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# Table options applied on MySQL/MariaDB (ignored elsewhere).
_MYSQL: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}

workflows = Table(
    "sayiir_workflows",
    metadata,
    Column("instance_id", Identifier(), primary_key=True),
    Column("definition_hash", Identifier(), nullable=False),
    Column("status", String(16), nullable=False),
    Column("position", LongText(), nullable=False),
    Column("last_completed_task_id", Identifier()),
    Column("input_task_id", Identifier()),
    Column("initial_input", Payload()),
    Column("output", Payload()),
    Column("error", LongText()),
    Column("cancel_request", LongText()),
    Column("pause_request", LongText()),
    Column("priority", SmallInteger(), nullable=False),
    Column("tags", LongText(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("version", Integer(), nullable=False),
    # The workflow-level timeout (see the migration a8c3f5e0d214): the overdue sweep's index.
    Column("deadline", UtcDateTime()),
    # The W3C traceparent its task spans continue (see the migration a6d4e8f2c3b5): written
    # when the row is created, never updated.
    Column("trace_context", String(55)),
    Index(None, "status", "instance_id"),
    Index(None, "deadline"),
    **_MYSQL,
)

task_results = Table(
    "sayiir_task_results",
    metadata,
    Column("instance_id", Identifier(), primary_key=True),
    Column("task_id", Identifier(), primary_key=True),
    Column("output", Payload(), nullable=False),
    Column("completed_at", UtcDateTime(), nullable=False),
    # store_stats' completions of the last minute and hour (see the migration f3a9c6e2b1d7).
    Index(None, "completed_at"),
    **_MYSQL,
)

ready_tasks = Table(
    "sayiir_ready_tasks",
    metadata,
    Column("instance_id", Identifier(), primary_key=True),
    Column("task_id", Identifier(), primary_key=True),
    Column("priority", SmallInteger(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    # Set for a delay's next task: runnable once the store's clock reaches it.
    Column("wake_at", UtcDateTime()),
    Column("has_tags", Boolean(create_constraint=False), nullable=False),
    # When the task's claim expires (NULL: not claimed), written by the claim itself so that
    # a claimer locking the row rechecks it (see the migration c4e9a1f07b2d). A hint: the
    # claim row decides; released claims clear it, renewals need not update it.
    Column("claimed_until", UtcDateTime()),
    # The order of find/claim_available_tasks within one priority: served by this index.
    Index(None, "priority", "updated_at", "instance_id", "task_id"),
    **_MYSQL,
)

task_claims = Table(
    "sayiir_task_claims",
    metadata,
    Column("instance_id", Identifier(), primary_key=True),
    Column("task_id", Identifier(), primary_key=True),
    Column("worker_id", Identifier(), nullable=False),
    Column("token", BigInteger(), nullable=False),
    Column("claimed_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime()),
    Column("released", Boolean(create_constraint=False), nullable=False),
    # Attempts (see the migration e5b7d2c91f40): the claim's deadline, the error the last
    # failed attempt recorded, and the tokens handed out before attempts were last counted
    # anew (attempt = token - attempt_offset).
    Column("deadline", UtcDateTime()),
    Column("last_error", LongText()),
    Column("attempt_offset", BigInteger(), nullable=False, server_default="0"),
    # store_stats' claims by worker: the unreleased ones, few next to the released ones.
    # Not expires_at: renewals change only that column, and stay HOT updates on PostgreSQL
    # (no index to maintain) as long as no index holds it (see the migration f3a9c6e2b1d7).
    Index(None, "released", "worker_id"),
    **_MYSQL,
)

signals = Table(
    "sayiir_signals",
    metadata,
    Column("instance_id", Identifier(), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("reason", LongText()),
    Column("requested_by", LongText()),
    Column("requested_at", UtcDateTime(), nullable=False),
    **_MYSQL,
)

events = Table(
    "sayiir_events",
    metadata,
    # SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
    Column(
        "id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("instance_id", Identifier(), nullable=False),
    Column("name", Identifier(), nullable=False),
    Column("payload", Payload(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Index(None, "instance_id", "name", "id"),
    **_MYSQL,
)

workflow_tags = Table(
    "sayiir_workflow_tags",
    metadata,
    Column("instance_id", Identifier(), primary_key=True),
    Column("tag", Identifier(), primary_key=True),
    **_MYSQL,
)

token_floors = Table(
    "sayiir_token_floors",
    metadata,
    Column("instance_id", Identifier(), primary_key=True),
    Column("token_floor", BigInteger(), nullable=False),
    **_MYSQL,
)

# Keyed sends (see docs/contract.md#send_event): the primary key is what makes a repeat of the
# same key, by any number of concurrent callers, write once.
sent_events = Table(
    "sayiir_sent_events",
    metadata,
    Column("instance_id", Identifier(), primary_key=True),
    Column("idempotency_key", Identifier(), primary_key=True),
    Column("name", Identifier(), nullable=False),
    # SHA-256 of the payload, hex: a repeat with another payload is refused.
    Column("payload_sha256", String(64), nullable=False),
    Column("sent_at", UtcDateTime(), nullable=False),
    **_MYSQL,
)

# Keyed consumptions (see docs/contract.md#consume_event): the payload taken, returned again
# to a repeat of the same key.
consumed_events = Table(
    "sayiir_consumed_events",
    metadata,
    Column("instance_id", Identifier(), primary_key=True),
    Column("consumer_key", Identifier(), primary_key=True),
    Column("name", Identifier(), nullable=False),
    Column("payload", Payload(), nullable=False),
    Column("consumed_at", UtcDateTime(), nullable=False),
    **_MYSQL,
)

# Keyed saves (see docs/contract.md#save_snapshot): the version a write id got.
snapshot_writes = Table(
    "sayiir_snapshot_writes",
    metadata,
    Column("instance_id", Identifier(), primary_key=True),
    Column("write_id", Identifier(), primary_key=True),
    Column("version", Integer(), nullable=False),
    # SHA-256 of the snapshot's canonical encoding, hex: a repeat with another one is refused.
    Column("snapshot_sha256", String(64), nullable=False),
    Column("written_at", UtcDateTime(), nullable=False),
    **_MYSQL,
)

KEY_TABLES = (sent_events, consumed_events, snapshot_writes)
"""The records of keyed calls (idempotency keys, consumer keys, write ids): they belong to one
run of a workflow, and go with it (deleted, pruned, or replaced by ``TERMINATE_EXISTING``)."""

CHILD_TABLES = (
    ready_tasks,
    task_claims,
    task_results,
    signals,
    events,
    workflow_tags,
    *KEY_TABLES,
)
"""The tables whose rows belong to one workflow (by ``instance_id``): what deleting a workflow
deletes first, in the order writers lock them after its row (ready rows before claim rows).
Not ``sayiir_token_floors``: a token floor outlives its workflow."""
