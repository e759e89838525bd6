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
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    CompoundSelect,
    Connection,
    Engine,
    Interval,
    Select,
    String,
    and_,
    bindparam,
    event,
    func,
    insert,
    literal_column,
    or_,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite

from ..errors import BackendUnavailableError
from .errors import RetryableConflict
from .schema import ready_tasks, task_claims, task_results
from .types import MYSQL_DIALECTS, UtcDateTime

TaskKey = tuple[str, str]

# Connection execution option marking a transaction that only reads.
READ_ONLY_OPTION = "sayiir_read_only"
# Connection info key: the busy timeout (ms) currently set on a SQLite connection.
_BUSY_TIMEOUT_KEY = "sayiir_busy_timeout_ms"

logger = logging.getLogger(__name__)


# A locked candidate and whether a claim row exists for it (None: not known).
Locked = Mapping[TaskKey, bool | None]


def _claim_parameters(
    keys: list[TaskKey], worker_id: str, now: datetime, expires_at: datetime | None
) -> list[dict[str, Any]]:
    return [
        {
            "p_instance_id": instance_id,
            "p_task_id": task_id,
            "p_worker_id": worker_id,
            "p_now": now,
            "p_expires_at": expires_at,
        }
        for instance_id, task_id in keys
    ]


def _new_claim() -> dict[str, Any]:
    """The values of a first claim, bound by :func:`_claim_parameters`."""
    return {
        "instance_id": bindparam("p_instance_id"),
        "task_id": bindparam("p_task_id"),
        "worker_id": bindparam("p_worker_id"),
        "token": 1,
        "claimed_at": bindparam("p_now"),
        "expires_at": bindparam("p_expires_at"),
        "released": False,
    }


def _claim_is_free(now: ColumnElement[datetime]) -> ColumnElement[bool]:
    """The takeover guard: the stored claim was released or has expired at ``now``."""
    return or_(
        task_claims.c.released.is_(True),
        and_(task_claims.c.expires_at.is_not(None), task_claims.c.expires_at <= now),
    )


def _new_result() -> dict[str, Any]:
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


# One backend serves every thread of a worker process, one connection per call in flight.
# A pool smaller than the thread count makes threads queue for connections, and the
# pool's queue is not fair: a busy thread can starve for the whole pool timeout. Ten
# kept open, up to forty under load.
# No pool_pre_ping: its round trip at every checkout cost 5-15 % of a short call; a
# connection found dead is replaced by SqlBackend._transaction instead.
_POOL_OPTIONS: dict[str, Any] = {"pool_size": 10, "max_overflow": 30}


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

    def __init__(self) -> None:
        # Built once: building SQLAlchemy statements costs more client CPU than running
        # their cached compiled form. Values are bound at each call.
        self._claim_statement = self._build_claim()
        self._put_result_statement = self._build_put_result()

    def now(self) -> ColumnElement[datetime]:
        """The database clock."""
        raise NotImplementedError

    def now_plus_ttl(self) -> ColumnElement[datetime]:
        """The database clock plus the TTL bound as ``p_ttl`` (see :meth:`ttl_parameter`)."""
        raise NotImplementedError

    def ttl_parameter(self, ttl: timedelta) -> Any:
        """The value of ``p_ttl`` for a TTL."""
        return ttl

    def _insert(self) -> Any:
        raise NotImplementedError

    def _build_claim(self) -> Any:
        """Insert a first claim or take over a free one, in one guarded statement.

        Run with a list of parameter sets (SQLAlchemy sends them in one multi-row statement
        and gathers the ``RETURNING`` rows); a row whose claim is live returns nothing.
        """
        statement = self._insert()(task_claims).values(_new_claim())
        return statement.on_conflict_do_update(
            index_elements=[task_claims.c.instance_id, task_claims.c.task_id],
            set_={
                "worker_id": statement.excluded.worker_id,
                "token": task_claims.c.token + 1,
                "claimed_at": statement.excluded.claimed_at,
                "expires_at": statement.excluded.expires_at,
                "released": False,
            },
            # excluded.claimed_at is this claim's "now", the clock the guard must use.
            where=_claim_is_free(statement.excluded.claimed_at),
        ).returning(task_claims.c.instance_id, task_claims.c.task_id, task_claims.c.token)

    def _build_put_result(self) -> Any:
        statement = self._insert()(task_results).values(_new_result())
        return statement.on_conflict_do_update(
            index_elements=[task_results.c.instance_id, task_results.c.task_id],
            set_={
                "output": statement.excluded.output,
                "completed_at": statement.excluded.completed_at,
            },
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
        """Claim if no live claim exists; return the new fencing token or ``None``."""
        key = (instance_id, task_id)
        return self.claim_many(conn, {key: None}, worker_id, now, expires_at).get(key)

    def find_and_lock_query(self, candidates: CompoundSelect[Any]) -> Select[Any] | None:
        """One statement that finds, orders and locks the best candidates, where the
        database can (``None``: :meth:`lock_candidates` locks what ``candidates`` found)."""
        return None

    def lock_candidates(self, conn: Connection, keys: list[TaskKey], limit: int) -> Locked:
        """Lock the first ``limit`` of ``keys`` (best first) that no one else is claiming;
        each with whether its claim row exists, where the lock tells (else ``None``)."""
        raise NotImplementedError

    def claim_many(
        self,
        conn: Connection,
        locked: Locked,
        worker_id: str,
        now: datetime,
        expires_at: datetime | None,
    ) -> dict[TaskKey, int]:
        """Claim each locked key that has no live claim; return the new tokens."""
        if not locked:
            return {}
        rows = conn.execute(
            self._claim_statement, _claim_parameters(list(locked), worker_id, now, expires_at)
        )
        return {(row.instance_id, row.task_id): row.token for row in rows}

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


class PostgresDialect(SqlDialect):
    name = "postgresql"

    def now(self) -> ColumnElement[datetime]:
        # statement_timestamp(): current at each statement, constant within it (now() is
        # frozen at transaction start).
        return type_coerce(func.statement_timestamp(), UtcDateTime())

    def now_plus_ttl(self) -> ColumnElement[datetime]:
        return type_coerce(
            func.statement_timestamp() + bindparam("p_ttl", type_=Interval()), UtcDateTime()
        )

    def _insert(self) -> Any:
        return postgresql.insert

    def find_and_lock_query(self, candidates: CompoundSelect[Any]) -> Select[Any] | None:
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
        super().__init__()
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

    def now_plus_ttl(self) -> ColumnElement[datetime]:
        modifier = bindparam("p_ttl", type_=String())
        return type_coerce(
            func.strftime(self._FORMAT, "now", modifier).concat("000"), UtcDateTime()
        )

    def ttl_parameter(self, ttl: timedelta) -> Any:
        return f"+{ttl.total_seconds():.6f} seconds"

    def _insert(self) -> Any:
        return sqlite.insert

    def lock_candidates(self, conn: Connection, keys: list[TaskKey], limit: int) -> Locked:
        # The transaction holds the database's write lock: the candidates just read are
        # exactly what is available, and nobody else can claim them before we commit.
        return dict.fromkeys(keys[:limit])


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
        # The pool's reset of a returned connection is a ROLLBACK round trip on MySQL drivers
        # (PostgreSQL's and SQLite's skip it when no transaction is open). Every transaction
        # of the backend has ended by then (committed, or rolled back by SQLAlchemy's
        # Connection.close()), so it would only cost one more round trip per call.
        options["pool_reset_on_return"] = None
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

    def __init__(self) -> None:
        super().__init__()
        # The takeover of a released or expired claim; LAST_INSERT_ID(expr) hands the new
        # token back in the OK packet, where the driver reports it (no read-back).
        self._takeover_statement = (
            update(task_claims)
            .where(claim_key(), _claim_is_free(bindparam("p_now")))
            .values(
                worker_id=bindparam("p_worker_id"),
                token=func.last_insert_id(task_claims.c.token + 1),
                claimed_at=bindparam("p_now"),
                expires_at=bindparam("p_expires_at"),
                released=False,
            )
        )
        self._token_statement = select(task_claims.c.token).where(claim_key())
        # Lock the given ready rows (skipping those another transaction holds) and read
        # the token of their claim rows, if any. The keys are primary keys: InnoDB reads, so
        # locks, exactly those rows. The subquery is a plain read (a locking read does not
        # extend to subqueries): a claim row locked elsewhere is read, not waited for nor
        # skipped; the takeover's guarded UPDATE waits for it.
        claim_token = (
            select(task_claims.c.token)
            .where(
                task_claims.c.instance_id == ready_tasks.c.instance_id,
                task_claims.c.task_id == ready_tasks.c.task_id,
            )
            .scalar_subquery()
        )
        self._lock_statement = (
            select(ready_tasks.c.instance_id, ready_tasks.c.task_id, claim_token.label("token"))
            .where(
                tuple_(ready_tasks.c.instance_id, ready_tasks.c.task_id).in_(
                    bindparam("p_keys", expanding=True)
                )
            )
            .with_for_update(skip_locked=True)
        )

    def now(self) -> ColumnElement[datetime]:
        return type_coerce(func.utc_timestamp(6), UtcDateTime())

    def now_plus_ttl(self) -> ColumnElement[datetime]:
        return type_coerce(
            func.timestampadd(
                literal_column("MICROSECOND"),
                bindparam("p_ttl", type_=BigInteger()),
                func.utc_timestamp(6),
            ),
            UtcDateTime(),
        )

    def ttl_parameter(self, ttl: timedelta) -> Any:
        return ttl // timedelta(microseconds=1)

    def _build_claim(self) -> Any:
        # First claims only: the primary key lets one concurrent inserter win.
        return insert(task_claims).prefix_with("IGNORE").values(_new_claim())

    def _build_put_result(self) -> Any:
        statement = mysql.insert(task_results).values(_new_result())
        return statement.on_duplicate_key_update(
            output=statement.inserted.output, completed_at=statement.inserted.completed_at
        )

    def _take_over(self, conn: Connection, parameters: dict[str, Any]) -> int | None:
        """Take over a released or expired claim; its new token, or ``None``."""
        taken = conn.execute(self._takeover_statement, parameters)
        if taken.rowcount != 1:
            return None
        token = taken.lastrowid
        if not token:  # a driver that does not report LAST_INSERT_ID: our locked row
            token = conn.execute(self._token_statement, parameters).scalar_one()
        return int(token)

    def claim(
        self,
        conn: Connection,
        instance_id: str,
        task_id: str,
        worker_id: str,
        now: datetime,
        expires_at: datetime | None,
    ) -> int | None:
        [parameters] = _claim_parameters([(instance_id, task_id)], worker_id, now, expires_at)
        token = self._take_over(conn, parameters)
        if token is not None:
            return token
        inserted = conn.execute(self._claim_statement, parameters)
        return 1 if inserted.rowcount == 1 else None

    def lock_candidates(self, conn: Connection, keys: list[TaskKey], limit: int) -> Locked:
        # InnoDB locks every row a locking read visits before sorting and limiting, so the
        # candidates are not locked with ORDER BY ... LIMIT: lock the best ``limit`` keys by
        # primary key, and as many of the next ones as rows were skipped, until enough.
        locked: dict[TaskKey, bool] = {}
        tried = 0
        while len(locked) < limit and tried < len(keys):
            batch = keys[tried : tried + limit - len(locked)]
            tried += len(batch)
            rows = conn.execute(self._lock_statement, {"p_keys": batch})
            locked.update(((row.instance_id, row.task_id), row.token is not None) for row in rows)
        return {key: locked[key] for key in keys[:tried] if key in locked}

    def claim_many(
        self,
        conn: Connection,
        locked: Locked,
        worker_id: str,
        now: datetime,
        expires_at: datetime | None,
    ) -> dict[TaskKey, int]:
        tokens: dict[TaskKey, int] = {}
        # First claims, the usual case, in one multi-row INSERT IGNORE. The ready-row
        # locks we hold keep other claimers out, so every one of them must go in.
        first = [key for key, has_claim in locked.items() if has_claim is False]
        if first:
            parameters = _claim_parameters(first, worker_id, now, expires_at)
            inserted = conn.execute(self._claim_statement, parameters).rowcount
            if inserted != len(first):
                # A claim row read as absent exists (committed in the instant between the
                # read and the lock): which rows went in is unknown, so undo all and run the
                # transaction again.
                raise RetryableConflict(
                    f"{len(first) - inserted} of {len(first)} first claims already existed"
                )
            tokens.update(dict.fromkeys(first, 1))
        for key, has_claim in locked.items():
            if has_claim is False:
                continue
            if has_claim:  # a free claim row (a live one was not a candidate): take it over
                [takeover] = _claim_parameters([key], worker_id, now, expires_at)
                token = self._take_over(conn, takeover)
            else:
                token = self.claim(conn, *key, worker_id, now, expires_at)
            if token is not None:
                tokens[key] = token
        return tokens


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
