"""The ``Worker``'s metrics, on the meter ``sayiir_persistence`` of the global provider.

=========================  =========  ===========================================================
``sayiir.tasks.claimed``   counter    tasks claimed (by claim calls and by ``claim_next``)
``sayiir.tasks.recorded``  counter    executions whose outcome the store wrote; attribute
                                      ``sayiir.outcome``: ``recorded``, ``failed`` or
                                      ``retrying``
``sayiir.tasks.failed``    counter    executions whose task function raised (``failed`` and
                                      ``retrying``)
``sayiir.tasks.lost``      counter    executions whose claim was lost (nothing written)
``sayiir.claim.duration``  histogram  seconds per ``claim_available_tasks`` call of the worker
``sayiir.task.duration``   histogram  seconds per task function run
=========================  =========  ===========================================================

The instruments are made once per process (:func:`worker_metrics`), on the API's proxy
meter until the application sets a provider; the attributes are low-cardinality (never ids
or payloads). Another instrument is one more field of :class:`_Instruments` and a method of
:class:`WorkerMetrics`.

Without OpenTelemetry, :func:`worker_metrics` returns a :class:`WorkerMetrics` whose methods
do nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._otel import AVAILABLE, VERSION
from .tracing import TRACER_NAME

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram

# Outcomes (TaskOutcome values) that the store wrote, and those of them where the task
# function failed.
_RECORDED = frozenset({"recorded", "failed", "retrying"})
_FAILED = frozenset({"failed", "retrying"})
_LOST = "lost"


@dataclass(frozen=True)
class _Instruments:
    claimed: Counter
    recorded: Counter
    failed: Counter
    lost: Counter
    claim_duration: Histogram
    task_duration: Histogram


def _instruments() -> _Instruments:
    from opentelemetry import metrics

    meter = metrics.get_meter(TRACER_NAME, VERSION)
    return _Instruments(
        claimed=meter.create_counter(
            "sayiir.tasks.claimed", unit="{task}", description="Tasks claimed by workers"
        ),
        recorded=meter.create_counter(
            "sayiir.tasks.recorded",
            unit="{task}",
            description="Task executions whose outcome the store recorded",
        ),
        failed=meter.create_counter(
            "sayiir.tasks.failed",
            unit="{task}",
            description="Task executions whose task function raised",
        ),
        lost=meter.create_counter(
            "sayiir.tasks.lost",
            unit="{task}",
            description="Task executions whose claim was lost before their outcome was saved",
        ),
        claim_duration=meter.create_histogram(
            "sayiir.claim.duration", unit="s", description="Duration of a worker's claim call"
        ),
        task_duration=meter.create_histogram(
            "sayiir.task.duration", unit="s", description="Run time of a task function"
        ),
    )


class WorkerMetrics:
    """What a ``Worker`` reports; every method does nothing without OpenTelemetry."""

    def __init__(self, instruments: _Instruments | None) -> None:
        self._instruments = instruments

    def claimed(self, count: int) -> None:
        """``count`` tasks were claimed."""
        if self._instruments is not None and count:
            self._instruments.claimed.add(count)

    def claim_took(self, seconds: float) -> None:
        """A claim call took ``seconds`` (whether it claimed anything or not)."""
        if self._instruments is not None:
            self._instruments.claim_duration.record(seconds)

    def task_took(self, seconds: float) -> None:
        """A task function ran for ``seconds``."""
        if self._instruments is not None:
            self._instruments.task_duration.record(seconds)

    def ended(self, outcome: str) -> None:
        """An execution ended with ``outcome`` (a ``TaskOutcome`` value)."""
        instruments = self._instruments
        if instruments is None:
            return
        if outcome in _RECORDED:
            instruments.recorded.add(1, {"sayiir.outcome": outcome})
        if outcome in _FAILED:
            instruments.failed.add(1)
        elif outcome == _LOST:
            instruments.lost.add(1)


@functools.cache
def worker_metrics() -> WorkerMetrics:
    """The process's instruments (made at the first call: an SDK gets duplicate-instrument
    warnings if they are made again)."""
    return WorkerMetrics(_instruments() if AVAILABLE else None)
