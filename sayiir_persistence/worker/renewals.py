"""``Renewals``: runs claim renewals on daemon threads, so that one that hangs holds back only
its own claim.

While the store answers, one thread makes every renewal, one after the other (a worker may
hold hundreds of claims: one thread and no per-claim cost). A call that has not returned after
``stuck_after`` is *stuck*: when every thread is inside a stuck call and renewals are waiting,
:meth:`Renewals.check` starts one more thread. A thread that finds nothing to do while another
thread is idle ends, so the pool shrinks back to one once the stuck calls return. At most one
renewal per claim is queued or running at a time, so the threads never outnumber the claims.

The threads are daemons and nobody joins them: a renewal stuck in a silent network can delay
neither :meth:`Worker.stop` nor the exit of the process.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

__all__ = ["Renewals"]

logger = logging.getLogger(__name__)

Job = Callable[[], None]


class Renewals:
    """A pool of daemon threads running keyed jobs, one job per key at a time.

    Args:
        stuck_after: seconds after which a running job counts as stuck (see the module).
        name: prefix of the threads' names.
    """

    def __init__(self, *, stuck_after: float, name: str) -> None:
        self._stuck_after = stuck_after
        self._name = name
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: deque[tuple[Hashable, Job]] = deque()
        # Keys whose job is queued or running: a claim is never renewed twice at once.
        self._pending: set[Hashable] = set()
        # When each thread inside a job started it, by thread number.
        self._running: dict[int, float] = {}
        self._idle = 0
        self._numbers = itertools.count(1)
        self._closed = False

    def submit(self, key: Hashable, job: Job) -> bool:
        """Queue ``job`` unless a job of ``key`` is queued or running; ``True`` if queued."""
        with self._lock:
            if self._closed or key in self._pending:
                return False
            self._pending.add(key)
            self._queue.append((key, job))
            if self._idle:
                self._work.notify()
            elif self._next_check(time.monotonic()) is None:
                self._start_thread()  # no thread yet, or every one is stuck
        return True

    def check(self, now: float) -> float | None:
        """Start a thread if every thread is stuck while jobs wait; returns when to check
        again (the moment the oldest call not yet stuck becomes so), ``None``: no need."""
        with self._lock:
            if not self._queue or self._idle:
                return None
            again = self._next_check(now)
            if again is None:
                self._start_thread()
            return again

    def _next_check(self, now: float) -> float | None:
        """When the oldest running job not yet stuck becomes stuck; ``None`` if every
        running job is stuck (or none runs). Call with the lock held."""
        fresh = [since for since in self._running.values() if now - since < self._stuck_after]
        return min(fresh) + self._stuck_after if fresh else None

    def close(self) -> None:
        """Drop the queued jobs and let the threads end (running jobs finish first)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._pending.clear()
            self._work.notify_all()

    @property
    def thread_count(self) -> int:
        """Threads alive: idle or inside a job."""
        with self._lock:
            return self._idle + len(self._running)

    def _start_thread(self) -> None:
        """Start a thread, counted idle until it takes a job (call with the lock held)."""
        if self._running:
            logger.warning(
                "%s: %d renewal(s) stuck for over %.1fs, %d waiting: starting another thread",
                self._name,
                len(self._running),
                self._stuck_after,
                len(self._queue),
            )
        number = next(self._numbers)
        self._idle += 1
        threading.Thread(
            target=self._serve, args=(number,), name=f"{self._name}-{number}", daemon=True
        ).start()

    def _serve(self, number: int) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    if self._closed or self._idle > 1:
                        self._idle -= 1  # another thread is idle: this one is not needed
                        return
                    self._work.wait()
                key, job = self._queue.popleft()
                self._idle -= 1
                self._running[number] = time.monotonic()
            try:
                job()
            except Exception:
                # A bug: the thread must survive it, or renewals would stop.
                logger.exception("%s: a renewal failed unexpectedly", self._name)
            finally:
                with self._lock:
                    del self._running[number]
                    self._pending.discard(key)
                    self._idle += 1
