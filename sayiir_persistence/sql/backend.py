"""``SqlBackend``: the contract on SQLAlchemy Core, for PostgreSQL, MySQL/MariaDB and SQLite.

Concurrency rules every method follows (see also ``dialects.py``):

- Each call is one transaction at READ COMMITTED (SQLite: ``BEGIN IMMEDIATE``).
- A write that changes a workflow's status, position or results first locks its row in
  ``sayiir_workflows``; writers of the same instance therefore run one after another.
- Locks are always taken in the order workflow row -> ready-task rows -> claim rows, so
  two calls never wait on each other in a cycle (renewals and releases too: they touch the
  ready row's claim hint before the claim row). Remaining deadlocks, serialization or
  certification failures are retried up to ``max_retries`` attempts, with a random pause
  that doubles at each one.
- A claim is only ever taken by a write whose own ``WHERE`` proves the old claim is
  released or expired (judged by the database clock), never on the strength of an
  earlier read.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    URL,
    ColumnElement,
    Connection,
    Engine,
    Row,
    and_,
    bindparam,
    create_engine,
    delete,
    exists,
    insert,
    select,
    update,
)
from sqlalchemy import exc as sa_exc

from .. import transitions
from ..attempts import claim_times, effective_ttl, past_deadline
from ..backend import PersistentBackend
from ..errors import (
    BackendUnavailableError,
    CannotPauseError,
    ClaimLostError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    WorkflowTerminalError,
)
from ..idempotency import check_consume_repeat, check_save_repeat, check_send_repeat
from ..model import (
    AtFork,
    AvailableTask,
    ClaimedTask,
    CompletionResult,
    IfExists,
    SignalKind,
    SignalRequest,
    TaskClaim,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
    position_task_ids,
)
from ..ordering import availability_key
from ..stats import StoreStats
from ..telemetry.tracing import traced
from ..urls import is_in_memory_sqlite, mask_url, parse_url
from ..validation import DEFAULT_MAX_PAYLOAD_BYTES, check_limit
from ..wakeups import WorkSignal, WorkWaiter
from . import codec, keyed
from .completing import CompletionStatements, complete_tasks
from .deleting import delete_attached
from .dialects import (
    READ_ONLY_OPTION,
    ClaimTerms,
    Granted,
    Locked,
    TaskKey,
    TokenFloors,
    dialect_for,
)
from .dialects.base import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    Timeouts,
    claimed_until,
)
from .errors import RetryableConflict, translated_errors
from .listening import PostgresWorkWaiter, listens
from .overdue import OverdueStatements, fail_overdue
from .pruning import PruneStatements, prune_workflows
from .rows import (
    POSITION,
    SIGNAL_KIND,
    STATUS,
    TAGS,
    available_task_from_row,
    creation_values,
    granted_claim,
    new_results,
    ready_rows,
    snapshot_from_row,
    workflow_values,
)
from .schema import (
    KEY_TABLES,
    events,
    ready_tasks,
    signals,
    task_claims,
    task_results,
    workflow_tags,
    workflows,
)
from .statements import Statements
from .stats import StatsStatements, read_stats
from .watchdog import CallWatchdog

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Rounds of find-and-claim in one claim call while available tasks are all taken by others
# before they can be locked (see SqlBackend._claim_available_tasks).
_LOCK_ATTEMPTS = 3

# The pause before a transaction runs again after a lost conflict (deadlock, serialization or
# Galera certification failure) is drawn from a window of this many seconds, doubled at each
# attempt up to the cap (see SqlBackend._conflict_pause).
CONFLICT_PAUSE_BASE = 0.01
CONFLICT_PAUSE_CAP = 0.5


class _RestartTransaction(Exception):
    """Two first saves of one instance raced; run the transaction again (it now updates)."""


class _Rollback(Exception):
    """Roll the transaction back and return ``value`` from the call."""

    def __init__(self, value: Any) -> None:
        self.value = value


@dataclass(frozen=True)
class _Stored:
    """What a write needs to know of the locked workflow row."""

    version: int
    status: WorkflowStatus
    tags: frozenset[str]
    now: datetime


def _connection_lost(error: BackendUnavailableError) -> bool:
    cause = error.__cause__
    return isinstance(cause, sa_exc.DBAPIError) and cause.connection_invalidated


def _timeouts(connect_timeout: timedelta, call_timeout: timedelta | None) -> Timeouts:
    """The backend's timeouts, checked.

    Raises:
        InvalidInputError: a timeout that is not a positive ``timedelta``.
    """
    for name, value in (("connect_timeout", connect_timeout), ("call_timeout", call_timeout)):
        if value is None and name == "call_timeout":
            continue
        if not isinstance(value, timedelta) or value <= timedelta(0):
            raise InvalidInputError(f"{name} must be a positive timedelta, got {value!r}")
    return Timeouts(connect=connect_timeout, call=call_timeout)


def _merged_options(defaults: dict[str, object], given: dict[str, Any]) -> dict[str, Any]:
    """``create_engine`` options: the caller's over the defaults, ``connect_args`` merged
    key by key (the caller's win)."""
    merged = {**defaults, **given}
    if "connect_args" in defaults and "connect_args" in given:
        merged["connect_args"] = {**defaults["connect_args"], **given["connect_args"]}  # type: ignore[dict-item]
    return merged


def _backend_url(engine_or_url: Engine | URL | str) -> URL:
    if isinstance(engine_or_url, Engine):
        return engine_or_url.url
    url = parse_url(engine_or_url)
    if is_in_memory_sqlite(url):
        raise InvalidInputError(
            "engine_or_url names an in-memory SQLite database: every connection would see "
            "its own empty database; use a file (sqlite:///path/to/file.db)"
        )
    return url


class SqlBackend(PersistentBackend):
    """The contract on any SQLAlchemy 2 engine: PostgreSQL, MySQL/MariaDB, SQLite.

    Thread-safe: share one instance between all the threads of a process; each call uses
    its own pooled connection and transaction. Several processes (and machines) may use
    the same database at once. A pooled connection found dead (a restarted server) is
    replaced without the caller noticing: the transaction, which committed nothing, runs
    again once on a new connection.

    Args:
        engine_or_url: an ``Engine``, or a URL (``str`` or ``URL``) from which an engine
            is created (and disposed by :meth:`close`). For SQLite,
            hooks are added to the engine (WAL, busy timeout, ``BEGIN IMMEDIATE``); use a
            file database, not ``:memory:``.
        max_payload_bytes: see :class:`PersistentBackend`.
        check_schema: connect now and raise ``SchemaError`` if the database is not at the
            head revision of the migrations (``False``: connect lazily, on first use).
        sqlite_busy_timeout: how long a SQLite write waits for the file lock before
            ``BackendUnavailableError``.
        max_retries: attempts of a transaction that hit a deadlock, serialization or
            certification failure; between them a random pause from a window that doubles
            from 10 ms up to 0.5 s, all within the call timeout.
        connect_timeout: how long opening a connection may take (PostgreSQL and MySQL;
            default 10 s: milliseconds on a LAN, well under a second across regions, room
            for a server busy authenticating a burst of connections). libpq counts it for
            the whole set-up (at least 2 s); PyMySQL for the TCP connect and each read of
            the handshake.
        call_timeout: the longest a call waits for the database, all of it (waiting for a
            pooled connection, statements, ``COMMIT``, its own retries) before it raises
            ``BackendUnavailableError``; a call that must also open a connection may take
            ``connect_timeout`` more (default 60 s: every call is one short transaction,
            whose longest legitimate forms, such as a 16 MiB payload or a large prune batch,
            take seconds; ``None``: no bound). Enforced by a watchdog thread of the backend
            that closes the connection of an overdue call (libpq has no read timeout), and
            by the server too: the session's statement and idle-in-transaction timeouts
            (PostgreSQL ``statement_timeout`` and ``idle_in_transaction_session_timeout``,
            MariaDB ``max_statement_time`` and ``idle_transaction_timeout``) are set to it,
            so that the server ends a transaction whose client gave up. The outcome of a
            write that timed out is unknown, as after any ``BackendUnavailableError``.
            SQLite, a local file, has no network to wait on: its writes wait for the lock
            at most ``sqlite_busy_timeout``.
        **engine_options: passed to ``create_engine`` when a URL is given, over the
            defaults (``pool_size=10, max_overflow=30``, ``pool_timeout`` the call timeout,
            and the driver's timeouts and TCP keepalives in ``connect_args``; keep the pool
            at least as large as the number of threads sharing the backend). Your own
            ``connect_args``, and parameters in the URL's query, win over the defaults (a
            PostgreSQL URL's ``options`` are appended to the backend's, so that theirs win).
            With your own ``Engine``, set the driver's timeouts in it: the backend then
            applies only ``call_timeout``'s watchdog.

    Raises:
        SchemaError: the database is not provisioned or behind (``check_schema``).
        BackendUnavailableError: the database cannot be reached.
        InvalidInputError: the URL is malformed or names an unsupported database.
    """

    def __init__(
        self,
        engine_or_url: Engine | URL | str,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        check_schema: bool = True,
        sqlite_busy_timeout: timedelta = timedelta(seconds=30),
        max_retries: int = 10,
        connect_timeout: timedelta = DEFAULT_CONNECT_TIMEOUT,
        call_timeout: timedelta | None = DEFAULT_CALL_TIMEOUT,
        **engine_options: Any,
    ) -> None:
        super().__init__(max_payload_bytes=max_payload_bytes)
        timeouts = _timeouts(connect_timeout, call_timeout)
        self._owns_engine = not isinstance(engine_or_url, Engine)
        url = _backend_url(engine_or_url)
        self._where = mask_url(url)
        try:
            self._dialect = dialect_for(
                url.get_backend_name(), sqlite_busy_timeout=sqlite_busy_timeout
            )
        except ValueError as error:
            raise InvalidInputError(str(error)) from None
        self._max_retries = max_retries
        self._sql = Statements(self._dialect)
        # Set by a transaction that announced work (see _announce), per calling thread.
        self._announcing = threading.local()
        # Every backend object on this database in this process wakes the same waiters.
        self._work_signal = WorkSignal.of(url.render_as_string(hide_password=False))
        self._completion_sql = CompletionStatements(self._dialect)
        self._prune_sql = PruneStatements()
        self._overdue_sql = OverdueStatements(self._dialect)
        self._stats_sql = StatsStatements(self._dialect)
        self._keyed_sql = keyed.KeyedStatements()
        with translated_errors(self._where, type(self._dialect)):
            if isinstance(engine_or_url, Engine):
                engine = engine_or_url
            else:
                try:
                    options = self._dialect.engine_options(url, max_payload_bytes, timeouts)
                    engine = create_engine(url, **_merged_options(options, engine_options))
                except (sa_exc.NoSuchModuleError, ImportError) as error:
                    raise InvalidInputError(
                        f"no driver for {self._where}: {error} (install the matching extra, "
                        "e.g. sayiir-persistence[postgres] or [mysql])"
                    ) from None
            self._engine = self._dialect.prepare_engine(engine, created=self._owns_engine)
            self._call_timeout = call_timeout
            self._watchdog = (
                CallWatchdog(call_timeout.total_seconds(), self._where)
                if call_timeout is not None and self._dialect.watches_calls
                else None
            )
            if check_schema:
                self._check_database(max_payload_bytes)

    @property
    def engine(self) -> Engine:
        """The engine in use (with the backend's execution options)."""
        return self._engine

    @property
    def _db_system(self) -> str:
        """The dialect's name: ``postgresql``, ``mysql`` (MariaDB too) or ``sqlite``."""
        return self._engine.dialect.name

    def __repr__(self) -> str:
        return f"SqlBackend({self._where!r})"

    def close(self) -> None:
        """Dispose of the connection pool if this backend created the engine."""
        if self._watchdog is not None:
            self._watchdog.close()
        if self._owns_engine:
            self._engine.dispose()

    def _check_database(self, max_payload_bytes: int) -> None:
        """The start-up checks (schema at head, server settings), on one watched connection."""
        from ..provisioning import check_schema as _check_schema

        deadline = self._deadline()
        # A read: on SQLite it must not wait for (nor take) the write lock.
        engine = self._engine.execution_options(**{READ_ONLY_OPTION: True})
        # Translated as the schema check's own connect was: a refused connection is
        # "cannot connect to ...", the message operators see from the CLI at start-up.
        with translated_errors(self._where, type(self._dialect), action="check the schema of"):
            conn = engine.connect()
        with conn, self._watched(conn, deadline):
            _check_schema(conn)
            self._dialect.check_server(conn, max_payload_bytes)

    # -- transactions ------------------------------------------------------------------------

    def _transaction(self, work: Callable[[Connection], T], *, read_only: bool = False) -> T:
        """Run ``work`` in one transaction, retrying deadlocks and first-save races, and
        once on a new connection if the connection is found dead before ``COMMIT``; all of
        it within the call timeout (see :meth:`_watched`)."""
        deadline = self._deadline()
        attempt = 0
        reconnected = False
        while True:
            attempt += 1
            committing = False
            self._announcing.pending = False
            try:
                with (
                    self._dialect.write_gate(read_only),
                    translated_errors(self._where, type(self._dialect), retries=True),
                    self._engine.connect().execution_options(
                        **{READ_ONLY_OPTION: read_only}
                    ) as conn,
                    self._watched(conn, deadline),
                    conn.begin() as transaction,
                ):
                    try:
                        result = work(conn)
                    except _Rollback as rollback:
                        transaction.rollback()
                        return rollback.value  # type: ignore[no-any-return]
                    committing = True  # leaving the block sends COMMIT
                if self._announcing.pending:
                    self._announce_work()  # committed: wake this process's idle workers
                return result
            except (RetryableConflict, _RestartTransaction) as conflict:
                if isinstance(conflict, RetryableConflict):
                    self._dialect.lost_conflict()
                if attempt >= self._max_retries or self._overdue(deadline):
                    raise BackendUnavailableError(
                        f"gave up after {attempt} attempts on {self._where}: {conflict}"
                    ) from conflict
                logger.info("retrying transaction after %s (attempt %d)", conflict, attempt)
                time.sleep(self._conflict_pause(attempt, deadline))
            except BackendUnavailableError as error:
                if self._overdue(deadline):
                    # The watchdog (or the driver's own read timeout, or the server's
                    # statement timeout) ended the call: its time is spent, no retry.
                    raise BackendUnavailableError(
                        f"no answer from {self._where} within the call timeout "
                        f"({self._call_timeout}): {error}"
                    ) from error.__cause__
                # A connection that died before COMMIT was sent (typically one that died
                # idle in the pool: a restarted server) committed nothing, the server rolls
                # it back: run the transaction again on a fresh connection, once. The pool
                # then replaces its other connections of that age. This replaces a
                # pre-ping round trip at every checkout. A COMMIT whose answer was lost is
                # never run again: its outcome is unknown.
                if committing or reconnected or not _connection_lost(error):
                    raise
                reconnected = True
                logger.info("connection to %s lost before COMMIT; running again", self._where)

    @staticmethod
    def _conflict_pause(attempt: int, deadline: float | None) -> float:
        """Seconds to wait before running a transaction again after its ``attempt``-th lost
        conflict: a random share of a window that doubles with each attempt (full jitter),
        so that the transactions that collided spread out instead of colliding again in
        step; never past the call's deadline."""
        window = min(CONFLICT_PAUSE_CAP, CONFLICT_PAUSE_BASE * 2 ** (attempt - 1))
        pause = random.uniform(0, window)
        if deadline is not None:
            pause = max(0.0, min(pause, deadline - time.monotonic()))
        return pause

    def _deadline(self) -> float | None:
        """When a call starting now must have ended (``time.monotonic()``), if bounded
        (not on SQLite: no network, its busy timeout bounds the waits)."""
        if self._call_timeout is None or self._watchdog is None:
            return None
        return time.monotonic() + self._call_timeout.total_seconds()

    @staticmethod
    def _overdue(deadline: float | None) -> bool:
        return deadline is not None and time.monotonic() >= deadline

    def _watched(self, conn: Connection, deadline: float | None) -> AbstractContextManager[Any]:
        """Bound the use of ``conn`` by ``deadline``: past it, the watchdog shuts its
        socket down, and the driver, blocked or not, fails at once (lost connection)."""
        return self._watched_socket(conn.connection.dbapi_connection, deadline)

    def _watched_socket(
        self, dbapi_connection: Any, deadline: float | None
    ) -> AbstractContextManager[Any]:
        if self._watchdog is None or deadline is None:
            return nullcontext()
        fd = self._dialect.socket_of(dbapi_connection)
        if fd is None:
            return nullcontext()
        return self._watchdog.watch(fd, deadline)

    def _bounded_call(self, dbapi_connection: Any) -> AbstractContextManager[Any]:
        """A call on a DBAPI connection of the backend's engine outside :meth:`_transaction`
        (the work waiter's ``LISTEN``), bounded by the call timeout from now."""
        return self._watched_socket(dbapi_connection, self._deadline())

    def _announce(self, conn: Connection) -> None:
        """The transaction in ``conn`` makes a task runnable that nobody claimed with it:
        wake idle workers once it commits (this process's, and on PostgreSQL every one)."""
        self._announcing.pending = True
        self._dialect.announce_work(conn)

    def work_waiter(self) -> WorkWaiter:
        """See :meth:`PersistentBackend.work_waiter`. On PostgreSQL (psycopg2 or psycopg 3)
        the waiter listens on its own connection for every process's announcements."""
        if listens(self._engine):
            return PostgresWorkWaiter(self._engine, bounded=self._bounded_call)
        return super().work_waiter()

    # -- shared statements -------------------------------------------------------------------

    def _lock_row(self, conn: Connection, instance_id: str) -> Row[Any] | None:
        """Lock the workflow row; its version, status, tags and the database clock, as
        stored (not decoded: a caller that only needs to know it exists works on a row
        that cannot be decoded too)."""
        return conn.execute(self._sql.lock_state, {"p_instance_id": instance_id}).first()

    def _lock_state(self, conn: Connection, instance_id: str) -> _Stored | None:
        row = self._lock_row(conn, instance_id)
        if row is None:
            return None
        status = codec.decode_column(instance_id, STATUS, codec.decode_status, row.status)
        tags = codec.decode_column(instance_id, TAGS, codec.decode_tags, row.tags)
        return _Stored(row.version, status, tags, row.now)

    def _lock_state_or_raise(self, conn: Connection, instance_id: str) -> _Stored:
        stored = self._lock_state(conn, instance_id)
        if stored is None:
            raise NotFoundError(f"workflow instance {instance_id!r} not found")
        return stored

    def _lock_snapshot(
        self, conn: Connection, instance_id: str
    ) -> tuple[WorkflowSnapshot, _Stored]:
        row = conn.execute(self._sql.lock_snapshot, {"p_instance_id": instance_id}).first()
        if row is None:
            raise NotFoundError(f"workflow instance {instance_id!r} not found")
        snapshot = snapshot_from_row(row, self._results(conn, instance_id))
        stored = _Stored(snapshot.version, snapshot.status, snapshot.tags, row.now)
        return snapshot, stored

    def _results(self, conn: Connection, instance_id: str) -> dict[str, bytes]:
        rows = conn.execute(self._sql.results, {"p_instance_id": instance_id})
        return {row.task_id: row.output for row in rows}

    def _exists(self, conn: Connection, instance_id: str) -> bool:
        row = conn.execute(self._sql.exists, {"p_instance_id": instance_id}).first()
        return row is not None

    @staticmethod
    def _refuse_terminal(stored: _Stored | None, instance_id: str) -> None:
        if stored is not None and stored.status.is_terminal:
            raise WorkflowTerminalError(f"workflow {instance_id!r} is {stored.status.value}")

    def _clear_ready(self, conn: Connection, instance_id: str) -> None:
        conn.execute(self._sql.clear_ready_tasks, {"p_instance_id": instance_id})

    def _write_snapshot(
        self,
        conn: Connection,
        snapshot: WorkflowSnapshot,
        stored: _Stored | None,
        now: datetime,
        *,
        ready_cleared: bool = False,
    ) -> int:
        """Write the locked (or absent) workflow row and everything derived from it."""
        instance_id = snapshot.instance_id
        values = workflow_values(snapshot, now)
        if stored is None:
            try:
                conn.execute(
                    insert(workflows).values(
                        instance_id=instance_id, **creation_values(snapshot), **values
                    )
                )
            except sa_exc.IntegrityError as error:
                raise _RestartTransaction(str(error.orig)) from error
            version, stored_results = 1, set[str]()
        else:
            version = stored.version + 1
            conn.execute(
                update(workflows)
                .where(workflows.c.instance_id == instance_id)
                .values(version=version, **values)
            )
            if not ready_cleared:
                self._clear_ready(conn, instance_id)
            stored_results = set(
                conn.scalars(
                    select(task_results.c.task_id).where(task_results.c.instance_id == instance_id)
                )
            )
        stored_tags = frozenset[str]() if stored is None else stored.tags
        self._write_attached(conn, snapshot, stored_results, stored_tags, now)
        return version

    def _write_attached(
        self,
        conn: Connection,
        snapshot: WorkflowSnapshot,
        stored_results: set[str],
        stored_tags: frozenset[str],
        now: datetime,
    ) -> None:
        """Write what derives from a workflow row just written: the results the snapshot
        adds, its tag rows, its ready rows (ready rows cleared before)."""
        instance_id = snapshot.instance_id
        tags = frozenset(snapshot.tags)
        missing = new_results(snapshot, stored_results, now)
        if missing:
            conn.execute(insert(task_results), missing)
        if stored_tags != tags:
            if stored_tags:
                conn.execute(
                    delete(workflow_tags).where(workflow_tags.c.instance_id == instance_id)
                )
            if tags:
                conn.execute(
                    insert(workflow_tags),
                    [{"instance_id": instance_id, "tag": tag} for tag in sorted(tags)],
                )
        ready = ready_rows(snapshot, stored_results | snapshot.completed_tasks.keys(), now)
        if ready:
            conn.execute(insert(ready_tasks), ready)
            self._announce(conn)

    def _replace_snapshot(
        self, conn: Connection, snapshot: WorkflowSnapshot, now: datetime
    ) -> None:
        """Replace the locked workflow row and everything attached with a new run of it.

        The row is updated in place, not deleted and inserted: a concurrent caller waiting
        for its lock then reads the new run (a deleted row would be found absent on
        PostgreSQL). Claim rows are released, not deleted: the new run's tokens go on from
        theirs, so a worker holding an old token never passes a fenced check on the new run;
        the new run counts its attempts anew.
        """
        instance_id = snapshot.instance_id
        # The global lock order: workflow row (held), ready rows, claim rows.
        self._clear_ready(conn, instance_id)
        conn.execute(
            update(task_claims)
            .where(task_claims.c.instance_id == instance_id)
            .values(
                released=True,
                attempt_offset=task_claims.c.token,
                last_error=None,
                deadline=None,
            )
        )
        # A new run: its keyed sends and consumptions start from none, as after a delete.
        for table in (task_results, signals, events, workflow_tags, *KEY_TABLES):
            conn.execute(delete(table).where(table.c.instance_id == instance_id))
        conn.execute(
            update(workflows)
            .where(workflows.c.instance_id == instance_id)
            .values(**creation_values(snapshot), **workflow_values(snapshot, now))
        )
        self._write_attached(conn, snapshot, set(), frozenset(), now)

    # -- snapshots ---------------------------------------------------------------------------

    def _start_workflow(self, snapshot: WorkflowSnapshot, if_exists: IfExists) -> WorkflowSnapshot:
        instance_id = snapshot.instance_id

        def work(conn: Connection) -> WorkflowSnapshot:
            row = self._lock_row(conn, instance_id)
            if row is None:
                # Two starts of an absent instance both get here: the second one's insert
                # conflicts on the primary key and its transaction runs again, finding the
                # first one's row (_write_snapshot raises _RestartTransaction).
                self._write_snapshot(conn, snapshot, None, self._clock(conn))
            elif if_exists is IfExists.FAIL:
                raise ConflictError(f"workflow {instance_id!r} exists already")
            elif if_exists is IfExists.USE_EXISTING:
                stored = self._read_stored(conn, instance_id)
                if stored.definition_hash != snapshot.definition_hash:
                    raise ConflictError(
                        f"workflow {instance_id!r} exists with definition "
                        f"{stored.definition_hash!r}, not {snapshot.definition_hash!r}"
                    )
                raise _Rollback(stored)  # nothing written
            else:
                self._replace_snapshot(conn, snapshot, row.now)
            return self._read_stored(conn, instance_id)

        return self._transaction(work)

    def _read_stored(self, conn: Connection, instance_id: str) -> WorkflowSnapshot:
        """The stored snapshot of a row this transaction has locked (or just written)."""
        row = conn.execute(self._sql.read_snapshot, {"p_instance_id": instance_id}).one()
        return snapshot_from_row(row, self._results(conn, instance_id))

    def _save_snapshot(self, snapshot: WorkflowSnapshot, expected_version: int | None) -> int:
        def work(conn: Connection) -> int:
            stored = self._lock_state(conn, snapshot.instance_id)
            return self._save_versioned(conn, snapshot, expected_version, stored)[0]

        return self._transaction(work)

    def _save_snapshot_keyed(
        self, snapshot: WorkflowSnapshot, expected_version: int | None, write_id: str
    ) -> int:
        instance_id = snapshot.instance_id

        def work(conn: Connection) -> int:
            # The row lock orders the savers of one instance: a repeat of the id waits for
            # the first, then reads its record (see sql/keyed.py). Two first saves of an
            # absent instance conflict on the workflow row's key instead, and the loser runs
            # again, finding the row and the record.
            stored = self._lock_state(conn, instance_id)
            if stored is not None:
                recorded = keyed.recorded_write(conn, self._keyed_sql, instance_id, write_id)
                if recorded is not None:
                    check_save_repeat(instance_id, write_id, recorded[1], snapshot)
                    raise _Rollback(recorded[0])  # saved once already: the version it got
            version, now = self._save_versioned(conn, snapshot, expected_version, stored)
            try:
                keyed.record_write(conn, self._keyed_sql, snapshot, write_id, version, now)
            except sa_exc.IntegrityError as error:
                raise _RestartTransaction(str(error.orig)) from error  # then it is a repeat
            return version

        return self._transaction(work)

    def _save_versioned(
        self,
        conn: Connection,
        snapshot: WorkflowSnapshot,
        expected_version: int | None,
        stored: _Stored | None,
    ) -> tuple[int, datetime]:
        """Save over the locked (or absent) row as ``save_snapshot`` does; the new version
        and the database clock's time of the save."""
        stored_version = 0 if stored is None else stored.version
        if expected_version is not None and expected_version != stored_version:
            raise ConflictError(
                f"workflow {snapshot.instance_id!r} is at version {stored_version}, "
                f"expected {expected_version}"
            )
        self._refuse_terminal(stored, snapshot.instance_id)
        now = stored.now if stored else self._clock(conn)
        return self._write_snapshot(conn, snapshot, stored, now), now

    def _clock(self, conn: Connection) -> datetime:
        now: datetime = conn.execute(select(self._dialect.now())).scalar_one()
        return now

    def _save_snapshot_fenced(
        self, snapshot: WorkflowSnapshot, task_id: str, worker_id: str, token: int | None
    ) -> int | None:
        instance_id = snapshot.instance_id

        def work(conn: Connection) -> int | None:
            stored = self._lock_state(conn, instance_id)
            if stored is None:
                return None
            # Ready rows before the claim row: the global lock order (see module doc).
            self._clear_ready(conn, instance_id)
            claim = conn.execute(
                self._sql.lock_claim, {"p_instance_id": instance_id, "p_task_id": task_id}
            ).first()
            if claim is None or not self._is_held(claim, worker_id, token, claim.now):
                raise _Rollback(None)
            self._refuse_terminal(stored, instance_id)
            return self._write_snapshot(conn, snapshot, stored, stored.now, ready_cleared=True)

        return self._transaction(work)

    @staticmethod
    def _is_held(claim: Row[Any], worker_id: str, token: int | None, now: datetime) -> bool:
        return (
            not claim.released
            and claim.worker_id == worker_id
            and (token is None or claim.token == token)
            and (claim.expires_at is None or now < claim.expires_at)
        )

    def _save_task_result(self, instance_id: str, task_id: str, output: bytes) -> int:
        def work(conn: Connection) -> int:
            key = {"p_instance_id": instance_id, "p_task_id": task_id}
            saved = self._bump_version(conn, key)
            if saved is None:
                # Absent or terminal: say which (the update's guard already decided).
                stored = self._lock_state_or_raise(conn, instance_id)
                self._refuse_terminal(stored, instance_id)
                raise ConflictError(f"workflow {instance_id!r} changed concurrently; retry")
            conn.execute(self._sql.delete_ready_task, key)
            position = codec.decode_column(
                instance_id, POSITION, codec.decode_position, saved.position
            )
            if set(position_task_ids(position, None)) - {task_id}:
                # The other ready tasks' snapshot was saved now too: aging counts from here.
                conn.execute(
                    self._sql.redate_ready_tasks,
                    {"p_instance_id": instance_id, "p_updated_at": saved.updated_at},
                )
            self._dialect.put_result(conn, instance_id, task_id, output, saved.updated_at)
            version: int = saved.version
            return version

        return self._transaction(work)

    def _bump_version(self, conn: Connection, key: Mapping[str, object]) -> Row[Any] | None:
        """Lock, guard (not terminal) and bump a workflow row in one ``UPDATE``; its new
        version, ``updated_at`` and position, or ``None`` if absent or terminal."""
        if self._dialect.update_returning:
            return conn.execute(self._sql.bump_version, key).first()
        if conn.execute(self._sql.bump_version, key).rowcount != 1:
            return None
        # Our own row, locked by the update: read-your-writes.
        return conn.execute(self._sql.read_bumped, key).first()

    def _load_snapshot(self, instance_id: str) -> WorkflowSnapshot:
        def work(conn: Connection) -> WorkflowSnapshot:
            row = conn.execute(self._sql.read_snapshot, {"p_instance_id": instance_id}).first()
            if row is None:
                raise NotFoundError(f"workflow instance {instance_id!r} not found")
            return snapshot_from_row(row, self._results(conn, instance_id))

        return self._transaction(work, read_only=True)

    def _load_task_result(self, instance_id: str, task_id: str) -> bytes | None:
        def work(conn: Connection) -> bytes | None:
            output: bytes | None = conn.execute(
                select(task_results.c.output).where(
                    task_results.c.instance_id == instance_id, task_results.c.task_id == task_id
                )
            ).scalar_one_or_none()
            if output is None and not self._exists(conn, instance_id):
                raise NotFoundError(f"workflow instance {instance_id!r} not found")
            return output

        return self._transaction(work, read_only=True)

    def _delete_snapshot(self, instance_id: str) -> None:
        def work(conn: Connection) -> None:
            if self._lock_row(conn, instance_id) is None:
                raise NotFoundError(f"workflow instance {instance_id!r} not found")
            # Its token floor is recorded before its claim rows go (see deleting.py).
            delete_attached(conn, self._dialect, [instance_id])
            conn.execute(delete(workflows).where(workflows.c.instance_id == instance_id))

        self._transaction(work)

    def _list_snapshots(
        self, status: WorkflowStatus | None, after: str | None, limit: int | None
    ) -> list[str]:
        query = select(workflows.c.instance_id).order_by(workflows.c.instance_id)
        if status is not None:
            query = query.where(workflows.c.status == status.value)
        if after is not None:
            query = query.where(workflows.c.instance_id > after)
        if limit is not None:
            query = query.limit(limit)
        return self._transaction(lambda conn: list(conn.scalars(query)), read_only=True)

    def _store_stats(self) -> StoreStats:
        return self._transaction(lambda conn: read_stats(conn, self._stats_sql), read_only=True)

    def _fail_overdue_workflows(self, limit: int) -> list[str]:
        return self._transaction(lambda conn: fail_overdue(conn, self._overdue_sql, limit))

    @traced("list_stalled_forks")
    def list_stalled_forks(self, *, limit: int = 100) -> list[str]:
        """See :meth:`PersistentBackend.list_stalled_forks`. One anti-join over the
        in-progress workflows: those without a ready row (nothing left to run at their
        position) are parked at a signal or a join; the fork positions are the joins."""
        check_limit(limit)
        page_size = 500
        query = (
            select(workflows.c.instance_id, workflows.c.position)
            .where(
                workflows.c.status == WorkflowStatus.IN_PROGRESS.value,
                workflows.c.instance_id > bindparam("p_after"),
                ~exists().where(ready_tasks.c.instance_id == workflows.c.instance_id),
            )
            .order_by(workflows.c.instance_id)
            .limit(page_size)
        )
        found: list[str] = []
        after = ""
        while len(found) < limit:
            parameters = {"p_after": after}
            rows = self._transaction(
                lambda conn: conn.execute(query, parameters).all(),  # noqa: B023 - run at once
                read_only=True,
            )
            found += [
                row.instance_id
                for row in rows
                if isinstance(
                    codec.decode_column(
                        row.instance_id, POSITION, codec.decode_position, row.position
                    ),
                    AtFork,
                )
            ]
            if len(rows) < page_size:
                break
            after = rows[-1].instance_id
        return found[:limit]

    # -- claims ------------------------------------------------------------------------------

    def _claim_task(
        self,
        instance_id: str,
        task_id: str,
        worker_id: str,
        ttl: timedelta | None,
        timeout: timedelta | None,
    ) -> TaskClaim | None:
        key = {"p_instance_id": instance_id, "p_task_id": task_id}

        def work(conn: Connection) -> TaskClaim | None:
            # Locking the ready row waits out a concurrent save that completes or moves
            # the task, and the statement after the lock sees what it committed.
            ready = conn.execute(self._sql.lock_ready_task, key).first()
            if ready is None:
                if not self._exists(conn, instance_id):
                    raise NotFoundError(f"workflow instance {instance_id!r} not found")
                return None
            now: datetime = ready.now
            if ready.signalled or (ready.wake_at is not None and ready.wake_at > now):
                return None
            terms = ClaimTerms(worker_id, now, *claim_times(now, ttl, timeout))
            floor = getattr(ready, "token_floor", None)  # read where the dialect needs it
            floors = {} if floor is None else {instance_id: int(floor)}
            granted = self._dialect.claim(conn, (instance_id, task_id), terms, floors)
            if granted is None:
                return None
            self._mark_claimed(conn, [(instance_id, task_id)], terms.expires_at)
            return granted_claim((instance_id, task_id), terms, granted)

        return self._transaction(work)

    def _mark_claimed(
        self, conn: Connection, keys: list[TaskKey], expires_at: datetime | None
    ) -> None:
        """Copy the claims' expiry to their ready rows (the hint candidates are rechecked by)."""
        if keys:
            conn.execute(
                self._sql.mark_claimed, {"p_keys": keys, "p_until": claimed_until(expires_at)}
            )

    @staticmethod
    def _held_claim_parameters(
        instance_id: str, task_id: str, worker_id: str, token: int | None
    ) -> dict[str, object]:
        """The parameters of :func:`statements.held_claim_filter`."""
        return {
            "p_instance_id": instance_id,
            "p_task_id": task_id,
            "p_worker_id": worker_id,
            "p_token": token,
        }

    def _raise_claim_error(
        self, conn: Connection, instance_id: str, task_id: str, worker_id: str, token: int | None
    ) -> None:
        claim = conn.execute(
            self._sql.read_claim, {"p_instance_id": instance_id, "p_task_id": task_id}
        ).first()
        if claim is None or claim.released:
            raise NotFoundError(f"no claim on task {task_id!r} of {instance_id!r}")
        if claim.worker_id != worker_id:
            raise ClaimLostError(
                f"task {task_id!r} of {instance_id!r} is claimed by another worker"
            )
        if (token is None or token == claim.token) and claim.deadline is not None:
            raise ClaimLostError(past_deadline(instance_id, task_id, claim.deadline))
        raise ClaimLostError(
            f"task {task_id!r} of {instance_id!r} was claimed anew "
            f"(token {claim.token}, yours {token})"
        )

    def _release_task_claim(
        self, instance_id: str, task_id: str, worker_id: str, token: int | None
    ) -> None:
        parameters = self._held_claim_parameters(instance_id, task_id, worker_id, token)

        def work(conn: Connection) -> None:
            # The ready row first, then the claim row: the order every call locks in (the
            # hint's clearing is undone with the rest if the claim is not ours).
            runnable = conn.execute(self._sql.clear_claimed, parameters).rowcount
            result = conn.execute(self._sql.release.for_token(token), parameters)
            if result.rowcount != 1:
                self._raise_claim_error(conn, instance_id, task_id, worker_id, token)
            if runnable:
                self._announce(conn)  # still a task of its workflow's position: runnable

        self._transaction(work)

    def _extend_task_claim(
        self,
        instance_id: str,
        task_id: str,
        worker_id: str,
        ttl: timedelta | None,
        token: int | None,
    ) -> TaskClaim:
        parameters = self._held_claim_parameters(instance_id, task_id, worker_id, token)
        if ttl is not None:
            parameters["p_ttl"] = self._dialect.ttl_parameter(ttl)

        def work(conn: Connection) -> TaskClaim:
            if ttl is not None:
                # Undone with the rest if the claim turns out not to be ours.
                conn.execute(self._sql.lower_claimed_until, parameters)
            extend = self._sql.extend_forever if ttl is None else self._sql.extend_until
            if conn.execute(extend.for_token(token), parameters).rowcount != 1:
                self._raise_claim_error(conn, instance_id, task_id, worker_id, token)
            claim = conn.execute(self._sql.read_claim, parameters).one()
            expires_at = claim.expires_at
            if claim.deadline is not None and (expires_at is None or expires_at > claim.deadline):
                expires_at = claim.deadline
                conn.execute(self._sql.set_expiry, {**parameters, "p_until": expires_at})
            pending = conn.scalars(self._sql.pending_signals, parameters)
            return TaskClaim(
                instance_id,
                task_id,
                worker_id,
                claim.claimed_at,
                expires_at,
                claim.token,
                frozenset(
                    codec.decode_column(instance_id, SIGNAL_KIND, codec.decode_signal_kind, kind)
                    for kind in pending
                ),
                attempt=claim.token - claim.attempt_offset,
                deadline=claim.deadline,
                last_error=claim.last_error,
            )

        return self._transaction(work)

    @staticmethod
    def _candidate_parameters(worker_tags: frozenset[str], limit: int) -> dict[str, object]:
        parameters: dict[str, object] = {"limit": limit}
        if worker_tags:
            parameters["worker_tags"] = sorted(worker_tags)
        return parameters

    @staticmethod
    def _best_first(rows: Iterable[Row[Any]], aging_interval: timedelta) -> list[Row[Any]]:
        return sorted(
            rows,
            key=lambda row: availability_key(
                row.priority, row.updated_at, row.instance_id, row.task_id, aging_interval
            ),
        )

    def _candidates(
        self,
        conn: Connection,
        worker_tags: frozenset[str],
        aging_interval: timedelta,
        limit: int,
    ) -> list[Row[Any]]:
        """The first ``limit`` available tasks for a worker with ``worker_tags``, best first."""
        parameters = self._candidate_parameters(worker_tags, limit)
        rows = conn.execute(self._sql.candidates.for_tags(worker_tags), parameters)
        return self._best_first(rows, aging_interval)[:limit]

    def _find_and_lock(
        self,
        conn: Connection,
        worker_tags: frozenset[str],
        aging_interval: timedelta,
        limit: int,
    ) -> tuple[Locked, TokenFloors, datetime | None]:
        """Lock the best ``limit`` available tasks no one else is claiming (best first),
        the token floors the lock read, and the database clock at that moment (``None`` when
        there are none)."""
        # Read more candidates than needed where rows can be skipped: some will be locked
        # or claimed by concurrent callers by the time we lock them.
        wanted = limit * 2 + 16 if self._dialect.skip_locked else limit
        candidates = self._candidates(conn, worker_tags, aging_interval, wanted)
        if not candidates:
            return {}, {}, None
        keys = [(row.instance_id, row.task_id) for row in candidates]
        locked, floors = self._dialect.lock_candidates(conn, keys, limit)
        return locked, floors, candidates[0].now

    def _available_tasks(
        self, conn: Connection, keys: Sequence[tuple[str, str]]
    ) -> list[AvailableTask]:
        if not keys:
            return []
        instance_ids = sorted({instance_id for instance_id, _ in keys})
        rows = conn.execute(self._sql.available_tasks, {"p_instance_ids": instance_ids})
        by_instance = {row.instance_id: row for row in rows}
        return [
            available_task_from_row(by_instance[instance_id], task_id)
            for instance_id, task_id in keys
        ]

    def _find_available_tasks(
        self, worker_id: str, limit: int, tags: frozenset[str], aging_interval: timedelta
    ) -> list[AvailableTask]:
        def work(conn: Connection) -> list[AvailableTask]:
            rows = self._candidates(conn, tags, aging_interval, limit)
            return self._available_tasks(conn, [(row.instance_id, row.task_id) for row in rows])

        return self._transaction(work, read_only=True)

    def _claim_available_tasks(
        self,
        worker_id: str,
        limit: int,
        ttl: timedelta | None,
        tags: frozenset[str],
        aging_interval: timedelta,
        timeout: timedelta | None,
    ) -> list[ClaimedTask]:
        def work(conn: Connection) -> list[ClaimedTask]:
            # Every candidate read may have been claimed by others before it could be locked
            # (a reader slowed down while they committed): then, while tasks are still
            # available, look again (a new statement sees their commits), so that a call
            # comes back empty only when no task was free.
            for _ in range(_LOCK_ATTEMPTS):
                if self._sql.claim_available is not None:
                    claimed = self._claim_in_one_statement(
                        conn, worker_id, limit, ttl, tags, aging_interval, timeout
                    )
                else:
                    claimed = self._claim_in_steps(
                        conn, worker_id, limit, ttl, tags, aging_interval, timeout
                    )
                if claimed or not self._candidates(conn, tags, aging_interval, 1):
                    return claimed
            return []

        return self._transaction(work)

    def _claim_in_one_statement(
        self,
        conn: Connection,
        worker_id: str,
        limit: int,
        ttl: timedelta | None,
        tags: frozenset[str],
        aging_interval: timedelta,
        timeout: timedelta | None,
    ) -> list[ClaimedTask]:
        assert self._sql.claim_available is not None
        parameters = self._candidate_parameters(tags, limit * 2 + 16)
        lifetime = effective_ttl(ttl, timeout)
        parameters |= {
            "p_aging_us": aging_interval // timedelta(microseconds=1),
            "p_take": limit,
            "p_worker_id": worker_id,
            "p_ttl": None if lifetime is None else self._dialect.ttl_parameter(lifetime),
            "p_timeout": None if timeout is None else self._dialect.ttl_parameter(timeout),
        }
        rows = conn.execute(self._sql.claim_available.for_tags(tags), parameters)
        return [
            ClaimedTask(
                granted_claim(
                    (row.instance_id, row.task_id),
                    ClaimTerms(worker_id, row.claimed_at, row.expires_at, row.deadline),
                    Granted.from_row(row),
                ),
                available_task_from_row(row, row.task_id),
            )
            for row in self._best_first(rows, aging_interval)
        ]

    def _claim_in_steps(
        self,
        conn: Connection,
        worker_id: str,
        limit: int,
        ttl: timedelta | None,
        tags: frozenset[str],
        aging_interval: timedelta,
        timeout: timedelta | None,
    ) -> list[ClaimedTask]:
        locked, floors, now = self._find_and_lock(conn, tags, aging_interval, limit)
        if now is None:
            return []
        terms = ClaimTerms(worker_id, now, *claim_times(now, ttl, timeout))
        # The guarded claim, not the lock, decides: a row claimed and committed just
        # before we locked it is refused here.
        granted = self._dialect.claim_many(conn, locked, terms, floors)
        claimed = [key for key in locked if key in granted]
        self._mark_claimed(conn, claimed, terms.expires_at)
        tasks = self._available_tasks(conn, claimed)
        return [
            ClaimedTask(granted_claim(key, terms, granted[key]), task)
            for key, task in zip(claimed, tasks, strict=True)
        ]

    # -- completions -------------------------------------------------------------------------

    def _complete_tasks(
        self,
        completions: list[TaskCompletion],
        ttl: timedelta | None,
        claim_next: int,
        timeout: timedelta | None,
    ) -> list[CompletionResult]:
        return self._transaction(
            lambda conn: complete_tasks(
                conn,
                self._completion_sql,
                self._dialect,
                completions,
                ttl,
                timeout,
                claim_next,
                self._check_snapshot,
                self._announce,
            )
        )

    # -- retention ---------------------------------------------------------------------------

    def _prune_workflows(
        self, finished_before: datetime, statuses: frozenset[WorkflowStatus], batch_size: int
    ) -> int:
        # One transaction per batch: its locks last a few statements, whatever the backlog.
        return self._transaction(
            lambda conn: prune_workflows(
                conn, self._prune_sql, self._dialect, finished_before, statuses, batch_size
            )
        )

    # -- signals and events ------------------------------------------------------------------

    def _store_signal(self, instance_id: str, kind: SignalKind, request: SignalRequest) -> None:
        def work(conn: Connection) -> None:
            status = self._lock_state_or_raise(conn, instance_id).status
            if transitions.signal_already_applied(instance_id, status, kind):
                return
            # Every signal write holds the workflow row lock, so check-then-insert is safe.
            if conn.execute(
                select(signals.c.kind).where(self._signal_key(instance_id, kind))
            ).first():
                return
            conn.execute(
                insert(signals).values(
                    instance_id=instance_id,
                    kind=kind.value,
                    reason=request.reason,
                    requested_by=request.requested_by,
                    requested_at=request.requested_at,
                )
            )

        self._transaction(work)

    @staticmethod
    def _signal_key(instance_id: str, kind: SignalKind) -> ColumnElement[bool]:
        return and_(signals.c.instance_id == instance_id, signals.c.kind == kind.value)

    def _read_signal(
        self, conn: Connection, instance_id: str, kind: SignalKind
    ) -> SignalRequest | None:
        row = conn.execute(
            select(signals.c.reason, signals.c.requested_by, signals.c.requested_at).where(
                self._signal_key(instance_id, kind)
            )
        ).first()
        return (
            None if row is None else SignalRequest(row.reason, row.requested_by, row.requested_at)
        )

    def _get_signal(self, instance_id: str, kind: SignalKind) -> SignalRequest | None:
        def work(conn: Connection) -> SignalRequest | None:
            request = self._read_signal(conn, instance_id, kind)
            if request is None and not self._exists(conn, instance_id):
                raise NotFoundError(f"workflow instance {instance_id!r} not found")
            return request

        return self._transaction(work, read_only=True)

    def _clear_signal(self, instance_id: str, kind: SignalKind) -> None:
        def work(conn: Connection) -> None:
            self._lock_state_or_raise(conn, instance_id)
            conn.execute(delete(signals).where(self._signal_key(instance_id, kind)))

        self._transaction(work)

    def _check_and_apply(self, instance_id: str, kind: SignalKind) -> bool:
        def work(conn: Connection) -> bool:
            snapshot, stored = self._lock_snapshot(conn, instance_id)
            request = self._read_signal(conn, instance_id, kind)
            if request is None or not transitions.is_signal_applicable(snapshot.status, kind):
                return False
            transitions.apply_signal(snapshot, kind, request)
            self._write_snapshot(conn, snapshot, stored, stored.now)
            conn.execute(
                update(task_claims)
                .where(task_claims.c.instance_id == instance_id)
                .values(released=True)
            )
            conn.execute(delete(signals).where(self._signal_key(instance_id, kind)))
            return True

        return self._transaction(work)

    def _unpause(self, instance_id: str) -> WorkflowSnapshot:
        def work(conn: Connection) -> WorkflowSnapshot:
            snapshot, stored = self._lock_snapshot(conn, instance_id)
            if snapshot.status is not WorkflowStatus.PAUSED:
                raise CannotPauseError(
                    f"workflow {instance_id!r} is {snapshot.status.value}, not paused"
                )
            transitions.unpause(snapshot)
            snapshot.version = self._write_snapshot(conn, snapshot, stored, stored.now)
            snapshot.updated_at = stored.now
            return snapshot

        return self._transaction(work)

    def _retry_workflow(self, instance_id: str) -> WorkflowSnapshot:
        def work(conn: Connection) -> WorkflowSnapshot:
            # The workflow row first, then its ready rows, then its claims: the global order.
            snapshot, stored = self._lock_snapshot(conn, instance_id)
            transitions.retry(snapshot)
            version = stored.version + 1
            # Guarded by the status in the write itself too, not only by the read before it.
            requeued = conn.execute(
                update(workflows)
                .where(
                    workflows.c.instance_id == instance_id,
                    workflows.c.status == WorkflowStatus.FAILED.value,
                )
                .values(
                    status=snapshot.status.value, error=None, version=version, updated_at=stored.now
                )
            )
            if requeued.rowcount != 1:
                raise ConflictError(f"workflow {instance_id!r} changed concurrently; retry")
            snapshot.version, snapshot.updated_at = version, stored.now
            # A failed workflow has no ready rows: rebuild them as a save would.
            self._clear_ready(conn, instance_id)
            ready = ready_rows(snapshot, snapshot.completed_tasks, stored.now)
            if ready:
                conn.execute(insert(ready_tasks), ready)
                self._announce(conn)
            # Dropped as a cancel drops them (old holders are fenced off), and the next claim
            # of each task is attempt 1 again while its token keeps increasing.
            conn.execute(
                update(task_claims)
                .where(task_claims.c.instance_id == instance_id)
                .values(released=True, attempt_offset=task_claims.c.token, last_error=None)
            )
            # Requests made before the failure could never apply now (see the contract).
            conn.execute(delete(signals).where(signals.c.instance_id == instance_id))
            return snapshot

        return self._transaction(work)

    def _send_event(self, instance_id: str, name: str, payload: bytes) -> None:
        def work(conn: Connection) -> None:
            snapshot, stored = self._lock_snapshot(conn, instance_id)
            self._deliver_or_buffer(conn, snapshot, stored, name, payload)

        self._transaction(work)

    def _send_event_keyed(self, instance_id: str, name: str, payload: bytes, key: str) -> None:
        def work(conn: Connection) -> None:
            # The row lock orders the senders of one instance: a repeat of the key waits for
            # the first, then reads its record (see sql/keyed.py).
            snapshot, stored = self._lock_snapshot(conn, instance_id)
            recorded = keyed.recorded_send(conn, self._keyed_sql, instance_id, key)
            if recorded is not None:
                check_send_repeat(instance_id, key, recorded, name, payload)
                raise _Rollback(None)  # sent once already: nothing to write
            try:
                keyed.record_send(
                    conn, self._keyed_sql, instance_id, key, name, payload, stored.now
                )
            except sa_exc.IntegrityError as error:
                raise _RestartTransaction(str(error.orig)) from error  # then it is a repeat
            self._deliver_or_buffer(conn, snapshot, stored, name, payload)

        self._transaction(work)

    def _deliver_or_buffer(
        self,
        conn: Connection,
        snapshot: WorkflowSnapshot,
        stored: _Stored,
        name: str,
        payload: bytes,
    ) -> None:
        """Deliver the event to the locked workflow waiting for it, or buffer it."""
        instance_id = snapshot.instance_id
        if transitions.waits_for_event(snapshot, name):
            stored_results = set(snapshot.completed_tasks)
            signal_id = transitions.deliver_event(snapshot, payload)
            self._write_snapshot(conn, snapshot, stored, stored.now)
            if signal_id in stored_results:  # the write keeps stored results: replace it
                self._dialect.put_result(conn, instance_id, signal_id, payload, stored.now)
        else:
            conn.execute(
                insert(events).values(
                    instance_id=instance_id, name=name, payload=payload, created_at=stored.now
                )
            )

    def _take_oldest_event(self, conn: Connection, instance_id: str, name: str) -> bytes | None:
        """Delete and return the oldest buffered event of that name, or ``None``."""
        # SKIP LOCKED: concurrent consumers take the next event instead of waiting.
        row = conn.execute(
            select(events.c.id, events.c.payload)
            .where(events.c.instance_id == instance_id, events.c.name == name)
            .order_by(events.c.id)
            .limit(1)
            .with_for_update(skip_locked=self._dialect.skip_locked)
        ).first()
        if row is None:
            return None
        conn.execute(delete(events).where(events.c.id == row.id))
        payload: bytes = row.payload
        return payload

    def _consume_event(self, instance_id: str, name: str) -> bytes | None:
        def work(conn: Connection) -> bytes | None:
            payload = self._take_oldest_event(conn, instance_id, name)
            if payload is None and not self._exists(conn, instance_id):
                raise NotFoundError(f"workflow instance {instance_id!r} not found")
            return payload

        return self._transaction(work)

    def _consume_event_keyed(self, instance_id: str, name: str, key: str) -> bytes | None:
        def work(conn: Connection) -> bytes | None:
            # The row lock orders the keyed consumers of one instance: a repeat of the key
            # waits for the first, then reads its record instead of taking the next event.
            row = self._lock_row(conn, instance_id)
            if row is None:
                raise NotFoundError(f"workflow instance {instance_id!r} not found")
            sql = self._keyed_sql
            recorded = keyed.recorded_consumption(conn, sql, instance_id, key)
            if recorded is not None:
                check_consume_repeat(instance_id, key, recorded[0], name)
                raise _Rollback(recorded[1])  # the same event again; nothing to write
            payload = self._take_oldest_event(conn, instance_id, name)
            if payload is None:
                return None  # nothing taken, nothing recorded
            try:
                keyed.record_consumption(conn, sql, instance_id, key, name, payload, row.now)
            except sa_exc.IntegrityError as error:
                raise _RestartTransaction(str(error.orig)) from error  # then it is a repeat
            return payload

        return self._transaction(work)
