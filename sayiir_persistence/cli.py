"""The ``sayiir-persistence`` command (also ``python -m sayiir_persistence``).

Subcommands:

- ``migrate [--url URL] [--revision REV]``: provision or upgrade the ``sayiir_*`` tables.
- ``demo [--url URL] [...]``: the crash-surviving demo (SQLite by default; see ``demo.py``).

Exit status: 0 on success, 1 on failure (one line on stderr, password masked), 2 on a usage
error. Each subcommand is one ``_cmd_*`` function registered in :func:`_parser`; add new ones
(list, show, claims, cancel, ...) the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from .errors import PersistenceError
from .provisioning import URL_ENV_VAR, redact_passwords, upgrade

__all__ = ["main"]

PROG = "sayiir-persistence"

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

logger = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.verbose)
    command: Command = args.command
    try:
        return command(args)
    except PersistenceError as exc:
        _fail(str(exc))
    except Exception as exc:  # last resort: one line; the traceback is logged with -vv
        logger.debug("unexpected error", exc_info=True)
        _fail(f"unexpected {type(exc).__name__}: {exc}")
    return EXIT_FAILURE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage the database of sayiir-persistence.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log progress to stderr (-vv for debug output)",
    )
    subcommands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    migrate = subcommands.add_parser(
        "migrate",
        help="create or upgrade the sayiir_* tables",
        description="Create the sayiir_* tables, or upgrade them to the newest revision. "
        "Safe to run repeatedly and concurrently.",
    )
    _add_url_argument(migrate)
    migrate.add_argument(
        "--revision",
        default="head",
        help="the revision to upgrade to (default: %(default)s, the newest)",
    )
    migrate.set_defaults(command=_cmd_migrate)

    demo = subcommands.add_parser(
        "demo",
        help="run the crash-surviving demo (an embedded SQLite file by default)",
        description="Run order workflows across several worker processes, SIGKILL one "
        "midway, and verify every order completed with no result recorded twice.",
    )
    # Imported here: the demo pulls in rich and multiprocessing, which migrate does not need.
    from .demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(command=_cmd_demo)
    return parser


def _add_url_argument(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get(URL_ENV_VAR) or None
    parser.add_argument(
        "--url",
        default=default,
        required=default is None,
        help=f"SQLAlchemy database URL (default: ${URL_ENV_VAR})",
    )


def _cmd_migrate(args: argparse.Namespace) -> int:
    result = upgrade(args.url, args.revision)
    if result.changed:
        print(f"migrated {result.url} from {result.from_revision} to {result.to_revision}")
    else:
        print(f"{result.url} is already at {result.to_revision}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo_command

    try:
        return run_demo_command(args)
    except KeyboardInterrupt:
        return 130  # the shell's convention for "stopped by SIGINT"


def _fail(message: str) -> None:
    # Library messages mask passwords already; this also covers a URL inside a driver message.
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)


def _one_line(message: str) -> str:
    return redact_passwords(" ".join(message.split()))


def _configure_logging(verbosity: int) -> None:
    if verbosity <= 0:
        return
    logging.basicConfig(
        level=logging.DEBUG if verbosity > 1 else logging.INFO,
        format="%(levelname)s [%(name)s] %(message)s",
        stream=sys.stderr,
    )
