"""``RetryPolicy``: how many times a task runs, and how long it waits between attempts.

The policy is the worker's; what it decides is kept by the store
(docs/contract.md#attempts-and-deadlines): the worker claims with ``max_attempts`` (so a
task that kills every worker running it stops after that many executions, without anyone
left to count) and records a failed attempt with ``retry_after`` (so the wait survives the
worker).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from .errors import InvalidInputError
from .validation import MAX_TTL

__all__ = ["RetryPolicy"]

# A retry is never due at once (retry_after must be positive).
_SHORTEST_DELAY = timedelta(milliseconds=1)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff and jitter, up to a cap.

    Args:
        max_attempts: most executions of one task, the first included (1: never retried).
            Every claim counts, also one whose worker died or hung past its deadline.
        initial_delay: the wait before the second attempt.
        backoff: each wait is this many times the one before (1: a constant delay).
        max_delay: no wait is longer (the cap).
        jitter: each wait is shortened by a random fraction up to this (0 to 1), so that
            tasks that failed together do not all come back at the same moment.
        give_up_on: errors that are not retried (raised by the task function: its workflow
            fails at once), e.g. ``(ValueError, PermissionError)``.

    Raises:
        InvalidInputError: a value out of range (names it).
    """

    max_attempts: int = 3
    initial_delay: timedelta = timedelta(seconds=1)
    backoff: float = 2.0
    max_delay: timedelta = timedelta(minutes=5)
    jitter: float = 0.1
    give_up_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise InvalidInputError("RetryPolicy.max_attempts must be an int")
        if self.max_attempts < 1:
            raise InvalidInputError(
                f"RetryPolicy.max_attempts must be at least 1, got {self.max_attempts}"
            )
        for name in ("initial_delay", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or not timedelta(0) < value <= MAX_TTL:
                raise InvalidInputError(
                    f"RetryPolicy.{name} must be a positive timedelta of at most "
                    f"{MAX_TTL.days} days, got {value!r}"
                )
        if not isinstance(self.backoff, int | float) or self.backoff < 1:
            raise InvalidInputError(f"RetryPolicy.backoff must be at least 1, got {self.backoff}")
        if not isinstance(self.jitter, int | float) or not 0 <= self.jitter <= 1:
            raise InvalidInputError(
                f"RetryPolicy.jitter must be between 0 and 1, got {self.jitter}"
            )
        if not isinstance(self.give_up_on, tuple) or not all(
            isinstance(kind, type) and issubclass(kind, BaseException) for kind in self.give_up_on
        ):
            raise InvalidInputError("RetryPolicy.give_up_on must be a tuple of exception types")

    def retries(self, error: BaseException, attempt: int) -> bool:
        """Whether attempt number ``attempt``, which raised ``error``, gets another one."""
        return attempt < self.max_attempts and not isinstance(error, self.give_up_on)

    def delay_after(self, attempt: int) -> timedelta:
        """The wait after failed attempt number ``attempt`` (1 for the first)."""
        # Capped before multiplying further, so a large attempt never overflows.
        delay = self.initial_delay
        for _ in range(attempt - 1):
            if delay >= self.max_delay:
                break
            delay = delay * self.backoff
        delay = min(delay, self.max_delay)
        jittered = delay * (1 - random.uniform(0, self.jitter))
        return max(jittered, _SHORTEST_DELAY)
