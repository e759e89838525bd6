"""``Lease``: until when, on this process's clock, a worker is sure it still holds a claim.

The store judges expiry by its own clock, which the worker cannot read. What the worker
knows is when it *sent* each call that granted or renewed the claim: the store started the
TTL somewhere during that call, so never before it was sent. A claim granted for ``ttl`` by
a call sent at ``t`` (``time.monotonic()``) is therefore held at least until ``t + ttl``,
whatever the call's duration; the lease ends a safety margin earlier (see
``Worker.lease_margin``), for the delay of whoever watches it and for the drift between the
two clocks over one TTL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..model import TaskClaim

__all__ = ["Lease"]


@dataclass(frozen=True)
class Lease:
    """Times in ``time.monotonic()`` seconds; ``math.inf``: never."""

    held_until: float
    """Until when the claim is surely held (the margin taken off already)."""
    deadline: float
    """The claim's deadline (``TaskClaim.deadline``, margin taken off): no renewal extends
    the lease past it."""

    @classmethod
    def of_claim(cls, claim: TaskClaim, sent_at: float, margin: float) -> Lease:
        """The lease of a claim just granted by a call sent at ``sent_at``.

        Durations are read from the claim (store clock minus store clock: exact), placed
        from the moment the call was sent (never later than the store's ``claimed_at``).
        """
        granted = (
            math.inf
            if claim.expires_at is None
            else (claim.expires_at - claim.claimed_at).total_seconds()
        )
        deadline = (
            math.inf
            if claim.deadline is None
            else sent_at + (claim.deadline - claim.claimed_at).total_seconds() - margin
        )
        return cls(sent_at + granted - margin, deadline)

    def renewed(self, sent_at: float, ttl: float, margin: float) -> Lease:
        """The lease after a renewal for ``ttl`` seconds, sent at ``sent_at``, succeeded.

        Renewals are absolute (``expires_at = now + ttl``, at most the deadline): the new
        lease replaces the old one.
        """
        return Lease(min(sent_at + ttl - margin, self.deadline), self.deadline)

    def ran_out(self, now: float) -> bool:
        """True from ``held_until`` on."""
        return now >= self.held_until

    @property
    def at_deadline(self) -> bool:
        """True when the lease ends at the claim's deadline (no renewal can extend it)."""
        return self.held_until >= self.deadline
