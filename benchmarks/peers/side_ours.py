"""Our side: ``SqlBackend`` + the reference ``Worker``, run in a child process.

:func:`make_worker` is the one place that builds the Worker: a new Worker option (a batched
completer, wake-ups, ...) goes there, or in a contender's ``options``
(``benchmarks/peers/contenders.py``), or on the command line with ``--ours-options``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sayiir_persistence import SqlBackend, migrate
from sayiir_persistence.worker import Pipeline, TaskContext, Worker

from ..databases import create_and_migrate

DEFINITION = "bench-peers"
PIPELINES = {"one": Pipeline("t1"), "chain": Pipeline("t1", "t2", "t3")}


def _t1(ctx: TaskContext) -> bytes:
    return (ctx.task.input or b"") + b"a"


def _t2(ctx: TaskContext) -> bytes:
    return (ctx.task.input or b"") + b"b"


def _t3(ctx: TaskContext) -> bytes:
    return (ctx.task.input or b"") + b"c"


HANDLERS = {"t1": _t1, "t2": _t2, "t3": _t3}


def make_worker(backend: SqlBackend, pipeline: Pipeline, options: dict[str, Any]) -> Worker:
    """Our Worker as the benchmark runs it: ``options`` are Worker keyword arguments, those
    ending in ``_ms`` given in milliseconds (``poll_interval_ms=10`` ->
    ``poll_interval=timedelta(milliseconds=10)``)."""
    kwargs: dict[str, Any] = {}
    for name, value in options.items():
        if name.endswith("_ms"):
            kwargs[name.removesuffix("_ms")] = timedelta(milliseconds=value)
        else:
            kwargs[name] = value
    return Worker(backend, HANDLERS, pipeline, **kwargs)


def url_of(target: dict[str, str], driver: str) -> str:
    if target["db"] == "sqlite":
        return f"sqlite:///{target['path']}"
    return target["url"].replace("postgresql://", f"postgresql+{driver}://", 1)


class Side:
    def __init__(self, target: dict[str, str], kind: str, options: dict[str, Any]) -> None:
        options = dict(options)
        # psycopg (3) unless a contender says otherwise (the run in results/peers was made so).
        self.url = url_of(target, options.pop("driver", "psycopg"))
        self.pipeline = PIPELINES["one" if kind == "one" else "chain"]
        self.options = options
        self.backend: SqlBackend | None = None
        self.worker: Worker | None = None

    def create_schema(self) -> None:
        if self.url.startswith("sqlite"):
            migrate(self.url)
        else:
            create_and_migrate(self.url)

    def open_client(self) -> None:
        self.backend = SqlBackend(self.url)

    def start_workflow(self, instance_id: str) -> None:
        assert self.backend is not None
        self.backend.save_snapshot(
            self.pipeline.start(instance_id, DEFINITION, initial_input=b"in")
        )

    def start_workers(self) -> None:
        self.backend = SqlBackend(self.url)
        self.worker = make_worker(self.backend, self.pipeline, self.options).start()

    def stop_workers(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
