"""A worker process whose ``poison`` task SIGKILLs it, for tests/faults/test_poison.py.

Each execution of ``poison`` appends a line to ``executions.log`` (flushed to disk) before
the kill, so the test counts executions exactly, whatever killed which process.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

from sayiir_persistence import RetryPolicy, SqlBackend
from sayiir_persistence.worker import Pipeline, TaskContext, Worker

POISON = Pipeline("poison")
HEALTHY = Pipeline("step_1", "step_2")
MAX_ATTEMPTS = 3
TTL = timedelta(seconds=1)


def run_worker(url: str, directory: str, worker_id: str) -> None:
    """Run a worker until killed: by its poison task, or by the test."""
    log = Path(directory) / "executions.log"

    def poison(ctx: TaskContext) -> bytes:
        with log.open("a") as executions:
            executions.write(f"{ctx.instance_id} attempt {ctx.claim.attempt} {worker_id}\n")
            executions.flush()
            os.fsync(executions.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    def step(ctx: TaskContext) -> bytes:
        return (ctx.input or b"") + ctx.task_id.encode()

    backend = SqlBackend(url)
    worker = Worker(
        backend,
        {"poison": poison, "step_1": step, "step_2": step},
        {"poison": POISON, "healthy": HEALTHY},
        worker_id=worker_id,
        # One task at a time: a kill then takes no other task with it. (A process running
        # several tasks costs each of them an attempt when it dies: with 2 threads, a healthy
        # task claimed three times by processes the poison killed fails too.)
        threads=1,
        ttl=TTL,
        poll_interval=timedelta(milliseconds=100),
        retry=RetryPolicy(max_attempts=MAX_ATTEMPTS, initial_delay=timedelta(milliseconds=50)),
    )
    worker.run_until_signalled()
