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
