"""``python -m sayiir_persistence``: the ``sayiir-persistence`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
