"""One contender's process: ``python -m benchmarks.peers.child '<json spec>'``.

Each contender runs in processes of its own, so that the peer libraries never share an
interpreter and the worker's CPU time (``time.process_time()``: every thread of the process)
is the contender's alone. The spec names the side module (``benchmarks.peers.side_*``), the
database, the workload and the role:

- ``schema``: create the contender's tables in the fresh database;
- ``enqueue``: start ``ids`` workflows one at a time, as an application would;
- ``worker``: say ``ready``; on ``go`` start the workers (connecting included) and say
  ``started``; on ``stop`` read the CPU time, stop the workers and say ``done``;
- ``starter``: on ``go`` start the workflows one at a time while the workers run, waiting for
  each to complete (seen with the parent's SQL), then pausing, before the next.

A side has ``create_schema``, ``open_client``, ``start_workflow(id)``, ``start_workers``,
``stop_workers`` and ``close``. Messages to the parent are lines ``@@peers {json}`` on stdout
(anything else a library prints is ignored); commands come as lines on stdin.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any

PREFIX = "@@peers "


def say(event: str, **values: Any) -> None:
    sys.stdout.write(PREFIX + json.dumps({"event": event, **values}) + "\n")
    sys.stdout.flush()


def wait_for(command: str) -> None:
    line = sys.stdin.readline()
    if line.strip() != command:
        raise SystemExit(f"expected {command!r} from the parent, got {line!r}")


def _library() -> str | None:
    module = sys.modules.get("sayiir_persistence")
    return getattr(module, "__file__", None)


def run(spec: dict[str, Any]) -> None:
    side = importlib.import_module(spec["module"]).Side(
        spec["target"], spec["kind"], spec.get("options", {})
    )
    role = spec["role"]
    ids: list[str] = spec.get("ids", [])
    try:
        if role == "schema":
            side.create_schema()
            say("done")
        elif role == "enqueue":
            side.open_client()
            started = time.perf_counter()
            for instance_id in ids:
                side.start_workflow(instance_id)
            say("done", seconds=time.perf_counter() - started)
        elif role == "worker":
            say("ready", library=_library())
            wait_for("go")
            t0, cpu0 = time.time(), time.process_time()
            side.start_workers()
            say("started", t0=t0, startup_s=time.time() - t0)
            wait_for("stop")
            cpu_s = time.process_time() - cpu0
            side.stop_workers()
            say("done", cpu_s=cpu_s, library=_library())
        elif role == "starter":
            starts = _start_one_at_a_time(side, spec, ids)
            say("done", starts=starts)
        else:
            raise SystemExit(f"unknown role {role!r}")
    finally:
        side.close()


def _start_one_at_a_time(side: Any, spec: dict[str, Any], ids: list[str]) -> dict[str, float]:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    side.open_client()
    engine = sa.create_engine(spec["probe_url"], poolclass=NullPool)
    done = sa.text(spec["done_sql"])
    starts: dict[str, float] = {}
    say("ready")
    wait_for("go")
    with engine.connect() as conn:
        for instance_id in ids:
            starts[instance_id] = time.time()
            side.start_workflow(instance_id)
            deadline = time.monotonic() + spec["timeout_s"]
            while conn.execute(done, {"id": instance_id}).first() is None:
                conn.rollback()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{instance_id} not complete after {spec['timeout_s']} s")
                time.sleep(spec["probe_s"])
            conn.rollback()
            time.sleep(spec["pause_s"])
    engine.dispose()
    return starts


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
