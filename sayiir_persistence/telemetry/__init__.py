"""OpenTelemetry traces and metrics, when ``opentelemetry-api`` is installed (the ``otel``
extra); without it every hook here is a no-op and nothing of OpenTelemetry is imported.

Spans and metrics go to the global tracer and meter providers, as OpenTelemetry
instrumentations do: set up an SDK (exporter, sampler) in your program and they appear;
without one the API's no-op providers drop them (about 2 µs a backend call, measured by
``python -m benchmarks.telemetry``).

The modules: ``_otel`` (the one optional import), ``tracing`` (the spans of backend calls and
the workflow's trace context), ``tasks`` (the span of each task execution in the ``Worker``),
``metrics`` (the ``Worker``'s instruments).
"""

from ._otel import AVAILABLE
from .tracing import TRACER_NAME

__all__ = ["AVAILABLE", "TRACER_NAME"]
