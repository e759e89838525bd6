"""sayiir-persistence: durable snapshots and exactly-once task claims for workflows.

Everything public is importable from here; see ``PersistentBackend`` for the contract.
"""

from .backend import DEFAULT_AGING_INTERVAL, PersistentBackend
from .errors import (
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
from .memory import InMemoryBackend
from .model import (
    Advance,
    AtDelay,
    AtFork,
    AtSignal,
    AtTask,
    AvailableTask,
    ClaimedTask,
    CompletionOutcome,
    CompletionResult,
    IfExists,
    NotStarted,
    Position,
    SignalKind,
    SignalRequest,
    TaskClaim,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
)
from .provisioning import migrate
from .retention import MAX_PRUNE_BATCH
from .retries import RetryPolicy
from .sql.backend import SqlBackend
from .stats import PriorityBacklog, StoreStats, WorkerClaims
from .validation import DEFAULT_MAX_PAYLOAD_BYTES, MAX_ID_LENGTH

__all__ = [
    "DEFAULT_AGING_INTERVAL",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MAX_ID_LENGTH",
    "MAX_PRUNE_BATCH",
    "Advance",
    "AtDelay",
    "AtFork",
    "AtSignal",
    "AtTask",
    "AvailableTask",
    "BackendUnavailableError",
    "CannotCancelError",
    "CannotPauseError",
    "ClaimLostError",
    "ClaimedTask",
    "CompletionOutcome",
    "CompletionResult",
    "ConflictError",
    "CorruptDataError",
    "IdempotencyConflictError",
    "IfExists",
    "InMemoryBackend",
    "InvalidInputError",
    "InvalidStateError",
    "NotFoundError",
    "NotStarted",
    "PersistenceError",
    "PersistentBackend",
    "Position",
    "PriorityBacklog",
    "RetryPolicy",
    "SchemaError",
    "SignalKind",
    "SignalRequest",
    "SqlBackend",
    "StoreStats",
    "TaskClaim",
    "TaskCompletion",
    "WorkerClaims",
    "WorkflowSnapshot",
    "WorkflowStatus",
    "WorkflowTerminalError",
    "migrate",
]
