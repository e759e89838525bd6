"""Conformance suite for ``PersistentBackend`` implementations, and clocks to drive it.

Every rule of the public contract that involves a backend (docs/contract.md, the source of
truth) is a test of :class:`BackendContract`, a pytest test class without the ``Test`` prefix:
subclass it in your test suite, provide a ``backend`` fixture that yields a fresh, **empty**
backend for each test, and pytest runs the whole contract against it::

    from collections.abc import Iterator

    import pytest
    from sayiir_persistence import InMemoryBackend
    from sayiir_persistence.testing import BackendContract, ManualClock


    class TestInMemoryContract(BackendContract):
        @pytest.fixture
        def clock(self) -> ManualClock:
            return ManualClock()  # the backend judges expiry by it: tests advance it

        @pytest.fixture
        def backend(self, clock: ManualClock) -> Iterator[InMemoryBackend]:
            with InMemoryBackend(clock=clock) as backend:
                yield backend

A backend whose clock cannot be injected (an SQL database judges expiry by its server's clock)
keeps the default ``clock`` fixture, a :class:`RealClock`: the expiry tests then really sleep
(``short_ttl`` plus a margin; lower ``short_ttl`` to go faster, raise it on a slow database),
and the few tests that need exact control of time skip themselves.

``BackendContract`` is one class composed of one mixin per area of docs/contract.md (snapshots,
starts, claims, completions, available tasks, signals and events, retention, input validation,
concurrency), in
:mod:`sayiir_persistence.testing.contract`; docs/contract.md, "Conformance suite", lists them.

This package imports pytest: import it from tests only (pytest is not a runtime dependency).
"""

from __future__ import annotations

from .clocks import ContractClock, ManualClock, RealClock
from .contract import BackendContract

__all__ = ["BackendContract", "ContractClock", "ManualClock", "RealClock"]
