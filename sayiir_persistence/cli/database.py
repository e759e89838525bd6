"""The database an operator command works on: its URL checked, then the backend opened.

The one place in the command line that imports the masking of passwords in URLs and messages
(``mask_url``, ``redact_passwords``); the rest of ``cli`` takes them from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ..errors import InvalidInputError, SchemaError
from ..inspection import StoreInspector
from ..provisioning import mask_url, redact_passwords
from ..sql.backend import SqlBackend
from .program import PROG

__all__ = ["mask_url", "open_store", "redact_passwords"]


@contextmanager
def open_store(url: str) -> Iterator[tuple[SqlBackend, StoreInspector]]:
    """The backend (schema checked) and a read-only inspector on the same engine."""
    _check_url(url)
    backend = SqlBackend(url)
    try:
        yield backend, StoreInspector(backend.engine)
    finally:
        backend.close()


def _check_url(url: str) -> None:
    """Refuse what SqlBackend would take badly: a malformed URL, a SQLite file that is not there.

    SQLite creates a missing file on connect: a typo in a read-only command would leave an
    empty database behind. An in-memory SQLite database would always be empty.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise InvalidInputError(f"not a valid database URL: {mask_url(url)}") from None
    if parsed.get_backend_name() != "sqlite":
        return
    database = parsed.database
    if not database or database == ":memory:":
        raise InvalidInputError(
            "an in-memory SQLite database is empty in every new process: "
            "give the URL of a database file (sqlite:///path/to/file.db)"
        )
    if not database.startswith("file:") and not Path(database).exists():
        raise SchemaError(
            f"no SQLite database at {database}: check --url, or create one with "
            f"`{PROG} migrate --url {mask_url(url)}`"
        )
