"""The one boundary where SQLAlchemy and driver exceptions become the contract's errors.

Used by ``SqlBackend``, provisioning, inspection and (through them) the command line. Which
driver error means what is each dialect's knowledge (``SqlDialect.classify``); what the
caller sees is decided here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING

from sqlalchemy import exc as sa_exc

from ..errors import (
    BackendUnavailableError,
    InvalidInputError,
    PersistenceError,
    SchemaError,
)

if TYPE_CHECKING:
    from .dialects import SqlDialect

logger = logging.getLogger(__name__)


class ErrorKind(Enum):
    """What a driver error means, as a dialect classifies it."""

    RETRYABLE = "retryable"
    """A deadlock or serialization failure: the whole transaction may run again."""
    NOT_PROVISIONED = "not provisioned"
    """A table or column is missing: the database was not migrated."""
    TOO_LARGE = "too large"
    """The server refused a statement for its size (MySQL's ``max_allowed_packet``)."""
    BUSY = "busy"
    """The database stayed locked by another connection (SQLite's busy timeout)."""
    UNAVAILABLE = "unavailable"
    """The server is down, refusing connections or gone."""


class RetryableConflict(Exception):
    """A deadlock or serialization failure: the whole transaction may be run again.

    Internal to ``SqlBackend``, which retries; callers that do not retry see
    ``BackendUnavailableError`` instead (see :func:`translated_errors`).
    """


def _message(error: BaseException) -> str:
    text = " ".join(str(error).split("\n(Background on this error", 1)[0].split())
    return text or type(error).__name__


def _is_lost_connection(error: sa_exc.SQLAlchemyError) -> bool:
    return (isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated) or isinstance(
        error, sa_exc.DisconnectionError | sa_exc.TimeoutError
    )


def translate(
    error: sa_exc.SQLAlchemyError,
    where: str,
    dialect: type[SqlDialect],
    *,
    retries: bool = False,
    action: str | None = None,
) -> Exception:
    """The contract error for a SQLAlchemy error (the caller raises it ``from`` the original).

    Args:
        where: the database, password masked.
        retries: the caller runs the transaction again on :class:`RetryableConflict`;
            otherwise a deadlock is a ``BackendUnavailableError`` (retryable by the caller).
        action: what a provisioning caller was doing ("migrate"): an error that is not about
            the connection is then a ``SchemaError`` saying it could not.
    """
    original = getattr(error, "orig", None) or error
    reason = _message(original)
    kind = dialect.classify(original)
    if kind is ErrorKind.RETRYABLE:
        if retries:
            return RetryableConflict(reason)
        return BackendUnavailableError(f"the database at {where} reported a conflict: {reason}")
    if kind is ErrorKind.BUSY:
        return BackendUnavailableError(f"the SQLite database at {where} stayed locked: {reason}")
    if action is not None:
        # A connection that could not be opened raises at pool checkout, with no statement.
        if _is_lost_connection(error) or (
            isinstance(error, sa_exc.DBAPIError) and error.statement is None
        ):
            return BackendUnavailableError(f"cannot connect to {where}: {reason}")
        return SchemaError(f"cannot {action} {where}: {reason}")
    if kind is ErrorKind.NOT_PROVISIONED:
        return SchemaError(
            f"the database at {where} is not provisioned for sayiir-persistence "
            f"({reason}); run `sayiir-persistence migrate --url URL` "
            "or `alembic upgrade head`"
        )
    if kind is ErrorKind.TOO_LARGE:
        return InvalidInputError(
            f"a payload is larger than the server accepts ({reason}); "
            "raise MySQL's max_allowed_packet or lower max_payload_bytes"
        )
    if _is_lost_connection(error):
        return BackendUnavailableError(f"lost the connection to {where}: {reason}")
    if kind is ErrorKind.UNAVAILABLE or isinstance(
        error, sa_exc.OperationalError | sa_exc.InterfaceError
    ):
        return BackendUnavailableError(f"database at {where} is unavailable: {reason}")
    return PersistenceError(f"database error at {where}: {reason}")


@contextmanager
def translated_errors(
    where: str,
    dialect: type[SqlDialect],
    *,
    retries: bool = False,
    action: str | None = None,
) -> Iterator[None]:
    """Re-raise SQLAlchemy errors as contract errors; see :func:`translate`."""
    try:
        yield
    except sa_exc.SQLAlchemyError as error:
        translated = translate(error, where, dialect, retries=retries, action=action)
        if not isinstance(translated, RetryableConflict):
            logger.debug("database error at %s: %r", where, translated)
        raise translated from error
