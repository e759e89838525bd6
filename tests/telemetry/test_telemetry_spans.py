"""The spans of backend calls and the workflow's trace context, on every store, with the
OpenTelemetry SDK's in-memory exporter (see helpers/otel.py)."""

from __future__ import annotations

import inspect
from datetime import timedelta

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from helpers.otel import Sdk, sdk
from helpers.worker_stores import Store
from sayiir_persistence import (
    InMemoryBackend,
    InvalidInputError,
    NotFoundError,
    PersistentBackend,
    SqlBackend,
    TaskCompletion,
    WorkflowSnapshot,
)
from sayiir_persistence.worker import Pipeline

TTL = timedelta(minutes=5)
PIPELINE = Pipeline("first", "second")
# Methods that call no store: no span.
_UNTRACED = {"work_waiter", "close"}


def _public_methods(cls: type) -> list[str]:
    return sorted(
        name
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name not in _UNTRACED
    )


@pytest.mark.parametrize("cls", [PersistentBackend, InMemoryBackend, SqlBackend])
def test_every_public_method_is_traced(cls: type) -> None:
    # functools.wraps leaves __wrapped__ on the traced ones; an override (list_stalled_forks)
    # or a new method without @traced would have none.
    untraced = [
        name for name in _public_methods(cls) if not hasattr(getattr(cls, name), "__wrapped__")
    ]
    assert untraced == []
    assert len(_public_methods(PersistentBackend)) >= 26


def _by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def _parent_of(traceparent: str | None) -> tuple[int, int]:
    """The trace id and span id of a sampled ``traceparent``."""
    assert traceparent is not None
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00" and int(flags, 16) & 1 == 1
    return int(trace_id, 16), int(span_id, 16)


def _expected_system(store: Store) -> str | None:
    backend = store.backend
    return backend.engine.dialect.name if isinstance(backend, SqlBackend) else None


def test_backend_calls_have_one_span_each_with_ids(store: Store, telemetry: Sdk) -> None:
    backend = store.backend
    [instance_id] = store.start(PIPELINE)
    claim = backend.claim_task(instance_id, "first", "w-1", TTL)
    assert claim is not None
    backend.complete_tasks(
        [TaskCompletion(instance_id, "first", "w-1", claim.token, output=b"one")], ttl=TTL
    )
    backend.load_snapshot(instance_id)
    backend.list_snapshots(limit=10)
    backend.list_stalled_forks(limit=5)
    spans = telemetry.finished()

    system = _expected_system(store)
    kind = SpanKind.INTERNAL if system is None else SpanKind.CLIENT
    names = [span.name for span in spans]
    assert names == [
        "save_snapshot",
        "claim_task",
        "complete_tasks",
        "load_snapshot",
        "list_snapshots",
        "list_stalled_forks",
    ], names
    for span in spans:
        assert span.kind is kind
        assert span.attributes is not None
        assert span.attributes["sayiir.operation"] == span.name
        assert span.attributes.get("db.system") == system
        assert span.status.status_code is StatusCode.UNSET
        assert span.parent is None  # no caller span: each call is a root

    [claimed] = _by_name(spans, "claim_task")
    assert claimed.attributes == {
        "sayiir.operation": "claim_task",
        **({} if system is None else {"db.system": system}),
        "sayiir.instance_id": instance_id,
        "sayiir.task_id": "first",
        "sayiir.worker_id": "w-1",
    }
    [completed] = _by_name(spans, "complete_tasks")
    assert completed.attributes is not None
    assert completed.attributes["sayiir.batch_size"] == 1
    assert completed.attributes["sayiir.instance_id"] == instance_id
    assert completed.attributes["sayiir.task_id"] == "first"
    [saved] = _by_name(spans, "save_snapshot")
    assert saved.attributes is not None
    assert saved.attributes["sayiir.instance_id"] == instance_id
    [listed] = _by_name(spans, "list_snapshots")
    assert listed.attributes is not None
    assert listed.attributes["sayiir.result_count"] == 1


def test_a_caller_span_is_the_parent(store: Store, telemetry: Sdk) -> None:
    [instance_id] = store.start(PIPELINE)
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        store.backend.load_snapshot(instance_id)
        store.backend.claim_available_tasks("w-1", 5, TTL)
    spans = telemetry.finished()
    for name in ("load_snapshot", "claim_available_tasks"):
        [span] = _by_name(spans, name)
        assert span.parent is not None
        assert span.parent.span_id == caller.get_span_context().span_id
        assert span.context.trace_id == caller.get_span_context().trace_id


def test_errors_set_the_status_to_the_class_name_only(store: Store, telemetry: Sdk) -> None:
    with pytest.raises(NotFoundError):
        store.backend.load_snapshot("no-such-instance")
    with pytest.raises(InvalidInputError):
        store.backend.claim_task("", "first", "w-1", TTL)  # refused by validation, in the span
    missing, invalid = telemetry.finished()
    for span, error in ((missing, "NotFoundError"), (invalid, "InvalidInputError")):
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == error
        assert span.attributes is not None
        assert span.attributes["error.type"] == error
        assert span.events == ()  # no exception event: messages may quote user data
    assert missing.attributes is not None
    assert missing.attributes["sayiir.instance_id"] == "no-such-instance"


def test_start_workflow_stores_the_trace_context_of_its_own_span(
    store: Store, telemetry: Sdk
) -> None:
    snapshot = PIPELINE.start(f"{store.definition}-s", store.definition)
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        stored = store.backend.start_workflow(snapshot)
    [start] = _by_name(telemetry.finished(), "start_workflow")
    assert _parent_of(stored.trace_context) == (start.context.trace_id, start.context.span_id)
    assert store.backend.load_snapshot(snapshot.instance_id).trace_context == stored.trace_context
    assert start.parent is not None and start.parent.span_id == caller.get_span_context().span_id
    assert snapshot.trace_context is None  # the caller's snapshot is not changed


def test_save_snapshot_of_a_new_workflow_stores_the_trace_context(
    store: Store, telemetry: Sdk
) -> None:
    snapshot = PIPELINE.start(f"{store.definition}-n", store.definition)
    store.backend.save_snapshot(snapshot, expected_version=0)
    assert snapshot.version == 1 and snapshot.trace_context is None
    [save] = _by_name(telemetry.finished(), "save_snapshot")
    stored = store.backend.load_snapshot(snapshot.instance_id).trace_context
    assert _parent_of(stored) == (save.context.trace_id, save.context.span_id)


def test_a_given_trace_context_is_kept(store: Store, telemetry: Sdk) -> None:
    given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    snapshot = WorkflowSnapshot.new(
        f"{store.definition}-g", store.definition, first_task="first", trace_context=given
    )
    stored = store.backend.start_workflow(snapshot)
    assert stored.trace_context == given


def test_a_start_that_is_not_recorded_stores_no_trace_context(store: Store) -> None:
    # Outside the telemetry fixture the helpers' sampler drops every span (when the SDK is
    # set in this process): no recording span, no trace context (docs/contract.md).
    sdk()
    snapshot = PIPELINE.start(f"{store.definition}-q", store.definition)
    assert store.backend.start_workflow(snapshot).trace_context is None


def test_a_keyed_save_stores_the_trace_context_and_its_repeat_is_the_same_save(
    store: Store, telemetry: Sdk
) -> None:
    snapshot = PIPELINE.start(f"{store.definition}-k", store.definition)
    first = store.backend.save_snapshot(snapshot, expected_version=0, write_id="w-1")
    snapshot.version = 0  # the repeat sends the same snapshot, from another span
    assert store.backend.save_snapshot(snapshot, expected_version=0, write_id="w-1") == first
    first_save = _by_name(telemetry.finished(), "save_snapshot")[0]
    stored = store.backend.load_snapshot(snapshot.instance_id).trace_context
    assert _parent_of(stored) == (first_save.context.trace_id, first_save.context.span_id)
