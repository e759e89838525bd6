"""Wake-ups instead of polling (``PersistentBackend.work_waiter``, ``sayiir_persistence.wakeups``).

A write that makes a task runnable without claiming it wakes idle waiters: those of the same
process on every backend, those of every process on PostgreSQL (``LISTEN/NOTIFY``). The tests
give the workers a poll interval far longer than the time they have to pick the work up, so
that only a wake-up can explain a fast pick-up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy.engine import make_url

from helpers.databases import sql_params
from helpers.isolated_db import isolated_database
from sayiir_persistence import (
    IfExists,
    InMemoryBackend,
    PersistentBackend,
    TaskCompletion,
    WorkflowSnapshot,
    migrate,
)
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.worker import Pipeline, TaskContext, TaskOutcome, Worker

SLOW_POLL = timedelta(seconds=30)
PICK_UP_SECONDS = 5.0
TTL = timedelta(minutes=5)


@pytest.fixture(params=[pytest.param("memory", id="memory"), *sql_params()])
def urls(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """``None`` for the in-memory store, else the URL of a private, migrated database."""
    if request.param == "memory":
        yield None
        return
    with isolated_database(request.getfixturevalue(f"{request.param}_url")) as url:
        migrate(url)
        yield url


def _backend(url: str | None, memory: InMemoryBackend) -> PersistentBackend:
    return memory if url is None else SqlBackend(url)


def test_a_waiter_wakes_when_a_workflow_is_started_and_sleeps_otherwise(
    urls: str | None,
) -> None:
    memory = InMemoryBackend()
    backend = _backend(urls, memory)
    starter = _backend(urls, memory)  # another backend object on the same store
    waiter = backend.work_waiter()
    try:
        started = time.monotonic()
        assert waiter.wait(0.3) is False  # nothing announced
        assert time.monotonic() - started >= 0.25
        woke: list[bool] = []
        thread = threading.Thread(target=lambda: woke.append(waiter.wait(PICK_UP_SECONDS)))
        thread.start()
        time.sleep(0.2)
        starter.save_snapshot(WorkflowSnapshot.new("wf", "h", first_task="t"))
        thread.join()
        assert woke == [True]
        # A claim takes the task without announcing anything.
        assert starter.claim_available_tasks("w", 1, TTL)
        assert waiter.wait(0.3) is False
        # Its release makes it runnable again: announced.
        starter.release_task_claim("wf", "t", "w")
        assert waiter.wait(PICK_UP_SECONDS) is True
    finally:
        waiter.close()
        if urls is not None:
            backend.close()
            starter.close()


def test_start_workflow_announces_what_it_stores_and_nothing_else(urls: str | None) -> None:
    memory = InMemoryBackend()
    backend = _backend(urls, memory)
    starter = _backend(urls, memory)
    waiter = backend.work_waiter()
    try:
        assert waiter.wait(0.3) is False  # listening (PostgreSQL), nothing announced
        starter.start_workflow(WorkflowSnapshot.new("wf", "h", first_task="t"))
        assert waiter.wait(PICK_UP_SECONDS) is True
        # The stored run is used as it is: nothing written, nothing announced.
        again = WorkflowSnapshot.new("wf", "h", first_task="t")
        starter.start_workflow(again, if_exists=IfExists.USE_EXISTING)
        assert waiter.wait(0.3) is False
        # A replacement stores a new run with a runnable task.
        starter.start_workflow(again, if_exists=IfExists.TERMINATE_EXISTING)
        assert waiter.wait(PICK_UP_SECONDS) is True
    finally:
        waiter.close()
        if urls is not None:
            backend.close()
            starter.close()


def test_a_retried_workflow_wakes_waiters(urls: str | None) -> None:
    """``retry_workflow`` makes its failed task runnable again: announced once committed."""
    memory = InMemoryBackend()
    backend = _backend(urls, memory)
    try:
        backend.save_snapshot(WorkflowSnapshot.new("wf", "h", first_task="t"))
        [claimed] = backend.claim_available_tasks("w", 1, TTL)
        failure = TaskCompletion("wf", "t", "w", claimed.claim.token, error="boom")
        backend.complete_tasks([failure], ttl=TTL)
        waiter = backend.work_waiter()
        try:
            assert waiter.wait(0.3) is False  # a failed workflow has no work
            backend.retry_workflow("wf")
            assert waiter.wait(PICK_UP_SECONDS) is True
        finally:
            waiter.close()
    finally:
        if urls is not None:
            backend.close()


@pytest.mark.postgres
def test_postgres_wakes_waiters_of_other_processes(postgres_url: str) -> None:
    """A backend on another URL spelling shares no in-process signal with the waiter's: only
    PostgreSQL's NOTIFY can wake it, as it wakes the workers of other processes."""
    with isolated_database(postgres_url) as url:
        migrate(url)
        elsewhere = make_url(url).update_query_dict({"application_name": "elsewhere"})
        backend, starter = SqlBackend(url), SqlBackend(elsewhere)
        waiter = backend.work_waiter()
        try:
            assert waiter.wait(0.3) is False
            woke: list[bool] = []
            thread = threading.Thread(target=lambda: woke.append(waiter.wait(PICK_UP_SECONDS)))
            thread.start()
            time.sleep(0.3)
            starter.save_snapshot(WorkflowSnapshot.new("wf", "h", first_task="t"))
            thread.join()
            assert woke == [True]
        finally:
            waiter.close()
            backend.close()
            starter.close()


def test_an_idle_worker_picks_up_a_new_workflow_long_before_its_poll(urls: str | None) -> None:
    memory = InMemoryBackend()
    backend = _backend(urls, memory)
    starter = _backend(urls, memory)
    pipeline = Pipeline("t1", "t2", "t3")
    done = threading.Event()

    def on_outcome(ctx: TaskContext, outcome: TaskOutcome) -> None:
        if ctx.task_id == "t3":
            done.set()

    worker = Worker(
        backend,
        lambda ctx: ctx.task_id.encode(),
        pipeline,
        threads=2,
        poll_interval=SLOW_POLL,
        on_outcome=on_outcome,
    )
    try:
        with worker:
            time.sleep(0.5)  # the worker's first look found nothing: it waits for SLOW_POLL
            started = time.monotonic()
            starter.save_snapshot(pipeline.start("wf", "h"))
            assert done.wait(PICK_UP_SECONDS), "the workflow waited for a poll"
            elapsed = time.monotonic() - started
        assert elapsed < PICK_UP_SECONDS
        assert worker.stats.recorded == 3
    finally:
        if urls is not None:
            backend.close()
            starter.close()
