"""The base of the contract's mixins: the fixtures a backend's test class overrides
(``clock``, ``backend``), the attributes it may tune and the helpers the tests share.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import ClassVar

import pytest

from ...backend import PersistentBackend
from ...model import SignalKind, WorkflowSnapshot
from ..builders import LONG_TTL, assert_utc
from ..clocks import ContractClock, RealClock


class ContractBase:
    """Fixtures, tuning attributes and helpers shared by every mixin of the contract.

    Not a test class on its own: :class:`~sayiir_persistence.testing.BackendContract` composes
    the mixins. Its fixtures and attributes are documented there and in docs/contract.md,
    section "Conformance suite" (``#conformance-suite``).
    """

    short_ttl: ClassVar[timedelta] = timedelta(milliseconds=400)
    concurrency_scale: ClassVar[float] = 1.0
    clock_tolerance: ClassVar[timedelta] = timedelta(seconds=5)

    @pytest.fixture
    def clock(self) -> ContractClock:
        """The clock of the backend under test; override with a ``ManualClock`` if you can."""
        return RealClock()

    @pytest.fixture
    def backend(self, clock: ContractClock) -> Iterator[PersistentBackend]:
        """Override: yield a fresh, empty backend (built with ``clock`` if it takes one)."""
        raise NotImplementedError(
            f"{type(self).__name__} must override the `backend` fixture of BackendContract"
        )

    # -- helpers for the tests --------------------------------------------------------------

    def wait_past_short_ttl(self, clock: ContractClock) -> None:
        """Advance ``clock`` until a claim taken now with ``short_ttl`` has expired."""
        clock.advance(self.short_ttl * 1.5)

    def scaled(self, size: int) -> int:
        """``size`` multiplied by ``concurrency_scale`` (at least 2)."""
        return max(2, round(size * self.concurrency_scale))

    def assert_now(self, clock: ContractClock, value: datetime | None) -> None:
        """``value`` is aware UTC and is the store's current time."""
        assert_utc(value)
        assert value is not None
        if clock.exact:
            assert value == clock.now()
        else:
            assert abs(value - clock.now()) <= self.clock_tolerance

    @staticmethod
    def require_exact(clock: ContractClock) -> None:
        if not clock.exact:
            pytest.skip("needs a controllable clock")

    def assert_untouched(self, backend: PersistentBackend, before: WorkflowSnapshot) -> None:
        """The store still holds exactly the workflow ``existing`` as ``before``, unclaimed,
        without results, signals or events: a refused call wrote nothing."""
        assert backend.list_snapshots() == ["existing"]
        assert backend.load_snapshot("existing") == before
        assert backend.load_task_result("existing", "t1") is None
        for kind in SignalKind:
            assert backend.get_signal("existing", kind) is None
        assert backend.consume_event("existing", "e") is None
        claim = backend.claim_task("existing", "t1", "probe", LONG_TTL)
        assert claim is not None and claim.token == 1
