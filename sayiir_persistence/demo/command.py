"""The demo's command line: its options (the ``demo`` subcommand of ``sayiir-persistence``) and
``python -m sayiir_persistence.demo``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import FrameType

from rich.console import Console

from ..cli.arguments import positive_int
from ..cli.program import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK
from ..errors import PersistenceError
from .run import run_demo


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (the ``demo`` subcommand's)."""
    parser.add_argument(
        "--url",
        default=None,
        help="database URL (default: a fresh SQLite file in a temporary directory). "
        "Use a scratch database: SAYIIR_DATABASE_URL is deliberately not used",
    )
    parser.add_argument(
        "--instances", type=positive_int, default=200, help="orders to run (default: %(default)s)"
    )
    parser.add_argument(
        "--processes", type=positive_int, default=3, help="worker processes (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=4,
        help="threads per worker process (default: %(default)s)",
    )
    parser.add_argument(
        "--kill-after",
        type=_fraction,
        default=0.3,
        metavar="FRACTION",
        help="SIGKILL a worker once this fraction of the task runs is done (default: %(default)s)",
    )
    parser.add_argument(
        "--ttl",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="claim TTL of the workers (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        metavar="SECONDS",
        help="give up if the orders have not completed by then (default: %(default)s)",
    )
    parser.add_argument(
        "--flaky",
        type=_fraction_or_zero,
        default=0.0,
        metavar="FRACTION",
        help="this fraction of the payments fail at their first attempt and are retried "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary SQLite database and print its URL (to try the other commands)",
    )


def run_demo_command(args: argparse.Namespace, console: Console | None = None) -> int:
    """Run the demo from parsed :func:`add_demo_arguments` options; 0 if it verified, else 1.

    ``PersistenceError`` (bad URL, unreachable database) propagates to the caller, and so
    does ``KeyboardInterrupt`` (also raised for ``SIGTERM`` while the demo runs, so that its
    worker processes are stopped and its temporary database removed either way).
    """
    with _sigterm_as_interrupt():
        report = run_demo(
            args.url,
            instances=args.instances,
            processes=args.processes,
            threads=args.threads,
            kill_after=args.kill_after,
            ttl=timedelta(seconds=args.ttl),
            timeout=timedelta(seconds=args.timeout),
            keep=args.keep,
            console=console,
            flaky=args.flaky,
        )
    return EXIT_OK if report.ok else EXIT_FAILURE


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def _fraction_or_zero(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m sayiir_persistence.demo [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m sayiir_persistence.demo", description="Run the crash-surviving demo."
    )
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_demo_command(args)
    except PersistenceError as error:  # bad URL, database down: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:  # the workers were stopped on the way out
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
