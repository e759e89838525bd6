"""The pause between attempts of a transaction that lost a conflict (deadlock, certification)."""

from __future__ import annotations

import random
import time

from sayiir_persistence.sql.backend import CONFLICT_PAUSE_BASE, CONFLICT_PAUSE_CAP, SqlBackend


def _pauses(attempt: int, deadline: float | None = None, draws: int = 400) -> list[float]:
    return [SqlBackend._conflict_pause(attempt, deadline) for _ in range(draws)]


def test_the_window_doubles_with_each_attempt_up_to_the_cap() -> None:
    random.seed(7)
    for attempt in range(1, 12):
        window = min(CONFLICT_PAUSE_CAP, CONFLICT_PAUSE_BASE * 2 ** (attempt - 1))
        pauses = _pauses(attempt)
        assert all(0 <= pause <= window for pause in pauses)
        # Drawn across the whole window (full jitter), not bunched at one end.
        assert max(pauses) > 0.8 * window and min(pauses) < 0.2 * window
    assert max(_pauses(30)) <= CONFLICT_PAUSE_CAP


def test_a_pause_never_runs_past_the_calls_deadline() -> None:
    assert max(_pauses(10, deadline=time.monotonic() + 0.05)) <= 0.05
    assert _pauses(10, deadline=time.monotonic() - 1) == [0.0] * 400
