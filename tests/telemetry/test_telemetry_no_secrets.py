"""No payload, user text, URL or password reaches a span or a metric: every call that carries
one is made with a distinctive marker, then every attribute, event, link and status of every
span and the attributes of every metric data point are searched for the markers."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from helpers.isolated_db import isolated_database
from helpers.otel import Sdk
from helpers.worker_stores import Store, all_done, wait_until
from sayiir_persistence import (
    NotFoundError,
    PersistentBackend,
    SignalKind,
    SignalRequest,
    SqlBackend,
    TaskCompletion,
)
from sayiir_persistence.provisioning import migrate
from sayiir_persistence.worker import Pipeline, TaskContext

TTL = timedelta(minutes=5)
PIPELINE = Pipeline("first", "second")
PASSWORD = "s3cretPW"
MARKERS = (
    "PAYLOAD-initial-7f3a",
    "PAYLOAD-output-7f3a",
    "PAYLOAD-event-7f3a",
    "PAYLOAD-result-7f3a",
    "ERROR-text-7f3a",
    "RAISED-text-7f3a",
    "REASON-text-7f3a",
    "REQUESTER-text-7f3a",
)


def _values(value: Any) -> Iterator[str]:
    if isinstance(value, str | bytes):
        yield value.decode(errors="replace") if isinstance(value, bytes) else value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _values(item)
    else:
        yield repr(value)


def _texts(telemetry: Sdk, *, with_metrics: bool = True) -> list[str]:
    """Every string a span or metric point carries (names, attributes, events, links)."""
    texts: list[str] = []
    spans = telemetry.finished()
    assert spans, "nothing was recorded: the search below would prove nothing"
    for span in spans:
        texts.append(span.name)
        texts.append(span.status.description or "")
        for key, value in (span.attributes or {}).items():
            texts.append(key)
            texts.extend(_values(value))
        for event in span.events:
            texts.append(event.name)
            for key, value in (event.attributes or {}).items():
                texts.append(key)
                texts.extend(_values(value))
        for link in span.links:
            for key, value in (link.attributes or {}).items():
                texts.append(key)
                texts.extend(_values(value))
    points = telemetry.points()
    assert points or not with_metrics, "no metric was recorded"
    for name, data_points in points.items():
        texts.append(name)
        for point in data_points:
            for key, value in (point.attributes or {}).items():
                texts.append(key)
                texts.extend(_values(value))
    return texts


def _exercise(backend: PersistentBackend, instance_id: str, definition: str) -> None:
    """Calls carrying every kind of user data, then a Worker run whose task fails."""
    snapshot = PIPELINE.start(
        instance_id, definition, initial_input=MARKERS[0].encode(), tags=("marked",)
    )
    backend.start_workflow(snapshot)
    claim = backend.claim_task(instance_id, "first", "w-1", TTL)
    assert claim is not None
    backend.complete_tasks(
        [
            TaskCompletion(
                instance_id,
                "first",
                "w-1",
                claim.token,
                output=MARKERS[1].encode(),
                advance=PIPELINE,
            )
        ],
        ttl=TTL,
    )
    backend.send_event(instance_id, "evt", MARKERS[2].encode(), idempotency_key="k-1")
    assert backend.consume_event(instance_id, "evt") == MARKERS[2].encode()
    backend.save_task_result(instance_id, "first", MARKERS[3].encode())
    backend.load_snapshot(instance_id)
    backend.load_task_result(instance_id, "first")
    request = SignalRequest(MARKERS[6], MARKERS[7], datetime.now(UTC))
    backend.store_signal(instance_id, SignalKind.PAUSE, request)
    backend.get_signal(instance_id, SignalKind.PAUSE)
    backend.clear_signal(instance_id, SignalKind.PAUSE)
    claim = backend.claim_task(instance_id, "second", "w-1", TTL)
    assert claim is not None
    backend.complete_tasks(
        [TaskCompletion(instance_id, "second", "w-1", claim.token, error=MARKERS[4])], ttl=TTL
    )
    with pytest.raises(NotFoundError):
        backend.load_snapshot(f"{instance_id}-absent")


def _raises(ctx: TaskContext) -> bytes:
    raise ValueError(MARKERS[5])


def test_no_payload_or_user_text_in_spans_or_metrics(store: Store, telemetry: Sdk) -> None:
    _exercise(store.backend, f"{store.definition}-direct", store.definition)
    [instance_id] = store.start(PIPELINE, payload=MARKERS[0].encode())
    with store.worker(_raises, PIPELINE, threads=1):
        wait_until(all_done(store, [instance_id]), "the workflow to fail")
    texts = _texts(telemetry)
    assert any("task first" in text for text in texts)  # the worker's spans were searched
    for marker in MARKERS:
        assert not [text for text in texts if marker in text], marker


@pytest.mark.postgres
def test_no_url_or_password_in_spans(postgres_url: str, telemetry: Sdk) -> None:
    # PostgreSQL under trust authentication accepts any password: connect with one.
    with isolated_database(postgres_url) as url:
        migrate(url)
        secret_url = make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)
        backend = SqlBackend(secret_url)
        try:
            _exercise(backend, "secret-url-1", "secret-def")
        finally:
            backend.close()
    texts = _texts(telemetry, with_metrics=False)  # no Worker: no metric
    assert any(text == "postgresql" for text in texts)  # db.system was searched
    for forbidden in (PASSWORD, "://", "127.0.0.1", "5432", *MARKERS):
        assert not [text for text in texts if forbidden in text], forbidden
