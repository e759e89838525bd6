"""SQLite: one writer at a time, so every write transaction begins ``IMMEDIATE``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timedelta
from typing import Any, Self

from sqlalchemy import (
    URL,
    ColumnElement,
    Connection,
    Engine,
    Executable,
    String,
    bindparam,
    event,
    func,
    type_coerce,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import OperationalError

from ...errors import BackendUnavailableError
from ..errors import ErrorKind
from ..types import UtcDateTime
from .base import (
    POOL_OPTIONS,
    READ_ONLY_OPTION,
    ClaimRow,
    Locked,
    SqlDialect,
    TaskKey,
    Timeouts,
    TokenFloors,
    on_conflict_floor_upsert,
    on_conflict_upserts,
)

# Connection info key: the busy timeout (ms) currently set on a SQLite connection.
_BUSY_TIMEOUT_KEY = "sayiir_busy_timeout_ms"
# How long a migration waits for another one to finish (MySQL's named lock waits as long).
_MIGRATION_BUSY_TIMEOUT_SECONDS = 600
# Between two tries of the switch to WAL while another process migrates (see after_migration).
_WAL_SWITCH_PAUSE_SECONDS = 0.05


class SqliteDialect(SqlDialect):
    """SQLite: one writer at a time, so every write transaction begins ``IMMEDIATE``.

    Taking the write lock up front makes a read-then-write transaction atomic across the
    processes sharing the file, and avoids the deadlock-prone lock upgrade of a deferred
    transaction. WAL lets readers of other connections proceed meanwhile.
    """

    names = frozenset({"sqlite"})
    skip_locked = False
    watches_calls = False
    isolation_level = None
    # Timestamps are stored as 'YYYY-MM-DD HH:MM:SS.ffffff' text: the clock expression
    # renders the same shape (millisecond precision, padded) so text comparison is order.
    _FORMAT = "%Y-%m-%d %H:%M:%f"

    @classmethod
    def configured(cls, *, sqlite_busy_timeout: timedelta) -> Self:
        return cls(sqlite_busy_timeout)

    def __init__(self, busy_timeout: timedelta) -> None:
        super().__init__()
        self.busy_timeout_ms = max(0, int(busy_timeout.total_seconds() * 1000))
        self._writer = threading.Lock()
        # The busy timeout left to the calling thread's write transaction (see write_gate).
        self._budget = threading.local()

    @staticmethod
    def now() -> ColumnElement[datetime]:
        return type_coerce(func.strftime(SqliteDialect._FORMAT, "now").concat("000"), UtcDateTime())

    @staticmethod
    def now_plus_ttl() -> ColumnElement[datetime]:
        modifier = bindparam("p_ttl", type_=String())
        return type_coerce(
            func.strftime(SqliteDialect._FORMAT, "now", modifier).concat("000"), UtcDateTime()
        )

    @staticmethod
    def ttl_parameter(ttl: timedelta) -> object:
        return f"+{ttl.total_seconds():.6f} seconds"

    @classmethod
    @contextmanager
    def migration_lock(cls, connection: Connection) -> Iterator[None]:
        # The database's write lock, taken now with BEGIN IMMEDIATE (which also makes the
        # migration all or nothing). pysqlite does not begin a transaction before DDL:
        # without this, a concurrent migration would find the tables half created. Skipped
        # when a transaction is already open (an engine that begins IMMEDIATE itself, or a
        # re-entrant call).
        if not getattr(connection.connection.dbapi_connection, "in_transaction", False):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        yield

    @classmethod
    def migration_engine_options(cls) -> dict[str, object]:
        # The busy timeout of the engine a migration opens for a URL (an engine given is used
        # as it is): processes started together queue for the write lock, each behind every
        # earlier one's migration, longer than the driver's 5 s.
        return {"connect_args": {"timeout": _MIGRATION_BUSY_TIMEOUT_SECONDS}}

    @classmethod
    def after_migration(cls, connection: Connection) -> None:
        # WAL is stored in the file: set it now, before workers open the file together (each
        # would otherwise try to switch, and a switch needs the file to itself). Through
        # SQLAlchemy, so that its errors are translated. The switch reads the file (a shared
        # lock) and then needs it alone: while another process's migration holds the write
        # lock, SQLite refuses at once instead of waiting (waiting could deadlock), with
        # "database is locked" or by keeping the mode. So it is tried again until that
        # migration is over, as long as the migration lock waits.
        deadline = time.monotonic() + _MIGRATION_BUSY_TIMEOUT_SECONDS
        while True:
            try:
                if _use_wal(
                    lambda: connection.exec_driver_sql("PRAGMA journal_mode").scalar(),
                    lambda: connection.exec_driver_sql("PRAGMA journal_mode=WAL").scalar(),
                ):
                    return
                refusal: Exception = BackendUnavailableError(
                    "the SQLite database stayed locked: it could not be switched to WAL mode"
                )
            except OperationalError as error:
                if cls.classify(error) is not ErrorKind.BUSY:
                    raise
                refusal = error
            if time.monotonic() > deadline:
                raise refusal
            connection.rollback()
            time.sleep(_WAL_SWITCH_PAUSE_SECONDS)

    @classmethod
    def classify(cls, error: BaseException) -> ErrorKind | None:
        text = str(error).lower()
        if "database is locked" in text or "database is busy" in text:
            return ErrorKind.BUSY
        if "no such table" in text or "no such column" in text:
            return ErrorKind.NOT_PROVISIONED
        return None

    def write_gate(self, read_only: bool) -> AbstractContextManager[None]:
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

    def engine_options(
        self, url: URL, max_payload_bytes: int, timeouts: Timeouts
    ) -> dict[str, object]:
        # A local file, no network: nothing to time out but the lock (the busy timeout).
        return dict(POOL_OPTIONS)

    def prepare_engine(self, engine: Engine, *, created: bool) -> Engine:
        busy_timeout_ms = self.busy_timeout_ms

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's begin event, not the driver, decide when transactions start.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            # The busy timeout first: the pragmas below may meet another process's lock.
            cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms:d}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            _use_wal(
                lambda: cursor.execute("PRAGMA journal_mode").fetchone()[0],
                lambda: cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0],
            )
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

    def _build_upserts(self) -> tuple[Executable, Executable]:
        return on_conflict_upserts(sqlite.insert)

    def _build_floor_upsert(self) -> Executable:
        # SQLite's max() of two arguments is the greater one.
        return on_conflict_floor_upsert(sqlite.insert, func.max)

    def lock_candidates(
        self, conn: Connection, keys: list[TaskKey], limit: int
    ) -> tuple[Locked, TokenFloors]:
        # The transaction holds the database's write lock: the candidates just read are
        # exactly what is available, and nobody else can claim them before we commit. The
        # claim statement reads the token floors itself (and returns its tokens).
        return dict.fromkeys(keys[:limit], ClaimRow.UNKNOWN), {}


def _use_wal(read_mode: Callable[[], object], switch_to_wal: Callable[[], object]) -> bool:
    """Put the file in WAL mode unless it is already (WAL is stored in the file; a switch
    needs the file to itself, which processes opening it together would fight over); whether
    it is in WAL mode now. Each function runs its ``PRAGMA journal_mode`` and returns the mode
    answered (a switch SQLite cannot make answers the mode it kept)."""
    return str(read_mode()).lower() == "wal" or str(switch_to_wal()).lower() == "wal"
