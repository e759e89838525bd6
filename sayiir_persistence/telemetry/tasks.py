"""The span of one task execution in the ``Worker``: ``task <task_id>``.

Its parent is the workflow's stored trace context (``AvailableTask.trace_context``, the span
of the call that started the workflow), so every task of a workflow is in the workflow's
trace, whichever process runs it. It starts when the claimed task is handed to a thread and
ends when the execution's outcome is known: after the completion thread recorded it (or the
claim was lost or released), so ``sayiir.outcome`` is on the span itself. The task function
runs with the span current (:meth:`TaskSpan.run_in`): the backend calls it makes are its
children.

Attributes: ``sayiir.instance_id``, ``sayiir.task_id``, ``sayiir.worker_id``,
``sayiir.attempt``, ``sayiir.claim_token``, and ``sayiir.outcome`` (a ``TaskOutcome``
value). An outcome other than ``recorded``, ``retrying`` or ``released`` sets the status to
``ERROR`` described by the outcome (``failed``, ``lost``, ``unhandled``); the task function's
exception is not recorded (its message may carry user data).

Without OpenTelemetry, :func:`start_task_span` returns ``None`` and the worker skips the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from ._otel import AVAILABLE

if TYPE_CHECKING:
    from ..model import ClaimedTask

if AVAILABLE:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    from .tracing import extract_traceparent, tracer

_T = TypeVar("_T")

# Outcomes that are not a failure of the execution.
_OK_OUTCOMES = frozenset({"recorded", "retrying", "released"})


class TaskSpan:
    """One execution's span (only built when OpenTelemetry is installed)."""

    def __init__(self, claimed: ClaimedTask, worker_id: str) -> None:
        task = claimed.task
        self._span = tracer().start_span(
            f"task {task.task_id}",
            context=extract_traceparent(task.trace_context),
            kind=SpanKind.CONSUMER,
            record_exception=False,
            set_status_on_exception=False,
        )
        if self._span.is_recording():
            claim = claimed.claim
            self._span.set_attributes(
                {
                    "sayiir.instance_id": task.instance_id,
                    "sayiir.task_id": task.task_id,
                    "sayiir.worker_id": worker_id,
                    "sayiir.attempt": claim.attempt,
                    "sayiir.claim_token": claim.token,
                }
            )

    def run_in(self, function: Callable[[], _T]) -> _T:
        """Call ``function`` with this span current in this thread."""
        token = otel_context.attach(trace.set_span_in_context(self._span))
        try:
            return function()
        finally:
            otel_context.detach(token)

    def end(self, outcome: str) -> None:
        """Record the outcome (a ``TaskOutcome`` value) and end the span."""
        if self._span.is_recording():
            self._span.set_attribute("sayiir.outcome", outcome)
            if outcome not in _OK_OUTCOMES:
                self._span.set_status(Status(StatusCode.ERROR, outcome))
        self._span.end()


def start_task_span(claimed: ClaimedTask, worker_id: str) -> TaskSpan | None:
    """The span of an execution of ``claimed`` starting now; ``None`` without OpenTelemetry."""
    if not AVAILABLE:
        return None
    return TaskSpan(claimed, worker_id)
