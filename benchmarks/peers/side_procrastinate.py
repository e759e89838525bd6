"""Procrastinate (a PostgreSQL task queue, no workflow model), run in a child process.

A one-task workflow is one job (task ``solo``); a chain is three jobs, each task deferring the
next one with its output (``t1`` -> ``t2`` -> ``t3``), which is how chains are written with
Procrastinate. The tasks are ``async``: the worker's ``concurrency`` applies to asynchronous
tasks (its docs, "Execute multiple jobs at the same time"); synchronous ones would run in
threads through asgiref. The worker runs ``run_worker_async`` on an event loop in a thread of
the child, so that the child's protocol stays synchronous.

Every job carries the workflow id in its ``wf`` argument, which the parent's SQL reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from procrastinate import App, PsycopgConnector

from .contenders import CONCURRENCY

POOL_SIZE = CONCURRENCY + 2  # one connection per running job, LISTEN, and the heartbeat


def _app(conninfo: str) -> App:
    app = App(connector=PsycopgConnector(conninfo=conninfo, min_size=POOL_SIZE, max_size=POOL_SIZE))

    @app.task(name="solo")
    async def solo(wf: str, x: str) -> str:
        return x + "a"

    @app.task(name="t1")
    async def t1(wf: str, x: str) -> str:
        await t2.defer_async(wf=wf, x=x + "a")
        return x + "a"

    @app.task(name="t2")
    async def t2(wf: str, x: str) -> str:
        await t3.defer_async(wf=wf, x=x + "b")
        return x + "b"

    @app.task(name="t3")
    async def t3(wf: str, x: str) -> str:
        return x + "c"

    return app


class Side:
    def __init__(self, target: dict[str, str], kind: str, options: dict[str, Any]) -> None:
        if target["db"] != "postgres":
            raise ValueError("Procrastinate runs on PostgreSQL only")
        self.conninfo = target["url"]
        self.app = _app(self.conninfo)
        self.first = self.app.tasks["solo" if kind == "one" else "t1"]
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.worker_task: asyncio.Task[None] | None = None
        self.opened = False

    def create_schema(self) -> None:
        with self.app.open():
            self.app.schema_manager.apply_schema()

    def open_client(self) -> None:
        self.app.open()
        self.opened = True

    def start_workflow(self, instance_id: str) -> None:
        self.first.defer(wf=instance_id, x="in")

    def start_workers(self) -> None:
        started = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            async with self.app.open_async():
                self.worker_task = asyncio.create_task(
                    self.app.run_worker_async(
                        concurrency=CONCURRENCY,
                        listen_notify=True,
                        install_signal_handlers=False,
                    )
                )
                started.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.worker_task

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as error:
                failure.append(error)
                started.set()

        self.thread = threading.Thread(target=run, name="procrastinate-worker", daemon=True)
        self.thread.start()
        started.wait()
        if failure:
            raise failure[0]

    def stop_workers(self) -> None:
        # Cancelling run_worker_async asks the worker to stop gracefully (its docs, "Launch a
        # worker ... inside an application").
        if self.loop is not None and self.worker_task is not None:
            self.loop.call_soon_threadsafe(self.worker_task.cancel)
        if self.thread is not None:
            self.thread.join(timeout=30)

    def close(self) -> None:
        if self.opened:
            self.app.close()
