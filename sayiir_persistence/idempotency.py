"""Keyed calls: how a repeat of ``send_event(..., idempotency_key=k)``,
``consume_event(..., consumer_key=k)`` or ``save_snapshot(..., write_id=k)`` is judged, the
same way on every backend.

A key names one call's effect for one workflow instance (docs/contract.md#send_event,
#consume_event, #save_snapshot). A repeat with the same arguments is that call again and
answers as it did; a repeat with other arguments is a mistake that must not pass silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime
from enum import Enum
from typing import Protocol

from .errors import IdempotencyConflictError
from .model import WorkflowSnapshot


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


# Fields the store sets, which a repeat of a save need not carry as the first did; and the
# trace context, which the store keeps from the workflow's creation and a repeat made in
# another span would carry anew (docs/contract.md#trace-context).
_STORE_SET = frozenset({"version", "updated_at", "trace_context"})


def payload_digest(payload: bytes) -> str:
    """What a sent-event record keeps of the payload: its SHA-256, in hex (64 characters),
    so that a repeat with another payload is recognised without storing the payload twice."""
    return hashlib.sha256(payload).hexdigest()


def check_send_repeat(
    instance_id: str, key: str, recorded: tuple[str, str], name: str, payload: bytes
) -> None:
    """A send repeated under ``key``, whose first call recorded ``(name, digest)``.

    Raises:
        IdempotencyConflictError: the repeat names another event or carries another payload.
    """
    recorded_name, recorded_digest = recorded
    if recorded_name != name:
        raise IdempotencyConflictError(
            f"idempotency_key {key!r} of workflow {instance_id!r} was used to send event "
            f"{recorded_name!r}, not {name!r}",
            instance_id=instance_id,
            key=key,
        )
    if recorded_digest != payload_digest(payload):
        raise IdempotencyConflictError(
            f"idempotency_key {key!r} of workflow {instance_id!r} was used to send event "
            f"{name!r} with another payload",
            instance_id=instance_id,
            key=key,
        )


def check_consume_repeat(instance_id: str, key: str, recorded_name: str, name: str) -> None:
    """A consume repeated under ``key``, whose first call took an event ``recorded_name``.

    Raises:
        IdempotencyConflictError: the repeat asks for another event name.
    """
    if recorded_name != name:
        raise IdempotencyConflictError(
            f"consumer_key {key!r} of workflow {instance_id!r} was used to consume event "
            f"{recorded_name!r}, not {name!r}",
            instance_id=instance_id,
            key=key,
        )


def snapshot_digest(snapshot: WorkflowSnapshot) -> str:
    """What a keyed save's record keeps of the snapshot: the SHA-256, in hex, of a canonical
    encoding of every field but ``version``, ``updated_at`` and ``trace_context`` (sets and
    dicts sorted, timestamps in UTC), the same in every process."""
    digest = hashlib.sha256()
    for field in dataclasses.fields(WorkflowSnapshot):
        if field.name not in _STORE_SET:
            _feed(digest, field.name)
            _feed(digest, getattr(snapshot, field.name))
    return digest.hexdigest()


def _feed(digest: _Digest, value: object) -> None:
    """Add ``value`` to ``digest``, tagged by kind and length so no two values collide."""
    if value is None or isinstance(value, bool | int | Enum):
        _chunk(digest, b"v", repr(value).encode())
    elif isinstance(value, str):
        _chunk(digest, b"s", value.encode("utf-8"))
    elif isinstance(value, bytes):
        _chunk(digest, b"b", value)
    elif isinstance(value, datetime):
        _chunk(digest, b"t", value.astimezone(UTC).isoformat().encode())
    elif isinstance(value, dict):
        _chunk(digest, b"d", str(len(value)).encode())
        for key in sorted(value):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, frozenset | set):
        _chunk(digest, b"f", str(len(value)).encode())
        for item in sorted(value):
            _feed(digest, item)
    elif isinstance(value, tuple | list):
        _chunk(digest, b"l", str(len(value)).encode())
        for item in value:
            _feed(digest, item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _chunk(digest, b"o", type(value).__name__.encode())
        for field in dataclasses.fields(value):
            _feed(digest, getattr(value, field.name))
    else:
        raise TypeError(f"cannot digest a {type(value).__name__}")


def _chunk(digest: _Digest, tag: bytes, data: bytes) -> None:
    digest.update(tag + len(data).to_bytes(8, "big") + data)


def check_save_repeat(
    instance_id: str, write_id: str, recorded_digest: str, snapshot: WorkflowSnapshot
) -> None:
    """A save repeated under ``write_id``, whose first call recorded ``recorded_digest``.

    Raises:
        IdempotencyConflictError: the repeat saves another snapshot (a field other than
            ``version``, ``updated_at`` and ``trace_context`` differs).
    """
    if recorded_digest != snapshot_digest(snapshot):
        raise IdempotencyConflictError(
            f"write_id {write_id!r} of workflow {instance_id!r} was used to save another snapshot",
            instance_id=instance_id,
            key=write_id,
        )
