"""The conformance suite (``sayiir_persistence.testing.BackendContract``) on ``InMemoryBackend``.

The in-memory backend takes an injectable clock, so the suite runs with a ``ManualClock``:
expiry tests advance it instead of sleeping, and the exact-time tests run too.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from sayiir_persistence import InMemoryBackend
from sayiir_persistence.testing import BackendContract, ManualClock, RealClock


class TestInMemoryContract(BackendContract):
    @pytest.fixture
    def clock(self) -> ManualClock:
        return ManualClock()

    @pytest.fixture
    def backend(self, clock: ManualClock) -> Iterator[InMemoryBackend]:
        with InMemoryBackend(clock=clock) as backend:
            yield backend


# -- the clocks the suite drives backends with ---------------------------------------------------


def test_manual_clock_moves_only_when_advanced() -> None:
    start = datetime(2030, 1, 1, 14, tzinfo=timezone(timedelta(hours=2)))
    clock = ManualClock(start)
    assert clock.exact is True
    assert clock.now() == clock() == start
    assert clock.now().utcoffset() == timedelta(0)
    clock.advance(timedelta(microseconds=1))
    assert clock.now() == datetime(2030, 1, 1, 12, 0, 0, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="back"):
        clock.advance(timedelta(seconds=-1))
    with pytest.raises(ValueError, match="aware"):
        ManualClock(datetime(2030, 1, 1))


def test_real_clock_is_inexact_utc_and_advance_sleeps() -> None:
    clock = RealClock()
    assert clock.exact is False
    before = clock.now()
    assert before.utcoffset() == timedelta(0)
    clock.advance(timedelta(milliseconds=20))
    assert clock() - before >= timedelta(milliseconds=20)
