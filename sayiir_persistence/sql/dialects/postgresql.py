"""PostgreSQL: ``INSERT ... ON CONFLICT`` claims; available tasks claimed in one statement."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    URL,
    BigInteger,
    ColumnElement,
    CompoundSelect,
    Connection,
    Executable,
    Interval,
    Select,
    String,
    and_,
    bindparam,
    false,
    func,
    literal,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql

from ..errors import ErrorKind
from ..listening import CHANNEL
from ..schema import ready_tasks, task_claims, task_results, workflows
from ..types import Identifier, UtcDateTime
from .base import (
    CLAIMED_FOREVER,
    GRANTED_COLUMNS,
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE_SECONDS,
    KEEPALIVE_INTERVAL_SECONDS,
    TCP_USER_TIMEOUT_MS,
    Locked,
    SqlDialect,
    TaskKey,
    Timeouts,
    TokenFloors,
    claim_is_free,
    floor_or_zero,
    on_conflict_floor_upsert,
    on_conflict_upserts,
    ready_is_free,
    takeover_values,
)

# SQLSTATEs.
_RETRYABLE = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_UNDEFINED = frozenset({"42P01", "42703"})  # undefined table, undefined column
# query_canceled (statement_timeout, or an operator's pg_cancel_backend),
# idle_in_transaction_session_timeout: the call ran past its time, nothing was committed.
_TIMED_OUT = frozenset({"57014", "25P03"})

# libpq's names for the keepalive settings (see base.py).
_KEEPALIVES: dict[str, object] = {
    "keepalives": 1,
    "keepalives_idle": KEEPALIVE_IDLE_SECONDS,
    "keepalives_interval": KEEPALIVE_INTERVAL_SECONDS,
    "keepalives_count": KEEPALIVE_COUNT,
}
# libpq 12+ knows tcp_user_timeout; an older one would refuse to connect with it.
_TCP_USER_TIMEOUT_LIBPQ = 120000

# Any constant shared by every process: concurrent migrations queue on it.
_MIGRATION_LOCK_KEY = 0x5A11_2000_0001


class PostgresDialect(SqlDialect):
    names = frozenset({"postgresql"})
    merged_url_parameters = frozenset({"options"})

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
        # psycopg2 calls the SQLSTATE pgcode, psycopg 3 sqlstate.
        code = getattr(error, "pgcode", None) or getattr(error, "sqlstate", None)
        if code in _RETRYABLE:
            return ErrorKind.RETRYABLE
        if code in _UNDEFINED:
            return ErrorKind.NOT_PROVISIONED
        if code in _TIMED_OUT:
            return ErrorKind.UNAVAILABLE
        return None

    def connect_args(
        self, url: URL, max_payload_bytes: int, timeouts: Timeouts
    ) -> dict[str, object]:
        """libpq parameters (psycopg2 and psycopg 3 alike): ``connect_timeout`` (libpq's
        bound on the whole connection set-up, 2 s at least), keepalives,
        ``tcp_user_timeout``, and the server-side timeouts of the session in ``options``
        (ahead of the URL's own ``options``, whose settings therefore win)."""
        args: dict[str, object] = {
            "connect_timeout": max(2, math.ceil(timeouts.connect.total_seconds())),
            **_KEEPALIVES,
        }
        if _libpq_version(url.get_driver_name()) >= _TCP_USER_TIMEOUT_LIBPQ:
            args["tcp_user_timeout"] = TCP_USER_TIMEOUT_MS
        if timeouts.call is not None:
            # No statement of a call runs longer than the call, nor does its transaction
            # idle longer: past that, the client has given up (SqlBackend's watchdog), and a
            # server that goes on would hold the transaction's row locks for nothing until
            # its own TCP keepalive notices the client is gone (2 hours by default). Both end
            # the transaction, which rolls back.
            ms = max(1, math.ceil(timeouts.call.total_seconds() * 1000))
            server = f"-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}"
            own = url.query.get("options")
            args["options"] = f"{server} {own}" if isinstance(own, str) else server
        return args

    def announce_work(self, conn: Connection) -> None:
        # Delivered at commit, once per transaction, to every listener (sql/listening.py).
        conn.execute(self._notify_statement)

    def _build_upserts(self) -> tuple[Executable, Executable]:
        self._notify_statement = select(
            func.pg_notify(bindparam("p_channel", CHANNEL, type_=String()), "")
        )
        return on_conflict_upserts(postgresql.insert)

    def _build_floor_upsert(self) -> Executable:
        return on_conflict_floor_upsert(postgresql.insert, func.greatest)

    def claim_available_query(self, candidates: CompoundSelect[Any]) -> Select[Any]:
        """Find, lock, claim and describe the best available tasks in one statement.

        ``locked``: the best candidates by effective priority (priority * aging + updated_at,
        in exact microseconds; EXTRACT returns numeric), locked under the LIMIT, so that rows
        locked by others are skipped and the next best taken; the free-row condition sits on
        the locked row itself, so that a row claimed by a commit after this statement's
        snapshot is rechecked on its new version and skipped too. ``claimed``: the guarded
        claim upsert of those rows (a live claim row refuses, and returns nothing). ``marked``:
        the claims' expiry copied to their ready rows. A first claim goes on from its
        instance's token floor (read by this statement, whose snapshot holds every floor
        written before the locked ready rows' workflow was created). The outer select adds
        what the worker
        needs to run each task. Bound: the candidates' parameters, ``p_aging_us``,
        ``p_take``, ``p_worker_id``, ``p_ttl`` (an interval, or NULL for no expiry; already
        cut to the timeout), ``p_timeout`` (an interval, or NULL for no deadline).
        """
        candidate = candidates.subquery("candidate")
        ready = ready_tasks.alias("ready")
        now = self.now()
        updated_us = func.extract("epoch", candidate.c.updated_at) * 1_000_000
        effective_priority = candidate.c.priority * bindparam("p_aging_us", type_=BigInteger())
        locked = (
            select(ready.c.instance_id, ready.c.task_id, ready.c.priority, ready.c.updated_at)
            .join_from(
                ready,
                candidate,
                and_(
                    candidate.c.instance_id == ready.c.instance_id,
                    candidate.c.task_id == ready.c.task_id,
                ),
            )
            .where(ready_is_free(ready, now))
            .order_by(
                effective_priority + updated_us,
                candidate.c.updated_at,
                candidate.c.instance_id,
                candidate.c.task_id,
            )
            .limit(bindparam("p_take", type_=BigInteger()))
            .with_for_update(of=ready, skip_locked=True)
            .cte("locked")
        )
        claim = postgresql.insert(task_claims).from_select(
            [
                "instance_id",
                "task_id",
                "worker_id",
                "token",
                "claimed_at",
                "expires_at",
                "released",
                "deadline",
                "attempt_offset",
            ],
            select(
                locked.c.instance_id,
                locked.c.task_id,
                bindparam("p_worker_id", type_=Identifier()),
                floor_or_zero(locked.c.instance_id) + literal(1, BigInteger()),
                now,
                self.now_plus_ttl(),
                false(),
                type_coerce(
                    func.statement_timestamp() + bindparam("p_timeout", type_=Interval()),
                    UtcDateTime(),
                ),
                floor_or_zero(locked.c.instance_id),
            ),
        )
        claimed = (
            claim.on_conflict_do_update(
                index_elements=[task_claims.c.instance_id, task_claims.c.task_id],
                set_=takeover_values(claim),
                where=claim_is_free(claim.excluded.claimed_at),
            )
            .returning(
                task_claims.c.instance_id,
                task_claims.c.task_id,
                task_claims.c.claimed_at,
                task_claims.c.expires_at,
                task_claims.c.deadline,
                *GRANTED_COLUMNS,
            )
            .cte("claimed")
        )
        marked = (
            update(ready_tasks)
            .where(
                ready_tasks.c.instance_id == claimed.c.instance_id,
                ready_tasks.c.task_id == claimed.c.task_id,
            )
            .values(
                claimed_until=func.coalesce(
                    claimed.c.expires_at, literal(CLAIMED_FOREVER, UtcDateTime())
                )
            )
            .cte("marked")
        )
        input_result = task_results.alias("input_result")
        return (
            select(
                claimed.c.instance_id,
                claimed.c.task_id,
                claimed.c.token,
                claimed.c.attempt_offset,
                claimed.c.last_error,
                claimed.c.claimed_at,
                claimed.c.expires_at,
                claimed.c.deadline,
                locked.c.priority,
                locked.c.updated_at,
                workflows.c.definition_hash,
                workflows.c.tags,
                workflows.c.version,
                workflows.c.initial_input,
                workflows.c.input_task_id,
                workflows.c.trace_context,
                input_result.c.output.label("input_output"),
            )
            .select_from(
                claimed.join(
                    locked,
                    and_(
                        locked.c.instance_id == claimed.c.instance_id,
                        locked.c.task_id == claimed.c.task_id,
                    ),
                )
                .join(workflows, workflows.c.instance_id == claimed.c.instance_id)
                .outerjoin(
                    input_result,
                    and_(
                        input_result.c.instance_id == workflows.c.instance_id,
                        input_result.c.task_id == workflows.c.input_task_id,
                    ),
                )
            )
            .add_cte(marked)
        )

    def lock_candidates(
        self, conn: Connection, keys: list[TaskKey], limit: int
    ) -> tuple[Locked, TokenFloors]:
        raise NotImplementedError("PostgreSQL claims in one statement: claim_available_query")


def _libpq_version(driver: str) -> int:
    """The version of the libpq the driver uses (``0`` when it cannot tell)."""
    try:
        if driver == "psycopg":
            import psycopg

            return int(psycopg.pq.version())
        import psycopg2.extensions

        return int(psycopg2.extensions.libpq_version())
    except (ImportError, AttributeError):
        return 0
