"""Parametrization tables of the contract's tests: bad and hostile arguments, the claim states
a fenced save must refuse, the tasks ``claim_task`` must not hand out.

Not public API: shared by the contract's modules, outside ``__all__`` of
:mod:`sayiir_persistence.testing`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest

from ..backend import DEFAULT_AGING_INTERVAL, PersistentBackend
from ..model import (
    AtDelay,
    AtFork,
    AtSignal,
    IfExists,
    SignalKind,
    SignalRequest,
    WorkflowSnapshot,
    WorkflowStatus,
)
from ..retention import MAX_PRUNE_BATCH, PRUNABLE_STATUSES
from .builders import (
    BAD_INT,
    BAD_KIND,
    BAD_STR,
    LONG_TTL,
    NAIVE,
    OTHER,
    T0,
    WORKER,
    make_request,
    make_snapshot,
    save_at,
    save_new,
)
from .clocks import ContractClock

if TYPE_CHECKING:
    from .contract.base import ContractBase


# -- argument validation cases -----------------------------------------------------------------
# Each call is made with one bad argument; "existing" is a stored workflow at AtTask("t1") and
# "ghost" an absent one (validation comes before lookup, so never NotFoundError).

InvalidCall = Callable[[PersistentBackend], object]


def _bad_snapshot(**changes: Any) -> WorkflowSnapshot:
    return dataclasses.replace(make_snapshot("existing"), **changes)


def _oversized(backend: PersistentBackend) -> bytes:
    return bytes(backend.max_payload_bytes + 1)


INVALID_CALLS: list[Any] = [
    # ids: empty, too long, not a str, NUL, lone surrogate
    pytest.param(lambda b: b.load_snapshot(""), "instance_id", id="id-empty"),
    pytest.param(lambda b: b.load_snapshot("x" * 256), "instance_id", id="id-256-chars"),
    pytest.param(lambda b: b.load_snapshot(BAD_INT), "instance_id", id="id-not-str"),
    pytest.param(lambda b: b.load_snapshot("a\x00b"), "instance_id", id="id-nul"),
    pytest.param(lambda b: b.load_snapshot("a\ud800"), "instance_id", id="id-lone-surrogate"),
    pytest.param(lambda b: b.delete_snapshot("ghost\x00"), "instance_id", id="delete-id-nul"),
    pytest.param(
        lambda b: b.save_snapshot(_bad_snapshot(instance_id="")), "instance_id", id="save-id"
    ),
    pytest.param(
        lambda b: b.save_snapshot(_bad_snapshot(definition_hash="")),
        "definition_hash",
        id="save-definition-hash",
    ),
    pytest.param(
        lambda b: b.start_workflow(_bad_snapshot(instance_id="")), "instance_id", id="start-id"
    ),
    pytest.param(
        lambda b: b.start_workflow(_bad_snapshot(version=1), if_exists=IfExists.USE_EXISTING),
        "snapshot.version",
        id="start-saved-snapshot",
    ),
    pytest.param(
        lambda b: b.start_workflow(make_snapshot("existing"), if_exists=BAD_KIND),
        "if_exists",
        id="start-if-exists",
    ),
    pytest.param(
        lambda b: b.claim_task("ghost", "", WORKER, LONG_TTL), "task_id", id="claim-task-id"
    ),
    pytest.param(
        lambda b: b.claim_task("ghost", "t1", "w" * 256, LONG_TTL),
        "worker_id",
        id="claim-worker-id",
    ),
    pytest.param(
        lambda b: b.release_task_claim("ghost", "t1", ""), "worker_id", id="release-worker-id"
    ),
    pytest.param(
        lambda b: b.save_task_result("ghost", "", b"x"), "task_id", id="task-result-task-id"
    ),
    pytest.param(
        lambda b: b.load_task_result("ghost", BAD_INT), "task_id", id="load-result-task-id"
    ),
    pytest.param(lambda b: b.send_event("ghost", "", b"x"), "name", id="send-event-name"),
    pytest.param(lambda b: b.consume_event("ghost", "n\x00"), "name", id="consume-event-name"),
    pytest.param(
        lambda b: b.store_signal("x" * 256, SignalKind.CANCEL, make_request()),
        "instance_id",
        id="store-signal-id",
    ),
    pytest.param(lambda b: b.list_snapshots(after=""), "after", id="list-after"),
    pytest.param(lambda b: b.find_available_tasks("", 1), "worker_id", id="find-worker-id"),
    pytest.param(lambda b: b.find_available_tasks(WORKER, 1, tags=[""]), "tags", id="tag-empty"),
    pytest.param(
        lambda b: b.find_available_tasks(WORKER, 1, tags="gpu"), "tags", id="tags-bare-str"
    ),
    pytest.param(
        lambda b: b.save_snapshot_fenced(make_snapshot("existing"), "", WORKER),
        "task_id",
        id="fenced-task-id",
    ),
    # payloads: not bytes, above max_payload_bytes
    pytest.param(
        lambda b: b.save_task_result("existing", "t1", BAD_STR), "output", id="output-str"
    ),
    pytest.param(
        lambda b: b.save_task_result("existing", "t1", _oversized(b)),
        "output",
        id="output-too-big",
    ),
    pytest.param(lambda b: b.send_event("existing", "e", BAD_STR), "payload", id="event-str"),
    pytest.param(
        lambda b: b.send_event("existing", "e", _oversized(b)), "payload", id="event-too-big"
    ),
    pytest.param(
        lambda b: b.save_snapshot(_bad_snapshot(initial_input=_oversized(b))),
        "initial_input",
        id="snapshot-input-too-big",
    ),
    pytest.param(
        lambda b: b.save_snapshot(_bad_snapshot(completed_tasks={"t0": BAD_STR})),
        "completed_tasks",
        id="snapshot-result-str",
    ),
    pytest.param(
        lambda b: b.save_snapshot(_bad_snapshot(output=BAD_STR)), "output", id="snapshot-output"
    ),
    # ttl: zero, negative, not a timedelta
    pytest.param(lambda b: b.claim_task("ghost", "t1", WORKER, timedelta(0)), "ttl", id="ttl-zero"),
    pytest.param(
        lambda b: b.claim_task("ghost", "t1", WORKER, timedelta(seconds=-1)),
        "ttl",
        id="ttl-negative",
    ),
    pytest.param(lambda b: b.claim_task("ghost", "t1", WORKER, BAD_INT), "ttl", id="ttl-int"),
    pytest.param(
        lambda b: b.extend_task_claim("ghost", "t1", WORKER, timedelta(0)),
        "ttl",
        id="extend-ttl-zero",
    ),
    pytest.param(
        lambda b: b.claim_available_tasks(WORKER, 1, timedelta(seconds=-1)),
        "ttl",
        id="claim-available-ttl",
    ),
    # limits: zero, bool
    pytest.param(lambda b: b.find_available_tasks(WORKER, 0), "limit", id="find-limit-0"),
    pytest.param(lambda b: b.find_available_tasks(WORKER, True), "limit", id="find-limit-bool"),
    pytest.param(
        lambda b: b.claim_available_tasks(WORKER, 0, LONG_TTL), "limit", id="claim-limit-0"
    ),
    pytest.param(lambda b: b.list_snapshots(limit=0), "limit", id="list-limit-0"),
    pytest.param(lambda b: b.list_snapshots(limit=True), "limit", id="list-limit-bool"),
    # priority
    pytest.param(lambda b: b.save_snapshot(_bad_snapshot(priority=0)), "priority", id="prio-0"),
    pytest.param(lambda b: b.save_snapshot(_bad_snapshot(priority=6)), "priority", id="prio-6"),
    # naive datetimes
    pytest.param(
        lambda b: b.store_signal("existing", SignalKind.CANCEL, SignalRequest(requested_at=NAIVE)),
        "requested_at",
        id="signal-naive",
    ),
    pytest.param(
        lambda b: b.save_snapshot(_bad_snapshot(pause_request=SignalRequest(requested_at=NAIVE))),
        "requested_at",
        id="snapshot-request-naive",
    ),
    pytest.param(
        lambda b: b.save_snapshot(_bad_snapshot(created_at=NAIVE)),
        "created_at",
        id="snapshot-created-naive",
    ),
    # other arguments
    pytest.param(
        lambda b: b.find_available_tasks(WORKER, 1, aging_interval=timedelta(0)),
        "aging_interval",
        id="aging-interval-zero",
    ),
    pytest.param(
        lambda b: b.save_snapshot(make_snapshot("existing"), expected_version=-1),
        "expected_version",
        id="expected-version-negative",
    ),
    pytest.param(
        lambda b: b.release_task_claim("ghost", "t1", WORKER, token=-1), "token", id="token"
    ),
    pytest.param(lambda b: b.store_signal("ghost", BAD_KIND, make_request()), "kind", id="kind"),
    pytest.param(lambda b: b.list_snapshots(status=BAD_KIND), "status", id="status"),
]


# -- hostile input -----------------------------------------------------------------------------

#: Ids a careless store would execute, truncate, mangle or misread: SQL injection attempts,
#: quoting and placeholder characters of every DBAPI paramstyle, control characters, emoji
#: with joiners, bidirectional overrides. All are valid ids and must come back verbatim.
HOSTILE_IDS = [
    "'; DROP TABLE sayiir_workflows; --",
    'x"); DELETE FROM sayiir_task_claims; --',
    "' OR '1'='1",
    "100%",
    "%s",
    "%(name)s",
    ":name",
    "?",
    "$1",
    "\\",
    "\\'",
    "`backtick`",
    "a;b;c",
    "line\nbreak\ttab\r",
    "\x01\x1f\x7f",
    "emoji 😀🧨👩\u200d💻",
    "\u202eright-to-left",
    " ",
]

#: Wrong values per kind of argument: each must raise ``InvalidInputError`` naming the argument.
_OVER_LONG = "x" * 1000
_WRONG_BY_KIND: dict[str, list[Any]] = {
    "id": [_OVER_LONG, "", "nul\x00", b"bytes", 42, 1.5, None, object(), ["a"]],
    "optional_id": [_OVER_LONG, "", 42, b"bytes"],
    "payload": ["text", 42, None, ["a"], object()],
    "ttl": [
        timedelta(0),
        timedelta(seconds=-1),
        timedelta.max,
        timedelta(days=365 * 1000),
        60,
        "1h",
        1.5,
    ],
    "limit": [0, -1, True, 1.5, "3", 2**63],
    "optional_limit": [0, -1, True, 1.5, "3", 10**30],
    "token": [-1, "1", 1.5, True, 2**63],
    "expected_version": [-1, "1", 1.5, True, 2**63],
    "kind": ["bogus", 1, None],
    "status": ["bogus", 1],
    "tags": ["gpu", [1], [""], [_OVER_LONG], [None], 42],
    "interval": [timedelta(0), timedelta(seconds=-1), 60, None],
    "snapshot": [None, {"instance_id": "existing"}, "existing"],
    "if_exists": ["bogus", 1, None, True],
    "request": [None, "cancel it", {"reason": "x"}],
    "aware": [NAIVE, "2030-01-01", 0, None],
    "statuses": [
        "completed",
        WorkflowStatus.COMPLETED,
        [],
        [WorkflowStatus.IN_PROGRESS],
        [WorkflowStatus.PAUSED],
        ["bogus"],
        42,
        None,
    ],
    "batch_size": [0, -1, True, 1.5, "3", MAX_PRUNE_BATCH + 1],
}

#: ``(method, arguments, keyword arguments)`` of one valid call per public method, with the
#: kind of each argument (its name as the error message must say it).
_VALID_CALLS: list[tuple[str, dict[str, tuple[str, Any]]]] = [
    ("load_snapshot", {"instance_id": ("id", "existing")}),
    ("delete_snapshot", {"instance_id": ("id", "existing")}),
    (
        "list_snapshots",
        {
            "status": ("status", None),
            "after": ("optional_id", None),
            "limit": ("optional_limit", None),
        },
    ),
    (
        "save_snapshot",
        {
            "snapshot": ("snapshot", None),
            "expected_version": ("expected_version", None),
            "write_id": ("optional_id", None),
        },
    ),
    (
        "start_workflow",
        {"snapshot": ("snapshot", None), "if_exists": ("if_exists", IfExists.TERMINATE_EXISTING)},
    ),
    (
        "save_snapshot_fenced",
        {
            "snapshot": ("snapshot", None),
            "task_id": ("id", "t1"),
            "worker_id": ("id", WORKER),
            "token": ("token", None),
        },
    ),
    (
        "save_task_result",
        {"instance_id": ("id", "existing"), "task_id": ("id", "t1"), "output": ("payload", b"")},
    ),
    ("load_task_result", {"instance_id": ("id", "existing"), "task_id": ("id", "t1")}),
    (
        "claim_task",
        {
            "instance_id": ("id", "existing"),
            "task_id": ("id", "t1"),
            "worker_id": ("id", WORKER),
            "ttl": ("ttl", LONG_TTL),
        },
    ),
    (
        "release_task_claim",
        {
            "instance_id": ("id", "existing"),
            "task_id": ("id", "t1"),
            "worker_id": ("id", WORKER),
            "token": ("token", None),
        },
    ),
    (
        "extend_task_claim",
        {
            "instance_id": ("id", "existing"),
            "task_id": ("id", "t1"),
            "worker_id": ("id", WORKER),
            "ttl": ("ttl", LONG_TTL),
            "token": ("token", None),
        },
    ),
    (
        "find_available_tasks",
        {
            "worker_id": ("id", WORKER),
            "limit": ("limit", 1),
            "tags": ("tags", ()),
            "aging_interval": ("interval", DEFAULT_AGING_INTERVAL),
        },
    ),
    (
        "claim_available_tasks",
        {
            "worker_id": ("id", WORKER),
            "limit": ("limit", 1),
            "ttl": ("ttl", LONG_TTL),
            "tags": ("tags", ()),
            "aging_interval": ("interval", DEFAULT_AGING_INTERVAL),
        },
    ),
    (
        "store_signal",
        {
            "instance_id": ("id", "existing"),
            "kind": ("kind", SignalKind.CANCEL),
            "request": ("request", None),
        },
    ),
    ("get_signal", {"instance_id": ("id", "existing"), "kind": ("kind", SignalKind.CANCEL)}),
    ("clear_signal", {"instance_id": ("id", "existing"), "kind": ("kind", SignalKind.CANCEL)}),
    ("check_and_cancel", {"instance_id": ("id", "existing")}),
    ("check_and_pause", {"instance_id": ("id", "existing")}),
    ("unpause", {"instance_id": ("id", "existing")}),
    ("retry_workflow", {"instance_id": ("id", "existing")}),
    (
        "send_event",
        {
            "instance_id": ("id", "existing"),
            "name": ("id", "e"),
            "payload": ("payload", b""),
            "idempotency_key": ("optional_id", None),
        },
    ),
    (
        "consume_event",
        {
            "instance_id": ("id", "existing"),
            "name": ("id", "e"),
            "consumer_key": ("optional_id", None),
        },
    ),
    (
        "prune_workflows",
        {
            "finished_before": ("aware", T0),
            "statuses": ("statuses", PRUNABLE_STATUSES),
            "batch_size": ("batch_size", 500),
        },
    ),
]

# Arguments whose valid value is built per call (a fresh snapshot or request).
_FRESH: dict[str, Callable[[], object]] = {
    "snapshot": lambda: make_snapshot("existing"),
    "request": make_request,
}

#: One case per (method, argument): every wrong value of the argument's kind is tried.
WRONG_ARGUMENTS: list[Any] = [
    pytest.param(method, argument, id=f"{method}-{argument}")
    for method, arguments in _VALID_CALLS
    for argument in arguments
]


def valid_arguments(method: str) -> dict[str, Any]:
    arguments = dict(_VALID_CALLS)[method]
    return {
        name: _FRESH[kind]() if kind in _FRESH else value
        for name, (kind, value) in arguments.items()
    }


def wrong_values(method: str, argument: str) -> list[Any]:
    kind = dict(_VALID_CALLS)[method][argument][0]
    return _WRONG_BY_KIND[kind]


#: Snapshot fields of the wrong type or out of range (``save_snapshot`` names the field).
_WRONG_FIELD_VALUES: dict[str, list[Any]] = {
    "instance_id": [_OVER_LONG, 42],
    "definition_hash": [_OVER_LONG, None],
    "status": ["bogus", None],
    "position": ["t1", None, ("t1",)],
    "completed_tasks": [[("t0", b"")], {"t0": "text"}, {_OVER_LONG: b""}, {42: b""}],
    "last_completed_task_id": [_OVER_LONG, 42],
    "initial_input": ["text", 42],
    "output": ["text"],
    "error": [42, b"bytes"],
    "cancel_request": ["now", 42],
    "pause_request": [SignalRequest(requested_at=NAIVE)],
    "priority": ["3", 3.0, True, 0, 6, None],
    "tags": ["gpu", frozenset({42}), frozenset({_OVER_LONG}), None],
    "created_at": [NAIVE, "2030-01-01", None],
    "updated_at": [NAIVE, 0],
    "version": [-1, "1", 1.5, None, 2**63],
}
WRONG_SNAPSHOT_FIELDS: list[Any] = [
    pytest.param(field, value, id=f"{field}-{label}")
    for field, values in _WRONG_FIELD_VALUES.items()
    for label, value in enumerate(values)
]

# -- fenced save scenarios: set up a claim state on ("wf", "t1"), return (worker, token) -------

FenceScenario = Callable[["ContractBase", PersistentBackend, ContractClock], tuple[str, int | None]]


def _fence_expired_and_taken_over(
    contract: ContractBase, backend: PersistentBackend, clock: ContractClock
) -> tuple[str, int | None]:
    assert backend.claim_task("wf", "t1", WORKER, contract.short_ttl) is not None
    contract.wait_past_short_ttl(clock)
    assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is not None
    return WORKER, None


def _fence_own_claim_expired(
    contract: ContractBase, backend: PersistentBackend, clock: ContractClock
) -> tuple[str, int | None]:
    assert backend.claim_task("wf", "t1", WORKER, contract.short_ttl) is not None
    contract.wait_past_short_ttl(clock)
    return WORKER, None


def _fence_wrong_token(
    contract: ContractBase, backend: PersistentBackend, clock: ContractClock
) -> tuple[str, int | None]:
    claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
    assert claim is not None
    return WORKER, claim.token + 1


def _fence_stale_token_same_worker(
    contract: ContractBase, backend: PersistentBackend, clock: ContractClock
) -> tuple[str, int | None]:
    first = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
    assert first is not None
    backend.release_task_claim("wf", "t1", WORKER)
    assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is not None
    return WORKER, first.token


def _fence_other_worker(
    contract: ContractBase, backend: PersistentBackend, clock: ContractClock
) -> tuple[str, int | None]:
    assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is not None
    return WORKER, None


def _fence_released(
    contract: ContractBase, backend: PersistentBackend, clock: ContractClock
) -> tuple[str, int | None]:
    assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is not None
    backend.release_task_claim("wf", "t1", WORKER)
    return WORKER, None


def _fence_never_claimed(
    contract: ContractBase, backend: PersistentBackend, clock: ContractClock
) -> tuple[str, int | None]:
    return WORKER, None


FENCE_FAILURES: list[Any] = [
    pytest.param(_fence_expired_and_taken_over, id="expired-and-taken-over"),
    pytest.param(_fence_own_claim_expired, id="own-claim-expired"),
    pytest.param(_fence_wrong_token, id="wrong-token"),
    pytest.param(_fence_stale_token_same_worker, id="stale-token-same-worker"),
    pytest.param(_fence_other_worker, id="other-worker"),
    pytest.param(_fence_released, id="released"),
    pytest.param(_fence_never_claimed, id="never-claimed"),
]


# -- claim_task on a task that is not runnable: store "wf" and return the task id to claim ----

UnrunnableSetup = Callable[[PersistentBackend, ContractClock], str]


def _unrunnable_other_task(backend: PersistentBackend, clock: ContractClock) -> str:
    save_new(backend, "wf", first_task="t1")
    return "t2"


def _unrunnable_completed_task(backend: PersistentBackend, clock: ContractClock) -> str:
    save_at(backend, "wf", AtFork("f", ("a", "b")))
    backend.save_task_result("wf", "a", b"A")
    return "a"


def _unrunnable_not_started(backend: PersistentBackend, clock: ContractClock) -> str:
    save_new(backend, "wf", first_task=None)
    return "t1"


def _unrunnable_at_signal(backend: PersistentBackend, clock: ContractClock) -> str:
    # Even once its wake_at has passed: only a matching event moves it on.
    save_at(backend, "wf", AtSignal("s", "go", clock.now() - timedelta(minutes=1), "t1"))
    return "t1"


def _unrunnable_delay_before_wake(backend: PersistentBackend, clock: ContractClock) -> str:
    save_at(backend, "wf", AtDelay("d", clock.now() + LONG_TTL, "t1"))
    return "t1"


def _unrunnable_delay_without_next_task(backend: PersistentBackend, clock: ContractClock) -> str:
    save_at(backend, "wf", AtDelay("d", clock.now() - timedelta(minutes=1), None))
    return "d"


UNRUNNABLE: list[Any] = [
    pytest.param(_unrunnable_other_task, id="other-task"),
    pytest.param(_unrunnable_completed_task, id="completed-task"),
    pytest.param(_unrunnable_not_started, id="not-started"),
    pytest.param(_unrunnable_at_signal, id="at-signal"),
    pytest.param(_unrunnable_delay_before_wake, id="delay-before-wake"),
    pytest.param(_unrunnable_delay_without_next_task, id="delay-without-next-task"),
]
