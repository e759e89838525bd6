"""``python -m sayiir_persistence.demo [options]``: the demo alone."""

from .command import main

if __name__ == "__main__":
    raise SystemExit(main())
