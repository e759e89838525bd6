"""``python -m benchmarks.peers``: our reference Worker side by side with Procrastinate, DBOS
Transact and sayiir 1.0.0 (see :mod:`benchmarks.peers.run`)."""
