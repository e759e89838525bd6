"""The clocks :class:`~sayiir_persistence.testing.BackendContract` drives backends with.

``ContractClock`` is what the contract needs from its ``clock`` fixture; ``ManualClock`` is a
controllable clock for backends whose time can be injected; ``RealClock`` is the system clock,
for backends that judge expiry by a clock of their own (a database server's).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["ContractClock", "ManualClock", "RealClock"]


class ContractClock(Protocol):
    """What :class:`BackendContract` needs from the ``clock`` fixture.

    ``now()`` must agree with the clock the backend judges expiry and aging by; ``advance``
    moves that clock forward (or waits). ``exact`` says whether ``now()`` is exactly the
    backend's time, so that tests may compare timestamps for equality.
    """

    exact: bool

    def now(self) -> datetime: ...

    def advance(self, delta: timedelta) -> None: ...


class ManualClock:
    """A controllable, thread-safe clock: time moves only when :meth:`advance` is called.

    Pass it to a backend with an injectable clock (it is callable, returning :meth:`now`):
    ``InMemoryBackend(clock=ManualClock())``.

    Args:
        start: the initial time (aware; converted to UTC). Defaults to the current time.
    """

    exact = True

    def __init__(self, start: datetime | None = None) -> None:
        if start is None:
            start = datetime.now(UTC)
        elif start.tzinfo is None or start.utcoffset() is None:
            raise ValueError("ManualClock start must be a timezone-aware datetime")
        self._now = start.astimezone(UTC)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ManualClock({self.now().isoformat()})"

    def __call__(self) -> datetime:
        return self.now()

    def now(self) -> datetime:
        """The current (manual) time, aware UTC."""
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward by ``delta`` (which must not be negative)."""
        if delta < timedelta(0):
            raise ValueError(f"a clock does not go back (advance by {delta})")
        with self._lock:
            self._now += delta


class RealClock:
    """The system clock: :meth:`advance` sleeps.

    For backends whose time cannot be injected, such as SQL backends judging expiry by the
    database server's clock; timestamps are then compared with a tolerance
    (``BackendContract.clock_tolerance``), never for equality.
    """

    exact = False

    def __repr__(self) -> str:
        return "RealClock()"

    def __call__(self) -> datetime:
        return self.now()

    def now(self) -> datetime:
        """``datetime.now(UTC)``."""
        return datetime.now(UTC)

    def advance(self, delta: timedelta) -> None:
        """Let ``delta`` of real time pass."""
        time.sleep(max(delta.total_seconds(), 0.0))
