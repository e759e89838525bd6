"""``stats``: the queue at a glance (``store_stats``), once or refreshed every few seconds."""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich.live import Live

from ...sql.backend import SqlBackend
from ..database import open_store
from ..json_output import print_json
from ..program import EXIT_OK, EXIT_USAGE, PROG
from ..render import new_console
from ..stats_output import (
    PROMETHEUS_MISSING,
    prometheus_available,
    stats_json,
    stats_prometheus,
    stats_renderable,
)


def cmd_stats(args: argparse.Namespace) -> int:
    if args.prometheus and (args.json or args.watch is not None):
        return _usage("--prometheus prints one exposition: not with --json nor --watch")
    if args.prometheus and not prometheus_available():
        return _usage(PROMETHEUS_MISSING)
    with open_store(args.url) as (backend, _):
        if args.watch is not None:
            return _watch(backend, args.watch, as_json=args.json)
        stats = backend.store_stats()
    if args.prometheus:
        sys.stdout.write(stats_prometheus(stats))
    elif args.json:
        print_json(stats_json(stats))
    else:
        new_console().print(stats_renderable(stats))
    return EXIT_OK


def _watch(backend: SqlBackend, seconds: float, *, as_json: bool) -> int:
    """Read and show the figures every ``seconds`` until Ctrl-C (which ends it with 0).

    On a terminal the table is redrawn in place; into a pipe or file each refresh is printed
    after the previous one (with ``--json``: one JSON object a line), so a log keeps them all.
    """
    console = new_console()
    try:
        if as_json or not console.is_terminal:
            while True:
                stats = backend.store_stats()
                if as_json:
                    print(json.dumps(stats_json(stats)), flush=True)
                else:
                    console.print(stats_renderable(stats))
                    console.file.flush()
                time.sleep(seconds)
        with Live(console=console, auto_refresh=False) as live:
            while True:
                live.update(stats_renderable(backend.store_stats()), refresh=True)
                time.sleep(seconds)
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl-C is how one stops watching


def _usage(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE
