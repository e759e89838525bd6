"""Argument checks shared by every backend, run before any lookup or write.

Each check raises :class:`InvalidInputError` naming the offending argument, so a caller
learns what was wrong and the store is never touched with bad data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import TypeVar

from .errors import InvalidInputError

MAX_ID_LENGTH = 255
"""Ids and names (instance, task, worker, fork/delay/signal ids, event names, tags) are
``str`` of 1 to this many characters."""

DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
"""Default upper bound (inclusive) for one payload; backends take ``max_payload_bytes``."""

MAX_TTL = timedelta(days=365 * 100)
"""Claims longer than this are refused: use ``ttl=None`` for a claim that never expires."""

MIN_PRIORITY, MAX_PRIORITY = 1, 5

MAX_INT = 2**63 - 1
"""The largest limit, version or token: what every database stores as a signed 64-bit int."""

E = TypeVar("E", bound=Enum)


def _check_str(value: object, name: str) -> str:
    """A ``str`` every database can store: no NUL, no lone surrogate."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a str, got {type(value).__name__}")
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; refusing everywhere keeps backends alike.
        raise InvalidInputError(f"{name} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{name} is not valid Unicode (lone surrogate)") from exc
    return value


def check_id(value: object, name: str) -> str:
    """Return ``value`` if it is a valid id, else raise ``InvalidInputError``."""
    text = _check_str(value, name)
    if not 1 <= len(text) <= MAX_ID_LENGTH:
        raise InvalidInputError(
            f"{name} must be 1 to {MAX_ID_LENGTH} characters long, got {len(text)}"
        )
    return text


def check_optional_id(value: object, name: str) -> str | None:
    return None if value is None else check_id(value, name)


def check_text(value: object, name: str, *, optional: bool = True) -> str | None:
    """Free text (error messages, reasons): any length."""
    if value is None and optional:
        return None
    return _check_str(value, name)


def check_bytes(value: object, name: str) -> bytes:
    """A payload's type; its size is checked by the backend it is saved to."""
    if not isinstance(value, bytes):
        raise InvalidInputError(f"{name} must be bytes, got {type(value).__name__}")
    return value


def check_optional_bytes(value: object, name: str) -> bytes | None:
    return None if value is None else check_bytes(value, name)


def check_payload(value: object, name: str, max_bytes: int) -> bytes:
    payload = check_bytes(value, name)
    if len(payload) > max_bytes:
        raise InvalidInputError(
            f"{name} is {len(payload)} bytes, above the maximum of {max_bytes} bytes "
            "(max_payload_bytes)"
        )
    return payload


def check_optional_payload(value: object, name: str, max_bytes: int) -> bytes | None:
    return None if value is None else check_payload(value, name, max_bytes)


def check_aware(value: object, name: str) -> datetime:
    """An aware ``datetime``, returned converted to UTC."""
    if not isinstance(value, datetime):
        raise InvalidInputError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInputError(f"{name} must be timezone-aware (got a naive datetime)")
    return value.astimezone(UTC)


def check_optional_aware(value: object, name: str) -> datetime | None:
    return None if value is None else check_aware(value, name)


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def check_optional_traceparent(value: object, name: str) -> str | None:
    """``None`` or a W3C ``traceparent`` (version-trace id-parent id-flags, lowercase hex, 55
    characters), else ``InvalidInputError``; all-zero ids are invalid by the W3C rules."""
    if value is None:
        return None
    text = _check_str(value, name)
    if (
        not _TRACEPARENT.fullmatch(text)
        or text.startswith("ff")
        or text[3:35] == "0" * 32
        or text[36:52] == "0" * 16
    ):
        raise InvalidInputError(
            f"{name} must be a W3C traceparent such as "
            f"'00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', got {text[:80]!r}"
        )
    return text


def check_ttl(value: object, name: str = "ttl") -> timedelta | None:
    """A positive ``timedelta`` up to :data:`MAX_TTL`, or ``None`` (never expires)."""
    if value is None:
        return None
    if not isinstance(value, timedelta):
        raise InvalidInputError(f"{name} must be a timedelta or None, got {type(value).__name__}")
    if value <= timedelta(0):
        raise InvalidInputError(f"{name} must be positive, got {value}")
    if value > MAX_TTL:
        raise InvalidInputError(f"{name} must be at most {MAX_TTL.days} days; use None")
    return value


def check_positive_interval(value: object, name: str) -> timedelta:
    if not isinstance(value, timedelta):
        raise InvalidInputError(f"{name} must be a timedelta, got {type(value).__name__}")
    if value <= timedelta(0):
        raise InvalidInputError(f"{name} must be positive, got {value}")
    return value


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= MAX_INT:
        raise InvalidInputError(f"{name} must be between {minimum} and 2**63-1, got {value}")
    return value


def check_limit(value: object, name: str = "limit") -> int:
    return _check_int(value, name, 1)


def check_optional_limit(value: object, name: str = "limit") -> int | None:
    return None if value is None else check_limit(value, name)


def check_count(value: object, name: str) -> int:
    """A number of things: 0 or more."""
    return _check_int(value, name, 0)


def check_version(value: object, name: str) -> int:
    """A version or fencing token: 0 or more."""
    return _check_int(value, name, 0)


def check_priority(value: object, name: str = "priority") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be an int, got {type(value).__name__}")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidInputError(
            f"{name} must be between {MIN_PRIORITY} and {MAX_PRIORITY}, got {value}"
        )
    return value


def check_tags(value: object, name: str = "tags") -> frozenset[str]:
    if isinstance(value, str | bytes):
        # A bare string is an iterable of characters: almost always a mistake.
        raise InvalidInputError(f"{name} must be a collection of str, not a single str")
    if not isinstance(value, Iterable):
        raise InvalidInputError(f"{name} must be a collection of str, got {type(value).__name__}")
    return frozenset(check_id(tag, f"{name} item") for tag in value)


def check_enum(value: object, enum: type[E], name: str) -> E:
    try:
        return enum(value)
    except (ValueError, TypeError):
        allowed = ", ".join(member.value for member in enum)
        raise InvalidInputError(f"{name} must be one of {allowed}, got {value!r}") from None
