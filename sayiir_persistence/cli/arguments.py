"""The types of the command line's arguments: positive counts and durations (``7d``, ``1d12h``).

Each raises ``argparse.ArgumentTypeError``, which argparse reports as a usage error (exit 2).
:func:`format_duration` writes a duration back the way :func:`parse_duration` reads it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from datetime import timedelta

_DURATION_PART = re.compile(r"(\d+)([smhd])")
UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}  # largest first


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``, ``15m``, ``12h``, ``7d`` or a sum of them (``1d12h``).

    Raises ``argparse.ArgumentTypeError`` (a usage error) for anything else.
    """
    compact = text.strip().lower()
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(number + unit for number, unit in parts) != compact:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use e.g. 30s, 15m, 12h, 7d or 1d12h)"
        )
    return timedelta(seconds=sum(int(number) * UNIT_SECONDS[unit] for number, unit in parts))


def format_duration(duration: timedelta) -> str:
    """The inverse of :func:`parse_duration`, whole seconds, largest units first (``1d12h``)."""
    seconds = int(duration.total_seconds())
    if seconds == 0:
        return "0s"
    parts = []
    for unit, size in UNIT_SECONDS.items():
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def positive_int_at_most(maximum: int) -> Callable[[str], int]:
    """The type of an option taking an int from 1 to ``maximum``."""

    def parse(text: str) -> int:
        value = positive_int(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """A number of seconds above 0 (``2``, ``0.5``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value
