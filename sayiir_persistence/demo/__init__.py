"""``sayiir-persistence demo``: an order pipeline that survives ``SIGKILL`` of a worker.

What it does, in order:

1. Provisions the database (an SQLite file in a temporary directory unless ``--url`` is given)
   and creates ``instances`` workflows of an order pipeline::

       validate -> (reserve_stock || charge_payment) -> ship

   Each task sleeps 10-60 ms and returns JSON that the next task reads.
2. Starts ``processes`` worker processes, each a :class:`~sayiir_persistence.worker.Worker`
   with ``threads`` threads and a short claim TTL.
3. Once ``kill_after`` of the task runs are done (an order is four tasks; the orders advance
   side by side, so counting finished orders would fire only near the end), sends
   ``SIGKILL`` to the worker process
   running the most tasks whose results are not saved yet, and starts a replacement. The
   killed worker's claims expire after the TTL and the other workers take its tasks over.
   (Should the victim have saved them all in the instant before the kill, one more worker
   is killed later: the demo is about work abandoned mid-task.)
4. Waits until every order completes, stops the workers with ``SIGTERM`` (they release
   their claims and exit 0), and verifies the result (see :class:`DemoReport`).

How "no task's result was recorded twice" is checked, with the public API only:

- Every execution of a task function inserts one row into the demo's own table,
  ``demo_executions`` (execution id, worker, fencing token of its claim), and the worker's
  ``on_outcome`` hook writes how it ended (``recorded``, ``lost``, ...). A process killed
  mid-task leaves rows without an outcome: those whose result is not the stored one are the
  abandoned executions, and each must have been taken over.
- Every task's output carries its execution id and the execution ids of the outputs it
  consumed. The stored results must form one consistent chain (``ship`` consumed exactly the
  ``reserve_stock`` and ``charge_payment`` results that are stored, and so on).
- A *duplicate result* is a task for which more than one execution was accepted by the store
  (reported ``recorded``, or found as the stored result). It must be 0, while re-executions
  of the killed worker's tasks are expected: they show up with a fencing token above 1 and
  are counted as *takeovers*.

The demo's workflows have ids ``order-<run>-<n>`` and the tags ``sayiir-demo`` and
``sayiir-demo-<run>``; its workers run only those, plus untagged workflows of others (the tag
rule: a task fits a worker when the workflow's tags are a subset of the worker's), leaving the
tasks they have no function for to expire. So point ``--url`` at a scratch database.

The modules: ``workflow`` (the order pipeline and its tasks), ``executions`` (the bookkeeping
table), ``processes`` (the worker processes), ``run`` (a run, the kill included), ``verify``
and ``report`` (the checks and the report), ``command`` (the options and
``python -m sayiir_persistence.demo``).
"""

from .command import add_demo_arguments, main, run_demo_command
from .report import DemoReport, Kill
from .run import run_demo
from .verify import _lineage_errors as _lineage_errors  # for the tests of the verification
from .workflow import DEFINITION_HASH, ORDER_PIPELINE

__all__ = [
    "DEFINITION_HASH",
    "ORDER_PIPELINE",
    "DemoReport",
    "Kill",
    "add_demo_arguments",
    "main",
    "run_demo",
    "run_demo_command",
]
