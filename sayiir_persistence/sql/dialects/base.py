"""What every dialect strategy knows, and the parts shared by all of them.

A strategy (one subclass per database, registered by the SQLAlchemy dialect names it serves,
see ``sayiir_persistence.sql.dialects``) holds everything that differs between databases:

- the database clock as a SQL expression (expiry is judged by the server, not the worker);
- how to claim a task in one guarded write (the guard ``released OR expires_at <= now``
  lives in the statement itself, so a row that another worker claimed an instant ago is
  never taken over), a task's first claim going on from its instance's token floor (see
  ``schema.token_floors``);
- how to record the token floors of workflows whose claim rows are being deleted;
- how to lock the best candidates with ``SKIP LOCKED`` (SQLite serialises writers instead);
- how to prepare an engine (isolation level, SQLite pragmas and ``BEGIN IMMEDIATE``);
- the lock that serialises concurrent migrations;
- which driver errors mean "retry", "not provisioned", "too large" or "unavailable".

The clock, the migration lock and the error classification are class-level: they are used
without building a backend (provisioning, inspection).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, ClassVar, Self

from sqlalchemy import (
    URL,
    ColumnElement,
    CompoundSelect,
    Connection,
    Engine,
    Executable,
    FromClause,
    ScalarSelect,
    Select,
    Table,
    and_,
    bindparam,
    func,
    or_,
    select,
)

from ..errors import ErrorKind
from ..schema import task_claims, task_results, token_floors

TaskKey = tuple[str, str]

# Connection execution option marking a transaction that only reads.
READ_ONLY_OPTION = "sayiir_read_only"

logger = logging.getLogger(__name__)


class ClaimRow(Enum):
    """What the lock of a candidate told about its row in ``sayiir_task_claims``."""

    ABSENT = "absent"
    """No claim row: the task was never claimed (a first claim inserts one)."""
    PRESENT = "present"
    """A claim row exists (released or expired, since live claims are not candidates)."""
    UNKNOWN = "unknown"
    """The lock did not read the claim row: the claim statement decides by itself."""


# The candidates locked for a claim, best first, each with what is known of its claim row.
Locked = Mapping[TaskKey, ClaimRow]


@dataclass(frozen=True)
class ClaimTerms:
    """Who claims, at which moment of the store clock, until when."""

    worker_id: str
    now: datetime
    expires_at: datetime | None
    deadline: datetime | None = None


@dataclass(frozen=True)
class Granted:
    """A claim a statement made: its fencing token, attempt and the last recorded error."""

    token: int
    attempt: int
    last_error: str | None = None

    @classmethod
    def first(cls, token_floor: int = 0) -> Granted:
        """A task's first claim, in an instance whose token floor is ``token_floor``."""
        return cls(token=token_floor + 1, attempt=1)

    @classmethod
    def from_row(cls, row: Any) -> Granted:
        """From a claim row's ``token``, ``attempt_offset`` and ``last_error``."""
        return cls(int(row.token), int(row.token - row.attempt_offset), row.last_error)


def claim_parameters(keys: list[TaskKey], terms: ClaimTerms) -> list[dict[str, object]]:
    """The bound values of the claim statements, one set per task."""
    return [
        {
            "p_instance_id": instance_id,
            "p_task_id": task_id,
            "p_worker_id": terms.worker_id,
            "p_now": terms.now,
            "p_expires_at": terms.expires_at,
            "p_deadline": terms.deadline,
        }
        for instance_id, task_id in keys
    ]


# Token floors (see schema.token_floors): a deleted instance's greatest token, which the
# first claim of each task of the id created again goes on from.
TokenFloors = Mapping[str, int]


def token_floor_of(instance_id: ColumnElement[str]) -> ScalarSelect[int]:
    """The token floor of ``instance_id`` (NULL when the id was never deleted with claims)."""
    return (
        select(token_floors.c.token_floor)
        .where(token_floors.c.instance_id == instance_id)
        .scalar_subquery()
    )


def floor_or_zero(instance_id: ColumnElement[str]) -> ColumnElement[int]:
    """The token floor of ``instance_id``, 0 when it has none."""
    return func.coalesce(token_floor_of(instance_id), 0)


def new_claim() -> dict[str, object]:
    """The values of a first claim, bound by :func:`claim_parameters`. Its token goes on from
    the instance's token floor, read by the claim statement itself (after the caller locked
    the task's ready row or workflow row, so a floor committed before the id was created
    again is seen); the attempt offset is the floor, so the attempt is 1."""
    floor = floor_or_zero(bindparam("p_instance_id"))
    return {
        "instance_id": bindparam("p_instance_id"),
        "task_id": bindparam("p_task_id"),
        "worker_id": bindparam("p_worker_id"),
        "token": floor + 1,
        "claimed_at": bindparam("p_now"),
        "expires_at": bindparam("p_expires_at"),
        "released": False,
        "deadline": bindparam("p_deadline"),
        "attempt_offset": floor,
    }


def claims_token_floors() -> Select[Any]:
    """The greatest token of the claim rows of each of the instances ``p_ids`` (expanding)."""
    return (
        select(task_claims.c.instance_id, func.max(task_claims.c.token))
        .where(task_claims.c.instance_id.in_(bindparam("p_ids", expanding=True)))
        .group_by(task_claims.c.instance_id)
    )


# A takeover's new values (a first claim's are new_claim()): the error of the last failed
# attempt stays, for the attempt after it to read.
def takeover_values(claim: Any) -> dict[str, object]:
    """``set_`` of an ``ON CONFLICT`` claim upsert whose proposed row is ``claim.excluded``."""
    return {
        "worker_id": claim.excluded.worker_id,
        "token": task_claims.c.token + 1,
        "claimed_at": claim.excluded.claimed_at,
        "expires_at": claim.excluded.expires_at,
        "released": False,
        "deadline": claim.excluded.deadline,
    }


# What a claim statement hands back about each claim it made.
GRANTED_COLUMNS = (
    task_claims.c.token,
    task_claims.c.attempt_offset,
    task_claims.c.last_error,
)


def claim_is_free(now: ColumnElement[datetime]) -> ColumnElement[bool]:
    """The takeover guard: the stored claim was released or has expired at ``now``."""
    return or_(
        task_claims.c.released.is_(True),
        and_(task_claims.c.expires_at.is_not(None), task_claims.c.expires_at <= now),
    )


# The claimed_until of a claim that never expires (ttl=None): the latest time every database
# stores.
CLAIMED_FOREVER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def claimed_until(expires_at: datetime | None) -> datetime:
    """The ``claimed_until`` hint of a claim expiring at ``expires_at``."""
    return CLAIMED_FOREVER if expires_at is None else expires_at


def ready_is_free(ready: FromClause, now: ColumnElement[datetime]) -> ColumnElement[bool]:
    """The ready row's own claim hint (``claimed_until``) says it is free; its claim row may
    still say otherwise, and decides."""
    return or_(ready.c.claimed_until.is_(None), ready.c.claimed_until <= now)


def new_result() -> dict[str, object]:
    """The values of a task result: ``p_instance_id``, ``p_task_id``, ``p_output``,
    ``p_completed_at``."""
    return {
        "instance_id": bindparam("p_instance_id"),
        "task_id": bindparam("p_task_id"),
        "output": bindparam("p_output"),
        "completed_at": bindparam("p_completed_at"),
    }


def claim_key() -> ColumnElement[bool]:
    """The claim row of ``p_instance_id`` / ``p_task_id``."""
    return and_(
        task_claims.c.instance_id == bindparam("p_instance_id"),
        task_claims.c.task_id == bindparam("p_task_id"),
    )


def on_conflict_floor_upsert(
    insert: Callable[[Table], Any], greatest: Callable[..., ColumnElement[int]]
) -> Executable:
    """Record the token floors of the instances ``p_ids`` from their claim rows, keeping the
    greater floor, on a database with ``INSERT ... ON CONFLICT``."""
    floors = insert(token_floors).from_select(["instance_id", "token_floor"], claims_token_floors())
    upsert: Executable = floors.on_conflict_do_update(
        index_elements=[token_floors.c.instance_id],
        set_={"token_floor": greatest(token_floors.c.token_floor, floors.excluded.token_floor)},
    )
    return upsert


def on_conflict_upserts(insert: Callable[[Table], Any]) -> tuple[Executable, Executable]:
    """The claim and result upserts of a database with ``INSERT ... ON CONFLICT``.

    ``insert`` is ``postgresql.insert`` or ``sqlite.insert``: their ``Insert`` classes share
    ``on_conflict_do_update`` but no base class that declares it (hence ``Any``).
    """
    claim = insert(task_claims).values(new_claim())
    claim = claim.on_conflict_do_update(
        index_elements=[task_claims.c.instance_id, task_claims.c.task_id],
        set_=takeover_values(claim),
        # excluded.claimed_at is this claim's "now", the clock the guard must use.
        where=claim_is_free(claim.excluded.claimed_at),
    ).returning(task_claims.c.instance_id, task_claims.c.task_id, *GRANTED_COLUMNS)
    result = insert(task_results).values(new_result())
    result = result.on_conflict_do_update(
        index_elements=[task_results.c.instance_id, task_results.c.task_id],
        set_={"output": result.excluded.output, "completed_at": result.excluded.completed_at},
    )
    return claim, result


# One backend serves every thread of a worker process, one connection per call in flight.
# A pool smaller than the thread count makes threads queue for connections, and the
# pool's queue is not fair: a busy thread can starve for the whole pool timeout. Ten
# kept open, up to forty under load.
# No pool_pre_ping: its round trip at every checkout cost 5-15 % of a short call; a
# connection found dead is replaced by SqlBackend._transaction instead.
POOL_OPTIONS: dict[str, object] = {"pool_size": 10, "max_overflow": 30}

# Defaults of SqlBackend(connect_timeout=..., call_timeout=...), documented there.
# Opening a connection (TCP, TLS, authentication, session set-up) takes milliseconds on a
# LAN and well under a second across regions; 10 s leaves room for a server busy accepting
# a burst of connections (SCRAM authentication costs it CPU).
DEFAULT_CONNECT_TIMEOUT = timedelta(seconds=10)
# Every call is one short transaction: its longest legitimate forms (a 16 MiB payload each
# way, a prune batch of 10,000 workflows, a claim waiting behind other writers' row locks) take
# milliseconds to a few seconds. 60 s is far above all of them, and well under what TCP
# alone would wait on a silent network (minutes to hours).
DEFAULT_CALL_TIMEOUT = timedelta(seconds=60)


# TCP keepalives on every connection to a server: an idle pooled connection whose peer
# vanished is known dead after 10 + 3 x 5 = 25 s of silence, and fails at once at its next
# use (the backend then runs the transaction again on a new connection) instead of costing
# that call its timeout. Sent data left unacknowledged for 30 s means the same (TCP
# retransmits a lost segment within a second or two).
KEEPALIVE_IDLE_SECONDS = 10
KEEPALIVE_INTERVAL_SECONDS = 5
KEEPALIVE_COUNT = 3
TCP_USER_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class Timeouts:
    """How long a backend waits for the database (see ``SqlBackend``)."""

    connect: timedelta
    """Opening a connection."""
    call: timedelta | None
    """A whole call (its transaction, retries included); ``None``: unbounded."""


def seconds(duration: timedelta) -> float:
    return duration.total_seconds()


def without_url_parameters(
    connect_args: dict[str, object], url: URL, merged: frozenset[str]
) -> dict[str, object]:
    """``connect_args`` less what the URL's query sets: the URL's parameters win (SQLAlchemy
    would otherwise let ``connect_args`` override them), except the ``merged`` ones, whose
    value in ``connect_args`` already includes the URL's."""
    return {
        key: value for key, value in connect_args.items() if key in merged or key not in url.query
    }


_REGISTRY: dict[str, type[SqlDialect]] = {}


class SqlDialect(ABC):
    """The strategy of one database; subclasses declare the dialect ``names`` they serve."""

    names: ClassVar[frozenset[str]] = frozenset()
    """The SQLAlchemy dialect names (``engine.dialect.name``) this strategy serves."""
    skip_locked: ClassVar[bool] = True
    # UPDATE ... RETURNING (PostgreSQL, SQLite 3.35+; not MySQL/MariaDB).
    update_returning: ClassVar[bool] = True

    # Each statement sees what committed before it started; guards and row locks do the
    # rest. PostgreSQL and InnoDB then behave alike (InnoDB defaults to REPEATABLE READ).
    isolation_level: ClassVar[str | None] = "READ COMMITTED"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls.names:
            _REGISTRY[name] = cls

    @classmethod
    def configured(cls, *, sqlite_busy_timeout: timedelta) -> Self:
        """The strategy for a backend with these settings (each takes what concerns it)."""
        return cls()

    def __init__(self) -> None:
        # Built once: building SQLAlchemy statements costs more client CPU than running
        # their cached compiled form. Values are bound at each call.
        self._claim_statement, self._put_result_statement = self._build_upserts()
        self._record_floors_statement = self._build_floor_upsert()

    # -- the clock -----------------------------------------------------------------------

    @staticmethod
    @abstractmethod
    def now() -> ColumnElement[datetime]:
        """The database clock."""

    @staticmethod
    @abstractmethod
    def now_plus_ttl() -> ColumnElement[datetime]:
        """The database clock plus the TTL bound as ``p_ttl`` (see :meth:`ttl_parameter`)."""

    @staticmethod
    def ttl_parameter(ttl: timedelta) -> object:
        """The value of ``p_ttl`` for a TTL."""
        return ttl

    # -- engines and connections ----------------------------------------------------------

    def write_gate(self, read_only: bool) -> AbstractContextManager[None]:
        """Held around each transaction of this backend (a no-op where rows are locked)."""
        return nullcontext()

    # Whether calls run over a socket that a CallWatchdog can shut down (not SQLite's file).
    watches_calls: ClassVar[bool] = True
    # Connection arguments whose value from connect_args() includes the URL's own.
    merged_url_parameters: ClassVar[frozenset[str]] = frozenset()

    def engine_options(
        self, url: URL, max_payload_bytes: int, timeouts: Timeouts
    ) -> dict[str, object]:
        """``create_engine`` options for an engine the backend creates from a URL: the pool,
        the isolation level, and the driver's timeouts (``connect_args``; parameters in the
        URL's query win over them)."""
        options: dict[str, object] = {**POOL_OPTIONS, "isolation_level": self.isolation_level}
        if timeouts.call is not None:
            # A wait for a pooled connection is part of the call.
            options["pool_timeout"] = seconds(timeouts.call)
        connect_args = self.connect_args(url, max_payload_bytes, timeouts)
        if connect_args:
            options["connect_args"] = without_url_parameters(
                connect_args, url, self.merged_url_parameters
            )
        return options

    def connect_args(
        self, url: URL, max_payload_bytes: int, timeouts: Timeouts
    ) -> dict[str, object]:
        """The driver's connection arguments (timeouts, keepalives, packet sizes)."""
        return {}

    @staticmethod
    def socket_of(dbapi_connection: Any) -> int | None:
        """The socket (file descriptor) of a DBAPI connection, ``None`` if it has none."""
        fileno = getattr(dbapi_connection, "fileno", None)
        return None if fileno is None else int(fileno())

    def check_server(self, conn: Connection, max_payload_bytes: int) -> None:  # noqa: B027
        """Warn about server settings that would refuse payloads the backend accepts."""

    def prepare_engine(self, engine: Engine, *, created: bool) -> Engine:
        """Return the engine to use (options applied); may register event hooks.

        ``created``: the backend made the engine with :meth:`engine_options`.
        """
        if created:
            return engine  # the isolation level is set once per connection, at connect
        # On a caller's engine it is set at each checkout and reset at each return (extra
        # round trips): callers avoid that with create_engine(isolation_level=...).
        return engine.execution_options(isolation_level=self.isolation_level)

    @classmethod
    @contextmanager
    def migration_lock(cls, connection: Connection) -> Iterator[None]:
        """Hold a database-wide lock that serialises concurrent migrations (see
        :func:`sayiir_persistence.provisioning.migration_lock`)."""
        yield

    def announce_work(self, conn: Connection) -> None:  # noqa: B027 - optional hook
        """Tell other processes' idle workers, at commit, that a task became runnable
        (where the database can; in-process waiters are woken by the backend)."""

    @classmethod
    def migration_engine_options(cls) -> dict[str, object]:
        """``create_engine`` options of the engine a migration opens for a URL."""
        return {}

    @classmethod  # noqa: B027 - optional hook
    def after_migration(cls, connection: Connection) -> None:
        """Settings stored in the database that every backend will want (outside the
        migration's transaction)."""

    @classmethod
    def classify(cls, error: BaseException) -> ErrorKind | None:
        """What a driver error means for the caller (``None``: nothing specific)."""
        return None

    def lost_conflict(self) -> None:  # noqa: B027 - a hook: most dialects need nothing
        """A transaction of the calling thread lost a conflict (deadlock, serialization or
        certification failure) and was rolled back; a dialect may claim differently for a
        while. Nothing by default."""

    # -- claims ----------------------------------------------------------------------------

    @abstractmethod
    def _build_upserts(self) -> tuple[Executable, Executable]:
        """The claim statement and the result upsert.

        The claim inserts a first claim or takes over a free one, in one guarded statement,
        run with a list of parameter sets (SQLAlchemy sends them in one multi-row statement
        and gathers the ``RETURNING`` rows); a row whose claim is live returns nothing.
        """

    @abstractmethod
    def _build_floor_upsert(self) -> Executable:
        """The statement of :meth:`record_token_floors` (bound: ``p_ids``, expanding)."""

    def record_token_floors(self, conn: Connection, instance_ids: list[str]) -> None:
        """Record the greatest token of the claim rows of ``instance_ids`` as their token
        floors (keeping a greater floor already recorded), before those rows are deleted.

        The caller holds the workflow rows and has deleted their ready rows: every claim
        locks one of them first, so no claim of these instances can change while the
        statement reads their claim rows (and a claim that got a lock first has committed).
        """
        if instance_ids:
            conn.execute(self._record_floors_statement, {"p_ids": instance_ids})

    def floor_read(self, instance_id: ColumnElement[str]) -> ColumnElement[int] | None:
        """What a statement that locks a task's ready or workflow row selects to learn the
        instance's token floor, for a dialect whose claim statement cannot return the token
        it wrote (``None``: the claim statement returns it, nothing to read)."""
        return None

    def claim(
        self, conn: Connection, key: TaskKey, terms: ClaimTerms, floors: TokenFloors
    ) -> Granted | None:
        """Claim if no live claim exists; ``None`` if one does. ``floors``: the token floors
        read with :meth:`floor_read` by the statement that locked the task (empty where that
        reads nothing)."""
        return self.claim_many(conn, {key: ClaimRow.UNKNOWN}, terms, floors).get(key)

    def claim_available_query(self, candidates: CompoundSelect[Any]) -> Select[Any] | None:
        """One statement that finds, locks, claims and describes the best candidates, where
        the database can (``None``: :meth:`lock_candidates` and :meth:`claim_many` do it in
        steps)."""
        return None

    @abstractmethod
    def lock_candidates(
        self, conn: Connection, keys: list[TaskKey], limit: int
    ) -> tuple[Locked, TokenFloors]:
        """Lock the first ``limit`` of ``keys`` (best first) that no one else is claiming,
        each with what the lock tells of its claim row, and the token floors of their
        instances where :meth:`floor_read` reads them."""

    def claim_many(
        self, conn: Connection, locked: Locked, terms: ClaimTerms, floors: TokenFloors
    ) -> dict[TaskKey, Granted]:
        """Claim each locked key that has no live claim; return the claims made. ``floors``:
        as for :meth:`claim`."""
        if not locked:
            return {}
        rows = conn.execute(self._claim_statement, claim_parameters(list(locked), terms))
        return {(row.instance_id, row.task_id): Granted.from_row(row) for row in rows}

    def put_result(
        self, conn: Connection, instance_id: str, task_id: str, output: bytes, now: datetime
    ) -> None:
        """Insert or replace one task result."""
        conn.execute(
            self._put_result_statement,
            {
                "p_instance_id": instance_id,
                "p_task_id": task_id,
                "p_output": output,
                "p_completed_at": now,
            },
        )


def dialect_class(name: str) -> type[SqlDialect]:
    """The strategy class serving a SQLAlchemy dialect name.

    Raises:
        ValueError: no strategy serves ``name``.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unsupported database dialect {name!r}: use PostgreSQL, MySQL/MariaDB or SQLite"
        ) from None
