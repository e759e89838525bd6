"""``Batcher``: items from many threads handed to one thread in batches (group commit).

The worker's task threads each finish a task; recording each result in its own transaction
would cost one commit per task. The batcher lets one thread record them: whatever finished
while the previous batch was being written goes into the next one. Under load, batches grow by
themselves; when idle, an item is flushed at once (no added latency), unless ``max_wait``
asks to wait for company.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Generic, TypeVar

__all__ = ["Batcher"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Batcher(Generic[T]):
    """Collects items (:meth:`put`, any thread) and calls ``flush`` with them on its own thread.

    A batch is flushed once it holds ``max_size`` items, or ``max_wait`` after its first item
    arrived, whichever comes first (``max_wait=0``: as soon as the flushing thread is free).
    ``flush`` must not raise (its exceptions are logged and the items dropped). Thread-safe.
    """

    def __init__(
        self,
        flush: Callable[[list[T]], None],
        *,
        max_size: int,
        max_wait: timedelta,
        name: str,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        if max_wait < timedelta(0):
            raise ValueError(f"max_wait must not be negative, got {max_wait}")
        self._flush = flush
        self._max_size = max_size
        self._max_wait = max_wait.total_seconds()
        self._items: list[T] = []
        self._first_at = 0.0
        self._changed = threading.Condition()
        self._closing = False
        self._flushing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: T) -> None:
        """Queue ``item`` for the next batch."""
        with self._changed:
            if not self._items:
                self._first_at = time.monotonic()
            self._items.append(item)
            self._changed.notify_all()

    def pending(self) -> int:
        """Items queued or being flushed."""
        with self._changed:
            return len(self._items) + (1 if self._flushing else 0)

    def close(self) -> None:
        """Flush what is queued, then stop the thread (waits for it)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _next_batch(self) -> list[T] | None:
        """Block until a batch is due; ``None`` once closed and empty."""
        with self._changed:
            while True:
                if self._items:
                    due = self._first_at + self._max_wait
                    remaining = due - time.monotonic()
                    if len(self._items) >= self._max_size or remaining <= 0 or self._closing:
                        batch = self._items[: self._max_size]
                        del self._items[: self._max_size]
                        self._first_at = time.monotonic()
                        self._flushing = True
                        return batch
                    self._changed.wait(remaining)
                elif self._closing:
                    return None
                else:
                    self._changed.wait()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._flush(batch)
            except Exception:
                logger.exception("flushing a batch of %d failed; items dropped", len(batch))
            finally:
                with self._changed:
                    self._flushing = False
                    self._changed.notify_all()
