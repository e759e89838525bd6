"""What ``prune_workflows`` may delete, and the checks of its arguments.

Only terminal workflows are pruned: they can no longer change (a save over them is refused),
so their ``updated_at`` is the time they finished, and a workflow that matched when a batch
was chosen still matches when it is deleted, unless someone deleted it and created it anew.
Rules: docs/contract.md#prune_workflows.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import InvalidInputError
from .model import WorkflowStatus
from .validation import check_enum, check_limit

PRUNABLE_STATUSES = (WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED)
"""The statuses ``prune_workflows`` deletes by default, and the only ones it accepts."""

DEFAULT_PRUNE_BATCH = 500
"""Workflows deleted per ``prune_workflows`` call unless told otherwise."""

MAX_PRUNE_BATCH = 10_000
"""The largest ``batch_size``: one batch is one transaction, whose locks and size stay bounded
(and whose ids stay well under every database's bind-parameter limit)."""


def check_prunable_statuses(value: object, name: str = "statuses") -> frozenset[WorkflowStatus]:
    """A non-empty collection of terminal statuses, as a frozenset.

    Raises:
        InvalidInputError: not a collection (a bare status or string included), empty, an
            unknown status, or a status that is not terminal (named in the message).
    """
    # WorkflowStatus is a str: a bare status would be read as its letters.
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidInputError(
            f"{name} must be a collection of WorkflowStatus (e.g. [WorkflowStatus.COMPLETED]), "
            f"got {type(value).__name__}"
        )
    statuses = frozenset(check_enum(item, WorkflowStatus, f"{name} item") for item in value)
    if not statuses:
        raise InvalidInputError(f"{name} must name at least one status")
    for status in sorted(statuses):
        if not status.is_terminal:
            allowed = ", ".join(s.value for s in PRUNABLE_STATUSES)
            raise InvalidInputError(
                f"{name} may only hold finished statuses ({allowed}): {status.value} workflows "
                "are never pruned"
            )
    return statuses


def check_batch_size(value: object, name: str = "batch_size") -> int:
    """An ``int`` from 1 to :data:`MAX_PRUNE_BATCH`.

    Raises:
        InvalidInputError: anything else (a ``bool`` included).
    """
    size = check_limit(value, name)
    if size > MAX_PRUNE_BATCH:
        raise InvalidInputError(f"{name} must be at most {MAX_PRUNE_BATCH}, got {size}")
    return size
