"""The order in which available tasks are handed out, shared by every backend.

Effective priority is ``priority - waited / aging_interval`` with ``waited = now -
updated_at``. For a fixed ``now`` that orders exactly like ``priority * aging_interval +
updated_at``, which does not depend on the clock at all; so the key is computed in exact
integer microseconds and no backend needs "now" to sort.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def availability_key(
    priority: int,
    updated_at: datetime,
    instance_id: str,
    task_id: str,
    aging_interval: timedelta,
) -> tuple[int, int, str, str]:
    """Sort key: effective priority, then ``updated_at``, ``instance_id``, ``task_id``."""
    updated_us = (updated_at - _EPOCH) // _MICROSECOND
    aging_us = aging_interval // _MICROSECOND
    return (priority * aging_us + updated_us, updated_us, instance_id, task_id)
