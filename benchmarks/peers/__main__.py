"""``python -m benchmarks.peers``: see :mod:`benchmarks.peers.run`."""

from .run import main

raise SystemExit(main())
