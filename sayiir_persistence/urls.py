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
# libpq also takes the password as a query parameter (``?password=...``).
_PASSWORD_IN_QUERY = re.compile(r"([?&]password=)[^&#\s]*", re.IGNORECASE)


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
        url = make_url(_libpq_host_list(value))
        url.port  # noqa: B018 - a non-numeric port only fails when read
    except (ArgumentError, ValueError):
        # SQLAlchemy's messages repeat the URL, password included: keep them out.
        raise InvalidInputError(f"not a valid database URL: {redact_passwords(value)}") from None
    return url


def _libpq_host_list(value: str) -> str:
    """A PostgreSQL URL naming several servers libpq's way, ``user@h1:p1,h2:p2/db`` (which
    SQLAlchemy cannot parse: it reads ``p1,h2:p2`` as the port), rewritten in SQLAlchemy's
    form, ``user@/db?host=h1:p1&host=h2:p2``: the same servers, tried in order by libpq
    (with ``target_session_attrs=read-write``, until one takes writes). Other URLs are
    returned as they are."""
    scheme, separator, rest = value.partition("://")
    if not separator or not scheme.startswith("postgresql"):
        return value
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    if "," not in hosts:
        return value
    path, question, query = tail.partition("?")
    listed = "&".join(f"host={host}" for host in hosts.split(",") if host)
    query = f"{listed}&{query}" if question and query else listed
    return f"{scheme}://{userinfo}{at}{path or '/'}?{query}"


def is_in_memory_sqlite(url: URL) -> bool:
    """A SQLite URL without a file: every connection would see its own empty database."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def mask_url(url: str | URL) -> str:
    """``url`` with its password replaced by ``***``, even when it does not parse; a
    ``password`` query parameter (which libpq takes too) is masked as well."""
    if isinstance(url, URL):
        parsed = url
    else:
        try:
            parsed = make_url(_libpq_host_list(url))
        except (ArgumentError, ValueError):
            return redact_passwords(url)
    return redact_passwords(parsed.render_as_string(hide_password=True))


def redact_passwords(text: str) -> str:
    """Replace the password of every ``scheme://user:password@``, and every
    ``?password=`` / ``&password=`` query parameter, in ``text`` by ``***``."""
    return _PASSWORD_IN_QUERY.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***@", text))
