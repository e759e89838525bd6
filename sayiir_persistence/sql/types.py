"""Column types that behave the same on PostgreSQL, MySQL/MariaDB and SQLite.

Each type hides one dialect difference so that table definitions and queries stay
dialect-free:

- ``Identifier``: ids compare byte-for-byte and sort in code point order everywhere.
  MySQL's text collations are case-insensitive or pad trailing spaces, so ids are stored
  there as UTF-8 ``VARBINARY``; PostgreSQL uses the ``C`` collation.
- ``UtcDateTime``: aware UTC in, aware UTC out (MySQL and SQLite store naive UTC).
- ``Payload`` / ``LongText``: MySQL's ``BLOB``/``TEXT`` stop at 64 KiB; use the LONG forms.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, LargeBinary, String, Text
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from ..validation import MAX_ID_LENGTH

MYSQL_DIALECTS = frozenset({"mysql", "mariadb"})
# UTF-8 takes at most 4 bytes per code point.
_MAX_ID_BYTES = 4 * MAX_ID_LENGTH


class Identifier(TypeDecorator[str]):
    """An id or name of up to ``MAX_ID_LENGTH`` characters."""

    impl = String(MAX_ID_LENGTH)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.VARCHAR(MAX_ID_LENGTH, collation="C"))
        if dialect.name in MYSQL_DIALECTS:
            return dialect.type_descriptor(mysql.VARBINARY(_MAX_ID_BYTES))
        return dialect.type_descriptor(String(MAX_ID_LENGTH))

    def process_bind_param(self, value: str | None, dialect: Dialect) -> Any:
        if value is not None and dialect.name in MYSQL_DIALECTS:
            return value.encode("utf-8")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value).decode("utf-8")
        return value  # type: ignore[no-any-return]


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp with microseconds, always aware UTC in Python."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in MYSQL_DIALECTS:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        utc = value.astimezone(UTC)
        return utc if dialect.name == "postgresql" else utc.replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def Payload() -> TypeEngine[bytes]:
    """Binary payload column holding multi-megabyte values on every database."""
    return LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


def LongText() -> TypeEngine[str]:
    """Unbounded text column (MySQL ``LONGTEXT``)."""
    return Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
