"""Attempts, limits and deadlines of claims, the same on every backend.

docs/contract.md#attempts-and-deadlines: every claim of a task is an attempt; a claim made
with ``timeout`` carries a deadline that its expiry never passes; a claim made with
``max_attempts`` whose attempt is past that limit is not handed out: its workflow is failed
with the last recorded error instead, under that very claim (so exactly once).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from .model import TaskClaim

__all__ = [
    "RETRY_WAIT_WORKER",
    "claim_times",
    "effective_ttl",
    "exhausted_error",
    "is_exhausted",
    "past_deadline",
]

# The holder of a claim that waits for a scheduled retry: no worker can have this id (ids
# are 1 to 255 characters), so no one renews, releases or writes under that claim, and it
# is taken over, as the next attempt, once it expires at the retry's time.
RETRY_WAIT_WORKER = ""


def effective_ttl(ttl: timedelta | None, timeout: timedelta | None) -> timedelta | None:
    """How long a claim lives before it expires: its TTL, cut short by its timeout."""
    if timeout is None:
        return ttl
    return timeout if ttl is None else min(ttl, timeout)


def claim_times(
    now: datetime, ttl: timedelta | None, timeout: timedelta | None
) -> tuple[datetime | None, datetime | None]:
    """``(expires_at, deadline)`` of a claim made at ``now`` (store clock)."""
    lifetime = effective_ttl(ttl, timeout)
    expires_at = None if lifetime is None else now + lifetime
    deadline = None if timeout is None else now + timeout
    return expires_at, deadline


def is_exhausted(claim: TaskClaim, max_attempts: int | None) -> bool:
    """The claim is an attempt past the limit: its task must not run."""
    return max_attempts is not None and claim.attempt > max_attempts


def exhausted_error(claim: TaskClaim, max_attempts: int) -> str:
    """The error a workflow is failed with when its task has used up its attempts."""
    attempts = f"{max_attempts} attempt{'s' if max_attempts != 1 else ''}"
    if claim.last_error is not None:
        return f"task {claim.task_id!r} failed after {attempts}: {claim.last_error}"
    return (
        f"task {claim.task_id!r} failed after {attempts}: no attempt reported a result "
        "(each claim expired: its worker stopped, or the task passed its deadline)"
    )


def past_deadline(instance_id: str, task_id: str, deadline: datetime) -> str:
    """The ``ClaimLostError`` message of a claim renewed past its deadline."""
    return (
        f"task {task_id!r} of {instance_id!r} passed its deadline "
        f"({deadline.isoformat()}): the claim can no longer be renewed"
    )
