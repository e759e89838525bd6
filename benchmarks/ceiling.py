"""The ceiling: the claim cycle in hand-written SQL through the bare DBAPI driver.

No SQLAlchemy and no library code: psycopg2, pymysql or sqlite3 on the same ``sayiir_*``
tables, doing the minimum the library must do for the same three calls, each its own
transaction, with the same guarantees:

- ``claim_available_tasks``: pick the best runnable, unclaimed, untagged tasks of workflows
  with no pending signal (one indexed branch per priority, merged by effective priority
  ``priority * aging + updated_at``), lock them with ``SKIP LOCKED`` where the database has
  it, insert or take over their claim rows behind the "released or expired" guard, and read
  each task's input;
- ``save_task_result``: bump the workflow's version unless it is terminal, delete the ready
  row, re-date the sibling ready rows (at a fork), upsert the result;
- ``release_task_claim``: release the claim held by this worker with this token.

Where the library takes two statements and one would do (lock the candidates in the
statement that finds them on PostgreSQL, check and bump the version in one ``UPDATE``, one
multi-row ``INSERT IGNORE`` on MySQL), the ceiling takes one: that is the point of a ceiling.
One connection per thread, kept open (no pool, no ping). Every dialect difference is in the
``_Dialect`` subclasses below.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import make_url

Key = tuple[str, str]
PRIORITIES = range(1, 6)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TERMINAL = ("completed", "failed", "cancelled")
MAX_ATTEMPTS = 5


class ClaimLost(Exception):
    pass


class _Dialect:
    """What differs between the three drivers; SQL is written with ``?`` placeholders."""

    now = ""
    paramstyle_format = True  # psycopg2 and pymysql take %s, sqlite3 takes ?
    retryable: tuple[Any, ...] = ()

    def __init__(self, url: str) -> None:
        self.url = make_url(url)

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.paramstyle_format else text

    def connect(self) -> Any:
        raise NotImplementedError

    def begin(self, cursor: Any) -> None:
        """Start a transaction (psycopg2 and pymysql start one implicitly)."""

    def commit(self, conn: Any, cursor: Any) -> None:
        conn.commit()

    def rollback(self, conn: Any, cursor: Any) -> None:
        conn.rollback()

    def is_retryable(self, error: BaseException) -> bool:
        return False

    def plus(self, now: Any, ttl: timedelta) -> Any:
        """``now`` (as the driver returned it) + ``ttl``, as the driver takes it."""
        return now + ttl

    def micros(self, value: Any) -> int:
        """Microseconds since the epoch of a timestamp as the driver returns it."""
        micros: int = (value.replace(tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
        return micros

    def text_id(self, value: Any) -> str:
        return str(value)

    # -- the statements that differ -------------------------------------------------------

    def candidates_sql(self, wanted: int) -> str:
        """The best ``wanted`` available tasks of each priority (the index serves each)."""
        branch = (
            f"SELECT b{{p}}.*, {self.now} AS now FROM"
            " (SELECT r.instance_id, r.task_id, r.priority, r.updated_at"
            " FROM sayiir_ready_tasks r WHERE r.priority = {p}"
            f" AND (r.wake_at IS NULL OR r.wake_at <= {self.now})"
            " AND r.has_tags = FALSE"
            " AND NOT EXISTS (SELECT 1 FROM sayiir_signals s WHERE s.instance_id = r.instance_id)"
            " AND NOT EXISTS (SELECT 1 FROM sayiir_task_claims c"
            " WHERE c.instance_id = r.instance_id AND c.task_id = r.task_id"
            f" AND c.released = FALSE AND (c.expires_at IS NULL OR c.expires_at > {self.now}))"
            f" ORDER BY r.updated_at, r.instance_id, r.task_id LIMIT {wanted:d}) b{{p}}"
        )
        return " UNION ALL ".join(branch.format(p=p) for p in PRIORITIES)

    def pick(self, cursor: Any, limit: int, aging_us: int) -> tuple[list[Key], Any]:
        """Lock up to ``limit`` of the best candidates; also return the database clock."""
        cursor.execute(self.sql(self.candidates_sql(self.wanted(limit))))
        rows = list(cursor.fetchall())
        if not rows:
            return [], None
        rows.sort(
            key=lambda row: (
                row[2] * aging_us + self.micros(row[3]),
                self.micros(row[3]),
                self.text_id(row[0]),
                self.text_id(row[1]),
            )
        )
        keys = [(self.text_id(row[0]), self.text_id(row[1])) for row in rows]
        return self.lock(cursor, keys, limit), rows[0][4]

    def wanted(self, limit: int) -> int:
        return limit * 2 + 16  # some candidates will be locked by others: read more

    def lock(self, cursor: Any, keys: list[Key], limit: int) -> list[Key]:
        raise NotImplementedError

    def claim(
        self, cursor: Any, keys: list[Key], worker_id: str, now: Any, expires_at: Any
    ) -> dict[Key, int]:
        """Insert or take over (released or expired only) the claim rows; the new tokens."""
        rows = ", ".join("(?, ?, ?, 1, ?, ?, FALSE)" for _ in keys)
        params: list[Any] = []
        for instance_id, task_id in keys:
            params += [instance_id, task_id, worker_id, now, expires_at]
        cursor.execute(
            self.sql(
                "INSERT INTO sayiir_task_claims"
                " (instance_id, task_id, worker_id, token, claimed_at, expires_at, released)"
                f" VALUES {rows} ON CONFLICT (instance_id, task_id) DO UPDATE SET"
                " worker_id = excluded.worker_id, token = sayiir_task_claims.token + 1,"
                " claimed_at = excluded.claimed_at, expires_at = excluded.expires_at,"
                " released = FALSE"
                " WHERE sayiir_task_claims.released = TRUE"
                " OR (sayiir_task_claims.expires_at IS NOT NULL"
                " AND sayiir_task_claims.expires_at <= excluded.claimed_at)"
                " RETURNING instance_id, task_id, token"
            ),
            params,
        )
        return {(self.text_id(i), self.text_id(t)): token for i, t, token in cursor.fetchall()}

    def bump_version(
        self, cursor: Any, instance_id: str, task_id: str
    ) -> tuple[int, Any, bool] | None:
        """Version + 1 of a workflow that is not terminal (locks its row): the new version,
        its ``updated_at`` and whether it is at a fork; ``None`` if absent or terminal."""
        cursor.execute(
            self.sql(
                f"UPDATE sayiir_workflows SET version = version + 1, updated_at = {self.now},"
                " last_completed_task_id = ? WHERE instance_id = ?"
                " AND status NOT IN (?, ?, ?) RETURNING version, updated_at, position"
            ),
            [task_id, instance_id, *TERMINAL],
        )
        row = cursor.fetchone()
        if row is None:
            return None
        return row[0], row[1], json.loads(row[2])["kind"] == "fork"

    def put_result_sql(self, at: str) -> str:
        """Upsert a result; ``at`` is its time (a placeholder or the clock expression)."""
        return (
            "INSERT INTO sayiir_task_results (instance_id, task_id, output, completed_at)"
            f" VALUES (?, ?, ?, {at}) ON CONFLICT (instance_id, task_id) DO UPDATE"
            " SET output = excluded.output, completed_at = excluded.completed_at"
        )


class _Postgres(_Dialect):
    now = "statement_timestamp()"

    def connect(self) -> Any:
        import psycopg2

        url = self.url
        return psycopg2.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=url.database,
            **dict(url.query),
        )

    def is_retryable(self, error: BaseException) -> bool:
        return getattr(error, "pgcode", None) in ("40001", "40P01")

    def pick(self, cursor: Any, limit: int, aging_us: int) -> tuple[list[Key], Any]:
        # Find, order and lock in one statement: LockRows sits under the LIMIT, so rows
        # locked by others are skipped and the next ones taken.
        cursor.execute(
            self.sql(
                f"SELECT r.instance_id, r.task_id, {self.now} FROM sayiir_ready_tasks r"
                f" JOIN ({self.candidates_sql(self.wanted(limit))}) c"
                " ON c.instance_id = r.instance_id AND c.task_id = r.task_id"
                " ORDER BY c.priority * ? + (extract(epoch FROM c.updated_at) * 1000000)::bigint,"
                " c.updated_at, c.instance_id, c.task_id LIMIT ? FOR UPDATE OF r SKIP LOCKED"
            ),
            [aging_us, limit],
        )
        rows = cursor.fetchall()
        return [(row[0], row[1]) for row in rows], (rows[0][2] if rows else None)


class _Sqlite(_Dialect):
    now = "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"
    paramstyle_format = False

    def connect(self) -> Any:
        import sqlite3

        conn = sqlite3.connect(
            self.url.database or "", isolation_level=None, check_same_thread=False, timeout=30
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def begin(self, cursor: Any) -> None:
        # One writer at a time, as the library: the write lock is taken up front.
        cursor.execute("BEGIN IMMEDIATE")

    def commit(self, conn: Any, cursor: Any) -> None:
        cursor.execute("COMMIT")

    def rollback(self, conn: Any, cursor: Any) -> None:
        if conn.in_transaction:
            cursor.execute("ROLLBACK")

    def wanted(self, limit: int) -> int:
        return limit  # the write lock is held: what is read is what is available

    def micros(self, value: Any) -> int:
        return super().micros(datetime.fromisoformat(value))

    def plus(self, now: Any, ttl: timedelta) -> Any:
        return (datetime.fromisoformat(now) + ttl).strftime("%Y-%m-%d %H:%M:%S.%f")

    def lock(self, cursor: Any, keys: list[Key], limit: int) -> list[Key]:
        return keys[:limit]


class _MySql(_Dialect):
    """MariaDB/MySQL: ids are VARBINARY (bytes back), no ON CONFLICT, no UPDATE RETURNING."""

    now = "UTC_TIMESTAMP(6)"

    def connect(self) -> Any:
        import pymysql

        url = self.url
        conn = pymysql.connect(
            host=url.host,
            port=url.port or 3306,
            user=url.username,
            password=url.password or "",
            database=url.database,
            charset=url.query.get("charset", "utf8mb4"),
            autocommit=False,
            max_allowed_packet=64 * 1024 * 1024,
        )
        with conn.cursor() as cursor:
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        return conn

    def is_retryable(self, error: BaseException) -> bool:
        args: tuple[Any, ...] = getattr(error, "args", ())
        return len(args) > 0 and args[0] in (1213, 1205)

    def text_id(self, value: Any) -> str:
        return bytes(value).decode("utf-8") if not isinstance(value, str) else value

    def lock(self, cursor: Any, keys: list[Key], limit: int) -> list[Key]:
        # InnoDB locks every row a locking read visits before sorting and limiting: lock one
        # primary key at a time, best first.
        locked: list[Key] = []
        for instance_id, task_id in keys:
            if len(locked) == limit:
                break
            cursor.execute(
                "SELECT task_id FROM sayiir_ready_tasks WHERE instance_id = %s AND task_id = %s"
                " FOR UPDATE SKIP LOCKED",
                (instance_id, task_id),
            )
            if cursor.fetchone() is not None:
                locked.append((instance_id, task_id))
        return locked

    def claim(
        self, cursor: Any, keys: list[Key], worker_id: str, now: Any, expires_at: Any
    ) -> dict[Key, int]:
        # First claims (the usual case) in one statement; the rows it could not insert are
        # existing claims: take over those that are released or expired, one by one.
        rows = ", ".join("(%s, %s, %s, 1, %s, %s, FALSE)" for _ in keys)
        params: list[Any] = []
        for instance_id, task_id in keys:
            params += [instance_id, task_id, worker_id, now, expires_at]
        inserted = cursor.execute(
            "INSERT IGNORE INTO sayiir_task_claims"
            " (instance_id, task_id, worker_id, token, claimed_at, expires_at, released)"
            f" VALUES {rows}",
            params,
        )
        if inserted == len(keys):
            return dict.fromkeys(keys, 1)
        marks = ", ".join("(%s, %s)" for _ in keys)
        cursor.execute(
            "SELECT instance_id, task_id, worker_id, claimed_at, token FROM sayiir_task_claims"
            f" WHERE (instance_id, task_id) IN ({marks})",
            [part for key in keys for part in key],
        )
        tokens: dict[Key, int] = {}
        for instance_id, task_id, worker, claimed_at, token in cursor.fetchall():
            key = (self.text_id(instance_id), self.text_id(task_id))
            if self.text_id(worker) == worker_id and claimed_at == now and token == 1:
                tokens[key] = 1
        for instance_id, task_id in keys:
            if (instance_id, task_id) in tokens:
                continue
            taken = cursor.execute(
                "UPDATE sayiir_task_claims SET token = LAST_INSERT_ID(token + 1),"
                " worker_id = %s, claimed_at = %s, expires_at = %s, released = FALSE"
                " WHERE instance_id = %s AND task_id = %s AND (released = TRUE"
                " OR (expires_at IS NOT NULL AND expires_at <= %s))",
                (worker_id, now, expires_at, instance_id, task_id, now),
            )
            if taken == 1:
                tokens[instance_id, task_id] = cursor.lastrowid
        return tokens

    def bump_version(
        self, cursor: Any, instance_id: str, task_id: str
    ) -> tuple[int, Any, bool] | None:
        # No UPDATE ... RETURNING: LAST_INSERT_ID(expr) hands the new version back in the
        # OK packet. The position is not read back, so sibling rows are always re-dated.
        updated = cursor.execute(
            "UPDATE sayiir_workflows SET version = LAST_INSERT_ID(version + 1),"
            f" updated_at = {self.now}, last_completed_task_id = %s"
            " WHERE instance_id = %s AND status NOT IN (%s, %s, %s)",
            (task_id, instance_id, *TERMINAL),
        )
        if updated != 1:
            return None
        return cursor.lastrowid, None, True  # later statements read the clock themselves

    def put_result_sql(self, at: str) -> str:
        return (
            "INSERT INTO sayiir_task_results (instance_id, task_id, output, completed_at)"
            f" VALUES (?, ?, ?, {at}) ON DUPLICATE KEY UPDATE"
            " output = VALUES(output), completed_at = VALUES(completed_at)"
        )


def dialect_for(url: str) -> _Dialect:
    name = make_url(url).get_backend_name()
    if name == "postgresql":
        return _Postgres(url)
    if name in ("mysql", "mariadb"):
        return _MySql(url)
    if name == "sqlite":
        return _Sqlite(url)
    raise ValueError(f"no ceiling for {name}")


class CeilingClient:
    """The three calls of the claim cycle; thread-safe (one connection per thread)."""

    def __init__(
        self, url: str, threads: int = 0, aging_interval: timedelta = timedelta(minutes=5)
    ) -> None:
        self.dialect = dialect_for(url)
        self.aging_us = aging_interval // timedelta(microseconds=1)
        self._local = threading.local()
        self._lock = threading.Lock()
        # Opened now (one per thread to come), not in the measured time.
        self._connections = [self.dialect.connect() for _ in range(threads)]
        self._spare = list(self._connections)

    def close(self) -> None:
        for conn in self._connections:
            conn.close()

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                conn = self._spare.pop() if self._spare else None
            if conn is None:
                conn = self.dialect.connect()
                with self._lock:
                    self._connections.append(conn)
            self._local.conn = conn
        return conn

    def _transaction(self, work: Any) -> Any:
        conn = self._conn()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            cursor = conn.cursor()
            try:
                self.dialect.begin(cursor)
                result = work(cursor)
                self.dialect.commit(conn, cursor)
                return result
            except BaseException as error:
                self.dialect.rollback(conn, cursor)
                if attempt == MAX_ATTEMPTS or not self.dialect.is_retryable(error):
                    raise
                time.sleep(0.001 * attempt)
            finally:
                cursor.close()
        raise AssertionError("unreachable")

    def claim_available_tasks(
        self, worker_id: str, limit: int, ttl: timedelta
    ) -> list[tuple[str, str, int, bytes | None]]:
        """Claimed tasks as ``(instance_id, task_id, token, input)``."""
        dialect = self.dialect

        def work(cursor: Any) -> list[tuple[str, str, int, bytes | None]]:
            keys, now = dialect.pick(cursor, limit, self.aging_us)
            if not keys:
                return []
            expires_at = dialect.plus(now, ttl)
            tokens = dialect.claim(cursor, keys, worker_id, now, expires_at)
            claimed = [key for key in keys if key in tokens]
            if not claimed:
                return []
            marks = ", ".join("?" for _ in claimed)
            cursor.execute(
                dialect.sql(
                    "SELECT w.instance_id, w.definition_hash, w.priority, w.tags, w.version,"
                    " w.initial_input, w.input_task_id, ir.output FROM sayiir_workflows w"
                    " LEFT JOIN sayiir_task_results ir ON ir.instance_id = w.instance_id"
                    f" AND ir.task_id = w.input_task_id WHERE w.instance_id IN ({marks})"
                ),
                [instance_id for instance_id, _ in claimed],
            )
            by_instance = {dialect.text_id(row[0]): row for row in cursor.fetchall()}
            tasks = []
            for instance_id, task_id in claimed:
                row = by_instance[instance_id]
                json.loads(row[3])  # the tags, decoded as the library hands them out
                task_input = row[5] if row[6] is None else row[7]
                if task_input is not None:
                    task_input = bytes(task_input)  # psycopg2 returns bytea as memoryview
                tasks.append((instance_id, task_id, tokens[instance_id, task_id], task_input))
            return tasks

        return self._transaction(work)  # type: ignore[no-any-return]

    def save_task_result(self, instance_id: str, task_id: str, output: bytes) -> int:
        dialect = self.dialect

        def work(cursor: Any) -> int:
            bumped = dialect.bump_version(cursor, instance_id, task_id)
            if bumped is None:
                raise LookupError(f"{instance_id!r} is absent or terminal")
            version, now, at_fork = bumped
            at = dialect.now if now is None else "?"
            stamp = [] if now is None else [now]
            cursor.execute(
                dialect.sql("DELETE FROM sayiir_ready_tasks WHERE instance_id = ? AND task_id = ?"),
                [instance_id, task_id],
            )
            if at_fork:  # the other branches were saved now too: aging counts from here
                cursor.execute(
                    dialect.sql(
                        f"UPDATE sayiir_ready_tasks SET updated_at = {at} WHERE instance_id = ?"
                    ),
                    [*stamp, instance_id],
                )
            cursor.execute(
                dialect.sql(dialect.put_result_sql(at)), [instance_id, task_id, output, *stamp]
            )
            return int(version)

        return self._transaction(work)  # type: ignore[no-any-return]

    def release_task_claim(
        self, instance_id: str, task_id: str, worker_id: str, token: int
    ) -> None:
        dialect = self.dialect

        def work(cursor: Any) -> None:
            cursor.execute(
                dialect.sql(
                    "UPDATE sayiir_task_claims SET released = TRUE WHERE instance_id = ?"
                    " AND task_id = ? AND worker_id = ? AND released = FALSE AND token = ?"
                ),
                [instance_id, task_id, worker_id, token],
            )
            if cursor.rowcount != 1:
                raise ClaimLost(f"no claim of {worker_id!r} on {task_id!r} of {instance_id!r}")

        self._transaction(work)
