"""PostgreSQL: ``INSERT ... ON CONFLICT`` claims and one find-and-lock statement."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    CompoundSelect,
    Connection,
    Executable,
    Interval,
    Select,
    and_,
    bindparam,
    func,
    select,
    text,
    type_coerce,
)
from sqlalchemy.dialects import postgresql

from ..errors import ErrorKind
from ..schema import ready_tasks
from ..types import UtcDateTime
from .base import Locked, SqlDialect, TaskKey, on_conflict_upserts

# SQLSTATEs.
_RETRYABLE = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_UNDEFINED = frozenset({"42P01", "42703"})  # undefined table, undefined column

# Any constant shared by every process: concurrent migrations queue on it.
_MIGRATION_LOCK_KEY = 0x5A11_2000_0001


class PostgresDialect(SqlDialect):
    names = frozenset({"postgresql"})

    @staticmethod
    def now() -> ColumnElement[datetime]:
        # statement_timestamp(): current at each statement, constant within it (now() is
        # frozen at transaction start).
        return type_coerce(func.statement_timestamp(), UtcDateTime())

    @staticmethod
    def now_plus_ttl() -> ColumnElement[datetime]:
        return type_coerce(
            func.statement_timestamp() + bindparam("p_ttl", type_=Interval()), UtcDateTime()
        )

    @classmethod
    @contextmanager
    def migration_lock(cls, connection: Connection) -> Iterator[None]:
        # A transaction-level advisory lock, released at commit.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        yield

    @classmethod
    def classify(cls, error: BaseException) -> ErrorKind | None:
        code = getattr(error, "pgcode", None)
        if code in _RETRYABLE:
            return ErrorKind.RETRYABLE
        if code in _UNDEFINED:
            return ErrorKind.NOT_PROVISIONED
        return None

    def _build_upserts(self) -> tuple[Executable, Executable]:
        return on_conflict_upserts(postgresql.insert)

    def find_and_lock_query(self, candidates: CompoundSelect[Any]) -> Select[Any]:
        # The lock sits under the LIMIT: rows locked by others are skipped and the next
        # best taken, in effective priority order (priority * aging + updated_at, in exact
        # microseconds; EXTRACT returns numeric). One round trip instead of two.
        candidate = candidates.subquery("candidate")
        locked = ready_tasks.alias("locked")
        updated_us = func.extract("epoch", candidate.c.updated_at) * 1_000_000
        effective_priority = candidate.c.priority * bindparam("p_aging_us", type_=BigInteger())
        return (
            select(
                locked.c.instance_id,
                locked.c.task_id,
                locked.c.priority,
                locked.c.updated_at,
                self.now().label("now"),
            )
            .join_from(
                locked,
                candidate,
                and_(
                    candidate.c.instance_id == locked.c.instance_id,
                    candidate.c.task_id == locked.c.task_id,
                ),
            )
            .order_by(
                effective_priority + updated_us,
                candidate.c.updated_at,
                candidate.c.instance_id,
                candidate.c.task_id,
            )
            .limit(bindparam("p_take", type_=BigInteger()))
            .with_for_update(of=locked, skip_locked=True)
        )

    def lock_candidates(self, conn: Connection, keys: list[TaskKey], limit: int) -> Locked:
        raise NotImplementedError("PostgreSQL locks its candidates in find_and_lock_query")
