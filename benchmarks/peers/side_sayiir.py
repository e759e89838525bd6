"""sayiir 1.0.0 from PyPI (a workflow engine with a Rust core and Python bindings), run in a
child process.

Its Python API (``sayiir/__init__.py``, ``worker.py``, ``workflow_client.py``, ``_sayiir.pyi``
of the wheel): ``Flow(name).then(task)...build()`` makes a workflow;
``WorkflowClient(PostgresBackend(url)).submit(workflow, instance_id, input)`` saves its first
snapshot without running it; ``Worker(worker_id, backend, poll_interval=, claim_ttl=)``
``.start([workflows])`` runs a Rust polling loop on its own thread (with its own tokio runtime
and connection pool) that claims one task at a time and calls the Python task under the GIL.
There is no concurrency setting: 8 concurrent executions are 8 Workers in one process. The
backends are ``InMemoryBackend`` and ``PostgresBackend`` only: no SQLite.
"""

from __future__ import annotations

from typing import Any

from sayiir import Flow, PostgresBackend, Worker, WorkflowClient, task

from .contenders import CONCURRENCY, PEER_POLL_S


@task("t1")
def t1(x: str) -> str:
    return x + "a"


@task("t2")
def t2(x: str) -> str:
    return x + "b"


@task("t3")
def t3(x: str) -> str:
    return x + "c"


def _workflow(kind: str) -> Any:
    if kind == "one":
        return Flow("one").then(t1).build()
    return Flow("chain").then(t1).then(t2).then(t3).build()


class Side:
    def __init__(self, target: dict[str, str], kind: str, options: dict[str, Any]) -> None:
        if target["db"] != "postgres":
            raise ValueError("sayiir 1.0.0's Python bindings persist to PostgreSQL only")
        self.url = target["url"]
        self.workflow = _workflow(kind)
        self.client: WorkflowClient | None = None
        self.handles: list[Any] = []

    def create_schema(self) -> None:
        PostgresBackend(self.url)  # "Auto-runs migrations on first connect"

    def open_client(self) -> None:
        self.client = WorkflowClient(PostgresBackend(self.url))

    def start_workflow(self, instance_id: str) -> None:
        assert self.client is not None
        self.client.submit(self.workflow, instance_id, "in")

    def start_workers(self) -> None:
        backend = PostgresBackend(self.url)
        self.handles = [
            Worker(f"bench-{index}", backend, poll_interval=PEER_POLL_S).start([self.workflow])
            for index in range(CONCURRENCY)
        ]

    def stop_workers(self) -> None:
        for handle in self.handles:
            handle.shutdown()
        for handle in self.handles:
            handle.join()

    def close(self) -> None:
        pass
