"""Everything that differs between PostgreSQL, MySQL/MariaDB and SQLite, in one place.

``SqlBackend`` asks :func:`dialect_for` for a strategy once, at start-up, and never tests
the dialect name itself. A strategy knows:

- the database clock as a SQL expression (expiry is judged by the server, not the worker);
- how to claim a task in one guarded write (the guard ``released OR expires_at <= now``
  lives in the statement itself, so a row that another worker claimed an instant ago is
  never taken over);
- how to lock the best candidates with ``SKIP LOCKED`` (SQLite serialises writers instead);
- how to prepare an engine (isolation level, SQLite pragmas and ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Interval,
    and_,
    bindparam,
    event,
    exists,
    func,
    insert,
    literal_column,
    not_,
    or_,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite

from ..errors import BackendUnavailableError
from .schema import ready_tasks, task_claims, task_results
from .types import MYSQL_DIALECTS, UtcDateTime

TaskKey = tuple[str, str]

# Connection execution option marking a transaction that only reads.
READ_ONLY_OPTION = "sayiir_read_only"
# Connection info key: the busy timeout (ms) currently set on a SQLite connection.
_BUSY_TIMEOUT_KEY = "sayiir_busy_timeout_ms"

logger = logging.getLogger(__name__)


def _claim_values(
    instance_id: str, task_id: str, worker_id: str, now: datetime, expires_at: datetime | None
) -> dict[str, Any]:
    return {
        "instance_id": instance_id,
        "task_id": task_id,
        "worker_id": worker_id,
        "token": 1,
        "claimed_at": now,
        "expires_at": expires_at,
        "released": False,
    }


def _claim_is_free(now: datetime) -> ColumnElement[bool]:
    """The takeover guard: the stored claim was released or has expired."""
    return or_(
        task_claims.c.released.is_(True),
        and_(task_claims.c.expires_at.is_not(None), task_claims.c.expires_at <= now),
    )


# One backend serves every thread of a worker process, one connection per call in flight.
# A pool smaller than the thread count makes threads queue for connections, and the
# pool's queue is not fair: a busy thread can starve for the whole pool timeout. Ten
# kept open, up to forty under load.
_POOL_OPTIONS: dict[str, Any] = {"pool_pre_ping": True, "pool_size": 10, "max_overflow": 30}


class SqlDialect:
    """Base strategy: the parts shared by the databases with ``INSERT ... ON CONFLICT``."""

    name = "generic"
    skip_locked = True
    # UPDATE ... RETURNING (PostgreSQL, SQLite 3.35+; not MySQL/MariaDB).
    update_returning = True

    # Each statement sees what committed before it started; guards and row locks do the
    # rest. PostgreSQL and InnoDB then behave alike (InnoDB defaults to REPEATABLE READ).
    isolation_level: str | None = "READ COMMITTED"

    def write_gate(self, read_only: bool) -> AbstractContextManager[Any]:
        """Held around each transaction of this backend (a no-op where rows are locked)."""
        return nullcontext()

    def engine_options(self, driver: str, max_payload_bytes: int) -> dict[str, Any]:
        """``create_engine`` options for an engine the backend creates from a URL."""
        return {**_POOL_OPTIONS, "isolation_level": self.isolation_level}

    def check_server(self, conn: Connection, max_payload_bytes: int) -> None:
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

    def now(self) -> ColumnElement[datetime]:
        raise NotImplementedError

    def now_plus(self, ttl: timedelta) -> ColumnElement[datetime]:
        raise NotImplementedError

    def _insert(self) -> Any:
        raise NotImplementedError

    def claim(
        self,
        conn: Connection,
        instance_id: str,
        task_id: str,
        worker_id: str,
        now: datetime,
        expires_at: datetime | None,
    ) -> int | None:
        """Claim if no live claim exists; return the new fencing token or ``None``."""
        key = (instance_id, task_id)
        return self.claim_many(conn, [key], worker_id, now, expires_at).get(key)

    def lock_candidates(
        self,
        conn: Connection,
        keys: list[TaskKey],
        limit: int,
        now: datetime,
        aging_interval: timedelta,
    ) -> list[TaskKey]:
        """Lock the first ``limit`` of ``keys`` (best first) that no one else is claiming.

        One statement: rows locked by other transactions are skipped, not waited for, and
        rows claimed since the candidates were read are left out. PostgreSQL locks rows in
        the ``ORDER BY`` order and stops at the limit, so the best rows are taken first.
        """
        live_claim = exists().where(
            task_claims.c.instance_id == ready_tasks.c.instance_id,
            task_claims.c.task_id == ready_tasks.c.task_id,
            not_(_claim_is_free(now)),
        )
        effective_priority = ready_tasks.c.priority * aging_interval.total_seconds() + func.extract(
            "epoch", ready_tasks.c.updated_at
        )
        rows = conn.execute(
            select(ready_tasks.c.instance_id, ready_tasks.c.task_id)
            .where(
                tuple_(ready_tasks.c.instance_id, ready_tasks.c.task_id).in_(keys),
                not_(live_claim),
            )
            .order_by(
                effective_priority,
                ready_tasks.c.updated_at,
                ready_tasks.c.instance_id,
                ready_tasks.c.task_id,
            )
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return [(row.instance_id, row.task_id) for row in rows]

    def claim_many(
        self,
        conn: Connection,
        keys: list[TaskKey],
        worker_id: str,
        now: datetime,
        expires_at: datetime | None,
    ) -> dict[TaskKey, int]:
        """Claim each of ``keys`` that has no live claim; return the new tokens."""
        if not keys:
            return {}
        statement = self._insert()(task_claims).values(
            [
                _claim_values(instance_id, task_id, worker_id, now, expires_at)
                for instance_id, task_id in keys
            ]
        )
        statement = statement.on_conflict_do_update(
            index_elements=[task_claims.c.instance_id, task_claims.c.task_id],
            set_={
                "worker_id": statement.excluded.worker_id,
                "token": task_claims.c.token + 1,
                "claimed_at": statement.excluded.claimed_at,
                "expires_at": statement.excluded.expires_at,
                "released": False,
            },
            where=_claim_is_free(now),
        ).returning(task_claims.c.instance_id, task_claims.c.task_id, task_claims.c.token)
        return {(row.instance_id, row.task_id): row.token for row in conn.execute(statement)}

    def put_result(
        self, conn: Connection, instance_id: str, task_id: str, output: bytes, now: datetime
    ) -> None:
        """Insert or replace one task result."""
        statement = self._insert()(task_results).values(
            instance_id=instance_id, task_id=task_id, output=output, completed_at=now
        )
        conn.execute(
            statement.on_conflict_do_update(
                index_elements=[task_results.c.instance_id, task_results.c.task_id],
                set_={"output": statement.excluded.output, "completed_at": now},
            )
        )


class PostgresDialect(SqlDialect):
    name = "postgresql"

    def now(self) -> ColumnElement[datetime]:
        # statement_timestamp(): current at each statement, constant within it (now() is
        # frozen at transaction start).
        return type_coerce(func.statement_timestamp(), UtcDateTime())

    def now_plus(self, ttl: timedelta) -> ColumnElement[datetime]:
        return type_coerce(
            func.statement_timestamp() + bindparam(None, ttl, type_=Interval()), UtcDateTime()
        )

    def _insert(self) -> Any:
        return postgresql.insert


class SqliteDialect(SqlDialect):
    """SQLite: one writer at a time, so every transaction begins ``IMMEDIATE``.

    Taking the write lock up front makes a read-then-write transaction atomic across the
    processes sharing the file, and avoids the deadlock-prone lock upgrade of a deferred
    transaction. WAL lets readers of other connections proceed meanwhile.
    """

    name = "sqlite"
    skip_locked = False
    # Timestamps are stored as 'YYYY-MM-DD HH:MM:SS.ffffff' text: the clock expression
    # renders the same shape (millisecond precision, padded) so text comparison is order.
    _FORMAT = "%Y-%m-%d %H:%M:%f"

    isolation_level = None

    def __init__(self, busy_timeout: timedelta) -> None:
        self.busy_timeout_ms = max(0, int(busy_timeout.total_seconds() * 1000))
        self._writer = threading.Lock()
        # The busy timeout left to the calling thread's write transaction (see write_gate).
        self._budget = threading.local()

    def write_gate(self, read_only: bool) -> AbstractContextManager[Any]:
        # SQLite's busy handler polls with growing sleeps, so among many waiting threads a
        # busy one can starve past the busy timeout. Queueing this process's writers on a
        # lock leaves one contender per process for the file lock.
        return nullcontext() if read_only else self._write_turn()

    @contextmanager
    def _write_turn(self) -> Iterator[None]:
        # The busy timeout bounds the whole wait: the queue of this process's writers (all
        # waiting on one lock held elsewhere would otherwise wait one timeout each, in turn)
        # and then the file lock, for what is left (applied by the begin hook).
        started = time.monotonic()
        if not self._writer.acquire(timeout=self.busy_timeout_ms / 1000):
            raise BackendUnavailableError(
                "the SQLite database stayed locked: this process's other writers waited for "
                f"it for the whole busy timeout ({self.busy_timeout_ms} ms)"
            ) from TimeoutError(f"waited {self.busy_timeout_ms} ms for the writer queue")
        try:
            waited_ms = int((time.monotonic() - started) * 1000)
            self._budget.ms = max(1, self.busy_timeout_ms - waited_ms)
            yield
        finally:
            self._budget.ms = None
            self._writer.release()

    def engine_options(self, driver: str, max_payload_bytes: int) -> dict[str, Any]:
        return dict(_POOL_OPTIONS)

    def prepare_engine(self, engine: Engine, *, created: bool) -> Engine:
        busy_timeout_ms = self.busy_timeout_ms

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's begin event, not the driver, decide when transactions start.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms:d}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # Reads need no write lock: in WAL mode they see a consistent snapshot and
            # neither wait for nor block the writer.
            read_only = conn.get_execution_options().get(READ_ONLY_OPTION, False)
            budget_ms = (None if read_only else getattr(self._budget, "ms", None)) or (
                busy_timeout_ms
            )
            # Set per connection only when it changes (a writer that queued, and the next
            # transaction after it): the common case costs no statement.
            if conn.info.get(_BUSY_TIMEOUT_KEY, busy_timeout_ms) != budget_ms:
                conn.exec_driver_sql(f"PRAGMA busy_timeout={budget_ms:d}")
                conn.info[_BUSY_TIMEOUT_KEY] = budget_ms
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        # Pooled connections opened before the hooks existed would miss the pragmas.
        engine.dispose()
        return engine

    def now(self) -> ColumnElement[datetime]:
        return type_coerce(func.strftime(self._FORMAT, "now").concat("000"), UtcDateTime())

    def now_plus(self, ttl: timedelta) -> ColumnElement[datetime]:
        modifier = f"+{ttl.total_seconds():.6f} seconds"
        return type_coerce(
            func.strftime(self._FORMAT, "now", modifier).concat("000"), UtcDateTime()
        )

    def _insert(self) -> Any:
        return sqlite.insert

    def lock_candidates(
        self,
        conn: Connection,
        keys: list[TaskKey],
        limit: int,
        now: datetime,
        aging_interval: timedelta,
    ) -> list[TaskKey]:
        # The transaction holds the database's write lock: the candidates just read are
        # exactly what is available, and nobody else can claim them before we commit.
        return keys[:limit]


class MySqlDialect(SqlDialect):
    """MySQL 8 / MariaDB 10.6+: no ``ON CONFLICT ... WHERE`` and no ``UPDATE ... RETURNING``.

    A claim is a guarded ``UPDATE`` (takeover of a released or expired claim) and, when no
    row exists yet, an ``INSERT IGNORE`` (the primary key lets one concurrent inserter
    win). ``ON DUPLICATE KEY UPDATE`` is avoided for claims: its assignments run left to
    right, so a guard cannot see the row as it was before the first assignment.
    """

    name = "mysql"
    update_returning = False

    @staticmethod
    def packet_bytes(max_payload_bytes: int) -> int:
        # A payload travels escaped inside the statement text: up to twice its size.
        return 2 * max_payload_bytes + 1024 * 1024

    def engine_options(self, driver: str, max_payload_bytes: int) -> dict[str, Any]:
        options = super().engine_options(driver, max_payload_bytes)
        if driver == "pymysql":
            # PyMySQL refuses to send packets above 16 MiB unless told otherwise.
            options["connect_args"] = {"max_allowed_packet": self.packet_bytes(max_payload_bytes)}
        return options

    def check_server(self, conn: Connection, max_payload_bytes: int) -> None:
        allowed = conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one()
        needed = self.packet_bytes(max_payload_bytes)
        if int(allowed) < needed:
            logger.warning(
                "MySQL max_allowed_packet is %s bytes: payloads near max_payload_bytes=%s "
                "need %s; raise it (SET GLOBAL max_allowed_packet=%s) or lower "
                "max_payload_bytes",
                allowed,
                max_payload_bytes,
                needed,
                needed,
            )

    def now(self) -> ColumnElement[datetime]:
        return type_coerce(func.utc_timestamp(6), UtcDateTime())

    def now_plus(self, ttl: timedelta) -> ColumnElement[datetime]:
        microseconds = ttl // timedelta(microseconds=1)
        return type_coerce(
            func.timestampadd(literal_column("MICROSECOND"), microseconds, func.utc_timestamp(6)),
            UtcDateTime(),
        )

    def claim(
        self,
        conn: Connection,
        instance_id: str,
        task_id: str,
        worker_id: str,
        now: datetime,
        expires_at: datetime | None,
    ) -> int | None:
        key = and_(task_claims.c.instance_id == instance_id, task_claims.c.task_id == task_id)
        takeover = conn.execute(
            update(task_claims)
            .where(key, _claim_is_free(now))
            .values(
                worker_id=worker_id,
                token=task_claims.c.token + 1,
                claimed_at=now,
                expires_at=expires_at,
                released=False,
            )
        )
        if takeover.rowcount == 0:
            inserted = conn.execute(
                insert(task_claims)
                .prefix_with("IGNORE")
                .values(_claim_values(instance_id, task_id, worker_id, now, expires_at))
            )
            if inserted.rowcount == 0:
                return None
        # Our own row, locked by the write above: read-your-writes gives the token.
        token: int = conn.execute(select(task_claims.c.token).where(key)).scalar_one()
        return token

    def lock_candidates(
        self,
        conn: Connection,
        keys: list[TaskKey],
        limit: int,
        now: datetime,
        aging_interval: timedelta,
    ) -> list[TaskKey]:
        # InnoDB locks the rows it reads before sorting and limiting, so a batch lock would
        # hold every candidate: lock one primary key at a time, best first, instead.
        locked: list[TaskKey] = []
        for instance_id, task_id in keys:
            if len(locked) == limit:
                break
            row = conn.execute(
                select(ready_tasks.c.task_id)
                .where(ready_tasks.c.instance_id == instance_id, ready_tasks.c.task_id == task_id)
                .with_for_update(skip_locked=True)
            ).first()
            if row is not None:
                locked.append((instance_id, task_id))
        return locked

    def claim_many(
        self,
        conn: Connection,
        keys: list[TaskKey],
        worker_id: str,
        now: datetime,
        expires_at: datetime | None,
    ) -> dict[TaskKey, int]:
        tokens = {}
        for instance_id, task_id in keys:
            token = self.claim(conn, instance_id, task_id, worker_id, now, expires_at)
            if token is not None:
                tokens[instance_id, task_id] = token
        return tokens

    def put_result(
        self, conn: Connection, instance_id: str, task_id: str, output: bytes, now: datetime
    ) -> None:
        statement = mysql.insert(task_results).values(
            instance_id=instance_id, task_id=task_id, output=output, completed_at=now
        )
        conn.execute(
            statement.on_duplicate_key_update(
                output=statement.inserted.output, completed_at=statement.inserted.completed_at
            )
        )


def dialect_for(name: str, *, sqlite_busy_timeout: timedelta) -> SqlDialect:
    """The strategy for a SQLAlchemy dialect name; ``ValueError`` if it is not supported."""
    if name == "postgresql":
        return PostgresDialect()
    if name in MYSQL_DIALECTS:
        return MySqlDialect()
    if name == "sqlite":
        return SqliteDialect(sqlite_busy_timeout)
    raise ValueError(
        f"unsupported database dialect {name!r}: use PostgreSQL, MySQL/MariaDB or SQLite"
    )
