"""The database an operator command works on: its URL checked, then the backend opened."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InvalidInputError, SchemaError
from ..inspection import StoreInspector
from ..sql.backend import SqlBackend
from ..urls import is_in_memory_sqlite, mask_url, parse_url
from .program import PROG

__all__ = ["open_store"]


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
    parsed = parse_url(url, "--url")
    if parsed.get_backend_name() != "sqlite":
        return
    database = parsed.database
    if database is None or is_in_memory_sqlite(parsed):
        raise InvalidInputError(
            "an in-memory SQLite database is empty in every new process: "
            "give the URL of a database file (sqlite:///path/to/file.db)"
        )
    if not database.startswith("file:") and not Path(database).exists():
        raise SchemaError(
            f"no SQLite database at {database}: check --url, or create one with "
            f"`{PROG} migrate --url {mask_url(url)}`"
        )
