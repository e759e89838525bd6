"""One workflow is one trace across worker processes.

The demo's order workflows (validate -> (reserve_stock || charge_payment) -> ship) are started
here with tracing on; two spawned worker processes, each with its own SDK and in-memory
exporter (tests/helpers/otel_workers.py), run them and dump their spans and metrics. Every
task span must be a child of its workflow's start span, in the workflow's trace, whichever
process ran it, and the counters must match the spans.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from helpers.otel import Sdk
from helpers.otel_workers import TracedWorkerSpec, run_traced_worker
from sayiir_persistence import SqlBackend, WorkflowStatus, migrate
from sayiir_persistence.demo.executions import prepare_executions_table
from sayiir_persistence.demo.workflow import (
    CONSUMES,
    DEFINITION_HASH,
    ORDER_PIPELINE,
    new_order,
    run_tags,
)

pytestmark = [pytest.mark.sqlite, pytest.mark.multiprocess, pytest.mark.timeout(240)]

ORDERS = 40
PROCESSES = 2
WAIT_SECONDS = 120.0


def _start_orders(backend: SqlBackend, run_id: str) -> list[str]:
    ids = []
    for number in range(1, ORDERS + 1):
        instance_id, order = new_order(run_id, number)
        snapshot = ORDER_PIPELINE.start(
            instance_id, DEFINITION_HASH, initial_input=order, tags=run_tags(run_id)
        )
        backend.start_workflow(snapshot)
        ids.append(instance_id)
    return ids


def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _run_workers(url: str, run_id: str, directory: Path, start: Any) -> list[dict[str, Any]]:
    """Start the worker processes, call ``start()`` once they are ready, wait until every
    order completed, stop them; what each recorded."""
    context = multiprocessing.get_context("spawn")
    names = [f"traced-{index}" for index in range(PROCESSES)]
    processes = [
        context.Process(
            target=run_traced_worker,
            args=(TracedWorkerSpec(url, run_id, str(directory), name),),
            daemon=True,
        )
        for name in names
    ]
    for process in processes:
        process.start()
    try:
        _wait(
            lambda: all((directory / f"{name}.ready").exists() for name in names),
            "the worker processes to be ready",
        )
        start()
        (directory / "stop").touch()
        for process in processes:
            process.join(60)
            assert process.exitcode == 0, f"a worker process exited with {process.exitcode}"
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    return [json.loads((directory / f"{name}.json").read_text()) for name in names]


def _total(dumps: list[dict[str, Any]], metric: str, **attributes: str) -> int:
    return sum(
        point["value"]
        for dump in dumps
        for point in dump["metrics"].get(metric, [])
        if all(point["attributes"].get(k) == v for k, v in attributes.items())
    )


def test_one_trace_per_workflow_across_two_worker_processes(tmp_path: Path, telemetry: Sdk) -> None:
    url = f"sqlite:///{tmp_path / 'traced.db'}"
    migrate(url)
    backend = SqlBackend(url)
    run_id = uuid.uuid4().hex[:8]
    ids: list[str] = []
    try:
        prepare_executions_table(backend.engine)

        def start_and_wait() -> None:
            # Started once both processes are ready, so that both find work.
            ids.extend(_start_orders(backend, run_id))
            _wait(
                lambda: len(backend.list_snapshots(status=WorkflowStatus.COMPLETED)) == ORDERS,
                "every order to complete",
            )

        dumps = _run_workers(url, run_id, tmp_path, start_and_wait)
        stored = {i: backend.load_snapshot(i).trace_context for i in ids}
    finally:
        backend.close()

    # The start spans (this process): the stored context of each workflow is its start span.
    starts = {
        str((span.attributes or {})["sayiir.instance_id"]): span
        for span in telemetry.finished()
        if span.name == "start_workflow"
    }
    assert sorted(starts) == sorted(ids)
    roots: dict[str, tuple[str, str]] = {}
    for instance_id, traceparent in stored.items():
        assert traceparent is not None, instance_id
        _, trace_id, span_id, _ = traceparent.split("-")
        start = starts[instance_id]
        assert (int(trace_id, 16), int(span_id, 16)) == (
            start.context.trace_id,
            start.context.span_id,
        )
        roots[instance_id] = (trace_id, span_id)

    spans = [span for dump in dumps for span in dump["spans"]]
    tasks = [span for span in spans if span["name"].startswith("task ")]
    by_instance: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in tasks:
        by_instance[span["attributes"]["sayiir.instance_id"]].append(span)
    assert sorted(by_instance) == sorted(ids)
    for instance_id, spans_of_one in by_instance.items():
        trace_id, start_span_id = roots[instance_id]
        for span in spans_of_one:
            assert span["trace_id"] == trace_id, (instance_id, span["name"])
            assert span["parent_span_id"] == start_span_id, (instance_id, span["name"])
        recorded = {
            span["attributes"]["sayiir.task_id"]
            for span in spans_of_one
            if span["attributes"]["sayiir.outcome"] == "recorded"
        }
        assert recorded == set(CONSUMES), instance_id

    # Both processes ran tasks.
    pids = Counter(span["pid"] for span in tasks)
    assert len(pids) == PROCESSES, pids

    # The task functions' backend calls (ship reads both branches' results) are children of
    # their task span, in the workflow's trace.
    task_ids = {span["span_id"]: span for span in tasks}
    reads = [span for span in spans if span["name"] == "load_task_result"]
    assert len(reads) >= 2 * ORDERS
    for read in reads:
        parent = task_ids[read["parent_span_id"]]
        assert parent["name"] == "task ship"
        assert read["trace_id"] == parent["trace_id"]

    # The counters add up to the spans.
    outcomes = Counter(span["attributes"]["sayiir.outcome"] for span in tasks)
    assert _total(dumps, "sayiir.tasks.claimed") == len(tasks)
    assert _total(dumps, "sayiir.tasks.recorded") == outcomes["recorded"] == len(CONSUMES) * ORDERS
    assert _total(dumps, "sayiir.tasks.lost") == outcomes["lost"]
    assert _total(dumps, "sayiir.tasks.failed") == outcomes["failed"] + outcomes["retrying"]
    task_durations = sum(
        point["count"] for dump in dumps for point in dump["metrics"]["sayiir.task.duration"]
    )
    assert task_durations == len(tasks)
