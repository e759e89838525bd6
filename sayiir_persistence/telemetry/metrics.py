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
``sayiir.queue.depth``     gauge      runnable tasks in the store, by ``sayiir.priority`` (1-5,
                                      0 when none), read with ``store_stats()`` when the
                                      metrics are collected (not at every claim)
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
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import PersistenceError
from ..validation import MAX_PRIORITY, MIN_PRIORITY
from ._otel import AVAILABLE, VERSION
from .tracing import TRACER_NAME

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Observation

    from ..backend import PersistentBackend

logger = logging.getLogger(__name__)

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


class _WatchedStores:
    """The stores of this process's running workers, whose queue the gauge reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[int, tuple[PersistentBackend, int]] = {}  # id -> (store, workers)

    def add(self, backend: PersistentBackend) -> None:
        with self._lock:
            _, workers = self._workers.get(id(backend), (backend, 0))
            self._workers[id(backend)] = (backend, workers + 1)

    def remove(self, backend: PersistentBackend) -> None:
        with self._lock:
            found = self._workers.get(id(backend))
            if found is None:
                return
            if found[1] <= 1:
                del self._workers[id(backend)]
            else:
                self._workers[id(backend)] = (backend, found[1] - 1)

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        """The runnable tasks of each watched store by priority (every priority, 0 when
        none: a priority that emptied must not keep its last value)."""
        from opentelemetry.metrics import Observation

        with self._lock:
            stores = [backend for backend, _ in self._workers.values()]
        observations: list[Observation] = []
        for backend in stores:
            try:
                stats = backend.store_stats()
            except PersistenceError as error:
                # The worker meets the same failure and logs it; a gauge skips one reading.
                logger.debug("queue depth not read: %s", type(error).__name__)
                continue
            counts = {backlog.priority: backlog.count for backlog in stats.runnable}
            observations.extend(
                Observation(counts.get(priority, 0), {"sayiir.priority": priority})
                for priority in range(MIN_PRIORITY, MAX_PRIORITY + 1)
            )
        return observations


_WATCHED = _WatchedStores()


def _instruments() -> _Instruments:
    from opentelemetry import metrics

    meter = metrics.get_meter(TRACER_NAME, VERSION)
    meter.create_observable_gauge(
        "sayiir.queue.depth",
        callbacks=[_WATCHED.observe],
        unit="{task}",
        description="Runnable tasks in the store, by priority",
    )
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

    def watch_queue(self, backend: PersistentBackend) -> None:
        """Report the queue depth of ``backend`` while a worker runs on it."""
        if self._instruments is not None:
            _WATCHED.add(backend)

    def unwatch_queue(self, backend: PersistentBackend) -> None:
        """A worker on ``backend`` stopped."""
        if self._instruments is not None:
            _WATCHED.remove(backend)

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
