"""Model-based tests: random operation sequences against a store and a reference model.

A Hypothesis ``RuleBasedStateMachine`` drives random sequences of the contract's operations
(starts with each ``IfExists``, snapshot saves with and without an expected version, fenced
saves, task results, claims and their release and heartbeat with and without fencing tokens,
find/claim of available tasks, cancel/pause signals, events, deletes, prunes of finished
workflows, loads, clock advances)
against a backend and against ``reference_model.ReferenceModel``, a few plain dictionaries
written from docs/contract.md.
After every step the whole observable state is compared as well: the instance list, every
stored snapshot and the tasks available to a worker that fits every tag. Any divergence in a
return value, the class of a raised error, a stored field, a claim's holder or token (which
must strictly increase, also past the tokens of a deleted instance of the same id), or the FIFO
order of events fails the test.

The world is kept small so that sequences collide often: three instances, three task ids (plus
a signal id that can also carry a result), three workers, two tags, two event names, and the
positions ``NotStarted``, ``AtTask``, ``AtFork``, ``AtDelay`` and ``AtSignal``. Targets are
drawn at run time from the model's state most of the time (a stored instance, a runnable task,
a claim by its holder, a pending signal, the event an instance waits for) and otherwise from
the whole world, so that absent instances, foreign claims and stale tokens come up too (the
holders of claims of deleted instances among them, with their old tokens).

Time. The model counts whole seconds from the start of an example ("virtual time"). The clock
only ever advances by whole minutes, and every claim TTL and delay is a whole minute plus 30 s,
so no expiry or wake-up ever falls within 30 s of a moment at which the store is asked:

- the in-memory backend runs on a ``ManualClock`` that the machine advances: store time is
  virtual time exactly, and timestamps are compared for equality;
- an SQL backend judges time by the database server's clock, which cannot be set. Advancing it
  by ``d`` is done instead by :func:`shift_stored_times`: one transaction moves every timestamp
  the store wrote by its own clock back by ``d`` (claims' ``claimed_at``/``expires_at``, ready
  tasks' ``updated_at``/``wake_at``, workflows' ``updated_at`` and the ``wake_at`` inside the
  stored position, results' ``completed_at``, events' ``created_at``). As the backend only ever
  compares stored timestamps with its clock or with each other, that is the same as moving the
  clock forward by ``d``. Caller-supplied timestamps that the store never compares with its
  clock are left alone (a snapshot's ``created_at``, a signal's ``requested_at``);
  :func:`test_time_shift_covers_every_timestamp_column` fails when a new timestamp column is
  not classified. The server clock still runs while an example executes, so store timestamps
  are checked to lie in ``[expected, expected + 30 s)``, and an example that runs for 25 s
  (``MARGIN - DRIFT_SAFETY``) fails loudly instead of comparing ambiguous times.

The tie-break of ``find/claim_available_tasks`` among tasks of equal rank depends on the exact
time of their last save; on the in-memory backend that is the virtual time and the order is
checked exactly, on SQL any order within equal ranks is accepted (still: the best ones, in rank
order, tasks of one instance by task id).

Budget: up to 100 steps per sequence; the number of sequences is a share of the Hypothesis
profile's ``max_examples`` (see ``tests/conftest.py`` and ``HYPOTHESIS_PROFILE``): all of it in
memory, a quarter on SQLite, an eighth on a server, about ten seconds each with the default
profile. A heavier profile runs more.

The two tests at the end reproduce, minimally, the divergences of ``SqlBackend`` this machine
found (a result saved for another task did not restart the aging of the position's ready tasks;
an event did not replace a result already stored for its signal id).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar, Protocol, TypeVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, Table, bindparam, delete, select, update
from sqlalchemy.engine import Connection

from helpers.databases import MEMORY, sql_params
from helpers.isolated_db import isolated_database
from helpers.reference_model import (
    TERMINAL,
    Candidate,
    Completion,
    Delay,
    Draft,
    ExpectedClaim,
    ModelPosition,
    ReferenceModel,
    Step,
    Workflow,
)
from sayiir_persistence import (
    AtDelay,
    AtFork,
    AtSignal,
    AtTask,
    AvailableTask,
    IfExists,
    InMemoryBackend,
    NotStarted,
    PersistenceError,
    PersistentBackend,
    Position,
    SignalKind,
    SignalRequest,
    SqlBackend,
    TaskClaim,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
    migrate,
)
from sayiir_persistence.sql import codec
from sayiir_persistence.sql.dialects import dialect_for
from sayiir_persistence.sql.schema import (
    consumed_events,
    events,
    metadata,
    ready_tasks,
    sent_events,
    signals,
    snapshot_writes,
    task_claims,
    task_results,
    workflows,
)
from sayiir_persistence.sql.types import UtcDateTime
from sayiir_persistence.testing import ManualClock

T = TypeVar("T")
U = TypeVar("U")

# -- the world -------------------------------------------------------------------------------

INSTANCES = ("wf-a", "wf-b", "wf-c")
TASKS = ("t1", "t2", "t3")
SIGNAL_ID = "s1"  # also a task id a result may be saved for
RESULT_IDS = (*TASKS, SIGNAL_ID)
WORKERS = ("w1", "w2", "w3")
TAGS = ("gpu", "eu")
ALL_TAGS = frozenset(TAGS)
EVENT_NAMES = ("go", "other")
# Keys of keyed sends and consumes: few, so that repeats (and conflicts) happen; None: no key.
EVENT_KEYS = (None, None, "k1", "k2")
FORK_ID = "fork"
DELAY_ID = "delay"

# Virtual time, in seconds. Moments the store is asked at are whole minutes; expiries and
# wake-ups are whole minutes plus 30 s; so real time may drift up to 30 s unambiguously.
MINUTE = 60
MARGIN = timedelta(seconds=30)
DRIFT_SAFETY = timedelta(seconds=5)  # the server's and the local clock may disagree on rates
ADVANCES = (MINUTE, 2 * MINUTE)
TTLS = (None, MINUTE + 30, 2 * MINUTE + 30)
DELAY_OFFSETS = (-30, 30, MINUTE + 30, 2 * MINUTE + 30)
AGING_INTERVALS = (MINUTE, 2 * MINUTE, 5 * MINUTE)
INSPECTION_AGING = MINUTE

MEMORY_EPOCH = datetime(2030, 1, 1, tzinfo=UTC)
CREATED_BASE = datetime(2020, 1, 1, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))
# Two W3C traceparents a drawn snapshot may carry (docs/contract.md#trace-context).
TRACE_A = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_B = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"

# -- strategies ------------------------------------------------------------------------------

instance_ids = st.sampled_from(INSTANCES)
task_ids = st.sampled_from(TASKS)
worker_ids = st.sampled_from(WORKERS)
optional_task_ids = st.sampled_from((*TASKS, None))
payloads = st.binary(max_size=3)
ttls = st.sampled_from(TTLS)
max_attempt_choices = st.sampled_from((None, 1, 2))
# A failed attempt fails its workflow (None) or is retried after a while.
retry_delays = st.sampled_from((None, MINUTE + 30))
# Some operations happen a minute after the previous one: the clock advances first.
laters = st.sampled_from((0, 0, MINUTE))
tag_sets = st.frozensets(st.sampled_from(TAGS))
worker_tag_sets = st.just(ALL_TAGS) | tag_sets
aging_intervals = st.sampled_from(AGING_INTERVALS)
limits = st.integers(1, 4)
signal_kinds = st.sampled_from(SignalKind)
# None, the stored version, one behind, one ahead, or "create only if absent".
VersionChoice = str | int | None
expected_versions: st.SearchStrategy[VersionChoice] = (
    st.none() | st.sampled_from(("stored", "behind", "ahead")) | st.just(0)
)
# No token, the stored claim's token, one behind, one ahead.
# "retired": the token of the task's claim in a deleted instance of the id (a stale holder).
token_choices = st.sampled_from(("none", "stored", "behind", "ahead", "retired"))
requests = st.builds(
    SignalRequest,
    reason=st.none() | st.just("maintenance"),
    requested_by=st.none() | st.just("ops"),
    requested_at=st.sampled_from(
        (datetime(2024, 5, 1, 12, tzinfo=UTC), datetime(2024, 5, 1, 14, 30, tzinfo=PLUS_TWO))
    ),
)


@dataclass(frozen=True)
class DelaySpec:
    """A delay drawn before the current virtual time is known: wakes ``offset`` s from now."""

    offset: int
    next_task_id: str | None


PositionSpec = NotStarted | AtTask | AtFork | AtSignal | DelaySpec

position_specs: st.SearchStrategy[PositionSpec] = st.one_of(
    st.just(NotStarted()),
    st.builds(AtTask, task_ids),
    st.builds(
        lambda branches: AtFork(FORK_ID, tuple(branches)),
        st.lists(task_ids, min_size=1, max_size=3),
    ),
    st.builds(DelaySpec, st.sampled_from(DELAY_OFFSETS), optional_task_ids),
    st.builds(
        lambda name, next_task: AtSignal(SIGNAL_ID, name, None, next_task),
        st.sampled_from(EVENT_NAMES),
        optional_task_ids,
    ),
)


def resolve_position(spec: PositionSpec, now: int) -> ModelPosition:
    if isinstance(spec, DelaySpec):
        return Delay(DELAY_ID, now + spec.offset, spec.next_task_id)
    return spec


@dataclass(frozen=True)
class DraftSpec:
    """A fresh snapshot as a caller may build it (any combination of valid fields)."""

    instance_id: str
    definition_hash: str
    status: WorkflowStatus
    position: PositionSpec
    completed_tasks: dict[str, bytes]
    last_completed_task_id: str | None
    input_task_id: str | None
    initial_input: bytes | None
    output: bytes | None
    error: str | None
    cancel_request: SignalRequest | None
    pause_request: SignalRequest | None
    priority: int
    tags: frozenset[str]
    created_at: datetime
    trace_context: str | None

    def resolve(self, now: int) -> Draft:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["position"] = resolve_position(self.position, now)
        return Draft(**fields)


def draft_specs(**overrides: st.SearchStrategy[Any]) -> st.SearchStrategy[DraftSpec]:
    """Fresh snapshots; ``overrides`` replace the strategies of some fields."""
    fields: dict[str, st.SearchStrategy[Any]] = {
        "instance_id": instance_ids,
        "definition_hash": st.sampled_from(("h1", "h2")),
        "status": st.sampled_from(
            [WorkflowStatus.IN_PROGRESS] * 12
            + [status for status in WorkflowStatus if status is not WorkflowStatus.IN_PROGRESS]
        ),
        "position": position_specs,
        "completed_tasks": st.just({})
        | st.dictionaries(st.sampled_from(RESULT_IDS), payloads, max_size=2),
        "last_completed_task_id": st.none() | st.sampled_from(RESULT_IDS),
        "input_task_id": st.none() | st.sampled_from(RESULT_IDS),
        "initial_input": st.none() | payloads,
        "output": st.none() | payloads,
        "error": st.none() | st.just("boom"),
        "cancel_request": st.none() | requests,
        "pause_request": st.none() | requests,
        # Mostly one priority: ties make the aging order matter.
        "priority": st.sampled_from((3, 3, 3, 1, 2, 4, 5)),
        "tags": st.just(frozenset[str]()) | tag_sets,
        "trace_context": st.sampled_from((None, TRACE_A, TRACE_B)),
        "created_at": st.builds(
            lambda seconds, tz: (CREATED_BASE + timedelta(seconds=seconds)).astimezone(tz),
            st.integers(0, 10**6),
            st.sampled_from((UTC, PLUS_TWO)),
        ),
    }
    fields.update(overrides)
    return st.builds(DraftSpec, **fields)


# Workflows with work to do: what a run starts from.
started_specs = draft_specs(
    status=st.just(WorkflowStatus.IN_PROGRESS),
    position=st.one_of(
        st.builds(AtTask, task_ids),
        st.builds(
            lambda branches: AtFork(FORK_ID, tuple(branches)),
            st.lists(task_ids, min_size=1, max_size=3),
        ),
    ),
    completed_tasks=st.just({}),
    cancel_request=st.none(),
    pause_request=st.none(),
)


@dataclass(frozen=True)
class Progress:
    """How a worker moves a loaded snapshot on before saving it back."""

    complete: tuple[str, bytes] | None  # mark this task completed with this output
    move_to: PositionSpec | None
    finish: str | None  # "complete" or "fail"
    keep_results: bool  # False: the saved snapshot lists only the new result


progresses = st.builds(
    Progress,
    complete=st.none() | st.tuples(st.sampled_from(RESULT_IDS), payloads),
    move_to=st.none() | position_specs,
    finish=st.sampled_from((None,) * 6 + ("complete", "fail")),
    keep_results=st.booleans(),
)

# What a completion's advance function does: nothing (no function), one of the steps.
StepSpec = tuple[str, PositionSpec | None]
step_specs: st.SearchStrategy[StepSpec | None] = st.none() | st.one_of(
    st.tuples(st.just("move"), position_specs),
    st.tuples(st.sampled_from(("complete", "fail", "raise", "keep")), st.none()),
)
completion_tokens = st.sampled_from(("stored", "stored", "stored", "behind", "ahead", "retired"))


class AdvanceBroke(Exception):
    """Raised by a drawn advance function of kind "raise"."""


# -- stores ----------------------------------------------------------------------------------


class Store(Protocol):
    """A backend plus control of its clock, in the model's virtual seconds."""

    exact_time: bool  # store timestamps are exactly the virtual ones (else up to MARGIN later)
    share: float  # of the Hypothesis profile's max_examples to run (by the cost of a step)

    @property
    def backend(self) -> PersistentBackend: ...

    def reset(self) -> None:
        """Empty the store; virtual time 0 is now."""

    def advance(self, seconds: int) -> None:
        """Move the store's clock forward."""

    def at(self, virtual: int) -> datetime:
        """The store-clock timestamp that virtual time ``virtual`` is stored as, right now."""

    def check_drift(self) -> None:
        """Fail unless the store's clock is still within MARGIN of virtual time."""


class MemoryStore:
    exact_time = True
    share = 1.0

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.clock = ManualClock(MEMORY_EPOCH)
        self.backend: PersistentBackend = InMemoryBackend(clock=self.clock)

    def advance(self, seconds: int) -> None:
        self.clock.advance(timedelta(seconds=seconds))

    def at(self, virtual: int) -> datetime:
        return MEMORY_EPOCH + timedelta(seconds=virtual)

    def check_drift(self) -> None:
        pass  # the manual clock does not move by itself


# Timestamp columns the store fills from its own clock (or compares with it): shifted back to
# advance the clock. Positions (JSON text in sayiir_workflows.position) hold delay wake times
# too; shift_stored_times rewrites them as well.
SHIFTED_COLUMNS = {
    workflows: ("updated_at", "deadline"),
    task_results: ("completed_at",),
    ready_tasks: ("updated_at", "wake_at", "claimed_until"),
    task_claims: ("claimed_at", "expires_at", "deadline"),
    events: ("created_at",),
    sent_events: ("sent_at",),
    consumed_events: ("consumed_at",),
    snapshot_writes: ("written_at",),
}
# Caller-supplied timestamps the store returns as given and never compares with its clock.
UNSHIFTED_COLUMNS = {workflows: ("created_at",), signals: ("requested_at",)}


def _shift_position(text: str, delta: timedelta) -> str:
    position = codec.decode_position(text)
    if isinstance(position, AtDelay | AtSignal) and position.wake_at is not None:
        position = dataclasses.replace(position, wake_at=position.wake_at - delta)
    return codec.encode_position(position)


def shift_stored_times(engine: Engine, delta: timedelta) -> None:
    """Age everything the store holds by ``delta``: as if its clock jumped ``delta`` ahead.

    One transaction; rows are read and written back through the tables' own column types.
    """
    with engine.begin() as conn:
        for table, names in SHIFTED_COLUMNS.items():
            _shift_table(conn, table, names, delta)


def _shift_table(conn: Connection, table: Table, names: tuple[str, ...], delta: timedelta) -> None:
    keys = list(table.primary_key.columns)
    rewritten = [table.c[name] for name in names]
    if table is workflows:
        rewritten.append(workflows.c.position)
    rows = conn.execute(select(*keys, *rewritten)).all()
    if not rows:
        return
    parameters = []
    for row in rows:
        values = {f"key_{column.name}": row._mapping[column] for column in keys}
        for column in rewritten:
            value = row._mapping[column]
            if column is workflows.c.position:
                value = _shift_position(value, delta)
            elif value is not None:
                value = value - delta
            values[f"new_{column.name}"] = value
        parameters.append(values)
    conn.execute(
        update(table)
        .where(*(column == bindparam(f"key_{column.name}") for column in keys))
        .values(
            {
                column.name: bindparam(f"new_{column.name}", type_=column.type)
                for column in rewritten
            }
        ),
        parameters,
    )


class SqlStore:
    """An ``SqlBackend`` on a private database; time advances by :func:`shift_stored_times`."""

    exact_time = False

    def __init__(self, backend: SqlBackend) -> None:
        self.backend: SqlBackend = backend
        self.share = 0.25 if backend.engine.dialect.name == "sqlite" else 0.12
        dialect = dialect_for(
            backend.engine.dialect.name, sqlite_busy_timeout=timedelta(seconds=30)
        )
        self._now_query = select(dialect.now())
        self.reset()

    def _db_now(self) -> datetime:
        with self.backend.engine.connect() as conn:
            now: datetime = conn.execute(self._now_query).scalar_one()
        return now

    def reset(self) -> None:
        with self.backend.engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):  # our private database only
                conn.execute(delete(table))
        # The server clock runs at the local clock's rate: time.monotonic() measures how far
        # it has moved from `origin` without asking the server.
        self.started = time.monotonic()
        self.origin = self._db_now()
        self.shifted = 0

    def advance(self, seconds: int) -> None:
        shift_stored_times(self.backend.engine, timedelta(seconds=seconds))
        self.shifted += seconds

    def check_drift(self) -> None:
        elapsed = timedelta(seconds=time.monotonic() - self.started)
        assert elapsed < MARGIN - DRIFT_SAFETY, (
            f"this example has run for {elapsed}: the database clock has moved too far from "
            "virtual time for the expiries and wake-ups of this test to be unambiguous"
        )

    def at(self, virtual: int) -> datetime:
        return self.origin + timedelta(seconds=virtual - self.shifted)


# -- the state machine -----------------------------------------------------------------------


def _is_in_progress(workflow: Workflow) -> bool:
    return workflow.status is WorkflowStatus.IN_PROGRESS


def _is_failed(workflow: Workflow) -> bool:
    return workflow.status is WorkflowStatus.FAILED


def _is_paused(workflow: Workflow) -> bool:
    return workflow.status is WorkflowStatus.PAUSED


def _awaits_event(workflow: Workflow) -> bool:
    return isinstance(workflow.position, AtSignal)


def _key(task: AvailableTask | Candidate) -> tuple[str, str]:
    return task.instance_id, task.task_id


class ContractMachine(RuleBasedStateMachine):
    """Every rule runs one operation on the model and on the store and compares outcomes."""

    store: ClassVar[Store]

    def __init__(self) -> None:
        super().__init__()
        self.store.reset()
        self.model = ReferenceModel()

    @property
    def backend(self) -> PersistentBackend:
        return self.store.backend

    # -- comparison helpers ------------------------------------------------------------------

    def both(self, what: str, expect: Callable[[], T], act: Callable[[], U]) -> tuple[T, U] | None:
        """Run the model's and the store's side; same error class, or both values.

        Reports the outcome as a Hypothesis event (``--hypothesis-show-statistics``).
        """
        self.store.check_drift()
        expected_error: type[PersistenceError] | None = None
        actual_error: type[PersistenceError] | None = None
        try:
            expected = expect()
        except PersistenceError as error:
            expected_error = type(error)
        try:
            actual = act()
        except PersistenceError as error:
            actual_error = type(error)
        assert actual_error is expected_error, (
            f"store raised {actual_error and actual_error.__name__}, "
            f"model raised {expected_error and expected_error.__name__}"
        )
        if expected_error is not None:
            event(f"{what}: {expected_error.__name__}")
            return None
        event(f"{what}: {expected!r}" if isinstance(expected, bool | None) else f"{what}: ok")
        return expected, actual

    def check_time(self, actual: datetime | None, virtual: int | None, what: str) -> None:
        if virtual is None or actual is None:
            assert actual is None and virtual is None, f"{what}: {actual} vs virtual {virtual}"
            return
        expected = self.store.at(virtual)
        if self.store.exact_time:
            assert actual == expected, what
        else:
            assert expected <= actual < expected + MARGIN, f"{what}: {actual}, expected {expected}"

    def to_position(self, position: ModelPosition) -> Position:
        if isinstance(position, Delay):
            return AtDelay(
                position.delay_id, self.store.at(position.wake_at), position.next_task_id
            )
        return position

    def to_snapshot(self, draft: Draft) -> WorkflowSnapshot:
        return WorkflowSnapshot(
            instance_id=draft.instance_id,
            definition_hash=draft.definition_hash,
            status=draft.status,
            position=self.to_position(draft.position),
            completed_tasks=dict(draft.completed_tasks),
            last_completed_task_id=draft.last_completed_task_id,
            initial_input=draft.initial_input,
            output=draft.output,
            error=draft.error,
            cancel_request=draft.cancel_request,
            pause_request=draft.pause_request,
            priority=draft.priority,
            tags=draft.tags,
            created_at=draft.created_at,
            updated_at=self.store.at(self.model.now),
            input_task_id=draft.input_task_id,
            trace_context=draft.trace_context,
        )

    def check_snapshot(self, actual: WorkflowSnapshot, expected: Workflow) -> None:
        wanted = self.to_snapshot(expected.draft)
        wanted.status = expected.status
        wanted.position = self.to_position(expected.position)
        wanted.completed_tasks = expected.completed_tasks
        wanted.last_completed_task_id = expected.last_completed_task_id
        wanted.input_task_id = expected.input_task_id
        wanted.output = expected.output
        wanted.cancel_request = expected.cancel_request
        wanted.pause_request = expected.pause_request
        wanted.created_at = expected.created_at
        wanted.trace_context = expected.trace_context
        wanted.version = expected.version
        wanted.updated_at = actual.updated_at  # checked below, within the time margin
        assert dataclasses.asdict(actual) == dataclasses.asdict(wanted)
        self.check_time(actual.updated_at, expected.updated_at, "updated_at")

    def check_claim(self, actual: TaskClaim, expected: ExpectedClaim, *, new: bool) -> None:
        assert (actual.instance_id, actual.task_id, actual.worker_id) == (
            expected.instance_id,
            expected.task_id,
            expected.worker_id,
        )
        if new:
            assert actual.token >= expected.min_token, "fencing token did not increase"
        else:
            assert actual.token == expected.min_token
        assert actual.pending_signals == expected.pending_signals
        assert (actual.attempt, actual.last_error) == (expected.attempt, expected.last_error)
        self.check_time(actual.claimed_at, expected.claimed_at, "claimed_at")
        self.check_time(actual.expires_at, expected.expires_at, "expires_at")
        self.check_time(actual.deadline, expected.deadline, "deadline")

    def check_task(self, actual: AvailableTask, expected: Candidate) -> None:
        assert actual == AvailableTask(
            instance_id=expected.instance_id,
            task_id=expected.task_id,
            definition_hash=expected.definition_hash,
            input=expected.input,
            priority=expected.priority,
            tags=expected.tags,
            snapshot_version=expected.snapshot_version,
            trace_context=expected.trace_context,
        )

    def check_selection(
        self, actual: list[AvailableTask], candidates: list[Candidate], limit: int
    ) -> None:
        """``actual`` are the best ``limit`` candidates, best first (see the module doc)."""
        keys = [_key(task) for task in actual]
        best = [_key(candidate) for candidate in candidates[:limit]]
        if self.store.exact_time:
            assert keys == best
        else:
            ranked = {_key(candidate): candidate for candidate in candidates}
            assert len(keys) == len(best) and len(set(keys)) == len(keys), (keys, best)
            assert set(keys) <= ranked.keys(), (keys, best)
            ranks = [ranked[key].rank for key in keys]
            assert ranks == sorted(ranks), (keys, best)
            for first, second in itertools.pairwise(keys):
                if ranked[first].rank == ranked[second].rank and first[0] == second[0]:
                    assert first[1] < second[1], (keys, best)
            if keys:
                better = {key for key, c in ranked.items() if c.rank < ranks[-1]}
                assert better <= set(keys), (keys, best)
        candidate_by_key = {_key(candidate): candidate for candidate in candidates}
        for task in actual:
            self.check_task(task, candidate_by_key[_key(task)])

    # -- choosing targets --------------------------------------------------------------------

    def pick_instance(
        self, data: st.DataObject, prefer: Callable[[Workflow], bool] | None = None
    ) -> str:
        """Mostly an instance the model holds (one that satisfies ``prefer``, if any does);
        sometimes any (perhaps absent) one."""
        stored = sorted(self.model.workflows)
        if prefer is not None:
            preferred = [i for i in stored if prefer(self.model.workflows[i])]
            if preferred and data.draw(st.booleans(), label="preferred") is True:
                chosen: str = data.draw(st.sampled_from(preferred), label="instance")
                return chosen
        if stored and data.draw(st.integers(0, 4), label="stored instance") > 0:
            return data.draw(st.sampled_from(stored), label="instance")
        return data.draw(instance_ids, label="instance")

    def pick_signal(self, data: st.DataObject) -> tuple[str, SignalKind]:
        """(instance, kind): mostly a pending signal of the model."""
        pending = sorted(
            (instance_id, kind)
            for instance_id, workflow in self.model.workflows.items()
            for kind in workflow.signals
        )
        if pending and data.draw(st.integers(0, 3), label="pending signal") > 0:
            signal: tuple[str, SignalKind] = data.draw(st.sampled_from(pending), label="signal")
            return signal
        return self.pick_instance(data), data.draw(signal_kinds, label="kind")

    def pick_result_id(self, data: st.DataObject, instance_id: str) -> str:
        """A task id to save a result for: often one of the position's, else any."""
        workflow = self.model.workflows.get(instance_id)
        ids: tuple[str, ...] = ()
        match None if workflow is None else workflow.position:
            case AtTask(task_id=task_id):
                ids = (task_id,)
            case AtFork(branch_task_ids=branches):
                ids = branches
            case Delay(next_task_id=str() as task_id):
                ids = (task_id,)
            case AtSignal(signal_id=signal_id):
                ids = (signal_id,)
        if ids and data.draw(st.booleans(), label="of the position") is True:
            chosen: str = data.draw(st.sampled_from(sorted(set(ids))), label="task")
            return chosen
        any_id: str = data.draw(st.sampled_from(RESULT_IDS), label="task")
        return any_id

    def pick_event_name(self, data: st.DataObject, instance_id: str) -> str:
        """Mostly the name the instance waits for, when it waits for one."""
        workflow = self.model.workflows.get(instance_id)
        position = None if workflow is None else workflow.position
        if isinstance(position, AtSignal) and data.draw(st.booleans(), label="awaited"):
            return position.signal_name
        name: str = data.draw(st.sampled_from(EVENT_NAMES), label="name")
        return name

    def pick_task(self, data: st.DataObject) -> tuple[str, str]:
        """An (instance, task) that is runnable in the model, or any pair."""
        runnable = sorted(
            (instance_id, task_id)
            for instance_id, workflow in self.model.workflows.items()
            for task_id in workflow.runnable_task_ids(self.model.now)
        )
        if runnable and data.draw(st.booleans(), label="runnable") is True:
            task: tuple[str, str] = data.draw(st.sampled_from(runnable), label="task")
            return task
        return self.pick_instance(data), data.draw(task_ids, label="task")

    def pick_claim(self, data: st.DataObject) -> tuple[str, str, str]:
        """(instance, task, worker): mostly a claim the model knows of, by its holder."""
        claims = sorted(
            (instance_id, task_id, claim.worker_id)
            for instance_id, workflow in self.model.workflows.items()
            for task_id, claim in workflow.claims.items()
            if claim.worker_id  # not a scheduled retry's wait (held by no worker)
        )
        # Holders of claims of deleted instances too (their ids may exist again).
        claims += sorted(
            (instance_id, task_id, claim.worker_id)
            for (instance_id, task_id), claim in self.model.retired.items()
            if claim.worker_id
        )
        if claims and data.draw(st.integers(0, 3), label="known claim") > 0:
            instance_id, task_id, holder = data.draw(st.sampled_from(claims), label="claim")
            by_holder = data.draw(st.integers(0, 3), label="by holder") > 0
            worker = holder if by_holder else data.draw(worker_ids, label="worker")
            return instance_id, task_id, worker
        instance_id = self.pick_instance(data)
        return instance_id, data.draw(task_ids, label="task"), data.draw(worker_ids, label="worker")

    def token_for(self, choice: str, instance_id: str, task_id: str) -> int | None:
        workflow = self.model.workflows.get(instance_id)
        claim = None if workflow is None else workflow.claims.get(task_id)
        stored = 1 if claim is None else claim.token
        if choice == "retired":
            return max(1, self.model.retired_token(instance_id, task_id))
        return {"none": None, "stored": stored, "behind": stored - 1, "ahead": stored + 1}[choice]

    def version_for(self, choice: VersionChoice, instance_id: str) -> int | None:
        if choice is None or isinstance(choice, int):
            return choice
        workflow = self.model.workflows.get(instance_id)
        stored = 0 if workflow is None else workflow.version
        return {"stored": stored, "behind": max(stored - 1, 0), "ahead": stored + 1}[choice]

    def progressed(self, instance_id: str, progress: Progress) -> Draft:
        """The model's stored snapshot of ``instance_id``, moved on as a worker would."""
        workflow = self.model.workflows[instance_id]
        completed = dict(workflow.completed_tasks) if progress.keep_results else {}
        last = workflow.last_completed_task_id
        input_task_id = workflow.input_task_id
        position = workflow.position
        status, output, error = workflow.status, workflow.output, workflow.draft.error
        if progress.complete is not None:
            task_id, result = progress.complete
            completed[task_id] = result
            last = task_id
        if progress.move_to is not None:
            position = resolve_position(progress.move_to, self.model.now)
            input_task_id = last
        if progress.finish == "complete":
            status, output = WorkflowStatus.COMPLETED, b"done"
        elif progress.finish == "fail":
            status, error = WorkflowStatus.FAILED, "boom"
        return dataclasses.replace(
            workflow.draft,
            status=status,
            position=position,
            completed_tasks=completed,
            last_completed_task_id=last,
            input_task_id=input_task_id,
            output=output,
            error=error,
            cancel_request=workflow.cancel_request,
            pause_request=workflow.pause_request,
        )

    # -- rules: snapshots --------------------------------------------------------------------

    def save(self, draft: Draft, choice: VersionChoice) -> None:
        expected_version = self.version_for(choice, draft.instance_id)
        snapshot = self.to_snapshot(draft)
        outcome = self.both(
            "save",
            lambda: self.model.save_snapshot(draft, expected_version),
            lambda: self.backend.save_snapshot(snapshot, expected_version=expected_version),
        )
        if outcome is not None:
            version, returned = outcome
            assert returned == version == snapshot.version

    @initialize(
        specs=st.lists(
            started_specs, min_size=2, max_size=len(INSTANCES), unique_by=lambda s: s.instance_id
        )
    )
    def start_workflows(self, specs: list[DraftSpec]) -> None:
        for spec in specs:
            self.save(spec.resolve(self.model.now), None)

    @rule(spec=draft_specs(), choice=expected_versions)
    def save_new_snapshot(self, spec: DraftSpec, choice: VersionChoice) -> None:
        self.save(spec.resolve(self.model.now), choice)

    @rule(spec=draft_specs(), if_exists=st.sampled_from(IfExists))
    def start_workflow(self, spec: DraftSpec, if_exists: IfExists) -> None:
        draft = spec.resolve(self.model.now)
        snapshot = self.to_snapshot(draft)
        outcome = self.both(
            f"start_workflow {if_exists.value}",
            lambda: self.model.start_workflow(draft, if_exists),
            lambda: self.backend.start_workflow(snapshot, if_exists=if_exists),
        )
        assert snapshot.version == 0, "start_workflow changed its argument"
        if outcome is not None:
            self.check_snapshot(outcome[1], outcome[0])

    @precondition(lambda self: self.model.workflows)
    @rule(data=st.data(), later=laters, progress=progresses, choice=expected_versions)
    def save_progressed_snapshot(
        self, data: st.DataObject, later: int, progress: Progress, choice: VersionChoice
    ) -> None:
        self.advance_clock(later)
        instance_id = data.draw(st.sampled_from(sorted(self.model.workflows)), label="instance")
        self.save(self.progressed(instance_id, progress), choice)

    @rule(data=st.data(), later=laters, progress=progresses, token=token_choices)
    def save_snapshot_fenced(
        self, data: st.DataObject, later: int, progress: Progress, token: str
    ) -> None:
        self.advance_clock(later)
        instance_id, task_id, worker_id = self.pick_claim(data)
        if instance_id in self.model.workflows:
            result = data.draw(payloads, label="result")
            draft = self.progressed(
                instance_id, dataclasses.replace(progress, complete=(task_id, result))
            )
        else:
            spec = data.draw(draft_specs(instance_id=st.just(instance_id)), label="fresh")
            draft = spec.resolve(self.model.now)
        fence = self.token_for(token, instance_id, task_id)
        snapshot = self.to_snapshot(draft)
        outcome = self.both(
            "save_snapshot_fenced",
            lambda: self.model.save_snapshot_fenced(draft, task_id, worker_id, fence),
            lambda: self.backend.save_snapshot_fenced(snapshot, task_id, worker_id, token=fence),
        )
        if outcome is not None:
            saved, returned = outcome
            assert returned is saved
            if saved:
                assert snapshot.version == self.model.workflows[instance_id].version

    @rule(data=st.data(), later=laters, output=payloads)
    def save_task_result(self, data: st.DataObject, later: int, output: bytes) -> None:
        self.advance_clock(later)
        instance_id = self.pick_instance(data)
        task_id = self.pick_result_id(data, instance_id)
        outcome = self.both(
            "save_task_result",
            lambda: self.model.save_task_result(instance_id, task_id, output),
            lambda: self.backend.save_task_result(instance_id, task_id, output),
        )
        if outcome is not None:
            assert outcome[1] == outcome[0]

    @rule(
        data=st.data(),
        task_id=st.sampled_from(RESULT_IDS),
        kind=signal_kinds,
        what=st.sampled_from(("snapshot", "result", "signal", "list")),
    )
    def read_back(self, data: st.DataObject, task_id: str, kind: SignalKind, what: str) -> None:
        """load_snapshot, load_task_result, get_signal or list_snapshots."""
        if what == "list":
            status = data.draw(st.none() | st.sampled_from(WorkflowStatus), label="status")
            after = data.draw(st.none() | instance_ids, label="after")
            limit = data.draw(st.none() | limits, label="limit")
            listed = self.backend.list_snapshots(status=status, after=after, limit=limit)
            assert listed == self.model.list_snapshots(status, after, limit)
            return
        instance_id = self.pick_instance(data)
        if what == "snapshot":
            snapshot = self.both(
                "load_snapshot",
                lambda: self.model.load_snapshot(instance_id),
                lambda: self.backend.load_snapshot(instance_id),
            )
            if snapshot is not None:
                self.check_snapshot(snapshot[1], snapshot[0])
            return
        read: tuple[object, object] | None
        if what == "result":
            workflow = self.model.workflows.get(instance_id)
            if workflow is not None and workflow.completed_tasks and data.draw(st.booleans()):
                task_id = data.draw(st.sampled_from(sorted(workflow.completed_tasks)))
            read = self.both(
                "load_task_result",
                lambda: self.model.load_task_result(instance_id, task_id),
                lambda: self.backend.load_task_result(instance_id, task_id),
            )
        else:
            read = self.both(
                "get_signal",
                lambda: self.model.get_signal(instance_id, kind),
                lambda: self.backend.get_signal(instance_id, kind),
            )
        if read is not None:
            assert read[1] == read[0]

    @rule(instance_id=instance_ids)
    def delete_snapshot(self, instance_id: str) -> None:
        self.both(
            "delete_snapshot",
            lambda: self.model.delete_snapshot(instance_id),
            lambda: self.backend.delete_snapshot(instance_id),
        )

    @rule(
        later=laters,
        offset=st.sampled_from((-MINUTE, 0, MINUTE)),
        statuses=st.just(TERMINAL) | st.frozensets(st.sampled_from(sorted(TERMINAL)), min_size=1),
        batch_size=st.integers(1, 3),
    )
    def prune_workflows(
        self, later: int, offset: int, statuses: frozenset[WorkflowStatus], batch_size: int
    ) -> None:
        """One batch of finished workflows older than a cutoff a minute ago, now, or a minute
        ahead (whole minutes: every save is a whole minute, give or take the SQL margin)."""
        self.advance_clock(later)
        self.store.check_drift()
        finished_before = self.model.now + offset
        prunable = self.model.prunable(finished_before, statuses)
        before = set(self.backend.list_snapshots())
        deleted = self.backend.prune_workflows(
            finished_before=self.store.at(finished_before),
            statuses=statuses,
            batch_size=batch_size,
        )
        gone = before - set(self.backend.list_snapshots())
        assert deleted == len(gone) == min(batch_size, len(prunable)), (deleted, gone, prunable)
        assert gone <= set(prunable), (gone, prunable)
        self.model.prune(gone)
        event(f"prune_workflows: {_how_many(sorted(gone))} of {_how_many(prunable)}")

    # -- rules: claims -----------------------------------------------------------------------

    @rule(
        data=st.data(),
        later=laters,
        worker_id=worker_ids,
        ttl=ttls,
        timeout=ttls,
        max_attempts=max_attempt_choices,
    )
    def claim_task(
        self,
        data: st.DataObject,
        later: int,
        worker_id: str,
        ttl: int | None,
        timeout: int | None,
        max_attempts: int | None,
    ) -> None:
        self.advance_clock(later)
        instance_id, task_id = self.pick_task(data)
        outcome = self.both(
            "claim_task",
            lambda: self.model.claim_task(instance_id, task_id, worker_id, ttl, timeout),
            lambda: self.backend.claim_task(
                instance_id,
                task_id,
                worker_id,
                _delta(ttl),
                max_attempts=max_attempts,
                timeout=_delta(timeout),
            ),
        )
        if outcome is None:
            return
        expected, actual = outcome
        if expected is not None and max_attempts is not None and expected.attempt > max_attempts:
            event("claim_task: past max_attempts, workflow failed")
            assert actual is None, f"store handed out {actual} past max_attempts"
            self.model.give_up(expected, max_attempts)
            return
        if expected is None or actual is None:
            assert actual is None and expected is None, f"store: {actual}, model: {expected}"
            return
        self.check_claim(actual, expected, new=True)
        self.model.grant(expected, actual.token)

    @rule(data=st.data(), token=token_choices)
    def release_task_claim(self, data: st.DataObject, token: str) -> None:
        instance_id, task_id, worker_id = self.pick_claim(data)
        fence = self.token_for(token, instance_id, task_id)
        self.both(
            "release_task_claim",
            lambda: self.model.release_task_claim(instance_id, task_id, worker_id, fence),
            lambda: self.backend.release_task_claim(instance_id, task_id, worker_id, token=fence),
        )

    @rule(data=st.data(), ttl=ttls, token=token_choices)
    def extend_task_claim(self, data: st.DataObject, ttl: int | None, token: str) -> None:
        instance_id, task_id, worker_id = self.pick_claim(data)
        fence = self.token_for(token, instance_id, task_id)
        outcome = self.both(
            "extend_task_claim",
            lambda: self.model.extend_task_claim(instance_id, task_id, worker_id, ttl, fence),
            lambda: self.backend.extend_task_claim(
                instance_id, task_id, worker_id, _delta(ttl), token=fence
            ),
        )
        if outcome is not None:
            self.check_claim(outcome[1], outcome[0], new=False)

    @rule(worker_id=worker_ids, limit=limits, tags=worker_tag_sets, aging=aging_intervals)
    def find_available_tasks(
        self, worker_id: str, limit: int, tags: frozenset[str], aging: int
    ) -> None:
        self.store.check_drift()
        candidates = self.model.available(tags, aging)
        actual = self.backend.find_available_tasks(
            worker_id, limit, tags=tags, aging_interval=timedelta(seconds=aging)
        )
        self.check_selection(actual, candidates, limit)
        event(f"find_available_tasks: {_how_many(actual)} found")

    @rule(
        worker_id=worker_ids,
        limit=limits,
        ttl=ttls,
        tags=worker_tag_sets,
        aging=aging_intervals,
        timeout=ttls,
    )
    def claim_available_tasks(
        self,
        worker_id: str,
        limit: int,
        ttl: int | None,
        tags: frozenset[str],
        aging: int,
        timeout: int | None = None,
    ) -> None:
        self.store.check_drift()
        candidates = self.model.available(tags, aging)
        claimed = self.backend.claim_available_tasks(
            worker_id,
            limit,
            _delta(ttl),
            tags=tags,
            aging_interval=timedelta(seconds=aging),
            timeout=_delta(timeout),
        )
        self.check_selection([item.task for item in claimed], candidates, limit)
        event(f"claim_available_tasks: {_how_many(claimed)} claimed")
        for item in claimed:
            instance_id, task_id = _key(item.task)
            expected = self.model.claim_task(instance_id, task_id, worker_id, ttl, timeout)
            assert expected is not None, f"{instance_id}/{task_id} was not claimable"
            self.check_claim(item.claim, expected, new=True)
            self.model.grant(expected, item.claim.token)

    # -- rules: completions ------------------------------------------------------------------

    def advance_function(self, step: Step | None) -> Callable[[WorkflowSnapshot], None] | None:
        """The real advance function doing what ``step`` says the model does."""
        if step is None:
            return None

        def advance(snapshot: WorkflowSnapshot) -> None:
            if step.kind == "move":
                assert step.position is not None
                snapshot.move_to(self.to_position(step.position))
            elif step.kind == "complete":
                snapshot.mark_completed(b"done")
            elif step.kind == "fail":
                snapshot.mark_failed("boom")
            elif step.kind == "raise":
                raise AdvanceBroke("drawn to fail")

        return advance

    def draw_completion(
        self, data: st.DataObject, instance_id: str, task_id: str, worker_id: str, token: int
    ) -> Completion:
        failed = data.draw(st.integers(0, 5), label="failed") == 0
        spec = data.draw(step_specs, label="advance")
        step = None
        if spec is not None:
            kind, position = spec
            resolved = None if position is None else resolve_position(position, self.model.now)
            step = Step("none" if kind == "keep" else kind, resolved)
        retry_after = data.draw(retry_delays, label="retry_after") if failed else None
        return Completion(
            instance_id,
            task_id,
            worker_id,
            max(1, token),
            output=None if failed else data.draw(payloads, label="output"),
            error=f"task failed at {self.model.now}" if failed else None,
            step=step,
            retry_after=retry_after,
        )

    @rule(
        data=st.data(),
        later=laters,
        count=st.integers(1, 3),
        ttl=ttls,
        claim_next=st.integers(0, 3),
    )
    def complete_tasks(
        self, data: st.DataObject, later: int, count: int, ttl: int | None, claim_next: int
    ) -> None:
        """Completions of any claim: held, lost, stale, foreign, absent."""
        self.advance_clock(later)
        completions = []
        for _ in range(count):
            instance_id, task_id, worker_id = self.pick_claim(data)
            choice = data.draw(completion_tokens, label="token")
            token = self.token_for(choice, instance_id, task_id) or 1
            completions.append(self.draw_completion(data, instance_id, task_id, worker_id, token))
        self.run_completions(completions, ttl, claim_next)

    @rule(
        data=st.data(),
        worker_id=worker_ids,
        limit=limits,
        ttl=ttls,
        claim_next=st.integers(0, 3),
    )
    def claim_then_complete(
        self, data: st.DataObject, worker_id: str, limit: int, ttl: int | None, claim_next: int
    ) -> None:
        """A worker's cycle: claim available tasks, then complete what it got (and, with
        ``claim_next``, what that makes runnable)."""
        self.claim_available_tasks(worker_id, limit, ttl, ALL_TAGS, INSPECTION_AGING)
        held = sorted(
            (instance_id, task_id, claim.token)
            for instance_id, workflow in self.model.workflows.items()
            for task_id, claim in workflow.claims.items()
            if claim.worker_id == worker_id and claim.is_live(self.model.now)
        )
        if held:
            completions = [
                self.draw_completion(data, instance_id, task_id, worker_id, token)
                for instance_id, task_id, token in held
            ]
            self.run_completions(completions, ttl, claim_next)

    def run_completions(
        self, completions: list[Completion], ttl: int | None, claim_next: int
    ) -> None:
        calls = [
            TaskCompletion(
                c.instance_id,
                c.task_id,
                c.worker_id,
                c.token,
                output=c.output,
                error=c.error,
                advance=self.advance_function(c.step),
                retry_after=_delta(c.retry_after),
            )
            for c in completions
        ]
        outcome = self.both(
            "complete_tasks",
            lambda: self.model.complete_tasks(completions, ttl, claim_next),
            lambda: self.backend.complete_tasks(calls, ttl=_delta(ttl), claim_next=claim_next),
        )
        if outcome is None:
            return
        expected, actual = outcome
        assert [r.outcome for r in actual] == [r.outcome for r in expected]
        assert [r.version for r in actual] == [r.version for r in expected]
        for want, got in zip(expected, actual, strict=True):
            event(f"complete_tasks: {got.outcome.value}, {len(got.next_tasks)} next")
            assert len(got.next_tasks) == len(want.next_claims), (got, want)
            for (claim, task), claimed in zip(want.next_claims, got.next_tasks, strict=True):
                self.check_claim(claimed.claim, claim, new=True)
                self.check_task(claimed.task, task)
                self.model.settle_token(claim.instance_id, claim.task_id, claimed.claim.token)

    # -- rules: signals and events -----------------------------------------------------------

    @rule(data=st.data(), kind=signal_kinds, request=requests)
    def store_signal(self, data: st.DataObject, kind: SignalKind, request: SignalRequest) -> None:
        instance_id = self.pick_instance(data, _is_in_progress)
        self.both(
            "store_signal",
            lambda: self.model.store_signal(instance_id, kind, request),
            lambda: self.backend.store_signal(instance_id, kind, request),
        )

    @rule(data=st.data())
    def clear_signal(self, data: st.DataObject) -> None:
        instance_id, kind = self.pick_signal(data)
        self.both(
            "clear_signal",
            lambda: self.model.clear_signal(instance_id, kind),
            lambda: self.backend.clear_signal(instance_id, kind),
        )

    @rule(data=st.data())
    def check_and_apply(self, data: st.DataObject) -> None:
        instance_id, kind = self.pick_signal(data)
        apply = (
            self.backend.check_and_cancel
            if kind is SignalKind.CANCEL
            else self.backend.check_and_pause
        )
        outcome = self.both(
            "check_and_apply",
            lambda: self.model.check_and_apply(instance_id, kind),
            lambda: apply(instance_id),
        )
        if outcome is not None:
            assert outcome[1] is outcome[0]

    @rule(data=st.data())
    def unpause(self, data: st.DataObject) -> None:
        instance_id = self.pick_instance(data, _is_paused)
        outcome = self.both(
            "unpause",
            lambda: self.model.unpause(instance_id),
            lambda: self.backend.unpause(instance_id),
        )
        if outcome is not None:
            self.check_snapshot(outcome[1], outcome[0])

    @rule(data=st.data())
    def retry_workflow(self, data: st.DataObject) -> None:
        instance_id = self.pick_instance(data, _is_failed)
        outcome = self.both(
            "retry_workflow",
            lambda: self.model.retry_workflow(instance_id),
            lambda: self.backend.retry_workflow(instance_id),
        )
        if outcome is not None:
            self.check_snapshot(outcome[1], outcome[0])

    @rule(data=st.data(), payload=payloads, key=st.sampled_from(EVENT_KEYS))
    def send_event(self, data: st.DataObject, payload: bytes, key: str | None) -> None:
        instance_id = self.pick_instance(data, _awaits_event)
        name = self.pick_event_name(data, instance_id)
        if key is not None:  # few payloads: a key is often repeated with the same one
            payload = data.draw(st.sampled_from((b"", b"a")), label="keyed payload")
        self.both(
            "send_event" if key is None else "send_event (keyed)",
            lambda: self.model.send_event(instance_id, name, payload, key),
            lambda: self.backend.send_event(instance_id, name, payload, idempotency_key=key),
        )

    @rule(data=st.data(), key=st.sampled_from(EVENT_KEYS))
    def consume_event(self, data: st.DataObject, key: str | None) -> None:
        instance_id = self.pick_instance(data)
        name = self.pick_event_name(data, instance_id)
        outcome = self.both(
            "consume_event" if key is None else "consume_event (keyed)",
            lambda: self.model.consume_event(instance_id, name, key),
            lambda: self.backend.consume_event(instance_id, name, consumer_key=key),
        )
        if outcome is not None:
            assert outcome[1] == outcome[0]

    # -- rules: time -------------------------------------------------------------------------

    @rule(seconds=st.sampled_from(ADVANCES))
    def advance_clock(self, seconds: int) -> None:
        if seconds:
            self.model.advance(seconds)
            self.store.advance(seconds)

    # -- after every step --------------------------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        self.store.check_drift()
        ids = self.backend.list_snapshots()
        assert ids == self.model.list_snapshots(None, None, None)
        for instance_id in ids:
            self.check_snapshot(
                self.backend.load_snapshot(instance_id), self.model.workflows[instance_id]
            )
        limit = 100
        available = self.backend.find_available_tasks(
            "inspector", limit, tags=ALL_TAGS, aging_interval=timedelta(seconds=INSPECTION_AGING)
        )
        self.check_selection(available, self.model.available(ALL_TAGS, INSPECTION_AGING), limit)


def _how_many(items: list[Any]) -> str:
    return ("none", "one")[len(items)] if len(items) < 2 else "several"


def _delta(seconds: int | None) -> timedelta | None:
    return None if seconds is None else timedelta(seconds=seconds)


def run_machine(store: Store, *, share: float, steps: int) -> None:
    """Run the machine against ``store`` for ``share`` of the profile's ``max_examples``."""
    profile = settings.default
    assert profile is not None
    examples = max(5, round(profile.max_examples * share))
    machine = type("ContractMachineRun", (ContractMachine,), {"store": store})
    run_state_machine_as_test(
        machine,
        settings=settings(
            profile,
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,  # database round trips: per-step timing means nothing
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- tests -----------------------------------------------------------------------------------


@pytest.fixture(params=[pytest.param(MEMORY, id=MEMORY), *sql_params()])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """The in-memory backend, or an ``SqlBackend`` on a private, migrated database."""
    kind: str = request.param
    if kind == MEMORY:
        yield MemoryStore()
        return
    url: str = request.getfixturevalue(f"{kind}_url")
    with isolated_database(url) as private_url:
        migrate(private_url)
        with SqlBackend(private_url) as backend:
            yield SqlStore(backend)


# A failure is shrunk for up to Hypothesis' own limit of five minutes: let it report.
@pytest.mark.timeout(600)
def test_backend_matches_model(store: Store) -> None:
    run_machine(store, share=store.share, steps=100)


def test_time_shift_covers_every_timestamp_column() -> None:
    """Every timestamp column is either shifted or known to hold caller data."""
    classified = {
        f"{table.name}.{name}"
        for mapping in (SHIFTED_COLUMNS, UNSHIFTED_COLUMNS)
        for table, names in mapping.items()
        for name in names
    }
    timestamps = {
        f"{table.name}.{column.name}"
        for table in metadata.sorted_tables
        for column in table.columns
        if isinstance(column.type, UtcDateTime)
    }
    assert classified == timestamps


def test_advancing_the_store_clock_expires_claims_and_wakes_delays(store: Store) -> None:
    """``Store.advance`` acts as a clock jump (on SQL: the time shift of stored timestamps)."""
    backend = store.backend
    backend.save_snapshot(WorkflowSnapshot.new("shift", "h", first_task="t1"))
    delayed = WorkflowSnapshot.new("delayed", "h")
    delayed.move_to(AtDelay(DELAY_ID, store.at(MINUTE + 30), "t2"))
    backend.save_snapshot(delayed)
    first = backend.claim_task("shift", "t1", "w1", timedelta(seconds=MINUTE + 30))
    assert first is not None
    assert backend.claim_task("delayed", "t2", "w1", None) is None

    store.advance(MINUTE)  # 30 s before the expiry and the wake-up
    assert backend.claim_task("shift", "t1", "w2", None) is None
    assert backend.claim_task("delayed", "t2", "w1", None) is None
    position = backend.load_snapshot("delayed").position
    assert position == AtDelay(DELAY_ID, store.at(MINUTE + 30), "t2")

    store.advance(MINUTE)  # 30 s after
    taken = backend.claim_task("shift", "t1", "w2", None)
    assert taken is not None and taken.token > first.token
    assert backend.claim_task("delayed", "t2", "w1", None) is not None


# Regressions found by the state machine (minimal reproductions).


def test_send_event_records_its_payload_over_a_stored_result(store: Store) -> None:
    """The event's payload becomes the signal's result even if one was stored before."""
    backend = store.backend
    snapshot = WorkflowSnapshot.new("wf", "h")
    snapshot.move_to(AtSignal(SIGNAL_ID, "go", None, "t2"))
    backend.save_snapshot(snapshot)
    backend.save_task_result("wf", SIGNAL_ID, b"earlier")

    backend.send_event("wf", "go", b"event")

    assert backend.load_task_result("wf", SIGNAL_ID) == b"event"
    assert backend.load_snapshot("wf").completed_tasks == {SIGNAL_ID: b"event"}
    [task] = backend.find_available_tasks("w1", 5)
    assert (task.task_id, task.input) == ("t2", b"event")


def test_a_saved_result_restarts_the_aging_of_every_ready_task(store: Store) -> None:
    """Aging counts from the last save (``updated_at``), also one by ``save_task_result``
    of a task other than the position's."""
    backend = store.backend
    backend.save_snapshot(WorkflowSnapshot.new("a", "h", first_task="t1"))
    store.advance(MINUTE)
    backend.save_snapshot(WorkflowSnapshot.new("b", "h", first_task="t1"))
    store.advance(MINUTE)
    backend.save_task_result("a", "t2", b"late")  # "a" saved last: it has waited least

    assert [task.instance_id for task in backend.find_available_tasks("w1", 5)] == ["b", "a"]
