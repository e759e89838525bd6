"""The one boundary where SQLAlchemy and driver exceptions become the contract's errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc

from ..errors import (
    BackendUnavailableError,
    InvalidInputError,
    PersistenceError,
    SchemaError,
)

logger = logging.getLogger(__name__)

# PostgreSQL SQLSTATEs.
_PG_RETRYABLE = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_PG_UNDEFINED = frozenset({"42P01", "42703"})  # undefined table, undefined column
# MySQL/MariaDB error numbers.
_MY_RETRYABLE = frozenset({1213, 1205})  # deadlock, lock wait timeout
_MY_UNDEFINED = frozenset({1146, 1054})  # no such table, unknown column
_MY_TOO_BIG = frozenset({1153, 1301})  # packet larger than max_allowed_packet
_MY_UNAVAILABLE = frozenset({2002, 2003, 2006, 2013, 2055, 1040, 1053})


class RetryableConflict(Exception):
    """A deadlock or serialization failure: the whole transaction may be run again."""


def _pg_code(error: BaseException) -> str | None:
    return getattr(error, "pgcode", None)


def _mysql_code(error: BaseException) -> int | None:
    args = getattr(error, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _message(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def translate(error: sa_exc.SQLAlchemyError, where: str) -> Exception:
    """The contract error for a SQLAlchemy error (the caller raises it ``from`` the original)."""
    original = getattr(error, "orig", None) or error
    pg, my = _pg_code(original), _mysql_code(original)
    text = _message(original).lower()
    if pg in _PG_RETRYABLE or my in _MY_RETRYABLE:
        return RetryableConflict(_message(original))
    if (
        pg in _PG_UNDEFINED
        or my in _MY_UNDEFINED
        or "no such table" in text
        or "no such column" in text
    ):
        return SchemaError(
            f"the database at {where} is not provisioned for sayiir-persistence "
            f"({_message(original)}); run `sayiir-persistence migrate --url URL` "
            "or `alembic upgrade head`"
        )
    if my in _MY_TOO_BIG:
        return InvalidInputError(
            f"a payload is larger than the server accepts ({_message(original)}); "
            "raise MySQL's max_allowed_packet or lower max_payload_bytes"
        )
    if "database is locked" in text or "database is busy" in text:
        return BackendUnavailableError(f"the SQLite database at {where} stayed locked: {text}")
    if (isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated) or isinstance(
        error, sa_exc.DisconnectionError | sa_exc.TimeoutError
    ):
        return BackendUnavailableError(f"lost the connection to {where}: {_message(original)}")
    if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError) or my in _MY_UNAVAILABLE:
        return BackendUnavailableError(f"database at {where} is unavailable: {_message(original)}")
    return PersistenceError(f"database error at {where}: {_message(original)}")


@contextmanager
def translated_errors(where: str) -> Iterator[None]:
    """Re-raise SQLAlchemy errors as contract errors; ``where`` is the masked URL."""
    try:
        yield
    except sa_exc.SQLAlchemyError as error:
        translated = translate(error, where)
        if not isinstance(translated, RetryableConflict):
            logger.debug("database error at %s: %r", where, translated)
        raise translated from error
