"""Everything that differs between PostgreSQL, MySQL/MariaDB and SQLite, in one place.

Each database has a strategy class (``postgresql.py``, ``mysql.py``, ``sqlite.py``) that
declares the SQLAlchemy dialect names it serves; :func:`dialect_class` finds it by name, so
no caller tests a dialect name itself. ``base.py`` says what a strategy knows.
"""

from __future__ import annotations

from datetime import timedelta

from .base import (
    READ_ONLY_OPTION,
    ClaimRow,
    ClaimTerms,
    Granted,
    Locked,
    SqlDialect,
    TaskKey,
    TokenFloors,
    claim_key,
    dialect_class,
)
from .mysql import MySqlDialect
from .postgresql import PostgresDialect
from .sqlite import SqliteDialect

__all__ = [
    "READ_ONLY_OPTION",
    "ClaimRow",
    "ClaimTerms",
    "Granted",
    "Locked",
    "MySqlDialect",
    "PostgresDialect",
    "SqlDialect",
    "SqliteDialect",
    "TaskKey",
    "TokenFloors",
    "claim_key",
    "dialect_class",
    "dialect_for",
]


def dialect_for(name: str, *, sqlite_busy_timeout: timedelta) -> SqlDialect:
    """The strategy for a SQLAlchemy dialect name, configured for one backend.

    Raises:
        ValueError: no strategy serves ``name``.
    """
    return dialect_class(name).configured(sqlite_busy_timeout=sqlite_busy_timeout)
