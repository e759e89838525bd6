"""The ``sayiir-persistence`` command (also ``python -m sayiir_persistence``).

Subcommands:

- ``migrate [--url URL] [--revision REV]``: provision or upgrade the ``sayiir_*`` tables.
- ``demo [--url URL] [...]``: the crash-surviving demo (SQLite by default; see
  ``sayiir_persistence.demo``).
- Operator commands, each with ``--url`` (default ``$SAYIIR_DATABASE_URL``) and ``--json``:

  - ``list [--status S] [--after ID] [--limit N]``: workflow instances, a page at a time;
  - ``show ID``: one workflow: snapshot, claims and pending signals;
  - ``claims [--all] [--worker W] [--limit N]``: live claims (``--all``: expired and
    released ones too), judged by the database clock;
  - ``cancel ID`` / ``pause ID`` ``[--reason R] [--by WHO]``: request it and apply it at once;
  - ``resume ID``: put a paused workflow back in progress;
  - ``retry ID``: re-queue a failed workflow where it failed (attempts counted anew);
  - ``prune --status S --older-than 7d [--batch N] [--dry-run]``: delete finished workflows,
    a ``prune_workflows`` batch at a time;
  - ``stats [--watch SECONDS] [--prometheus]``: workflows by status, runnable tasks by
    priority, claims by worker, completions (``store_stats``); ``--watch`` refreshes until
    Ctrl-C (exit 0), ``--prometheus`` prints the Prometheus text exposition format.

People get ``rich`` tables; ``--json`` prints one JSON object on stdout for scripts. Payloads
in ``show --json`` are ``{"size": N, "base64": "..."}`` (whole, lossless).

Exit status: 0 on success, 1 on failure or refusal (unknown id, a workflow that cannot be
paused or retried, a database that is unreachable or not provisioned, a stored row that
cannot be decoded: one line on stderr, password masked, never a traceback), 2 on a usage error.

The modules, one job each:

- ``parser``: the argument parser, subcommands and options; ``arguments``: the types of the
  arguments (positive counts, durations);
- ``commands``: a ``cmd_*`` function per subcommand (``migrate``, ``inspect``, ``signals``,
  ``retry``, ``prune``, ``stats``), each opening its database through ``database`` (URL checks,
  password masking);
- ``render``: the ``rich`` tables and messages; ``json_output``: the ``--json`` objects;
  ``stats_output``: the tables, JSON and Prometheus exposition of ``stats``;
- ``program``: the program's name and exit statuses; this module: :func:`main`, which runs
  a command and turns its failure into one line on stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from ..errors import PersistenceError
from ..urls import redact_passwords
from .arguments import format_duration, parse_duration
from .parser import build_parser
from .program import EXIT_FAILURE, EXIT_USAGE, PROG, Command

__all__ = ["format_duration", "main", "parse_duration"]

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
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
    except BrokenPipeError:
        # The reader went away (`sayiir-persistence list | head`): nothing left to say.
        # Point stdout at devnull so that the interpreter's final flush does not fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except Exception as exc:  # last resort: one line; the traceback is logged with -vv
        logger.debug("unexpected error", exc_info=True)
        _fail(f"unexpected {type(exc).__name__}: {exc}")
    return EXIT_FAILURE


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
