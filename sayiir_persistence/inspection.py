"""Read-only views of a SQL store for operators (the ``sayiir-persistence`` commands).

The contract answers questions about one workflow; an operator also asks about the whole
store: which claims are live right now, what a page of workflows looks like, how many finished
workflows a prune would delete. :class:`StoreInspector` answers those with a few SQLAlchemy
Core queries on the ``sayiir_*`` tables. It never writes: changes go through the backend
(``prune_workflows``, ``store_signal``, ...), so they keep its locking rules.

Time is the database's clock, as for the backend itself: a claim is live or expired by the
server's ``now``, whatever the operator's machine thinks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Connection, Engine, Select, select

from .attempts import RETRY_WAIT_WORKER
from .model import WorkflowStatus
from .sql import codec
from .sql.dialects import dialect_class
from .sql.errors import translated_errors
from .sql.rows import POSITION, STATUS
from .sql.schema import task_claims, task_results, workflows
from .transitions import unfinished_tasks
from .urls import mask_url

__all__ = ["ClaimInfo", "ClaimState", "StoreInspector", "WorkflowSummary"]

# Ids per IN (...) list: well under every database's bind-parameter limit.
_IN_CHUNK = 500


class ClaimState(StrEnum):
    """Where a claim stands by the database clock."""

    LIVE = "live"
    """Held: not released and not yet at ``expires_at`` (or never expiring)."""
    EXPIRED = "expired"
    """Not released, but past ``expires_at``: the next worker to claim the task takes it over."""
    RELEASED = "released"
    """Released by its worker, or dropped by a cancel, pause or retry. Kept for its fencing
    token."""


@dataclass(frozen=True)
class WorkflowSummary:
    """The columns of one workflow that a listing shows."""

    instance_id: str
    status: WorkflowStatus
    version: int
    updated_at: datetime
    error: str | None = None
    """Why a failed workflow failed (``None`` for the others)."""
    failed_tasks: tuple[str, ...] = ()
    """Of a failed workflow, the tasks of its position without a result: those it failed at,
    which ``retry`` re-queues (empty for the others)."""


@dataclass(frozen=True)
class ClaimInfo:
    """One row of ``sayiir_task_claims`` and its state at the time of the query."""

    instance_id: str
    task_id: str
    worker_id: str
    token: int
    claimed_at: datetime
    expires_at: datetime | None
    state: ClaimState
    attempt: int = 1
    """The claims of the task since its first, or since its workflow was retried (0: none
    since)."""
    deadline: datetime | None = None
    """Past it the claim can no longer be renewed (``None``: no deadline)."""
    last_error: str | None = None
    """The error the task's last failed attempt recorded, if any."""

    @property
    def waiting_to_retry(self) -> bool:
        """A scheduled retry's wait, held by no worker until ``expires_at``
        (docs/contract.md#attempts-and-deadlines)."""
        return self.worker_id == RETRY_WAIT_WORKER


class StoreInspector:
    """Read-only queries on the tables of a provisioned SQL store.

    Args:
        engine: the store's engine, typically ``SqlBackend.engine``.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._where = mask_url(engine.url)
        self._dialect = dialect_class(engine.dialect.name)
        self._now = self._dialect.now()

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        with (
            translated_errors(self._where, self._dialect),
            self._engine.connect() as conn,
            conn.begin(),
        ):
            yield conn

    def now(self) -> datetime:
        """The database clock (aware UTC)."""
        with self._connection() as conn:
            return self._read_now(conn)

    def _read_now(self, conn: Connection) -> datetime:
        now = conn.execute(select(self._now)).scalar_one()
        assert isinstance(now, datetime)
        return now

    def summaries(self, instance_ids: Sequence[str]) -> list[WorkflowSummary]:
        """Status, version and last save of these instances, in the order given; of the
        failed ones, their error and the tasks they failed at.

        Ids that do not exist (any more) are left out.

        Raises:
            CorruptDataError: a stored status cannot be decoded (names the instance).
        """
        found: dict[str, WorkflowSummary] = {}
        with self._connection() as conn:
            for start in range(0, len(instance_ids), _IN_CHUNK):
                chunk = list(instance_ids[start : start + _IN_CHUNK])
                rows = conn.execute(
                    select(
                        workflows.c.instance_id,
                        workflows.c.status,
                        workflows.c.version,
                        workflows.c.updated_at,
                        workflows.c.error,
                        workflows.c.position,
                    ).where(workflows.c.instance_id.in_(chunk))
                )
                failed: dict[str, tuple[str | None, str]] = {}  # id: (error, position)
                for row in rows:
                    status = codec.decode_column(
                        row.instance_id, STATUS, codec.decode_status, row.status
                    )
                    found[row.instance_id] = WorkflowSummary(
                        row.instance_id, status, row.version, row.updated_at
                    )
                    if status is WorkflowStatus.FAILED:
                        failed[row.instance_id] = (row.error, row.position)
                results = self._result_ids(conn, list(failed)) if failed else {}
                for instance_id, (error, position) in failed.items():
                    decoded = codec.decode_column(
                        instance_id, POSITION, codec.decode_position, position
                    )
                    tasks = unfinished_tasks(decoded, results.get(instance_id, ()))
                    found[instance_id] = replace(
                        found[instance_id], error=error, failed_tasks=tasks
                    )
        return [found[instance_id] for instance_id in instance_ids if instance_id in found]

    @staticmethod
    def _result_ids(conn: Connection, instance_ids: list[str]) -> dict[str, set[str]]:
        """The ids of the tasks with a stored result, by instance."""
        found: dict[str, set[str]] = {}
        rows = conn.execute(
            select(task_results.c.instance_id, task_results.c.task_id).where(
                task_results.c.instance_id.in_(instance_ids)
            )
        )
        for row in rows:
            found.setdefault(row.instance_id, set()).add(row.task_id)
        return found

    def claims(
        self,
        *,
        instance_id: str | None = None,
        worker_id: str | None = None,
        include_inactive: bool = False,
        limit: int | None = None,
    ) -> tuple[datetime, list[ClaimInfo]]:
        """Claims ordered by instance and task, and the database time that judged them.

        Args:
            instance_id: only this instance's claims.
            worker_id: only claims taken by this worker.
            include_inactive: also expired and released claims (default: live ones only).
            limit: at most this many claims.
        """
        query = select(task_claims).order_by(task_claims.c.instance_id, task_claims.c.task_id)
        if instance_id is not None:
            query = query.where(task_claims.c.instance_id == instance_id)
        if worker_id is not None:
            query = query.where(task_claims.c.worker_id == worker_id)
        if limit is not None:
            query = query.limit(limit)
        with self._connection() as conn:
            now = self._read_now(conn)
            if not include_inactive:
                query = query.where(
                    task_claims.c.released.is_(False),
                    (task_claims.c.expires_at.is_(None)) | (task_claims.c.expires_at > now),
                )
            rows = list(conn.execute(query))
        claims = [
            ClaimInfo(
                row.instance_id,
                row.task_id,
                row.worker_id,
                row.token,
                row.claimed_at,
                row.expires_at,
                _state(row.released, row.expires_at, now),
                attempt=row.token - row.attempt_offset,
                deadline=row.deadline,
                last_error=row.last_error,
            )
            for row in rows
        ]
        return now, claims

    def prune_candidates(
        self, status: WorkflowStatus, cutoff: datetime, *, after: str | None, limit: int
    ) -> list[str]:
        """Up to ``limit`` ids with ``status``, last saved before ``cutoff``, after ``after``.

        Keyset-paged in id order, which the ``(status, instance_id)`` index serves: each page
        is one range scan of that index, whatever the size of the table.
        """
        with self._connection() as conn:
            return list(conn.scalars(_prune_query(status, cutoff, after, limit)))


def _prune_query(
    status: WorkflowStatus, cutoff: datetime, after: str | None, limit: int
) -> Select[tuple[str]]:
    query = (
        select(workflows.c.instance_id)
        .where(workflows.c.status == status.value, workflows.c.updated_at < cutoff)
        .order_by(workflows.c.instance_id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(workflows.c.instance_id > after)
    return query


def _state(released: bool, expires_at: datetime | None, now: datetime) -> ClaimState:
    if released:
        return ClaimState.RELEASED
    if expires_at is not None and expires_at <= now:
        return ClaimState.EXPIRED
    return ClaimState.LIVE
