"""``BackendContract``: the conformance suite, one class composed of one mixin per area.

Each mixin checks one section of docs/contract.md; see its docstring.
"""

from __future__ import annotations

from .attempts import AttemptContract
from .availability import AvailabilityContract
from .claims import ClaimContract
from .completions import CompletionContract
from .concurrency import ConcurrencyContract
from .retention import RetentionContract
from .retries import RetryContract
from .signals import SignalEventContract
from .snapshots import SnapshotContract
from .starts import StartContract
from .stats import StatsContract
from .tracing import TraceContextContract
from .validation import InputValidationContract

__all__ = ["BackendContract"]


# pytest runs inherited tests base by base in reverse method resolution order: the bases are
# listed last area first, so that the suite runs snapshots first and the races last.
class BackendContract(
    ConcurrencyContract,
    InputValidationContract,
    TraceContextContract,
    StatsContract,
    RetentionContract,
    SignalEventContract,
    AvailabilityContract,
    RetryContract,
    AttemptContract,
    CompletionContract,
    ClaimContract,
    StartContract,
    SnapshotContract,
):
    """The conformance suite: subclass it and provide a ``backend`` fixture.

    Fixtures a subclass overrides:

    - ``backend`` (required): yields a fresh, **empty** backend for each test (the tests rely
      on an empty store) and closes it afterwards.
    - ``clock``: a :class:`ContractClock` telling the time the backend judges expiry and
      aging by. The default, :class:`RealClock`, suits a backend that reads its own clock
      (the database server's); a backend with an injectable clock should return a
      :class:`ManualClock` and build the backend with it, which makes the expiry tests
      instant and enables the tests that need exact timestamps.

    Class attributes a subclass may tune:

    - ``short_ttl``: the claim ttl of the expiry tests, which advance the clock by
      ``short_ttl * 1.5``. Keep it well above the latency of one backend call.
    - ``concurrency_scale``: multiplies the thread counts and sizes of the concurrency tests.
    - ``clock_tolerance``: how far a store timestamp may be from ``clock.now()`` with an
      inexact clock (a database server's clock may disagree with the test machine's).

    Example, for a backend judging time by its database server::

        class TestMyBackend(BackendContract):
            short_ttl = timedelta(seconds=1)

            @pytest.fixture
            def backend(self, clock: ContractClock) -> Iterator[MyBackend]:
                backend = MyBackend(make_empty_database())
                yield backend
                backend.close()
    """
