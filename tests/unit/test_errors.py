"""The error hierarchy: every error is a ``PersistenceError``, and subclasses the matching
built-in where one exists (docs/contract.md, "Errors").

Moved out of ``BackendContract``: it never touches a backend.
"""

from __future__ import annotations

import pickle

from sayiir_persistence import (
    BackendUnavailableError,
    CannotCancelError,
    CannotPauseError,
    ClaimLostError,
    ConflictError,
    CorruptDataError,
    IdempotencyConflictError,
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
        CorruptDataError,
        IdempotencyConflictError,
    ):
        assert issubclass(error, PersistenceError), error
    assert issubclass(NotFoundError, LookupError)
    assert issubclass(InvalidInputError, ValueError)
    assert issubclass(WorkflowTerminalError, ConflictError)
    assert issubclass(IdempotencyConflictError, ConflictError)


def test_corrupt_data_error_names_the_row_and_survives_pickling() -> None:
    error = CorruptDataError("row", instance_id="wf", column="sayiir_workflows.tags")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.instance_id, copy.column) == ("row", "wf", "sayiir_workflows.tags")
    assert not isinstance(error, ValueError)  # not a caller's bad input


def test_idempotency_conflict_error_names_the_key_and_survives_pickling() -> None:
    error = IdempotencyConflictError("reused", instance_id="wf", key="k1")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.instance_id, copy.key) == ("reused", "wf", "k1")
