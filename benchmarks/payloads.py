"""Scenario 5: ``save_snapshot``, ``load_snapshot`` and ``save_task_result`` with large outputs.

For each output size, each repetition saves a new workflow whose snapshot holds one completed
task with that output (first save), loads it back (the output comes with it), and records a
second task's result of the same size with ``save_task_result``. One thread.
"""

from __future__ import annotations

import time
from typing import Any

from sayiir_persistence import AtTask, SqlBackend, WorkflowSnapshot

from . import databases
from .timing import summarize


def run(url: str, sizes: list[int], repetitions: int) -> list[dict[str, Any]]:
    databases.reset(url)
    rows = []
    with SqlBackend(url) as backend:
        for size in sizes:
            output = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            # Very large outputs: fewer repetitions, the time is the server's and the wire's.
            count = repetitions if size <= 1024 * 1024 else max(2, repetitions // 4)
            saves, loads, results = [], [], []
            for repetition in range(count + 1):  # the first one warms up
                snapshot = WorkflowSnapshot.new(
                    f"payload-{size}-{repetition}",
                    "payload-v1",
                    initial_input=b"{}",
                    first_task="a",
                )
                snapshot.mark_task_completed("a", output)
                snapshot.move_to(AtTask("b"))
                began = time.perf_counter()
                backend.save_snapshot(snapshot, expected_version=0)
                saved = time.perf_counter()
                loaded = backend.load_snapshot(snapshot.instance_id)
                load_done = time.perf_counter()
                backend.save_task_result(snapshot.instance_id, "b", output)
                ended = time.perf_counter()
                if loaded.completed_tasks["a"] != output:
                    raise RuntimeError("the loaded output differs from the saved one")
                if repetition:
                    saves.append(saved - began)
                    loads.append(load_done - saved)
                    results.append(ended - load_done)
            rows.append(
                {
                    "output_bytes": size,
                    "save_snapshot": summarize(saves),
                    "load_snapshot": summarize(loads),
                    "save_task_result": summarize(results),
                }
            )
    return rows
