"""The stores the worker tests run on: each selected database, a private schema per test.

Import the fixtures (``store``, ``real_time_store``) into a test module to use them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from helpers.databases import sql_params
from helpers.isolated_db import isolated_database
from sayiir_persistence import InMemoryBackend, PersistentBackend, WorkflowStatus
from sayiir_persistence.provisioning import migrate
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.testing import ManualClock
from sayiir_persistence.worker import Pipeline, TaskFunction, Worker

FAST_POLL = timedelta(milliseconds=20)
WAIT_SECONDS = 20.0


@dataclass
class Store:
    """A backend for one test (on servers, in a private schema or database: workers would
    otherwise claim other tests' tasks), and a way to let claims expire: advance the manual
    clock, or wait for real on SQL."""

    backend: PersistentBackend
    definition: str
    clock: ManualClock | None = None

    def start(self, pipeline: Pipeline, count: int = 1, payload: bytes = b"") -> list[str]:
        ids = []
        for number in range(count):
            instance_id = f"{self.definition}-{number:03d}"
            snapshot = pipeline.start(instance_id, self.definition, initial_input=payload)
            self.backend.save_snapshot(snapshot, expected_version=0)
            ids.append(instance_id)
        return ids

    def let_expire(self, ttl: timedelta) -> None:
        if self.clock is not None:
            self.clock.advance(ttl * 2)
        else:
            time.sleep(ttl.total_seconds() * 1.5)

    def worker(
        self,
        handlers: dict[str, TaskFunction] | TaskFunction,
        pipeline: Pipeline,
        **options: Any,
    ) -> Worker:
        options.setdefault("poll_interval", FAST_POLL)
        return Worker(self.backend, handlers, {self.definition: pipeline}, **options)


def _open_store(
    request: pytest.FixtureRequest, kind: str, *, manual_clock: bool
) -> Iterator[Store]:
    definition = f"wt-{uuid.uuid4().hex[:10]}"
    if kind == "memory":
        clock = ManualClock() if manual_clock else None
        yield Store(InMemoryBackend(clock=clock), definition, clock)
        return
    server_url: str = request.getfixturevalue(f"{kind}_url")
    with isolated_database(server_url) as url:
        migrate(url)
        backend = SqlBackend(url)
        try:
            yield Store(backend, definition)
        finally:
            backend.close()


STORE_PARAMS = [pytest.param("memory", id="memory"), *sql_params()]


@pytest.fixture(params=STORE_PARAMS)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """Each selected store; the in-memory one on a manual clock."""
    yield from _open_store(request, request.param, manual_clock=True)


@pytest.fixture(params=STORE_PARAMS)
def real_time_store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """Each selected store, judging expiry by real time (for heartbeat tests)."""
    yield from _open_store(request, request.param, manual_clock=False)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def all_done(store: Store, ids: list[str]) -> Callable[[], bool]:
    return lambda: all(
        store.backend.load_snapshot(i).status is not WorkflowStatus.IN_PROGRESS for i in ids
    )
