"""Payload sizes are the backend's business: a snapshot's mutators do not apply a limit of their
own, so a backend configured above the default ``max_payload_bytes`` takes what it allows."""

from __future__ import annotations

import pytest

from sayiir_persistence import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    AtTask,
    InMemoryBackend,
    InvalidInputError,
    WorkflowSnapshot,
)

MIB = 1024 * 1024
ABOVE_DEFAULT = DEFAULT_MAX_PAYLOAD_BYTES + 4 * MIB  # 20 MiB


def test_backend_configured_for_larger_payloads_takes_an_output_above_the_default() -> None:
    backend = InMemoryBackend(max_payload_bytes=64 * MIB)
    output = b"\x01" * ABOVE_DEFAULT
    snapshot = WorkflowSnapshot.new("wf", "h", initial_input=output, first_task="t1")
    backend.save_snapshot(snapshot)

    snapshot.mark_task_completed("t1", output)
    snapshot.move_to(AtTask("t2"))
    backend.save_snapshot(snapshot)
    snapshot.mark_completed(output)
    backend.save_snapshot(snapshot)

    stored = backend.load_snapshot("wf")
    assert stored.initial_input == output
    assert stored.completed_tasks["t1"] == output
    assert stored.output == output


def test_backend_with_the_default_limit_refuses_the_same_output_at_save() -> None:
    backend = InMemoryBackend()
    snapshot = WorkflowSnapshot.new("wf", "h", first_task="t1")
    backend.save_snapshot(snapshot)
    snapshot.mark_task_completed("t1", b"\x01" * ABOVE_DEFAULT)  # the mutator takes it
    with pytest.raises(InvalidInputError, match=r"snapshot.completed_tasks\['t1'\]"):
        backend.save_snapshot(snapshot)
    assert backend.load_snapshot("wf").completed_tasks == {}


@pytest.mark.parametrize("mutator", ["mark_task_completed", "mark_completed", "new"])
def test_mutators_still_refuse_payloads_that_are_not_bytes(mutator: str) -> None:
    snapshot = WorkflowSnapshot.new("wf", "h", first_task="t1")
    with pytest.raises(InvalidInputError, match="must be bytes"):
        if mutator == "mark_task_completed":
            snapshot.mark_task_completed("t1", "text")  # type: ignore[arg-type]
        elif mutator == "mark_completed":
            snapshot.mark_completed("text")  # type: ignore[arg-type]
        else:
            WorkflowSnapshot.new("wf", "h", initial_input="text")  # type: ignore[arg-type]
