"""The error hierarchy: every error is a ``PersistenceError``, and subclasses the matching
built-in where one exists (docs/contract.md, "Errors").

Moved out of ``BackendContract``: it never touches a backend.
"""

from __future__ import annotations

from sayiir_persistence import (
    BackendUnavailableError,
    CannotCancelError,
    CannotPauseError,
    ClaimLostError,
    ConflictError,
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    PersistenceError,
    SchemaError,
    WorkflowTerminalError,
)


def test_error_hierarchy() -> None:
    for error in (
        NotFoundError,
        ClaimLostError,
        ConflictError,
        WorkflowTerminalError,
        InvalidStateError,
        CannotCancelError,
        CannotPauseError,
        InvalidInputError,
        SchemaError,
        BackendUnavailableError,
    ):
        assert issubclass(error, PersistenceError), error
    assert issubclass(NotFoundError, LookupError)
    assert issubclass(InvalidInputError, ValueError)
    assert issubclass(WorkflowTerminalError, ConflictError)
