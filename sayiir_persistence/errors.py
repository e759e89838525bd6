"""Exceptions raised by every backend.

All of them derive from :class:`PersistenceError`, so ``except PersistenceError`` catches
anything the library raises on purpose. Driver and SQLAlchemy exceptions never escape raw:
the SQL backend translates them at one boundary and keeps the original as ``__cause__``.
"""

from __future__ import annotations


class PersistenceError(Exception):
    """Base class of every error raised by sayiir-persistence."""


class NotFoundError(PersistenceError, LookupError):
    """The workflow instance (or the claim) does not exist."""


class ClaimLostError(PersistenceError):
    """The task claim is held by another worker, or by a newer claim (fencing token)."""


class ConflictError(PersistenceError):
    """The stored version did not match the expected version; nothing was written."""


class WorkflowTerminalError(ConflictError):
    """The stored workflow is completed, failed or cancelled and may not change."""


class IdempotencyConflictError(ConflictError):
    """A key was used again with other arguments: ``send_event(..., idempotency_key=k)``
    repeated with another event name or payload, or ``consume_event(..., consumer_key=k)``
    with another event name. Nothing was written or taken; the first call's outcome stands.

    The attributes ``instance_id`` and ``key`` name the key. A subclass of
    :class:`ConflictError`. Contract: docs/contract.md#send_event, #consume_event.
    """

    def __init__(self, message: str, *, instance_id: str = "", key: str = "") -> None:
        super().__init__(message)
        self.instance_id = instance_id
        self.key = key


class InvalidStateError(PersistenceError):
    """A snapshot mutator was called on a workflow that is not in progress, or
    ``retry_workflow`` on one that is not failed."""


class CannotCancelError(PersistenceError):
    """A cancel was requested for a completed or failed workflow."""


class CannotPauseError(PersistenceError):
    """A pause was requested for a workflow that cannot be paused (or unpaused)."""


class InvalidInputError(PersistenceError, ValueError):
    """An argument was rejected before any lookup or write; the message names it."""


class SchemaError(PersistenceError):
    """The database is not provisioned or not at the head revision of the migrations."""


class BackendUnavailableError(PersistenceError):
    """The database could not be reached or the connection was lost. Retryable.

    The driver's exception is kept as ``__cause__``.
    """


class CorruptDataError(PersistenceError):
    """A stored row cannot be decoded: it was changed behind the store's back.

    The message names the instance and the column (``sayiir_workflows.position``), as do the
    attributes ``instance_id`` and ``column``; the decoding error is ``__cause__``. The call
    that raised it wrote nothing. Repair the row, or remove the instance: ``delete_snapshot``
    and ``start_workflow(..., if_exists=IfExists.TERMINATE_EXISTING)`` do not decode it.
    Contract: docs/contract.md#errors.
    """

    def __init__(
        self, message: str, *, instance_id: str | None = None, column: str | None = None
    ) -> None:
        super().__init__(message)
        self.instance_id = instance_id
        self.column = column
