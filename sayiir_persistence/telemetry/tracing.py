"""Spans of backend calls, and the workflow's trace context (a W3C ``traceparent``).

:func:`traced` wraps each public method of ``PersistentBackend``: one span per call, named
after the operation, on the tracer ``sayiir_persistence`` of the global provider. Its
attributes are ids and counts only, never payloads, error messages or URLs:

- ``sayiir.operation``: the method name (also the span name);
- ``db.system``: ``postgresql``, ``mysql`` or ``sqlite`` (absent for the in-memory store,
  whose spans are ``INTERNAL``; the SQL ones are ``CLIENT``);
- ``sayiir.instance_id``, ``sayiir.task_id``, ``sayiir.worker_id``: when the call has them
  (a snapshot's ``instance_id``; a ``complete_tasks`` batch of one: its completion's ids);
- ``sayiir.batch_size``: how many completions a ``complete_tasks`` call records;
- ``sayiir.result_count``: how many items a call returned, when it returns a list.

A call that raises ends with status ``ERROR``, described by the exception's class name, and
the attribute ``error.type`` (the class name too). The exception is not recorded as an event:
its message may carry user text.

Without OpenTelemetry, :func:`traced` returns the method unchanged and
:func:`with_trace_context` the snapshot unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ._otel import AVAILABLE, VERSION

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from ..model import WorkflowSnapshot

TRACER_NAME = "sayiir_persistence"
"""The name of the tracer and the meter (the instrumentation scope)."""

_F = TypeVar("_F", bound=Callable[..., Any])

# Arguments whose value becomes an attribute: the parameter name, the attribute.
_ID_ARGUMENTS = (
    ("instance_id", "sayiir.instance_id"),
    ("task_id", "sayiir.task_id"),
    ("worker_id", "sayiir.worker_id"),
)


class _HasDbSystem(Protocol):
    @property
    def _db_system(self) -> str | None: ...


def _position(parameters: list[inspect.Parameter], name: str) -> tuple[int | None, bool]:
    """Where argument ``name`` comes in a call (its index among the positional arguments
    after ``self``, ``None`` if keyword-only) and whether the method has it at all."""
    for index, parameter in enumerate(parameters):
        if parameter.name == name:
            positional = parameter.kind in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            )
            return (index if positional else None), True
    return None, False


def _argument_reader(method: Callable[..., Any], name: str) -> Callable[..., object] | None:
    """A function of ``(args, kwargs)`` returning argument ``name`` (or ``None``), worked out
    once from the signature: binding every call would cost more than the span itself."""
    parameters = list(inspect.signature(method).parameters.values())[1:]  # without self
    index, present = _position(parameters, name)
    if not present:
        return None

    def read(args: tuple[object, ...], kwargs: dict[str, object]) -> object:
        if name in kwargs:
            return kwargs[name]
        if index is not None and index < len(args):
            return args[index]
        return None

    return read


if AVAILABLE:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # A proxy until the application sets a provider: the spans then go to that one.
    _TRACER = trace.get_tracer(TRACER_NAME, VERSION)
    _PROPAGATOR = TraceContextTextMapPropagator()

    def tracer() -> trace.Tracer:
        """The tracer of this library (instrumentation scope ``sayiir_persistence``)."""
        return _TRACER

    def _call_attributes(
        operation: str,
        db_system: str | None,
        readers: list[tuple[str, Callable[..., object]]],
        snapshot_reader: Callable[..., object] | None,
        completions_reader: Callable[..., object] | None,
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> dict[str, str | int]:
        # Ids only when they are strings: a malformed argument (refused by validation inside
        # the span) may be any object, and is not shown.
        attributes: dict[str, str | int] = {"sayiir.operation": operation}
        if db_system is not None:
            attributes["db.system"] = db_system
        for attribute, read in readers:
            value = read(args, kwargs)
            if isinstance(value, str):
                attributes[attribute] = value
        if snapshot_reader is not None:
            instance_id = getattr(snapshot_reader(args, kwargs), "instance_id", None)
            if isinstance(instance_id, str):
                attributes["sayiir.instance_id"] = instance_id
        if completions_reader is not None:
            completions = completions_reader(args, kwargs)
            if isinstance(completions, Sized) and not isinstance(completions, str | bytes):
                attributes["sayiir.batch_size"] = len(completions)
                if len(completions) == 1 and isinstance(completions, list | tuple):
                    only = completions[0]
                    for name, attribute in (
                        ("instance_id", "sayiir.instance_id"),
                        ("task_id", "sayiir.task_id"),
                    ):
                        value = getattr(only, name, None)
                        if isinstance(value, str):
                            attributes[attribute] = value
        return attributes

    def traced(operation: str) -> Callable[[_F], _F]:
        """Decorate a public method of ``PersistentBackend``: each call runs in a span
        named ``operation`` (see the module documentation for its attributes)."""

        def decorate(method: _F) -> _F:
            readers = [
                (attribute, read)
                for name, attribute in _ID_ARGUMENTS
                if (read := _argument_reader(method, name)) is not None
            ]
            snapshot_reader = _argument_reader(method, "snapshot")
            completions_reader = _argument_reader(method, "completions")

            @functools.wraps(method)
            def call(self: _HasDbSystem, *args: Any, **kwargs: Any) -> Any:
                db_system = self._db_system
                span = _TRACER.start_span(
                    operation,
                    kind=SpanKind.INTERNAL if db_system is None else SpanKind.CLIENT,
                    record_exception=False,
                    set_status_on_exception=False,
                )
                recording = span.is_recording()
                if recording:
                    # One set_attributes: the SDK takes its lock once, not per attribute.
                    span.set_attributes(
                        _call_attributes(
                            operation,
                            db_system,
                            readers,
                            snapshot_reader,
                            completions_reader,
                            args,
                            kwargs,
                        )
                    )
                # Current while the call runs: the trace context of a started workflow is
                # this span's, and nested calls (a default method calling others) are its
                # children. Attached by hand: cheaper than start_as_current_span's generator.
                # Not at all when the span has no valid context (no SDK, no caller's trace):
                # there is nothing to propagate, and that is most of the no-op's cost.
                token = (
                    otel_context.attach(trace.set_span_in_context(span))
                    if recording or span.get_span_context().is_valid
                    else None
                )
                try:
                    result = method(self, *args, **kwargs)
                except BaseException as error:
                    if recording:
                        # The class name only: the message may quote user data.
                        name = type(error).__name__
                        span.set_attribute("error.type", name)
                        span.set_status(Status(StatusCode.ERROR, name))
                    raise
                else:
                    if recording and isinstance(result, list):
                        span.set_attribute("sayiir.result_count", len(result))
                    return result
                finally:
                    if token is not None:
                        otel_context.detach(token)
                    span.end()

            return call  # type: ignore[return-value]

        return decorate

    def current_traceparent() -> str | None:
        """The W3C ``traceparent`` of the current span, ``None`` unless it records
        (docs/contract.md#trace-context: no recording span, no trace context stored)."""
        if not trace.get_current_span().is_recording():
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier.get("traceparent")

    def extract_traceparent(traceparent: str | None) -> Context:
        """The context whose (remote) parent is ``traceparent``; an empty one for ``None``
        or an unreadable value, so the span started in it is a root."""
        carrier = {} if traceparent is None else {"traceparent": traceparent}
        return _PROPAGATOR.extract(carrier, context=otel_context.Context())

else:

    def traced(operation: str) -> Callable[[_F], _F]:
        """Without OpenTelemetry: the method itself, unchanged (no cost at all)."""

        def decorate(method: _F) -> _F:
            return method

        return decorate

    def current_traceparent() -> str | None:
        """Without OpenTelemetry there is no current span."""
        return None


def with_trace_context(snapshot: WorkflowSnapshot) -> WorkflowSnapshot:
    """``snapshot``, or a copy carrying the current span's ``traceparent`` when it has no
    ``trace_context`` and a recording span is current (the start call's own span, see
    :func:`traced`),
    so that the workflow's trace is rooted at the call that started it. The caller's
    snapshot is never changed."""
    if snapshot.trace_context is not None:
        return snapshot
    traceparent = current_traceparent()
    if traceparent is None:
        return snapshot
    return dataclasses.replace(snapshot, trace_context=traceparent)
