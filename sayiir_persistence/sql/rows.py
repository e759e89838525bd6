"""A snapshot as table rows and back: the one mapping between the model and the schema."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from ..model import (
    AtDelay,
    AvailableTask,
    TaskClaim,
    WorkflowSnapshot,
    WorkflowStatus,
    position_task_ids,
)
from . import codec
from .dialects import ClaimTerms, Granted, TaskKey

# The encoded columns, as CorruptDataError names them.
STATUS = "sayiir_workflows.status"
POSITION = "sayiir_workflows.position"
CANCEL_REQUEST = "sayiir_workflows.cancel_request"
PAUSE_REQUEST = "sayiir_workflows.pause_request"
TAGS = "sayiir_workflows.tags"
SIGNAL_KIND = "sayiir_signals.kind"


def snapshot_from_row(row: Row[Any], results: dict[str, bytes]) -> WorkflowSnapshot:
    """The snapshot of a ``sayiir_workflows`` row and its stored results.

    Raises:
        CorruptDataError: a column cannot be decoded (names the instance and the column).
    """
    instance_id: str = row.instance_id
    return WorkflowSnapshot(
        instance_id=instance_id,
        definition_hash=row.definition_hash,
        status=codec.decode_column(instance_id, STATUS, codec.decode_status, row.status),
        position=codec.decode_column(instance_id, POSITION, codec.decode_position, row.position),
        completed_tasks=results,
        last_completed_task_id=row.last_completed_task_id,
        initial_input=row.initial_input,
        output=row.output,
        error=row.error,
        cancel_request=codec.decode_column(
            instance_id, CANCEL_REQUEST, codec.decode_request, row.cancel_request
        ),
        pause_request=codec.decode_column(
            instance_id, PAUSE_REQUEST, codec.decode_request, row.pause_request
        ),
        priority=row.priority,
        tags=tags_of(row),
        created_at=row.created_at,
        updated_at=row.updated_at,
        version=row.version,
        input_task_id=row.input_task_id,
        deadline=row.deadline,
        trace_context=row.trace_context,
    )


def granted_claim(key: TaskKey, terms: ClaimTerms, granted: Granted) -> TaskClaim:
    """The claim a claim statement made on ``key``."""
    instance_id, task_id = key
    return TaskClaim(
        instance_id,
        task_id,
        terms.worker_id,
        terms.now,
        terms.expires_at,
        granted.token,
        attempt=granted.attempt,
        deadline=terms.deadline,
        last_error=granted.last_error,
    )


def available_task_from_row(row: Row[*tuple[Any, ...]], task_id: str) -> AvailableTask:
    """A task of the workflow of ``row``: its ``sayiir_workflows`` columns (definition_hash,
    priority, tags, version, initial_input, input_task_id, trace_context) and ``input_output``,
    the stored output of its input task.

    Raises:
        CorruptDataError: the tags cannot be decoded.
    """
    return AvailableTask(
        instance_id=row.instance_id,
        task_id=task_id,
        definition_hash=row.definition_hash,
        input=row.initial_input if row.input_task_id is None else row.input_output,
        priority=row.priority,
        tags=tags_of(row),
        snapshot_version=row.version,
        trace_context=row.trace_context,
    )


def tags_of(row: Row[Any]) -> frozenset[str]:
    """The tags of a ``sayiir_workflows`` row (with its ``instance_id`` and ``tags``).

    Raises:
        CorruptDataError: they cannot be decoded.
    """
    return codec.decode_column(row.instance_id, TAGS, codec.decode_tags, row.tags)


def workflow_values(snapshot: WorkflowSnapshot, now: datetime) -> dict[str, object]:
    """The columns of ``sayiir_workflows`` a save writes (all but the id, creation time,
    version and trace context: see :func:`creation_values`)."""
    return {
        "definition_hash": snapshot.definition_hash,
        "status": snapshot.status.value,
        "position": codec.encode_position(snapshot.position),
        "last_completed_task_id": snapshot.last_completed_task_id,
        "input_task_id": snapshot.input_task_id,
        "deadline": snapshot.deadline,
        "initial_input": snapshot.initial_input,
        "output": snapshot.output,
        "error": snapshot.error,
        "cancel_request": codec.encode_request(snapshot.cancel_request),
        "pause_request": codec.encode_request(snapshot.pause_request),
        "priority": snapshot.priority,
        "tags": codec.encode_tags(frozenset(snapshot.tags)),
        "updated_at": now,
    }


def creation_values(snapshot: WorkflowSnapshot) -> dict[str, object]:
    """The columns of ``sayiir_workflows`` written only when a run of the workflow begins (its
    row inserted, or replaced by ``IfExists.TERMINATE_EXISTING``): later saves keep them."""
    return {
        "created_at": snapshot.created_at,
        "version": 1,
        "trace_context": snapshot.trace_context,
    }


def new_results(
    snapshot: WorkflowSnapshot, stored_results: Iterable[str], now: datetime
) -> list[dict[str, object]]:
    """The ``sayiir_task_results`` rows a save adds: a save never rewrites nor removes a
    stored result (docs/contract.md#save_snapshot)."""
    stored = set(stored_results)
    return [
        {
            "instance_id": snapshot.instance_id,
            "task_id": task_id,
            "output": output,
            "completed_at": now,
        }
        for task_id, output in snapshot.completed_tasks.items()
        if task_id not in stored
    ]


def ready_rows(
    snapshot: WorkflowSnapshot, completed: Iterable[str], now: datetime
) -> list[dict[str, object]]:
    """The ``sayiir_ready_tasks`` rows of a saved snapshot: its position's tasks that are not
    completed, while it is in progress."""
    if snapshot.status is not WorkflowStatus.IN_PROGRESS:
        return []
    done = set(completed)
    position = snapshot.position
    wake_at = position.wake_at if isinstance(position, AtDelay) else None
    return [
        {
            "instance_id": snapshot.instance_id,
            "task_id": task_id,
            "priority": snapshot.priority,
            "updated_at": now,
            "wake_at": wake_at,
            "has_tags": bool(snapshot.tags),
        }
        for task_id in position_task_ids(position, None)
        if task_id not in done
    ]
