"""Unknown outcomes resolved: a ``COMMIT`` whose answer is lost, then the caller repeats.

``SqlBackend`` reaches PostgreSQL or MariaDB through a ``TcpProxy`` that cuts the connection at
the client's ``COMMIT``: either before it reaches the server (``deliver=False``: nothing was
committed) or once the server answered it, the answer thrown away (``deliver=True``: committed,
and the client cannot know). Either way the call raises ``BackendUnavailableError``: its
outcome is unknown to the caller. What is checked, each time by a second backend reaching the
server directly:

- ``send_event(..., idempotency_key=k)`` repeated delivers the event exactly once, buffered or
  delivered straight to a workflow waiting at ``AtSignal`` (docs/contract.md#send_event); a
  send without a key, repeated the same way, is delivered twice when the first had committed
  (what the key is for);
- ``consume_event(..., consumer_key=k)`` repeated returns the event the lost call took, which
  is not lost (docs/contract.md#consume_event); without a key the repeat returns the next
  event and the first is gone;
- ``save_snapshot(expected_version=v)`` followed by the procedure of
  docs/contract.md#save_snapshot tells whether the write was applied, and leaves it applied
  exactly once.

These tests cut only their own proxy's connections (no server is restarted): they may run
beside other tests, e.g. ``pytest tests/faults/test_unknown_outcomes.py -k postgres``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Final

import pytest

from helpers.isolated_db import isolated_database
from helpers.tcp_proxy import TcpProxy
from sayiir_persistence import (
    AtSignal,
    AtTask,
    BackendUnavailableError,
    ConflictError,
    PersistentBackend,
    WorkflowSnapshot,
)
from sayiir_persistence.provisioning import migrate
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.testing.builders import assert_same_state

pytestmark = pytest.mark.faults

SERVERS: Final = [
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("mysql", id="mysql", marks=pytest.mark.mysql),
]
# Where the connection is cut: before COMMIT reaches the server, or after it answered.
CUTS: Final = [
    pytest.param(False, id="commit-not-sent"),
    pytest.param(True, id="commit-answer-lost"),
]


def commit_trigger(kind: str) -> Callable[[bytes], bool]:
    """The client's ``COMMIT`` message on the wire (as in test_db_faults)."""
    if kind == "postgres":
        return lambda chunk: b"COMMIT\x00" in chunk
    return lambda chunk: chunk.endswith(b"\x03COMMIT")


@pytest.fixture(params=SERVERS)
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@dataclass
class Faulty:
    """A backend behind a proxy that cuts at ``COMMIT``, and a direct one to check with."""

    kind: str
    proxy: TcpProxy
    backend: SqlBackend
    direct: SqlBackend

    def lose_commit(self, call: Callable[[], object], *, deliver: bool) -> None:
        """Run ``call`` with its ``COMMIT`` cut: it must raise ``BackendUnavailableError``."""
        fired = self.proxy.cut_when(commit_trigger(self.kind), deliver=deliver)
        with pytest.raises(BackendUnavailableError):
            call()
        assert fired.is_set(), "the cut did not happen at COMMIT"
        self.proxy.disarm()


@pytest.fixture
def faulty(kind: str, request: pytest.FixtureRequest) -> Iterator[Faulty]:
    server_url: str = request.getfixturevalue(f"{kind}_url")
    with isolated_database(server_url) as url:
        migrate(url)
        with (
            TcpProxy.for_url(url) as proxy,
            contextlib.closing(SqlBackend(proxy.proxied_url(url))) as backend,
            contextlib.closing(SqlBackend(url)) as direct,
        ):
            yield Faulty(kind, proxy, backend, direct)


def drain(backend: PersistentBackend, instance_id: str, name: str) -> list[bytes]:
    """Every event of that name still buffered, taken in order."""
    taken = []
    while (payload := backend.consume_event(instance_id, name)) is not None:
        taken.append(payload)
    return taken


def start_at(backend: PersistentBackend, instance_id: str, waiting: bool) -> None:
    """A workflow at a signal waiting for ``approved``, or at a task (events are buffered)."""
    snapshot = WorkflowSnapshot.new(instance_id, "unknown-outcomes-v1", first_task="work")
    if waiting:
        snapshot.move_to(AtSignal("approval", "approved", None, "next"))
    backend.start_workflow(snapshot)


# --------------------------------------------------------------------------------------------
# send_event


@pytest.mark.parametrize("deliver", CUTS)
@pytest.mark.parametrize("waiting", [False, True], ids=["buffered", "delivered"])
def test_keyed_send_repeated_after_an_unknown_outcome_is_delivered_once(
    faulty: Faulty, waiting: bool, deliver: bool
) -> None:
    start_at(faulty.backend, "wf", waiting)

    def send() -> None:
        faulty.backend.send_event("wf", "approved", b"yes", idempotency_key="approval-1")

    faulty.lose_commit(send, deliver=deliver)
    send()  # the caller's answer to an unknown outcome: the same call again

    stored = faulty.direct.load_snapshot("wf")
    if waiting:
        assert (stored.position, stored.version) == (AtTask("next"), 2)
        assert faulty.direct.load_task_result("wf", "approval") == b"yes"
        assert drain(faulty.direct, "wf", "approved") == []
    else:
        assert stored.version == 1
        assert drain(faulty.direct, "wf", "approved") == [b"yes"]


def test_unkeyed_send_repeated_after_a_lost_commit_answer_is_delivered_twice(
    faulty: Faulty,
) -> None:
    """The gap the key closes: without it the caller cannot make a repeat harmless."""
    start_at(faulty.backend, "wf", waiting=False)

    def send() -> None:
        faulty.backend.send_event("wf", "approved", b"yes")

    faulty.lose_commit(send, deliver=True)
    send()
    assert drain(faulty.direct, "wf", "approved") == [b"yes", b"yes"]


# --------------------------------------------------------------------------------------------
# consume_event


@pytest.mark.parametrize("deliver", CUTS)
def test_keyed_consume_repeated_after_an_unknown_outcome_returns_the_event(
    faulty: Faulty, deliver: bool
) -> None:
    start_at(faulty.backend, "wf", waiting=False)
    for payload in (b"first", b"second"):
        faulty.backend.send_event("wf", "ev", payload)

    def consume() -> bytes | None:
        return faulty.backend.consume_event("wf", "ev", consumer_key="consumer-1")

    faulty.lose_commit(consume, deliver=deliver)
    assert consume() == b"first"  # taken by the lost call or by this one: not lost
    assert consume() == b"first"
    assert drain(faulty.direct, "wf", "ev") == [b"second"]


def test_unkeyed_consume_after_a_lost_commit_answer_loses_the_event(faulty: Faulty) -> None:
    """The gap the key closes: the lost call took the first event, the repeat the second."""
    start_at(faulty.backend, "wf", waiting=False)
    for payload in (b"first", b"second"):
        faulty.backend.send_event("wf", "ev", payload)

    def consume() -> bytes | None:
        return faulty.backend.consume_event("wf", "ev")

    faulty.lose_commit(consume, deliver=True)
    assert consume() == b"second"
    assert drain(faulty.direct, "wf", "ev") == []


# --------------------------------------------------------------------------------------------
# save_snapshot(expected_version=...): the procedure of docs/contract.md#save_snapshot


class Resolved(Enum):
    """What the procedure found out about a save whose outcome was unknown."""

    APPLIED_BEFORE = "the lost call applied it"
    APPLIED_NOW = "the lost call did not apply it; the repeat did"
    NOT_APPLIED = "another write made version v+1; yours was not applied"
    UNDECIDED = "writes followed: the stored snapshot cannot say (use write_id)"


def resolve_unknown_save(
    backend: PersistentBackend, snapshot: WorkflowSnapshot, expected_version: int
) -> Resolved:
    """The procedure of docs/contract.md#save_snapshot, for a save without ``write_id`` that
    raised ``BackendUnavailableError``: repeat it with the same ``expected_version`` (the
    repeat locks the row, so it waits for the lost transaction if the server is still
    finishing it); a ``ConflictError`` means the version moved on: the write that made
    ``expected_version + 1`` was yours if the stored snapshot is still at that version with
    exactly your content."""
    try:
        backend.save_snapshot(snapshot, expected_version=expected_version)
    except ConflictError:
        stored = backend.load_snapshot(snapshot.instance_id)
        if stored.version != expected_version + 1:
            return Resolved.UNDECIDED
        try:
            assert_same_state(stored, snapshot)
        except AssertionError:
            return Resolved.NOT_APPLIED
        return Resolved.APPLIED_BEFORE
    return Resolved.APPLIED_NOW


@pytest.mark.parametrize("deliver", CUTS)
def test_save_snapshot_unknown_outcome_resolved_by_the_procedure(
    faulty: Faulty, deliver: bool
) -> None:
    start_at(faulty.backend, "wf", waiting=False)
    loaded = faulty.backend.load_snapshot("wf")
    moved = faulty.backend.load_snapshot("wf")
    moved.mark_task_completed("work", b"done")
    moved.move_to(AtTask("next"))

    faulty.lose_commit(
        lambda: faulty.backend.save_snapshot(moved, expected_version=loaded.version),
        deliver=deliver,
    )
    assert faulty.direct.load_snapshot("wf").version == loaded.version + deliver  # the truth

    outcome = resolve_unknown_save(faulty.backend, moved, loaded.version)
    assert outcome is (Resolved.APPLIED_BEFORE if deliver else Resolved.APPLIED_NOW)
    stored = faulty.direct.load_snapshot("wf")
    assert stored.version == loaded.version + 1  # applied exactly once
    assert_same_state(stored, moved)


@pytest.mark.parametrize("deliver", CUTS)
def test_save_snapshot_procedure_after_another_write_never_claims_applied_wrongly(
    faulty: Faulty, deliver: bool
) -> None:
    """Without a write id, once another write followed, the stored snapshot no longer shows
    whose write made version v+1: the procedure says so (undecided) rather than guess.
    ``write_id`` decides (the next tests)."""
    start_at(faulty.backend, "wf", waiting=False)
    moved = faulty.backend.load_snapshot("wf")
    moved.move_to(AtTask("next"))
    faulty.lose_commit(
        lambda: faulty.backend.save_snapshot(moved, expected_version=1), deliver=deliver
    )
    faulty.direct.save_task_result("wf", "side", b"x")  # version 3, or 2 if the save was lost
    expected = Resolved.UNDECIDED if deliver else Resolved.NOT_APPLIED
    assert resolve_unknown_save(faulty.backend, moved, 1) is expected


# --------------------------------------------------------------------------------------------
# save_snapshot(..., write_id=...): the repeat answers


@pytest.mark.parametrize("deliver", CUTS)
@pytest.mark.parametrize("followed", [False, True], ids=["alone", "another-write-followed"])
def test_save_snapshot_with_write_id_repeated_after_an_unknown_outcome_applies_once(
    faulty: Faulty, deliver: bool, followed: bool
) -> None:
    start_at(faulty.backend, "wf", waiting=False)
    moved = faulty.backend.load_snapshot("wf")
    moved.mark_task_completed("work", b"done")
    moved.move_to(AtTask("next"))

    def save() -> int:
        return faulty.backend.save_snapshot(moved, expected_version=1, write_id="move-1")

    faulty.lose_commit(save, deliver=deliver)
    if followed and deliver:  # another writer saw the lost save's version and wrote after it
        faulty.direct.save_task_result("wf", "side", b"x")
    if followed and not deliver:  # another writer came first: the repeat must be refused
        theirs = faulty.direct.load_snapshot("wf")
        theirs.move_to(AtTask("elsewhere"))
        faulty.direct.save_snapshot(theirs, expected_version=1)
        with pytest.raises(ConflictError):
            save()
        assert faulty.direct.load_snapshot("wf").position == AtTask("elsewhere")
        return
    assert save() == 2  # applied by the lost call (answered again) or by this one
    stored = faulty.direct.load_snapshot("wf")
    assert stored.version == 2 + (followed and deliver)
    assert stored.position == AtTask("next")
    assert stored.completed_tasks["work"] == b"done"
