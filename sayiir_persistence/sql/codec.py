"""JSON encodings of the structured snapshot fields stored in text columns, and their
decoding, which a row changed behind the store's back can fail.

The ``decode_*`` functions raise ``ValueError`` (or ``TypeError``, ``KeyError``) for what
they cannot decode, whatever the reason; :func:`decode_column` turns that into the
contract's ``CorruptDataError`` naming the instance and the column
(docs/contract.md#errors). Every read of a stored row goes through it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from ..errors import CorruptDataError
from ..model import (
    AtDelay,
    AtFork,
    AtSignal,
    AtTask,
    NotStarted,
    Position,
    SignalKind,
    SignalRequest,
    WorkflowStatus,
)
from ..validation import check_aware, check_tags, check_text

T = TypeVar("T")

# How much of an undecodable value a message quotes: enough to recognise it, never a payload.
_EXCERPT_CHARS = 60


def decode_column(instance_id: str, column: str, decode: Callable[[Any], T], stored: Any) -> T:
    """``decode(stored)``, where ``stored`` is ``column`` of the row of ``instance_id``.

    Raises:
        CorruptDataError: ``stored`` cannot be decoded; names the instance and the column,
            with the decoding error as ``__cause__``.
    """
    try:
        return decode(stored)
    # JSONDecodeError and the model's InvalidInputError are ValueErrors.
    except (ValueError, TypeError, KeyError) as error:
        excerpt = repr(stored)
        if len(excerpt) > _EXCERPT_CHARS:
            excerpt = excerpt[:_EXCERPT_CHARS] + "..."
        raise CorruptDataError(
            f"stored workflow {instance_id!r} is corrupt: {column} holds {excerpt}, which "
            f"cannot be decoded ({type(error).__name__}: {error}); repair the row, or remove "
            f"the instance (delete_snapshot, or start_workflow with TERMINATE_EXISTING)",
            instance_id=instance_id,
            column=column,
        ) from error


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _parse_time(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"a timestamp must be a string, not {type(value).__name__}")
    return check_aware(datetime.fromisoformat(value), "timestamp")


def _object(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def position_to_dict(position: Position) -> dict[str, Any]:
    """The JSON object of a position: what ``encode_position`` stores, and what the command
    line's ``show --json`` prints."""
    match position:
        case NotStarted():
            return {"kind": "not_started"}
        case AtTask(task_id=task_id):
            return {"kind": "task", "task_id": task_id}
        case AtFork(fork_id=fork_id, branch_task_ids=branches):
            return {"kind": "fork", "fork_id": fork_id, "branch_task_ids": list(branches)}
        case AtDelay(delay_id=delay_id, wake_at=wake_at, next_task_id=next_task_id):
            return {
                "kind": "delay",
                "delay_id": delay_id,
                "wake_at": _time(wake_at),
                "next_task_id": next_task_id,
            }
        case AtSignal():
            return {
                "kind": "signal",
                "signal_id": position.signal_id,
                "signal_name": position.signal_name,
                "wake_at": _time(position.wake_at),
                "next_task_id": position.next_task_id,
            }
    raise AssertionError(f"unknown position {position!r}")  # pragma: no cover


def encode_position(position: Position) -> str:
    return json.dumps(position_to_dict(position), separators=(",", ":"))


def decode_position(text: str) -> Position:
    """The position ``encode_position`` stored (the positions check their ids)."""
    data = _object(text)
    kind = data.get("kind")
    if kind == "not_started":
        return NotStarted()
    if kind == "task":
        return AtTask(data["task_id"])
    if kind == "fork":
        branches = data["branch_task_ids"]
        if not isinstance(branches, list):
            raise ValueError("branch_task_ids must be a list")
        return AtFork(data["fork_id"], tuple(branches))
    if kind == "delay":
        wake_at = _parse_time(data["wake_at"])
        if wake_at is None:
            raise ValueError("a delay without wake_at")
        return AtDelay(data["delay_id"], wake_at, data["next_task_id"])
    if kind == "signal":
        return AtSignal(
            data["signal_id"],
            data["signal_name"],
            _parse_time(data["wake_at"]),
            data["next_task_id"],
        )
    raise ValueError(f"unknown position kind {kind!r}")


def request_to_dict(request: SignalRequest) -> dict[str, Any]:
    """The JSON object of a signal request: what ``encode_request`` stores, and what the
    command line's ``--json`` output prints."""
    return {
        "reason": request.reason,
        "requested_by": request.requested_by,
        "requested_at": _time(request.requested_at),
    }


def encode_request(request: SignalRequest | None) -> str | None:
    if request is None:
        return None
    return json.dumps(request_to_dict(request), separators=(",", ":"))


def decode_request(text: str | None) -> SignalRequest | None:
    if text is None:
        return None
    data = _object(text)
    requested_at = _parse_time(data["requested_at"])
    if requested_at is None:
        raise ValueError("a request without requested_at")
    reason = check_text(data["reason"], "reason")
    requested_by = check_text(data["requested_by"], "requested_by")
    return SignalRequest(reason, requested_by, requested_at)


def encode_tags(tags: frozenset[str]) -> str:
    return json.dumps(sorted(tags), separators=(",", ":"))


def decode_tags(text: str) -> frozenset[str]:
    tags = json.loads(text)
    if not isinstance(tags, list):
        raise ValueError(f"expected a JSON list of tags, got {type(tags).__name__}")
    return check_tags(tags)


def decode_status(text: str) -> WorkflowStatus:
    return WorkflowStatus(text)


def decode_signal_kind(text: str) -> SignalKind:
    return SignalKind(text)
