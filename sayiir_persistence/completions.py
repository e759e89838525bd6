"""How a task completion is decided and applied, shared by every backend.

``complete_tasks`` (docs/contract.md#complete_tasks) is one atomic step per call; inside it,
each completion is judged on what the store holds under its locks. The judgement and the
change to the snapshot are the same on every backend, so they live here: a backend loads
the stored snapshot and whether the claim is held, calls :func:`apply_completion`, and
writes what it returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .errors import InvalidInputError, InvalidStateError
from .model import (
    CompletionOutcome,
    CompletionResult,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
    position_task_ids,
)

__all__ = ["apply_completion"]


def apply_completion(
    stored: WorkflowSnapshot | None,
    completion: TaskCompletion,
    *,
    claim_held: bool,
    check_snapshot: Callable[[WorkflowSnapshot], None],
) -> WorkflowSnapshot | CompletionResult:
    """The snapshot to write for ``completion``, or the result of a completion that writes
    no snapshot (``RETRY_SCHEDULED``: the backend writes the claim's wait).

    Args:
        stored: the stored snapshot (with every stored result), locked by the caller;
            ``None`` when the instance is absent. It is not modified.
        claim_held: the completion's worker holds a live claim on the task with its token,
            by the store clock.
        check_snapshot: the backend's validation of a snapshot before a save (raises
            ``InvalidInputError``), applied to what the advance function left.
    """
    if stored is None:
        return CompletionResult(CompletionOutcome.NOT_FOUND)
    if not claim_held:
        return CompletionResult(CompletionOutcome.CLAIM_LOST)
    if stored.status is not WorkflowStatus.IN_PROGRESS:
        return CompletionResult(CompletionOutcome.NOT_IN_PROGRESS)
    task_id = completion.task_id
    if task_id in stored.completed_tasks or task_id not in position_task_ids(stored.position, None):
        return CompletionResult(CompletionOutcome.NOT_RUNNABLE)
    if completion.retry_after is not None:
        # A failed attempt with another to come: the workflow is unchanged; the backend
        # turns the claim into the wait (docs/contract.md#attempts-and-deadlines).
        return CompletionResult(CompletionOutcome.RETRY_SCHEDULED)
    snapshot = dataclasses.replace(stored, completed_tasks=dict(stored.completed_tasks))
    if completion.error is not None:
        snapshot.mark_failed(completion.error)
        return snapshot
    assert completion.output is not None  # validated: exactly one of output and error
    snapshot.mark_task_completed(task_id, completion.output)
    if completion.advance is None:
        return snapshot
    try:
        completion.advance(snapshot)
        if snapshot.instance_id != stored.instance_id:
            raise InvalidInputError("the advance function changed the snapshot's instance_id")
        check_snapshot(snapshot)
    except (InvalidInputError, InvalidStateError) as invalid:
        return CompletionResult(CompletionOutcome.ADVANCE_FAILED, error=str(invalid))
    except Exception as error:  # user code: its failure is this completion's outcome
        return CompletionResult(CompletionOutcome.ADVANCE_FAILED, error=repr(error))
    return snapshot
