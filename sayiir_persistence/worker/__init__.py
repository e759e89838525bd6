"""A reference worker: claim tasks, run them on a thread pool, record results under fencing.

This module is meant to be read (and copied) as much as used. It shows the one safe way to
drive a :class:`~sayiir_persistence.PersistentBackend` from many threads and processes::

    claim_available_tasks -> run the task function -> complete_tasks (batched)
                 ^                       |                  | records, advances, releases,
                 |   heartbeat: extend_task_claim           | and claims the next task of
                 |   every ttl/3 (claim lost? the result    | the workflow for an idle
                 |   is thrown away, never recorded)        v thread: run it, no claim call

A minimal worker for a three-step workflow::

    from sayiir_persistence.worker import Pipeline, Worker

    orders = Pipeline("validate", ("reserve_stock", "charge_payment"), "ship")
    handlers = {
        "validate": validate,            # each: Callable[[TaskContext], bytes]
        "reserve_stock": reserve_stock,
        "charge_payment": charge_payment,
        "ship": ship,
    }
    backend.start_workflow(orders.start("order-1", "orders-v1", initial_input=b"{...}"))
    Worker(backend, handlers, orders, threads=8).run_until_signalled()

Guarantees, and where they come from:

- A task's result is recorded at most once: it is recorded with
  :meth:`~sayiir_persistence.PersistentBackend.complete_tasks`, which the store refuses
  unless this worker still holds a live claim with the same fencing token.
- One write transaction per task or less: the results of tasks finished meanwhile are
  recorded together, and each completion takes the workflow's next task for an idle thread
  in the same transaction (a chain of tasks never waits for a claim call or a poll).
- Work is not lost when a worker dies: its claims expire after ``ttl`` and another worker
  takes the task over (with a greater token). So a task *function* may run more than once
  (at-least-once execution); make external side effects idempotent, e.g. keyed by
  ``f"{ctx.instance_id}/{ctx.task_id}"``.
- A slow task keeps its claim: every live claim is renewed every ``heartbeat_every``
  (default ``ttl / 3``, so two beats may fail before the claim expires), on renewal threads
  of their own: a renewal that hangs holds back no other claim.
- A task stops before its claim can expire when its renewals fail or hang: its lease (when
  the last successful claim or renewal call was *sent*, plus the TTL granted, minus
  ``lease_margin``, ``ttl / 10``) is watched by a thread that never calls the store; when it
  runs out the claim is marked lost (``ctx.claim_lost``), and the result is dropped.
- A fork is always joined: the advance function runs inside the store's completion step, so
  the last branch to complete sees the others and moves the workflow past the join. Forks
  left stalled by older workers or other writers are found every ``stall_sweep_every``
  (:meth:`~sayiir_persistence.PersistentBackend.list_stalled_forks`) and moved on.
- A clean stop (:meth:`Worker.stop`, SIGINT/SIGTERM in :meth:`Worker.run_until_signalled`)
  waits a bounded time for running tasks, records what finished, and then releases the
  claims of the unfinished ones, so other workers retry them at once instead of after the
  TTL. A crash loses only results not yet recorded: their claims expire and the tasks run
  again.

How a workflow moves on is the user's decision, expressed as an *advance* function (see
:data:`Advance`; :class:`Pipeline` builds one for chains with fork/join steps). The worker
has the store record the finished task's output and call it on the stored state (position
and completed tasks), not on the event "task X finished", inside the same atomic step.
"""

from __future__ import annotations

from ..model import Advance
from .context import TaskContext, TaskFunction, TaskOutcome, WorkerStats
from .pipeline import Pipeline
from .worker import Worker, default_worker_id

__all__ = [
    "Advance",
    "Pipeline",
    "TaskContext",
    "TaskFunction",
    "TaskOutcome",
    "Worker",
    "WorkerStats",
    "default_worker_id",
]
