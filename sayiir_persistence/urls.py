"""Database URLs: parse and validate what callers pass, and mask passwords wherever shown.

Every entry point that takes a URL (``SqlBackend``, ``migrate``, the command line) parses it
here, so a bad URL gets the same clear error everywhere and its password never reaches a
message, a log line or a ``repr``.
"""

from __future__ import annotations

import re

from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import InvalidInputError

__all__ = ["is_in_memory_sqlite", "mask_url", "parse_url", "redact_passwords"]

_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def parse_url(value: object, argument: str = "engine_or_url") -> URL:
    """``value`` (a ``str`` or ``URL``) as a SQLAlchemy ``URL``.

    Raises:
        InvalidInputError: ``value`` is of another type, or not a valid URL (the message
            names ``argument`` and shows the URL with its password masked).
    """
    if isinstance(value, URL):
        return value
    if not isinstance(value, str):
        raise InvalidInputError(
            f"{argument} must be an Engine, a URL or a str, got {type(value).__name__}"
        )
    try:
        url = make_url(value)
        url.port  # noqa: B018 - a non-numeric port only fails when read
    except (ArgumentError, ValueError):
        # SQLAlchemy's messages repeat the URL, password included: keep them out.
        raise InvalidInputError(f"not a valid database URL: {redact_passwords(value)}") from None
    return url


def is_in_memory_sqlite(url: URL) -> bool:
    """A SQLite URL without a file: every connection would see its own empty database."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def mask_url(url: str | URL) -> str:
    """``url`` with its password replaced by ``***``, even when it does not parse."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return redact_passwords(url)


def redact_passwords(text: str) -> str:
    """Replace the password of every ``scheme://user:password@`` in ``text`` by ``***``."""
    return _PASSWORD_IN_URL.sub(r"\1***@", text)
