"""A silent network under ``SqlBackend``: no call hangs (docs/contract.md#timeouts).

The fault is a blackhole (``TcpProxy.blackhole``): connections stay up, new ones are accepted,
nothing is forwarded either way and nothing is reset. The proxy's kernel acknowledges every
packet, so TCP keepalives and ``tcp_user_timeout`` never fire: only the backend's own bounds
(the call watchdog, PyMySQL's read timeout, the drivers' connect timeouts) end a call.

Checked on PostgreSQL through psycopg2 and psycopg 3, and on MySQL/MariaDB through PyMySQL,
with short timeouts (2 s) so that the tests stay quick:

- each kind of call (a read, a claim, a fenced completion, a save, a heartbeat, the start-up
  of a fresh backend, a fresh pool's first call) raises ``BackendUnavailableError`` within the
  bound, with the driver's error as cause; once the network heals, the same backend object
  works at its next call, and nothing the failed calls sent was applied;
- a ``Worker`` under load rides out a blackhole of a few seconds: every workflow completes,
  no task result is recorded twice or lost (the store is read directly), and no backend call
  took longer than the documented bound.

No server is restarted: these tests run in the ordinary environments.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, cast

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from helpers.isolated_db import isolated_database
from helpers.tcp_proxy import TcpProxy
from sayiir_persistence import (
    AtTask,
    BackendUnavailableError,
    CompletionOutcome,
    CompletionResult,
    PersistenceError,
    PersistentBackend,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
)
from sayiir_persistence.provisioning import migrate
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.worker import Pipeline, TaskContext, TaskOutcome, Worker

CALL_TIMEOUT: Final = timedelta(seconds=2)
CONNECT_TIMEOUT: Final = timedelta(seconds=2)  # libpq's minimum
# Thread scheduling, the driver's own reaction, a loaded 2-core machine.
SLACK_SECONDS: Final = 1.5
# A call on a pooled connection, or one that opens a connection: either bound alone.
ONE_BOUND: Final = max(CALL_TIMEOUT, CONNECT_TIMEOUT).total_seconds() + SLACK_SECONDS
# The documented worst case: a call that opens a connection when its time is nearly spent.
WORST_BOUND: Final = (CALL_TIMEOUT + CONNECT_TIMEOUT).total_seconds() + SLACK_SECONDS
# How long a broken bound may hang before the test restores the network and fails.
HANG_SECONDS: Final = 15.0
TTL: Final = timedelta(seconds=30)

DRIVERS: Final = [
    pytest.param(("postgres", "psycopg2"), id="psycopg2", marks=pytest.mark.postgres),
    pytest.param(("postgres", "psycopg"), id="psycopg", marks=pytest.mark.postgres),
    pytest.param(("mysql", "pymysql"), id="pymysql", marks=pytest.mark.mysql),
]


@pytest.fixture(params=DRIVERS)
def driver_url(request: pytest.FixtureRequest) -> str:
    """The configured server's URL, through the driver under test."""
    kind, driver = request.param
    if importlib.util.find_spec(driver) is None:
        pytest.skip(f"{driver} is not installed")
    url = make_url(request.getfixturevalue(f"{kind}_url"))
    backend = "postgresql" if kind == "postgres" else "mysql"
    return url.set(drivername=f"{backend}+{driver}").render_as_string(hide_password=False)


@dataclass
class Silent:
    """A backend reached through a proxy that can go silent, and a direct one to check."""

    proxy: TcpProxy
    url: str
    backend: SqlBackend
    direct: SqlBackend

    def through_proxy(self, **options: Any) -> SqlBackend:
        return SqlBackend(
            self.url, call_timeout=CALL_TIMEOUT, connect_timeout=CONNECT_TIMEOUT, **options
        )


@pytest.fixture
def silent(driver_url: str) -> Iterator[Silent]:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(isolated_database(driver_url))
        migrate(url)
        proxy = stack.enter_context(TcpProxy.for_url(url))
        # Restored before the proxy closes, so that a failing test leaves no hung thread.
        stack.callback(proxy.restore)
        proxied = proxy.proxied_url(url)
        backend = stack.enter_context(
            contextlib.closing(
                SqlBackend(proxied, call_timeout=CALL_TIMEOUT, connect_timeout=CONNECT_TIMEOUT)
            )
        )
        direct = stack.enter_context(contextlib.closing(SqlBackend(url)))
        yield Silent(proxy, proxied, backend, direct)


def timed_failure(proxy: TcpProxy, call: Callable[[], object]) -> tuple[float, BaseException]:
    """Run ``call`` (in a thread, so that a hang cannot hang the test); how long it took to
    fail and with what. A call still running after ``HANG_SECONDS`` fails the test."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as error:  # handed to the test
            outcome.append(error)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(HANG_SECONDS)
    elapsed = time.monotonic() - started
    if thread.is_alive():
        proxy.restore()  # let it finish
        thread.join(HANG_SECONDS)
        pytest.fail(f"the call hung on a silent network for over {HANG_SECONDS:.0f}s")
    [error] = outcome
    assert error is not None, "the call succeeded on a silent network"
    return elapsed, error


def assert_unavailable(error: BaseException) -> None:
    assert isinstance(error, BackendUnavailableError), f"{error!r}"
    cause = error.__cause__
    assert isinstance(cause, sa_exc.SQLAlchemyError | OSError), f"cause {cause!r}"


def moved(snapshot: WorkflowSnapshot) -> WorkflowSnapshot:
    snapshot.move_to(AtTask("next"))
    return snapshot


def start(backend: PersistentBackend, instance_id: str) -> None:
    snapshot = WorkflowSnapshot.new(instance_id, "silent-v1", first_task="work")
    backend.save_snapshot(snapshot, expected_version=0)


def test_every_call_fails_within_the_bound_then_the_backend_works_again(silent: Silent) -> None:
    backend, direct = silent.backend, silent.direct
    for name in ("read", "claim", "complete", "save", "extend"):
        start(backend, name)
    completing = backend.claim_task("complete", "work", "w1", TTL)
    extending = backend.claim_task("extend", "work", "w1", TTL)
    assert completing is not None and extending is not None
    save = moved(backend.load_snapshot("save"))

    def complete() -> list[CompletionResult]:
        assert completing is not None
        return backend.complete_tasks(
            [TaskCompletion("complete", "work", "w1", completing.token, output=b"done")], ttl=TTL
        )

    calls: dict[str, Callable[[], object]] = {
        "load_snapshot": lambda: backend.load_snapshot("read"),
        "claim_task": lambda: backend.claim_task("claim", "work", "w1", TTL),
        "complete_tasks": complete,
        "save_snapshot": lambda: backend.save_snapshot(save, expected_version=1),
        "extend_task_claim": lambda: backend.extend_task_claim(
            "extend", "work", "w1", TTL, token=extending.token
        ),
        "claim_available_tasks": lambda: backend.claim_available_tasks("w1", 10, TTL),
        # A fresh backend: its start-up check opens the pool's first connection.
        "SqlBackend(...)": lambda: silent.through_proxy().close(),
    }
    fresh = silent.through_proxy(check_schema=False)
    calls["a fresh pool's first call"] = lambda: fresh.list_snapshots(limit=1)

    silent.proxy.blackhole()
    timings = {}
    for name, call in calls.items():
        elapsed, error = timed_failure(silent.proxy, call)
        assert_unavailable(error)
        assert elapsed <= ONE_BOUND, f"{name} took {elapsed:.1f}s to fail (bound {ONE_BOUND}s)"
        timings[name] = round(elapsed, 1)
    silent.proxy.restore()

    # The same backend objects work at their next call.
    assert backend.load_snapshot("read").version == 1
    assert fresh.list_snapshots(limit=10)
    fresh.close()
    # Nothing the failed calls sent was applied: the blackhole held their first statement.
    claim = backend.claim_task("claim", "work", "w1", TTL)
    assert claim is not None and claim.token == 1
    [done] = complete()
    assert done.outcome is CompletionOutcome.RECORDED
    assert direct.load_snapshot("complete").completed_tasks == {"work": b"done"}
    assert backend.save_snapshot(save, expected_version=1) == 2
    extended = backend.extend_task_claim("extend", "work", "w1", TTL, token=extending.token)
    assert extended.token == extending.token
    print(f"seconds to fail: {timings}")


def test_a_call_cut_off_mid_transaction_leaves_nothing_and_is_not_run_again(
    silent: Silent,
) -> None:
    """The blackhole starts while the call is in its transaction (its row lock taken): it
    fails within the bound; the server ends the abandoned transaction (its idle timeout),
    so that the row is free again for others."""
    backend, direct = silent.backend, silent.direct
    start(backend, "held")
    snapshot = moved(backend.load_snapshot("held"))
    entered = threading.Event()
    original = backend._write_snapshot

    def write_then_go_silent(*args: Any, **kwargs: Any) -> int:
        version = original(*args, **kwargs)
        silent.proxy.blackhole()
        entered.set()
        return version

    backend._write_snapshot = write_then_go_silent  # type: ignore[method-assign]
    elapsed, error = timed_failure(
        silent.proxy, lambda: backend.save_snapshot(snapshot, expected_version=1)
    )
    backend._write_snapshot = original  # type: ignore[method-assign]
    assert entered.is_set()
    assert_unavailable(error)
    assert elapsed <= ONE_BOUND, f"took {elapsed:.1f}s"
    # The server ends the transaction the client abandoned: the row lock is released (a
    # direct write, which waits for it, goes through) and the save was not applied.
    started = time.monotonic()
    assert direct.load_snapshot("held").version == 1
    assert direct.save_snapshot(snapshot, expected_version=1) == 2
    assert time.monotonic() - started <= ONE_BOUND + CALL_TIMEOUT.total_seconds()
    silent.proxy.restore()
    assert backend.load_snapshot("held").version == 2


class Timed:
    """A backend whose public calls are timed, and their errors kept (given to the Worker)."""

    def __init__(self, backend: PersistentBackend) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self.longest: dict[str, float] = {}
        self.errors: list[Exception] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._backend, name)
        if name.startswith("_") or not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return attribute(*args, **kwargs)
            except Exception as error:
                with self._lock:
                    self.errors.append(error)
                raise
            finally:
                elapsed = time.monotonic() - started
                with self._lock:
                    self.longest[name] = max(self.longest.get(name, 0.0), elapsed)

        return call


PIPELINE: Final = Pipeline("a", ("b", "c"), "d")
WORKFLOWS: Final = 16
BLACKHOLE_SECONDS: Final = 4.0


def test_a_worker_rides_out_a_silent_network(silent: Silent) -> None:
    backend, direct = silent.backend, silent.direct
    timed = Timed(backend)
    produced: dict[tuple[str, str], list[bytes]] = {}
    recorded: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()

    def handler(context: TaskContext) -> bytes:
        time.sleep(0.05)  # at most 80 tasks/s on 4 threads: work is left for after
        output = f"{context.task_id}:{uuid.uuid4()}".encode()
        with lock:
            produced.setdefault((context.instance_id, context.task_id), []).append(output)
        return output

    def on_outcome(context: TaskContext, outcome: TaskOutcome) -> None:
        if outcome is TaskOutcome.RECORDED:
            with lock:
                recorded[context.instance_id, context.task_id] += 1

    def progress() -> int:
        with lock:
            return sum(recorded.values())

    instance_ids = [f"silent-{number:02d}" for number in range(WORKFLOWS)]
    for instance_id in instance_ids:
        backend.save_snapshot(PIPELINE.start(instance_id, "pipeline-v1"), expected_version=0)
    worker = Worker(
        cast(PersistentBackend, timed),
        handler,
        PIPELINE,
        threads=4,
        ttl=timedelta(seconds=3),  # shorter than the blackhole: claims expire in it
        poll_interval=timedelta(milliseconds=50),
        shutdown_grace=timedelta(seconds=2),
        on_outcome=on_outcome,
    )
    total = WORKFLOWS * 4
    with worker:
        deadline = time.monotonic() + 20
        while progress() < 8:
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.02)
        silent.proxy.blackhole()
        time.sleep(BLACKHOLE_SECONDS)
        silent.proxy.restore()
        assert progress() < total, "nothing was left to do after the blackhole"
        deadline = time.monotonic() + 40
        while direct.list_snapshots(status=WorkflowStatus.IN_PROGRESS, limit=1):
            assert time.monotonic() < deadline, "workflows did not finish after the blackhole"
            time.sleep(0.1)

    unavailable = [e for e in timed.errors if isinstance(e, BackendUnavailableError)]
    assert unavailable, "no call met the blackhole: the test proved nothing"
    for error in timed.errors:
        assert isinstance(error, PersistenceError), f"raw exception {error!r}"
    slowest = max(timed.longest.values())
    assert slowest <= WORST_BOUND, f"a call took {slowest:.1f}s: {timed.longest}"
    for instance_id in instance_ids:
        snapshot = direct.load_snapshot(instance_id)
        assert snapshot.status is WorkflowStatus.COMPLETED, instance_id
        assert snapshot.completed_tasks.keys() == {"a", "b", "c", "d"}
        for task_id, output in snapshot.completed_tasks.items():
            assert output in produced[instance_id, task_id], "a result no execution made"
            # 0: a completion whose answer the blackhole held (its outcome unknown to the
            # worker) was committed all the same; the store has it.
            times = recorded[instance_id, task_id]
            assert times <= 1, f"{instance_id}/{task_id} recorded {times} times"
    # The store itself: one result row per task, none lost, none extra.
    with direct.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT COUNT(*) FROM sayiir_task_results WHERE instance_id LIKE 'silent-%'")
        ).scalar_one()
    assert rows == total
    print(
        f"longest calls (s): { {k: round(v, 1) for k, v in timed.longest.items()} }; "
        f"errors {Counter(type(e).__name__ for e in timed.errors)}"
    )
