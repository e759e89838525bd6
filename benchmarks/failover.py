"""The downtime workers see when a PostgreSQL primary is lost and its synchronous standby
promoted.

``python -m benchmarks.failover`` runs the scenario of ``tests/cluster/test_failover.py``
(``run_workers_across_failover``: three worker processes of four threads on 60 fork
workflows, through one multi-host URL; once a quarter of the tasks are recorded the primary
is SIGKILLed and the standby promoted ``--promote-after`` seconds later; the workers are not
restarted) ``--rounds`` times per promotion delay (default 0 s and 5 s), each round on a
fresh pair (scripts/pg-standby-pair, ports 5440-5441: run nothing else on them meanwhile),
checks each run as the test does, and prints per delay the medians and ranges of:

- ``write``: from the kill to the first write accepted through the multi-host URL (a probe
  connecting afresh every 50 ms): the failover itself;
- ``worker``: from the kill to the first call a worker sent after its first failure that
  the store answered (per surviving process): what the workers see, their back-off
  included;
- ``completion``: the same for ``complete_tasks`` only;
- ``executions``: task executions per recorded result (re-runs of tasks whose outcome was
  unknown, whose results the worker gave up recording, or whose claims expired meanwhile).

Run as root (the script runs the servers as the ``postgres`` user).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.clusters import StandbyPair, server_directory
from helpers.failover_workers import (
    WorkerRun,
    check_worker_run,
    run_workers_across_failover,
)


def _summary(values: list[float], unit: str = "s") -> str:
    if not values:
        return "n/a"
    return (
        f"median {statistics.median(values):.2f} {unit} "
        f"(range {min(values):.2f}-{max(values):.2f}, n={len(values)})"
    )


def _one_round(promote_after: float, seed: int) -> WorkerRun:
    with server_directory("sayiir-bench-pair-") as servers:
        pair = StandbyPair.start(servers)
        try:
            with tempfile.TemporaryDirectory(prefix="sayiir-bench-failover-") as journals:
                run = run_workers_across_failover(
                    pair, Path(journals), promote_after=promote_after, seed=seed
                )
        finally:
            pair.stop()
    problems = check_worker_run(run)
    if problems:
        raise SystemExit("the run broke a guarantee:\n" + "\n".join(problems[:20]))
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--promote-after", type=float, nargs="+", default=[0.0, 5.0], metavar="SECONDS"
    )
    args = parser.parse_args(argv)
    for delay in args.promote_after:
        writes: list[float] = []
        workers: list[float] = []
        completions: list[float] = []
        ratios: list[float] = []
        for round_number in range(args.rounds):
            run = _one_round(delay, seed=round_number)
            failover = run.failover
            writes.append(failover.first_write_at - failover.killed_at)
            workers.append(statistics.median(run.worker_downtimes().values()))
            completions.append(statistics.median(run.completion_downtimes().values()))
            recorded = sum(len(s.completed_tasks) for s in run.snapshots.values())
            ratios.append(len(run.records("exec")) / recorded)
            print(
                f"promote after {delay:.0f} s, round {round_number + 1}: "
                f"write {writes[-1]:.2f} s, worker {workers[-1]:.2f} s, "
                f"completion {completions[-1]:.2f} s, executions/result {ratios[-1]:.3f}",
                flush=True,
            )
        print(f"promote after {delay:.0f} s:")
        print(f"  write       {_summary(writes)}")
        print(f"  worker      {_summary(workers)}")
        print(f"  completion  {_summary(completions)}")
        print(f"  executions  {_summary(ratios, 'per result')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
