"""JSON encodings of the structured snapshot fields stored in text columns."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from ..model import AtDelay, AtFork, AtSignal, AtTask, NotStarted, Position, SignalRequest


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _parse_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


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
    data = json.loads(text)
    kind = data["kind"]
    if kind == "not_started":
        return NotStarted()
    if kind == "task":
        return AtTask(data["task_id"])
    if kind == "fork":
        return AtFork(data["fork_id"], tuple(data["branch_task_ids"]))
    if kind == "delay":
        wake_at = _parse_time(data["wake_at"])
        assert wake_at is not None
        return AtDelay(data["delay_id"], wake_at, data["next_task_id"])
    if kind == "signal":
        return AtSignal(
            data["signal_id"],
            data["signal_name"],
            _parse_time(data["wake_at"]),
            data["next_task_id"],
        )
    raise ValueError(f"unknown stored position kind {kind!r}")


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
    data = json.loads(text)
    requested_at = _parse_time(data["requested_at"])
    assert requested_at is not None
    return SignalRequest(data["reason"], data["requested_by"], requested_at)


def encode_tags(tags: frozenset[str]) -> str:
    return json.dumps(sorted(tags), separators=(",", ":"))


def decode_tags(text: str) -> frozenset[str]:
    return frozenset(json.loads(text))
