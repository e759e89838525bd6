"""SQL-specific behaviour on every database: large payloads, Unicode ids, errors, secrets."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, delete, make_url, select

from helpers.isolated_db import isolated_database
from sayiir_persistence import (
    BackendUnavailableError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SchemaError,
    WorkflowSnapshot,
)
from sayiir_persistence.provisioning import migrate
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.sql.dialects import ClaimRow, ClaimTerms, MySqlDialect
from sayiir_persistence.sql.errors import RetryableConflict
from sayiir_persistence.sql.schema import metadata, ready_tasks, task_claims, workflows
from sayiir_persistence.validation import DEFAULT_MAX_PAYLOAD_BYTES

UNICODE_IDS = ["ünïcødé-✓", "日本語のワークフロー", "emoji-😀-🚀", "😀" * 255, "quote'\";%_\\"]


@pytest.fixture
def backend(sql_url: str) -> Iterator[SqlBackend]:
    migrate(sql_url)
    backend = SqlBackend(sql_url)
    with backend.engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(delete(table))
    yield backend
    backend.close()


def test_payload_of_5_mb_round_trips_everywhere(backend: SqlBackend) -> None:
    payload = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    snapshot = WorkflowSnapshot.new("big", "h", initial_input=payload, first_task="t")
    backend.save_snapshot(snapshot)
    [task] = backend.find_available_tasks("w", 1)
    assert task.input == payload
    backend.save_task_result("big", "t", payload[::-1])
    backend.send_event("big", "e", payload)

    assert backend.load_snapshot("big").initial_input == payload
    assert backend.load_task_result("big", "t") == payload[::-1]
    assert backend.consume_event("big", "e") == payload


def test_payload_at_the_default_maximum_is_stored_whole(backend: SqlBackend) -> None:
    # Zero bytes are the worst case for MySQL's escaping (each becomes two bytes).
    payload = b"\x00" * DEFAULT_MAX_PAYLOAD_BYTES
    backend.save_snapshot(WorkflowSnapshot.new("max", "h", first_task="t"))
    backend.save_task_result("max", "t", payload)
    assert backend.load_task_result("max", "t") == payload
    with pytest.raises(InvalidInputError, match="output"):
        backend.save_task_result("max", "t", payload + b"\x00")


@pytest.mark.parametrize("instance_id", UNICODE_IDS)
def test_unicode_ids_round_trip(backend: SqlBackend, instance_id: str) -> None:
    snapshot = WorkflowSnapshot.new(instance_id, "h", first_task=instance_id, tags=[instance_id])
    backend.save_snapshot(snapshot)
    claim = backend.claim_task(instance_id, instance_id, instance_id, timedelta(minutes=1))
    assert claim is not None and claim.worker_id == instance_id
    loaded = backend.load_snapshot(instance_id)
    assert loaded.instance_id == instance_id
    assert loaded.tags == {instance_id}
    assert backend.list_snapshots() == [instance_id]


def test_ids_differing_in_case_or_trailing_space_are_distinct(backend: SqlBackend) -> None:
    # MySQL's default collations would make these equal; ids must compare byte for byte.
    ids = ["a", "A", "a ", "á"]
    for number, instance_id in enumerate(ids):
        backend.save_snapshot(WorkflowSnapshot.new(instance_id, f"h{number}"))
    assert backend.list_snapshots() == sorted(ids)
    assert [backend.load_snapshot(i).definition_hash for i in ids] == ["h0", "h1", "h2", "h3"]


def test_list_snapshots_is_in_code_point_order(backend: SqlBackend) -> None:
    ids = ["b", "B", "ä", "z", "Z", "é", "😀", "日", "a-1", "a_1", "a1"]
    for instance_id in ids:
        backend.save_snapshot(WorkflowSnapshot.new(instance_id, "h"))
    assert backend.list_snapshots() == sorted(ids)
    first = backend.list_snapshots(limit=4)
    assert first + backend.list_snapshots(after=first[-1]) == sorted(ids)


def test_timestamps_come_back_aware_utc(backend: SqlBackend) -> None:
    backend.save_snapshot(WorkflowSnapshot.new("t", "h", first_task="x"))
    loaded = backend.load_snapshot("t")
    claim = backend.claim_task("t", "x", "w", timedelta(seconds=30))
    assert claim is not None and claim.expires_at is not None
    for moment in (loaded.created_at, loaded.updated_at, claim.claimed_at, claim.expires_at):
        assert moment.tzinfo is not None and moment.utcoffset() == timedelta(0)
    assert claim.expires_at - claim.claimed_at == timedelta(seconds=30)
    assert loaded.updated_at.tzinfo == UTC


@pytest.mark.sqlite
def test_unprovisioned_database_raises_schema_error_naming_the_fix(sqlite_url: str) -> None:
    with pytest.raises(SchemaError, match="migrate"):
        SqlBackend(sqlite_url)


@pytest.mark.sqlite
def test_schema_error_on_call_when_tables_are_dropped(sqlite_url: str) -> None:
    migrate(sqlite_url)
    backend = SqlBackend(sqlite_url)
    metadata.drop_all(create_engine(sqlite_url))
    with pytest.raises(SchemaError):
        backend.load_snapshot("anything")


def test_unreachable_server_is_backend_unavailable_with_cause_and_masked_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "postgresql+psycopg2://user:s3cret-pw@127.0.0.1:1/nowhere"
    with caplog.at_level(logging.DEBUG), pytest.raises(BackendUnavailableError) as raised:
        SqlBackend(url)
    assert raised.value.__cause__ is not None
    assert "s3cret-pw" not in str(raised.value)
    assert "***" in str(raised.value)
    assert "s3cret-pw" not in caplog.text


def test_repr_masks_the_password() -> None:
    backend = SqlBackend("postgresql+psycopg2://user:s3cret-pw@127.0.0.1:1/x", check_schema=False)
    assert "s3cret-pw" not in repr(backend)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not a url", "not a valid database URL"),
        ("postgresql+psycopg2://u:s3cret-pw@host:port/db", "not a valid database URL"),
        ("sqlite://", "in-memory SQLite"),
        ("sqlite:///:memory:", "in-memory SQLite"),
        ("mssql+pymssql://u:s3cret-pw@h/db", "unsupported database"),
        (42, "engine_or_url must be"),
    ],
)
def test_bad_urls_are_invalid_input(value: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as raised:
        SqlBackend(value)  # type: ignore[arg-type]
    assert "s3cret-pw" not in str(raised.value)


def test_failed_calls_leave_their_pooled_connection_holding_no_lock(sql_url: str) -> None:
    """Each call ends its transaction itself (the pool does not reset connections on return,
    to spare MySQL a ROLLBACK round trip): calls that fail after locking the workflow row
    must not leave the lock on the connection they give back."""
    migrate(sql_url)
    backend = SqlBackend(sql_url, pool_size=1, max_overflow=0)  # one connection, reused
    try:
        with backend.engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                conn.execute(delete(table))
        snapshot = WorkflowSnapshot.new("wf", "h", first_task="t")
        backend.save_snapshot(snapshot)
        with pytest.raises(ConflictError):  # raised after locking the row
            backend.save_snapshot(snapshot, expected_version=7)
        assert not backend.save_snapshot_fenced(snapshot, "t", "nobody")  # rolled back
        with pytest.raises(NotFoundError):
            backend.release_task_claim("wf", "t", "nobody")
        backend.load_snapshot("wf")  # a read: on MySQL, a shared lock on the row

        # Another connection locks the row at once: nothing was left holding it.
        if make_url(sql_url).get_backend_name() == "sqlite":
            path = make_url(sql_url).database
            assert path is not None
            other = sqlite3.connect(path, timeout=0, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # "database is locked" if a writer was left
            other.execute("ROLLBACK")
            other.close()
        else:
            engine = create_engine(sql_url)
            with engine.begin() as conn:
                lock = select(workflows.c.version).with_for_update(nowait=True)
                assert conn.execute(lock).scalar_one() == 1
            engine.dispose()
    finally:
        backend.close()


def test_a_released_claim_row_locked_for_a_moment_is_waited_for_then_taken_over(
    backend: SqlBackend, sql_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer holding a free claim row (a late release, a heartbeat) delays a takeover by
    claim_available_tasks; it must neither fail nor need a retry of the transaction."""
    backend.save_snapshot(WorkflowSnapshot.new("wf", "h", first_task="t"))
    first = backend.claim_task("wf", "t", "w1", timedelta(minutes=1))
    assert first is not None
    backend.release_task_claim("wf", "t", "w1", token=first.token)

    engine = create_engine(sql_url)
    locked, done = threading.Event(), threading.Event()

    def hold_the_claim_row() -> None:
        with engine.begin() as conn:
            conn.execute(select(task_claims.c.token).with_for_update()).all()
            locked.set()
            done.wait(timeout=0.3)

    holder = threading.Thread(target=hold_the_claim_row)
    holder.start()
    try:
        assert locked.wait(timeout=10)
        caplog.set_level(logging.INFO, logger="sayiir_persistence.sql.backend")
        started = time.monotonic()
        [claimed] = backend.claim_available_tasks("w2", 5, timedelta(minutes=1))
        assert time.monotonic() - started < 10
    finally:
        done.set()
        holder.join()
        engine.dispose()
    assert (claimed.claim.worker_id, claimed.claim.token) == ("w2", first.token + 1)
    assert not [record for record in caplog.records if "retrying" in record.message]


@pytest.mark.parametrize("call", ["extend", "release"])
def test_a_renewal_or_release_locks_the_ready_row_before_the_claim_row(
    sql_url: str, call: str
) -> None:
    """A claimer locks a task's ready row, then its claim row (the order of every call). A
    renewal for less (which lowers the ready row's hint) or a release (which clears it) that
    locked the claim row first would deadlock with it: the database would refuse one of them."""
    migrate(sql_url)
    backend = SqlBackend(sql_url, max_retries=1)  # a deadlock would surface, not be retried
    engine = create_engine(sql_url)
    try:
        with backend.engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                conn.execute(delete(table))
        backend.save_snapshot(WorkflowSnapshot.new("wf", "h", first_task="t"))
        claim = backend.claim_task("wf", "t", "w1", timedelta(hours=1))
        assert claim is not None
        outcome: list[object] = []

        def renew_or_release() -> None:
            try:
                if call == "extend":
                    outcome.append(backend.extend_task_claim("wf", "t", "w1", timedelta(minutes=1)))
                else:
                    outcome.append(backend.release_task_claim("wf", "t", "w1"))
            except Exception as error:
                outcome.append(error)

        key = {"instance_id": "wf", "task_id": "t"}
        with engine.begin() as conn:
            conn.execute(select(ready_tasks).filter_by(**key).with_for_update()).all()
            other = threading.Thread(target=renew_or_release)
            other.start()
            time.sleep(0.5)  # the call now waits for a row this transaction holds
            conn.execute(select(task_claims).filter_by(**key).with_for_update()).all()
        other.join(timeout=30)
        assert not other.is_alive()
        assert len(outcome) == 1 and not isinstance(outcome[0], Exception), outcome
    finally:
        backend.close()
        engine.dispose()


@pytest.mark.mysql
def test_mysql_batch_of_first_claims_is_refused_whole_if_a_claim_row_exists(
    mysql_url: str,
) -> None:
    """MySQL inserts a batch of first claims with one INSERT IGNORE, on the lock statement's
    word that no claim row exists. If one does (committed between that read and the lock),
    which rows went in is unknown: the batch must raise for the transaction to run again,
    never hand out a task another worker holds."""
    migrate(mysql_url)
    backend = SqlBackend(mysql_url)
    try:
        with backend.engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                conn.execute(delete(table))
        for instance_id in ("free", "held"):
            backend.save_snapshot(WorkflowSnapshot.new(instance_id, "h", first_task="t"))
        held = backend.claim_task("held", "t", "w1", timedelta(minutes=1))
        assert held is not None

        now = datetime.now(UTC)
        misread = {("free", "t"): ClaimRow.ABSENT, ("held", "t"): ClaimRow.ABSENT}  # "held" too
        with backend.engine.connect() as conn:
            transaction = conn.begin()
            with pytest.raises(RetryableConflict, match="1 of 2 first claims already existed"):
                terms = ClaimTerms("w2", now, now + timedelta(minutes=1))
                MySqlDialect().claim_many(conn, misread, terms, {})
            transaction.rollback()  # what SqlBackend does before running it again

        again = backend.claim_task("held", "t", "w2", timedelta(minutes=1))
        assert again is None  # still held by w1
        assert backend.extend_task_claim("held", "t", "w1", timedelta(minutes=1)).token == 1
        free = backend.claim_task("free", "t", "w2", timedelta(minutes=1))
        assert free is not None and free.token == 1  # the rolled-back insert left nothing
    finally:
        backend.close()


def test_claims_do_not_come_back_empty_while_tasks_are_free(sql_url: str) -> None:
    """8 threads take one task per call from a backlog. A call may find every candidate it
    read claimed by the others before it could lock it (their claims committed after its
    snapshot); it must then look again, not return nothing while tasks are free (PostgreSQL
    returned nothing for 12-14 % of such calls).

    Tasks are only ever claimed here (never released, the TTL outlives the test), so a task
    that a read finds available after a call was available during the whole call: an empty
    call followed by such a read is a call that came back empty while work was free."""
    threads, limit, tasks = 8, 1, 600
    with isolated_database(sql_url) as url:
        migrate(url)
        backend = SqlBackend(url)
        try:
            for index in range(tasks):
                backend.save_snapshot(WorkflowSnapshot.new(f"wf{index:04d}", "h", first_task="t"))
            lock = threading.Lock()
            claimed: list[tuple[str, str]] = []
            empty_while_free: list[str] = []

            def take() -> None:
                while True:
                    got = backend.claim_available_tasks("w", limit, timedelta(minutes=5))
                    if not got:
                        still_free = backend.find_available_tasks("probe", 1)
                        if not still_free:
                            return
                        with lock:
                            empty_while_free.append(still_free[0].instance_id)
                    with lock:
                        claimed.extend((t.task.instance_id, t.task.task_id) for t in got)

            workers = [threading.Thread(target=take) for _ in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(120)
        finally:
            backend.close()
    assert len(claimed) == len(set(claimed)) == tasks
    assert empty_while_free == [], f"{len(empty_while_free)} empty calls while tasks were free"
