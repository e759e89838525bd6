"""Worker processes with their own OpenTelemetry SDK, for the one-trace-per-workflow test.

Each process (started with ``spawn``) sets a tracer provider with an in-memory exporter and
a meter provider with an in-memory reader, runs the demo's order pipeline
(:mod:`sayiir_persistence.demo.workflow`) in a :class:`~sayiir_persistence.worker.Worker`
until the file ``stop`` appears in its directory, stops the worker, and writes what it
recorded to ``<name>.json``: every finished span (trace id, span id, parent span id, name,
attributes, pid) and the sum of every counter by attributes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TracedWorkerSpec:
    url: str
    run_id: str
    directory: str
    name: str
    threads: int = 2


def run_traced_worker(spec: TracedWorkerSpec) -> None:
    """A spawned process's body (see the module documentation)."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

    # Imported after the providers are set, as an application would (the library's proxy
    # tracer and meter follow the global providers whenever they are set).
    from sayiir_persistence import SqlBackend
    from sayiir_persistence.demo.executions import Recorder
    from sayiir_persistence.demo.workflow import (
        DEFINITION_HASH,
        ORDER_PIPELINE,
        order_handlers,
        run_tags,
    )
    from sayiir_persistence.worker import Worker

    directory = Path(spec.directory)
    backend = SqlBackend(spec.url)
    try:
        worker = Worker(
            backend,
            order_handlers(Recorder(backend.engine, spec.run_id, spec.name)),
            {DEFINITION_HASH: ORDER_PIPELINE},
            worker_id=f"{spec.name}-{os.getpid()}",
            threads=spec.threads,
            poll_interval=timedelta(milliseconds=20),
            tags=run_tags(spec.run_id),
        )
        with worker:
            (directory / f"{spec.name}.ready").touch()
            while not (directory / "stop").exists():
                time.sleep(0.05)
    finally:
        backend.close()
    provider.force_flush()
    spans = [
        {
            "trace_id": f"{span.context.trace_id:032x}",
            "span_id": f"{span.context.span_id:016x}",
            "parent_span_id": None if span.parent is None else f"{span.parent.span_id:016x}",
            "name": span.name,
            "attributes": dict(span.attributes or {}),
            "pid": os.getpid(),
        }
        for span in exporter.get_finished_spans()
    ]
    counters: dict[str, list[dict[str, Any]]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                counters[metric.name] = [
                    {
                        "attributes": dict(point.attributes or {}),
                        "value": getattr(point, "value", None),
                        "count": getattr(point, "count", None),
                    }
                    for point in metric.data.data_points
                ]
    out = directory / f"{spec.name}.json"
    out.write_text(json.dumps({"spans": spans, "metrics": counters}))
