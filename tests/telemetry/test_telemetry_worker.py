"""The Worker's task spans and metrics, in this process, on every store."""

from __future__ import annotations

import threading

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from helpers.otel import Sdk, counter_total
from helpers.worker_stores import Store, all_done, wait_until
from sayiir_persistence.worker import Pipeline, TaskContext

PIPELINE = Pipeline("first", "second")


def _second_reads_first(ctx: TaskContext) -> bytes:
    if ctx.task_id == "second":
        assert ctx.result_of("first") == b"one"  # a backend call inside the task's span
        return b"two"
    return b"one"


def _tasks(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [span for span in spans if span.name.startswith("task ")]


def test_each_execution_has_a_span_with_its_outcome(store: Store, telemetry: Sdk) -> None:
    ids = store.start(PIPELINE, count=3)
    worker = store.worker(_second_reads_first, PIPELINE, threads=2)
    with worker:
        wait_until(all_done(store, ids), "the workflows to complete")
    spans = telemetry.finished()
    tasks = _tasks(spans)
    assert sorted(span.name for span in tasks) == ["task first"] * 3 + ["task second"] * 3
    for span in tasks:
        assert span.kind is SpanKind.CONSUMER
        attributes = dict(span.attributes or {})
        assert attributes.pop("sayiir.instance_id") in ids
        assert attributes == {
            "sayiir.task_id": span.name.removeprefix("task "),
            "sayiir.worker_id": worker.worker_id,
            "sayiir.attempt": 1,
            "sayiir.claim_token": 1,
            "sayiir.outcome": "recorded",
        }
        assert span.status.status_code is StatusCode.UNSET
    # The task function's backend calls are children of its span.
    reads = [span for span in spans if span.name == "load_task_result"]
    assert len(reads) == 3
    by_id = {span.context.span_id: span for span in tasks}
    for read in reads:
        assert read.parent is not None
        parent = by_id[read.parent.span_id]
        assert parent.name == "task second"
        assert read.context.trace_id == parent.context.trace_id
        assert read.attributes is not None
        assert read.attributes["sayiir.instance_id"] == parent.attributes["sayiir.instance_id"]  # type: ignore[index]

    points = telemetry.points()
    assert counter_total(points, "sayiir.tasks.claimed") == 6
    assert counter_total(points, "sayiir.tasks.recorded") == 6
    assert counter_total(points, "sayiir.tasks.recorded", **{"sayiir.outcome": "recorded"}) == 6
    assert counter_total(points, "sayiir.tasks.failed") == 0
    assert counter_total(points, "sayiir.tasks.lost") == 0
    [task_duration] = points["sayiir.task.duration"]
    assert task_duration.count == 6
    assert sum(point.count for point in points["sayiir.claim.duration"]) >= 1
    assert worker.stats.recorded == 6


def test_a_failed_task_is_an_error_span_and_counted(store: Store, telemetry: Sdk) -> None:
    secret = "user-secret-in-an-exception"

    def fails(ctx: TaskContext) -> bytes:
        raise ValueError(secret)

    [instance_id] = store.start(PIPELINE)
    with store.worker(fails, PIPELINE, threads=1):
        wait_until(all_done(store, [instance_id]), "the workflow to fail")
    [span] = _tasks(telemetry.finished())
    assert span.attributes is not None
    assert span.attributes["sayiir.outcome"] == "failed"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "failed"
    assert span.events == ()
    points = telemetry.points()
    assert counter_total(points, "sayiir.tasks.failed") == 1
    assert counter_total(points, "sayiir.tasks.recorded", **{"sayiir.outcome": "failed"}) == 1


def _queue_depth(telemetry: Sdk) -> dict[int, int]:
    return {
        point.attributes["sayiir.priority"]: point.value
        for point in telemetry.points().get("sayiir.queue.depth", [])
    }


def test_the_queue_depth_gauge_reports_the_runnable_tasks_while_a_worker_runs(
    store: Store, telemetry: Sdk
) -> None:
    release = threading.Event()

    def blocks(ctx: TaskContext) -> bytes:
        release.wait(30)
        return b"done"

    ids = store.start(PIPELINE, count=4)
    worker = store.worker(blocks, PIPELINE, threads=1)
    assert _queue_depth(telemetry) == {}  # no worker running: no store watched
    with worker:
        wait_until(lambda: worker.running_count == 1, "one task running")
        # Four workflows at the default priority 3, one task of them claimed by the worker.
        assert _queue_depth(telemetry) == {1: 0, 2: 0, 3: 3, 4: 0, 5: 0}
        release.set()
        wait_until(all_done(store, ids), "the workflows to complete")
        assert _queue_depth(telemetry) == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0}
    assert _queue_depth(telemetry) == {}  # stopped: no longer watched
