"""What every part of the command line shares: the program's name and its exit statuses."""

from __future__ import annotations

import argparse
from collections.abc import Callable

PROG = "sayiir-persistence"

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's convention for "stopped by SIGINT"

# A subcommand: its parsed options in, the exit status out.
Command = Callable[[argparse.Namespace], int]
