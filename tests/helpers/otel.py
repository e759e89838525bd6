"""The OpenTelemetry SDK for the telemetry tests: in-memory span exporter and metric reader.

The global providers can be set once per process, so :func:`sdk` sets them at its first call
and returns the same ones afterwards. A sampler switch keeps the rest of a test session
(which shares the process) from filling the exporter: spans record only while a test holds
the ``telemetry`` fixture. The SDK is imported only then (a plugin of the whole suite: a
run without OpenTelemetry installed skips the tests that use it).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@dataclass
class Sdk:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    recording: threading.Event
    """Set: every span is sampled; clear: none is (the sampler drops them)."""

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self) -> dict[str, list[Any]]:
        """The data points by metric name since the previous call (delta temporality)."""
        found: dict[str, list[Any]] = {}
        data = self.metrics.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found.setdefault(metric.name, []).extend(metric.data.data_points)
        return found


@functools.cache
def sdk() -> Sdk:
    """Set the global tracer and meter providers (once per process)."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
    from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler, SamplingResult

    recording = threading.Event()

    class Switch(Sampler):
        def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
            return (ALWAYS_ON if recording.is_set() else ALWAYS_OFF).should_sample(*args, **kwargs)

        def get_description(self) -> str:
            return "test switch"

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=Switch())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    reader = InMemoryMetricReader(
        preferred_temporality={
            Counter: AggregationTemporality.DELTA,
            Histogram: AggregationTemporality.DELTA,
        }
    )
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return Sdk(exporter, reader, recording)


@pytest.fixture
def telemetry() -> Iterator[Sdk]:
    """The SDK, recording for this test only, with no spans or metrics of earlier tests."""
    pytest.importorskip("opentelemetry.sdk")
    found = sdk()
    found.spans.clear()
    found.points()  # drop what was counted before (delta temporality)
    found.recording.set()
    try:
        yield found
    finally:
        found.recording.clear()
        found.spans.clear()


def counter_total(points: dict[str, list[Any]], name: str, **attributes: str) -> int:
    """The sum of a counter's data points whose attributes include ``attributes``."""
    return sum(
        point.value
        for point in points.get(name, [])
        if all(point.attributes.get(k) == v for k, v in attributes.items())
    )
