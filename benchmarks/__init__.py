"""Benchmarks of sayiir-persistence (not part of the test run): ``python -m benchmarks --help``.

One module per scenario (``claim_cycle``, ``contended``, ``scaling``, ``payloads``), the
bare-driver ceiling in ``ceiling``, the process layout and latency summaries in ``timing``,
tables / JSON / chart in ``report``, databases and seeding in ``databases``. Results of the
last full run on the project's machine: ``benchmarks/RESULTS.md``.
"""
