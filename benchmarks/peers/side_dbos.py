"""DBOS Transact (durable workflows in the application, state in the system database), run in
a child process.

A workflow is a ``@DBOS.workflow`` calling one ``@DBOS.step`` (``one``), or three in a row,
each step's output the next one's input (``chain``): DBOS records every step's output, as we
record every task's. Workflows are enqueued on a queue registered with
``DBOS.register_queue(name, worker_concurrency=8, polling_interval_sec=0.01)`` (DBOS 3.4 keeps
queues in the system database; a queue is registered after ``launch``), with
``DBOSClient.enqueue`` (DBOS's API for enqueueing from outside the application). The worker is
a process that calls ``DBOS.launch()``: its queue thread dequeues up to ``worker_concurrency``
workflows at a time, polling every ``polling_interval_sec`` (1 s by default: at that rate a
queue runs at most 8 workflows per second, so the benchmark polls at 10 ms like every contender).
"""

from __future__ import annotations

from typing import Any

from dbos import DBOS, DBOSClient, EnqueueOptions

from .contenders import CONCURRENCY, DBOS_QUEUE, PEER_POLL_S

APP_NAME = "bench"
APP_VERSION = "bench-1"


@DBOS.step()
def t1(x: str) -> str:
    return x + "a"


@DBOS.step()
def t2(x: str) -> str:
    return x + "b"


@DBOS.step()
def t3(x: str) -> str:
    return x + "c"


@DBOS.workflow(name="one")
def one(x: str) -> str:
    return t1(x)


@DBOS.workflow(name="chain")
def chain(x: str) -> str:
    return t3(t2(t1(x)))


def url_of(target: dict[str, str]) -> str:
    return f"sqlite:///{target['path']}" if target["db"] == "sqlite" else target["url"]


class Side:
    def __init__(self, target: dict[str, str], kind: str, options: dict[str, Any]) -> None:
        self.url = url_of(target)
        self.workflow = "one" if kind == "one" else "chain"
        self.client: DBOSClient | None = None
        self.launched = False

    def _dbos(self, executor: str) -> None:
        DBOS(
            config={
                "name": APP_NAME,
                "system_database_url": self.url,
                "application_version": APP_VERSION,
                "executor_id": executor,
                "log_level": "WARNING",
            }
        )

    def create_schema(self) -> None:
        # launch() creates the system tables; the queue lives there too. This process
        # dequeues nothing.
        self._dbos("bench-setup")
        DBOS.listen_queues([])
        DBOS.launch()
        DBOS.register_queue(
            DBOS_QUEUE, worker_concurrency=CONCURRENCY, polling_interval_sec=PEER_POLL_S
        )
        DBOS.destroy()

    def open_client(self) -> None:
        self.client = DBOSClient(system_database_url=self.url, application_name=APP_NAME)

    def start_workflow(self, instance_id: str) -> None:
        assert self.client is not None
        options: EnqueueOptions = {
            "queue_name": DBOS_QUEUE,
            "workflow_name": self.workflow,
            "workflow_id": instance_id,
            "app_version": APP_VERSION,
        }
        self.client.enqueue(options, "in")

    def start_workers(self) -> None:
        self._dbos("bench-worker")
        DBOS.launch()
        self.launched = True

    def stop_workers(self) -> None:
        if self.launched:
            DBOS.destroy(workflow_completion_timeout_sec=10)
            self.launched = False

    def close(self) -> None:
        if self.client is not None:
            self.client.destroy()
