"""Quick start: start a workflow, claim its task, complete it, survive a crash.

Run it on the in-memory backend, or on a database:

    python examples/quickstart.py
    python examples/quickstart.py sqlite:///quickstart.db   # migrated automatically
"""

from __future__ import annotations

import sys
from datetime import timedelta

from sayiir_persistence import (
    AtTask,
    CompletionOutcome,
    IfExists,
    InMemoryBackend,
    PersistentBackend,
    SqlBackend,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
    migrate,
)


def open_backend(url: str | None) -> PersistentBackend:
    if url is None:
        return InMemoryBackend()
    migrate(url)  # idempotent: creates or upgrades the sayiir_* tables
    return SqlBackend(url)


def main(url: str | None = None) -> None:
    backend = open_backend(url)

    # 1. A new order workflow: its first task is "validate".
    snapshot = WorkflowSnapshot.new(
        "order-42",
        "order-pipeline-v1",
        initial_input=b'{"sku": "A1", "qty": 2}',
        first_task="validate",
    )
    # Stored at version 1. TERMINATE_EXISTING replaces the run a previous run of this script
    # left in the database; the default, FAIL, refuses an existing instance, and USE_EXISTING
    # returns it (a retried start then does nothing twice).
    started = backend.start_workflow(snapshot, if_exists=IfExists.TERMINATE_EXISTING)
    assert started.version == 1

    # 2. A worker claims the task for 30 seconds (it would heartbeat with extend_task_claim).
    [claimed] = backend.claim_available_tasks("worker-1", limit=1, ttl=timedelta(seconds=30))
    assert claimed.task.input == b'{"sku": "A1", "qty": 2}'

    # 3. It runs the task and records it: the result stored, the workflow moved on and the
    #    claim released in one atomic step, refused unless worker-1 still holds that claim.
    [done] = backend.complete_tasks(
        [
            TaskCompletion(
                "order-42",
                "validate",
                "worker-1",
                claimed.claim.token,
                output=b'{"valid": true}',
                advance=lambda state: state.move_to(AtTask("ship")),
            )
        ],
        ttl=timedelta(seconds=30),
    )
    assert done.outcome is CompletionOutcome.RECORDED

    # 4. The worker crashes here. Another process resumes exactly where it stopped:
    #    "validate" is done, "ship" is next, with validate's output as input.
    [next_task] = backend.find_available_tasks("worker-2", limit=10)
    assert (next_task.task_id, next_task.input) == ("ship", b'{"valid": true}')
    claim = backend.claim_task("order-42", "ship", "worker-2", ttl=timedelta(seconds=30))
    assert claim is not None

    # The lower-level way: load, mutate, save under the claim (fenced), release.
    resumed = backend.load_snapshot("order-42")
    resumed.mark_task_completed("ship", b'{"tracking": "XY123"}')
    resumed.mark_completed(b'{"status": "shipped"}')
    assert backend.save_snapshot_fenced(resumed, "ship", "worker-2", token=claim.token)
    backend.release_task_claim("order-42", "ship", "worker-2", token=claim.token)

    final = backend.load_snapshot("order-42")
    assert final.status is WorkflowStatus.COMPLETED
    print(f"order-42 {final.status.value} at version {final.version}: {final.output!r}")
    backend.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
