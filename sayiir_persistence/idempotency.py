"""Keyed event calls: how a repeat of ``send_event(..., idempotency_key=k)`` or
``consume_event(..., consumer_key=k)`` is judged, the same way on every backend.

A key names one call's effect for one workflow instance (docs/contract.md#send_event,
#consume_event). A repeat with the same arguments is that call again and answers as it did;
a repeat with other arguments is a mistake that must not pass silently.
"""

from __future__ import annotations

import hashlib

from .errors import IdempotencyConflictError


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
