"""The demo's worker processes: each runs a :class:`~sayiir_persistence.worker.Worker` until
``SIGTERM``; :class:`WorkerPool` starts them (spawned, not forked), and stops them.

``_worker_main`` and :class:`WorkerSpec` are pickled by name to the spawned processes: they
stay at module level here.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.process import BaseProcess
from typing import Any

from ..retries import RetryPolicy
from ..sql.backend import SqlBackend
from ..worker import Worker
from .executions import Recorder
from .workflow import DEFINITION_HASH, ORDER_PIPELINE, order_handlers, run_tags

DEMO_RETRY = RetryPolicy(
    max_attempts=5, initial_delay=timedelta(milliseconds=200), max_delay=timedelta(seconds=2)
)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs (pickled to the spawned process)."""

    url: str
    name: str
    """``worker-<n>``, as shown to the user; the claims are held as ``demo-<run>-<name>``."""
    run_id: str
    threads: int
    ttl_seconds: float
    log_level: int
    flaky: float = 0.0
    """The fraction of orders whose payment fails at its first attempt (and is retried)."""


def _worker_main(spec: WorkerSpec, ready: Any) -> None:
    """Entry point of a worker process: run a Worker until SIGTERM.

    ``ready`` (a multiprocessing Event) is set once SIGTERM means "stop cleanly" here: the
    parent waits for it before stopping us, since SIGTERM's default action would kill a
    process that is still starting up.
    """
    # Ctrl-C reaches the whole process group; the parent turns it into an orderly SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop_requested.set())
    ready.set()
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s {spec.name} %(levelname)s %(name)s: %(message)s",
    )
    _stop_when_parent_dies()
    backend = SqlBackend(spec.url)
    try:
        recorder = Recorder(backend.engine, spec.run_id, spec.name)
        worker = Worker(
            backend,
            order_handlers(recorder, flaky=spec.flaky),
            {DEFINITION_HASH: ORDER_PIPELINE},
            # Unique across runs sharing a database: claims are held in this name.
            worker_id=f"demo-{spec.run_id}-{spec.name}",
            threads=spec.threads,
            ttl=timedelta(seconds=spec.ttl_seconds),
            poll_interval=timedelta(milliseconds=50),
            # Fewer, larger claim transactions: on SQLite every writer waits its turn.
            claim_batch_wait=timedelta(milliseconds=100),
            # Only this run's orders (and untagged workflows: use a scratch database).
            tags=run_tags(spec.run_id),
            shutdown_grace=timedelta(seconds=5),
            # A worker killed between saving a fork's last branch and moving the order on
            # leaves it at the join: the survivors look for such orders this often.
            stall_sweep_every=timedelta(seconds=spec.ttl_seconds),
            on_outcome=recorder.finished,
            # A failed payment is retried; also caps how often a task that kills its worker
            # is taken over.
            retry=DEMO_RETRY,
        )
        with worker:
            # A timeout keeps the main thread returning to the interpreter, which runs
            # signal handlers there.
            while not stop_requested.wait(0.5):
                pass
    finally:
        backend.close()


def _stop_when_parent_dies() -> None:
    """SIGTERM ourselves (a clean stop) if the demo process dies without stopping us."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@dataclass
class WorkerPool:
    """The worker processes of one run."""

    spec: WorkerSpec
    processes: dict[str, BaseProcess] = field(default_factory=dict)
    ready: dict[str, Any] = field(default_factory=dict)
    started: int = 0

    def start_one(self) -> tuple[str, BaseProcess]:
        self.started += 1
        worker_id = f"worker-{self.started}"
        context = multiprocessing.get_context("spawn")  # no fork: threads and engines
        ready = context.Event()
        process = context.Process(
            target=_worker_main,
            args=(_spec_for(self.spec, worker_id), ready),
            name=worker_id,
            daemon=True,
        )
        process.start()
        self.processes[worker_id] = process
        self.ready[worker_id] = ready
        return worker_id, process

    def alive(self) -> dict[str, BaseProcess]:
        return {wid: p for wid, p in self.processes.items() if p.is_alive()}

    def stop_all(self, timeout: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every live worker, wait for them; the exit codes by worker id."""
        deadline = time.monotonic() + timeout
        for worker_id, process in self.alive().items():
            # A worker still starting up would die of SIGTERM instead of stopping cleanly.
            self.ready[worker_id].wait(max(deadline - time.monotonic(), 0.1))
            process.terminate()
        for process in self.processes.values():
            process.join(max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                process.kill()
                process.join()
        return {wid: p.exitcode for wid, p in self.processes.items()}


def _spec_for(spec: WorkerSpec, worker_id: str) -> WorkerSpec:
    return dataclasses.replace(spec, name=worker_id)
