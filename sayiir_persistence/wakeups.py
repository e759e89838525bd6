"""Wake-ups for idle workers: "a task may have become runnable", instead of polling.

A store announces work when a write makes a task runnable that nobody claimed in the same
step (a new workflow, a finished step whose next task no worker took, a released claim, a
resumed workflow). An idle worker waits on a :class:`WorkWaiter` from
:meth:`~sayiir_persistence.PersistentBackend.work_waiter` and looks for tasks when it wakes.

Announcements are hints: one may be lost (a listener reconnecting, a process without a
waiter) and a claim that expires announces nothing, so workers keep polling as well, less
often; a lost hint only delays.

- Within a process (every backend): :class:`WorkSignal`, a generation counter that writers
  bump after they commit.
- Across processes: the store's own mechanism where it has one (PostgreSQL ``LISTEN/NOTIFY``,
  see ``sql/listening.py``).
"""

from __future__ import annotations

import threading
from typing import ClassVar, Protocol

__all__ = ["LocalWorkWaiter", "WorkSignal", "WorkWaiter"]


class WorkWaiter(Protocol):
    """What an idle worker waits on (one per waiting thread)."""

    def wait(self, timeout: float) -> bool:
        """Block until work was announced since the previous call (or the waiter's creation),
        or ``timeout`` seconds passed; whether work was announced."""
        ...

    def close(self) -> None:
        """Release what the waiter holds (a connection). It must not be used afterwards."""
        ...


class WorkSignal:
    """Announcements of work within one process: a generation counter. Thread-safe."""

    _shared: ClassVar[dict[str, WorkSignal]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._generation = 0

    @classmethod
    def of(cls, store: str) -> WorkSignal:
        """The one signal of a store (a database) in this process, shared by every backend
        object on it: a write through one wakes the waiters of all."""
        with cls._shared_lock:
            return cls._shared.setdefault(store, cls())

    def announce(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def generation(self) -> int:
        with self._changed:
            return self._generation

    def wait_past(self, generation: int, timeout: float) -> int:
        """Block until the generation moves past ``generation`` or ``timeout`` passes; the
        generation then."""
        with self._changed:
            self._changed.wait_for(lambda: self._generation != generation, timeout)
            return self._generation


class LocalWorkWaiter:
    """A :class:`WorkWaiter` on a process's :class:`WorkSignal`."""

    def __init__(self, signal: WorkSignal) -> None:
        self._signal = signal
        self._seen = signal.generation()

    def wait(self, timeout: float) -> bool:
        generation = self._signal.wait_past(self._seen, timeout)
        woken = generation != self._seen
        self._seen = generation
        return woken

    def close(self) -> None:
        pass
