"""A poison task: every execution SIGKILLs its worker process (issue 12's crash test).

With ``RetryPolicy(max_attempts=3)`` the store counts each claim as an attempt, so the task
runs exactly three times, whichever processes die, and its workflow is then failed; the
other workflows complete. Worker processes that die are started again, as a supervisor
would. They run one task at a time, so that a kill takes no other task with it (a crash costs
an attempt to every task its process was running: see README, Retries, limits and deadlines).
"""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

from helpers import poison_workers
from helpers.isolated_db import isolated_database
from sayiir_persistence import SqlBackend, WorkflowStatus, migrate

pytestmark = [pytest.mark.faults, pytest.mark.multiprocess, pytest.mark.timeout(300)]

PROCESSES = 3
HEALTHY_WORKFLOWS = 20
WAIT_SECONDS = 120.0


def _start(url: str, directory: Path, number: int) -> BaseProcess:
    process = multiprocessing.get_context("spawn").Process(
        target=poison_workers.run_worker,
        args=(url, str(directory), f"poisoned-{number}"),
        daemon=True,
    )
    process.start()
    return process


def test_a_task_that_kills_every_worker_stops_after_max_attempts(
    sql_url: str, tmp_path: Path
) -> None:
    with isolated_database(sql_url) as url:
        migrate(url)
        with SqlBackend(url) as backend:
            backend.save_snapshot(poison_workers.POISON.start("poison", "poison"))
            healthy = [f"healthy-{n:02d}" for n in range(HEALTHY_WORKFLOWS)]
            for instance_id in healthy:
                backend.save_snapshot(poison_workers.HEALTHY.start(instance_id, "healthy"))

            started = 0
            processes: list[BaseProcess] = []
            deadline = time.monotonic() + WAIT_SECONDS
            try:
                while True:
                    statuses = {i: backend.load_snapshot(i).status for i in ["poison", *healthy]}
                    if WorkflowStatus.IN_PROGRESS not in statuses.values():
                        break
                    assert time.monotonic() < deadline, f"unfinished: {statuses}"
                    processes = [p for p in processes if p.is_alive()]
                    while len(processes) < PROCESSES:  # the supervisor restarts the dead
                        processes.append(_start(url, tmp_path, started))
                        started += 1
                    time.sleep(0.1)
            finally:
                for process in processes:
                    process.kill()
                    process.join(10)

            executions = (tmp_path / "executions.log").read_text().splitlines()
            attempts = [line.split()[2] for line in executions]
            assert attempts == ["1", "2", "3"], executions  # exactly max_attempts executions
            poison = backend.load_snapshot("poison")
            assert poison.status is WorkflowStatus.FAILED
            assert poison.error is not None
            assert "'poison' failed after 3 attempts" in poison.error
            for instance_id in healthy:
                snapshot = backend.load_snapshot(instance_id)
                assert snapshot.status is WorkflowStatus.COMPLETED, instance_id
                assert snapshot.output == b"step_1step_2"
            assert started >= 3  # every execution of the poison task killed a process
