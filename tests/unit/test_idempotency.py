"""How repeats of keyed calls are judged (``sayiir_persistence.idempotency``): no backend."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest

from sayiir_persistence import (
    AtSignal,
    ConflictError,
    IdempotencyConflictError,
    SignalRequest,
    WorkflowSnapshot,
)
from sayiir_persistence.idempotency import (
    check_consume_repeat,
    check_save_repeat,
    check_send_repeat,
    payload_digest,
    snapshot_digest,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _snapshot(**changes: object) -> WorkflowSnapshot:
    snapshot = WorkflowSnapshot.new(
        "wf", "def", initial_input=b"in", first_task="t1", tags=("a", "b")
    )
    snapshot.created_at = snapshot.updated_at = T0
    return dataclasses.replace(snapshot, **changes)  # type: ignore[arg-type]


def test_snapshot_digest_ignores_what_the_store_sets() -> None:
    assert snapshot_digest(_snapshot()) == snapshot_digest(
        _snapshot(version=7, updated_at=T0 + timedelta(days=1))
    )


def test_snapshot_digest_sees_every_other_field() -> None:
    base = snapshot_digest(_snapshot())
    changed = [
        _snapshot(position=AtSignal("s", "ev", None, "t2")),
        _snapshot(completed_tasks={"t0": b""}),
        _snapshot(initial_input=b"other"),
        _snapshot(initial_input=None),
        _snapshot(tags=frozenset({"a"})),
        _snapshot(priority=2),
        _snapshot(pause_request=SignalRequest("r", None, T0)),
        _snapshot(created_at=T0 + timedelta(microseconds=1)),
    ]
    digests = {snapshot_digest(snapshot) for snapshot in changed}
    assert base not in digests and len(digests) == len(changed)


def test_snapshot_digest_same_instant_in_another_zone_is_equal() -> None:
    local = T0.astimezone(timezone(timedelta(hours=2)))
    assert snapshot_digest(_snapshot(created_at=local)) == snapshot_digest(_snapshot())


def test_snapshot_digest_is_the_same_in_every_process() -> None:
    """Sets are hashed in sorted order: string hashing, random per process, does not count."""
    code = (
        "from datetime import UTC, datetime\n"
        "from sayiir_persistence import WorkflowSnapshot\n"
        "from sayiir_persistence.idempotency import snapshot_digest\n"
        "s = WorkflowSnapshot.new('wf', 'def', first_task='t1', tags=[str(i) for i in range(50)])\n"
        "s.created_at = datetime(2030, 1, 1, tzinfo=UTC)\n"
        "print(snapshot_digest(s))\n"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(digests) == 1


def test_repeats_with_other_arguments_are_idempotency_conflicts() -> None:
    recorded = ("ev", payload_digest(b"x"))
    check_send_repeat("wf", "k", recorded, "ev", b"x")  # the same call: no error
    for name, payload in (("other", b"x"), ("ev", b"y")):
        with pytest.raises(IdempotencyConflictError) as raised:
            check_send_repeat("wf", "k", recorded, name, payload)
        assert isinstance(raised.value, ConflictError)
        assert (raised.value.instance_id, raised.value.key) == ("wf", "k")
    check_consume_repeat("wf", "c", "ev", "ev")
    with pytest.raises(IdempotencyConflictError, match="'c'"):
        check_consume_repeat("wf", "c", "ev", "other")
    check_save_repeat("wf", "w", snapshot_digest(_snapshot()), _snapshot(version=3))
    with pytest.raises(IdempotencyConflictError, match="'w'"):
        check_save_repeat("wf", "w", snapshot_digest(_snapshot()), _snapshot(priority=1))
