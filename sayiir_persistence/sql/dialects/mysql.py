"""MySQL 8 / MariaDB 10.6+: no ``ON CONFLICT ... WHERE`` and no ``UPDATE ... RETURNING``."""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    URL,
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    Executable,
    bindparam,
    event,
    func,
    insert,
    literal_column,
    select,
    text,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects import mysql

from ...errors import SchemaError
from ..errors import ErrorKind, RetryableConflict
from ..schema import ready_tasks, task_claims, task_results, token_floors
from ..types import MYSQL_DIALECTS, UtcDateTime
from .base import (
    GRANTED_COLUMNS,
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE_SECONDS,
    KEEPALIVE_INTERVAL_SECONDS,
    TCP_USER_TIMEOUT_MS,
    ClaimRow,
    ClaimTerms,
    Granted,
    Locked,
    SqlDialect,
    TaskKey,
    Timeouts,
    TokenFloors,
    claim_is_free,
    claim_key,
    claim_parameters,
    claims_token_floors,
    new_claim,
    new_result,
    ready_is_free,
)

logger = logging.getLogger(__name__)

# Error numbers.
# ... 1213 is also Galera's refusal of a transaction that lost a write conflict with one of
# another node (certification, at COMMIT or, "brute force abort", at any statement): it was
# rolled back, so it runs again whole like a deadlock. 1205 is also a Galera node's
# causality wait (wsrep_sync_wait) that cannot be served: a node outside the primary
# component answers it at once.
_RETRYABLE = frozenset({1213, 1205})  # deadlock, lock wait timeout
_UNDEFINED = frozenset({1146, 1054})  # no such table, unknown column
_TOO_BIG = frozenset({1153, 1301})  # packet larger than max_allowed_packet
# ... and 1969: MariaDB's max_statement_time exceeded (the call ran past its time); 1047:
# "WSREP has not yet prepared node for application use", a Galera node outside the primary
# component (partitioned from the majority) or not yet synced, which refuses every read and
# write; 1927: the connection was killed (a Galera node dropping its clients as it leaves).
_UNAVAILABLE = frozenset({2002, 2003, 2006, 2013, 2055, 1040, 1053, 1969, 1047, 1927})

# The causality checks a Galera session needs (wsrep_sync_wait bits): 1, the reads
# (SELECT, and so a transaction's first locking read), and 2, UPDATE and DELETE (the first
# statement of an extend, a release, a result save). MariaDB waits at a transaction's first
# statement only, until the node has applied every write set the cluster had ordered when
# the statement arrived: a worker whose calls reach different nodes (a load balancer) sees
# its own earlier commits, its claim before its completion.
_GALERA_SYNC_WAIT = 3

# Claims on Galera, under contention. SKIP LOCKED skips the rows locked on the caller's node
# only: claimers on different nodes all go for the same best candidates, and all but one lose
# at certification (1213), run again, and collide again. A thread whose transaction lost a
# conflict (SqlBackend calls lost_conflict) claims for the next _CONTENDED_SECONDS as if the
# candidates of the other nodes' shares (a hash of the task's key modulo the cluster size; its
# node's share is its ``wsrep_local_index``) were being claimed by others: its own share's
# first, in order, then the rest. A lone claimer never conflicts, and keeps the exact order.
_CONTENDED_SECONDS = 1.0
_contention = threading.local()
# The (wsrep_local_index, wsrep_cluster_size) of a connection's Galera node, in its info.
_GALERA_SHARE = "sayiir_galera_share"

# Concurrent migrations queue on this named lock (a session lock: MySQL's DDL commits
# implicitly, so a transaction-level lock would not last).
_MIGRATION_LOCK_NAME = "sayiir_persistence_migrations"
_MIGRATION_LOCK_TIMEOUT_SECONDS = 600


class MySqlDialect(SqlDialect):
    """A claim is a guarded ``UPDATE`` (takeover of a released or expired claim) and, when no
    row exists yet, an ``INSERT IGNORE`` (the primary key lets one concurrent inserter
    win). ``ON DUPLICATE KEY UPDATE`` is avoided for claims: its assignments run left to
    right, so a guard cannot see the row as it was before the first assignment.

    Without ``RETURNING``, a first claim's token (its instance's token floor + 1) is bound,
    not read by the ``INSERT``: the statement that locks the task reads the floor with a
    locking read (:meth:`floor_read`), which sees the latest committed floor and keeps it
    until commit, so the bound token is the one the ``INSERT`` would have read. (A plain
    subquery there would read the statement's snapshot, which may predate a delete and
    re-creation of the instance that committed before its row was reached.) Bound values
    also keep the multi-row ``INSERT IGNORE`` one statement (PyMySQL batches ``VALUES``
    made of placeholders only).
    """

    names = MYSQL_DIALECTS
    update_returning = False

    def __init__(self) -> None:
        super().__init__()
        # PyMySQL's read timeout during the handshake and after it (see connect_args).
        self._read_timeout_after_connect: tuple[float, float | None] | None = None
        # The takeover of a released or expired claim.
        self._takeover_statement = (
            update(task_claims)
            .where(claim_key(), claim_is_free(bindparam("p_now")))
            .values(
                worker_id=bindparam("p_worker_id"),
                token=task_claims.c.token + 1,
                claimed_at=bindparam("p_now"),
                expires_at=bindparam("p_expires_at"),
                released=False,
                deadline=bindparam("p_deadline"),
            )
        )
        self._granted_statement = select(*GRANTED_COLUMNS).where(claim_key())
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
        # A locking read sees each row's latest committed version, so a row claimed since the
        # candidates were read (its claim hint set) is left out here, and the next one locked.
        self._lock_statement = (
            select(
                ready_tasks.c.instance_id,
                ready_tasks.c.task_id,
                claim_token.label("token"),
                self.floor_read(ready_tasks.c.instance_id).label("token_floor"),
            )
            .where(
                tuple_(ready_tasks.c.instance_id, ready_tasks.c.task_id).in_(
                    bindparam("p_keys", expanding=True)
                ),
                ready_is_free(ready_tasks, self.now()),
            )
            .with_for_update(skip_locked=True)
        )

    @staticmethod
    def packet_bytes(max_payload_bytes: int) -> int:
        # A payload travels escaped inside the statement text: up to twice its size.
        return 2 * max_payload_bytes + 1024 * 1024

    @staticmethod
    def now() -> ColumnElement[datetime]:
        return type_coerce(func.utc_timestamp(6), UtcDateTime())

    @staticmethod
    def now_plus_ttl() -> ColumnElement[datetime]:
        return type_coerce(
            func.timestampadd(
                literal_column("MICROSECOND"),
                bindparam("p_ttl", type_=BigInteger()),
                func.utc_timestamp(6),
            ),
            UtcDateTime(),
        )

    @staticmethod
    def ttl_parameter(ttl: timedelta) -> object:
        return ttl // timedelta(microseconds=1)

    @classmethod
    @contextmanager
    def migration_lock(cls, connection: Connection) -> Iterator[None]:
        acquired = connection.execute(
            text("SELECT GET_LOCK(:name, :timeout)"),
            {"name": _MIGRATION_LOCK_NAME, "timeout": _MIGRATION_LOCK_TIMEOUT_SECONDS},
        ).scalar()
        if acquired != 1:
            raise SchemaError(
                f"timed out after {_MIGRATION_LOCK_TIMEOUT_SECONDS}s waiting for another "
                "migration of this database to finish"
            )
        try:
            yield
        finally:
            connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": _MIGRATION_LOCK_NAME})

    def lost_conflict(self) -> None:
        # Only read on a Galera node (see _contended_order): one server's locks order its claimers.
        _contention.until = time.monotonic() + _CONTENDED_SECONDS

    @classmethod
    def classify(cls, error: BaseException) -> ErrorKind | None:
        args = getattr(error, "args", ())
        code = args[0] if args and isinstance(args[0], int) else None
        if code in _RETRYABLE:
            return ErrorKind.RETRYABLE
        if code in _UNDEFINED:
            return ErrorKind.NOT_PROVISIONED
        if code in _TOO_BIG:
            return ErrorKind.TOO_LARGE
        if code in _UNAVAILABLE:
            return ErrorKind.UNAVAILABLE
        return None

    def engine_options(
        self, url: URL, max_payload_bytes: int, timeouts: Timeouts
    ) -> dict[str, object]:
        options = super().engine_options(url, max_payload_bytes, timeouts)
        # The pool's reset of a returned connection is a ROLLBACK round trip on MySQL drivers
        # (PostgreSQL's and SQLite's skip it when no transaction is open). Every transaction
        # of the backend has ended by then (committed, or rolled back by SQLAlchemy's
        # Connection.close()), so it would only cost one more round trip per call.
        options["pool_reset_on_return"] = None
        return options

    def connect_args(
        self, url: URL, max_payload_bytes: int, timeouts: Timeouts
    ) -> dict[str, object]:
        """PyMySQL's arguments: the packet size, ``connect_timeout`` (the TCP connect),
        ``read_timeout`` (the connect timeout during the handshake, then the call timeout:
        see :meth:`prepare_engine`), ``write_timeout``, and MariaDB's server-side timeouts
        of the session (``init_command``)."""
        if url.get_driver_name() != "pymysql":
            return {}
        connect = timeouts.connect.total_seconds()
        args: dict[str, object] = {
            # PyMySQL refuses to send packets above 16 MiB unless told otherwise.
            "max_allowed_packet": self.packet_bytes(max_payload_bytes),
            "connect_timeout": connect,
            # PyMySQL reads the handshake with read_timeout, not connect_timeout.
            "read_timeout": connect,
        }
        call = None if timeouts.call is None else timeouts.call.total_seconds()
        if "read_timeout" not in url.query:
            self._read_timeout_after_connect = (connect, call)
        if call is not None:
            # Once connected, no single read or write of a call waits longer than the call
            # may last (a bound on what runs outside a call's watch too).
            args["write_timeout"] = call
            args["init_command"] = _server_timeouts(call)
        return args

    def prepare_engine(self, engine: Engine, *, created: bool) -> Engine:
        engine = super().prepare_engine(engine, created=created)
        if created and engine.dialect.driver == "pymysql":
            # PyMySQL turns keepalives on with the system's timers (2 hours): use ours.
            event.listen(engine, "connect", _tune_keepalives)
            if self._read_timeout_after_connect is not None:
                handshake, call = self._read_timeout_after_connect
                event.listen(engine, "connect", _raising_read_timeout(handshake, call))
        if created:
            event.listen(engine, "connect", _galera_session)
        return engine

    @staticmethod
    def socket_of(dbapi_connection: Any) -> int | None:
        sock = getattr(dbapi_connection, "_sock", None)  # PyMySQL's socket (no fileno())
        return None if sock is None else int(sock.fileno())

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

    def floor_read(self, instance_id: ColumnElement[str]) -> ColumnElement[int]:
        # A locking read (a shared lock: claimers do not wait for each other), see the class.
        return (
            select(token_floors.c.token_floor)
            .where(token_floors.c.instance_id == instance_id)
            .with_for_update(read=True)
            .scalar_subquery()
        )

    def _build_floor_upsert(self) -> Executable:
        floors = mysql.insert(token_floors).from_select(
            ["instance_id", "token_floor"], claims_token_floors()
        )
        return floors.on_duplicate_key_update(
            token_floor=func.greatest(token_floors.c.token_floor, floors.inserted.token_floor)
        )

    def _build_upserts(self) -> tuple[Executable, Executable]:
        # First claims only: the primary key lets one concurrent inserter win. The token and
        # attempt offset are bound from the token floor (see the class).
        first_claim = {
            **new_claim(),
            "token": bindparam("p_token", type_=BigInteger()),
            "attempt_offset": bindparam("p_attempt_offset", type_=BigInteger()),
        }
        claim = insert(task_claims).prefix_with("IGNORE").values(first_claim)
        result = mysql.insert(task_results).values(new_result())
        result = result.on_duplicate_key_update(
            output=result.inserted.output, completed_at=result.inserted.completed_at
        )
        return claim, result

    def _take_over(self, conn: Connection, parameters: dict[str, object]) -> Granted | None:
        """Take over a released or expired claim; ``None`` if it is live."""
        taken = conn.execute(self._takeover_statement, parameters)
        if taken.rowcount != 1:
            return None
        # Takeovers are the rare claims (a retry, an expiry, a release): the attempt and the
        # last error are read back from our locked row.
        return Granted.from_row(conn.execute(self._granted_statement, parameters).one())

    def claim(
        self, conn: Connection, key: TaskKey, terms: ClaimTerms, floors: TokenFloors
    ) -> Granted | None:
        [parameters] = claim_parameters([key], terms)
        granted = self._take_over(conn, parameters)
        if granted is not None:
            return granted
        floor = floors.get(key[0], 0)
        inserted = conn.execute(self._claim_statement, _first_claim(parameters, floor))
        return Granted.first(floor) if inserted.rowcount == 1 else None

    def lock_candidates(
        self, conn: Connection, keys: list[TaskKey], limit: int
    ) -> tuple[Locked, TokenFloors]:
        # InnoDB locks every row a locking read visits before sorting and limiting, so the
        # candidates are not locked with ORDER BY ... LIMIT: lock the best ``limit`` keys by
        # primary key, and as many of the next ones as rows were skipped, until enough.
        order = _contended_order(conn, keys)
        locked: dict[TaskKey, ClaimRow] = {}
        floors: dict[str, int] = {}
        tried = 0
        while len(locked) < limit and tried < len(order):
            batch = order[tried : tried + limit - len(locked)]
            tried += len(batch)
            rows = conn.execute(self._lock_statement, {"p_keys": batch})
            for row in rows:
                locked[(row.instance_id, row.task_id)] = _claim_row(row.token is not None)
                if row.token_floor is not None:
                    floors[row.instance_id] = int(row.token_floor)
        return {key: locked[key] for key in keys if key in locked}, floors

    def claim_many(
        self, conn: Connection, locked: Locked, terms: ClaimTerms, floors: TokenFloors
    ) -> dict[TaskKey, Granted]:
        tokens: dict[TaskKey, Granted] = {}
        # First claims, the usual case, in one multi-row INSERT IGNORE. The ready-row
        # locks we hold keep other claimers out, so every one of them must go in.
        first = [key for key, row in locked.items() if row is ClaimRow.ABSENT]
        if first:
            parameters = [
                _first_claim(values, floors.get(key[0], 0))
                for key, values in zip(first, claim_parameters(first, terms), strict=True)
            ]
            inserted = conn.execute(self._claim_statement, parameters).rowcount
            if inserted != len(first):
                # A claim row read as absent exists (committed in the instant between the
                # read and the lock): which rows went in is unknown, so undo all and run the
                # transaction again.
                raise RetryableConflict(
                    f"{len(first) - inserted} of {len(first)} first claims already existed"
                )
            tokens.update((key, Granted.first(floors.get(key[0], 0))) for key in first)
        for key, row in locked.items():
            if row is ClaimRow.ABSENT:
                continue
            if row is ClaimRow.PRESENT:  # a free claim row (live ones are not candidates)
                [takeover] = claim_parameters([key], terms)
                granted = self._take_over(conn, takeover)
            else:
                granted = self.claim(conn, key, terms, floors)
            if granted is not None:
                tokens[key] = granted
        return tokens


def _first_claim(parameters: dict[str, object], token_floor: int) -> dict[str, object]:
    """The parameters of a first claim in an instance whose token floor is ``token_floor``."""
    return {**parameters, "p_token": token_floor + 1, "p_attempt_offset": token_floor}


def _raising_read_timeout(handshake: float, call: float | None) -> Callable[[Any, Any], None]:
    """A ``connect`` hook that gives a new PyMySQL connection, read with the connect timeout
    so far, the call timeout for its reads from now on (PyMySQL has no public setter; it
    applies ``_read_timeout`` at its next read). A read timeout the caller chose (their
    ``connect_args``) is left alone."""

    def raise_read_timeout(dbapi_connection: Any, _record: Any) -> None:
        if getattr(dbapi_connection, "_read_timeout", None) == handshake:
            dbapi_connection._read_timeout = call

    return raise_read_timeout


def _contended_order(conn: Connection, keys: list[TaskKey]) -> list[TaskKey]:
    """The order to lock the candidates ``keys`` (best first) in: theirs, or, on a Galera
    node whose claimers lost a conflict lately, its share first (see ``_CONTENDED_SECONDS``)."""
    share = conn.info.get(_GALERA_SHARE)
    if share is None or getattr(_contention, "until", 0.0) < time.monotonic():
        return keys
    index, size = share
    mine = [key for key in keys if _share_of(key, size) == index]
    return mine + [key for key in keys if _share_of(key, size) != index]


def _share_of(key: TaskKey, size: int) -> int:
    """The node share (0 .. size - 1) of a task: the same in every process."""
    return zlib.crc32("\0".join(key).encode()) % size


def _galera_session(dbapi_connection: Any, record: Any) -> None:
    """On a Galera node, add the causality checks the backend needs (``_GALERA_SYNC_WAIT``)
    to the new session's ``wsrep_sync_wait``, keeping the bits already set, and note the
    node's share of contended claims (``_CONTENDED_SECONDS``) in the connection's info.
    ``SHOW VARIABLES``, not ``@@wsrep_on``: every MySQL and MariaDB server answers it (MySQL
    has no such variable: no rows, nothing to do). One or three round trips per new
    connection."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SHOW VARIABLES WHERE Variable_name IN ('wsrep_on', 'wsrep_sync_wait')")
        settings = {str(name).lower(): str(value) for name, value in cursor.fetchall()}
        if settings.get("wsrep_on", "").upper() != "ON":
            return
        current = int(settings.get("wsrep_sync_wait") or 0)
        wanted = current | _GALERA_SYNC_WAIT
        if wanted != current:
            cursor.execute(f"SET SESSION wsrep_sync_wait = {wanted:d}")
        cursor.execute(
            "SHOW STATUS WHERE Variable_name IN ('wsrep_local_index', 'wsrep_cluster_size')"
        )
        status = {str(name).lower(): str(value) for name, value in cursor.fetchall()}
        index, size = status.get("wsrep_local_index"), status.get("wsrep_cluster_size")
        if index and size and index.isdigit() and size.isdigit() and int(index) < int(size):
            record.info[_GALERA_SHARE] = (int(index), int(size))
    finally:
        cursor.close()


def _tune_keepalives(dbapi_connection: Any, _record: Any) -> None:
    """Set the keepalive timers and ``TCP_USER_TIMEOUT`` on a new PyMySQL connection's
    socket (where the system has them: Linux)."""
    sock = getattr(dbapi_connection, "_sock", None)
    if sock is None:
        return
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECONDS),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECONDS),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", TCP_USER_TIMEOUT_MS),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _server_timeouts(call_seconds: float) -> str:
    """The session's server-side timeouts, on MariaDB only: no statement of a call runs
    longer than the call, nor does its transaction idle longer (past that, the client has
    given up; a server going on would hold its row locks for nothing until it notices the
    client is gone, 8 hours by default). The ``/*M! ... */`` part is MariaDB's executable
    comment: MariaDB runs it, MySQL (which has neither setting) skips it, and the
    statement is then a harmless assignment of a user variable."""
    whole = max(1, math.ceil(call_seconds))
    return (
        "SET @sayiir_timeouts = 1 /*M!, SESSION max_statement_time = "
        f"{call_seconds:.3f}, SESSION idle_transaction_timeout = {whole:d} */"
    )


def _claim_row(exists: bool) -> ClaimRow:
    return ClaimRow.PRESENT if exists else ClaimRow.ABSENT
