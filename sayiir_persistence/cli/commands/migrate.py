"""``migrate`` (provision or upgrade the tables) and ``demo`` (the crash-surviving demo)."""

from __future__ import annotations

import argparse

from ...provisioning import upgrade
from ..program import EXIT_INTERRUPTED, EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    result = upgrade(args.url, args.revision)
    if result.changed:
        print(f"migrated {result.url} from {result.from_revision} to {result.to_revision}")
    else:
        print(f"{result.url} is already at {result.to_revision}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ...demo import run_demo_command

    try:
        return run_demo_command(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
